"""What only the C++ CPU backend (``backend="cpu"``, `backends.cpu._C`) has: its Philox and noise kernels against the
reference, thread control (results do not depend on the thread count, concurrent callers), automatic dispatch to it,
and the binding's own argument checks.

Exact tokens, invalid rows, batch invariance, dtypes, chi-square, properties and API errors are in
``test_conformance.py``, which runs them on every backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler.backends import cpu as fcpu
from fastsampler.backends.reference import token_noise
from fastsampler.backends.reference.philox import exp_noise
from tests.backend_checks import mixed_params

pytestmark = pytest.mark.skipif(not fcpu.is_available()[0], reason=fcpu.is_available()[1])

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

# ------------------------------------------------------------------------------------------------ invariance
def test_thread_count_invariance():
    """A row's result does not depend on the thread count: a permuted batch at 1, 2 and 3 threads and single rows at 3
    against the whole batch at the default count (position and batch-size invariance on every backend:
    test_conformance.py)."""
    vocab = 9000
    rng = np.random.default_rng(5)
    params = mixed_params(vocab, 100) * 2
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
def _raw_args(b=2, v=10):
    from fastsampler._batch import pack_param_rows
    from fastsampler.backends.cpu import _C

    f, i = pack_param_rows([SamplingParams()] * b)  # the F_* / I_* columns of the default params
    args = dict(logits=np.zeros((b, v), np.float32), dtype="float32", vocab_size=v, fparams=f, iparams=i,
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
    (dict(dry_ids=np.zeros((2, 1), np.int32)), "dry_ids and dry_vals must be given together"),
    (dict(dry_ids=np.array([[10], [1]], np.int32), dry_vals=np.ones((2, 1), np.float32)),
     "dry_ids of row 0 holds token id 10"),
    (dict(dry_ids=np.array([[3, 1], [1, 2]], np.int32), dry_vals=np.ones((2, 2), np.float32)), "ascending"),
    (dict(dry_ids=np.array([[1], [2]], np.int32), dry_vals=np.array([[1.0], [-1.0]], np.float32)),
     "dry_vals of row 1 must be >= 0"),
    (dict(dry_ids=np.array([[2**31 - 1], [2]], np.int32), dry_vals=np.ones((2, 1), np.float32)),
     "must be 0 at unused entries"),
    (dict(dry_ids=np.zeros((2, 1), np.int64), dry_vals=np.ones((2, 1), np.float32)), "dry_ids must be int32"),
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
