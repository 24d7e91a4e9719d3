"""One conformance suite for every backend that runs here (``reference``, ``cpu``, ``triton``; docs/semantics.md §8):
exact tokens against the numpy reference, invalid rows, batch invariance, dtypes, chi-square fits of the draw,
properties of the kept sets, and bad input.

Each test is parametrised over the backends (`tests.backend_checks.backend_params`); a backend that cannot run here is
skipped with the reason. Triton runs natively on CUDA and under ``TRITON_INTERPRET=1`` on the CPU, where the cases too
large for the interpreter in ``make test`` are marked ``slow`` (``make test-all`` runs them). What only one backend
has (thread control and the C++ binding; the Triton knobs and CUDA graphs) stays in ``test_cpu_backend.py`` and
``test_triton_backend.py``.

Shapes, and the code path each exercises:
- V = 1: a single token (every rule degenerates; greedy and sampling must agree).
- V = 7, 111: one partial 16-lane vector / several vectors with a tail (masked tail lanes, masked block tails).
- V = 1000, 4097: one and two race tiles (the tile race and per-tile partial results, the second tile holding one id).
- V = 20000, 32000, 32001: several tiles, the last partial; large candidate sets in the mass selection (top-p /
  typical); V = 128256 (a few rows, ``large``): the benchmark vocabulary, the selections over the full row.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import reference
from tests.backend_checks import (
    INVARIANCE,
    assert_batch_invariant,
    assert_same_floats,
    backend_device,
    backend_params,
    check_batch,
    check_exact,
    interpreted,
    mixed_params,
    random_logits,
)
from tests.strategies import as_f32, batches

pytestmark = [
    # the interpreter evaluates masked-off lanes too (log(0), inf - inf): numpy warns, results are unaffected
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"),
]

BACKENDS = backend_params()
# cases that take a minute or more in the Triton interpreter: ``slow`` there, in ``make test`` everywhere else
BACKENDS_SLOW_INTERPRETED = backend_params(slow_interpreted=True)
# the CPU backend's larger cases, written for its speed: minutes each in the Triton interpreter, more than CI's budget
# (they run on the reference and CPU backends everywhere, on Triton natively on CUDA)
BACKENDS_NOT_INTERPRETED = backend_params(skip_interpreted="minutes per case, beyond the CI budget")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}




# ------------------------------------------------------------------------------------------------ exact: random
@pytest.mark.parametrize("backend", BACKENDS_SLOW_INTERPRETED)
@settings(max_examples=int(os.environ.get("FASTSAMPLER_TRITON_EXAMPLES", "30")))
@given(b=batches(4, [1, 7, 111, 1000, 4097]))
def test_exact_random_batches(backend, b):
    """Random batches mixing every feature per row (strategies.batches): tokens, logprobs, probs, mu."""
    check_batch(backend, b)


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@settings(max_examples=40)
@given(b=batches(6, [1, 7, 111, 4097]))
def test_exact_random_batches_of_six(backend, b):
    check_batch(backend, b)


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@settings(max_examples=8)
@given(b=batches(3, [32001]))
def test_exact_random_batches_32001(backend, b):
    check_batch(backend, b)


# ------------------------------------------------------------------------------------------------ exact: features
FEATURES = {
    "plain": [SP(seed=1), SP(seed=2, temperature=0.7), SP(seed=3, temperature=1.6)],
    "greedy_ties": [SP(temperature=0.0, seed=0, logprobs=True, top_logprobs=5),
                    SP(temperature=0.0, seed=0, logprobs=True, logprobs_mode="final", top_logprobs=3),
                    SP(temperature=0.0, seed=0, logprobs=True, logprobs_mode="processed", top_logprobs=20)],
    "topk_topp_minp": [SP(seed=4, top_k=50, top_p=0.9, min_p=0.05), SP(seed=5, top_k=3, min_keep=5),
                       SP(seed=6, top_p=0.3, min_keep=4), SP(seed=7, min_p=0.5, min_keep=3, top_k=100)],
    "typical": [SP(seed=8, typical_p=0.9), SP(seed=9, typical_p=0.2, min_keep=5),
                SP(seed=10, typical_p=0.5, top_k=40, top_p=0.95)],
    "mirostat": [SP(seed=11, mirostat_mode=2, mirostat_target=3.0),
                 SP(seed=12, mirostat_mode=1, mirostat_target=5.0, mirostat_lr=0.5),
                 SP(seed=13, mirostat_mode=1, mirostat_target=1.0, temperature=0.5),
                 SP(seed=14, mirostat_mode=2, mirostat_target=0.5)],
    "logprobs": [SP(seed=15, logprobs=True, top_logprobs=20), SP(seed=16, logprobs=True, logprobs_mode="processed",
                                                                  top_logprobs=7, top_k=10, temperature=0.8),
                 SP(seed=17, logprobs=True, logprobs_mode="final", top_logprobs=20, top_p=0.5),
                 SP(seed=18, logprobs=True)],
    # epsilon joins min-p's stage: alone, with min-p, min_keep, the candidate engine (top-k), top-p and typical-p,
    # and above every probability (the maximum stays)
    "epsilon": [SP(seed=19, epsilon_cutoff=0.01), SP(seed=20, epsilon_cutoff=0.02, min_p=0.05),
                SP(seed=21, epsilon_cutoff=0.2, min_keep=5), SP(seed=22, epsilon_cutoff=0.01, top_k=50),
                SP(seed=23, epsilon_cutoff=0.001, top_p=0.9, logprobs=True, logprobs_mode="final", top_logprobs=3),
                SP(seed=24, epsilon_cutoff=0.02, typical_p=0.9), SP(seed=25, epsilon_cutoff=0.9)],
}


def _penalty_params(v: int) -> list[SP]:
    return [
        SP(seed=19, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.4,
           logit_bias={0: 5.0, 3 % v: -math.inf, (v - 1): 2.5}, min_tokens=5, logprobs=True, top_logprobs=2,
           logprobs_mode="processed"),
        SP(seed=20, banned_token_ids=[1 % v, 2 % v], allowed_token_ids=list(range(0, v, 2)), ignore_eos=True),
        SP(seed=21, repetition_penalty=0.7, top_k=5, logit_bias={1 % v: 100.0}),
        SP(seed=22, temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0, logprobs=True,
           logprobs_mode="final", top_logprobs=1)]


FEATURES["penalties_bias_masks"] = _penalty_params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", [7, 111, 4097])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_exact_features(backend, feature, ties, v):
    """Each feature family on tie-heavy and continuous logits, one and two tiles."""
    params = FEATURES[feature]
    params = params(v) if callable(params) else params
    b = len(params)
    logits = random_logits(b, v, seed=hash((feature, ties, v)) % 2**32, ties=ties, device=backend_device(backend))
    kw = {"steps": np.arange(b) * 7919 + 1, "seqs": np.arange(b) % 3}
    if feature == "penalties_bias_masks":
        kw.update(prompt_token_ids=[[0, 1, 5, 6], [2, 3], [], [0, 4]], output_token_ids=[[5, 5, 6], [], [1, 1], [0, 0]],
                  eos_token_ids=[0, 6])
    check_exact(backend, logits, params, **kw)


@pytest.mark.large
@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_exact_benchmark_vocab(backend, scale):
    """V = 128256, every feature, history for the penalties: the full-row selection paths."""
    vocab = 128256
    rng = np.random.default_rng(7)
    params = mixed_params(vocab, 11)
    logits = (rng.standard_normal((len(params), vocab)) * scale).astype(np.float32)
    hist = [rng.integers(0, vocab, size=256).tolist() for _ in params]
    check_batch(backend, {"logits": logits, "params": params, "output_token_ids": hist, "prompt_token_ids": hist,
                          "eos_token_ids": [0, 5], "steps": np.arange(len(params)) * 3})


@pytest.mark.large
@pytest.mark.parametrize("backend", BACKENDS_SLOW_INTERPRETED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_large_vocab(backend, dtype):
    """V = 32000: eight tiles; every threshold kind and logprobs on one batch."""
    v = 32000
    params = [SP(seed=31, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5),
              SP(seed=32, typical_p=0.9, logprobs=True, logprobs_mode="final", top_logprobs=3),
              SP(seed=33, mirostat_mode=1), SP(seed=34, mirostat_mode=2, logprobs=True)]
    logits = random_logits(len(params), v, seed=9, scale=3.0, dtype=dtype, device=backend_device(backend))
    check_exact(backend, logits, params, steps=[5, 6, 7, 8], output_token_ids=[[1, 2], [3], [], [31999]],
                prompt_token_ids=[[5], [], [7, 8], []])


@pytest.mark.parametrize("backend", BACKENDS_SLOW_INTERPRETED)
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_exact_mass_selection_paths(backend, scale, dtype):
    """Full-row top-p / typical (V = 20000 > 8192 survivors): masked tiles, peaked rows (boundary inside the exact
    set), wide brackets (p near 1), tie-heavy bf16 rows, min_keep, and top-p before typical."""
    vocab = 20000
    rng = np.random.default_rng(int(scale * 10))
    x = (rng.standard_normal((8, vocab)) * scale).astype(np.float32)
    x[3, 4096:12288] = -np.inf  # two whole tiles masked
    allowed = list(range(4096, 4096 + 6000))
    params = [
        SP(seed=1, top_p=0.9, logprobs=True, top_logprobs=3, logprobs_mode="final"),
        SP(seed=2, top_p=0.999, logprobs=True),
        SP(seed=3, typical_p=0.9, logprobs=True, logprobs_mode="processed"),
        SP(seed=4, top_p=0.8, typical_p=0.7, min_keep=50),
        SP(seed=5, top_p=0.3, allowed_token_ids=allowed),
        SP(seed=6, typical_p=0.2, temperature=0.5, banned_token_ids=list(range(0, 9000))),
        SP(seed=7, top_p=0.95, min_p=0.01, min_keep=300),
        SP(seed=8, typical_p=0.99, logprobs=True, logprobs_mode="final", top_logprobs=5),
    ]
    check_batch(backend, {"logits": x, "params": params}, DTYPES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_strided_and_padded_logits(backend):
    """Row-strided views (a vocabulary slice of a wider buffer) and padding columns beyond vocab_size."""
    dev = backend_device(backend)
    rng = np.random.default_rng(3)
    wide = torch.from_numpy((rng.standard_normal((4, 5000)) * 2).astype(np.float32)).to(dev)
    view = wide[:, :4500]
    assert not view.is_contiguous()
    params = [SP(seed=i, top_p=0.8, logprobs=True, top_logprobs=2) for i in range(4)]
    check_exact(backend, view, params, vocab_size=4321)
    # transposed (vocabulary axis strided) is copied, not misread
    t = torch.from_numpy(rng.standard_normal((300, 3)).astype(np.float32)).to(dev).t()
    got = fastsampler.sample(t, SP(temperature=0.0), backend=backend).tokens
    assert got.tolist() == t.argmax(dim=1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_padded_vocab_and_eos_state(backend):
    """vocab_size < logits.shape[1]: padding columns never read for validity nor sampled; device-side state."""
    dev = backend_device(backend)
    v, vocab = 4200, 4097
    logits = random_logits(3, v, seed=5, device=dev)
    logits[:, vocab:] = float("nan")  # padding is never read for validity
    logits[1, vocab:] = 1e4
    params = [SP(seed=1, top_p=0.8, logprobs=True, top_logprobs=4), SP(seed=2, min_tokens=3, logprobs=True),
              SP(seed=3, mirostat_mode=2, logprobs=True, logprobs_mode="final", top_logprobs=3)]
    counts = torch.zeros((3, v), dtype=torch.int16, device=dev)
    counts[0, [1, 2, 4096]] = torch.tensor([3, 1, 2], dtype=torch.int16, device=dev)
    check_exact(backend, logits, params, vocab_size=vocab, steps=[0, 1, 2], eos_token_ids=[4096, 7],
                output_counts=counts, mirostat_mu=[0.0, 0.0, 7.5])


# ------------------------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_half_precision_inputs(backend, dtype):
    """fp16 / bf16 logits are read as they are; the reference sees the same values upcast."""
    params = [SP(seed=51, top_k=20, top_p=0.9, logprobs=True, top_logprobs=3), SP(seed=52, typical_p=0.7),
              SP(seed=53, mirostat_mode=2), SP(seed=54, temperature=0.0, logprobs=True, top_logprobs=2)]
    logits = random_logits(4, 4097, seed=12, scale=3.0, dtype=dtype, device=backend_device(backend))
    check_exact(backend, logits, params, steps=[1, 2, 3, 4])


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@settings(max_examples=15)
@given(b=batches(4, [7, 111, 4097]))
def test_exact_half_precision_random_batches(backend, dtype, b):
    """fp16 / bf16 are read as they are and upcast in registers; the reference sees the same values."""
    check_batch(backend, b, DTYPES[dtype])


# ------------------------------------------------------------------------------------------------ invariance
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", sorted(INVARIANCE))
def test_batch_invariance(backend, path):
    """One request alone and at several positions in batches of different sizes: identical outputs (on Triton: on
    the radix selects and on the candidate engine)."""
    target, others = INVARIANCE[path]
    assert_batch_invariant(backend, target, others, backend_device(backend))


@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
def test_batch_invariance_permuted(backend):
    """A row's result does not depend on its batch position or the batch size: a permuted batch of every feature,
    and single rows, against the whole batch (bit for bit)."""
    vocab = 9000
    rng = np.random.default_rng(5)
    params = mixed_params(vocab, 100) * 2
    dev = backend_device(backend)
    logits = torch.from_numpy((rng.standard_normal((len(params), vocab)) * 2).astype(np.float32)).to(dev)
    steps = torch.arange(len(params), dtype=torch.int64)
    full = fastsampler.sample(logits, params, backend=backend, steps=steps)
    perm = torch.from_numpy(rng.permutation(len(params)))
    out = fastsampler.sample(logits[perm.to(dev)], [params[i] for i in perm], backend=backend, steps=steps[perm])
    for name, a, b in zip(("tokens", "valid", "logprobs", "top_ids", "top_lps", "ranks", "mu"), full, out,
                          strict=True):
        torch.testing.assert_close(a[perm.to(a.device)], b, equal_nan=True, rtol=0, atol=0, msg=name)
    for r in (0, 5, len(params) - 1):
        one = fastsampler.sample(logits[r:r + 1], [params[r]], backend=backend, steps=steps[r:r + 1])
        assert one.tokens.item() == full.tokens[r].item()
        torch.testing.assert_close(one.mirostat_mu, full.mirostat_mu[r:r + 1], equal_nan=True)


# ------------------------------------------------------------------------------------------------ invalid rows
@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_are_isolated(backend):
    """NaN, +inf, nothing finite, everything masked: token -1 and the documented outputs; other rows unaffected."""
    v = 111
    good = SP(seed=5, top_p=0.9, logprobs=True, top_logprobs=3)
    mu_p = SP(seed=6, mirostat_mode=2, logprobs=True, top_logprobs=2)
    x = random_logits(6, v, seed=14, device=backend_device(backend))
    x[1, 17] = float("nan")
    x[2, 3] = float("inf")
    x[3] = float("-inf")
    params = [good, mu_p, good, mu_p, SP(seed=7, allowed_token_ids=[4], logit_bias={4: -math.inf}, logprobs=True),
              good]
    out = fastsampler.sample(x, params, backend=backend, mirostat_mu=[0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    bad = [1, 2, 3, 4]
    assert out.tokens[bad].tolist() == [-1] * 4
    assert not out.valid[bad].any()
    assert torch.isnan(out.logprobs[bad]).all()
    assert (out.top_logprob_ids[bad] == -1).all() and torch.isnan(out.top_logprobs[bad]).all()
    assert (out.ranks[bad] == -1).all()
    assert out.mirostat_mu[[1, 3]].tolist() == [3.0, 4.0]  # passed through
    probs = fastsampler.sampling_probs(x, params, backend=backend, mirostat_mu=[0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    assert (probs[bad] == 0).all()
    for r in (0, 5):
        alone = fastsampler.sample(x[r:r + 1], good, backend=backend)
        assert int(alone.tokens[0]) == int(out.tokens[r])
        assert_same_floats(backend, alone.top_logprobs[0], out.top_logprobs[r])


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_rows_pass_mu_through_and_ignore_padding(backend):
    """NaN anywhere, +inf, all -inf, every id banned: invalid with the documented outputs, the Mirostat mu passed
    through on every row, the valid row equal to the reference; NaN in padding columns never makes a row invalid."""
    vocab = 300
    dev = backend_device(backend)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, vocab)) * 2).astype(np.float32)
    x[1, 17] = np.nan
    x[2, 250] = np.inf
    x[3] = -np.inf
    x[4, 0] = np.nan
    params = [SP(seed=i, logprobs=True, top_logprobs=3, mirostat_mode=2 if i == 1 else 0) for i in range(6)]
    params[5] = SP(seed=9, allowed_token_ids=[5], banned_token_ids=[5], logprobs=True)  # nothing finite after masks
    mu = torch.full((6,), 7.5, device=dev)
    logits = torch.from_numpy(x).to(dev)
    out = fastsampler.sample(logits, params, backend=backend, mirostat_mu=mu, vocab_size=vocab)
    ref = fastsampler.sample(torch.from_numpy(x), params, backend="reference", mirostat_mu=mu.cpu(), vocab_size=vocab)
    assert out.valid.tolist() == [True, False, False, False, False, False]
    assert out.tokens.tolist()[1:] == [-1] * 5
    assert out.tokens[0].item() == ref.tokens[0].item()
    assert torch.isnan(out.logprobs[1:]).all() and (out.ranks[1:] == -1).all()
    assert (out.top_logprob_ids[1:] == -1).all() and torch.isnan(out.top_logprobs[1:]).all()
    assert out.mirostat_mu.tolist() == [7.5] * 6  # passed through (row 0 is not a mirostat row)
    probs = fastsampler.sampling_probs(logits, params, backend=backend, vocab_size=vocab)
    assert (probs[1:] == 0).all() and abs(float(probs[0].sum()) - 1) < 1e-5
    # padding columns beyond vocab_size are never read for validity
    y = x[:1].copy()
    y[0, 299] = np.nan
    assert fastsampler.sample(torch.from_numpy(y).to(dev), params[0], backend=backend, vocab_size=299).valid.item()


# ------------------------------------------------------------------------------------------------ statistics
def _wide_row() -> np.ndarray:
    """40 ids, N(0, 1.5) logits."""
    return (np.random.default_rng(11).standard_normal(40) * 1.5).astype(np.float32)


def _narrow_row() -> np.ndarray:
    """12 ids, N(0, 1) logits, id 5 masked (-inf): never drawn."""
    row = random_logits(1, 12, seed=15, scale=1.0)[0].numpy().copy()
    row[5] = -np.inf
    return row


# case: (params, row, the draws' seeds / steps / seqs, draws, draws row by row, least p-value)
CHI_SQUARE = {
    "wide_top_p": (SP(top_p=0.8), _wide_row, "seed", 20000, 300, 1e-4),
    "wide_typical": (SP(typical_p=0.6), _wide_row, "seed", 20000, 300, 1e-4),
    "wide_mirostat_v2": (SP(mirostat_mode=2, mirostat_target=3.0), _wide_row, "seed", 20000, 300, 1e-4),
    "wide_mirostat_v1": (SP(mirostat_mode=1, mirostat_target=3.0), _wide_row, "seed", 20000, 300, 1e-4),
    "wide_topk_minp": (SP(top_k=12, min_p=0.02, temperature=0.7), _wide_row, "seed", 20000, 300, 1e-4),
    "top_p": (SP(top_p=0.8, temperature=1.3), _narrow_row, "seqs", 4000, 300, 1e-3),
    "typical_p": (SP(typical_p=0.6), _narrow_row, "seqs", 4000, 300, 1e-3),
    "mirostat_v2": (SP(mirostat_mode=2, mirostat_target=2.0), _narrow_row, "seqs", 4000, 300, 1e-3),
    "mirostat_v1": (SP(mirostat_mode=1, mirostat_target=2.5), _narrow_row, "seqs", 4000, 300, 1e-3),
}


def _chi_square_pvalue(counts: np.ndarray, expected: np.ndarray) -> float | None:
    """Chi-square goodness of fit with the cells of smallest expectation pooled until each expects 5 or more; None
    when fewer than two cells remain."""
    from scipy import stats

    order = np.argsort(expected)
    pooled_o, pooled_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(counts[order], expected[order], strict=True):
        acc_o += o
        acc_e += e
        if acc_e >= 5:
            pooled_o.append(acc_o)
            pooled_e.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0:
        if pooled_e:
            pooled_o[-1] += acc_o
            pooled_e[-1] += acc_e
        else:
            pooled_o.append(acc_o)
            pooled_e.append(acc_e)
    if len(pooled_e) < 2:
        return None
    return float(stats.chisquare(pooled_o, pooled_e).pvalue)


def _chi_params():
    out = []
    for case in CHI_SQUARE:
        # 300 draws: a minute or more each in the interpreter; the 40-id cases (the CPU backend's) are not run there
        wide = case.startswith("wide_")
        for p in backend_params(slow_interpreted=not wide,
                                skip_interpreted="minutes per case, beyond the CI budget" if wide else ""):
            out.append(pytest.param(p.values[0], case, marks=p.marks, id=f"{p.values[0]}-{case}"))
    return out


@pytest.mark.parametrize("backend,case", _chi_params())
def test_draws_chi_square(backend, case):
    """Many draws of one distribution (the step varies) fit the reference probabilities; ids outside the kept set
    are never drawn; the backend's probabilities equal the reference's.

    One row per draw. The Triton interpreter runs programs one by one and the reference runs rows one by one in
    numpy, so they draw fewer; the "seed" cases share one seed per row, the "seqs" cases also vary the sequence id.
    """
    p, make_row, kind, n_draws, n_row_by_row, least_p = CHI_SQUARE[case]
    n = n_row_by_row if backend == "reference" or interpreted(backend) else n_draws
    dev = backend_device(backend)
    row = make_row()
    v = row.shape[0]
    logits = torch.from_numpy(np.repeat(row[None], n, axis=0)).to(dev)
    if kind == "seed":
        p = p.replace(seed=2024)
        out = fastsampler.sample(logits, p, backend=backend, steps=torch.arange(n))
        want = reference.sampling_probs(row[None], p)[0]
    else:
        out = fastsampler.sample(logits, p, backend=backend, seeds=torch.full((n,), 1234, dtype=torch.int64),
                                 steps=np.arange(n), seqs=np.arange(n) % 4)
        want = reference.sampling_probs(row[None], p.replace(seed=0))[0]
    got_probs = fastsampler.sampling_probs(logits[:1], p.replace(seed=0), backend=backend)[0]
    np.testing.assert_allclose(got_probs.double().cpu().numpy(), want, atol=1e-5)
    tok = out.tokens.cpu().numpy()
    assert out.valid.all()
    assert (want[tok] > 0).all(), f"drew ids outside the kept set: {sorted(set(tok[want[tok] == 0].tolist()))}"
    counts = np.bincount(tok, minlength=v).astype(np.float64)
    keep = want > 0
    pval = _chi_square_pvalue(counts[keep], want[keep] / want[keep].sum() * n)
    if pval is None:
        assert counts[keep].sum() == n
        return
    assert pval > least_p, f"{case}: p = {pval:.3g}, observed {counts[keep]}, expected {want[keep] * n}"


# ------------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("backend", BACKENDS_NOT_INTERPRETED)
@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.sampled_from([1, 7, 111, 4097]), scale=st.floats(0.1, 3.0).map(as_f32))
def test_properties(backend, seed, vocab, scale):
    """Greedy is the argmax; kept sets are never empty, monotone in k and p, permutation-equivariant; T -> 0 is
    greedy."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy((rng.standard_normal((1, vocab)) * scale).astype(np.float32)).to(backend_device(backend))
    # greedy = argmax (lowest id on ties)
    g = fastsampler.sample(x, SP(temperature=0.0), backend=backend).tokens.item()
    assert g == int(torch.argmax(x[0]))
    # renormalised probabilities sum to 1 and are never empty; monotone in k / p / min_p
    prev = None
    for k in (1, 3, 10, 50):
        p = fastsampler.sampling_probs(x, SP(top_k=k), backend=backend)[0]
        assert abs(float(p.sum()) - 1) < 1e-5 and (p > 0).sum() >= min(k, vocab)
        if prev is not None:
            assert bool(((prev > 0) <= (p > 0)).all())
        prev = p
    prev = None
    for top_p in (0.1, 0.5, 0.9, 1.0):
        p = fastsampler.sampling_probs(x, SP(top_p=top_p), backend=backend)[0]
        assert abs(float(p.sum()) - 1) < 1e-5 and (p > 0).any()
        if prev is not None:
            assert bool(((prev > 0) <= (p > 0)).all())
        prev = p
    # kept sets are permutation-equivariant
    perm = torch.from_numpy(rng.permutation(vocab)).to(x.device)
    sp = SP(top_p=0.7, min_p=0.01)
    a = fastsampler.sampling_probs(x, sp, backend=backend)[0]
    b = fastsampler.sampling_probs(x[:, perm], sp, backend=backend)[0]
    assert torch.equal(a[perm] > 0, b > 0)
    # T -> 0 approaches greedy
    t = fastsampler.sampling_probs(x, SP(temperature=1e-4), backend=backend)[0]
    gaps = torch.sort(x[0], descending=True).values
    if vocab == 1 or float(gaps[0] - gaps[1]) > 1e-2:
        assert int(torch.argmax(t)) == g and float(t[g]) > 0.999


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_single_token(backend):
    dev = backend_device(backend)
    out = fastsampler.sample(torch.zeros(0, 10, device=dev), SP(), backend=backend)
    assert out.tokens.shape == (0,) and out.top_logprob_ids.shape == (0, 0)
    assert fastsampler.sampling_probs(torch.zeros(0, 10, device=dev), [], backend=backend).shape == (0, 10)
    one = fastsampler.sample(torch.tensor([[3.0]], device=dev), SP(seed=1, top_p=0.5, logprobs=True, top_logprobs=2),
                             backend=backend)
    assert one.tokens.tolist() == [0] and one.ranks.tolist() == [1]
    assert one.top_logprob_ids.tolist() == [[0, -1]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_api_errors_name_the_argument(backend):
    dev = backend_device(backend)
    with pytest.raises(ValueError, match="logit_bias of row 0 holds token id 99"):
        fastsampler.sample(torch.zeros(1, 10, device=dev), SP(logit_bias={99: 1.0}), backend=backend)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        fastsampler.sample(torch.zeros(1, 10, dtype=torch.int32, device=dev), SP(), backend=backend)
    if backend != "reference":  # the reference takes float64
        with pytest.raises(ValueError, match="does not support"):
            fastsampler.sample(torch.zeros(1, 10, dtype=torch.float64, device=dev), SP(), backend=backend)
