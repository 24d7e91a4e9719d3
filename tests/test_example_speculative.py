"""examples/speculative_decoding.py runs (in a subprocess, as a user would): the rejection method on a toy draft
model, and the match method checked against step-by-step decoding."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "speculative_decoding.py"


@pytest.mark.parametrize("args", [["--method", "rejection"], ["--method", "match", "--check"]],
                         ids=["rejection", "match"])
def test_speculative_example_runs(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the example picks its backend itself
    res = subprocess.run([sys.executable, str(EXAMPLE), "--tokens", "16", "--k", "3", "--device", "cpu", *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "drafts accepted" in res.stdout
    if "--check" in args:
        assert "identical to step-by-step decoding" in res.stdout
