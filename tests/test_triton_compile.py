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
    "logits_ptr": "fp32", "counts_ptr": "i32", "prompt_ptr": "i32", "allowed_ptr": "i32", "eos_ptr": "i32",
    "bias_indptr_ptr": "i32", "bias_ids_ptr": "i32", "bias_vals_ptr": "fp32", "fparams_ptr": "fp32",
    "iparams_ptr": "i32", "steps_ptr": "i64", "seeds_ptr": "i64", "seqs_ptr": "i64", "mu_ptr": "fp32",
    "rowf_ptr": "fp32", "rowi_ptr": "i32", "part_f_ptr": "fp32", "part_i_ptr": "i32", "top_ptr": "fp32",
    "gt_val_ptr": "fp32", "gt_id_ptr": "i32", "tokens_ptr": "i64", "valid_ptr": "i8", "logprobs_ptr": "fp32",
    "ranks_ptr": "i64", "top_ids_ptr": "i64", "top_lps_ptr": "fp32", "mu_out_ptr": "fp32", "ctr_ptr": "i64",
    "key_ptr": "i64", "word_ptr": "i64", "slot_ptr": "i64", "tbm_ptr": "i32", "gmax_ptr": "fp32", "cid_ptr": "i32",
    "cz_ptr": "fp32",
    "lps_ptr": "i32", "lpsf_ptr": "fp32",
}
_OUT = {"probs._probs_kernel": "fp32", "probs._kept_mask_kernel": "i8",
        "philox._philox_block_kernel": "i64", "philox._noise_kernel": "fp32"}

ZFLAGS = dict(HAS_BIAS=True, HAS_COUNTS=True, HAS_PROMPT=True, HAS_ALLOWED=True, HAS_EOS=True, SLOTS=False,
              HAS_TBM=False, BIAS_TABLE=False)
NOZ = dict(HAS_BIAS=False, HAS_COUNTS=False, HAS_PROMPT=False, HAS_ALLOWED=False, HAS_EOS=False, SLOTS=False,
           HAS_TBM=False, BIAS_TABLE=False)
# a Sampler step with a tensor of slots: state read through the slot index, token bitmask, per-slot bias tables
SLOTZ = dict(ZFLAGS, SLOTS=True, HAS_TBM=True, BIAS_TABLE=True)
SLOTNOZ = dict(NOZ, SLOTS=True)
CASES = [  # every kernel, in the specialisations backend.py launches (CUDA knobs: CHUNK 1024, DIGIT_BITS 4)
    ("stats._stats_kernel", dict(ZFLAGS, NEED_RAW=True, ARGMAX=True, LSE=True, GROUP=0, RAW_GROUP=False, BLOCK=1024,
                                 CHUNK=1024)),
    ("stats._stats_kernel", dict(NOZ, NEED_RAW=False, ARGMAX=False, LSE=True, GROUP=128, RAW_GROUP=False,
                                 BLOCK=1024, CHUNK=1024)),
    ("stats._stats_kernel", dict(ZFLAGS, NEED_RAW=True, ARGMAX=True, LSE=True, GROUP=128, RAW_GROUP=True,
                                 BLOCK=1024, CHUNK=1024)),
    ("stats._stats_kernel", dict(ZFLAGS, NEED_RAW=False, ARGMAX=True, LSE=False, GROUP=0, RAW_GROUP=False,
                                 BLOCK=1024, CHUNK=4096)),
    ("stats._combine_kernel", dict(SLOTS=False, MINP=True, MIRO2=True, CAND=False, GBLOCK=16, BT=128)),
    ("stats._combine_kernel", dict(SLOTS=False, MINP=False, MIRO2=False, CAND=True, GBLOCK=1024, BT=2)),
    ("stats._combine_kernel", dict(SLOTS=True, MINP=True, MIRO2=True, CAND=False, GBLOCK=16, BT=128)),
    ("candidates._compact_kernel", dict(ZFLAGS, CAP=512, GROUP=128, CBLOCK=128, CHUNK=1024)),
    ("candidates._compact_kernel", dict(NOZ, CAP=512, GROUP=128, CBLOCK=128, CHUNK=1024)),
    ("candidates._trunc_kernel", dict(ZFLAGS, MIRO1=True, CAP=512, TILE=4096, SPLIT=4, S2=4, BT_TILES=32, DIGIT_BITS=4,
                                      SBLOCK=256, BLOCK=1024)),
    ("stats._entropy_kernel", dict(ZFLAGS, BLOCK=1024, CHUNK=1024)),
    ("stats._kept_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=1024)),
    ("stats._kept_kernel", dict(NOZ, HAS_TYP=False, BLOCK=1024, CHUNK=1024)),
    ("select._select_kernel", dict(ZFLAGS, STAGE=0, FOLD_MINP=False, DIGIT_BITS=4, BLOCK=256)),
    ("select._select_kernel", dict(ZFLAGS, STAGE=1, FOLD_MINP=True, DIGIT_BITS=4, BLOCK=256)),
    ("select._select_kernel", dict(NOZ, STAGE=2, FOLD_MINP=False, DIGIT_BITS=4, BLOCK=256)),
    ("select._select_kernel", dict(ZFLAGS, STAGE=2, FOLD_MINP=False, DIGIT_BITS=8, BLOCK=16)),
    ("select._select_kernel", dict(ZFLAGS, STAGE=0, FOLD_MINP=False, DIGIT_BITS=2, BLOCK=1024)),
    ("select._typical_kernel", dict(ZFLAGS, TYP_MK=True, DIGIT_BITS=4, BLOCK=256, BT=128)),
    ("select._typical_kernel", dict(NOZ, TYP_MK=False, DIGIT_BITS=4, BLOCK=256, BT=128)),
    ("mirostat._mirostat_v1_kernel", dict(ZFLAGS, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024)),
    ("draw._finish_kernel", dict(ZFLAGS, STATS=True, LOGPROBS=True, MIRO=True, UPDATE=False, LAST=True, HAS_TYP=False,
                                 RACE=True, SPLIT=4, TILE=4096, BLOCK=1024, BT=128, BT_TILES=32, BN=32)),
    ("draw._finish_kernel", dict(NOZ, STATS=True, LOGPROBS=False, MIRO=False, UPDATE=False, LAST=True, HAS_TYP=False,
                                 RACE=True, SPLIT=4, TILE=4096, BLOCK=1024, BT=128, BT_TILES=32, BN=2)),
    ("draw._finish_kernel", dict(ZFLAGS, STATS=False, LOGPROBS=True, MIRO=True, UPDATE=False, LAST=False, HAS_TYP=True,
                                 RACE=True, SPLIT=1, TILE=4096, BLOCK=1024, BT=2, BT_TILES=2, BN=2)),
    ("draw._finish_kernel", dict(NOZ, STATS=True, LOGPROBS=False, MIRO=False, UPDATE=False, LAST=True, HAS_TYP=False,
                                 RACE=False, SPLIT=4, TILE=4096, BLOCK=1024, BT=128, BT_TILES=32, BN=2)),  # greedy
    ("logprobs._logprobs_kernel", dict(ZFLAGS, HAS_TYP=True, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024, K=32,
                                       UPDATE=False, CAND=False, RAW_GROUP=False, GROUP=128, GB=8, GBLOCK=1024)),
    ("logprobs._logprobs_kernel", dict(NOZ, HAS_TYP=False, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024, K=2,
                                       UPDATE=False, CAND=False, RAW_GROUP=False, GROUP=128, GB=8, GBLOCK=1024)),
    ("logprobs._logprobs_kernel", dict(ZFLAGS, HAS_TYP=False, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024, K=8,
                                       UPDATE=False, CAND=True, RAW_GROUP=True, GROUP=128, GB=8, GBLOCK=1024)),
    ("stats._stats_kernel", dict(SLOTZ, NEED_RAW=True, ARGMAX=True, GROUP=0, RAW_GROUP=False, BLOCK=1024,
                                 CHUNK=1024)),
    ("stats._kept_kernel", dict(SLOTZ, HAS_TYP=True, BLOCK=1024, CHUNK=1024)),
    ("select._select_kernel", dict(SLOTZ, STAGE=0, FOLD_MINP=False, DIGIT_BITS=4, BLOCK=256)),
    ("select._typical_kernel", dict(SLOTZ, TYP_MK=True, DIGIT_BITS=4, BLOCK=256, BT=128)),
    ("mirostat._mirostat_v1_kernel", dict(SLOTZ, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024)),
    ("stats._entropy_kernel", dict(SLOTZ, BLOCK=1024, CHUNK=1024)),
    ("draw._finish_kernel", dict(SLOTNOZ, STATS=True, LOGPROBS=False, MIRO=False, UPDATE=True, LAST=True, HAS_TYP=False,
                                 RACE=True, SPLIT=4, TILE=4096, BLOCK=1024, BT=128, BT_TILES=32, BN=2)),
    ("draw._finish_kernel", dict(SLOTZ, STATS=False, LOGPROBS=True, MIRO=True, UPDATE=True, LAST=False, HAS_TYP=True,
                                 RACE=True, SPLIT=1, TILE=4096, BLOCK=1024, BT=2, BT_TILES=2, BN=2)),
    ("logprobs._logprobs_kernel", dict(SLOTZ, HAS_TYP=False, DIGIT_BITS=4, SBLOCK=256, BLOCK=1024, K=32,
                                       UPDATE=True, CAND=True, RAW_GROUP=True, GROUP=128, GB=8, GBLOCK=1024)),
    ("probs._probs_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=1024)),
    ("probs._kept_mask_kernel", dict(ZFLAGS, HAS_TYP=True, BLOCK=1024, CHUNK=1024)),
    ("philox._philox_block_kernel", dict(BLOCK=64)),
    ("philox._noise_kernel", dict(BLOCK=64)),
]


def _compile(name: str, constexprs: dict, logits_dtype: str) -> str:
    """Compile one kernel for sm_90; returns "" on success, else the error (run without TRITON_INTERPRET)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod_name, fn_name = name.split(".")
    kernel = getattr(importlib.import_module(f"fastsampler.backends.triton.{mod_name}"), fn_name)
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
        # the row passes run one warp per program on CUDA (backend._Ctx.ROW_WARPS)
        options = {"num_warps": 1} if constexprs.get("CHUNK") else {}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
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
