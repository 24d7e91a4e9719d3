"""The Triton backend's extended samplers (docs/semantics.md §3 C DRY, §3 E: top-n-sigma (item 3), eta over the
survivors (item 5), XTC (item 6), and the dynamic temperature of the kept set after the rules) on each of its paths:
the select path (a radix select per rule, `select`), the candidate engine (`candidates`: top-k rows on a buffer of
candidates) and its exact fallback (a buffer too small: ``FASTSAMPLER_TRITON_CANDIDATES=16``), and a batch without
truncation (DRY and dynamic temperature alone). Small chunks (``FASTSAMPLER_TRITON_CHUNK``) split a row over several
programs, so the chunk partials of the new statistics are merged. Hand cases from docs/semantics.md, random mixes
against the reference (tests/backend_checks.py), bitwise batch invariance, and the Sampler's slot-indexed step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import reference as R
from tests.backend_checks import check_exact, slow_in_interpreter, unavailable

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(bool(unavailable("triton")), reason=unavailable("triton") or "triton unavailable"),
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                               "ignore:overflow:RuntimeWarning"),
]

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# path name -> environment knobs (the path itself also depends on the rows' rules, see each test)
PATHS = {
    "chunks": {"FASTSAMPLER_TRITON_CHUNK": "64"},  # several programs per row: the partials are merged
    "one_chunk": {"FASTSAMPLER_TRITON_CHUNK": "4096"},
    "fallback": {"FASTSAMPLER_TRITON_CHUNK": "128", "FASTSAMPLER_TRITON_CANDIDATES": "16"},
}


@pytest.fixture(params=list(PATHS))
def knobs(request, monkeypatch):
    for k, v in PATHS[request.param].items():
        monkeypatch.setenv(k, v)
    return request.param


def _probs(x, params, **kw) -> np.ndarray:
    return fastsampler.sampling_probs(torch.as_tensor(x, dtype=torch.float32)[None].to(DEV), params,
                                      backend="triton", **kw).cpu().numpy()[0]


# ----------------------------------------------------------------------------------------------------- hand cases
@pytest.mark.parametrize("top_k", [0, 3, 4])  # select path; candidate engine (fast); candidate batch, top-k inactive
def test_eta_and_top_n_sigma_hand_computed(knobs, top_k: int) -> None:
    # q = (0.5, 0.3, 0.2), H = 1.0297: eta 0.2 and 0.3 keep all three, 0.5 keeps two (§3 E item 5)
    x = np.log([0.5, 0.3, 0.2, 1e-6])
    for eta, kept in ((0.2, 3), (0.3, 3), (0.5, 2)):
        p = _probs(x, SP(eta_cutoff=eta, top_k=top_k))
        assert int((p > 0).sum()) == min(kept, top_k or 4), (eta, p)
    # z = (3, 2, 0, -1): sigma = 1.5811, nu = 1 keeps z >= 1.419: two; min_keep raises it; min-p together wins
    z = np.array([3.0, 2.0, 0.0, -1.0])
    assert int((_probs(z, SP(top_n_sigma=1.0, top_k=top_k)) > 0).sum()) == 2
    assert int((_probs(z, SP(top_n_sigma=1.0, min_keep=3, top_k=top_k)) > 0).sum()) == min(3, top_k or 4)
    assert int((_probs(z, SP(top_n_sigma=3.0, min_p=0.3, top_k=top_k)) > 0).sum()) == 2
    # temperature-invariant
    assert int((_probs(z, SP(top_n_sigma=1.0, temperature=0.3, top_k=top_k)) > 0).sum()) == 2


@pytest.mark.parametrize("extra", [{"top_k": 2}, {"top_p": 0.75}])  # candidate engine; select path
def test_eta_acts_on_the_survivors(knobs, extra: dict) -> None:
    # top-k 2 / top-p 0.75 leave S = (0.5, 0.3): q_S = (0.625, 0.375), H_S = 0.6616; eta 0.8 keeps
    # q_S >= min(0.8, sqrt(0.8) e^-0.6616 = 0.4614): the first alone (over the whole row, H = 1.0297 would have kept
    # both); min_keep 2 lowers it to the second survivor
    x = np.log([0.5, 0.3, 0.2, 1e-6])
    p = _probs(x, SP(eta_cutoff=0.8, seed=1, **extra))
    np.testing.assert_allclose(p, [1.0, 0.0, 0.0, 0.0], atol=1e-6)
    p = _probs(x, SP(eta_cutoff=0.8, min_keep=2, seed=1, **extra))
    np.testing.assert_allclose(p, [0.625, 0.375, 0.0, 0.0], atol=1e-6)
    # eta 0.3 on S: min(0.3, 0.548 * 0.516 = 0.283): both survive
    p = _probs(x, SP(eta_cutoff=0.3, seed=1, **extra))
    np.testing.assert_allclose(p, [0.625, 0.375, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("extra", [{}, {"top_k": 4}, {"top_k": 5}, {"typical_p": 0.999}])
def test_xtc_hand_computed(knobs, extra: dict) -> None:
    # q = (0.5, 0.3, 0.15, 0.05), theta = 0.1: A holds the first three, the last two are kept, 0.15 : 0.05 (§3 E 5)
    x = np.log([0.5, 0.3, 0.15, 0.05])
    p = _probs(x, SP(xtc_probability=1.0, xtc_threshold=0.1, seed=3, **extra))
    np.testing.assert_allclose(p, [0.0, 0.0, 0.75, 0.25], atol=1e-6)
    # min_keep 3: removing the top two would leave two: nothing is removed
    p = _probs(x, SP(xtc_probability=1.0, xtc_threshold=0.1, min_keep=3, seed=3, **extra))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.05], atol=1e-6)
    # a single top choice (|A| = 1): nothing removed; theta above 0.5: off
    p = _probs(x, SP(xtc_probability=1.0, xtc_threshold=0.4, seed=3, **extra))
    np.testing.assert_allclose(p, [0.5, 0.3, 0.15, 0.05], atol=1e-6)
    # the kept set of the earlier rules is S: top-k 3 keeps (0.5, 0.3, 0.15) and XTC keeps the last of them
    if "top_k" in extra:
        p = _probs(x, SP(xtc_probability=1.0, xtc_threshold=0.1, top_k=3, seed=3))
        np.testing.assert_allclose(p, [0.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_xtc_coin_decides(knobs) -> None:
    """The coin of every seed equals the reference's: with p = 0.5 the rows that act are exactly those with
    u < p, and the kept mask says so."""
    x = torch.from_numpy(np.log([0.5, 0.3, 0.15, 0.05]).astype(np.float32))[None].repeat(24, 1).to(DEV)
    params = [SP(seed=s, xtc_probability=0.5, xtc_threshold=0.1) for s in range(24)]
    steps = list(range(24))
    got = fastsampler.sampling_probs(x, params, backend="triton", steps=steps).cpu().numpy()
    want = R.sampling_probs(x.cpu().numpy(), params, steps=steps)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0 < int((got[:, 0] == 0).sum()) < 24  # some rows acted, some did not


def test_dry_hand_computed(knobs) -> None:
    # w = (A B C C B C Y A B C), a = 1, mu = 1, b = 2: C loses 4, Y 2, B 1 (§3 C); a greedy row sees it too
    a, b, c, y = 1, 2, 3, 4
    hist = [[a, b, c, c, b, c, y, a, b, c]]
    x = np.zeros(6, dtype=np.float32)
    p = _probs(x, SP(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1), prompt_token_ids=hist)
    w = np.exp([0.0, 0.0, -1.0, -4.0, -2.0, 0.0])
    np.testing.assert_allclose(p, w / w.sum(), atol=1e-6)
    # with the breaker (Y,): the same penalties except Y's own
    p = _probs(x, SP(dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1, dry_sequence_breakers=[(y,)]),
               prompt_token_ids=hist)
    w = np.exp([0.0, 0.0, -1.0, -4.0, 0.0, 0.0])
    np.testing.assert_allclose(p, w / w.sum(), atol=1e-6)
    g = torch.tensor([[0.0, 0.5, 1.0, 3.5, 0.2, 0.4]], device=DEV)
    out = fastsampler.sample(g, SP(temperature=0.0, dry_multiplier=1.0, dry_base=2.0, dry_allowed_length=1),
                             prompt_token_ids=hist, backend="triton")
    assert int(out.tokens[0]) == 1  # C (3.5 - 4) and B (1.0 - 1) fall below id 1's 0.5


def _dyn_expected(x: np.ndarray, kept: np.ndarray, t: float, d: float, kappa: float) -> np.ndarray:
    """Final logprobs of a dynamic-temperature row whose kept set is ``kept``: T' from the entropy of softmax(x) over
    it (temperature 1), then log_softmax(x / T') on it, -inf elsewhere (§3 E, dynamic temperature)."""
    xs = x[kept].astype(np.float64)
    q = np.exp(xs - xs.max())
    q /= q.sum()
    h = -(q * np.log(q)).sum()
    tdyn = max(t - d, 0.0) + 2 * d * (h / math.log(kept.sum())) ** kappa
    z = np.where(kept, x.astype(np.float64) / tdyn, -np.inf)
    zk = z[kept]
    return np.where(kept, z - zk.max() - np.log(np.exp(zk - zk.max()).sum()), -np.inf)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("rule", ["none", "top_k", "min_p"])  # plain path; candidate engine; select path
def test_dynamic_temperature_hand_computed(knobs, kappa: float, rule: str) -> None:
    """T' from the entropy of the kept set at temperature 1, after the rules (which run at the base T): final
    logprobs and sampling_probs at l / T' on the kept set, processed logprobs at l / T."""
    rng = np.random.default_rng(int(kappa * 10))
    x = (rng.standard_normal(300) * 2).astype(np.float32)
    x[250:] = -np.inf
    t, d = 0.8, 0.5
    extra = {"none": {}, "top_k": {"top_k": 20}, "min_p": {"min_p": 0.05}}[rule]
    z = x.astype(np.float64) / np.float32(t)
    if rule == "none":
        kept = np.isfinite(x)
    elif rule == "top_k":
        kept = x >= np.sort(x)[::-1][19]
    else:
        kept = np.isfinite(z) & (z >= z[:250].max() + math.log(np.float32(0.05)))
    want = _dyn_expected(x, kept, t, d, kappa)
    p = SP(seed=1, temperature=t, dynatemp_range=d, dynatemp_exponent=kappa, logprobs=True, top_logprobs=3,
           logprobs_mode="final", **extra)
    xt = torch.from_numpy(x)[None].to(DEV)
    out = fastsampler.sample(xt, p, steps=[0], backend="triton")
    tok = int(out.tokens[0])
    assert kept[tok]
    assert abs(float(out.logprobs[0]) - want[tok]) < 1e-5
    np.testing.assert_allclose(out.top_logprobs[0].cpu().numpy(), np.sort(want[kept])[::-1][:3], atol=1e-5)
    probs = _probs(x, p)
    np.testing.assert_allclose(probs, np.exp(want), atol=1e-6)
    assert ((probs > 0) == kept).all()
    # processed logprobs keep the base temperature
    lp = z - z[:250].max() - np.log(np.exp(z[:250] - z[:250].max()).sum())
    out = fastsampler.sample(xt, p.replace(logprobs_mode="processed"), steps=[0], backend="triton")
    assert abs(float(out.logprobs[0]) - lp[int(out.tokens[0])]) < 1e-5
    np.testing.assert_allclose(out.top_logprobs[0].cpu().numpy(), np.sort(lp[:250])[::-1][:3], atol=1e-5)
    # one kept token: T' = T (and the row is valid)
    one = np.full(8, -np.inf, dtype=np.float32)
    one[5] = 2.0
    out = fastsampler.sample(torch.from_numpy(one)[None].to(DEV), SP(seed=1, dynatemp_range=0.5, logprobs=True,
                                                                     **extra), steps=[0], backend="triton")
    assert int(out.tokens[0]) == 5 and bool(out.valid[0])


# -------------------------------------------------------------------------------------------- against the reference
def _mixed(seed: int, vocab: int, path: str) -> list[SP]:
    """Rows mixing the new rules with and without the others; ``path`` picks what the batch may hold: "select"
    (a typical-p row: no candidate engine), "candidates" (a top-k row, no typical-p / Mirostat v2) or "plain" (no
    truncation: DRY and dynamic temperature only)."""
    s = seed
    if path == "plain":
        return [SP(seed=s, dry_multiplier=1.5, dry_allowed_length=1, logprobs=True, top_logprobs=3),
                SP(seed=s + 1, dynatemp_range=0.6, dynatemp_exponent=1.5, temperature=0.9, logprobs=True,
                   logprobs_mode="final"),
                SP(seed=s + 2, temperature=0.0, dry_multiplier=2.0, dry_base=1.5, logprobs=True, top_logprobs=2),
                SP(seed=s + 3, dynatemp_range=2.0, dry_multiplier=0.7, repetition_penalty=1.2, logprobs=True,
                   logprobs_mode="processed"),
                SP(seed=s + 4)]
    rows = [
        SP(seed=s, eta_cutoff=3e-3, logprobs=True, top_logprobs=3, logprobs_mode="final"),
        SP(seed=s + 1, top_n_sigma=1.5, min_keep=4, logprobs=True),
        SP(seed=s + 2, xtc_probability=1.0, xtc_threshold=0.02, top_p=0.95, logprobs=True, logprobs_mode="final",
           top_logprobs=2),
        SP(seed=s + 3, xtc_probability=0.5, xtc_threshold=0.05, min_p=0.01, dynatemp_range=0.5,
           dry_multiplier=1.0, dry_allowed_length=1),
        SP(seed=s + 4, eta_cutoff=1e-3, top_n_sigma=2.5, epsilon_cutoff=1e-4, min_keep=2, temperature=0.7,
           logprobs=True, logprobs_mode="processed"),
        SP(seed=s + 5, temperature=0.0, top_n_sigma=1.0, dry_multiplier=1.0, logprobs=True, top_logprobs=2),
        SP(seed=s + 6, dynatemp_range=0.3, dynatemp_exponent=0.5, top_n_sigma=2.0, xtc_probability=1.0,
           xtc_threshold=0.001, min_keep=3),
    ]
    if path == "select":
        rows += [SP(seed=s + 7, typical_p=0.9, eta_cutoff=1e-3, xtc_probability=1.0, xtc_threshold=0.01,
                    logprobs=True, logprobs_mode="final"),
                 SP(seed=s + 8, top_k=40, top_p=0.9, top_n_sigma=2.0, min_keep=3)]
    else:
        rows += [SP(seed=s + 7, top_k=40, eta_cutoff=1e-3, xtc_probability=1.0, xtc_threshold=0.02,
                    logprobs=True, logprobs_mode="final", top_logprobs=4),
                 SP(seed=s + 8, top_k=25, top_p=0.9, top_n_sigma=2.0, min_keep=3, dynatemp_range=0.4),
                 SP(seed=s + 9, top_k=vocab // 2, top_n_sigma=0.8, xtc_probability=1.0, xtc_threshold=0.0,
                    min_keep=2, dry_multiplier=0.5)]
    return rows


def _histories(rng: np.random.Generator, b: int) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [[int(t) for t in rng.integers(0, 9, int(rng.integers(0, 30)))] for _ in range(b)]
    outputs = [[int(t) for t in rng.integers(0, 9, int(rng.integers(0, 20)))] for _ in range(b)]
    return prompts, outputs


@pytest.mark.parametrize("path", ["select", "candidates", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=slow_in_interpreter)])
def test_random_rows_against_the_reference(knobs, path: str, dtype: torch.dtype) -> None:
    vocab = 700
    params = _mixed(11, vocab, path)
    b = len(params)
    rng = np.random.default_rng(vocab + b)
    x = torch.from_numpy((rng.standard_normal((b, vocab)) * 2.5).astype(np.float32)).to(dtype)
    x[1, 300:] = -math.inf  # fewer finite logits: the statistics count only finite z
    x[:, :7] += 1.5  # the history's ids are likely: DRY changes tokens
    prompts, outputs = _histories(rng, b)
    check_exact("triton", x.to(DEV), params, prompt_token_ids=prompts, output_token_ids=outputs,
                steps=[3 + i for i in range(b)])


# ---------------------------------------------------------------------------------------------- batch invariance
INVARIANCE = {  # target, other rows (the same path alone and in the batch)
    "select": (SP(seed=77, typical_p=0.95, eta_cutoff=1e-3, top_n_sigma=2.5, xtc_probability=1.0,
                  xtc_threshold=0.01, dynatemp_range=0.4, dry_multiplier=1.0, dry_allowed_length=1, logprobs=True,
                  top_logprobs=4, logprobs_mode="final"),
               [SP(seed=1, mirostat_mode=2, dynatemp_range=0.2), SP(seed=2, temperature=0.0),
                SP(seed=3, top_n_sigma=1.0, min_keep=4, xtc_probability=0.5, xtc_threshold=0.1)]),
    "candidates": (SP(seed=77, top_k=60, top_n_sigma=2.0, eta_cutoff=1e-3, xtc_probability=1.0, xtc_threshold=0.02,
                      dynatemp_range=0.4, dry_multiplier=1.0, dry_allowed_length=1, logprobs=True, top_logprobs=4),
                   [SP(seed=1, top_p=0.8, xtc_probability=1.0, xtc_threshold=0.05), SP(seed=2, temperature=0.0),
                    SP(seed=3, top_k=5, min_keep=4, eta_cutoff=0.01)]),
}


@pytest.mark.parametrize("case", list(INVARIANCE))
def test_batch_invariance_bitwise(monkeypatch, case: str) -> None:
    """A row alone and at other positions of batches of other sizes: the same token, rank, top ids, and the same
    logprobs to the bit (the new partials are merged per row in a fixed order)."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "256")
    vocab = 1500
    target, others = INVARIANCE[case]
    rng = np.random.default_rng(5)
    row = torch.from_numpy((rng.standard_normal((1, vocab)) * 2.0).astype(np.float32)).to(DEV)
    hist = [1, 2, 3, 1, 2, 3, 1, 2]
    alone = fastsampler.sample(row, target, prompt_token_ids=[hist], steps=[5], backend="triton")
    p_alone = fastsampler.sampling_probs(row, target, prompt_token_ids=[hist], steps=[5], backend="triton")
    for size, pos in [(2, 0), (4, 3)]:
        batch = torch.from_numpy((rng.standard_normal((size, vocab)) * 2.0).astype(np.float32)).to(DEV)
        batch[pos] = row[0]
        params = [others[i % len(others)] for i in range(size)]
        params[pos] = target
        prompts = [[4, 5, 4, 5]] * size
        prompts[pos] = hist
        steps = [11] * size
        steps[pos] = 5
        out = fastsampler.sample(batch, params, prompt_token_ids=prompts, steps=steps, backend="triton")
        assert int(out.tokens[pos]) == int(alone.tokens[0])
        assert int(out.ranks[pos]) == int(alone.ranks[0])
        assert torch.equal(out.top_logprob_ids[pos], alone.top_logprob_ids[0])
        assert torch.equal(out.logprobs[pos:pos + 1], alone.logprobs)
        assert torch.equal(out.top_logprobs[pos], alone.top_logprobs[0])
        probs = fastsampler.sampling_probs(batch, params, prompt_token_ids=prompts, steps=steps, backend="triton")
        assert torch.equal(probs[pos], p_alone[0])


# --------------------------------------------------------------------------------------------------- the Sampler
@slow_in_interpreter
def test_sampler_slot_indexed_step(monkeypatch) -> None:
    """Slots using the new rules (DRY from the Sampler's history ring, dynamic temperature, eta, top-n-sigma, XTC):
    the slot-indexed Triton step (a tensor of slots, slots in a non-trivial order) gives bit for bit the outputs of
    the row-indexed Triton step (a list of slots), and the tokens of the reference backend's Sampler, with logprobs
    within 1e-5."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "128")
    vocab = 300
    reqs = [SP(seed=5, dry_multiplier=2.0, dry_base=1.5, dry_allowed_length=1, logprobs=True, top_logprobs=2),
            SP(seed=6, top_n_sigma=1.5, eta_cutoff=1e-3, dynatemp_range=0.5, logprobs=True,
               logprobs_mode="final"),
            SP(seed=7, xtc_probability=0.7, xtc_threshold=0.05, top_k=30, dry_multiplier=1.0, logprobs=True),
            SP(seed=8, typical_p=0.95, xtc_probability=1.0, xtc_threshold=0.02, dynatemp_range=0.3)]
    prompts = [[1, 2, 3, 1, 2, 3, 4, 1, 2], [5, 5, 6], [1, 2, 1, 2, 1], [7, 8, 7, 8]]

    def make(backend: str) -> fastsampler.Sampler:
        s = fastsampler.Sampler(vocab_size=vocab, max_slots=4, backend=backend, history_len=32, device=DEV)
        for p, pr in zip(reqs, prompts, strict=True):
            s.add(p, pr)
        return s

    tensor, rows, ref = make("triton"), make("triton"), make("reference")
    order = [2, 0, 3, 1]
    rng = np.random.default_rng(2)
    for step in range(3):
        x = rng.standard_normal((4, vocab)).astype(np.float32)
        x[:, :9] += 2.5
        xt = torch.from_numpy(x).to(DEV)
        a = tensor.sample(xt, torch.tensor(order, device=DEV))
        c = rows.sample(xt, order)
        r = ref.sample(xt.cpu(), order)
        assert a.tokens.cpu().tolist() == c.tokens.cpu().tolist() == r.tokens.cpu().tolist(), step
        for f in ("logprobs", "top_logprobs"):
            ga, gc, gr = getattr(a, f).cpu(), getattr(c, f).cpu(), getattr(r, f).cpu()
            assert torch.equal(ga.nan_to_num(-7.0), gc.nan_to_num(-7.0)), (step, f)
            assert torch.allclose(ga, gr.float(), atol=1e-5, rtol=0, equal_nan=True), (step, f, ga, gr)
        assert torch.equal(a.top_logprob_ids.cpu(), c.top_logprob_ids.cpu())


# --------------------------------------------------------------------------------------- the DRY table on a device
@pytest.mark.parametrize("seed", range(4))
def test_dry_table_kernel_matches_the_torch_table(seed: int) -> None:
    """`backends.triton.dry.dry_table` (one launch) gives the table `_history.dry_table_torch` gives: the same ids,
    penalties within float32 rounding, on rings that wrapped, with windows and multi-token breakers."""
    from fastsampler._history import _TRITON_MAX_RING, breakers_table, dry_table_torch, ordered_history
    from fastsampler.backends.triton import dry

    assert dry.MAX_RING == _TRITON_MAX_RING
    rng = np.random.default_rng(seed)
    for _ in range(6):
        slots, length = 4, int(rng.choice([8, 32, 64]))
        ring = torch.from_numpy(rng.integers(0, 5, (slots, length)).astype(np.int32))
        total = torch.from_numpy(rng.integers(0, 3 * length, slots).astype(np.int64))
        fd = torch.tensor([[float(rng.choice([0.5, 1.0])), float(rng.choice([1.0, 1.0000005, 1.75, 3.0]))]
                           for _ in range(slots)], dtype=torch.float64)
        idry = torch.tensor([[int(rng.integers(0, 3)), int(rng.choice([-1, 0, 5, 20]))] for _ in range(slots)])
        brs = [[tuple(rng.integers(0, 6, int(rng.integers(1, 3))).tolist()) for _ in range(int(rng.integers(0, 3)))]
               for _ in range(slots)]
        p = max(len(b) for b in brs)
        m = max([len(w) for b in brs for w in b], default=1)
        brk = torch.from_numpy(np.stack([breakers_table(b, p, m) for b in brs])) if p else None
        rows = torch.tensor([2, 0, 3])
        seq = ordered_history(ring.index_select(0, rows), total.index_select(0, rows))
        want = dry_table_torch(seq, fd.index_select(0, rows), idry.index_select(0, rows),
                               None if brk is None else brk.index_select(0, rows), length)
        got = dry.dry_table(ring, total, rows, fd, idry, brk, length)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=0)
