"""The extended samplers of docs/semantics.md: DRY (§3 C), dynamic temperature (§3 D), eta and top-nσ (§3 E item 3)
and XTC (§3 E item 5).

Each is checked three ways: hand-computed cases on every backend; the reference against an independent
implementation of the rule it follows (llama.cpp's DRY with a Z-function, top-nσ, XTC by position and dynamic
temperature; Hugging Face's eta), on random rows; and every backend against the reference on random batches mixing
the rules per row, with batch invariance, the XTC coin's frequency and a chi-square test of the draw.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler import reference as R
from fastsampler._history import dry_table_torch, ordered_history
from fastsampler.backends.reference.philox import xtc_uniform
from tests.backend_checks import backend_device, backend_params, check_exact, interpreted

SP = SamplingParams


def _probs(backend: str, x: torch.Tensor | np.ndarray, params, **kw) -> np.ndarray:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32)).to(backend_device(backend))
    return fastsampler.sampling_probs(t, params, backend=backend, **kw).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field,bad", [
    ("eta_cutoff", -0.1), ("eta_cutoff", 1.0), ("top_n_sigma", -1.0), ("top_n_sigma", math.inf),
    ("xtc_probability", 1.5), ("xtc_threshold", -0.1), ("dynatemp_range", -0.5), ("dynatemp_exponent", math.nan),
    ("dry_multiplier", -1.0), ("dry_base", 0.5), ("dry_allowed_length", -1), ("dry_penalty_last_n", -2),
])
def test_each_field_is_validated(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        SP(**{field: bad})


def test_validation_rules() -> None:
    with pytest.raises(ValueError, match=r"dynatemp_range=0\.5 needs a temperature > 0"):
        SP(temperature=0.0, dynatemp_range=0.5)
    for kw in ({"eta_cutoff": 0.01}, {"top_n_sigma": 1.0}, {"xtc_probability": 0.5}):
        with pytest.raises(ValueError, match="mirostat_mode=2 replaces truncation"):
            SP(mirostat_mode=2, **kw)
    SP(mirostat_mode=2, xtc_probability=0.5, xtc_threshold=0.6)  # XTC off (threshold > 0.5): no clash
    SP(mirostat_mode=1, dry_multiplier=0.8, dynatemp_range=0.3)  # stage C / D rules combine with Mirostat
    with pytest.raises(ValueError, match=r"dry_sequence_breakers\[0\] must hold 1 to 32"):
        SP(dry_sequence_breakers=[[]])
    with pytest.raises(TypeError, match="dry_sequence_breakers"):
        SP(dry_sequence_breakers="\n")
    assert SP(dry_sequence_breakers=[[1, 2], (3,)]).dry_sequence_breakers == ((1, 2), (3,))
    assert not SP(xtc_probability=0.5, xtc_threshold=0.6).xtc_active and SP(xtc_probability=0.5).xtc_active
    assert not SP(dry_multiplier=1.0, dry_penalty_last_n=0).dry_active
    assert SamplingParams.from_generation_config({"eta_cutoff": 3e-4}).eta_cutoff == 3e-4
    with pytest.raises(ValueError, match="dry_multiplier reads the token history in order: pass output_token_ids"):
        fastsampler.sample(torch.zeros(1, 8), SP(dry_multiplier=1.0),
                           output_counts=torch.zeros(1, 8, dtype=torch.int32))
    # no history at all: nothing to repeat
    out = fastsampler.sample(torch.zeros(1, 8), SP(dry_multiplier=1.0, temperature=0.0))
    assert out.tokens.tolist() == [0]


# ------------------------------------------------------------------------------------------------ hand computations
@pytest.mark.parametrize("backend", backend_params())
def test_dry_hand_computed(backend: str) -> None:
    # docs/semantics.md §3 C: A B C C B C Y A B C with allowed length 1 penalises C by 4, Y by 2 and B by 1
    a, b, c, y = 0, 1, 2, 6
    hist = [a, b, c, c, b, c, y, a, b, c]
    p = SP(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1)
    assert R.dry_penalties(hist, p) == {c: 4.0, y: 2.0, b: 1.0}
    x = np.zeros((1, 8))
    want = np.zeros(8)
    want[[c, y, b]] = [-4.0, -2.0, -1.0]
    np.testing.assert_allclose(R.process_logits(x, p, prompt_token_ids=[hist])[0], want)
    q = np.exp(want) / np.exp(want).sum()
    np.testing.assert_allclose(_probs(backend, x, p, prompt_token_ids=[hist])[0], q, atol=1e-6)
    # the breaker (Y,) limits repeats to the 3 tokens after it (the same here) and Y itself is never penalised
    pb = p.replace(dry_sequence_breakers=[(y,)])
    assert R.dry_penalties(hist, pb) == {c: 4.0, b: 1.0}
    # a multi-token breaker (B C) ending 0 tokens from the end stops every repeat: nothing is penalised
    assert R.dry_penalties(hist, p.replace(dry_sequence_breakers=[(b, c)])) == {}
    # the window: the last 4 tokens (Y A B C) hold no repeat; allowed length 3 needs a repeat of 3 (only C's)
    assert R.dry_penalties(hist, p.replace(dry_penalty_last_n=4)) == {}
    assert R.dry_penalties(hist, p.replace(dry_allowed_length=3)) == {c: 1.0}
    # the exponent clamp: base 2 allows floor(88.72 / ln 2) = 127
    long = [5, 6] * 200
    pen = R.dry_penalties(long, SP(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=2))
    assert pen == {5: 2.0**127}
    # a greedy row sees DRY too (stage C), and the output history counts as the prompt does
    g = SP(temperature=0.0, dry_multiplier=5.0, dry_allowed_length=1)
    x1 = np.array([[0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    out = fastsampler.sample(torch.from_numpy(x1).to(backend_device(backend)), g, prompt_token_ids=[[a, b]],
                             output_token_ids=[[c, a, b]], backend=backend)
    assert int(out.tokens[0]) == 0  # c (logit 1) would extend "a b c": penalised by 5 * 1.75^1


@pytest.mark.parametrize("backend", backend_params())
def test_top_n_sigma_and_eta_hand_computed(backend: str) -> None:
    z = np.array([[3.0, 2.0, 0.0, -1.0]])
    # sigma = 1.5811: nu = 1 keeps z >= 1.419 (two tokens), at any temperature
    for t in (1.0, 0.5, 2.0):
        assert (_probs(backend, z, SP(top_n_sigma=1.0, temperature=t))[0] > 0).tolist() == [True, True, False, False]
    assert int((_probs(backend, z, SP(top_n_sigma=3.0))[0] > 0).sum()) == 4
    assert int((_probs(backend, z, SP(top_n_sigma=0.1, min_keep=3))[0] > 0).sum()) == 3
    q = np.log(np.array([[0.5, 0.3, 0.2]]))
    # H = 1.0297: eta 0.2 and 0.3 keep all three (thresholds 0.160, 0.196), eta 0.5 two (0.253)
    for eta, kept in ((0.2, 3), (0.3, 3), (0.5, 2), (0.9, 1)):
        assert int((_probs(backend, q, SP(eta_cutoff=eta))[0] > 0).sum()) == kept, eta
    # with min-p in the same stage the larger threshold wins
    assert int((_probs(backend, q, SP(eta_cutoff=0.2, min_p=0.7))[0] > 0).sum()) == 1


@pytest.mark.parametrize("backend", backend_params())
def test_xtc_hand_computed(backend: str) -> None:
    q = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    # it acts: A = the three with q >= 0.1, the kept set is the last two
    np.testing.assert_allclose(_probs(backend, q, SP(xtc_probability=1.0, xtc_threshold=0.1, seed=3))[0],
                               [0.0, 0.0, 0.75, 0.25], atol=1e-6)
    # one top choice only (q >= 0.4): nothing removed; min_keep = 3 cannot be met: nothing removed
    for kw in ({"xtc_threshold": 0.4}, {"xtc_threshold": 0.1, "min_keep": 3}):
        p = _probs(backend, q, SP(xtc_probability=1.0, seed=3, **kw))[0]
        np.testing.assert_allclose(p, np.exp(q[0]), atol=1e-6)
    # threshold above 0.5: off; tied top choices stay together
    p = _probs(backend, q, SP(xtc_probability=1.0, xtc_threshold=0.6, seed=3))[0]
    np.testing.assert_allclose(p, np.exp(q[0]), atol=1e-6)
    tied = np.log(np.array([[0.4, 0.4, 0.15, 0.05]]))
    np.testing.assert_allclose(_probs(backend, tied, SP(xtc_probability=1.0, xtc_threshold=0.3, seed=3))[0],
                               np.exp(tied[0]), atol=1e-6)
    # after top-k = 3, q renormalised over the three: 0.526, 0.316, 0.158; theta 0.2 keeps the last two
    p = _probs(backend, q, SP(xtc_probability=1.0, xtc_threshold=0.2, top_k=3, seed=3))[0]
    np.testing.assert_allclose(p, [0.0, 0.3 / 0.45, 0.15 / 0.45, 0.0], atol=1e-6)
    # the coin: u = (w0 + 0.5) 2^-32 of Philox stream 3; XTC acts exactly when u < p
    p_half = SP(xtc_probability=0.5, xtc_threshold=0.1, seed=11)
    for step in range(8):
        acts = xtc_uniform(11, step, 0) < 0.5
        got = _probs(backend, q, p_half, steps=[step])[0]
        assert (got[0] == 0.0) == acts, step


@pytest.mark.parametrize("backend", backend_params())
def test_dynamic_temperature_hand_computed(backend: str) -> None:
    l = np.array([[2.0, 1.0, 0.0, -1.0, -30.0]])
    q = np.exp(l[0] - l[0].max())
    q /= q.sum()
    h = -(q * np.log(q)).sum()
    for t, delta, kappa in ((1.0, 0.5, 1.0), (0.8, 1.0, 2.0), (0.3, 0.5, 0.5), (1.2, 0.2, 0.0)):
        t_min, t_max = max(0.0, t - delta), t + delta
        t_dyn = t_min + (t_max - t_min) * (h / math.log(5)) ** kappa
        p = SP(temperature=t, dynatemp_range=delta, dynatemp_exponent=kappa)
        np.testing.assert_allclose(R.process_logits(l, p)[0], l[0] / np.float32(t), rtol=1e-6)  # (stage D: T)
        want = np.exp(l[0] / t_dyn - (l[0] / t_dyn).max())
        np.testing.assert_allclose(_probs(backend, l, p)[0], want / want.sum(), atol=1e-6)
    # the docs' example: the kept set l = (2, 1, 0) after top-k 3 gives T' = 1.2577
    k3 = np.array([[2.0, 1.0, 0.0, -1.0, -2.0]])
    want = np.exp(k3[0, :3] / 1.2576791106615821)
    np.testing.assert_allclose(_probs(backend, k3, SP(top_k=3, dynatemp_range=0.5))[0][:3], want / want.sum(),
                               atol=1e-6)
    # one kept token: T' = T; masked tokens are not in the kept set
    one = np.array([[1.0, -np.inf, -np.inf]])
    assert _probs(backend, one, SP(temperature=0.7, dynatemp_range=0.5))[0].tolist() == [1.0, 0.0, 0.0]
    m = SP(temperature=1.0, dynatemp_range=0.5, banned_token_ids=[4])
    q4 = q[:4] / q[:4].sum()
    h4 = -(q4 * np.log(q4)).sum()
    t4 = 0.5 + 1.0 * h4 / math.log(4)
    want = np.exp(l[0][:4] / t4 - (l[0][:4] / t4).max())
    np.testing.assert_allclose(_probs(backend, l, m)[0][:4], want / want.sum(), atol=1e-6)
    # truncation runs at the base temperature: min-p 0.3 at T = 0.5 keeps z >= max + ln 0.3 on z = l / 0.5
    mp = SP(temperature=0.5, min_p=0.3, dynatemp_range=0.4)
    kept = _probs(backend, l, mp)[0] > 0
    assert kept.tolist() == (l[0] / 0.5 >= l[0].max() / 0.5 + math.log(np.float32(0.3))).tolist()


# ------------------------------------------------------------------------------------ independent implementations
def llama_dry(window: list[int], mult: float, base: float, allowed: int, breakers: list[tuple[int, ...]]
              ) -> dict[int, float]:
    """llama.cpp's DRY rule, written independently: a Z-function over the reversed window for the repeat lengths."""
    n = len(window)
    if mult == 0.0 or n <= allowed:
        return {}
    rev = window[::-1]  # rev[i]: i tokens back from the newest
    limit = n
    for i in range(n):
        lens = [len(b) - 1 for b in breakers if len(b) - 1 <= i and rev[i] == b[0]
                and all(rev[i - j] == b[j] for j in range(1, len(b)))]
        if lens:
            limit = i - max(lens)
            break
    if limit < allowed:
        return {}
    zf = [0] * n  # Z-function of rev: zf[k] = common prefix of rev and rev[k:]
    lo = hi = 0
    for k in range(1, n):
        if k < hi:
            zf[k] = min(hi - k, zf[k - lo])
        while k + zf[k] < n and rev[zf[k]] == rev[k + zf[k]]:
            zf[k] += 1
        if k + zf[k] > hi:
            lo, hi = k, k + zf[k]
    best: dict[int, int] = {}
    for k in range(1, n):  # the suffix ending k tokens back repeats zf[k] tokens; the token after it extends it
        length = min(zf[k], limit)
        if length >= allowed:
            tok = window[n - k]
            best[tok] = max(best.get(tok, 0), length)
    single = {b[0] for b in breakers if len(b) == 1}
    emax = int(88.7228391 / math.log(base)) if base > 1.000001 else None
    out = {}
    for tok, length in best.items():
        if tok in single:
            continue
        e = length - allowed
        out[tok] = mult * base ** (min(e, emax) if emax is not None else e)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_dry_matches_the_independent_rule_and_the_tables(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(0, 60))
        alphabet = int(rng.integers(2, 6))
        hist = [int(t) for t in rng.integers(0, alphabet, n)]
        breakers = [tuple(int(t) for t in rng.integers(0, alphabet + 2, int(rng.integers(1, 4))))
                    for _ in range(int(rng.integers(0, 3)))]
        p = SP(dry_multiplier=float(rng.choice([0.5, 1.0, 2.0])), dry_base=float(rng.choice([1.0, 1.5, 1.75, 3.0])),
               dry_allowed_length=int(rng.integers(0, 4)), dry_penalty_last_n=int(rng.choice([-1, 5, 20, 100])),
               dry_sequence_breakers=breakers or None)
        window = hist if p.dry_penalty_last_n < 0 else hist[max(0, n - p.dry_penalty_last_n):]
        want = llama_dry(window, p.dry_multiplier, p.dry_base, p.dry_allowed_length, breakers)
        got = R.dry_penalties(hist, p)
        assert got.keys() == want.keys(), (hist, p)
        for t in got:
            assert got[t] == pytest.approx(want[t], rel=1e-12)
        # the packed table the backends read (torch here; the C++ extension's where it builds it)
        ring = torch.tensor([hist or [0]], dtype=torch.int32)
        seq = ordered_history(ring, torch.tensor([n]))
        fd = torch.tensor([[p.dry_multiplier, p.dry_base]], dtype=torch.float64)
        idry = torch.tensor([[p.dry_allowed_length, p.dry_penalty_last_n]])
        from fastsampler._history import breakers_table

        brk = torch.from_numpy(breakers_table(breakers, len(breakers), max(map(len, breakers)))[None]) \
            if breakers else None
        ids, vals = dry_table_torch(seq, fd, idry, brk)
        table = {int(i): float(v) for i, v in zip(ids[0], vals[0], strict=True) if i != 2**31 - 1}
        assert table.keys() == want.keys()
        for t in table:
            assert table[t] == float(np.float32(want[t]))


def llama_top_n_sigma_keep(logits: np.ndarray, nsig: float) -> np.ndarray:
    fin = np.isfinite(logits)
    mean = logits[fin].sum() / fin.sum()
    std = math.sqrt(((logits[fin] - mean) ** 2).sum() / fin.sum())
    return fin & (logits >= logits[fin].max() - nsig * std)


def hf_eta_keep(scores: np.ndarray, eta: float, min_keep: int) -> np.ndarray:
    """Hugging Face's eta rule, written independently (the whole distribution of ``scores``)."""
    t = torch.from_numpy(scores)
    probs = t.softmax(-1)
    entropy = torch.distributions.Categorical(logits=t).entropy()
    cut = min(eta, math.sqrt(eta) * math.exp(-float(entropy)))
    drop = probs < cut
    top = torch.topk(t, min_keep).indices
    drop[top] = False
    return (~drop).numpy()


def llama_xtc_keep(logits: np.ndarray, threshold: float, min_keep: int) -> np.ndarray:
    """llama.cpp's XTC once its coin fired: over the candidates sorted by probability, drop every token before the
    last one at or above the threshold (when there are two or more and min_keep remain)."""
    order = np.argsort(-logits, kind="stable")
    p = np.exp(logits[order] - logits.max())
    p /= p.sum()
    last = 0
    for i in range(len(p)):
        if p[i] >= threshold:
            last = i
        else:
            break
    keep = np.ones(len(p), dtype=bool)
    if len(p) - last >= min_keep and last > 0:
        keep[order[:last]] = False
    return keep


def llama_dynatemp_probs(logits: np.ndarray, temp: float, delta: float, exponent: float) -> np.ndarray:
    """llama.cpp's temp_ext applied first in the chain, over the finite candidates."""
    fin = logits[np.isfinite(logits)]
    p = np.exp(fin - fin.max())
    p /= p.sum()
    ent = -(p[p > 0] * np.log(p[p > 0])).sum()
    t_min, t_max = max(0.0, temp - delta), temp + delta
    t = t_min + (t_max - t_min) * (ent / math.log(fin.size)) ** exponent
    z = logits / t
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


@pytest.mark.parametrize("seed", range(6))
def test_rules_match_the_independent_implementations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((10, 300)) * rng.uniform(0.5, 4.0)
    x[rng.random(x.shape) < 0.05] = -np.inf
    for r in range(10):
        row = x[r:r + 1]
        nsig = float(np.float32(rng.uniform(0.2, 3.0)))
        t = float(np.float32(rng.uniform(0.3, 2.0)))
        np.testing.assert_array_equal(R.sampling_probs(row, SP(top_n_sigma=nsig, temperature=t))[0] > 0,
                                      llama_top_n_sigma_keep(row[0], nsig))
        eta = float(np.float32(rng.choice([1e-4, 1e-3, 0.01, 0.1])))
        mk = int(rng.integers(1, 4))
        np.testing.assert_array_equal(R.sampling_probs(row, SP(eta_cutoff=eta, min_keep=mk))[0] > 0,
                                      hf_eta_keep(row[0], eta, mk))
        theta = float(np.float32(rng.uniform(0.0, 0.3)))
        finite = np.isfinite(row[0])
        got = R.sampling_probs(row, SP(xtc_probability=1.0, xtc_threshold=theta, min_keep=mk))[0] > 0
        want = llama_xtc_keep(row[0][finite], theta, mk)
        np.testing.assert_array_equal(got[finite], want)
        tt, dl, ex = (float(np.float32(v)) for v in (rng.uniform(0.5, 1.5), rng.uniform(0.05, 1.0),
                                                     rng.uniform(0.0, 2.0)))
        np.testing.assert_allclose(R.sampling_probs(row, SP(temperature=tt, dynatemp_range=dl,
                                                            dynatemp_exponent=ex))[0],
                                   llama_dynatemp_probs(row[0], tt, dl, ex), atol=1e-12)


# --------------------------------------------------------------------------------------------- against the reference
def extended_params(seed: int, vocab: int) -> list[SamplingParams]:
    """Rows mixing the extended rules with each other and with the other rules."""
    return [
        SP(seed=seed, top_n_sigma=1.5, logprobs=True, top_logprobs=3),
        SP(seed=seed + 1, eta_cutoff=3e-3, top_k=50, logprobs=True, logprobs_mode="final", top_logprobs=2),
        SP(seed=seed + 2, xtc_probability=1.0, xtc_threshold=0.02, top_p=0.95, logprobs=True,
           logprobs_mode="final"),
        SP(seed=seed + 3, xtc_probability=0.5, xtc_threshold=0.05, min_p=0.02, min_keep=2),
        SP(seed=seed + 4, temperature=0.8, dynatemp_range=0.5, dynatemp_exponent=1.5, top_k=40, logprobs=True,
           logprobs_mode="processed", top_logprobs=2),
        SP(seed=seed + 5, dry_multiplier=0.8, dry_allowed_length=2, dry_sequence_breakers=[(7,)], top_p=0.9,
           repetition_penalty=1.2, frequency_penalty=0.3),
        SP(seed=seed + 6, top_n_sigma=2.0, eta_cutoff=1e-3, typical_p=0.9, xtc_probability=1.0,
           xtc_threshold=0.01, dynatemp_range=0.3, dry_multiplier=1.0, logprobs=True),
        SP(seed=seed + 7, temperature=0.0, dry_multiplier=2.0, dry_allowed_length=1, logprobs=True,
           top_logprobs=2),
        SP(seed=seed + 8, mirostat_mode=2, dry_multiplier=0.5, dynatemp_range=0.4, logprobs=True,
           logprobs_mode="final"),
        SP(seed=seed + 9, top_n_sigma=0.5, epsilon_cutoff=1e-3, top_k=vocab // 3, min_keep=3),
    ]


def _histories(rng: np.random.Generator, b: int, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    small = max(2, min(vocab, 9))
    prompts = [[int(t) for t in rng.integers(0, small, int(rng.integers(0, 30)))] for _ in range(b)]
    outputs = [[int(t) for t in rng.integers(0, small, int(rng.integers(0, 20)))] for _ in range(b)]
    return prompts, outputs


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("vocab,dtype", [(300, torch.float32), (4097, torch.float32), (1000, torch.bfloat16)])
def test_exact_against_the_reference(backend: str, vocab: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(vocab)
    params = extended_params(17, vocab)
    b = len(params)
    x = torch.from_numpy((rng.standard_normal((b, vocab)) * 2.5).astype(np.float32)).to(dtype)
    prompts, outputs = _histories(rng, b, vocab)
    for step0 in (0, 7):
        check_exact(backend, x.to(backend_device(backend)), params, prompt_token_ids=prompts,
                    output_token_ids=outputs, steps=[step0 + i for i in range(b)])


@pytest.mark.parametrize("backend", backend_params())
def test_batch_invariance(backend: str) -> None:
    vocab = 4097
    rng = np.random.default_rng(5)
    target = SP(seed=77, top_n_sigma=2.0, eta_cutoff=1e-3, xtc_probability=1.0, xtc_threshold=0.01,
                dynatemp_range=0.4, dry_multiplier=1.0, dry_allowed_length=1, top_k=200, logprobs=True,
                top_logprobs=4)
    others = extended_params(3, vocab)
    dev = backend_device(backend)
    row = torch.from_numpy((rng.standard_normal((1, vocab)) * 2.0).astype(np.float32)).to(dev)
    hist = [1, 2, 3, 1, 2, 3, 1, 2]
    alone = fastsampler.sample(row, target, prompt_token_ids=[hist], steps=[5], backend=backend)
    for size, pos in [(2, 0), (3, 2), (6, 3)]:
        batch = torch.from_numpy((rng.standard_normal((size, vocab)) * 2.0).astype(np.float32)).to(dev)
        batch[pos] = row[0]
        params = [others[i % len(others)] for i in range(size)]
        params[pos] = target
        prompts = [[4, 5, 4, 5]] * size
        prompts[pos] = hist
        steps = [11] * size
        steps[pos] = 5
        out = fastsampler.sample(batch, params, prompt_token_ids=prompts, steps=steps, backend=backend)
        assert int(out.tokens[pos]) == int(alone.tokens[0])
        assert int(out.ranks[pos]) == int(alone.ranks[0])
        assert torch.equal(out.top_logprob_ids[pos].cpu(), alone.top_logprob_ids[0].cpu())
        torch.testing.assert_close(out.logprobs[pos].cpu(), alone.logprobs[0].cpu(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------- the stochastic
@pytest.mark.parametrize("backend", backend_params())
def test_xtc_coin_frequency_and_draw_distribution(backend: str) -> None:
    """XTC acts in a fraction ``p`` of the steps, and the token follows the mixture of the two distributions it
    implies: (1 - p) q + p q_xtc (chi-square over many seeds, V = 5)."""
    q = np.array([0.45, 0.3, 0.15, 0.07, 0.03])
    n = 300 if interpreted(backend) else 2000  # (rows of the Triton interpreter are slow)
    x = torch.from_numpy(np.log(q).astype(np.float32))[None].repeat(n, 1).to(backend_device(backend))
    prob = float(np.float32(0.3))
    params = [SP(seed=s, xtc_probability=prob, xtc_threshold=0.1) for s in range(n)]
    out = fastsampler.sample(x, params, backend=backend)
    coins = np.array([xtc_uniform(s, 0, 0) < prob for s in range(n)])
    assert abs(coins.mean() - prob) < 4 * math.sqrt(prob * (1 - prob) / n)  # the coin itself
    toks = out.tokens.cpu().numpy()
    assert (toks[coins] >= 2).all()  # when it acts, the three top choices but the least likely are gone
    q_xtc = np.array([0.0, 0.0, 0.15, 0.07, 0.03]) / 0.25
    expect = n * ((1 - prob) * q + prob * q_xtc)
    counts = np.bincount(toks, minlength=5)
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 18.5, (counts, expect)  # chi-square, 4 degrees of freedom: p = 0.001


@pytest.mark.parametrize("backend", backend_params())
def test_draw_follows_the_distribution(backend: str) -> None:
    """With top-nσ, eta, dynamic temperature and DRY the token follows `sampling_probs` (chi-square, 3000 seeds)."""
    x = np.array([2.0, 1.6, 1.0, 0.5, 0.0, -0.5, -3.0, -6.0], dtype=np.float32)
    p = dict(top_n_sigma=1.2, eta_cutoff=0.02, dynatemp_range=0.4, dry_multiplier=0.5, dry_allowed_length=1)
    hist = [[0, 1, 0]]
    want = R.sampling_probs(x[None], SP(**p), prompt_token_ids=hist)[0]
    n = 300 if interpreted(backend) else 3000  # (rows of the Triton interpreter are slow)
    xs = torch.from_numpy(x)[None].repeat(n, 1).to(backend_device(backend))
    out = fastsampler.sample(xs, [SP(seed=s, **p) for s in range(n)], prompt_token_ids=hist * n, backend=backend)
    counts = np.bincount(out.tokens.cpu().numpy(), minlength=8)
    keep = want > 0
    assert counts[~keep].sum() == 0
    expect = n * want[keep]
    chi2 = float(((counts[keep] - expect) ** 2 / expect).sum())
    assert chi2 < 3 * keep.sum() + 10, (counts, expect)


# ------------------------------------------------------------------------------------------------------- Sampler
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tensor_slots", [False, True])
def test_sampler_steps_match_the_reference(backend: str, tensor_slots: bool) -> None:
    """A Sampler keeps the history for DRY in its ring: every step equals the reference given the whole history."""
    vocab = 60
    dev = backend_device(backend)
    s = fastsampler.Sampler(vocab_size=vocab, max_slots=4, backend=backend, history_len=32, device=dev)
    reqs = [SP(seed=5, dry_multiplier=3.0, dry_base=1.5, dry_allowed_length=1, dry_sequence_breakers=[(9,)]),
            SP(seed=6, dry_multiplier=1.0, dry_penalty_last_n=12, top_n_sigma=1.0, xtc_probability=0.5,
               xtc_threshold=0.05, dynatemp_range=0.5)]
    prompts = [[1, 2, 3, 1, 2, 3, 4, 1, 2], [5, 5, 6, 5, 5]]
    slots = [s.add(p, pr)[0] for p, pr in zip(reqs, prompts, strict=True)]
    outs: list[list[int]] = [[], []]
    rng = np.random.default_rng(1)
    for step in range(14):
        # peaked on the repeated ids, so DRY changes the tokens
        x = rng.standard_normal((2, vocab)).astype(np.float32)
        x[:, :7] += 3.0
        xt = torch.from_numpy(x).to(dev)
        out = s.sample(xt, torch.tensor(slots, device=dev) if tensor_slots else slots)
        ref = R.sample(x, reqs, prompt_token_ids=prompts, output_token_ids=outs, steps=[step, step])
        assert out.tokens.cpu().tolist() == ref.tokens.tolist(), step
        for r in range(2):
            outs[r].append(int(ref.tokens[r]))
    assert any(t in (1, 2, 3) for t in outs[0])  # (the run exercised the history)


def test_sampler_refuses_dry_without_enough_history() -> None:
    s = fastsampler.Sampler(vocab_size=10, max_slots=1, backend="reference")
    with pytest.raises(ValueError, match="history_len=0"):
        s.add(SP(dry_multiplier=1.0))
    s = fastsampler.Sampler(vocab_size=10, max_slots=1, backend="reference", history_len=8)
    with pytest.raises(ValueError, match="dry_penalty_last_n=16"):
        s.add(SP(dry_multiplier=1.0, dry_penalty_last_n=16))
    with pytest.raises(ValueError, match="dry_sequence_breakers"):
        s.add(SP(dry_multiplier=1.0, dry_sequence_breakers=[(12,)]))
    s.add(SP(dry_multiplier=1.0, dry_penalty_last_n=8))


def test_verify_match_with_dry_equals_stepping() -> None:
    """Speculative verification (match) sees the history grow by each emitted token, as stepping does."""
    vocab = 20
    p = SP(seed=9, dry_multiplier=4.0, dry_allowed_length=1, top_k=5)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, vocab)).astype(np.float32)
    x[..., :4] += 4.0
    a = fastsampler.Sampler(vocab_size=vocab, max_slots=1, backend="cpu", history_len=16)
    b = fastsampler.Sampler(vocab_size=vocab, max_slots=1, backend="cpu", history_len=16)
    sa, sb = a.add(p, [1, 2, 3, 1, 2])[0], b.add(p, [1, 2, 3, 1, 2])[0]
    stepped = [int(b.sample(torch.from_numpy(x[:, j]), [sb]).tokens[0]) for j in range(5)]
    out = a.verify(torch.from_numpy(x), [stepped[:4]], [sa])
    assert out.tokens[0].tolist() == stepped and a.step_of(sa) == 5


def test_score_processed_sees_dry_and_the_base_temperature() -> None:
    x = torch.zeros(2, 6)
    p = SP(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1)
    out = fastsampler.score(x, [2, 2], logprobs_mode="processed", params=p, prompt_token_ids=[[1, 2, 1], [3, 4]],
                            extra_token_ids=[[2, 0], [2, 0]], backend="cpu")
    want = R.process_logits(x.numpy(), p, prompt_token_ids=[[1, 2, 1], [3, 4]])
    lp = want - np.log(np.exp(want).sum(1, keepdims=True))
    np.testing.assert_allclose(out.extra_logprobs.numpy(), lp[:, [2, 0]], atol=1e-6)
    np.testing.assert_allclose(out.logprobs.numpy(), lp[:, 2], atol=1e-6)
    # processed logprobs are at the base temperature: a dynamic one acts on the kept set only (§3 E)
    y = torch.tensor([[0.0, 1.0, 2.0]])
    out = fastsampler.score(y, [2], logprobs_mode="processed", params=SP(temperature=0.5, dynatemp_range=0.4),
                            extra_token_ids=[[0]], backend="cpu")
    lp = torch.log_softmax(y / 0.5, -1)[0]
    np.testing.assert_allclose([float(out.logprobs[0]), float(out.extra_logprobs[0, 0])], [lp[2], lp[0]], atol=1e-6)
