"""fastsampler: fused sampling kernels for LLM inference.

One call per decoding step samples a token for every row of a ``[batch, vocab]`` logits tensor with per-row
parameters, with exactly defined, batch-invariant and backend-independent results (see ``docs/semantics.md``).

The package imports nothing heavy itself: each public name below loads its module (and torch) on first use, so a
command that only parses its arguments (``python -m fastsampler.bench --help``) answers without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

# public name -> the module that defines it (loaded on first access, then cached in the package's namespace)
_LAZY = {
    "SampleOutput": ".output",
    "ScoreOutput": ".output",
    "VerifyOutput": ".output",
    "SamplingParams": ".params",
    "Sampler": ".sampler",
    "SeedWithoutStepsWarning": "._api",
    "available_backends": "._api",
    "sample": "._api",
    "sampling_probs": "._api",
    "score": "._score",
}

__all__ = [
    "SampleOutput",
    "Sampler",
    "ScoreOutput",
    "VerifyOutput",
    "SamplingParams",
    "SeedWithoutStepsWarning",
    "available_backends",
    "backends",
    "reference",
    "sample",
    "sampling_probs",
    "score",
    "__version__",
]


def __getattr__(name: str) -> object:
    """Load a public name, or a submodule (``fastsampler.backends``, ``fastsampler.layout``, ...), on first use.

    ``fastsampler.reference`` is the public name of the numpy reference: the module ``reference.py`` puts
    `fastsampler.backends.reference` itself under that name, so ``import fastsampler.reference`` gives the same module.
    """
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
