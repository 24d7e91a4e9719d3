"""The Triton candidate engine (``fastsampler/triton/candidates.py``): top-k, min_keep, top-p and min-p finished on a
buffer of candidates, with the exact radix selects as the fallback when the buffer overflows.

Checks, under ``TRITON_INTERPRET=1`` on the CPU (natively on CUDA):

- the path each row takes (candidate buffer or exact fallback), read from the step's row state, so that a test
  about the fallback is known to exercise it (``FASTSAMPLER_TRITON_CANDIDATES=16`` forces it);
- the superset property: every id of the kept set is in the row's buffer;
- exact tokens, logprobs and sampling probabilities against the numpy reference on hostile rows (ties at each
  threshold, all-equal and flat rows, ``top_k >= V``, ``min_keep`` above the kept set, ``-inf`` and NaN rows,
  penalties and bias, fp16 / bf16), mixed with rows that take the fallback or no truncation;
- a chi-square fit of the draw, and ``V = 128256`` rows (marked ``large``); batch invariance of a candidate row is
  in ``test_triton_backend.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import reference
from fastsampler._batch import pack_batch
from tests.backend_checks import check_exact, slow_in_interpreter, triton_available

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                               "ignore:overflow:RuntimeWarning"),
]


def _logits(b, v, seed, scale=2.0, dtype=torch.float32, device="cpu"):
    g = np.random.default_rng(seed)
    return torch.from_numpy((g.standard_normal((b, v)) * scale).astype(np.float32)).to(dtype=dtype, device=device)


def _paths(logits, params, **kw):
    """Run one step's truncation and report, per row, the candidate count (-1: not a candidate row), the buffer
    (ids) of candidate rows, and the buffer size."""
    from fastsampler.backends.triton import backend
    from fastsampler.backends.triton.penalties import RI_CCOUNT

    batch = pack_batch(logits, params, **kw)
    ctx, _ = backend._run(batch)
    assert ctx.cand, "the batch should take the candidate engine"
    counts = ctx.rowi[:, RI_CCOUNT].cpu().tolist()
    ids = ctx.cand_ids.view(ctx.B, ctx.CAP).cpu().numpy()
    return counts, ids, ctx.CAP


def _lp_paths(logits, params, **kw):
    """Run one step with its logprobs kernel and report, per row, whether the top-N and rank came from the group
    maxima (True) or from the whole row (False)."""
    from fastsampler.backends.triton import backend
    from fastsampler.backends.triton.logprobs import logprobs_pass
    from fastsampler.backends.triton.penalties import RI_LP_GROUPS

    batch = pack_batch(logits, params, **kw)
    ctx, out = backend._run(batch)
    assert ctx.lp_cand, "the batch should take the candidate engine's logprobs"
    logprobs_pass(ctx, out[3], out[4], out[5])
    return [bool(x) for x in ctx.rowi[:, RI_LP_GROUPS].cpu().tolist()]


def _hostile_batch(v, device):
    """Rows that stress each threshold, with the params of each; every row carries a seed."""
    g = np.random.default_rng(7)
    x = (g.standard_normal((12, v)) * 2.0).astype(np.float32)
    x[1] = np.round(x[1] * 2) / 2  # heavy ties: the k-th value, the top-p boundary and the min-p cut are tied
    x[2, :300] = 1.5  # all equal: every finite id is tied at the k-th value
    x[2, 300:] = -np.inf
    x[3] = (g.standard_normal(v) * 1e-3).astype(np.float32)  # flat: top-p keeps most of the row
    x[4, 10:] = -np.inf  # ten finite ids
    x[5, 17] = np.nan  # invalid row
    x[6, : v // 2] = np.round(x[6, : v // 2])  # ties in the low half (where the top groups cluster)
    params = [
        SP(seed=1, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5),
        SP(seed=2, top_k=7, top_p=0.6, min_p=0.1, logprobs=True, logprobs_mode="final", top_logprobs=3),
        SP(seed=3, top_k=5, top_p=0.5),  # all equal: keeps every id
        SP(seed=4, top_k=200, top_p=0.95, min_p=0.001),
        SP(seed=5, top_k=3, min_keep=6, top_p=0.2),  # min_keep above k and above top-p's set
        SP(seed=6, top_k=4, logprobs=True),  # invalid
        SP(seed=7, top_k=12, min_p=0.9, min_keep=9, logprobs=True, logprobs_mode="processed", top_logprobs=4),
        SP(seed=8, top_k=v + 5, top_p=0.8),  # top_k >= V: top-k off, top-p alone (the fallback's selects)
        SP(seed=9, top_p=0.7, min_keep=3),  # no top-k: the fallback
        SP(seed=10, min_p=0.3, min_keep=5),  # min-p alone with min_keep: the fallback
        SP(seed=11, temperature=0.0, top_k=3),  # greedy: no truncation
        SP(seed=12, temperature=0.7),  # no truncation
    ]
    return torch.from_numpy(x).to(device), params


@pytest.mark.parametrize("cap", [None, "16"])
def test_hostile_rows_exact(device, monkeypatch, cap):
    """Every row of a mixed batch equals the reference, with the default buffer and with a 16-slot buffer that
    forces the exact fallback on every candidate row; the rows take the path the test says they take."""
    if cap:
        monkeypatch.setenv("FASTSAMPLER_TRITON_CANDIDATES", cap)
    v = 1500
    x, params = _hostile_batch(v, device)
    kw = dict(steps=list(range(12)), output_token_ids=[[1, 2, 2]] + [[]] * 11, prompt_token_ids=[[3]] + [[]] * 11)
    counts, _, size = _paths(x, params, **kw)
    cand_rows = [0, 1, 2, 3, 4, 6]
    assert [r for r, c in enumerate(counts) if c >= 0] == cand_rows
    # all tied: every finite id; ten finite ids: all ten; top_k = 200 above the row's 94 groups: the bound is -inf
    # and every id is a candidate
    assert counts[2] == 300 and counts[4] == 10 and counts[3] == v
    fits = [r for r in cand_rows if counts[r] <= size]
    assert fits == ([1, 4, 6] if cap else [0, 1, 2, 4, 6]), counts  # the others take the exact fallback
    check_exact("triton", x, params, **kw)


def test_superset_property(device):
    """The buffer of a candidate row holds every id of the reference's kept set (ties included)."""
    v = 2000
    x = _logits(6, v, seed=3, scale=2.5, device=device)
    x[1] = torch.round(x[1] * 4) / 4
    x[2, :256] = x[2, :256].abs() + 4.0  # the largest values packed into the first groups
    params = [SP(seed=i, top_k=k, top_p=p, min_p=mp, min_keep=mk)
              for i, (k, p, mp, mk) in enumerate([(50, 1.0, 0.0, 1), (20, 0.9, 0.0, 1), (64, 0.95, 0.01, 1),
                                                   (1, 1.0, 0.0, 1), (5, 0.3, 0.0, 8), (100, 1.0, 0.5, 1)])]
    counts, ids, size = _paths(x, params)
    kept = reference.sampling_probs(x.cpu().numpy(), params) > 0
    for r in range(len(params)):
        assert 0 <= counts[r] <= size, (r, counts[r])
        buf = set(ids[r, :counts[r]].tolist())
        want = set(np.nonzero(kept[r])[0].tolist())
        assert want <= buf, f"row {r}: kept ids missing from the buffer: {sorted(want - buf)[:10]}"
        assert len(buf) == counts[r]  # each id once
    check_exact("triton", x, params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
    """fp16 / bf16 rows (many ties after rounding) on the candidate path."""
    v = 4097
    params = [SP(seed=21, top_k=40, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=3),
              SP(seed=22, top_k=8, min_keep=10), SP(seed=23, top_k=100, top_p=0.5, temperature=0.6)]
    x = _logits(3, v, seed=5, scale=3.0, dtype=dtype, device=device)
    counts, _, size = _paths(x, params)
    assert all(0 <= c <= size for c in counts)
    check_exact("triton", x, params, steps=[1, 2, 3])


def test_logprobs_from_groups(device):
    """Ranks and top-N logprobs of a candidate batch come from the groups that can hold them, in every mode, with
    penalties and bias reordering the raw and processed values; rows whose top-N needs ``-inf`` entries (a final
    kept set smaller than N, fewer finite values than N) or whose bound admits too much read the whole row. Exact
    against the reference."""
    v = 3000
    g = np.random.default_rng(17)
    x = (g.standard_normal((9, v)) * 2.0).astype(np.float32)
    x[3, 40:] = -np.inf  # 40 finite values
    x[5] = np.round(x[5] * 2) / 2  # ties in every order
    x[6] = 0.5  # all tied: the bound admits every group
    params = [
        SP(seed=1, top_k=50, logprobs=True, top_logprobs=5),  # raw
        SP(seed=2, top_k=20, top_p=0.8, repetition_penalty=1.3, frequency_penalty=0.4, logprobs=True,
           logprobs_mode="processed", top_logprobs=3),
        SP(seed=3, top_k=30, logprobs=True, logprobs_mode="final", top_logprobs=8),
        SP(seed=4, top_k=3, logprobs=True, top_logprobs=20),  # 40 finite raw values in 3 groups < 20: whole row
        SP(seed=5, top_k=3, logprobs=True, logprobs_mode="final", top_logprobs=6),  # 3 kept < 6: whole row
        SP(seed=6, top_k=10, logprobs=True, logprobs_mode="processed", top_logprobs=4),  # ties
        SP(seed=7, top_k=10, logprobs=True, top_logprobs=2),  # all tied: whole row
        SP(seed=8, temperature=0.0, logprobs=True, logprobs_mode="final", top_logprobs=1),  # greedy: the token
        SP(seed=9, top_k=40, logit_bias={7: 6.0, 2999: 4.0, 11: -100.0}, logprobs=True),  # rank only
    ]
    kw = dict(output_token_ids=[[1, 2], [5, 5, 9, int(np.argmax(x[1]))], [], [], [], [], [], [], [3]])
    paths = _lp_paths(torch.from_numpy(x).to(device), params, **kw)
    assert paths == [True, True, True, False, False, True, False, True, True], paths
    check_exact("triton", torch.from_numpy(x).to(device), params, **kw)


def _mirostat_k(row: np.ndarray, mu: float) -> int:
    """The reference's Mirostat v1 k of a row (temperature 1, no masks), clamped like §3 E."""
    from fastsampler.backends.reference import pipeline

    z = np.sort(row[np.isfinite(row)].astype(np.float64))[::-1]
    lq = z - z[0] - np.log(np.exp(z - z[0]).sum())
    kf = pipeline.mirostat_v1_k(lq, mu, row.size)
    return int(min(max(np.floor(kf), 1), row.size)) if np.isfinite(kf) else row.size


@pytest.mark.parametrize("cap", [None, "16"])
def test_mirostat_v1(device, monkeypatch, cap):
    """Mirostat v1 rows take their 100 largest z from the buffer: k inside the buffer, k past it (the exact
    fallback), k keeping every finite z, fewer than 100 finite z, all tied, next to top-k rows; with a 16-slot
    buffer every row overflows. Exact against the reference."""
    if cap:
        monkeypatch.setenv("FASTSAMPLER_TRITON_CANDIDATES", cap)
    v = 3000
    g = np.random.default_rng(21)
    x = (g.standard_normal((6, v)) * 2.0).astype(np.float32)
    x[3, 50:] = -np.inf  # 50 finite ids
    x[4] = 0.25  # all tied
    mu = [9.0, 11.0, 40.0, 3.0, 7.0, 0.0]
    params = [SP(seed=1, mirostat_mode=1, logprobs=True, top_logprobs=2), SP(seed=2, mirostat_mode=1),
              SP(seed=3, mirostat_mode=1), SP(seed=4, mirostat_mode=1, mirostat_target=1.0),
              SP(seed=5, mirostat_mode=1), SP(seed=6, top_k=10, top_p=0.9)]
    counts, _, size = _paths(torch.from_numpy(x).to(device), params, mirostat_mu=mu)
    ks = [_mirostat_k(x[r], mu[r]) for r in range(3)]
    if not cap:
        assert all(0 <= c <= size for c in counts[:4]) and counts[4] == v, counts
        # row 0: k inside the buffer; row 1: k past it (the fallback's k-th select); row 2: every finite z kept
        assert ks[0] <= counts[0] < ks[1] < v <= ks[2], (ks, counts)
    check_exact("triton", torch.from_numpy(x).to(device), params, mirostat_mu=mu)


@slow_in_interpreter
def test_draws_chi_square(device, monkeypatch):
    """Draws of one top-k + top-p + min-p distribution on the candidate path fit the reference probabilities; ids
    outside the kept set are never drawn. (The fallback draws through the same finishing kernel; its tokens are
    checked exactly above.) A 64-slot buffer holds the row's 40 candidates and keeps the interpreter's sort short."""
    from scipy import stats

    monkeypatch.setenv("FASTSAMPLER_TRITON_CANDIDATES", "64")
    v = 40
    n = 4000 if torch.device(device).type == "cuda" else 300
    p = SP(top_k=20, top_p=0.95, min_p=0.02, temperature=1.2)
    row = _logits(1, v, seed=15, scale=1.0)
    want = reference.sampling_probs(row.numpy(), p.replace(seed=0))[0]
    logits = row.expand(n, v).contiguous().to(device)
    counts, _, size = _paths(logits[:2], p.replace(seed=0))
    assert all(0 <= c <= size for c in counts), counts  # the candidate path
    out = fastsampler.sample(logits, p, backend="triton", seeds=torch.full((n,), 99, dtype=torch.int64),
                             steps=np.arange(n))
    tok = out.tokens.cpu().numpy()
    assert (want[tok] > 0).all()
    keep = want > 0
    counts = np.bincount(tok, minlength=v).astype(np.float64)[keep]
    exp = want[keep] * n
    big = exp >= 5
    obs = np.append(counts[big], counts[~big].sum())
    ex = np.append(exp[big], exp[~big].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    _, pval = stats.chisquare(obs, ex * obs.sum() / ex.sum())
    assert pval > 1e-3, (obs, ex)


def test_buffer_size_env(monkeypatch):
    """``FASTSAMPLER_TRITON_CANDIDATES`` must be a power of two in [16, 4096]."""
    from fastsampler.backends.triton.backend import _candidates

    for bad in ("8", "100", "8192"):
        monkeypatch.setenv("FASTSAMPLER_TRITON_CANDIDATES", bad)
        with pytest.raises(ValueError, match="FASTSAMPLER_TRITON_CANDIDATES"):
            _candidates()
    monkeypatch.setenv("FASTSAMPLER_TRITON_CANDIDATES", "64")
    assert _candidates() == 64


@pytest.mark.large
@slow_in_interpreter
def test_llama3_vocab(device, monkeypatch):
    """V = 128256 with the CUDA chunking: top-k + top-p + min-p rows with penalties and logprobs; ``top_k = 500``
    gathers more candidates than the default buffer holds (about 690 on these rows) and takes the exact fallback."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "1024")
    v = 128256
    params = [SP(seed=31, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5),
              SP(seed=32, top_k=500, top_p=0.99, temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2),
              SP(seed=33, top_k=1, logprobs=True, logprobs_mode="final")]
    x = _logits(3, v, seed=9, scale=3.0, device=device)
    counts, _, size = _paths(x, params)
    assert 0 <= counts[0] <= size and 0 <= counts[2] <= size and counts[1] > size, counts
    check_exact("triton", x, params, steps=[5, 6, 7], output_token_ids=[[1, 2], [3, 4, 5, 128255], []])
