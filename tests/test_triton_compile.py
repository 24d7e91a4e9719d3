"""Every Triton kernel compiles for a CUDA target (sm_90), offline, in the specialisations the backend launches.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy code and accepts programs the compiler rejects (loop
-carried types, scalar / block mixes, constexpr branches), so CI compiles them too, without a GPU: source -> TTIR ->
TTGIR -> LLVM IR -> PTX (-> cubin when the bundled ptxas runs here). Skipped when the CUDA backend is missing.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest


def _triton_available() -> bool:  # not conftest's: importing conftest would switch this process to the interpreter
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [pytest.mark.skipif(not _triton_available(), reason="triton is not installed")]

_PTR = {  # argument name -> pointee type
    "logits_ptr": "fp32", "bias_ptr": "fp32", "counts_ptr": "i32", "prompt_ptr": "i32", "allowed_ptr": "i32",
    "eos_ptr": "i32", "fparams_ptr": "fp32", "rowi_ptr": "i32", "rowf_ptr": "fp32", "tile_f_ptr": "fp32",
    "tile_i_ptr": "i32", "tile_w_ptr": "fp32", "prefix_ptr": "i64", "active_ptr": "i32", "hcnt_ptr": "i32",
    "hmass_ptr": "fp32", "hkmin_ptr": "i64", "hkmax_ptr": "i64", "above_c_ptr": "i32", "selm_ptr": "fp32",
    "target_ptr": "fp32", "tile_gt_ptr": "i32", "tile_eq_ptr": "i32", "seeds_ptr": "i64", "steps_ptr": "i64",
    "seqs_ptr": "i64", "thr_ptr": "fp32", "gt_off_ptr": "i32", "eq_off_ptr": "i32", "gt_id_ptr": "i64",
    "gt_val_ptr": "fp32", "eq_id_ptr": "i64", "ctr_ptr": "i64", "key_ptr": "i64", "word_ptr": "i64",
}
_OUT = {"select._combine_kernel": "fp32", "logprobs._rank_kernel": "i32", "probs._probs_kernel": "fp32",
        "probs._kept_mask_kernel": "i8",
        "philox._philox_block_kernel": "i64", "philox._noise_kernel": "fp32"}

ZFLAGS = dict(HAS_BIAS=True, HAS_COUNTS=True, HAS_PROMPT=True, HAS_ALLOWED=True, HAS_EOS=True)
CASES = [
    ("stats._stats_kernel", dict(ZFLAGS, NEED_RAW=True, BLOCK=1024, CHUNK=4096)),
    ("stats._stats_kernel", dict(HAS_BIAS=False, HAS_COUNTS=False, HAS_PROMPT=False, HAS_ALLOWED=False,
                                 HAS_EOS=False, NEED_RAW=False, BLOCK=1024, CHUNK=4096)),
    ("stats._stats_combine_kernel", dict(NF=9, F_TEMPERATURE=0, BT=64)),
    ("stats._kept_stats_kernel", dict(ZFLAGS, HAS_TYP=True, SURVIVORS=False, BLOCK=1024, CHUNK=4096)),
    ("stats._kept_stats_kernel", dict(ZFLAGS, HAS_TYP=False, SURVIVORS=True, BLOCK=1024, CHUNK=4096)),
    ("stats._typical_combine_kernel", dict(BT=64)),
    ("select._level_kernel", dict(ZFLAGS, HAS_TYP=True, KIND=0, WANT_MASS=True, DIGIT_BITS=4, BLOCK=1024,
                                  CHUNK=4096)),
    ("select._level_kernel", dict(ZFLAGS, HAS_TYP=True, KIND=1, WANT_MASS=True, DIGIT_BITS=4, BLOCK=1024,
                                  CHUNK=4096)),
    ("select._level_kernel", dict(ZFLAGS, HAS_TYP=True, KIND=2, WANT_MASS=False, DIGIT_BITS=4, BLOCK=1024,
                                  CHUNK=4096)),
    ("select._combine_kernel", dict(FIRST=True, LAST=False, WANT_MASS=True, GATHER=False, DIGIT_BITS=4, BT=64)),
    ("select._combine_kernel", dict(FIRST=False, LAST=True, WANT_MASS=False, GATHER=True, DIGIT_BITS=4, BT=64)),
    ("draw._draw_kernel", dict(ZFLAGS, HAS_TYP=True, SPLIT=4, BT=64, BLOCK=1024, TILE=4096)),
    ("logprobs._rank_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=4096)),
    ("logprobs._gather_kernel", dict(ZFLAGS, HAS_TYP=True, KIND=2, BLOCK=1024, CHUNK=4096)),
    ("logprobs._gather_kernel", dict(ZFLAGS, HAS_TYP=False, KIND=0, BLOCK=1024, CHUNK=4096)),
    ("probs._probs_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=4096)),
    ("probs._kept_mask_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=4096)),
    ("select._level_kernel", dict(ZFLAGS, HAS_TYP=False, KIND=0, WANT_MASS=False, DIGIT_BITS=8, BLOCK=64,
                                  CHUNK=1024)),
    ("stats._stats_kernel", dict(ZFLAGS, NEED_RAW=False, BLOCK=1024, CHUNK=1024)),
    ("philox._philox_block_kernel", dict(BLOCK=64)),
    ("philox._noise_kernel", dict(BLOCK=64)),
]


def _compile(name: str, constexprs: dict, logits_dtype: str) -> str:
    """Compile one kernel for sm_90; returns "" on success, else the error (run without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, fn_name = name.split(".")
    kernel = getattr(importlib.import_module(f"fastsampler.triton.{mod_name}"), fn_name)
    sig = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            sig[arg] = "constexpr"
        elif arg == "logits_ptr":
            sig[arg] = "*" + logits_dtype
        elif arg == "out_ptr":
            sig[arg] = "*" + _OUT[name]
        elif arg.endswith("_ptr"):
            sig[arg] = "*" + _PTR[arg]
        else:
            sig[arg] = "i32"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
    except Exception as e:  # noqa: BLE001 - reported to the parent process
        return f"{type(e).__name__}: {e}"
    return "" if "ptx" in compiled.asm else "no PTX produced"


def _main() -> int:
    failures = 0
    for name, constexprs in CASES:
        for dt in ("fp32", "bf16", "fp16"):
            err = _compile(name, constexprs, dt)
            print(f"{'FAIL' if err else 'ok'} {name} {dt} {constexprs} {err[-3000:]}", flush=True)
            failures += bool(err)
    return failures


def test_kernels_compile_for_cuda():
    """Compile every kernel specialisation in a subprocess without TRITON_INTERPRET (about a minute on a CPU)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton layout change
        pytest.skip(f"triton compiler API unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    if "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("the CUDA backend of triton is not installed")
    bad = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 0 and not bad, "\n".join(bad) or proc.stderr[-3000:]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    sys.exit(_main())
