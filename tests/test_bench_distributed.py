"""``python -m fastsampler.bench.distributed`` runs end to end with tiny settings (world sizes 2 and 4, gloo) and prints
its table: one row per world size and scenario, with the bytes of both approaches."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def test_bench_distributed_smoke() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "fastsampler.bench.distributed", "--vocab", "4096", "--batch", "2",
                          "--reps", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "machine:" in out and "gather+sample ms" in out
    rows = [line for line in out.splitlines() if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == 2 * 3, out
    assert {line.split("|")[1].strip() for line in rows} == {"2", "4"}
    for line in rows:  # the gather receives world x B x V_local x 4 bytes
        cells = [c.strip().replace(",", "") for c in line.split("|")[1:-1]]
        world, b = int(cells[0]), int(cells[1])
        assert int(cells[11]) == world * b * (-(-4096 // world)) * 4
        assert int(cells[3]) > 0 and int(cells[4]) == world * int(cells[3])
        assert int(cells[6]) > int(cells[7]) > 0 and float(cells[8]) > 0  # operations counted
