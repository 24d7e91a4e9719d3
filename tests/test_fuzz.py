"""Hostile fuzz: random batches over the whole float32 / bfloat16 / float16 range, on every backend.

Logits mix ordinary values with ``±FLT_MAX``, spans beyond ``FLT_MAX``, denormals, signed zeros, ties and mixed
``±inf`` / NaN; parameters mix every feature, including the float32 extremes `SamplingParams` accepts; the state
mixes negative output counts, prompts, EOS rules, masks and bias. For every batch and backend:

- the call returns (a watchdog ends the process if it does not: a hang fails the run instead of stalling it);
- tokens are in ``[0, vocab_size)`` or ``-1``, and ``valid`` is ``token >= 0``;
- validity equals the reference's, and tokens equal the reference's on every row that `reference.diagnose` does not
  report as a near-tie (``docs/semantics.md`` §8); logprobs and Mirostat ``mu`` agree where the tokens do;
- each row sampled alone gives the token it got in the batch: other rows never affect it.

How many batches: ``FASTSAMPLER_FUZZ_EXAMPLES`` (default 120 for the C++ backend, a tenth of it for Triton under the
interpreter, which runs one program at a time). CI runs the default; a long local run:
``FASTSAMPLER_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``. The C++ backend also runs this file under ASan + UBSan
(``make sanitize``).
"""

from __future__ import annotations

import faulthandler
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsampler
from fastsampler import SamplingParams
from fastsampler.backends.reference import pipeline

BACKENDS = [b for b in fastsampler.available_backends() if b != "reference"]
EXAMPLES = int(os.environ.get("FASTSAMPLER_FUZZ_EXAMPLES", "120"))
WATCHDOG_S = 900  # one example never takes this long, even under the interpreter or a sanitizer

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
SPECIALS = np.array([0.0, -0.0, 1.0, -1.0, F32_MAX, -F32_MAX, 3e38, -3e38, 1e30, -1e30, 1e-40, -1e-45, 1.4e-45,
                     F32_TINY, 100.0, -100.0, math.inf, -math.inf, math.nan], dtype=np.float32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """Dump every thread's stack and end the process if a test hangs (the C++ backend releases the GIL)."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------------------------- strategies
ROW_KINDS = ("normal", "huge", "mixed", "tiny", "ties", "overflow")


def _row(rng: np.random.Generator, kind: str, v: int) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal(v) * 4).astype(np.float32)
    if kind == "huge":  # magnitudes 1e30 .. FLT_MAX of both signs, a few specials
        x = (rng.choice([-1.0, 1.0], v) * 10.0 ** rng.uniform(30, 38.53, v)).astype(np.float32)
    elif kind == "mixed":  # any float32 bit pattern (NaN, inf, denormals included) and specials
        x = rng.integers(0, 2**32, v, dtype=np.uint64).astype(np.uint32).view(np.float32).copy()
    elif kind == "tiny":  # zeros and denormals
        x = (rng.choice([-1.0, 1.0, 0.0], v) * 10.0 ** rng.uniform(-45, -36, v)).astype(np.float32)
    elif kind == "ties":
        x = rng.choice(np.array([0.0, 1.0, -1.0, 2.5], dtype=np.float32), v)
    else:  # overflow: close to -FLT_MAX, so a small temperature or a penalty pushes them past it
        x = (-F32_MAX * rng.uniform(0.3, 1.0, v)).astype(np.float32)
    n_special = int(rng.integers(0, 3))
    if n_special:
        x[rng.integers(0, v, n_special)] = rng.choice(SPECIALS, n_special)
    return x


@st.composite
def hostile_params(draw: Any, vocab: int) -> SamplingParams:
    kw: dict[str, Any] = {"seed": draw(st.integers(0, 2**64 - 1))}
    kw["temperature"] = draw(st.sampled_from([0.0, 1.0, 0.7, 1e-3, F32_TINY, 3.4e38, 1e-30]))
    if draw(st.integers(0, 4)) == 0:
        kw["mirostat_mode"] = draw(st.sampled_from([1, 2]))
        kw["mirostat_target"] = draw(st.sampled_from([1.5e-45, 0.5, 5.0, 3.4e38]))
        kw["mirostat_lr"] = draw(st.sampled_from([1.5e-45, 0.1, 1.0]))
    else:
        kw["top_k"] = draw(st.sampled_from([-1, 0, 1, 2, 5, vocab, 2**31 - 1]))
        kw["top_p"] = draw(st.sampled_from([1.0, 1.5e-45, 0.3, 0.9, 0.99999]))
        kw["min_p"] = draw(st.sampled_from([0.0, 1.5e-45, 0.05, 0.5, 1.0]))
        kw["typical_p"] = draw(st.sampled_from([1.0, 1.5e-45, 0.2, 0.9]))
        kw["min_keep"] = draw(st.sampled_from([1, 1, 2, 3, 1000]))
        if draw(st.integers(0, 3)) == 0:  # the extended truncation rules at their extremes
            kw["top_n_sigma"] = draw(st.sampled_from([0.0, 1.5e-45, 1.0, 3.4e38]))
            kw["eta_cutoff"] = draw(st.sampled_from([0.0, 1.5e-45, 0.5, 0.99999]))
            kw["xtc_probability"] = draw(st.sampled_from([0.0, 1.5e-45, 1.0]))
            kw["xtc_threshold"] = draw(st.sampled_from([0.0, 1.5e-45, 0.1, 0.5]))
    if kw["temperature"] > 0.0 and draw(st.integers(0, 3)) == 0:
        kw["dynatemp_range"] = draw(st.sampled_from([1.5e-45, 0.5, 3.4e38]))
        kw["dynatemp_exponent"] = draw(st.sampled_from([0.0, 1.0, 100.0]))
    if draw(st.integers(0, 3)) == 0:
        kw["dry_multiplier"] = draw(st.sampled_from([1.5e-45, 1.0, 3.4e38]))
        kw["dry_base"] = draw(st.sampled_from([1.0, 1.0000001, 1.75, 3.4e38]))
        kw["dry_allowed_length"] = draw(st.sampled_from([0, 1, 2]))
    kw["repetition_penalty"] = draw(st.sampled_from([1.0, 1.0, 1.5e-45, 0.5, 2.0, 3.4e38]))
    kw["frequency_penalty"] = draw(st.sampled_from([0.0, -2.0, 0.5, 2.0]))
    kw["presence_penalty"] = draw(st.sampled_from([0.0, -2.0, 1.0, 2.0]))
    if draw(st.booleans()):
        ids = draw(st.lists(st.integers(0, vocab - 1), max_size=3, unique=True))
        kw["logit_bias"] = {i: draw(st.sampled_from([-math.inf, -100.0, 100.0, 1.5e-45, -3.0])) for i in ids}
    if draw(st.integers(0, 5)) == 0:
        kw["allowed_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4))
    if draw(st.integers(0, 5)) == 0:
        kw["banned_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), max_size=4))
    kw["min_tokens"] = draw(st.sampled_from([0, 0, 5]))
    kw["ignore_eos"] = draw(st.booleans())
    if draw(st.booleans()):
        kw["logprobs"] = True
        kw["top_logprobs"] = draw(st.sampled_from([0, 1, 3, 20]))
        kw["logprobs_mode"] = draw(st.sampled_from(["raw", "processed", "final"]))
    return SamplingParams(**kw)


@st.composite
def hostile_batches(draw: Any) -> dict[str, Any]:
    b = draw(st.integers(1, 4))
    width = draw(st.sampled_from([1, 2, 7, 33, 130, 4097]))  # 4097: a second draw tile (ids >= 4096)
    vocab = draw(st.sampled_from([width, max(1, width - 3)]))  # padded columns beyond vocab_size
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = [draw(st.sampled_from(ROW_KINDS)) for _ in range(b)]
    x = np.stack([_row(rng, k, width) for k in kinds])
    dtype = draw(st.sampled_from(list(DTYPES)))
    params = [draw(hostile_params(vocab)) for _ in range(b)]
    state: dict[str, Any] = {"vocab_size": vocab,
                             "steps": [draw(st.integers(0, 2**63 - 1)) for _ in range(b)],
                             "seqs": [draw(st.integers(0, 3)) for _ in range(b)]}
    # negative counts included (a wrapped counter counts as 0); DRY reads sequences, never a count tensor
    if draw(st.booleans()) and not any(p.dry_active for p in params):
        cdt = draw(st.sampled_from([np.int16, np.int32]))
        info = np.iinfo(cdt)
        counts = np.zeros((b, width), dtype=cdt)
        hits = rng.integers(0, width, (b, 3))
        for r in range(b):
            counts[r, hits[r]] = rng.choice([info.min, -1, 1, 3, info.max], 3)
        state["output_counts"] = torch.from_numpy(counts)
    if draw(st.booleans()):
        state["prompt_token_ids"] = [rng.integers(0, vocab, int(rng.integers(0, 5))).tolist() for _ in range(b)]
    if draw(st.booleans()):
        state["eos_token_ids"] = sorted({int(t) for t in rng.integers(0, vocab, 2)})
    if draw(st.integers(0, 4)) == 0:
        w = (width + 31) // 32
        state["token_bitmask"] = torch.from_numpy(rng.integers(-2**31, 2**31, (b, w), dtype=np.int64)
                                                  .astype(np.int32))
    if any(p.mirostat_mode for p in params) and draw(st.booleans()):
        state["mirostat_mu"] = [draw(st.sampled_from([0.0, 10.0, -5.0, 3e38])) for _ in range(b)]
    return {"logits": torch.from_numpy(x).to(DTYPES[dtype]), "params": params, "state": state}


# ----------------------------------------------------------------------------------------------------- checks
def _lp_close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Logprob-like values agree: NaN with NaN, equal infinities, else within 1e-4 relative to max(1, |value|)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        same = (np.isnan(a) & np.isnan(b)) | (a == b)
        tol = 1e-4 * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
        return same | (np.abs(a - b) <= tol)


def _row_state(state: dict[str, Any], r: int) -> dict[str, Any]:
    """The state of row ``r`` alone, as a batch of one."""
    out: dict[str, Any] = {}
    for k, val in state.items():
        if k in ("vocab_size", "eos_token_ids"):
            out[k] = val
        elif isinstance(val, torch.Tensor):
            out[k] = val[r : r + 1]
        else:
            out[k] = val[r : r + 1]
    return out


def _check(backend: str, batch: dict[str, Any]) -> None:
    logits, params, state = batch["logits"], batch["params"], batch["state"]
    vocab = state["vocab_size"]
    out = fastsampler.sample(logits, params, backend=backend, **state).numpy()
    tokens = out.tokens
    assert np.all((tokens == -1) | ((tokens >= 0) & (tokens < vocab))), f"token out of range: {tokens}"
    assert np.array_equal(out.valid, tokens >= 0), f"valid {out.valid} does not match tokens {tokens}"

    ref_x = logits.float().numpy() if logits.dtype == torch.bfloat16 else logits.numpy()
    rows = pipeline._rows_from_args(ref_x, params, **state)
    results = [pipeline._run_row(row) for row in rows]
    ref, _ = pipeline.sample_rows(rows, ref_x.shape[1])
    near = np.array([bool(res.reasons) for res in results])
    ctx = f"\nlogits {logits.tolist()}\nparams {params}\nstate {state}\nnear-ties {[r.reasons for r in results]}"
    assert np.array_equal(out.valid, ref.valid), f"valid {out.valid} != reference {ref.valid}{ctx}"
    bad = (tokens != ref.tokens) & ~near
    assert not bad.any(), f"tokens {tokens} != reference {ref.tokens} at rows {np.nonzero(bad)[0]}{ctx}"
    same = (tokens == ref.tokens) & ~near
    for name in ("logprobs", "mirostat_mu"):
        got, want = getattr(out, name), getattr(ref, name)
        off = ~_lp_close(got, want) & same
        assert not off.any(), f"{name} {got} != reference {want} at rows {np.nonzero(off)[0]}{ctx}"

    for r in range(len(params)):  # other rows never affect a row
        alone = fastsampler.sample(logits[r : r + 1], params[r], backend=backend, **_row_state(state, r))
        assert int(alone.tokens[0]) == int(tokens[r]), f"row {r}: {int(alone.tokens[0])} alone, {tokens[r]} in batch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_hostile_batches(backend: str) -> None:
    n = EXAMPLES if backend != "triton" else max(4, EXAMPLES // 10)

    @settings(max_examples=n, deadline=None, derandomize=bool(os.environ.get("CI")),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_batches())
    def run(batch: dict[str, Any]) -> None:
        _check(backend, batch)

    run()


def test_fuzz_strategy_covers_the_hostile_cases() -> None:
    """The strategy reaches what it is for: invalid rows, spans beyond FLT_MAX, overflow, every dtype."""
    seen: dict[str, bool] = {"invalid": False, "valid": False, "bf16": False, "fp16": False, "span": False}

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hostile_batches())
    def run(batch: dict[str, Any]) -> None:
        x = batch["logits"].float()
        seen["bf16"] |= batch["logits"].dtype == torch.bfloat16
        seen["fp16"] |= batch["logits"].dtype == torch.float16
        fin = torch.where(torch.isfinite(x), x, torch.nan)
        span = torch.nan_to_num(fin, nan=-math.inf).amax(1) - torch.nan_to_num(fin, nan=math.inf).amin(1)
        seen["span"] |= bool((span > F32_MAX).any())
        ref = pipeline._rows_from_args(x.numpy(), batch["params"], **batch["state"])
        v = [pipeline._run_row(row).valid for row in ref]
        seen["invalid"] |= not all(v)
        seen["valid"] |= any(v)

    run()
    assert all(seen.values()), seen
