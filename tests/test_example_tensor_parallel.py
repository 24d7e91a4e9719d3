"""examples/tensor_parallel.py runs (in a subprocess, as a user would): it starts its own gloo processes, samples
from a vocabulary-parallel LM head and checks every step against single-device sampling."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"


def test_tensor_parallel_example_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(EXAMPLE), "--world", "2", "--steps", "4", "--check"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "identical to single-device sampling" in res.stdout
    assert "bytes sent" in res.stdout
