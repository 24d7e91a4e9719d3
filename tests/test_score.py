"""`fastsampler.score` (and `Sampler.score`): the logprobs of given tokens, on every backend, against logprobs computed
from the reference's processed logits (docs/semantics.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams, reference
from tests.backend_checks import ATOL, backend_device, backend_params, random_logits

V = 300


def _log_softmax(v: np.ndarray) -> np.ndarray:
    fin = np.isfinite(v)
    if not fin.any():
        return np.full_like(v, np.nan)
    m = v[fin].max()
    return (v - m) - math.log(np.exp(v[fin] - m).sum())


def _expected(lp_rows: np.ndarray, tokens: list[int], top_n: int, extra: list[list[int]]) -> dict[str, np.ndarray]:
    """What a score must return, from full float64 logprob rows."""
    t = len(tokens)
    k = max((len(e) for e in extra), default=0)
    out = {"logprobs": np.zeros(t), "ranks": np.zeros(t, dtype=np.int64), "top_ids": np.full((t, top_n), -1),
           "top_lps": np.full((t, top_n), np.nan), "extra": np.full((t, k), np.nan)}
    for r, (lp, tok) in enumerate(zip(lp_rows, tokens, strict=True)):
        out["logprobs"][r] = lp[tok]
        out["ranks"][r] = 1 + int((lp > lp[tok]).sum())
        order = np.lexsort((np.arange(lp.size), -lp))[:top_n]
        out["top_ids"][r, : order.size] = order
        out["top_lps"][r, : order.size] = lp[order]
        out["extra"][r, : len(extra[r])] = lp[extra[r]]
    return out


def _check(got: fastsampler.ScoreOutput, want: dict[str, np.ndarray]) -> None:
    g = got.numpy()
    assert g.valid.all()
    np.testing.assert_allclose(g.logprobs, want["logprobs"], atol=ATOL, rtol=1e-6)
    np.testing.assert_array_equal(g.ranks, want["ranks"])
    np.testing.assert_array_equal(g.top_logprob_ids, want["top_ids"])
    np.testing.assert_allclose(g.top_logprobs, want["top_lps"], atol=ATOL, rtol=1e-6)
    np.testing.assert_allclose(g.extra_logprobs, want["extra"], atol=ATOL, rtol=1e-6)


def _case(t: int, seed: int) -> tuple[torch.Tensor, list[int], list[list[int]]]:
    x = random_logits(t, V, seed)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, t).tolist()
    extra = [rng.choice(V, size=int(rng.integers(0, 6)), replace=False).tolist() for _ in range(t)]
    return x, tokens, extra


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raw_scores_match_the_reference(backend: str, dtype: torch.dtype) -> None:
    x, tokens, extra = _case(12, 1)
    x = x.to(dtype)
    dev = backend_device(backend)
    got = fastsampler.score(x.to(dev), tokens, top_n=4, extra_token_ids=extra, backend=backend)
    assert got.logprobs.device.type == dev.type
    lp = np.stack([_log_softmax(r) for r in x.double().numpy()])
    _check(got, _expected(lp, tokens, 4, extra))


PROCESSED = [
    SamplingParams(temperature=0.7, repetition_penalty=1.4, frequency_penalty=0.5, presence_penalty=0.3,
                   logit_bias={3: 2.0, 250: -1.5}, top_k=5, top_p=0.5),
    SamplingParams(temperature=0.0, banned_token_ids=[0, 1, 2], presence_penalty=-0.5),
    SamplingParams(temperature=1.3, allowed_token_ids=list(range(0, 300, 2)) + [7], min_tokens=3,
                   mirostat_mode=2),
]


@pytest.mark.parametrize("backend", backend_params())
def test_processed_scores_match_the_reference(backend: str) -> None:
    t = 9
    x, tokens, extra = _case(t, 2)
    params = [PROCESSED[i % len(PROCESSED)] for i in range(t)]
    tokens = [tok if not params[i].allowed_token_ids else 7 for i, tok in enumerate(tokens)]
    extra = [[e for e in row if e not in (0, 1, 2)] + ([5] if i % 3 == 2 else []) for i, row in enumerate(extra)]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, V, 20).tolist() for _ in range(t)]
    outputs = [rng.integers(0, V, 8).tolist() for _ in range(t)]
    state = dict(prompt_token_ids=prompts, output_token_ids=outputs, steps=list(range(t)), eos_token_ids=[4, 9])
    dev = backend_device(backend)
    got = fastsampler.score(x.to(dev), tokens, top_n=3, extra_token_ids=extra, logprobs_mode="processed",
                            params=params, backend=backend, **state)
    z = reference.process_logits(x.numpy(), params, **state)
    lp = np.stack([_log_softmax(r) for r in z])
    _check(got, _expected(lp, tokens, 3, extra))


@pytest.mark.parametrize("backend", backend_params())
def test_invalid_rows_and_masked_tokens(backend: str) -> None:
    x = random_logits(3, V, 4)
    x[1, 10] = float("nan")
    dev = backend_device(backend)
    p = SamplingParams(banned_token_ids=[8])
    got = fastsampler.score(x.to(dev), [8, 8, 8], top_n=2, extra_token_ids=[[8, 9], [8], []],
                            logprobs_mode="processed", params=p, backend=backend).numpy()
    assert got.valid.tolist() == [True, False, True]
    assert got.logprobs[0] == -np.inf and math.isnan(got.logprobs[1])
    assert got.ranks[1] == -1 and got.ranks[0] == V  # every other id is finite: rank = 1 + (V - 1)
    assert (got.top_logprob_ids[1] == -1).all() and np.isnan(got.top_logprobs[1]).all()
    assert got.extra_logprobs[0, 0] == -np.inf and np.isfinite(got.extra_logprobs[0, 1])
    assert np.isnan(got.extra_logprobs[1]).all() and np.isnan(got.extra_logprobs[2]).all()


@pytest.mark.parametrize("backend", backend_params(slow_interpreted=True))
def test_a_long_prompt_with_a_padded_vocabulary(backend: str) -> None:
    """A whole prompt of positions at once, logits wider than the vocabulary (padding never scored)."""
    t, v, vp = 256, 1000, 1024
    x = random_logits(t, vp, 5)
    tokens = np.random.default_rng(5).integers(0, v, t).tolist()
    got = fastsampler.score(x.to(backend_device(backend)), tokens, top_n=2, vocab_size=v, backend=backend)
    lp = np.stack([_log_softmax(r[:v]) for r in x.double().numpy()])
    _check(got, _expected(lp, tokens, 2, [[] for _ in range(t)]))


def test_numpy_logits_give_numpy_outputs_and_tensors_of_extra_ids() -> None:
    x, tokens, _ = _case(4, 6)
    extra = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]])
    got = fastsampler.score(x.numpy(), np.array(tokens), extra_token_ids=extra)
    assert isinstance(got.logprobs, np.ndarray) and got.extra_logprobs.shape == (4, 2)
    assert got.top_logprob_ids.shape == (4, 0)
    lp = np.stack([_log_softmax(r) for r in x.double().numpy()])
    np.testing.assert_allclose(got.extra_logprobs, np.take_along_axis(lp, extra.numpy(), 1), atol=ATOL)


def test_empty_input() -> None:
    got = fastsampler.score(torch.zeros(0, 5), [], top_n=2, extra_token_ids=[])
    assert got.logprobs.shape == (0,) and got.top_logprob_ids.shape == (0, 2) and got.extra_logprobs.shape == (0, 0)


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    (dict(token_ids=[0, 5]), ValueError, "outside the vocabulary"),
    (dict(token_ids=[0]), ValueError, "one id per row"),
    (dict(token_ids=[0.5, 1.0]), TypeError, "integer token ids"),
    (dict(top_n=21), ValueError, "top_n"),
    (dict(logprobs_mode="final"), ValueError, "raw' or 'processed"),
    (dict(logprobs_mode="processed"), ValueError, "needs params"),
    (dict(params=SamplingParams()), ValueError, "raw logprobs depend on the logits alone"),
    (dict(extra_token_ids=[[1], [9]]), ValueError, "extra_token_ids of row 1"),
    (dict(extra_token_ids=[[1]]), ValueError, "one sequence per row"),
    (dict(seeds=[1, 2]), TypeError, "unexpected keyword argument 'seeds'"),
    (dict(vocab_size=9), ValueError, "vocab_size"),
])
def test_bad_input_is_refused(kwargs: dict, err: type, match: str) -> None:
    args = dict(token_ids=[0, 1])
    args.update(kwargs)
    with pytest.raises(err, match=match):
        fastsampler.score(torch.zeros(2, 5), args.pop("token_ids"), **args)


@pytest.mark.parametrize("backend", backend_params())
def test_sampler_scores_a_prompt(backend: str) -> None:
    """Echo: the prefill logits of a prompt score its tokens after the first, in raw mode, on the Sampler's backend
    and device; nothing of the Sampler's state changes."""
    dev = backend_device(backend)
    s = fastsampler.Sampler(V, 2, device=dev, backend=backend)
    prompt = [5, 17, 33, 2, 250, 9]
    slot = s.add(SamplingParams(seed=1, presence_penalty=1.0), prompt_token_ids=prompt)[0]
    prefill = random_logits(len(prompt), V, 7)
    got = s.score(prefill[:-1].to(dev), prompt[1:], top_n=2)
    want = fastsampler.score(prefill[:-1], prompt[1:], top_n=2, backend="reference")
    np.testing.assert_allclose(got.numpy().logprobs, want.logprobs.numpy(), atol=ATOL)
    np.testing.assert_array_equal(got.numpy().ranks, want.ranks.numpy())
    assert s.step_of(slot) == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        s.score(prefill[:2].to(dev), [1, V])
