"""examples/generation_loop.py runs (a short continuous-batching run, in a subprocess, as a user would)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "generation_loop.py"


def test_generation_loop_short_run() -> None:
    args = [sys.executable, str(EXAMPLE), "--steps", "40", "--requests", "9", "--max-tokens", "6", "--max-slots", "6",
            "--vocab", "97", "--device", "cpu", "--backend", "auto"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # every request finished, each printed with its samples as token ids; n = 3 gives three samples
    assert re.search(r"\d+ tokens in \d+ steps, [\d.]+ s decoding: [\d.]+ tokens/s", out), out
    assert "9 of 9 requests finished" in out, out
    for kind in ("greedy", "top-p", "typical", "mirostat v2", "penalties", "logprobs", "n=3", "min-p + bias"):
        assert f"[{kind}" in out, (kind, out)
    n3 = out[out.index("[n=3"):]
    assert "sample 2: [" in n3.split("request")[0]
    assert "mean logprob" in out


def test_generation_loop_is_reproducible() -> None:
    args = [sys.executable, str(EXAMPLE), "--steps", "12", "--requests", "4", "--max-tokens", "5", "--vocab", "64",
            "--device", "cpu", "--backend", "reference", "--seed", "3"]
    runs = [subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout for _ in range(2)]
    strip = [re.sub(r"[\d.]+ s decoding: [\d.]+ tokens/s", "", r) for r in runs]
    assert strip[0] == strip[1]


def test_generation_loop_compiled_matches_eager() -> None:
    """--compile: torch.compile (inductor, dynamic batch size) of the model step with the sampling inside."""
    base = [sys.executable, str(EXAMPLE), "--steps", "10", "--requests", "4", "--max-tokens", "4", "--vocab", "64",
            "--device", "cpu", "--backend", "auto"]
    runs = [subprocess.run(base + extra, capture_output=True, text=True, timeout=300, check=True).stdout
            for extra in ([], ["--compile"])]
    strip = [re.sub(r"[\d.]+ s decoding: [\d.]+ tokens/s", "", r) for r in runs]
    assert "4 of 4 requests finished" in strip[0]
    assert strip[0] == strip[1]
