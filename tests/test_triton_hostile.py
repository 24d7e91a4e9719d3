"""The Triton backend on hostile inputs, against the numpy reference: float32 overflow inside the typical-p entropy
(docs/semantics.md §3 E item 4, ``0 · ln 0 = 0``) and in ``z = l / T`` (§5), negative output counts (§3 B / C), the
kept-set mask (`kept_mask_packed`, §3 E) and the precision of logprobs and the Mirostat surprise at large ``|x|``
(``(x - m) - ln s``, §6).

Runs under ``TRITON_INTERPRET=1`` on the CPU (small shapes) and natively on CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import reference
from tests.backend_checks import triton_available

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    # the interpreter evaluates masked-off lanes too (log(0), inf - inf): numpy warns, results are unaffected
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                               "ignore:overflow:RuntimeWarning"),
]


def _np(t: torch.Tensor) -> np.ndarray:
    """numpy copy for the reference: floats upcast to float32 (bfloat16 has no numpy dtype), integers as they are."""
    t = t.detach().cpu()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def _tokens_match(logits: torch.Tensor, params, **kw) -> tuple[list[int], list[int]]:
    """Triton and reference tokens of the same batch (the reference sees the same values upcast)."""
    got = fastsampler.sample(logits, params, backend="triton", **kw)
    want = reference.sample(_np(logits), params, **{k: _np(v) if isinstance(v, torch.Tensor) else v
                                                    for k, v in kw.items()})
    assert got.tokens.cpu().tolist() == want.tokens.tolist()
    assert got.valid.cpu().tolist() == want.valid.tolist()
    return got.tokens.cpu().tolist(), want.tokens.tolist()


def _pack(logits, params, **kw):
    from fastsampler._batch import pack_batch

    return pack_batch(logits, params, **kw)


# ------------------------------------------------------------------------------------- float32 overflow (§3 E, §5)
OVERFLOW_PARAMS = [
    SP(typical_p=0.5, top_k=2, seed=1),
    SP(typical_p=0.5, seed=2),
    SP(typical_p=0.5, min_keep=2, seed=3),
    SP(top_p=0.5, min_keep=2, seed=4),
    SP(min_p=0.1, min_keep=2, seed=5),
    SP(top_p=0.5, min_keep=2, typical_p=0.5, seed=6),
    SP(min_p=0.1, min_keep=2, typical_p=0.5, seed=7),
    SP(top_p=0.5, min_p=0.1, min_keep=2, typical_p=0.9, seed=8),
]


def test_typical_entropy_overflow_example(device):
    """The reported case: ``z - lse`` of the second token is -inf in float32, q = 0 must add 0 to H, not NaN."""
    x = torch.tensor([[3e38, -3e38]], device=device)
    p = SP(typical_p=0.5, top_k=2, seed=1)
    got = fastsampler.sample(x, p, backend="triton")
    assert got.tokens.cpu().tolist() == [0] == reference.sample(_np(x), p).tokens.tolist()
    assert got.valid.cpu().tolist() == [True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflowing_log_probabilities(device, dtype):
    """top-p / min-p with min_keep=2, with and without typical-p, on ``[3e38, -3e38]``: same tokens and
    distribution as the reference (min_keep keeps the token of probability 0)."""
    from fastsampler.backends.triton.backend import kept_mask_packed

    n = len(OVERFLOW_PARAMS)
    x = torch.tensor([[3e38, -3e38]] * n, dtype=dtype, device=device)
    tokens, _ = _tokens_match(x, OVERFLOW_PARAMS)
    assert tokens == [0] * n
    got = _np(fastsampler.sampling_probs(x, OVERFLOW_PARAMS, backend="triton"))
    want = reference.sampling_probs(_np(x), OVERFLOW_PARAMS)
    np.testing.assert_allclose(got, want, atol=1e-6)
    mask = kept_mask_packed(_pack(x, OVERFLOW_PARAMS)).cpu()
    # rows 2..7 keep both tokens (min_keep = 2 in every rule they use); typical_p alone keeps the sure token
    assert mask[:, 0].all()
    assert mask[:, 1].tolist() == [False, False, True, True, True, True, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overflow_across_chunks(device, monkeypatch, dtype):
    """Chunks whose maxima are more than FLT_MAX apart: the per-chunk entropy terms combine without 0 * -inf."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "16")
    v = 48
    params = [SP(typical_p=0.5, seed=11), SP(typical_p=0.3, min_keep=3, seed=12),
              SP(typical_p=0.9, top_p=0.95, min_keep=2, seed=13), SP(typical_p=0.7, min_p=0.5, min_keep=4, seed=14)]
    g = np.random.default_rng(3)
    x = g.standard_normal((len(params), v)).astype(np.float32)
    x[:, :16] -= 3e38  # first chunk far below
    x[:, 20:23] += 3e38  # a few near the top of the float32 range in the second chunk
    x[:, 40] = 3e38
    x = torch.from_numpy(x).to(dtype=dtype, device=device)
    for step in range(3):
        _tokens_match(x, params, steps=[step] * len(params))
    got = _np(fastsampler.sampling_probs(x, params, backend="triton"))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference.sampling_probs(_np(x), params), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature_overflow(device, dtype):
    """``l / T`` below -FLT_MAX is -inf (§5, §8): every token -> invalid row; only some -> sample among the rest."""
    params = [SP(temperature=1e-3, seed=1), SP(temperature=1e-3, seed=2, typical_p=0.5),
              SP(temperature=1e-3, seed=3, top_p=0.5, min_keep=2)]
    x = torch.tensor([[-3e38, -2e38]] * 3, dtype=dtype, device=device)
    out = fastsampler.sample(x, params, backend="triton")
    assert out.tokens.cpu().tolist() == [-1, -1, -1]
    assert not out.valid.any()
    assert (fastsampler.sampling_probs(x, params, backend="triton") == 0).all()
    _tokens_match(x, params)
    # some tokens overflow: z = (-inf, 1, 2, 1.5), sampled among the finite ones
    x = torch.tensor([[-3e38, 1e-3, 2e-3, 1.5e-3]] * 3, dtype=dtype, device=device)
    for step in range(4):
        tokens, _ = _tokens_match(x, params, steps=[step] * 3)
        assert all(t in (1, 2, 3) for t in tokens)


# ----------------------------------------------------------------------------------- negative counts (§3 B and C)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_negative_output_counts_are_zero(device, dtype):
    """A negative count is 0: no repetition / presence penalty, no frequency term; same as the zeroed counts."""
    b, v = 4, 64
    g = np.random.default_rng(7)
    x = torch.from_numpy((g.standard_normal((b, v)) * 2).astype(np.float32)).to(device)
    counts = torch.from_numpy(g.integers(-4, 4, (b, v))).to(dtype=dtype, device=device)
    counts[:, 5] = torch.iinfo(dtype).min
    counts[:, 6] = -100  # with frequency_penalty 2 a count of -100 would add 200 to this logit
    counts[0, :] = -1
    params = [SP(seed=1, frequency_penalty=2.0, logprobs=True, logprobs_mode="processed", top_logprobs=3),
              SP(seed=2, repetition_penalty=1.8, presence_penalty=1.5, frequency_penalty=0.5),
              SP(seed=3, frequency_penalty=-2.0, presence_penalty=-2.0, top_k=5, logprobs=True,
                 logprobs_mode="final"),
              SP(seed=4, temperature=0.0, repetition_penalty=0.5, frequency_penalty=1.0, presence_penalty=2.0)]
    zeroed = counts.clamp(min=0)
    got = fastsampler.sample(x, params, backend="triton", output_counts=counts)
    want = fastsampler.sample(x, params, backend="triton", output_counts=zeroed)
    for name in ("tokens", "valid", "logprobs", "top_logprob_ids", "top_logprobs", "ranks"):
        a, w = getattr(got, name), getattr(want, name)
        assert torch.equal(a, w) or torch.allclose(a, w, equal_nan=True, atol=0), name
    assert torch.equal(fastsampler.sampling_probs(x, params, backend="triton", output_counts=counts),
                       fastsampler.sampling_probs(x, params, backend="triton", output_counts=zeroed))
    _tokens_match(x, params, output_counts=counts)
    assert 6 not in got.tokens.cpu().tolist()


# -------------------------------------------------------------------------------------------- kept mask (§3 E)
def test_kept_mask_examples(device):
    """Kept tokens with float32 probability 0 are in the mask; greedy, invalid and padding as documented."""
    from fastsampler.backends.triton.backend import kept_mask_packed

    cases = [([0.0, -200.0, -300.0], SP(top_k=2, seed=1), [True, True, False]),
             ([0.0, -120.0, -120.0], SP(typical_p=0.5, min_keep=3, seed=2), [True, True, True]),
             ([0.0, -120.0, -120.0], SP(typical_p=0.5, seed=3), [True, False, False]),
             ([1.0, 3.0, 3.0], SP(temperature=0.0, top_k=1, seed=4), [False, True, False]),
             ([1.0, float("nan"), 3.0], SP(seed=5), [False, False, False]),
             ([0.0, -200.0, float("-inf")], SP(seed=6), [True, True, False])]
    x = torch.tensor([c[0] for c in cases], device=device)
    params = [c[1] for c in cases]
    mask = kept_mask_packed(_pack(x, params))
    assert mask.dtype == torch.bool and mask.shape == x.shape and mask.device == x.device
    assert mask.cpu().tolist() == [c[2] for c in cases]
    _tokens_match(x, params)
    np.testing.assert_allclose(_np(fastsampler.sampling_probs(x, params, backend="triton")),
                               reference.sampling_probs(_np(x), params), atol=1e-6)
    # padding columns (>= vocab_size) are never kept
    xp = torch.cat([x[:2], torch.full((2, 3), 50.0, device=device)], 1)
    mp = kept_mask_packed(_pack(xp, params[:2], vocab_size=3)).cpu()
    assert mp.tolist() == [[True, True, False, False, False, False], [True, True, True, False, False, False]]


MASK_PARAMS = [SP(seed=1), SP(seed=2, top_k=7), SP(seed=3, top_p=0.6), SP(seed=4, min_p=0.1),
               SP(seed=5, typical_p=0.4), SP(seed=6, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.8, min_keep=3),
               SP(seed=7, top_p=0.2, min_keep=9, temperature=0.7), SP(seed=8, mirostat_mode=2, mirostat_target=3.0),
               SP(seed=9, mirostat_mode=1, mirostat_target=4.0), SP(seed=10, temperature=0.0),
               SP(seed=11, typical_p=0.95, temperature=1.7, repetition_penalty=1.3)]


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_mask_random(device, seed):
    """On ordinary logits the mask is ``sampling_probs > 0`` (Triton) and the reference's kept set."""
    from fastsampler.backends.triton.backend import kept_mask_packed, sampling_probs_packed

    v = 300
    g = np.random.default_rng(100 + seed)
    x = torch.from_numpy((g.standard_normal((len(MASK_PARAMS), v)) * 3).astype(np.float32)).to(device)
    mu = [0.0] * 7 + [5.0, 9.0] + [0.0] * 2
    kw = dict(mirostat_mu=mu, output_token_ids=[[0, 1, 2]] * len(MASK_PARAMS), steps=[seed] * len(MASK_PARAMS))
    batch = _pack(x, MASK_PARAMS, **kw)
    mask = kept_mask_packed(batch).cpu()
    probs = sampling_probs_packed(batch).cpu()
    assert torch.equal(mask, probs > 0)
    diag = reference.diagnose(_np(x), MASK_PARAMS, **kw)
    want = reference.sampling_probs(_np(x), MASK_PARAMS, **kw) > 0
    for r in range(len(MASK_PARAMS)):
        if not diag["near_tie"][r]:
            assert mask[r].tolist() == want[r].tolist(), f"row {r}: {MASK_PARAMS[r]}"
    n_kept = mask.sum(1)
    assert int(n_kept[0]) == v and (n_kept[1:] < v).all() and (n_kept >= 1).all()  # the rules do truncate


# ------------------------------------------------------------------------------------ logprob precision (§6, §3 E)
@pytest.mark.parametrize("big", [1e30, -1e30, 3e9])
def test_logprobs_at_large_magnitude(device, big):
    """All-equal logits of magnitude ``big`` over 4 tokens: every logprob is -ln 4 in every mode (and at T = 0.5),
    the distribution uniform, and Mirostat's surprise log2(4) = 2 bits."""
    x = torch.full((1, 4), big, device=device)
    want = -math.log(4.0)
    for mode in ("raw", "processed", "final"):
        for t in (1.0, 0.5):
            p = SP(seed=1, temperature=t, logprobs=True, top_logprobs=4, logprobs_mode=mode)
            out = fastsampler.sample(x, p, backend="triton")
            assert abs(float(out.logprobs[0]) - want) < 1e-6, (mode, t, out.logprobs)
            assert torch.allclose(out.top_logprobs.cpu(), torch.full((1, 4), want), atol=1e-6, rtol=0)
            assert int(out.ranks[0]) == 1
            ref = reference.sample(_np(x), p)
            assert abs(float(out.logprobs[0]) - float(ref.logprobs[0])) < 1e-5
    probs = fastsampler.sampling_probs(x.expand(2, 4).contiguous(), [SP(seed=1), SP(seed=2, top_k=3)],
                                       backend="triton").cpu()
    assert torch.allclose(probs, torch.full((2, 4), 0.25), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", [2, 1])
def test_mirostat_surprise_at_large_magnitude(device, mode):
    """Mirostat (target 5, default mu 10) on four equal logits 1e30: surprise 2 bits, mu = 10 - 0.1 (2 - 5)."""
    x = torch.full((1, 4), 1e30, device=device)
    p = SP(seed=1, mirostat_mode=mode, mirostat_target=5.0)
    out = fastsampler.sample(x, p, backend="triton")
    ref = reference.sample(_np(x), p)
    assert int(out.tokens[0]) == int(ref.tokens[0])
    assert abs(float(out.mirostat_mu[0]) - 10.3) < 1e-5
    assert abs(float(out.mirostat_mu[0]) - float(ref.mirostat_mu[0])) < 1e-5


def test_typical_distance_at_large_magnitude(device):
    """Typical-p's ``s = |-ln q - H|`` at ``|z| = 1e8`` (float32 spacing 8): one token at 1e8 and 2400 at 1e8 - 8 give
    ``q = 0.554`` and ``s = 3.57`` for the first, ``s = 4.43`` for the others, so ``typical_p = 0.5`` keeps only id 0.
    Forming ``m + ln s`` (``ln s = 0.59`` rounds away) would order the scores the other way and keep every token."""
    from fastsampler.backends.triton.backend import kept_mask_packed

    v = 2401
    x = torch.full((2, v), 1e8 - 8.0, device=device)
    x[:, 0] = 1e8
    params = [SP(seed=1, typical_p=0.5), SP(seed=2, typical_p=0.5, logprobs=True, logprobs_mode="final")]
    want = reference.sampling_probs(_np(x), params)
    assert (want[:, 1:] == 0).all()
    mask = kept_mask_packed(_pack(x, params)).cpu()
    assert mask[:, 0].all() and not mask[:, 1:].any()
    for step in range(3):
        tokens, _ = _tokens_match(x, params, steps=[step, step])
        assert tokens == [0, 0]
    out = fastsampler.sample(x, params, backend="triton")
    assert float(out.logprobs[1]) == 0.0
    np.testing.assert_allclose(_np(fastsampler.sampling_probs(x, params, backend="triton")), want, atol=1e-6)
