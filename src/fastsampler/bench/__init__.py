"""Benchmarks: ``python -m fastsampler.bench`` measures fastsampler against its peers on the device present.

Modules: `scenarios` (the named parameter sets of docs/benchmarks.md and each case's inputs), `providers` (fastsampler's
backends and the baselines), `validate` (the check every provider passes before it is timed), `timing` (CUDA events /
host clock), `report` (table, summary, CSV, plot), `runner` (the loop). See ``docs/benchmarks.md``.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the command line (see ``python -m fastsampler.bench --help``)."""
    from .__main__ import main as _main

    return _main(argv)
