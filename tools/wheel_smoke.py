"""Smoke test of an installed fastsampler wheel (``make wheel-smoke``): run it with the Python of a fresh virtual
environment the wheel was installed into, from outside the source tree.

Checks that the package imports from that environment (not from a source checkout), that the C++ backend imports the
SIMD variant this CPU runs best (``fastsampler.backends.cpu._C.simd()``), that a small mixed batch on the CPU backend
gives the numpy reference's tokens (near-ties excepted, ``fastsampler.reference.diagnose``) and logprobs within 1e-5,
and then, in child processes, the same under ``FASTSAMPLER_SIMD`` set to every other variant this CPU runs.

    python tools/wheel_smoke.py            # the checks above, then each FASTSAMPLER_SIMD in a child process
    python tools/wheel_smoke.py --one      # the checks above only, under the current FASTSAMPLER_SIMD
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import numpy as np
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler.backends import cpu


def _runnable() -> list[str]:
    """The built variants this CPU runs, best first."""
    return [p for p in cpu.built_simd_paths() if p in cpu.cpu_simd_paths()]


def check() -> str:
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    where = os.path.realpath(fastsampler.__file__)
    assert where.startswith(site), f"fastsampler imported from {where}, not from this environment's {site}"
    ok, why = cpu.is_available()
    assert ok, why
    simd = cpu._C.simd()
    want = os.environ.get("FASTSAMPLER_SIMD", "auto")
    assert simd == (_runnable()[0] if want in ("", "auto") else want), (simd, want)
    b, v = 8, 1000
    logits = torch.from_numpy((np.random.default_rng(0).standard_normal((b, v)) * 2.0).astype(np.float32))
    params = [
        SamplingParams(seed=1, logprobs=True),
        SamplingParams(seed=2, top_k=50, top_p=0.9, min_p=0.05, logprobs=True),
        SamplingParams(seed=3, typical_p=0.9, logprobs=True),
        SamplingParams(seed=4, mirostat_mode=2, mirostat_target=5.0),
        SamplingParams(seed=5, temperature=0.0, logprobs=True),
        SamplingParams(seed=6, temperature=0.7, repetition_penalty=1.2, logit_bias={3: 4.0}, logprobs=True),
        SamplingParams(seed=7, top_p=0.5, logprobs=True, top_logprobs=3),
        SamplingParams(seed=8, min_p=0.1, logprobs=True),
    ]
    steps = torch.arange(b, dtype=torch.int64)
    got = fastsampler.sample(logits, params, backend="cpu", steps=steps)
    diag = fastsampler.reference.diagnose(logits.numpy(), params, steps=steps.numpy())
    ref, near = diag["output"], diag["near_tie"]
    tokens, ref_tokens = got.tokens.numpy(), np.asarray(ref.tokens)
    bad = (tokens != ref_tokens) & ~near
    assert not bad.any(), f"rows {np.nonzero(bad)[0].tolist()}: tokens {tokens[bad]} vs reference {ref_tokens[bad]}"
    same = tokens == ref_tokens
    lp, ref_lp = got.logprobs.numpy().astype(np.float64), np.asarray(ref.logprobs, dtype=np.float64)
    close = (np.isnan(lp) & np.isnan(ref_lp)) | (np.abs(lp - ref_lp) <= 1e-5 + 2.0**-23 * np.abs(ref_lp))
    assert close[same].all(), f"logprobs {lp} vs reference {ref_lp}"
    return (f"simd={simd} ({cpu._C.__name__}), built: {','.join(cpu.built_simd_paths())}, this CPU runs: "
            f"{','.join(cpu.cpu_simd_paths())}; {b} rows of V={v}: tokens match the reference "
            f"({int(near.sum())} near-tie rows)")


def main() -> None:
    print(f"wheel smoke [{os.environ.get('FASTSAMPLER_SIMD', 'auto')}]: {check()}", flush=True)
    if "--one" in sys.argv:
        return
    for path in _runnable()[1:]:
        env = dict(os.environ, FASTSAMPLER_SIMD=path)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--one"], env=env, check=True)
    bad = subprocess.run([sys.executable, "-c", "import fastsampler.backends.cpu"], capture_output=True, text=True,
                         env=dict(os.environ, FASTSAMPLER_SIMD="avx9"))
    assert bad.returncode != 0 and "FASTSAMPLER_SIMD must be one of" in bad.stderr, bad.stderr
    print("wheel smoke passed")


if __name__ == "__main__":
    main()
