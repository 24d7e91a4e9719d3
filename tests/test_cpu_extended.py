"""The C++ CPU backend's extended rules (docs/semantics.md §3 C DRY table, §3 E item 3 top-nσ, item 5 eta, item 6
XTC, and the dynamic temperature after the rules): hand-computed cases, random mixed rows against the reference,
`cpu.dry_edits` against `fastsampler._history.dry_table_torch`, XTC's coin, and the binding's checks of the new inputs.

The code paths a case exercises are named in its comment: eta, XTC and the dynamic temperature read the kept set from
the head (top-k rows) or from masked passes over the row (the rest, typical's band included; eta alone takes pass 1's
entropy sums); the dynamic temperature scales the kept values where they become weights and race scores; top-nσ
merges per-tile moments (a float64 pass when a float32 tile sum overflows).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import _history
from fastsampler._batch import pack_batch
from fastsampler.backends import cpu as fcpu
from fastsampler.backends.reference import backend as ref_backend
from fastsampler.backends.reference.philox import xtc_uniform

from .backend_checks import check_exact, unavailable

pytestmark = pytest.mark.skipif(bool(unavailable("cpu")), reason=unavailable("cpu") or "cpu")


def _probs(z, **kw) -> np.ndarray:
    x = torch.tensor([z], dtype=torch.float32)
    return fastsampler.sampling_probs(x, SP(seed=3, **kw), backend="cpu")[0].numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------ hand cases
def test_eta_hand_computed():
    # q = (0.5, 0.3, 0.2), H = 1.0297: eta 0.2 and 0.3 keep all three, 0.5 keeps two (docs/semantics.md §3 E item 5);
    # no earlier rule: the survivors are the whole row, whose entropy sums come with pass 1
    lq = np.log([0.5, 0.3, 0.2]).tolist()
    for eta, n in [(0.2, 3), (0.3, 3), (0.5, 2)]:
        assert (_probs(lq, eta_cutoff=eta) > 0).sum() == n, eta
    np.testing.assert_allclose(_probs(lq, eta_cutoff=0.5), [0.625, 0.375, 0.0], atol=1e-6)


def test_eta_over_the_survivors():
    # the same three tokens ahead of 5000 others (two tiles) that the earlier rules remove: eta sees q = (0.5, 0.3,
    # 0.2) over the survivors, not the whole row's distribution. top-k: the survivors' sums from the head; min-p: a
    # masked pass; min_keep = 3 lowers the cut to the third survivor
    lq = np.log([0.5, 0.3, 0.2]).tolist() + [float(np.log(0.2)) - 2.5] * 5000
    for rule in (dict(top_k=3), dict(min_p=0.3), dict(min_p=0.3, min_keep=3)):
        want = [0.625, 0.375, 0.0] if rule.get("min_keep", 1) == 1 else [0.5, 0.3, 0.2]
        p = _probs(lq, eta_cutoff=0.5, **rule)
        np.testing.assert_allclose(p[:3], want, atol=1e-6, err_msg=str(rule))
        assert p[3:].sum() == 0, rule
    # after typical's band (the kept set is not a top prefix): a value threshold on top of the band, min_keep counted
    # among the band's tokens; every case against the reference
    rng = np.random.default_rng(5)
    x = torch.from_numpy((rng.standard_normal((8, 5000)) * 2.5).astype(np.float32))
    params = [SP(seed=i, typical_p=tp, eta_cutoff=eta, min_keep=mk, top_k=k, logprobs=True, logprobs_mode="final",
                 top_logprobs=3)
              for i, (tp, eta, mk, k) in enumerate([(0.5, 0.05, 1, 0), (0.9, 0.02, 1, 0), (0.5, 0.3, 4, 0),
                                                    (0.9, 0.1, 2, 0), (1.0, 0.01, 1, 40), (0.7, 0.05, 1, 40),
                                                    (1.0, 0.02, 5, 0), (0.95, 0.2, 3, 0)])]
    check_exact("cpu", x, params, steps=[1] * 8)
    for r, p in enumerate(params):
        b = pack_batch(x[r:r + 1], p)
        assert torch.equal(fcpu.kept_mask_packed(b), ref_backend.kept_mask_packed(b)), r


def test_top_n_sigma_hand_computed():
    # z = (3, 2, 0, -1): sigma = 1.5811; nu = 1 keeps z >= 1.419 (two tokens); nu = 3 keeps all; a masked token is
    # not part of sigma
    p = _probs([3, 2, 0, -1], top_n_sigma=1.0)
    np.testing.assert_allclose(p, [1 / (1 + np.e**-1), 1 / (1 + np.e), 0, 0], atol=1e-6)
    assert (_probs([3, 2, 0, -1], top_n_sigma=3.0) > 0).sum() == 4
    assert (_probs([3, 2, 0, -1, -np.inf], top_n_sigma=1.0) > 0).sum() == 2
    # all equal: sigma = 0 keeps the tie
    assert (_probs([1.0] * 5, top_n_sigma=2.0) > 0).sum() == 5


def test_top_n_sigma_far_logits_use_the_float64_moments():
    # a logit 3e38 below the rest: the float32 tile sums overflow, sigma comes from the float64 pass (~1.5e38 / 2),
    # so nu = 1 keeps every finite token with non-zero weight
    z = [1.0, 0.5, -3e38, 0.0]
    x = torch.tensor([z], dtype=torch.float32)
    kept = fastsampler.sampling_probs(x, SP(seed=1, top_n_sigma=1.0), backend="cpu")[0].numpy()
    ref = fastsampler.sampling_probs(x, SP(seed=1, top_n_sigma=1.0), backend="reference")[0].numpy()
    np.testing.assert_allclose(kept, ref, atol=1e-6)


def test_xtc_hand_computed():
    # q = (0.5, 0.3, 0.15, 0.05), theta = 0.1: A = the first three, the kept set is the last two (0.15 : 0.05)
    lq = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    np.testing.assert_allclose(_probs(lq, xtc_probability=1.0, xtc_threshold=0.1), [0, 0, 0.75, 0.25], atol=1e-6)
    # min_keep = 3: only two would remain, nothing is removed
    np.testing.assert_allclose(_probs(lq, xtc_probability=1.0, xtc_threshold=0.1, min_keep=3),
                               [0.5, 0.3, 0.15, 0.05], atol=1e-6)
    # |A| = 1: nothing removed
    np.testing.assert_allclose(_probs(lq, xtc_probability=1.0, xtc_threshold=0.4), [0.5, 0.3, 0.15, 0.05], atol=1e-6)
    # ties at a stay together: q = (0.4, 0.2, 0.2, 0.2), theta = 0.15 keeps the three tied tokens
    np.testing.assert_allclose(_probs(np.log([0.4, 0.2, 0.2, 0.2]).tolist(), xtc_probability=1.0,
                                      xtc_threshold=0.15), [0, 1 / 3, 1 / 3, 1 / 3], atol=1e-6)
    # the same from the head (top-k): the kept set is the head's entries below the cut
    long = lq + [-40.0] * 300
    p = _probs(long, xtc_probability=1.0, xtc_threshold=0.1, top_k=4)
    np.testing.assert_allclose(p[:4], [0, 0, 0.75, 0.25], atol=1e-6)
    assert p[4:].sum() == 0
    # after typical's band (the most probable token may be out): S = {0.3}, |A| = 1, no cut
    np.testing.assert_allclose(_probs(lq[:3] + [np.log(0.05)], typical_p=0.25, xtc_probability=1.0,
                                      xtc_threshold=0.1), [0, 1, 0, 0], atol=1e-6)


def test_xtc_cut_far_below_the_maximum():
    # theta = 0: A is every survivor and only the lowest tie group stays (top-k 3: the token 800 below the maximum;
    # no top-k: the 40 tokens tied 1e4 below it): its weights are taken relative to the kept maximum (head and masked
    # pass alike), so the row stays valid
    z = [0.0, -500.0, -800.0] + [-1e4] * 40
    for k in (3, 0):
        ps = SP(seed=1, xtc_probability=1.0, xtc_threshold=0.0, top_k=k, logprobs=True, logprobs_mode="final")
        out = fastsampler.sample(torch.tensor([z]), ps, steps=[0], backend="cpu")
        assert (3 <= int(out.tokens[0]) < 43 if k == 0 else int(out.tokens[0]) == 2) and bool(out.valid[0])
        assert float(out.logprobs[0]) == pytest.approx(-np.log(40) if k == 0 else 0.0, abs=1e-5)


def test_xtc_draws_and_logprobs_use_the_cut():
    # the token is drawn from the kept set below the cut; final logprobs renormalise over it; top-N skips the cut
    lq = np.log([0.5, 0.3, 0.15, 0.05]).tolist() + [-50.0] * 5000  # two tiles
    x = torch.tensor([lq] * 64, dtype=torch.float32)
    for k in (0, 4):  # a masked pass / the head
        ps = [SP(seed=s, xtc_probability=1.0, xtc_threshold=0.1, top_k=k, logprobs=True, logprobs_mode="final",
                 top_logprobs=3) for s in range(64)]
        out = fastsampler.sample(x, ps, steps=[0] * 64, backend="cpu")
        toks = out.tokens.numpy()
        assert set(toks.tolist()) <= {2, 3} and {2, 3} <= set(toks.tolist())
        lp = np.where(toks == 2, np.log(0.75), np.log(0.25))
        np.testing.assert_allclose(out.logprobs.numpy(), lp, atol=1e-5)
        assert out.top_logprob_ids[0, :2].tolist() == [2, 3]


def test_dynamic_temperature_hand_computed():
    # T' = T_min + (T_max - T_min) (H / ln n)^kappa from softmax(l) over the kept set (docs/semantics.md §3 E, after
    # the rules); no rule: the kept set is every finite token (a masked pass around the tile maxima). Final logprobs
    # are those of l / T', processed logprobs keep the base temperature, raw ones no temperature
    l = np.array([2.0, 1.0, 0.5, -1.0, -np.inf])
    fin = l[np.isfinite(l)]
    q = np.exp(fin - fin.max())
    q /= q.sum()
    H = -(q * np.log(q)).sum()

    def log_softmax(v):
        return v - v.max() - np.log(np.exp(v - v.max()).sum())

    x = torch.tensor([l.tolist()], dtype=torch.float32)
    for T, d, k in [(0.8, 0.3, 1.0), (0.5, 0.7, 2.0), (1.0, 0.2, 0.0)]:
        lo, hi = max(0.0, T - d), T + d
        tp = lo + (hi - lo) * (H / np.log(fin.size)) ** k
        want = {"final": log_softmax(fin / tp), "processed": log_softmax(fin / T), "raw": log_softmax(fin)}
        for mode, lp in want.items():
            out = fastsampler.sample(x, SP(temperature=T, dynatemp_range=d, dynatemp_exponent=k, seed=1, logprobs=True,
                                           logprobs_mode=mode, top_logprobs=4), steps=[0], backend="cpu")
            np.testing.assert_allclose(out.top_logprobs[0].numpy(), lp, atol=1e-5, err_msg=f"{mode} {T} {d} {k}")
            np.testing.assert_allclose(float(out.logprobs[0]), lp[int(out.tokens[0])], atol=1e-5)
        np.testing.assert_allclose(_probs(l.tolist(), temperature=T, dynatemp_range=d, dynatemp_exponent=k)[:4],
                                   np.exp(log_softmax(fin / tp)), atol=1e-6)
    # one finite token: T' = T
    x = torch.tensor([[1.0, -np.inf, -np.inf]])
    out = fastsampler.sample(x, SP(temperature=0.7, dynatemp_range=0.5, seed=1), steps=[0], backend="cpu")
    assert out.tokens.tolist() == [0] and out.valid.tolist() == [True]


def test_dynamic_temperature_over_the_kept_set():
    # the docs' example: top-k 3 keeps l = (2, 1, 0), T' = 1.2577 (the kept set from the head); the same kept set
    # from min-p in a row of two tiles (a masked pass) and with XTC's cut on top (its maximum from a max sweep)
    t_dyn = 1.2576791106615821
    k3 = [2.0, 1.0, 0.0, -1.0, -2.0]
    want = np.exp(np.array([2.0, 1.0, 0.0]) / t_dyn)
    want /= want.sum()
    np.testing.assert_allclose(_probs(k3, top_k=3, dynatemp_range=0.5)[:3], want, atol=1e-6)
    wide = [2.0, 1.0, 0.0] + [-4.0] * 5000
    p = _probs(wide, min_p=0.1, dynatemp_range=0.5)
    np.testing.assert_allclose(p[:3], want, atol=1e-6)
    assert p[3:].sum() == 0
    # XTC with theta 0.2 over q = (0.665, 0.245, 0.090) cuts the first: the kept set l = (1, 0), T' from it
    q2 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    h2 = -(q2 * np.log(q2)).sum()
    t2 = 0.5 + h2 / np.log(2)
    want2 = np.exp(np.array([1.0, 0.0]) / t2)
    for k in (3, 0):
        p = _probs(wide, min_p=0.1, top_k=k, xtc_probability=1.0, xtc_threshold=0.2, dynatemp_range=0.5)
        np.testing.assert_allclose(p[1:3], want2 / want2.sum(), atol=1e-6, err_msg=str(k))
        assert p[0] == 0 and p[3:].sum() == 0
    # final logprobs, the draw and Mirostat's update use l / T' on the kept set: against the reference
    rng = np.random.default_rng(7)
    x = torch.from_numpy((rng.standard_normal((8, 9000)) * 2.0).astype(np.float32))
    params = [SP(seed=i, temperature=t, dynatemp_range=d, dynatemp_exponent=e, logprobs=True, logprobs_mode=m,
                 top_logprobs=4, **kw)
              for i, (t, d, e, m, kw) in enumerate([
                  (0.7, 0.3, 1.0, "final", dict(top_k=20)), (1.3, 0.8, 0.5, "final", dict(top_p=0.8)),
                  (1.0, 0.5, 2.0, "final", dict(typical_p=0.7)), (0.9, 0.4, 1.0, "processed", dict(min_p=0.02)),
                  (1.0, 0.5, 1.0, "final", dict(mirostat_mode=2)), (0.8, 0.3, 1.0, "final", dict(mirostat_mode=1)),
                  (1.1, 0.6, 1.0, "final", dict()), (0.6, 0.5, 1.0, "final", dict(xtc_probability=1.0,
                                                                                   xtc_threshold=0.05))])]
    check_exact("cpu", x, params, steps=[3] * 8)


def test_dynamic_temperature_float32_range():
    # a peaked kept set has H ~ 0, so T' = T - delta = T / 2 doubles z: 3e38 overflows to +inf (the row is invalid,
    # as the reference), and a kept -2e38 underflows to -inf and leaves the kept set (the kept mask drops it)
    p = SP(seed=1, temperature=1.0, dynatemp_range=0.5, logprobs=True)
    out = fastsampler.sample(torch.tensor([[3e38, 0.0, 1.0]]), p, steps=[0], backend="cpu")
    assert out.valid.tolist() == [False] and out.tokens.tolist() == [-1]
    assert fastsampler.reference.sample(np.array([[3e38, 0.0, 1.0]]), p).valid.tolist() == [False]
    x = torch.tensor([[0.0, -20.0, -2e38, -np.inf]])
    b = pack_batch(x, p)
    kept = fcpu.kept_mask_packed(b)[0].tolist()
    assert kept == ref_backend.kept_mask_packed(b)[0].tolist() == [True, True, False, False]
    # without the doubling (a flat kept set: T' = T + delta) the far token stays kept, with probability 0
    flat = pack_batch(torch.tensor([[0.0, 0.0, -2e38]]), p)
    assert fcpu.kept_mask_packed(flat)[0].tolist() == [True, True, True]
    check_exact("cpu", x, p, steps=[0])


def test_dry_table_hand_computed():
    # w = (A B C C B C Y A B C), a = 1, mu = 1, b = 2: C loses 4, Y 2, B 1; with the breaker (Y,), Y is not penalised
    from fastsampler.backends import cpu

    ring = np.array([[0, 1, 2, 2, 1, 2, 5, 0, 1, 2]], dtype=np.int32)
    args = (ring, np.array([10]), np.array([0]), np.array([[1.0, 2.0]]), np.array([[1, -1]]))
    ids, vals = cpu.dry_edits(*args, None)
    assert ids.dtype == np.int32 and vals.dtype == np.float32
    assert ids.tolist() == [[1, 2, 5]] and vals.tolist() == [[1.0, 4.0, 2.0]]
    ids, vals = cpu.dry_edits(*args, np.array([[[5, -1]]]))
    assert ids.tolist() == [[1, 2]] and vals.tolist() == [[1.0, 4.0]]
    # no DRY anywhere: K = 0
    ids, vals = cpu.dry_edits(ring, np.array([10]), np.array([0, 0]), np.array([[0.0, 2.0]]), np.array([[1, -1]]),
                              None)
    assert ids.shape == (2, 0) and vals.shape == (2, 0)


# ------------------------------------------------------------------------------------------------ dry_edits
def _dry_torch(ring, total, rows, fd, idry, brk):
    t = torch.from_numpy
    seq = _history.ordered_history(t(ring).index_select(0, t(rows)), t(total).index_select(0, t(rows)))
    ids, vals = _history.dry_table_torch(seq, t(fd).index_select(0, t(rows)), t(idry).index_select(0, t(rows)),
                                         None if brk is None else t(brk).index_select(0, t(rows)),
                                         _history.dry_kmax(fd, idry, ring.shape[1]))
    k = int((ids != _history.DRY_PAD).sum(1).max()) if ids.numel() else 0
    return ids[:, :k].numpy(), vals[:, :k].numpy()


@pytest.mark.parametrize("seed", range(3))
def test_dry_edits_equal_the_torch_table(seed):
    from fastsampler.backends import cpu

    rng = np.random.default_rng(seed)
    for _ in range(60):
        s, length, voc = int(rng.integers(1, 6)), int(rng.integers(1, 80)), int(rng.integers(2, 7))
        ring = rng.integers(0, voc, (s, length)).astype(np.int32)
        if rng.random() < 0.3:  # long periodic repeats: lengths past the exponent clamp
            ring[:] = np.tile(np.arange(3), length)[:length]
        total = rng.integers(0, 2 * length + 1, s).astype(np.int64)
        fd = np.stack([np.where(rng.random(s) < 0.8, rng.uniform(0.1, 2, s), 0.0),
                       rng.choice([1.0, 1.0000005, 1.75, 3.0, 1e4], s)], 1)
        idry = np.stack([rng.integers(0, 5, s), rng.choice([-1, 0, 3, 10, 100], s)], 1).astype(np.int64)
        p, m = int(rng.integers(0, 4)), int(rng.integers(1, 4))
        brk = np.full((s, p, m), -1, np.int64)
        for i in range(s):
            for j in range(p):
                n = int(rng.integers(0, m + 1))
                brk[i, j, :n] = rng.integers(0, voc, n)
        brk_arg = brk if rng.random() < 0.8 else None
        rows = rng.integers(0, s, int(rng.integers(1, 5))).astype(np.int64)
        ids, vals = cpu.dry_edits(ring, total, rows, fd, idry, brk_arg)
        want_ids, want_vals = _dry_torch(ring, total, rows, fd, idry, brk_arg)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(vals.view(np.int32), want_vals.view(np.int32))  # float32 bits


def test_dry_edits_long_history_and_tensors():
    # a 4096-token ring written 5000 times (wrapped), a 100-token motif repeated: tensors in, numpy out
    from fastsampler.backends import cpu

    rng = np.random.default_rng(5)
    motif = rng.integers(0, 128256, 100)
    hist = np.concatenate([motif if rng.random() < 0.6 else rng.integers(0, 128256, 100) for _ in range(50)])
    ring = np.zeros((2, 4096), np.int32)
    for j, t in enumerate(hist):
        ring[0, j % 4096] = t
    ring[1, :] = rng.integers(0, 50, 4096)
    total = np.array([hist.size, 4096], np.int64)
    fd = np.array([[0.8, 1.75], [1.0, 1.1]])
    idry = np.array([[2, -1], [0, 1000]], np.int64)
    brk = np.full((2, 2, 3), -1, np.int64)
    brk[0, 0, :2] = hist[-7:-5]
    brk[1, 1, 0] = 3
    rows = np.array([1, 0, 1], np.int64)
    ids, vals = cpu.dry_edits(*(torch.from_numpy(a) for a in (ring, total, rows, fd, idry, brk)))
    assert isinstance(ids, np.ndarray)
    want_ids, want_vals = _dry_torch(ring, total, rows, fd, idry, brk)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(vals, want_vals)


# ------------------------------------------------------------------------------------------------ vs the reference
def _random_params(rng: np.random.Generator, vocab: int, seed: int) -> SP:
    kw: dict = dict(seed=seed)
    if rng.random() < 0.08:
        kw["temperature"] = 0.0  # greedy: DRY only
    else:
        kw["temperature"] = float(rng.choice([0.6, 1.0, 1.4]))
        if rng.random() < 0.15:
            kw["mirostat_mode"] = int(rng.integers(1, 3))  # combines with DRY and dynamic temperature only
        else:
            kw["top_k"] = int(rng.choice([0, 0, 5, 40, vocab // 2]))
            kw["top_p"] = float(rng.choice([1.0, 1.0, 0.9, 0.6]))
            kw["min_p"] = float(rng.choice([0.0, 0.0, 0.03]))
            kw["typical_p"] = float(rng.choice([1.0, 1.0, 1.0, 0.9]))
            kw["min_keep"] = int(rng.choice([1, 1, 3]))
            kw["eta_cutoff"] = float(rng.choice([0.0, 0.0, 1e-3, 0.03]))
            kw["top_n_sigma"] = float(rng.choice([0.0, 0.0, 0.7, 2.0]))
            if rng.random() < 0.5:
                kw["xtc_probability"] = float(rng.choice([0.5, 1.0]))
                kw["xtc_threshold"] = float(rng.choice([0.01, 0.05, 0.2]))
        if rng.random() < 0.4:
            kw["dynatemp_range"] = float(rng.choice([0.3, 0.8]))
            kw["dynatemp_exponent"] = float(rng.choice([0.5, 1.0, 2.0]))
    if rng.random() < 0.5:
        kw["dry_multiplier"] = float(rng.choice([0.5, 1.5]))
        kw["dry_allowed_length"] = int(rng.integers(0, 3))
        if rng.random() < 0.5:
            kw["dry_sequence_breakers"] = [(int(rng.integers(0, 6)),), (1, 2)]
    if rng.random() < 0.3:
        kw["repetition_penalty"] = 1.2
    mode = rng.choice(["none", "raw", "processed", "final"])
    if mode != "none":
        kw.update(logprobs=True, logprobs_mode=str(mode), top_logprobs=int(rng.integers(0, 4)))
    return SP(**kw)


@pytest.mark.parametrize("vocab,dtype,b", [
    (7, torch.float32, 24),        # one short tile: the small-row head seeding, single-tile draws
    (300, torch.float32, 24),
    (1000, torch.bfloat16, 16),    # bf16 input converted in registers
    (4097, torch.float32, 16),     # two tiles, the second of one id
    (128256, torch.float32, 4),    # a Llama 3 row: 32 tiles, the exact set and mass selection
])
def test_random_rows_against_the_reference(vocab, dtype, b):
    rng = np.random.default_rng(vocab)
    params = [_random_params(rng, vocab, 100 + i) for i in range(b)]
    small = max(2, min(vocab, 6))  # a small alphabet: DRY finds repeats
    prompts = [rng.integers(0, small, int(rng.integers(0, 40))).tolist() for _ in range(b)]
    outputs = [rng.integers(0, small, int(rng.integers(0, 20))).tolist() for _ in range(b)]
    x = torch.from_numpy((rng.standard_normal((b, vocab)) * 2.5).astype(np.float32)).to(dtype)
    for step0 in (0, 11):
        check_exact("cpu", x, params, prompt_token_ids=prompts, output_token_ids=outputs,
                    steps=[step0 + i for i in range(b)])


def test_rows_without_the_rules_are_unchanged_by_neighbours_that_use_them():
    # a plain row gives the same outputs next to rows using every new rule
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.standard_normal((4, 5000)) * 2).astype(np.float32))
    plain = SP(seed=9, top_k=40, top_p=0.9, logprobs=True, logprobs_mode="final", top_logprobs=3)
    ext = SP(seed=9, top_n_sigma=1.0, eta_cutoff=1e-3, xtc_probability=1.0, dynatemp_range=0.5, dry_multiplier=1.0)
    alone = fastsampler.sample(x[1:2], plain, steps=[4], prompt_token_ids=[[1, 2, 1, 2]], backend="cpu")
    mixed = fastsampler.sample(x, [ext, plain, ext, ext], steps=[4] * 4, prompt_token_ids=[[1, 2, 1, 2]] * 4,
                               backend="cpu")
    assert int(mixed.tokens[1]) == int(alone.tokens[0])
    assert torch.equal(mixed.logprobs[1:2], alone.logprobs)
    assert torch.equal(mixed.top_logprob_ids[1:2], alone.top_logprob_ids)


# ------------------------------------------------------------------------------------------------ XTC's coin
def test_xtc_coin_fires_as_the_reference_coin():
    # a row where XTC always changes the kept set: it fires exactly when u = (w0 + 0.5) 2^-32 < p (Philox stream 3),
    # about p of the seeds
    n, p = 600, 0.3
    lq = np.log([0.5, 0.3, 0.15, 0.05]).tolist()
    x = torch.tensor([lq] * n, dtype=torch.float32)
    ps = [SP(seed=int(s) * 7919 + 1, xtc_probability=p, xtc_threshold=0.1) for s in range(n)]
    steps = [s % 17 for s in range(n)]
    fired = fastsampler.sampling_probs(x, ps, steps=steps, backend="cpu").numpy()[:, 0] == 0
    u = np.array([xtc_uniform(q.seed, st, 0) for q, st in zip(ps, steps, strict=True)])
    np.testing.assert_array_equal(fired, u < np.float32(p))
    assert abs(fired.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)


# ------------------------------------------------------------------------------------------------ bad input
def _raw_args(b=2, v=10):
    from fastsampler._batch import pack_param_rows
    from fastsampler.backends.cpu import _C

    f, i = pack_param_rows([SP()] * b)
    args = dict(logits=np.zeros((b, v), np.float32), dtype="float32", vocab_size=v, fparams=f, iparams=i,
                seeds=np.zeros(b, np.int64), steps=np.zeros(b, np.int64), seqs=np.zeros(b, np.int64),
                mirostat_mu=np.full(b, np.nan, np.float32), eos_ids=np.zeros(0, np.int32))
    return _C, args


@pytest.mark.parametrize("col,value,match", [
    ("F_ETA", np.nan, "eta_cutoff of row 1 must be in"),
    ("F_ETA", 1.0, "eta_cutoff of row 1 must be in"),
    ("F_NSIGMA", -1.0, "top_n_sigma of row 1 must be finite"),
    ("F_NSIGMA", np.inf, "top_n_sigma of row 1 must be finite"),
    ("F_XTC_P", 1.5, "xtc_probability of row 1 must be in"),
    ("F_XTC_T", np.nan, "xtc_threshold of row 1 must be in"),
    ("F_DYN_RANGE", -0.1, "dynatemp_range of row 1 must be finite"),
    ("F_DYN_EXP", np.inf, "dynatemp_exponent of row 1 must be finite"),
])
def test_binding_rejects_bad_extended_params(col, value, match):
    from fastsampler import layout

    C, args = _raw_args()
    args["fparams"][1, getattr(layout, col)] = value
    with pytest.raises(ValueError, match=match):
        C.sample(**args)


def test_binding_rejects_dynamic_temperature_on_greedy_rows():
    from fastsampler import layout

    C, args = _raw_args()
    args["fparams"][0, layout.F_TEMPERATURE] = 0.0
    args["fparams"][0, layout.F_DYN_RANGE] = 0.5
    with pytest.raises(ValueError, match="dynatemp_range of row 0 needs a temperature > 0"):
        C.sample(**args)


@pytest.mark.parametrize("change,match", [
    (dict(ring=np.zeros((2, 4), np.int64)), "ring must be int32"),
    (dict(total=np.zeros(3, np.int64)), "total must have shape"),
    (dict(total=np.array([-1, 0], np.int64)), "total must be >= 0"),
    (dict(rows=np.array([2], np.int64)), "rows holds 2"),
    (dict(fd=np.zeros((2, 2), np.float32)), "fd must be float64"),
    (dict(fd=np.array([[1.0, 0.5], [0.0, 1.0]])), "fd of slot 0 must hold"),
    (dict(fd=np.array([[np.nan, 2.0], [0.0, 1.0]])), "fd of slot 0 must hold"),
    (dict(idry=np.array([[-1, -1], [0, 0]], np.int64)), "idry of slot 0 must hold"),
    (dict(breakers=np.array([[[-1, 3]], [[1, -1]]], np.int64)), "left-aligned"),
    (dict(breakers=np.zeros((2, 1), np.int64)), "breakers must have shape"),
])
def test_dry_edits_rejects_bad_input(change, match):
    from fastsampler.backends import cpu

    args = dict(ring=np.zeros((2, 4), np.int32), total=np.array([4, 2], np.int64), rows=np.array([0, 1], np.int64),
                fd=np.array([[1.0, 1.75], [0.0, 1.75]]), idry=np.array([[2, -1], [2, -1]], np.int64),
                breakers=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        cpu._C.dry_edits(**args)
