"""The Triton backend against the numpy reference (docs/semantics.md §8): exact, batch invariance, invalid rows, half
precision inputs, and chi-square goodness of fit of the draw.

Runs under ``TRITON_INTERPRET=1`` on the CPU (small shapes) and natively on CUDA. Shapes and the code path each
exercises: ``V = 1`` (a single id), ``7`` / ``111`` (one partial tile, masked block tails), ``1000``, ``4097`` (two
tiles: the tile race and per-tile partial results, the second tile holding one id), ``32000`` (eight tiles, marked
``large``).
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import fastsampler
from backend_checks import NearTieWarning, check_against_reference
from conftest import triton_available
from fastsampler import SamplingParams as SP
from fastsampler import reference
from strategies import batches

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    # the interpreter evaluates masked-off lanes too (log(0), inf - inf): numpy warns, results are unaffected
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"),
]


def _check(logits, params, **kw):
    """check_against_reference for the Triton backend; near-ties are reported (warning + report), never dropped."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", NearTieWarning)
        rep = check_against_reference("triton", logits, params, **kw)
    for x in w:
        if issubclass(x.category, NearTieWarning):
            print(f"near-tie report: {x.message}")  # visible with -s / in the captured output of a failure
    assert rep.compared + len(rep.near_ties) >= rep.rows - sum(1 for p in (params if isinstance(params, list) else [])
                                                               if p is None)
    return rep


def _logits(b, v, seed, scale=2.0, ties=False, dtype=torch.float32, device="cpu"):
    g = np.random.default_rng(seed)
    x = (g.standard_normal((b, v)) * scale).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2
    return torch.from_numpy(x).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------------- exact
@settings(max_examples=int(os.environ.get("FASTSAMPLER_TRITON_EXAMPLES", "30")))
@given(batches(4, [1, 7, 111, 1000, 4097]))
def test_exact_random_batches(device, b):
    """Random batches mixing every feature per row (strategies.batches): tokens, logprobs, probs, mu."""
    logits = torch.from_numpy(b.pop("logits")).to(device)
    params = b.pop("params")
    _check(logits, params, **b)


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


@pytest.mark.parametrize("v", [7, 111, 4097])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_exact_features(device, feature, ties, v):
    """Each feature family on tie-heavy and continuous logits, one and two tiles."""
    params = FEATURES[feature]
    params = params(v) if callable(params) else params
    b = len(params)
    logits = _logits(b, v, seed=hash((feature, ties, v)) % 2**32, ties=ties, device=device)
    kw = {"steps": np.arange(b) * 7919 + 1, "seqs": np.arange(b) % 3}
    if feature == "penalties_bias_masks":
        kw.update(prompt_token_ids=[[0, 1, 5, 6], [2, 3], [], [0, 4]], output_token_ids=[[5, 5, 6], [], [1, 1], [0, 0]],
                  eos_token_ids=[0, 6])
    _check(logits, params, **kw)


@pytest.mark.parametrize("slots", [False, True])
def test_exact_sparse_logit_bias(device, monkeypatch, slots):
    """The logit bias is applied in the kernels from the CSR: runs of entries longer than one match group, entries
    on both sides of a chunk boundary, bans, rows without a bias next to rows with one; every pass that recomputes
    ``z`` (stats, selects, typical, Mirostat v1, draw, logprobs) sees the same bias. With ``slots`` the batch goes
    through a `Sampler` given a tensor of slots, whose CSR pads every row with zero-valued entries."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "1024")
    v = 3000
    dense = {i: (-1.0) ** i * 0.25 * (i % 7) for i in range(1000, 1060)}  # crosses the boundary at id 1024
    sparse = {i: 3.0 for i in range(5, v, 37)}
    sparse.update({17: -math.inf, 2047: 4.5, 2048: -4.5, v - 1: 2.0})
    params = [SP(seed=81, logit_bias=dense, top_k=40, top_p=0.9, logprobs=True, top_logprobs=4),
              SP(seed=82, logit_bias=sparse, typical_p=0.8, logprobs=True, logprobs_mode="processed"),
              SP(seed=83),
              SP(seed=84, logit_bias={**dense, **sparse}, mirostat_mode=1, logprobs=True, logprobs_mode="final",
                 top_logprobs=2),
              SP(seed=85, temperature=0.0, logit_bias={2999: 100.0})]
    logits = _logits(len(params), v, seed=17, scale=2.0, device=device)
    if not slots:
        _check(logits, params, steps=[1, 2, 3, 4, 5])
        return
    s = fastsampler.Sampler(vocab_size=v, max_slots=8, device=device, backend="triton")
    idx = [s.add(p)[0] for p in params]
    got = s.sample(logits, torch.tensor(idx, device=device))
    want = reference.sample(logits.cpu().numpy(), params)
    diag = reference.diagnose(logits.cpu().numpy(), params)
    for r in range(len(params)):
        if not diag["near_tie"][r]:
            assert int(got.tokens[r]) == int(want.tokens[r]), r
    np.testing.assert_allclose(got.logprobs.cpu().numpy(), want.logprobs, atol=1e-5, equal_nan=True)


def test_exact_padded_vocab_and_eos_state(device):
    """vocab_size < logits.shape[1]: padding columns never read for validity nor sampled; device-side state."""
    v, vocab = 4200, 4097
    logits = _logits(3, v, seed=5, device=device)
    logits[:, vocab:] = float("nan")  # padding is never read for validity
    logits[1, vocab:] = 1e4
    params = [SP(seed=1, top_p=0.8, logprobs=True, top_logprobs=4), SP(seed=2, min_tokens=3, logprobs=True),
              SP(seed=3, mirostat_mode=2, logprobs=True, logprobs_mode="final", top_logprobs=3)]
    counts = torch.zeros((3, v), dtype=torch.int16, device=device)
    counts[0, [1, 2, 4096]] = torch.tensor([3, 1, 2], dtype=torch.int16)
    _check(logits, params, vocab_size=vocab, steps=[0, 1, 2], eos_token_ids=[4096, 7],
           output_counts=counts, mirostat_mu=[0.0, 0.0, 7.5])


@pytest.mark.large
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_large_vocab(device, dtype):
    """V = 32000: eight tiles; every threshold kind and logprobs on one batch."""
    v = 32000
    params = [SP(seed=31, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5),
              SP(seed=32, typical_p=0.9, logprobs=True, logprobs_mode="final", top_logprobs=3),
              SP(seed=33, mirostat_mode=1), SP(seed=34, mirostat_mode=2, logprobs=True)]
    logits = _logits(len(params), v, seed=9, scale=3.0, dtype=dtype, device=device)
    _check(logits, params, steps=[5, 6, 7, 8], output_token_ids=[[1, 2], [3], [], [31999]],
           prompt_token_ids=[[5], [], [7, 8], []])


@pytest.mark.parametrize("bits", [4, 2])
def test_exact_other_digit_widths(device, monkeypatch, bits):
    """The radix select with 4-bit digits (the CUDA default) and 2-bit digits gives the same thresholds."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_DIGIT_BITS", str(bits))
    params = [SP(seed=41, top_k=7, top_p=0.7, logprobs=True, top_logprobs=3), SP(seed=42, typical_p=0.6, min_keep=3),
              SP(seed=43, mirostat_mode=1)]
    _check(_logits(3, 1000, seed=11, ties=True, device=device), params)


@pytest.mark.parametrize("chunk", [1024, pytest.param(256, marks=pytest.mark.large)])
def test_exact_row_split(device, monkeypatch, chunk):
    """Each 4096-id tile split over several programs (1024 ids each is the CUDA default): per-chunk partial results
    are combined per tile for the draw and per row for the statistics."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", str(chunk))
    params = [SP(seed=61, top_k=40, top_p=0.8, min_p=0.02, logprobs=True, top_logprobs=5),
              SP(seed=62, typical_p=0.7, min_keep=2, logprobs=True, logprobs_mode="final", top_logprobs=2),
              SP(seed=63, mirostat_mode=1, logprobs=True, logprobs_mode="processed"),
              SP(seed=64, temperature=0.0, repetition_penalty=1.5, logprobs=True), SP(seed=65)]
    _check(_logits(len(params), 4097 + 2048, seed=16, scale=2.5, device=device), params, steps=[3, 1, 4, 1, 5],
           output_token_ids=[[1], [2, 2], [], [6000], [4096]])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(device, dtype):
    """fp16 / bf16 logits are read as they are; the reference sees the same values upcast."""
    params = [SP(seed=51, top_k=20, top_p=0.9, logprobs=True, top_logprobs=3), SP(seed=52, typical_p=0.7),
              SP(seed=53, mirostat_mode=2), SP(seed=54, temperature=0.0, logprobs=True, top_logprobs=2)]
    _check(_logits(4, 4097, seed=12, scale=3.0, dtype=dtype, device=device), params, steps=[1, 2, 3, 4])


# ---------------------------------------------------------------------------------------------- invariance
INVARIANCE = {  # target request, the other rows of its batches
    # the radix selects (typical-p: no candidate engine)
    "selects": (SP(seed=77, top_k=30, top_p=0.9, typical_p=0.95, logprobs=True, top_logprobs=4),
                [SP(seed=1, mirostat_mode=1), SP(seed=2, temperature=0.0), SP(seed=3, min_p=0.2, min_keep=4)]),
    # the candidate engine, next to rows on its exact fallback (top-p alone) and greedy rows
    "candidates": (SP(seed=77, top_k=30, top_p=0.9, min_p=0.02, logprobs=True, top_logprobs=4),
                   [SP(seed=1, top_p=0.8), SP(seed=2, temperature=0.0), SP(seed=3, top_k=5, min_keep=4)]),
}


@pytest.mark.parametrize("chunk", [None, "1024"])
@pytest.mark.parametrize("path", sorted(INVARIANCE))
def test_batch_invariance(device, monkeypatch, chunk, path):
    """One request alone and at several positions in batches of different sizes: identical outputs (also with the
    CUDA default of 1024-id programs), on the radix selects and on the candidate engine."""
    if chunk:
        monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", chunk)
    v = 4097
    target, others = INVARIANCE[path]
    row = _logits(1, v, seed=13, device=device)
    alone = fastsampler.sample(row, target, backend="triton", steps=[5])
    for size, pos in [(2, 0), (3, 2), (6, 3)]:
        batch = _logits(size, v, seed=100 + size, device=device)
        batch[pos] = row[0]
        params = [others[i % len(others)] for i in range(size)]
        params[pos] = target
        steps = [11] * size
        steps[pos] = 5
        out = fastsampler.sample(batch, params, backend="triton", steps=steps)
        assert int(out.tokens[pos]) == int(alone.tokens[0])
        assert torch.equal(out.logprobs[pos:pos + 1], alone.logprobs)
        assert torch.equal(out.top_logprob_ids[pos:pos + 1], alone.top_logprob_ids)
        assert torch.equal(out.top_logprobs[pos:pos + 1], alone.top_logprobs)
        assert int(out.ranks[pos]) == int(alone.ranks[0])


def test_invalid_rows_are_isolated(device):
    """NaN, +inf, nothing finite, everything masked: token -1 and the documented outputs; other rows unaffected."""
    v = 111
    good = SP(seed=5, top_p=0.9, logprobs=True, top_logprobs=3)
    mu_p = SP(seed=6, mirostat_mode=2, logprobs=True, top_logprobs=2)
    x = _logits(6, v, seed=14, device=device)
    x[1, 17] = float("nan")
    x[2, 3] = float("inf")
    x[3] = float("-inf")
    params = [good, mu_p, good, mu_p, SP(seed=7, allowed_token_ids=[4], logit_bias={4: -math.inf}, logprobs=True),
              good]
    out = fastsampler.sample(x, params, backend="triton", mirostat_mu=[0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    bad = [1, 2, 3, 4]
    assert out.tokens[bad].tolist() == [-1] * 4
    assert not out.valid[bad].any()
    assert torch.isnan(out.logprobs[bad]).all()
    assert (out.top_logprob_ids[bad] == -1).all() and torch.isnan(out.top_logprobs[bad]).all()
    assert (out.ranks[bad] == -1).all()
    assert out.mirostat_mu[[1, 3]].tolist() == [3.0, 4.0]  # passed through
    probs = fastsampler.sampling_probs(x, params, backend="triton", mirostat_mu=[0.0, 3.0, 0.0, 4.0, 0.0, 0.0])
    assert (probs[bad] == 0).all()
    for r in (0, 5):
        alone = fastsampler.sample(x[r:r + 1], good, backend="triton")
        assert int(alone.tokens[0]) == int(out.tokens[r])
        assert torch.equal(alone.top_logprobs[0], out.top_logprobs[r])


# ------------------------------------------------------------------------------------------------ statistical
CHI_CASES = {
    "top_p": SP(top_p=0.8, temperature=1.3),
    "typical_p": SP(typical_p=0.6),
    "mirostat_v2": SP(mirostat_mode=2, mirostat_target=2.0),
    "mirostat_v1": SP(mirostat_mode=1, mirostat_target=2.5),
}


@pytest.mark.parametrize("case", [
    "top_p", "typical_p", "mirostat_v2",
    pytest.param("mirostat_v1", marks=pytest.mark.large),  # slow in the interpreter (three selects and a gather)
])
def test_draws_chi_square(device, case):
    """Many draws of one distribution (the step varies) fit the reference probabilities; masked ids never drawn.

    One row per draw (the interpreter runs programs one by one, so the CPU run keeps ``n`` modest; CUDA draws more).
    """
    from scipy import stats

    v = 12
    n = 4000 if torch.device(device).type == "cuda" else 300
    p = CHI_CASES[case]
    row = _logits(1, v, seed=15, scale=1.0)
    row[0, 5] = float("-inf")
    want = reference.sampling_probs(row.numpy(), p.replace(seed=0))[0]
    logits = row.expand(n, v).contiguous().to(device)
    out = fastsampler.sample(logits, p, backend="triton", seeds=torch.full((n,), 1234, dtype=torch.int64),
                             steps=np.arange(n), seqs=np.arange(n) % 4)
    tok = out.tokens.cpu().numpy()
    assert out.valid.all()
    assert (want[tok] > 0).all(), f"drew ids outside the kept set: {sorted(set(tok[want[tok] == 0].tolist()))}"
    counts = np.bincount(tok, minlength=v).astype(np.float64)
    keep = want > 0
    exp = want[keep] * n
    # pool small expected cells so the chi-square approximation holds
    order = np.argsort(exp)
    obs_k, exp_k = counts[keep][order], exp[order]
    pooled_o, pooled_e, acc_o, acc_e = [], [], 0.0, 0.0
    for o, e in zip(obs_k, exp_k, strict=True):
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
        assert counts[keep].sum() == n
        return
    stat, pval = stats.chisquare(pooled_o, pooled_e)
    assert pval > 1e-3, f"{case}: chi2={stat:.2f}, p={pval:.3g}, observed {counts[keep]}, expected {exp}"


# ------------------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_and_cuda_graph_capture():
    """sample_packed never synchronises with the host and replays from a CUDA graph with the same results."""
    from fastsampler._batch import pack_batch
    from fastsampler.backends.triton import backend

    v = 32000
    params = [SP(seed=1, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5, logit_bias={3: 2.0}),
              SP(seed=2, typical_p=0.9, repetition_penalty=1.2), SP(seed=3, mirostat_mode=1),
              SP(seed=4, mirostat_mode=2, logprobs=True, logprobs_mode="final"), SP(seed=5, temperature=0.0)]
    logits = _logits(len(params), v, seed=21, scale=3.0, device="cuda")
    batch = pack_batch(logits, params, steps=[1, 2, 3, 4, 5], output_token_ids=[[1], [2], [], [4], [5]],
                       eos_token_ids=[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            want = backend.sample_packed(batch)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        backend.sample_packed(batch)
        backend.sampling_probs_packed(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = backend.sample_packed(batch)
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("tokens", "valid", "logprobs", "top_logprob_ids", "top_logprobs", "ranks", "mu"), got, want,
                          strict=True):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True, atol=0)), name
