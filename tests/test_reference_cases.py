"""Hand-computed cases for every stage of the pipeline (docs/semantics.md §2–§3), run against `fastsampler.reference`.

Every expected value is worked out here by hand (tiny vocabularies, numbers from `math`), never by calling the code
under test a second time. The two-level race is recomputed from `philox4x32` and the noise formula of
docs/semantics.md §7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastsampler import SamplingParams as SP
from fastsampler import reference as ref
from fastsampler._batch import ids_to_bitmask
from fastsampler.backends.reference import philox4x32

INF = math.inf
NAN = math.nan
LN2 = math.log(2.0)
TILE = 4096


# ----------------------------------------------------------------------------------------------------- helpers


def rows(*r) -> np.ndarray:
    return np.array(r, dtype=np.float64)


def probs(logits, params=None, **kw) -> np.ndarray:
    """Row 0 of sampling_probs."""
    x = np.atleast_2d(np.asarray(logits, dtype=np.float64))
    return ref.sampling_probs(x, params if params is not None else SP(seed=0), **kw)[0]


def kept(logits, params=None, **kw) -> set[int]:
    return set(np.nonzero(probs(logits, params, **kw) > 0)[0].tolist())


def softmax_on(z, keep) -> np.ndarray:
    """Softmax of z restricted to the ids in ``keep`` (zero elsewhere), by hand with math."""
    m = max(z[i] for i in keep)
    den = sum(math.exp(z[i] - m) for i in keep)
    return np.array([math.exp(z[i] - m) / den if i in keep else 0.0 for i in range(len(z))])


def log_softmax(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    fin = z[np.isfinite(z)]
    m = fin.max()
    return z - (m + math.log(sum(math.exp(v - m) for v in fin)))


def noise(r: np.ndarray) -> np.ndarray:
    """docs/semantics.md §7: E = -ln((r + 0.5) 2^-32) below 2^31, -log1p(-((~r) + 0.5) 2^-32) from 2^31 up."""
    r = np.asarray(r, dtype=np.uint64)
    lo = -np.log((r.astype(np.float64) + 0.5) * 2.0**-32)
    hi = -np.log1p(-(((~r) & np.uint64(0xFFFFFFFF)).astype(np.float64) + 0.5) * 2.0**-32)
    return np.where(r < np.uint64(1 << 31), lo, hi)


def words(seed: int, step: int, seq: int, stream: int, j: np.ndarray) -> np.ndarray:
    """Word j & 3 of Philox4x32-10(key = (seed lo, seed hi), counter = (j >> 2, step, seq, stream))."""
    j = np.asarray(j, dtype=np.int64)
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)
    ctr = np.zeros((j.size, 4), dtype=np.uint32)
    ctr[:, 0] = j >> 2
    ctr[:, 1] = step & 0xFFFFFFFF
    ctr[:, 2] = seq & 0xFFFFFFFF
    ctr[:, 3] = stream
    out = philox4x32(key, ctr)
    return out[np.arange(j.size), j & 3]


def race(z: np.ndarray, keep: np.ndarray, seed: int, step: int = 0, seq: int = 0) -> tuple[int, float, float]:
    """docs/semantics.md §3 F, written from the text: returns (token, tile margin, token margin)."""
    ids = np.nonzero(keep)[0]
    c = float(z[ids].max())
    tiles = sorted({int(i) // TILE for i in ids})
    tile_scores = []
    for t in tiles:
        members = ids[ids // TILE == t]
        w = float(np.exp(z[members] - c).sum())
        if w > 0:
            e = float(noise(words(seed, step, seq, 1, np.array([t])))[0])
            tile_scores.append((math.log(w) - math.log(e), t))
    best_tile = max(tile_scores, key=lambda st: (st[0], -st[1]))  # ties -> lowest tile
    members = ids[ids // TILE == best_tile[1]]
    sc = z[members] - np.log(noise(words(seed, step, seq, 0, members)))
    best = int(members[int(np.argmax(sc))])  # first maximum -> lowest id
    ts = sorted(s for s, _ in tile_scores)
    ss = np.sort(sc)
    tile_margin = ts[-1] - ts[-2] if len(ts) > 1 else INF
    tok_margin = float(ss[-1] - ss[-2]) if ss.size > 1 else INF
    return best, tile_margin, tok_margin


# --------------------------------------------------------------------------------------------- A: masks, bias


def test_logit_bias_is_added():
    z = ref.process_logits(rows([0.0, 1.0, 2.0, 3.0]), SP(logit_bias={0: 2.5, 2: -INF, 3: -100}))
    assert z.dtype == np.float64
    assert z[0].tolist() == [2.5, 1.0, -INF, -97.0]


def test_allowed_and_banned_ids():
    x = rows([0.0, 1.0, 2.0, 3.0, 4.0])
    assert kept(x, SP(allowed_token_ids=[1, 3])) == {1, 3}
    assert kept(x, SP(banned_token_ids=[1, 3])) == {0, 2, 4}
    assert kept(x, SP(allowed_token_ids=[1, 3, 4], banned_token_ids=[4, 0])) == {1, 3}
    z = ref.process_logits(x, SP(allowed_token_ids=[1, 3], temperature=0.5))
    assert z[0].tolist() == [-INF, 2.0, -INF, 6.0, -INF]


def test_token_bitmask_bit_layout():
    # bit t % 32 of int32 word t // 32; bit 31 makes the word negative
    v = 70
    allowed = {0, 5, 31, 32, 63, 64, 69}
    w0 = np.uint32((1 << 0) | (1 << 5) | (1 << 31)).view(np.int32)
    w1 = np.uint32((1 << 0) | (1 << 31)).view(np.int32)
    w2 = np.int32((1 << 0) | (1 << 5))
    mask = np.array([[w0, w1, w2]], dtype=np.int32)
    assert mask[0, 0] < 0 and mask[0, 1] < 0
    assert np.array_equal(mask, ids_to_bitmask([sorted(allowed)], v))
    x = np.zeros((1, v))
    assert kept(x, token_bitmask=mask) == allowed
    # extra words beyond ceil(V / 32) are accepted and ignored
    wide = np.concatenate([mask, np.full((1, 2), -1, dtype=np.int32)], axis=1)
    assert kept(x, token_bitmask=wide) == allowed
    # AND with allowed / banned ids
    assert kept(x, SP(allowed_token_ids=[5, 6, 63, 64]), token_bitmask=mask) == {5, 63, 64}
    assert kept(x, SP(banned_token_ids=[0, 69]), token_bitmask=mask) == allowed - {0, 69}


@pytest.mark.parametrize(
    "min_tokens,ignore_eos,step,eos_banned",
    [(0, False, 0, False), (3, False, 0, True), (3, False, 2, True), (3, False, 3, False), (3, False, 50, False),
     (0, True, 0, True), (0, True, 10**6, True), (3, True, 5, True)],
)
def test_eos_min_tokens_and_ignore_eos(min_tokens, ignore_eos, step, eos_banned):
    x = rows([0.0, 5.0, 0.0, 4.0])
    p = SP(min_tokens=min_tokens, ignore_eos=ignore_eos, seed=1)
    k = kept(x, p, eos_token_ids=[1, 3], steps=np.array([step]))
    assert k == ({0, 2} if eos_banned else {0, 1, 2, 3})
    # without EOS ids nothing is banned
    assert kept(x, p, steps=np.array([step])) == {0, 1, 2, 3}


def test_padded_vocab_is_never_sampled_or_read():
    v, vs = 10, 7
    x = np.zeros((1, v))
    x[0, 7], x[0, 8], x[0, 9] = 50.0, NAN, INF  # padding may hold anything
    pr = ref.sampling_probs(x, SP(seed=0), vocab_size=vs)[0]
    assert np.all(pr[vs:] == 0) and pr[:vs] == pytest.approx(np.full(vs, 1 / 7), rel=1e-12)
    z = ref.process_logits(x, SP(temperature=2.0), vocab_size=vs)[0]
    assert z[:vs].tolist() == [0.0] * vs and np.all(z[vs:] == -INF)
    for seed in range(20):
        out = ref.sample(x, SP(seed=seed, logprobs=True, top_logprobs=10), vocab_size=vs)
        assert out.valid[0] and 0 <= out.tokens[0] < vs
        # raw logprobs are over the real vocabulary only: uniform 1/7
        assert out.logprobs[0] == pytest.approx(-math.log(7), rel=1e-12)
        assert out.top_logprob_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, -1, -1, -1]
        assert out.top_logprobs[0, :7] == pytest.approx([-math.log(7)] * 7, rel=1e-12)
        assert np.all(np.isnan(out.top_logprobs[0, 7:]))
        assert out.ranks[0] == 1


def test_padded_vocab_greedy_ignores_large_padding():
    x = rows([0.0, 3.0, 1.0, 99.0])
    assert ref.sample(x, SP(temperature=0.0), vocab_size=3).tokens.tolist() == [1]


# ------------------------------------------------------------------------------------- B, C: penalties


def test_repetition_penalty_signs():
    # prompt {0, 4}, output {1}: positive / r, negative * r, zero stays zero, unseen tokens untouched
    x = rows([2.0, -2.0, 2.0, -2.0, 0.0, 1.0])
    z = ref.process_logits(x, SP(repetition_penalty=2.0), prompt_token_ids=[[0, 4]], output_token_ids=[[1]])
    assert z[0].tolist() == [1.0, -4.0, 2.0, -2.0, 0.0, 1.0]
    z = ref.process_logits(x, SP(repetition_penalty=0.5), prompt_token_ids=[[0, 4]], output_token_ids=[[1]])
    assert z[0].tolist() == [4.0, -1.0, 2.0, -2.0, 0.0, 1.0]


def test_repetition_penalty_once_per_distinct_token():
    x = rows([2.0, -2.0, 2.0])
    z = ref.process_logits(x, SP(repetition_penalty=2.0), prompt_token_ids=[[0, 0, 0, 1]],
                           output_token_ids=[[0, 0, 1, 1, 1]])
    assert z[0].tolist() == [1.0, -4.0, 2.0]


def test_bias_comes_before_repetition():
    # A then B: (-1 + 4) / 2 = 1.5.  (B then A would give -1 * 2 + 4 = 2.)
    z = ref.process_logits(rows([-1.0, 0.0]), SP(logit_bias={0: 4.0}, repetition_penalty=2.0),
                           prompt_token_ids=[[0]])
    assert z[0, 0] == 1.5


def test_frequency_presence_counts_generated_tokens_only():
    x = np.zeros((1, 5))
    p = SP(frequency_penalty=0.5, presence_penalty=0.25)
    z = ref.process_logits(x, p, prompt_token_ids=[[2, 4]], output_token_ids=[[1, 1, 1, 3]])
    # token 1: 3 * 0.5 + 0.25; token 3: 1 * 0.5 + 0.25; prompt tokens 2, 4 are not counted
    assert z[0].tolist() == [0.0, -1.75, 0.0, -0.75, 0.0]
    p = SP(frequency_penalty=-0.5, presence_penalty=-1.0)
    z = ref.process_logits(x, p, output_token_ids=[[1, 1, 1, 3]])
    assert z[0].tolist() == [0.0, 2.5, 0.0, 1.5, 0.0]


def test_repetition_then_frequency_presence():
    x = rows([2.0, -2.0, 0.0, 3.0])
    p = SP(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5, temperature=0.5)
    z = ref.process_logits(x, p, prompt_token_ids=[[3]], output_token_ids=[[0, 1, 1]])
    # 0: 2/2 - (1 + .5) = -0.5; 1: -2*2 - (2 + .5) = -6.5; 2: 0; 3 (prompt only): 3/2 = 1.5; then / T = 0.5
    assert z[0].tolist() == [-1.0, -13.0, 0.0, 3.0]


def test_penalties_keep_masked_tokens_masked():
    p = SP(repetition_penalty=3.0, frequency_penalty=-2.0, presence_penalty=-2.0, banned_token_ids=[1])
    z = ref.process_logits(rows([1.0, 1.0, 1.0]), p, output_token_ids=[[1, 1]])
    assert z[0, 1] == -INF


def test_penalty_state_tensors_equal_sequences():
    rng = np.random.default_rng(3)
    v = 77
    x = rng.normal(size=(2, v))
    prompts = [[1, 5, 5, 40, 76], [0]]
    outputs = [[5, 5, 7, 60], []]
    p = SP(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    a = ref.process_logits(x, p, prompt_token_ids=prompts, output_token_ids=outputs)
    counts = np.zeros((2, v), dtype=np.int32)
    for r, o in enumerate(outputs):
        for t in o:
            counts[r, t] += 1
    b = ref.process_logits(x, p, prompt_mask=ids_to_bitmask(prompts, v), output_counts=counts)
    assert np.array_equal(a, b)
    c = ref.process_logits(x, p, prompt_mask=ids_to_bitmask(prompts, v), output_counts=counts.astype(np.int16))
    assert np.array_equal(a, c)


# ------------------------------------------------------------------------------------ D: temperature, greedy


def test_temperature_divides():
    z = ref.process_logits(rows([1.0, -3.0, 0.0]), SP(temperature=0.5))
    assert z[0].tolist() == [2.0, -6.0, 0.0]
    pr = probs(rows([1.0, 0.0]), SP(temperature=2.0, seed=0))
    assert pr.tolist() == pytest.approx([1 / (1 + math.exp(-0.5)), 1 - 1 / (1 + math.exp(-0.5))], rel=1e-12)


def test_greedy_ties_go_to_lowest_id():
    x = rows([0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-INF, 2.0, -INF, 2.0])
    out = ref.sample(x, SP(temperature=0.0, seed=1))
    assert out.tokens.tolist() == [1, 0, 1]
    pr = ref.sampling_probs(x, SP(temperature=0.0))
    assert pr.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]


def test_greedy_is_argmax_after_penalties_and_skips_truncation():
    x = rows([3.0, 2.0, 1.0, 2.5])
    # repetition on token 0 (prompt): 3 / 4 = 0.75; token 3 (output): 2.5 / 4 - 1 = -0.375 -> argmax is token 1
    p = SP(temperature=0.0, repetition_penalty=4.0, presence_penalty=1.0, top_k=1, top_p=0.1, min_p=0.9,
           typical_p=0.1, seed=0)
    out = ref.sample(x, p, prompt_token_ids=[[0]], output_token_ids=[[3]])
    assert out.tokens.tolist() == [1]
    # greedy rows: process_logits is A-C only (no division by T)
    z = ref.process_logits(x, p, prompt_token_ids=[[0]], output_token_ids=[[3]])
    assert z[0].tolist() == [0.75, 2.0, 1.0, -0.375]


def test_greedy_mirostat_row_passes_mu_through():
    x = rows([0.0, 2.0, 1.0])
    out = ref.sample(x, SP(temperature=0.0, mirostat_mode=2, seed=0), mirostat_mu=np.array([3.25]))
    assert out.tokens.tolist() == [1] and out.mirostat_mu.tolist() == [3.25]


def test_greedy_logprobs():
    x = rows([1.0, 3.0, 0.0, 3.0])
    lsm = log_softmax([1.0, 3.0, 0.0, 3.0])
    out = ref.sample(x, SP(temperature=0.0, logprobs=True, top_logprobs=4, logprobs_mode="final"))
    assert out.tokens[0] == 1 and out.logprobs[0] == 0.0 and out.ranks[0] == 1
    assert out.top_logprob_ids[0].tolist() == [1, 0, 2, 3]  # then the -inf entries, lowest ids first
    assert out.top_logprobs[0].tolist() == [0.0, -INF, -INF, -INF]
    out = ref.sample(x, SP(temperature=0.0, logprobs=True, top_logprobs=2, logprobs_mode="processed"))
    assert out.logprobs[0] == pytest.approx(lsm[1], rel=1e-12)
    assert out.top_logprob_ids[0].tolist() == [1, 3] and out.ranks[0] == 1


# ----------------------------------------------------------------------------------------------- E1: top-k


@pytest.mark.parametrize(
    "z,k,expected",
    [
        ([1, 3, 3, 2, 0], 1, {1, 2}),  # the 1st largest is 3, tied
        ([1, 3, 3, 2, 0], 2, {1, 2}),  # k-th largest counted with multiplicity: 3, 3 -> 2nd is 3
        ([1, 3, 3, 2, 0], 3, {1, 2, 3}),
        ([3, 2, 2, 2, 1], 2, {0, 1, 2, 3}),  # tie at the k-th value: all kept
        ([3, 2, 2, 2, 1], 4, {0, 1, 2, 3}),
        ([3, 2, 2, 2, 1], 5, {0, 1, 2, 3, 4}),
        ([5, 5, 5, 5, 5], 1, {0, 1, 2, 3, 4}),
    ],
)
def test_top_k_ties(z, k, expected):
    assert kept(rows(z), SP(top_k=k, seed=0)) == expected


@pytest.mark.parametrize("k", [0, -1, -100, 5, 6, 1000])
def test_top_k_disabled(k):
    assert kept(rows([1.0, 5.0, 2.0, 4.0, 3.0]), SP(top_k=k)) == {0, 1, 2, 3, 4}


def test_top_k_at_least_survivors_is_off():
    x = rows([1.0, -INF, 2.0, -INF, 0.0])
    assert kept(x, SP(top_k=3)) == {0, 2, 4}
    assert kept(x, SP(top_k=2)) == {0, 2}


def test_top_k_renormalises():
    z = [0.0, 2.0, 1.0, -1.0]
    assert probs(rows(z), SP(top_k=2)) == pytest.approx(softmax_on(z, {1, 2}), rel=1e-12)


@pytest.mark.parametrize(
    "z,k,mk,expected",
    [([5, 4, 3, 2, 1], 1, 3, {0, 1, 2}), ([5, 4, 3, 3, 1], 1, 3, {0, 1, 2, 3}), ([5, 4, 3, 2, 1], 4, 2, {0, 1, 2, 3}),
     ([5, 4, 3, 2, 1], 1, 9, {0, 1, 2, 3, 4})],
)
def test_top_k_min_keep(z, k, mk, expected):
    assert kept(rows(z), SP(top_k=k, min_keep=mk)) == expected


def test_top_k_is_scale_invariant():
    z = [0.3, 1.7, -0.2, 1.1, 0.9]
    for t in (0.1, 1.0, 7.0):
        assert kept(rows(z), SP(top_k=3, temperature=t)) == {1, 3, 4}


# ----------------------------------------------------------------------------------------------- E2: top-p


def test_top_p_boundary_exactly_reached():
    # q = (1/2, 1/4, 1/8, 1/8) exactly; cumulative 0.5, 0.75, 0.875, 1
    z = rows([0.0, -LN2, -2 * LN2, -2 * LN2])
    assert kept(z, SP(top_p=0.5)) == {0}  # reached at position 0: that token is kept, nothing after it
    assert kept(z, SP(top_p=0.5 + 1e-6)) == {0, 1}
    assert kept(z, SP(top_p=0.75)) == {0, 1}
    assert kept(z, SP(top_p=0.75 + 1e-6)) == {0, 1, 2, 3}  # position 2 reached; its tie (id 3) comes along
    assert kept(z, SP(top_p=0.875)) == {0, 1, 2, 3}
    assert kept(z, SP(top_p=1.0)) == {0, 1, 2, 3}


def test_top_p_ties_at_the_boundary_kept_together():
    # q ~ (1/2, 1/4, 1/4, 5e-14): the cut at position 1 keeps z >= z[1], i.e. both tied tokens
    z = rows([LN2, 0.0, 0.0, -30.0])
    assert kept(z, SP(top_p=0.7)) == {0, 1, 2}
    assert kept(z, SP(top_p=0.75)) == {0, 1, 2}
    assert kept(z, SP(top_p=0.45)) == {0}
    assert kept(z, SP(top_p=0.6)) == {0, 1, 2}
    assert kept(rows([LN2, 0.0, 0.0]), SP(top_p=0.5)) == {0}  # exactly 1/2 at position 0


def test_top_p_acts_on_top_k_survivors():
    z = [math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)]
    # alone: cumulative 0.4, 0.7 -> two tokens; after top_k=2 the survivors renormalise to 4/7, 3/7 -> one token
    assert kept(rows(z), SP(top_p=0.55)) == {0, 1}
    assert kept(rows(z), SP(top_k=2, top_p=0.55)) == {0}
    assert kept(rows(z), SP(top_k=3, top_p=0.55)) == {0, 1}  # 4/9 < 0.55 <= 7/9


@pytest.mark.parametrize(
    "z,mk,expected",
    [([3, 2, 1, 0], 1, {0}), ([3, 2, 1, 0], 2, {0, 1}), ([3, 2, 2, 0], 2, {0, 1, 2}), ([3, 2, 1, 0], 7, {0, 1, 2, 3})],
)
def test_top_p_min_keep(z, mk, expected):
    assert kept(rows(z), SP(top_p=0.01, min_keep=mk)) == expected


def test_top_p_order_ties_by_id():
    # all equal: the value threshold keeps the whole tie whatever p
    assert kept(rows([1.0, 1.0, 1.0, 1.0]), SP(top_p=0.1)) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------------------- E3: min-p


def test_min_p_threshold_is_inclusive():
    # parameters are float32 in every backend: 0.125 is exact there, so the boundary is exactly reached
    z = rows([0.0, math.log(0.125), -3.0, math.log(0.5)])
    assert kept(z, SP(min_p=0.125)) == {0, 1, 3}  # p = 0.125 p_max exactly is kept; e^-3 < 0.125 is not
    assert kept(z, SP(min_p=0.5)) == {0, 3}
    assert kept(z, SP(min_p=1.0)) == {0}
    assert kept(z, SP(min_p=0.0)) == {0, 1, 2, 3}


def test_min_p_relative_to_max_of_survivors_and_after_temperature():
    l = [2.0, 1.0, 0.0, -1.0]
    # T = 0.5: z = 4, 2, 0, -2; keep z >= 4 + ln 0.2 = 2.39 -> only id 0; at T = 1: 2 + ln 0.2 = 0.39 -> ids 0, 1
    assert kept(rows(l), SP(min_p=0.2, temperature=0.5)) == {0}
    assert kept(rows(l), SP(min_p=0.2)) == {0, 1}
    assert kept(rows(l), SP(min_p=0.2, temperature=1.5)) == {0, 1, 2}  # 4/3 + ln .2 = -0.28 <= 0 > -2/3
    assert kept(rows(l), SP(min_p=0.2, temperature=3.0)) == {0, 1, 2, 3}  # 2/3 + ln .2 = -0.94 <= -1/3


@pytest.mark.parametrize("t", [0.3, 0.7, 1.0, 1.6, 4.0])
def test_min_p_temperature_last_mapping(t):
    # a sampler that applies min_p m to the raw logits and temperature afterwards keeps l >= l_max + ln m;
    # here min_p acts on z = l / T, so the same set needs min_p' = m ** (1 / T)   (docs/semantics.md)
    rng = np.random.default_rng(int(t * 10))
    l = rng.normal(scale=2.0, size=64)
    m = 0.05
    want = set(np.nonzero(l >= l.max() + math.log(m))[0].tolist())
    assert kept(l[None], SP(min_p=m ** (1.0 / t), temperature=t)) == want


def test_temperature_last_two_call_recipe():
    # docs/semantics.md: a temperature-last chain (truncate at T = 1, then sample at T) in two calls:
    # the kept set at T = 1 becomes a token bitmask for a plain call at T
    l = np.array([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0])
    t, p = 0.625, 0.8  # t exact in float32 (parameters are float32)
    q1 = softmax_on(list(l), set(range(7)))
    cum = np.cumsum(q1)  # l is sorted descending already
    c = int(np.nonzero(cum >= p)[0][0])
    keep = set(range(c + 1))
    want = softmax_on(list(l / t), keep)
    kept_t1 = ref.sampling_probs(l[None], SP(top_p=p))[0] > 0
    mask = ids_to_bitmask([np.nonzero(kept_t1)[0].tolist()], 7)
    got = ref.sampling_probs(l[None], SP(temperature=t), token_bitmask=mask)[0]
    assert got == pytest.approx(want, rel=1e-12)
    assert set(np.nonzero(kept_t1)[0].tolist()) == keep
    # a single call at T computes the mass at T and keeps a different set here
    assert set(np.nonzero(probs(l[None], SP(temperature=t, top_p=p)) > 0)[0].tolist()) != keep


@pytest.mark.parametrize(
    "z,mk,expected",
    [([3, 2, 2, 0, -1], 1, {0}), ([3, 2, 2, 0, -1], 2, {0, 1, 2}), ([3, 2, 2, 0, -1], 4, {0, 1, 2, 3}),
     ([3, 2, 2, 0, -1], 50, {0, 1, 2, 3, 4})],
)
def test_min_p_min_keep(z, mk, expected):
    assert kept(rows(z), SP(min_p=1.0, min_keep=mk)) == expected


# ------------------------------------------------------------------------------------------- E4: typical-p


def typical_scores(q):
    h = -sum(qi * math.log(qi) for qi in q if qi > 0)
    return h, [abs(-math.log(qi) - h) for qi in q]


def test_typical_hand_computed():
    q = [0.5, 0.3, 0.2]
    h, s = typical_scores(q)
    assert h == pytest.approx(1.0296530140645737, rel=1e-12)
    # s = (0.3365, 0.1744, 0.5798): order by s is ids 1, 0, 2 with cumulative mass 0.3, 0.8, 1.0
    assert s[1] < s[0] < s[2]
    z = rows([math.log(v) for v in q])
    assert kept(z, SP(typical_p=0.25)) == {1}  # the most probable token is not the most typical one
    assert kept(z, SP(typical_p=0.5)) == {0, 1}
    assert kept(z, SP(typical_p=0.79)) == {0, 1}
    assert kept(z, SP(typical_p=0.81)) == {0, 1, 2}
    pr = probs(z, SP(typical_p=0.5))
    assert pr.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0], rel=1e-12)


def test_typical_ties_kept_together():
    q = [0.4, 0.4, 0.2]
    _, s = typical_scores(q)
    assert s[0] == s[1] < s[2]
    z = rows([math.log(v) for v in q])
    assert kept(z, SP(typical_p=0.1)) == {0, 1}


@pytest.mark.parametrize("mk,expected", [(1, {1}), (2, {0, 1}), (3, {0, 1, 2}), (10, {0, 1, 2})])
def test_typical_min_keep(mk, expected):
    z = rows([math.log(v) for v in (0.5, 0.3, 0.2)])
    assert kept(z, SP(typical_p=0.25, min_keep=mk)) == expected


def test_typical_on_survivors():
    # the entropy is taken over the survivors of top-k: over {0, 1} q = (5/8, 3/8), H = 0.6616,
    # s = (0.1916, 0.3192) -> id 0 first, its mass 0.625 >= 0.6
    q = [0.5, 0.3, 0.2]
    z = rows([math.log(v) for v in q])
    h, s = typical_scores([0.625, 0.375])
    assert h == pytest.approx(0.6615632381579821, rel=1e-12) and s[0] < s[1]
    assert kept(z, SP(top_k=2, typical_p=0.6)) == {0}
    assert kept(z, SP(typical_p=0.6)) == {0, 1}  # over all three: ids 1, 0 (0.3, 0.8)


# ------------------------------------------------------------------------------------------ E: rule chaining


def test_min_p_after_top_p_uses_the_same_max():
    z = rows([2.0, 1.5, 1.0, 0.0, -1.0])
    # top_p 0.9 over all five, then min_p against the max (always kept)
    q = softmax_on([2.0, 1.5, 1.0, 0.0, -1.0], {0, 1, 2, 3, 4})
    cum = np.cumsum(q)
    c = int(np.nonzero(cum >= 0.9)[0][0])
    after_top_p = set(range(c + 1))
    want = {i for i in after_top_p if z[0, i] >= 2.0 + math.log(0.3)}
    assert kept(z, SP(top_p=0.9, min_p=0.3)) == want == {0, 1, 2}


def test_all_four_rules_in_order():
    z = [3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -5.0]
    p = SP(top_k=6, top_p=0.95, min_p=0.1, typical_p=0.9)
    # by hand, step by step
    s1 = {0, 1, 2, 3, 4, 5}
    q = softmax_on(z, s1)
    order = sorted(s1, key=lambda i: (-z[i], i))
    cum, c = 0.0, None
    for pos, i in enumerate(order):
        cum += q[i]
        if cum >= 0.95:
            c = pos
            break
    s2 = {i for i in s1 if z[i] >= z[order[c]]}
    s3 = {i for i in s2 if z[i] >= 3.0 + math.log(0.1)}
    q3 = softmax_on(z, s3)
    h = -sum(q3[i] * math.log(q3[i]) for i in s3)
    s = {i: abs(-math.log(q3[i]) - h) for i in s3}
    order = sorted(s3, key=lambda i: (s[i], i))
    cum = 0.0
    for pos, i in enumerate(order):
        cum += q3[i]
        if cum >= 0.9:
            c = pos
            break
    s4 = {i for i in s3 if s[i] <= s[order[c]]}
    assert kept(rows(z), p) == s4
    assert probs(rows(z), p) == pytest.approx(softmax_on(z, s4), rel=1e-12)


# ------------------------------------------------------------------------------------------------- mirostat


def test_mirostat_v2_keep_and_update():
    q = [0.5, 0.3, 0.12, 0.08]
    x = rows([math.log(v) for v in q])
    tau, eta = 1.5, 0.125  # exact in float32, the parameters' precision
    p = SP(mirostat_mode=2, mirostat_target=tau, mirostat_lr=eta)
    # mu starts at 2 tau = 3: keep q >= 2^-3 = 0.125 -> ids 0, 1 (0.12 falls out)
    assert kept(x, p.replace(seed=0)) == {0, 1}
    qk = {0: 0.5 / 0.8, 1: 0.3 / 0.8}
    seen = set()
    for seed in range(24):
        out = ref.sample(x, p.replace(seed=seed))
        tok = int(out.tokens[0])
        assert tok in qk
        seen.add(tok)
        assert out.mirostat_mu[0] == pytest.approx(3.0 - eta * (-math.log2(qk[tok]) - tau), rel=1e-12)
    assert seen == {0, 1}
    # explicit mu = 1: keep q >= 0.5 -> id 0 only, q' = 1, surprise 0: mu' = 1 - 0.125 (0 - 1.5) = 1.1875
    out = ref.sample(x, p.replace(seed=3), mirostat_mu=np.array([1.0]))
    assert out.tokens.tolist() == [0] and out.mirostat_mu[0] == pytest.approx(1.1875, rel=1e-12)
    assert kept(x, p, mirostat_mu=np.array([1.0])) == {0}


def test_mirostat_v2_none_kept_keeps_tied_argmax():
    x = rows([math.log(0.4), math.log(0.4), math.log(0.2)])
    p = SP(mirostat_mode=2, mirostat_target=2.0, mirostat_lr=0.5)
    # mu = 0.5: 2^-0.5 = 0.707 > every q -> keep the argmax, with its tie
    assert kept(x, p, mirostat_mu=np.array([0.5])) == {0, 1}
    out = ref.sample(x, p.replace(seed=11), mirostat_mu=np.array([0.5]))
    assert int(out.tokens[0]) in (0, 1)
    assert out.mirostat_mu[0] == pytest.approx(0.5 - 0.5 * (1.0 - 2.0), rel=1e-12)  # q' = 1/2: 1 bit


def test_mirostat_ignores_min_keep():
    x = rows([math.log(v) for v in (0.5, 0.3, 0.12, 0.08)])
    assert kept(x, SP(mirostat_mode=2, min_keep=3), mirostat_mu=np.array([1.0])) == {0}
    assert kept(x, SP(mirostat_mode=1, min_keep=3), mirostat_mu=np.array([1.0])) == {0}


def mirostat_v1_k_by_hand(q_sorted, mu, n):
    m = min(100, len(q_sorted))
    num = den = 0.0
    for i in range(m - 1):
        t = math.log((i + 2) / (i + 1))
        b = math.log(q_sorted[i] / q_sorted[i + 1])
        num += t * b
        den += t * t
    s = num / den
    eps = s - 1.0
    if abs(eps) < 1e-6:
        return (2.0**mu / math.log(n)) ** (1.0 / s)
    return ((eps * 2.0**mu) / (1.0 - n ** (-eps))) ** (1.0 / s)


def test_mirostat_v1_hand_computed():
    q = [0.5, 0.25, 0.125, 0.125]
    t = [math.log(2), math.log(1.5), math.log(4 / 3)]
    b = [math.log(2), math.log(2), 0.0]
    s = sum(ti * bi for ti, bi in zip(t, b, strict=True)) / sum(ti * ti for ti in t)
    assert s == pytest.approx(1.0465678, rel=1e-6)
    eps = s - 1
    x = rows([math.log(v) for v in q])
    tau, eta = 2.0, 0.25
    p = SP(mirostat_mode=1, mirostat_target=tau, mirostat_lr=eta)
    for mu, k_real, k_set in ((1.0, 1.4636, {0}), (2.0, 2.8380, {0, 1}), (3.0, 5.5036, {0, 1, 2, 3})):
        k = ((eps * 2.0**mu) / (1.0 - 4.0 ** (-eps))) ** (1.0 / s)  # N = 4
        assert k == pytest.approx(k_real, abs=1e-3)
        assert ref.mirostat_v1_k(np.log(np.array(q)), mu, 4) == pytest.approx(k, rel=1e-12)
        assert kept(x, p, mirostat_mu=np.array([mu])) == k_set
    # the update, with q renormalised over the kept set: mu = 2 keeps ids 0, 1 -> q' = (2/3, 1/3)
    qk = {0: 2 / 3, 1: 1 / 3}
    for seed in range(8):
        out = ref.sample(x, p.replace(seed=seed), mirostat_mu=np.array([2.0]))
        tok = int(out.tokens[0])
        assert out.mirostat_mu[0] == pytest.approx(2.0 - eta * (-math.log2(qk[tok]) - tau), rel=1e-12)


@pytest.mark.parametrize("mu,k_set", [(2.0, {0}), (3.0, {0, 1, 2}), (4.0, set(range(7))), (5.0, set(range(8)))])
def test_mirostat_v1_zipf_uses_the_limit_form(mu, k_set):
    # q_i ~ 1 / (i + 1): b_i = t_i for every pair, so s = 1, eps = 0 and k = 2^mu / ln N (N = 8)
    n = 8
    x = rows([-math.log(i + 1) for i in range(n)])
    k = 2.0**mu / math.log(n)  # 1.92, 3.85, 7.69, 15.4
    assert ref.mirostat_v1_k(x[0] - math.log(sum(1 / (i + 1) for i in range(n))), mu, n) == pytest.approx(k, rel=1e-9)
    assert kept(x, SP(mirostat_mode=1), mirostat_mu=np.array([mu])) == k_set
    # N is the vocabulary size: padding columns do not count
    xp = np.concatenate([x, np.full((1, 3), 9.0)], axis=1)
    assert kept(xp, SP(mirostat_mode=1), mirostat_mu=np.array([mu]), vocab_size=n) == k_set


def test_mirostat_v1_uses_the_top_100_tokens():
    rng = np.random.default_rng(5)
    v = 150
    x = np.sort(rng.normal(scale=1.5, size=v))[::-1].copy()
    q = np.exp(x - x.max())
    q /= q.sum()
    for mu in (3.0, 5.0, 6.5):
        k = mirostat_v1_k_by_hand(list(q), mu, v)
        assert abs(k - round(k)) > 1e-3  # not at a rounding boundary
        ki = min(max(math.floor(k), 1), v)
        perm = rng.permutation(v)  # ids do not matter, only values
        xs = np.empty(v)
        xs[perm] = x
        got = kept(xs[None], SP(mirostat_mode=1), mirostat_mu=np.array([mu]))
        assert got == set(perm[:ki].tolist())


def test_mirostat_v1_single_finite_token():
    # no pair to estimate s from: k = N, the one finite token is kept
    x = rows([-INF, 1.0, -INF])
    out = ref.sample(x, SP(mirostat_mode=1, seed=0, mirostat_target=3.0, mirostat_lr=0.5))
    assert out.tokens.tolist() == [1]
    assert out.mirostat_mu[0] == pytest.approx(6.0 - 0.5 * (0.0 - 3.0), rel=1e-12)


def test_mirostat_mu_defaults():
    x = rows([0.0, 0.0], [0.0, 0.0], [0.0, -LN2])
    ps = [SP(seed=1), SP(mirostat_mode=2, mirostat_target=4.0, seed=1), SP(mirostat_mode=1, seed=1)]
    out = ref.sample(x, ps)
    assert math.isnan(out.mirostat_mu[0])
    # q = 1/2 each: keep both (2^-8 <= 1/2), surprise 1 bit -> mu' = 8 - 0.1 (1 - 4)
    assert out.mirostat_mu[1] == pytest.approx(8.0 + 3 * float(np.float32(0.1)), rel=1e-12)  # eta is float32
    # v1, mu = 10: one pair with b = t = ln 2, s = 1, k = 2^10 / ln 2 -> both kept, q = (2/3, 1/3)
    q = {0: 2 / 3, 1: 1 / 3}[int(out.tokens[2])]
    eta = float(np.float32(0.1))  # the default learning rate as the float32 parameter every backend uses
    assert out.mirostat_mu[2] == pytest.approx(10.0 - eta * (-math.log2(q) - 5.0), rel=1e-12)




@pytest.mark.parametrize("mu", [1.0, 3.0, 10.0])
def test_mirostat_v1_all_tied(mu):
    # every pair has b = 0: s = 0, eps = -1, k = (2^mu / (N - 1)) ** (1 / 0): +inf (-> N) when 2^mu > N - 1, else 0
    # (-> 1, with its ties). Either way all five tied tokens are kept and the surprise is log2 5 bits.
    x = np.zeros((1, 5))
    p = SP(mirostat_mode=1, mirostat_target=2.0, mirostat_lr=0.5, seed=4)
    assert kept(x, p, mirostat_mu=np.array([mu])) == {0, 1, 2, 3, 4}
    out = ref.sample(x, p, mirostat_mu=np.array([mu]))
    assert out.valid[0]
    assert out.mirostat_mu[0] == pytest.approx(mu - 0.5 * (math.log2(5) - 2.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------- F: the race


@pytest.mark.parametrize("v", [1, 7, 111, 4096])
def test_race_single_tile_matches_definition(v):
    rng = np.random.default_rng(v)
    x = rng.normal(size=(1, v))
    for seed in (0, 1, 2**40 + 3, 2**64 - 1):
        for step, seq in ((0, 0), (5, 1), (2**32 - 1, 7)):
            out = ref.sample(x, SP(seed=seed), steps=np.array([step]), seqs=np.array([seq]))
            want, _, _ = race(x[0], np.ones(v, dtype=bool), seed, step, seq)
            assert out.tokens[0] == want


def test_race_several_tiles_matches_definition():
    v = 3 * TILE + 123  # four tiles, the last one short
    rng = np.random.default_rng(11)
    x = rng.normal(size=v)
    tiles = set()
    for seed in range(24):
        out = ref.sample(x[None], SP(seed=seed), steps=np.array([seed * 3]))
        want, tm, km = race(x, np.ones(v, dtype=bool), seed, seed * 3)
        assert out.tokens[0] == want, (seed, tm, km)
        tiles.add(want // TILE)
    assert len(tiles) >= 3  # the tile level really chooses between tiles


def test_race_kept_tokens_in_some_tiles_only():
    v = 4 * TILE + 7  # five tiles
    rng = np.random.default_rng(12)
    x = rng.normal(size=v)
    allowed = list(range(TILE + 10, TILE + 60)) + list(range(4 * TILE, 4 * TILE + 7)) + [3 * TILE + 5]
    mask = np.zeros(v, dtype=bool)
    mask[allowed] = True
    chosen = set()
    for seed in range(30):
        p = SP(seed=seed, allowed_token_ids=allowed)
        out = ref.sample(x[None], p, steps=np.array([7]), seqs=np.array([seed % 3]))
        want, _, _ = race(x, mask, seed, 7, seed % 3)
        assert out.tokens[0] == want
        chosen.add(want // TILE)
    assert chosen <= {1, 3, 4} and len(chosen) >= 2


def test_race_after_top_k_across_tiles():
    v = 3 * TILE
    x = np.full(v, -2.0)
    top = [5, 2 * TILE + 1, 2 * TILE + 4095, TILE + 17]
    x[top] = [3.0, 3.2, 2.9, 3.1]
    keep = np.zeros(v, dtype=bool)
    keep[top] = True
    for seed in range(16):
        out = ref.sample(x[None], SP(seed=seed, top_k=4, temperature=0.8))
        want, _, _ = race(x / 0.8, keep, seed)
        assert out.tokens[0] == want


def test_race_with_penalties_and_temperature():
    v = TILE + 300
    rng = np.random.default_rng(13)
    x = rng.normal(size=v)
    p = SP(temperature=0.7, repetition_penalty=1.5, frequency_penalty=0.3, logit_bias={4100: 2.0})
    prompt, output = [1, 2, 4100], [2, 2, 9]
    z = ref.process_logits(x[None], p, prompt_token_ids=[prompt], output_token_ids=[output])[0]
    for seed in range(8):
        out = ref.sample(x[None], p.replace(seed=seed), prompt_token_ids=[prompt], output_token_ids=[output])
        want, _, _ = race(z, np.isfinite(z), seed)
        assert out.tokens[0] == want


def test_step_and_seq_change_the_draw_and_wrap_mod_2_32():
    x = np.zeros((1, 4096))
    base = [int(ref.sample(x, SP(seed=s), steps=np.array([3])).tokens[0]) for s in range(6)]
    wrap = [int(ref.sample(x, SP(seed=s), steps=np.array([3 + 2**32])).tokens[0]) for s in range(6)]
    assert base == wrap
    other = [int(ref.sample(x, SP(seed=s), steps=np.array([4])).tokens[0]) for s in range(6)]
    assert other != base
    seqs = [int(ref.sample(x, SP(seed=s), steps=np.array([3]), seqs=np.array([1])).tokens[0]) for s in range(6)]
    assert seqs != base


def test_seeds_argument_is_the_uint64_bit_pattern():
    x = np.zeros((1, 1000))
    a = ref.sample(x, SP(seed=2**64 - 1)).tokens
    b = ref.sample(x, SP(seed=5), seeds=np.array([-1], dtype=np.int64)).tokens  # overrides params.seed
    assert a.tolist() == b.tolist()
    c = ref.sample(x, SP(seed=2**63 + 9)).tokens
    d = ref.sample(x, SP(), seeds=np.array([-(2**63) + 9], dtype=np.int64)).tokens
    assert c.tolist() == d.tolist()


def test_seed_none_draws_a_fresh_seed_per_call():
    x = np.zeros((1, 4096))
    toks = {int(ref.sample(x, SP()).tokens[0]) for _ in range(5)}
    assert len(toks) > 1  # all five equal by chance: probability 4096^-4


# ------------------------------------------------------------------------------------------- invalid rows


def test_invalid_rows_and_their_outputs():
    x = np.array([
        [0.0, 1.0, 2.0, 3.0],  # 0 valid
        [-INF, -INF, -INF, -INF],  # 1 nothing finite
        [0.0, NAN, 1.0, 2.0],  # 2 NaN
        [0.0, 1.0, INF, 2.0],  # 3 +inf
        [0.0, 1.0, 2.0, 3.0],  # 4 every id banned
        [1e30, 0.0, 0.0, 0.0],  # 5 z = l / T overflows float32: +inf after D
        [0.0, 1.0, 2.0, 3.0],  # 6 every id biased to -inf
        [0.0, 1.0, -INF, 3.0],  # 7 valid, mirostat
    ], dtype=np.float32)
    lp = {"logprobs": True, "top_logprobs": 3}
    ps = [SP(seed=1, **lp), SP(seed=2, mirostat_mode=2, **lp), SP(seed=3, temperature=0.0, **lp), SP(seed=4, **lp),
          SP(seed=5, banned_token_ids=[0, 1, 2, 3], **lp), SP(seed=6, temperature=1e-10, **lp),
          SP(seed=7, logit_bias={0: -INF, 1: -INF, 2: -INF, 3: -INF}, **lp), SP(seed=8, mirostat_mode=2, **lp)]
    mu_in = np.array([NAN, 3.7, NAN, NAN, NAN, NAN, NAN, 10.0])
    out = ref.sample(x, ps, mirostat_mu=mu_in)
    bad = [1, 2, 3, 4, 5, 6]
    assert out.valid.tolist() == [True, False, False, False, False, False, False, True]
    assert out.tokens[bad].tolist() == [-1] * 6
    assert np.all(np.isnan(out.logprobs[bad]))
    assert np.all(out.top_logprob_ids[bad] == -1) and np.all(np.isnan(out.top_logprobs[bad]))
    assert out.ranks[bad].tolist() == [-1] * 6
    assert out.mirostat_mu[1] == np.float32(3.7)  # passed through unchanged (mu is float32 state)
    assert np.all(np.isnan(out.mirostat_mu[[0, 2, 3, 4, 5, 6]]))
    pr = ref.sampling_probs(x, ps, mirostat_mu=mu_in)
    assert np.all(pr[bad] == 0)
    # the valid rows are unaffected by their neighbours
    for r in (0, 7):
        alone = ref.sample(x[r:r + 1], [ps[r]], mirostat_mu=mu_in[r:r + 1])
        assert out.tokens[r] == alone.tokens[0] and out.logprobs[r] == alone.logprobs[0]
        np.testing.assert_array_equal(out.mirostat_mu[r], alone.mirostat_mu[0])
        assert pr[r] == pytest.approx(ref.sampling_probs(x[r:r + 1], [ps[r]], mirostat_mu=mu_in[r:r + 1])[0])


def test_nan_and_inf_in_padding_do_not_invalidate():
    x = rows([0.0, 1.0, 2.0, NAN, INF])
    out = ref.sample(x, SP(seed=0), vocab_size=3)
    assert out.valid[0] and 0 <= out.tokens[0] < 3


def test_minus_inf_entries_are_fine():
    x = rows([-INF, 1.0, -INF, 0.0])
    for seed in range(10):
        out = ref.sample(x, SP(seed=seed))
        assert out.valid[0] and out.tokens[0] in (1, 3)


# ------------------------------------------------------------------------------------------------ logprobs


def test_logprobs_raw_ignores_processing():
    x = rows([1.0, 2.0, 0.5, -1.0])
    p = SP(temperature=0.5, top_k=1, logit_bias={3: 50.0}, logprobs=True, top_logprobs=2)
    out = ref.sample(x, p.replace(seed=0))
    raw = log_softmax([1.0, 2.0, 0.5, -1.0])
    assert out.tokens[0] == 3  # the bias made it the only top-1 survivor
    assert out.logprobs[0] == pytest.approx(raw[3], rel=1e-12)
    assert out.ranks[0] == 4
    assert out.top_logprob_ids[0].tolist() == [1, 0]
    assert out.top_logprobs[0] == pytest.approx([raw[1], raw[0]], rel=1e-12)


def test_logprobs_processed_is_after_a_to_d():
    x = rows([1.0, 2.0, 0.5, -1.0])
    p = SP(temperature=2.0, top_k=2, banned_token_ids=[0], logit_bias={3: 5.0}, logprobs=True, top_logprobs=4,
           logprobs_mode="processed", seed=0)
    z = [-INF, 1.0, 0.25, 2.0]  # ((x + bias) masked) / T
    want = log_softmax(z)
    out = ref.sample(x, p)
    assert out.tokens[0] in (1, 3)  # top_k = 2 keeps ids 3 and 1; processed logprobs ignore the truncation
    assert out.logprobs[0] == pytest.approx(want[out.tokens[0]], rel=1e-12)
    assert out.top_logprob_ids[0].tolist() == [3, 1, 2, 0]
    assert out.top_logprobs[0, :3] == pytest.approx(want[[3, 1, 2]], rel=1e-12)
    assert out.top_logprobs[0, 3] == -INF


def test_logprobs_final_is_the_drawn_distribution():
    x = rows([1.0, 3.0, 3.0, 2.0, 0.0])
    p = SP(top_k=2, logprobs=True, top_logprobs=4, logprobs_mode="final")
    for seed in range(6):
        out = ref.sample(x, p.replace(seed=seed))
        assert out.tokens[0] in (1, 2)
        assert out.logprobs[0] == pytest.approx(math.log(0.5), rel=1e-12)
        assert out.ranks[0] == 1
        assert out.top_logprob_ids[0].tolist() == [1, 2, 0, 3]  # then -inf entries, lowest ids first
        assert out.top_logprobs[0, :2] == pytest.approx([math.log(0.5)] * 2, rel=1e-12)
        assert out.top_logprobs[0, 2:].tolist() == [-INF, -INF]


def test_top_logprobs_ties_ordered_by_id_and_rank_counts_strictly_greater():
    x = rows([1.0, 2.0, 2.0, 0.0, 2.0])
    raw = log_softmax([1.0, 2.0, 2.0, 0.0, 2.0])
    for token, rank in ((4, 1), (2, 1), (0, 4), (3, 5)):
        out = ref.sample(x, SP(allowed_token_ids=[token], logprobs=True, top_logprobs=4, seed=0))
        assert out.tokens[0] == token and out.ranks[0] == rank
        assert out.logprobs[0] == pytest.approx(raw[token], rel=1e-12)
        assert out.top_logprob_ids[0].tolist() == [1, 2, 4, 0]
        assert out.top_logprobs[0] == pytest.approx(raw[[1, 2, 4, 0]], rel=1e-12)


def test_top_logprobs_width_and_padding_across_rows():
    x = np.tile(rows([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), (3, 1))
    ps = [SP(seed=0, logprobs=True, top_logprobs=2), SP(seed=1, logprobs=True, top_logprobs=5), SP(seed=2)]
    out = ref.sample(x, ps)
    assert out.top_logprob_ids.shape == (3, 5) and out.top_logprobs.shape == (3, 5)
    assert out.top_logprob_ids[0].tolist() == [5, 4, -1, -1, -1]
    assert np.all(np.isnan(out.top_logprobs[0, 2:]))
    assert out.top_logprob_ids[1].tolist() == [5, 4, 3, 2, 1]
    # logprobs off: NaN, rank -1, top entries padded
    assert math.isnan(out.logprobs[2]) and out.ranks[2] == -1
    assert np.all(out.top_logprob_ids[2] == -1) and np.all(np.isnan(out.top_logprobs[2]))
    # logprobs on, no top entries: width 0
    out = ref.sample(x[:1], SP(seed=0, logprobs=True))
    assert out.top_logprob_ids.shape == (1, 0) and not math.isnan(out.logprobs[0]) and out.ranks[0] >= 1


def test_output_dtypes():
    out = ref.sample(rows([0.0, 1.0]), SP(seed=0, logprobs=True, top_logprobs=1))
    assert out.tokens.dtype == np.int64 and out.valid.dtype == np.bool_ and out.ranks.dtype == np.int64
    assert out.top_logprob_ids.dtype == np.int64
    assert out.tokens.shape == out.valid.shape == out.logprobs.shape == out.ranks.shape == out.mirostat_mu.shape == (1,)


# ------------------------------------------------------------------------------------ batch invariance, dtypes


def test_batch_invariance():
    rng = np.random.default_rng(21)
    v = 300
    x = rng.normal(size=(6, v))
    ps = [SP(seed=1), SP(seed=2, top_k=20, top_p=0.8, temperature=0.7, logprobs=True, top_logprobs=3),
          SP(seed=3, temperature=0.0), SP(seed=4, mirostat_mode=2, mirostat_target=3.0),
          SP(seed=5, typical_p=0.7, min_p=0.02, repetition_penalty=1.2, logprobs=True, logprobs_mode="final"),
          SP(seed=6, mirostat_mode=1, frequency_penalty=0.5)]
    prompts = [[1, 2], [], [3], [4, 5, 6], [7], [8]]
    outs = [[9], [10, 10], [], [11], [12], [13, 13, 13]]
    steps = np.array([0, 5, 9, 2, 2**32 + 1, 7])
    full = ref.sample(x, ps, prompt_token_ids=prompts, output_token_ids=outs, steps=steps)
    order = [5, 2, 0, 4, 1, 3]
    perm = ref.sample(x[order], [ps[i] for i in order], prompt_token_ids=[prompts[i] for i in order],
                      output_token_ids=[outs[i] for i in order], steps=steps[order])
    for pos, r in enumerate(order):
        alone = ref.sample(x[r:r + 1], [ps[r]], prompt_token_ids=[prompts[r]], output_token_ids=[outs[r]],
                           steps=steps[r:r + 1])
        for got in (full, perm):
            i = r if got is full else pos
            assert got.tokens[i] == alone.tokens[0]
            np.testing.assert_array_equal(got.logprobs[i], alone.logprobs[0])
            np.testing.assert_array_equal(got.ranks[i], alone.ranks[0])
            np.testing.assert_array_equal(got.mirostat_mu[i], alone.mirostat_mu[0])


def test_half_precision_logits_are_read_as_they_are():
    x16 = np.array([[0.1, 0.2, 0.3]], dtype=np.float16)
    z = ref.process_logits(x16, SP())
    assert z.tolist() == x16.astype(np.float64).tolist()
    a = ref.sample(x16, SP(seed=9, logprobs=True))
    b = ref.sample(x16.astype(np.float64), SP(seed=9, logprobs=True))
    assert a.tokens.tolist() == b.tokens.tolist() and a.logprobs.tolist() == b.logprobs.tolist()


# ------------------------------------------------------------------------------------------------ diagnose


def test_diagnose_flags_a_truncation_boundary_and_not_a_clean_row():
    x = rows([LN2, 0.0, 0.0, -30.0], [3.0, 1.0, 0.0, -1.0])
    d = ref.diagnose(x, [SP(top_p=0.75, seed=0), SP(top_p=0.5, seed=0)])
    assert d["near_tie"].dtype == np.bool_ and d["near_tie"].tolist() == [True, False]
    assert any("top_p" in r for r in d["reasons"][0]) and d["reasons"][1] == []


def test_diagnose_flags_race_near_ties():
    # two equal logits whose race scores differ by < 1e-4: seed 15954 is the first seed whose noise for ids 0 and 1
    # (step 0, seq 0) nearly agrees (|ln E_0 - ln E_1| = 7.9e-5), found by scanning seeds with the noise of
    # docs/semantics.md §7
    x = np.zeros((1, 2))
    seed = 15954
    e = noise(words(seed, 0, 0, 0, np.array([0, 1])))
    assert abs(math.log(e[0]) - math.log(e[1])) < 1e-4
    d = ref.diagnose(x, SP(seed=seed))
    assert d["near_tie"].tolist() == [True] and any("race" in r for r in d["reasons"][0])


def test_diagnose_flags_rounding_level_boundaries():
    x = rows([1.0, 1.0 + 1e-12, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0])
    d = ref.diagnose(x, [SP(temperature=0.0), SP(temperature=0.0)])
    assert d["near_tie"].tolist() == [True, False] and any("greedy" in r for r in d["reasons"][0])
    d = ref.diagnose(x, [SP(top_k=1, seed=0), SP(top_k=1, seed=0)])
    assert d["near_tie"].tolist() == [True, False] and any("top_k" in r for r in d["reasons"][0])
    # the decision itself is still the exact one: top_k = 1 keeps only the (slightly) larger value
    assert kept(x[:1], SP(top_k=1)) == {1}


# -------------------------------------------------------------------------------------- inputs and their errors


def test_token_ids_are_checked_against_the_vocabulary():
    x = np.zeros((2, 6))
    with pytest.raises(ValueError, match=r"allowed_token_ids of row 1 holds token id 9, outside the vocabulary \[0, 6"):
        ref.sample(x, [SP(seed=0), SP(seed=0, allowed_token_ids=[1, 9])])
    with pytest.raises(ValueError, match=r"banned_token_ids of row 0 holds token id 5, outside the vocabulary \[0, 5"):
        ref.sample(x, SP(seed=0, banned_token_ids=[5]), vocab_size=5)
    with pytest.raises(ValueError, match=r"logit_bias of row 0 holds token id 6"):
        ref.sample(x, SP(seed=0, logit_bias={6: 1.0}))
    with pytest.raises(ValueError, match=r"prompt_token_ids of row 1 holds token id 7"):
        ref.sample(x, SP(seed=0), prompt_token_ids=[[0], [7]])
    with pytest.raises(ValueError, match=r"output_token_ids of row 0 holds token id -1"):
        ref.sample(x, SP(seed=0), output_token_ids=[[-1], []])
    with pytest.raises(ValueError, match=r"eos_token_ids holds token id 6, outside the vocabulary \[0, 6\)"):
        ref.sample(x, SP(seed=0), eos_token_ids=[6])
    with pytest.raises(ValueError, match=r"vocab_size must be an integer in \[1, 6\]"):
        ref.sample(x, SP(seed=0), vocab_size=7)
    with pytest.raises(ValueError, match=r"params must be one SamplingParams or a sequence of batch_size=2, got 3"):
        ref.sample(x, [SP()] * 3)


def test_torch_bfloat16_logits_are_upcast_exactly():
    torch = pytest.importorskip("torch")
    xb = torch.tensor([[0.1, 1.3, -2.7, 0.55]], dtype=torch.bfloat16)
    z = ref.process_logits(xb, SP())
    assert z.tolist() == xb.float().numpy().astype(np.float64).tolist()
    a = ref.sample(xb, SP(seed=3, logprobs=True))
    b = ref.sample(xb.float().numpy(), SP(seed=3, logprobs=True))
    assert a.tokens.tolist() == b.tokens.tolist() and a.logprobs.tolist() == b.logprobs.tolist()


def test_sampling_probs_rows_sum_to_one():
    rng = np.random.default_rng(31)
    x = rng.normal(size=(5, 50))
    ps = [SP(), SP(top_k=5), SP(top_p=0.5, min_p=0.1), SP(typical_p=0.6, temperature=1.7), SP(mirostat_mode=2)]
    pr = ref.sampling_probs(x, ps)
    assert pr.sum(axis=1) == pytest.approx(np.ones(5), rel=1e-12)
    assert np.all(pr >= 0)
