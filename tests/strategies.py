"""Hypothesis strategies: per-row sampling parameters mixing every feature, and whole batches with state."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fastsampler import SamplingParams

U64 = (1 << 64) - 1


def as_f32(v: float) -> float:
    """A drawn parameter rounded to float32, as every backend reads it (values that round to 0 are refused)."""
    return float(np.float32(v))


@st.composite
def sampling_params(draw: Any, vocab: int, *, allow_mirostat: bool = True, allow_masks: bool = True,
                    logprobs: bool | None = None, history_rules: bool = False) -> SamplingParams:
    """A valid SamplingParams for a vocabulary of ``vocab`` ids, with a seed, mixing features at random;
    ``history_rules``: also stop ids, no-repeat n-grams (up to 3), bad words (up to 3 tokens), a penalty window (up to
    5 tokens) and DRY (a window of up to 16 tokens), for callers that pass the history as token sequences (a
    `Sampler`: ``history_len >= 16``)."""
    kw: dict[str, Any] = {"seed": draw(st.integers(0, U64))}
    kw["temperature"] = draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.25, 2.0).map(as_f32)))
    mirostat = allow_mirostat and draw(st.integers(0, 5)) == 0
    if mirostat:
        kw["mirostat_mode"] = draw(st.sampled_from([1, 2]))
        kw["mirostat_target"] = draw(st.floats(0.5, 8.0).map(as_f32))
        kw["mirostat_lr"] = draw(st.floats(0.05, 1.0).map(as_f32))
    else:
        if draw(st.booleans()):
            kw["top_k"] = draw(st.one_of(st.sampled_from([-1, 0, 1, vocab, vocab + 3]), st.integers(1, 60)))
        if draw(st.booleans()):
            kw["top_p"] = draw(st.one_of(st.just(1.0), st.floats(0.05, 0.99).map(as_f32)))
        if draw(st.booleans()):
            kw["min_p"] = draw(st.one_of(st.just(0.0), st.floats(0.001, 0.5).map(as_f32)))
        if draw(st.integers(0, 3)) == 0:
            kw["epsilon_cutoff"] = draw(st.one_of(st.floats(1e-4, 0.5).map(as_f32), st.just(0.99)))
        if draw(st.integers(0, 3)) == 0:
            kw["typical_p"] = draw(st.floats(0.2, 0.99).map(as_f32))
        if draw(st.integers(0, 3)) == 0:
            kw["min_keep"] = draw(st.integers(1, 5))
        if draw(st.integers(0, 4)) == 0:
            kw["top_n_sigma"] = draw(st.floats(0.1, 4.0).map(as_f32))
        if draw(st.integers(0, 4)) == 0:
            kw["eta_cutoff"] = draw(st.one_of(st.floats(1e-4, 0.2).map(as_f32), st.just(0.9)))
        if draw(st.integers(0, 4)) == 0:
            kw["xtc_probability"] = draw(st.one_of(st.just(1.0), st.floats(0.01, 1.0).map(as_f32)))
            kw["xtc_threshold"] = draw(st.one_of(st.floats(0.0, 0.5).map(as_f32), st.just(0.6)))
    if kw["temperature"] > 0.0 and draw(st.integers(0, 4)) == 0:
        kw["dynatemp_range"] = draw(st.floats(0.05, 2.0).map(as_f32))
        kw["dynatemp_exponent"] = draw(st.floats(0.0, 3.0).map(as_f32))
    if draw(st.integers(0, 2)) == 0:
        kw["repetition_penalty"] = draw(st.floats(0.5, 2.0).map(as_f32))
        kw["frequency_penalty"] = draw(st.floats(-1.0, 1.0).map(as_f32))
        kw["presence_penalty"] = draw(st.floats(-1.0, 1.0).map(as_f32))
    if draw(st.integers(0, 3)) == 0:
        ids = draw(st.lists(st.integers(0, vocab - 1), max_size=4, unique=True))
        kw["logit_bias"] = {i: draw(st.one_of(st.floats(-5.0, 5.0).map(as_f32), st.just(-math.inf))) for i in ids}
    if allow_masks and draw(st.integers(0, 4)) == 0:
        kw["allowed_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=max(1, vocab // 2)))
    if allow_masks and draw(st.integers(0, 4)) == 0:
        kw["banned_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), max_size=max(1, vocab // 4)))
    if draw(st.integers(0, 4)) == 0:
        kw["min_tokens"] = draw(st.integers(0, 3))
        kw["ignore_eos"] = draw(st.booleans())
    if history_rules and draw(st.integers(0, 3)) == 0:
        small = st.integers(0, min(vocab - 1, 7))  # a few ids: histories repeat them
        kw["stop_token_ids"] = draw(st.lists(small, min_size=1, max_size=2))
        kw["no_repeat_ngram_size"] = draw(st.integers(0, 3))
        kw["bad_words_ids"] = draw(st.one_of(st.none(), st.lists(st.lists(small, min_size=1, max_size=3),
                                                                  max_size=3)))
        kw["penalty_last_n"] = draw(st.integers(-1, 5))
    if history_rules and draw(st.integers(0, 3)) == 0:
        small = st.integers(0, min(vocab - 1, 7))
        kw["dry_multiplier"] = draw(st.floats(0.1, 3.0).map(as_f32))
        kw["dry_base"] = draw(st.sampled_from([1.0, 1.5, 1.75, 4.0]))
        kw["dry_allowed_length"] = draw(st.integers(0, 3))
        kw["dry_penalty_last_n"] = draw(st.integers(-1, 16))
        kw["dry_sequence_breakers"] = draw(st.one_of(st.none(), st.lists(st.lists(small, min_size=1, max_size=3),
                                                                          max_size=2)))
    want_lp = draw(st.booleans()) if logprobs is None else logprobs
    if want_lp:
        kw["logprobs"] = True
        kw["top_logprobs"] = draw(st.integers(0, 5))
        kw["logprobs_mode"] = draw(st.sampled_from(["raw", "processed", "final"]))
    return SamplingParams(**kw)


@st.composite
def logits_rows(draw: Any, batch: int, width: int, *, specials: bool = True) -> np.ndarray:
    """float32 logits with random scale; some rows tied (coarse grid), with -inf entries, or invalid (NaN / +inf)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((batch, width)) * draw(st.sampled_from([0.5, 2.0, 5.0]))).astype(np.float32)
    if specials:
        for r in range(batch):
            kind = draw(st.integers(0, 9))
            if kind == 0:
                x[r] = np.round(x[r] * 2) / 2  # many exact ties
            elif kind == 1:
                x[r, rng.random(width) < 0.3] = -np.inf
            elif kind == 2 and width > 1:
                x[r, rng.integers(width)] = draw(st.sampled_from([np.nan, np.inf]))
            elif kind == 3:
                x[r] = -np.inf  # nothing finite: invalid
    return x


@st.composite
def batches(draw: Any, max_b: int, vocab_sizes: list[int], *, allow_mirostat: bool = True,
            specials: bool = True, padded: bool = True) -> dict[str, Any]:
    """A whole batch: logits, per-row params and state, as keyword arguments of `fastsampler.sample`."""
    width = draw(st.sampled_from(vocab_sizes))
    vocab = width
    if padded and width > 2 and draw(st.integers(0, 3)) == 0:
        vocab = draw(st.integers(1, width))
    b = draw(st.integers(1, max_b))
    params = [draw(sampling_params(vocab, allow_mirostat=allow_mirostat, history_rules=True)) for _ in range(b)]
    out: dict[str, Any] = {"logits": draw(logits_rows(b, width, specials=specials)), "params": params}
    if vocab != width:
        out["vocab_size"] = vocab
    ids = st.lists(st.integers(0, min(vocab - 1, 9)) | st.integers(0, vocab - 1), max_size=12)  # repeats likely
    if draw(st.booleans()):
        out["prompt_token_ids"] = [draw(ids) for _ in range(b)]
        out["output_token_ids"] = [draw(ids) for _ in range(b)]
    out["steps"] = np.array([draw(st.integers(0, 2**32 - 1)) for _ in range(b)], dtype=np.int64)
    out["seqs"] = np.array([draw(st.integers(0, 3)) for _ in range(b)], dtype=np.int64)
    if draw(st.booleans()):
        out["eos_token_ids"] = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2, unique=True))
    return out
