"""The C++ CPU backend (``backend="cpu"``, `backends.cpu._C`): exact against the reference, statistical, properties,
batch invariance, thread control and error handling.

Shapes, and the code path each exercises:
- V = 1: a single token (every rule degenerates; greedy and sampling must agree).
- V = 7, 111: one partial 16-lane vector / several vectors with a tail (masked tail lanes).
- V = 4097: two race tiles, the second holding one token.
- V = 32001: eight tiles, the last partial; large candidate sets in the mass selection (top-p / typical).
- V = 128256 (a few rows): the benchmark vocabulary; the multi-threshold mass selection over the full row.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsampler
from backend_checks import NearTieWarning, check_against_reference
from fastsampler import SamplingParams
from fastsampler.backends import cpu as fcpu
from fastsampler.backends.reference import token_noise
from fastsampler.backends.reference.philox import exp_noise
from strategies import as_f32, batches

pytestmark = pytest.mark.skipif(not fcpu.is_available()[0], reason=fcpu.is_available()[1])

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _check(b: dict, dtype: torch.dtype = torch.float32):
    b = dict(b)
    logits = torch.from_numpy(b.pop("logits")).to(dtype)
    params = b.pop("params")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearTieWarning)
        return check_against_reference("cpu", logits, params, **b)


# ------------------------------------------------------------------------------------------------ randomness
def test_philox_known_answers():
    from fastsampler.backends.cpu import _C

    assert [f"{w:08x}" for w in _C.philox4x32_10(0, 0, 0, 0, 0, 0)] == ["6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8"]
    got = _C.philox4x32_10(0xA4093822, 0x299F31D0, 0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)
    assert [f"{w:08x}" for w in got] == ["d16cfe09", "94fdcceb", "5001e420", "24126ea1"]


@pytest.mark.parametrize("seed,step,seq,base", [(0, 0, 0, 0), (2**64 - 1, 2**32 - 1, 3, 1000), (123456789, 17, 1, 7)])
def test_vector_noise_matches_reference(seed, step, seq, base):
    """The float32 vector path of -ln E (token race) against the float64 reference noise."""
    from fastsampler.backends.cpu import _C

    got = _C.neg_log_noise(seed, step, seq, 0, base).astype(np.float64)
    ids = np.arange(4 * base, 4 * base + 64)
    want = -np.log(token_noise(seed, step, seq, ids))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def _bound_words() -> np.ndarray:
    """Both branch ends, every power-of-two step of the complement (where the bound's exponent changes) and random
    words."""
    c = np.concatenate([[0], 2 ** np.arange(31, dtype=np.uint64), 2 ** np.arange(1, 32, dtype=np.uint64) - 1])
    c = c[c < 2**31]
    top = (0xFFFFFFFF - c).astype(np.uint32)  # r >= 2^31 with complement c
    low = np.array([0, 1, 2**30, 2**31 - 2, 2**31 - 1], dtype=np.uint32)
    rnd = np.random.default_rng(5).integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([top, low, rnd])


def test_noise_bound_covers_noise():
    """The token race skips a token whose bound on -ln E (from its word, no logarithm) puts it below the best score:
    the bound must hold for the float32 vector noise and the float64 noise of every word, and stay close to it
    above 2^31 (within ln 2 from the exponent, plus ln(2 ln 2) from E >= 1 - u at u = 1/2; below 2^31, where -ln E
    lies in [-3.14, 0.37], it is the constant 0.37), or the pruning would stop paying."""
    from fastsampler.backends.cpu import _C

    words = _bound_words()
    noise32, bound32, bound64 = _C.neg_log_noise_bound(words)
    exact = -np.log(exp_noise(words))
    assert np.all(bound32.astype(np.float64) >= noise32), words[bound32 < noise32][:5]
    assert np.all(bound64 >= exact), words[bound64 < exact][:5]
    hi = words >= 2**31
    assert np.all(bound64[hi] - exact[hi] <= math.log(4 * math.log(2)) + 2e-3)
    assert np.all(bound64[~hi] - exact[~hi] <= 3.6)
    # the vector path takes the exponent of float(~r), which rounds up to the next power of two for a few words
    assert np.all(bound32[hi].astype(np.float64) - noise32[hi] <= math.log(4 * math.log(2)) + 2e-3)



# ------------------------------------------------------------------------------------------------ exact
@settings(max_examples=40)
@given(batches(6, [1, 7, 111, 4097]))
def test_exact_small_vocab(b):
    _check(b)


@settings(max_examples=8)
@given(batches(3, [32001]))
def test_exact_32001(b):
    _check(b)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@settings(max_examples=15)
@given(b=batches(4, [7, 111, 4097]))
def test_exact_half_precision(dtype, b):
    """fp16 / bf16 are read as they are and upcast in registers; the reference sees the same values."""
    _check(b, DTYPES[dtype])


def _mixed_params(vocab: int, seed: int) -> list[SamplingParams]:
    return [
        SamplingParams(seed=seed, logprobs=True, top_logprobs=5),
        SamplingParams(seed=seed + 1, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=3,
                       logprobs_mode="final"),
        SamplingParams(seed=seed + 2, top_p=0.9, logprobs=True, logprobs_mode="processed", top_logprobs=2),
        SamplingParams(seed=seed + 3, typical_p=0.9, min_keep=3, logprobs=True),
        SamplingParams(seed=seed + 4, mirostat_mode=1, mirostat_target=4.0, logprobs=True, logprobs_mode="final"),
        SamplingParams(seed=seed + 5, mirostat_mode=2, mirostat_target=6.0, mirostat_lr=0.3),
        SamplingParams(seed=seed + 6, temperature=0.0, repetition_penalty=1.3, logprobs=True, top_logprobs=4,
                       logprobs_mode="final"),
        SamplingParams(seed=seed + 7, temperature=0.7, top_k=5000, top_p=0.97, repetition_penalty=1.1,
                       frequency_penalty=0.2, presence_penalty=0.3, logit_bias={3: 5.0, vocab - 1: -math.inf},
                       banned_token_ids=[1, 2], min_tokens=4, logprobs=True, top_logprobs=20),
    ]


@pytest.mark.large
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_exact_benchmark_vocab(scale):
    """V = 128256, every feature, history for the penalties: the full-row selection paths."""
    vocab = 128256
    rng = np.random.default_rng(7)
    params = _mixed_params(vocab, 11)
    logits = (rng.standard_normal((len(params), vocab)) * scale).astype(np.float32)
    hist = [rng.integers(0, vocab, size=256).tolist() for _ in params]
    _check({"logits": logits, "params": params, "output_token_ids": hist, "prompt_token_ids": hist,
            "eos_token_ids": [0, 5], "steps": np.arange(len(params)) * 3})


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exact_mass_selection_paths(scale, dtype):
    """Full-row top-p / typical (V = 20000 > 8192 survivors): masked tiles, peaked rows (boundary inside the exact
    set), wide brackets (p near 1), tie-heavy bf16 rows, min_keep, and top-p before typical."""
    vocab = 20000
    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal((8, vocab)) * scale).astype(np.float32)
    x[3, 4096:12288] = -np.inf  # two whole tiles masked
    allowed = list(range(4096, 4096 + 6000))
    params = [
        SamplingParams(seed=1, top_p=0.9, logprobs=True, top_logprobs=3, logprobs_mode="final"),
        SamplingParams(seed=2, top_p=0.999, logprobs=True),
        SamplingParams(seed=3, typical_p=0.9, logprobs=True, logprobs_mode="processed"),
        SamplingParams(seed=4, top_p=0.8, typical_p=0.7, min_keep=50),
        SamplingParams(seed=5, top_p=0.3, allowed_token_ids=allowed),
        SamplingParams(seed=6, typical_p=0.2, temperature=0.5, banned_token_ids=list(range(0, 9000))),
        SamplingParams(seed=7, top_p=0.95, min_p=0.01, min_keep=300),
        SamplingParams(seed=8, typical_p=0.99, logprobs=True, logprobs_mode="final", top_logprobs=5),
    ]
    _check({"logits": x, "params": params}, DTYPES[dtype])


def test_strided_and_padded_logits():
    """Row-strided views (a vocabulary slice of a wider buffer) and padding columns beyond vocab_size."""
    rng = np.random.default_rng(3)
    wide = torch.from_numpy((rng.standard_normal((4, 5000)) * 2).astype(np.float32))
    view = wide[:, :4500]
    assert not view.is_contiguous()
    params = [SamplingParams(seed=i, top_p=0.8, logprobs=True, top_logprobs=2) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearTieWarning)
        check_against_reference("cpu", view, params, vocab_size=4321)
    # transposed (vocabulary axis strided) is copied, not misread
    t = torch.from_numpy(rng.standard_normal((300, 3)).astype(np.float32)).t()
    got = fastsampler.sample(t, SamplingParams(temperature=0.0), backend="cpu").tokens
    assert got.tolist() == t.argmax(dim=1).tolist()


# ------------------------------------------------------------------------------------------------ invariance
def test_batch_invariance_and_threads():
    """A row's result does not depend on its batch position, the batch size or the thread count."""
    vocab = 9000
    rng = np.random.default_rng(5)
    params = _mixed_params(vocab, 100) * 2
    logits = torch.from_numpy((rng.standard_normal((len(params), vocab)) * 2).astype(np.float32))
    steps = torch.arange(len(params), dtype=torch.int64)
    full = fastsampler.sample(logits, params, backend="cpu", steps=steps)
    perm = torch.from_numpy(rng.permutation(len(params)))
    try:
        for nt in (1, 2, 3):
            fcpu.set_num_threads(nt)
            assert fcpu.get_num_threads() == nt
            out = fastsampler.sample(logits[perm], [params[i] for i in perm], backend="cpu", steps=steps[perm])
            for name, a, b in zip(("tokens", "valid", "logprobs", "top_ids", "top_lps", "ranks", "mu"), full, out,
                                  strict=True):
                torch.testing.assert_close(a[perm], b, equal_nan=True, rtol=0, atol=0, msg=name)
        for r in (0, 5, len(params) - 1):
            one = fastsampler.sample(logits[r:r + 1], [params[r]], backend="cpu", steps=steps[r:r + 1])
            assert one.tokens.item() == full.tokens[r].item()
            torch.testing.assert_close(one.mirostat_mu, full.mirostat_mu[r:r + 1], equal_nan=True)
    finally:
        fcpu.set_num_threads(0)


def test_concurrent_callers():
    """Several Python threads sampling at once (the GIL is released): every result equals the serial one."""
    import threading

    vocab = 5000
    rng = np.random.default_rng(8)
    logits = torch.from_numpy((rng.standard_normal((24, vocab)) * 2).astype(np.float32))
    params = [SamplingParams(seed=i, top_p=0.9, logprobs=True) for i in range(24)]
    want = fastsampler.sample(logits, params, backend="cpu")
    got: list = [None] * 4
    try:
        fcpu.set_num_threads(2)

        def work(j):
            got[j] = fastsampler.sample(logits, params, backend="cpu")

        threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        fcpu.set_num_threads(0)
    for out in got:
        assert torch.equal(out.tokens, want.tokens)
        torch.testing.assert_close(out.logprobs, want.logprobs, rtol=0, atol=0)


def test_invalid_rows_isolated():
    vocab = 300
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, vocab)) * 2).astype(np.float32)
    x[1, 17] = np.nan
    x[2, 250] = np.inf
    x[3] = -np.inf
    x[4, 0] = np.nan
    params = [SamplingParams(seed=i, logprobs=True, top_logprobs=3, mirostat_mode=2 if i == 1 else 0)
              for i in range(6)]
    ban_all = SamplingParams(seed=9, allowed_token_ids=[5], banned_token_ids=[5], logprobs=True)
    params[5] = ban_all  # nothing finite after the masks
    mu = torch.full((6,), 7.5)
    out = fastsampler.sample(torch.from_numpy(x), params, backend="cpu", mirostat_mu=mu, vocab_size=vocab)
    ref = fastsampler.sample(torch.from_numpy(x), params, backend="reference", mirostat_mu=mu, vocab_size=vocab)
    assert out.valid.tolist() == [True, False, False, False, False, False]
    assert out.tokens.tolist()[1:] == [-1] * 5
    assert out.tokens[0].item() == ref.tokens[0].item()
    assert torch.isnan(out.logprobs[1:]).all() and (out.ranks[1:] == -1).all()
    assert (out.top_logprob_ids[1:] == -1).all() and torch.isnan(out.top_logprobs[1:]).all()
    assert out.mirostat_mu.tolist() == [7.5] * 6  # passed through (row 0 is not a mirostat row)
    probs = fastsampler.sampling_probs(torch.from_numpy(x), params, backend="cpu", vocab_size=vocab)
    assert (probs[1:] == 0).all() and abs(float(probs[0].sum()) - 1) < 1e-5
    # padding columns beyond vocab_size are never read for validity
    y = x[:1].copy()
    y[0, 299] = np.nan
    assert fastsampler.sample(torch.from_numpy(y), params[0], backend="cpu", vocab_size=299).valid.item()


# ------------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("params", [
    SamplingParams(top_p=0.8),
    SamplingParams(typical_p=0.6),
    SamplingParams(mirostat_mode=2, mirostat_target=3.0),
    SamplingParams(mirostat_mode=1, mirostat_target=3.0),
    SamplingParams(top_k=12, min_p=0.02, temperature=0.7),
], ids=["top_p", "typical", "mirostat_v2", "mirostat_v1", "topk_minp"])
def test_chi_square(params):
    """Many draws of one distribution (varying step): goodness of fit against the reference probabilities."""
    from scipy.stats import chisquare

    vocab, n = 40, 20000
    rng = np.random.default_rng(11)
    row = (rng.standard_normal(vocab) * 1.5).astype(np.float32)
    logits = torch.from_numpy(np.repeat(row[None], n, axis=0))
    p = params.replace(seed=2024)
    out = fastsampler.sample(logits, p, backend="cpu", steps=torch.arange(n))
    want = fastsampler.reference.sampling_probs(row[None], p)[0]
    got_probs = fastsampler.sampling_probs(logits[:1], p, backend="cpu")[0].double().numpy()
    np.testing.assert_allclose(got_probs, want, atol=1e-5)
    counts = np.bincount(out.tokens.numpy(), minlength=vocab)
    assert counts[want == 0].sum() == 0, "a token outside the kept set was drawn"
    kept = want > 0
    if kept.sum() > 1:
        stat = chisquare(counts[kept], want[kept] / want[kept].sum() * n)
        assert stat.pvalue > 1e-4, f"chi-square p = {stat.pvalue:.3g}"


# ------------------------------------------------------------------------------------------------ properties
@settings(max_examples=25)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 7, 111, 4097]), st.floats(0.1, 3.0).map(as_f32))
def test_properties(seed, vocab, scale):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy((rng.standard_normal((1, vocab)) * scale).astype(np.float32))
    # greedy = argmax (lowest id on ties)
    g = fastsampler.sample(x, SamplingParams(temperature=0.0), backend="cpu").tokens.item()
    assert g == int(torch.argmax(x[0]))
    # renormalised probabilities sum to 1 and are never empty; monotone in k / p / min_p
    prev = None
    for k in (1, 3, 10, 50):
        p = fastsampler.sampling_probs(x, SamplingParams(top_k=k), backend="cpu")[0]
        assert abs(float(p.sum()) - 1) < 1e-5 and (p > 0).sum() >= min(k, vocab)
        if prev is not None:
            assert bool(((prev > 0) <= (p > 0)).all())
        prev = p
    prev = None
    for top_p in (0.1, 0.5, 0.9, 1.0):
        p = fastsampler.sampling_probs(x, SamplingParams(top_p=top_p), backend="cpu")[0]
        assert abs(float(p.sum()) - 1) < 1e-5 and (p > 0).any()
        if prev is not None:
            assert bool(((prev > 0) <= (p > 0)).all())
        prev = p
    # kept sets are permutation-equivariant
    perm = torch.from_numpy(rng.permutation(vocab))
    sp = SamplingParams(top_p=0.7, min_p=0.01)
    a = fastsampler.sampling_probs(x, sp, backend="cpu")[0]
    b = fastsampler.sampling_probs(x[:, perm], sp, backend="cpu")[0]
    assert torch.equal(a[perm] > 0, b > 0)
    # T -> 0 approaches greedy
    t = fastsampler.sampling_probs(x, SamplingParams(temperature=1e-4), backend="cpu")[0]
    gaps = torch.sort(x[0], descending=True).values
    if vocab == 1 or float(gaps[0] - gaps[1]) > 1e-2:
        assert int(torch.argmax(t)) == g and float(t[g]) > 0.999


def test_numpy_and_auto_dispatch():
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32)
    out = fastsampler.sample(x, SamplingParams(seed=1, logprobs=True))
    assert isinstance(out.tokens, np.ndarray) and out.tokens.dtype == np.int64
    ref = fastsampler.sample(x, SamplingParams(seed=1, logprobs=True), backend="reference")
    assert out.tokens.tolist() == ref.tokens.tolist()
    from fastsampler._api import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "cpu"
    assert fcpu.supports(torch.device("cpu"), torch.float16)
    assert not fcpu.supports(torch.device("cpu"), torch.float64)
    assert not fcpu.supports(torch.device("meta"), torch.float32)


# ------------------------------------------------------------------------------------------------ bad input
def test_empty_batch_and_single_token():
    out = fastsampler.sample(torch.zeros(0, 10), SamplingParams(), backend="cpu")
    assert out.tokens.shape == (0,) and out.top_logprob_ids.shape == (0, 0)
    assert fastsampler.sampling_probs(torch.zeros(0, 10), [], backend="cpu").shape == (0, 10)
    one = fastsampler.sample(torch.tensor([[3.0]]), SamplingParams(seed=1, top_p=0.5, logprobs=True, top_logprobs=2),
                             backend="cpu")
    assert one.tokens.tolist() == [0] and one.ranks.tolist() == [1]
    assert one.top_logprob_ids.tolist() == [[0, -1]]


def _raw_args(b=2, v=10):
    from fastsampler.backends.cpu import _C

    args = dict(logits=np.zeros((b, v), np.float32), dtype="float32", vocab_size=v,
                fparams=np.tile(np.array([1, 1, 0, 1, 0, 0, 1, 5, 0.1], np.float32), (b, 1)),
                iparams=np.tile(np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int32), (b, 1)),
                seeds=np.zeros(b, np.int64), steps=np.zeros(b, np.int64), seqs=np.zeros(b, np.int64),
                mirostat_mu=np.full(b, np.nan, np.float32), eos_ids=np.zeros(0, np.int32))
    return _C, args


@pytest.mark.parametrize("change,match", [
    (dict(logits=np.zeros((2, 10), np.float64)), "logits must be float32"),
    (dict(logits=np.zeros(10, np.float32)), "logits must be 2-D"),
    (dict(logits=np.zeros((2, 10), np.int16)), "logits must be float32"),
    (dict(dtype="int8"), "dtype must be"),
    (dict(logits=np.zeros((10, 2), np.float32).T), "contiguous along its last axis"),
    (dict(vocab_size=11), "vocab_size must be in"),
    (dict(vocab_size=0), "vocab_size must be in"),
    (dict(fparams=np.zeros((2, 9), np.float64)), "fparams must be float32"),
    (dict(fparams=np.zeros((3, 9), np.float32)), "fparams must have shape"),
    (dict(iparams=np.zeros((2, 8), np.int32)[:, ::2]), "iparams must have shape"),
    (dict(seeds=np.zeros(2, np.int32)), "seeds must be int64"),
    (dict(steps=np.zeros((2, 2), np.int64)[:, 0]), "steps must be C-contiguous"),
    (dict(eos_ids=np.array([10], np.int32)), "eos_ids holds token id 10"),
    (dict(output_counts=np.zeros((2, 9), np.int32)), "output_counts must be int16 or int32"),
    (dict(allowed_mask=np.zeros((2, 0), np.int32)), "allowed_mask must have shape"),
    (dict(bias_indptr=np.array([0, 1, 1], np.int32), bias_ids=np.array([10], np.int32),
          bias_vals=np.array([1.0], np.float32)), "bias_ids of row 0 holds token id 10"),
    (dict(bias_indptr=np.array([0, 2, 2], np.int32), bias_ids=np.array([3, 1], np.int32),
          bias_vals=np.array([1.0, 2.0], np.float32)), "sorted ascending"),
    (dict(bias_indptr=np.array([0, 1, 2], np.int32)), "given together"),
    (dict(logits=[[0.0] * 10] * 2), "logits must be a numpy array"),
])
def test_binding_rejects_bad_input(change, match):
    C, args = _raw_args()
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        C.sample(**args)


def test_binding_rejects_bad_params():
    C, args = _raw_args()
    args["fparams"][1, 0] = -1.0
    with pytest.raises(ValueError, match="temperature of row 1"):
        C.sample(**args)
    C, args = _raw_args()
    args["iparams"][0, 6] = 3
    with pytest.raises(ValueError, match="top_logprobs of row 0"):
        C.sample(**args)
    with pytest.raises(ValueError, match="num_threads"):
        fcpu.set_num_threads(-1)
    with pytest.raises(TypeError, match="num_threads"):
        fcpu.set_num_threads(1.5)


def test_api_errors_name_the_argument():
    with pytest.raises(ValueError, match="logit_bias of row 0 holds token id 99"):
        fastsampler.sample(torch.zeros(1, 10), SamplingParams(logit_bias={99: 1.0}), backend="cpu")
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        fastsampler.sample(torch.zeros(1, 10, dtype=torch.int32), SamplingParams(), backend="cpu")
    with pytest.raises(ValueError, match="does not support"):
        fastsampler.sample(torch.zeros(1, 10, dtype=torch.float64), SamplingParams(), backend="cpu")
