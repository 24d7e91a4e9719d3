"""Hostile inputs for the C++ CPU backend (`backends.cpu._C`): values at the edge of the float32 range, negative output
counts, huge vocabularies (scratch memory) and the exact kept set.

- Typical-p on ``[3e38, -3e38]``: the second token's float32 ``z - M`` overflows to ``-inf`` and its weight is 0; the
  entropy must still be finite (``0 · ln 0 = 0``, docs/semantics.md §3 E item 4). It used to give ``0 · -inf = NaN``
  and an endless walk, so these cases run in a subprocess with a time limit.
- Negative entries of ``output_counts`` count as 0 (docs/semantics.md §3 B, C).
- ``scratch_bytes``: a one-off call on a huge row frees its per-thread buffers; normal calls keep theirs.
- ``kept_mask_packed``: the kept set itself, also where a kept token's float32 probability is 0.
- ``l / T`` below ``-FLT_MAX`` is ``-inf`` in float32 (a masked token, docs/semantics.md §5): a row where every token
  does so is invalid; a row where only some do samples among the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler._batch import pack_batch
from fastsampler.backends import cpu as fcpu
from fastsampler.backends.reference import pipeline
from tests.backend_checks import NearTieWarning, check_against_reference

pytestmark = pytest.mark.skipif(
    not fcpu.is_available()[0], reason=f"the C++ CPU backend (backends.cpu._C) is unavailable: {fcpu.is_available()[1]}"
)

# the sanitized build (tools/sanitize.sh) is several times slower, including the subprocess' start
HANG_TIMEOUT_S = 300 if os.environ.get("FASTSAMPLER_SANITIZED") else 120


def _batch(logits, **kw):
    seed = kw.pop("seed", 1)
    state = {k: kw.pop(k) for k in ("output_counts", "prompt_token_ids") if k in kw}
    t = torch.as_tensor(logits, dtype=torch.float32) if not isinstance(logits, torch.Tensor) else logits
    return pack_batch(t, SamplingParams(seed=seed, **kw), **state)


# ------------------------------------------------------------------------------------ typical-p at the float32 edge
# (params, kept set of [3e38, -3e38]); rows 1-4 are the non-fused typical path, 5-6 the fused one (typical alone)
EDGE_CASES = [
    (dict(typical_p=0.5, top_k=2), [True, False]),
    (dict(typical_p=0.5, top_p=0.5, min_keep=2), [True, True]),
    (dict(typical_p=0.5, min_p=0.1, min_keep=2), [True, True]),
    (dict(typical_p=0.5, top_k=2, min_keep=2), [True, True]),
    (dict(typical_p=0.5), [True, False]),
    (dict(typical_p=0.5, min_keep=2), [True, True]),
]
WIDE_V, WIDE_NEG = 10000, 9000  # a wide row: [3e38, randn..., -3e38 at WIDE_NEG, ...] (the large mass selection)

_CHILD = r"""
import json, sys
import torch
from fastsampler import SamplingParams
from fastsampler.backends import cpu
from fastsampler._batch import pack_batch

args = json.loads(sys.stdin.read())
dtype = getattr(torch, args["dtype"])
cases, rows = args["cases"], args["rows"]
out = []
for row in rows:
    x = torch.tensor([row], dtype=torch.float32).to(dtype)
    for c in cases:
        b = pack_batch(x, SamplingParams(seed=1, **c))
        out.append({
            "token": int(cpu.sample_packed(b).tokens[0]),
            "probs": cpu.sampling_probs_packed(b)[0].tolist(),
            "kept": cpu.kept_mask_packed(b)[0].tolist(),
        })
print(json.dumps(out))
"""


def _wide_row() -> list[float]:
    row = np.random.default_rng(3).standard_normal(WIDE_V).astype(np.float32)
    row[0], row[WIDE_NEG] = 3e38, -3e38
    return row.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_typical_entropy_at_float32_edge_terminates(dtype):
    """Every case finishes (in a child process with a time limit) and gives the reference's token: 0."""
    cases = [c for c, _ in EDGE_CASES]
    rows = [[3e38, -3e38], _wide_row()]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD], input=json.dumps({"dtype": dtype, "cases": cases, "rows": rows}),
            capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sampling [3e38, -3e38] with typical-p ({dtype}) did not finish in {HANG_TIMEOUT_S} s (hang)")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    i = 0
    for r, row in enumerate(rows):
        # the reference sees the values the kernel reads (bfloat16-rounded)
        x = torch.tensor([row], dtype=torch.float32).to(getattr(torch, dtype)).float().numpy().astype(np.float64)
        for c, kept in EDGE_CASES:
            p = SamplingParams(seed=1, **c)
            g = got[i]
            i += 1
            want = int(fastsampler.reference.sample(x, p).tokens[0])
            assert want == 0
            assert g["token"] == want, (dtype, r, c, g["token"])
            want_p = fastsampler.reference.sampling_probs(x, p)[0]
            np.testing.assert_allclose(np.array(g["probs"]), want_p, atol=1e-5, err_msg=f"{dtype} row {r} {c}")
            if r == 0:  # (the wide row's typical scores tie in float32 around 3e38: only its token is compared)
                assert g["kept"] == kept, (dtype, c, g["kept"])


def test_resolve_walk_terminates_with_zero_weight_tokens():
    """Survivors of weight 0 (z - M below the exp range) next to a huge maximum: top-p, typical, min-p all finish."""
    row = np.zeros(300, dtype=np.float32)
    row[::7] = -3e38
    row[5] = 3e38
    for kw in (dict(top_p=0.5), dict(top_p=0.5, min_keep=40), dict(typical_p=0.3, min_keep=5),
               dict(min_p=0.5, typical_p=0.9, min_keep=3), dict(typical_p=0.9, top_k=50)):
        b = _batch(row[None], **kw)
        assert int(fcpu.sample_packed(b).tokens[0]) == 5, kw
        assert fcpu.kept_mask_packed(b)[0, 5], kw


# ------------------------------------------------------------------------------------------ negative output counts
def _counts_pair(cdtype: torch.dtype, b: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hostile counts with negative entries, the same with those entries set to 0)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (b, v), generator=g, dtype=torch.int32)
    counts[torch.rand(b, v, generator=g) < 0.7] = 0
    neg = torch.rand(b, v, generator=g) < 0.25
    neg[:, -3:] = True  # the partial last word of the counts row (a scalar path)
    neg[:, :40] = True  # a full word (the vector path)
    lowest = -32768 if cdtype == torch.int16 else -(2**31)
    vals = torch.where(torch.rand(b, v, generator=g) < 0.5, torch.tensor(-1, dtype=torch.int32),
                       torch.tensor(lowest, dtype=torch.int32))
    if cdtype == torch.int32:
        vals[:, ::5] = -32768
    hostile = torch.where(neg, vals, counts).to(cdtype)
    clean = torch.where(neg, torch.zeros_like(counts), counts).to(cdtype)
    return hostile, clean


def _penalty_params(b: int) -> list[SamplingParams]:
    rules = [dict(), dict(top_k=20), dict(top_p=0.8), dict(typical_p=0.9), dict(min_p=0.05), dict(temperature=0.0)]
    return [SamplingParams(seed=100 + r, repetition_penalty=1.3, frequency_penalty=2.0, presence_penalty=0.7,
                           **rules[r % len(rules)]) for r in range(b)]


@pytest.mark.parametrize("cdtype", [torch.int16, torch.int32])
@pytest.mark.parametrize("vocab", [1000, 4100])
def test_negative_counts_count_as_zero(cdtype, vocab):
    b = 6
    logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    hostile, clean = _counts_pair(cdtype, b, vocab, seed=vocab + 1)
    params = _penalty_params(b)
    prompts = [[1, 2, 3, 45, vocab - 1]] * b  # prompt tokens with negative counts: repetition only
    bh = pack_batch(logits, params, output_counts=hostile, prompt_token_ids=prompts)
    bc = pack_batch(logits, params, output_counts=clean, prompt_token_ids=prompts)
    assert torch.equal(fcpu.sample_packed(bh).tokens, fcpu.sample_packed(bc).tokens)
    assert torch.equal(fcpu.sampling_probs_packed(bh), fcpu.sampling_probs_packed(bc))
    assert torch.equal(fcpu.kept_mask_packed(bh), fcpu.kept_mask_packed(bc))
    # each of -1 and the dtype's minimum alone, on a row where treating it as a count would change the token
    for val in (-1, -32768 if cdtype == torch.int16 else -(2**31)):
        c = torch.zeros(1, vocab, dtype=cdtype)
        c[0, 7] = val
        x = torch.zeros(1, vocab)
        x[0, 7] = -1.0  # -1 * 2.0 frequency would lift id 7 to +1, the maximum
        p = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=-2.0, repetition_penalty=0.5)
        assert int(fcpu.sample_packed(pack_batch(x, p, output_counts=c)).tokens[0]) == 0


@pytest.mark.parametrize("cdtype", [torch.int16, torch.int32])
def test_negative_counts_match_reference(cdtype):
    """Against the numpy reference, which clamps negative counts to 0 as well (docs/semantics.md §3 C)."""
    b, vocab = 6, 1000
    logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(11)) * 3
    hostile, _ = _counts_pair(cdtype, b, vocab, seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearTieWarning)
        check_against_reference("cpu", logits, _penalty_params(b), output_counts=hostile,
                                prompt_token_ids=[[1, 2, 3]] * b)


# ---------------------------------------------------------------------------------------------------- scratch
def test_scratch_bytes_bounded_after_a_huge_row():
    cap = fcpu._C.SCRATCH_CAP_BYTES
    assert cap >= 48 * 2**18  # the twelve float32 row buffers of a 2^18-id row fit
    small = _batch(torch.randn(1, 1000), top_p=0.9)
    fcpu.sample_packed(small)
    steady = fcpu.scratch_bytes()
    assert steady > 0
    fcpu.sample_packed(small)  # steady state: buffers kept, nothing reallocated
    assert fcpu.scratch_bytes() == steady

    # a one-off huge row (B = 1: the calling thread) needs ~60 MB; its scratch is freed when the call returns
    huge = _batch(torch.randn(1, 2**20), typical_p=0.9)
    fcpu.sample_packed(huge)
    after = fcpu.scratch_bytes()
    assert after <= steady
    fcpu.sampling_probs_packed(huge)
    fcpu.kept_mask_packed(huge)
    assert fcpu.scratch_bytes() <= steady
    threads = fcpu.get_num_threads()
    big = _batch(torch.randn(2 * threads, 2**20), top_p=0.9)  # the pool's threads too
    fcpu.sample_packed(big)
    # every thread that ran a row freed its float32 scratch; the others did not change
    assert fcpu.scratch_bytes() <= steady
    assert fcpu.scratch_bytes() <= 3 * (threads + 1) * cap  # 3 input dtypes, the caller and the pool threads

    # a 2^18-id row (the size the cap is chosen for) keeps its buffers
    before = fcpu.scratch_bytes()
    fcpu.sample_packed(_batch(torch.randn(1, 2**18), typical_p=0.9, min_keep=2**18))
    assert fcpu.scratch_bytes() >= before + 48 * 2**18
    fcpu.sample_packed(small)
    assert fcpu.scratch_bytes() > 0


# -------------------------------------------------------------------------------------------------- kept mask
def _kept(logits, **kw) -> list[bool]:
    return fcpu.kept_mask_packed(_batch(logits, **kw))[0].tolist()


def test_kept_mask_exact_where_probabilities_underflow():
    assert _kept([[0.0, -200.0, -300.0]], top_k=2) == [True, True, False]
    assert _kept([[0.0, -120.0, -120.0]], typical_p=0.5, min_keep=3) == [True, True, True]
    b = _batch([[0.0, -200.0, -300.0]], top_k=2)
    assert fcpu.sampling_probs_packed(b)[0].tolist() == [1.0, 0.0, 0.0]  # float32: id 1 kept with probability 0
    assert _kept([[0.0, -200.0, -300.0]]) == [True, True, True]  # no truncation: every finite token
    assert _kept([[0.0, -200.0, -300.0]], min_p=0.5) == [True, False, False]
    assert _kept([[1.0, 3.0, 3.0, 2.0]], temperature=0.0, top_k=1) == [False, True, False, False]  # greedy: argmax


def test_kept_mask_invalid_rows_and_padding():
    x = torch.tensor([[0.0, 1.0, 2.0, 5.0, 9.0], [float("nan"), 0.0, 1.0, 2.0, 3.0], [-float("inf")] * 5])
    b = pack_batch(x, [SamplingParams(seed=1, top_k=2)] * 3, vocab_size=3)
    m = fcpu.kept_mask_packed(b)
    assert m.dtype == torch.bool and tuple(m.shape) == (3, 5)
    assert m.tolist() == [[False, True, True, False, False], [False] * 5, [False] * 5]
    g = pack_batch(x[:1], SamplingParams(temperature=0.0), vocab_size=3)
    assert fcpu.kept_mask_packed(g).tolist() == [[False, False, True, False, False]]


RANDOM_RULES = [
    dict(),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=200, min_keep=3),
    dict(top_p=0.5),
    dict(top_p=0.9, top_k=50),
    dict(top_p=0.3, min_keep=10),
    dict(min_p=0.1),
    dict(min_p=0.5, min_keep=4),
    dict(typical_p=0.5),
    dict(typical_p=0.9, min_keep=20),
    dict(typical_p=0.7, top_k=100, top_p=0.95, min_p=0.02),
    dict(mirostat_mode=1, mirostat_target=3.0),
    dict(mirostat_mode=2, mirostat_target=4.0),
    dict(mirostat_mode=2, mirostat_target=0.5),
    dict(temperature=0.0),
    dict(temperature=0.6, top_p=0.8),
    dict(temperature=1.4, typical_p=0.6),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_mask_matches_positive_probabilities(dtype):
    """On ordinary logits (no probability underflows) the kept set is exactly where sampling_probs is > 0."""
    rng = np.random.default_rng(5)
    v = 1000
    for rep in range(3):
        params = [SamplingParams(seed=int(rng.integers(2**31)), **r) for r in RANDOM_RULES]
        x = torch.from_numpy(rng.standard_normal((len(params), v)).astype(np.float32) * 3).to(dtype)
        b = pack_batch(x, params)
        kept = fcpu.kept_mask_packed(b)
        probs = fcpu.sampling_probs_packed(b)
        assert kept.dtype == torch.bool
        for r in range(len(params)):
            assert torch.equal(kept[r], probs[r] > 0), (rep, RANDOM_RULES[r])
        # the drawn token is always in the kept set
        tokens = fcpu.sample_packed(b).tokens
        assert bool(kept[torch.arange(len(params)), tokens].all())
        # against the reference's kept set, away from near-ties (float32 vs float64 rounding at a boundary)
        xr = x.float().numpy().astype(np.float64)
        for r in range(len(params)):
            row = pipeline._rows_from_args(xr[r:r + 1], params[r])[0]
            res = pipeline._run_row(row)
            if res.reasons:
                continue
            keep = getattr(res, "keep", None)  # the reference's kept set, where it records one
            want = np.asarray(keep) if keep is not None else res.probs > 0
            assert kept[r].numpy().tolist() == want.tolist(), (rep, RANDOM_RULES[r])


# ---------------------------------------------------------------------------------- negative overflow of l / T
def test_l_over_t_below_float32_range_is_masked():
    # every token: z = l / T < -FLT_MAX -> -inf: nothing finite, an invalid row
    b = _batch([[-3e38, -2e38]], temperature=1e-3)
    out = fcpu.sample_packed(b)
    assert int(out.tokens[0]) == -1 and not bool(out.valid[0])
    assert fcpu.sampling_probs_packed(b).tolist() == [[0.0, 0.0]]
    assert fcpu.kept_mask_packed(b).tolist() == [[False, False]]
    # only some tokens overflow: the rest are sampled as usual
    x = [[1e-3, -3e38, 0.0, -2e38]]  # z = [1, -inf, 0, -inf]
    b = _batch(x, temperature=1e-3)
    assert fcpu.kept_mask_packed(b).tolist() == [[True, False, True, False]]
    p = fcpu.sampling_probs_packed(b)[0].double()
    e = np.exp([1.0, 0.0])
    np.testing.assert_allclose(p.numpy(), [e[0] / e.sum(), 0.0, e[1] / e.sum(), 0.0], atol=1e-6)
    seen = set()
    for seed in range(64):
        out = fcpu.sample_packed(_batch(x, temperature=1e-3, seed=seed, top_p=0.999))
        assert bool(out.valid[0])
        seen.add(int(out.tokens[0]))
    assert seen == {0, 2}
    # greedy is not affected (no division): the argmax of l
    assert int(fcpu.sample_packed(_batch([[-3e38, -2e38]], temperature=0.0)).tokens[0]) == 1


@pytest.mark.parametrize("row", [[-3e38, -2e38], [1e-3, -3e38, 0.0, -2e38]])
def test_l_over_t_below_float32_range_matches_reference(row):
    p = SamplingParams(temperature=1e-3, seed=4)
    b = _batch([row], temperature=1e-3, seed=4)
    x = np.array([row], dtype=np.float32).astype(np.float64)
    assert int(fcpu.sample_packed(b).tokens[0]) == int(fastsampler.reference.sample(x, p).tokens[0])
    np.testing.assert_allclose(fcpu.sampling_probs_packed(b).numpy(), fastsampler.reference.sampling_probs(x, p),
                               atol=1e-6)


@pytest.mark.parametrize("mode", ["processed", "raw"])
def test_signed_zero_ties_ordered_by_id(mode):
    """-0.0 and +0.0 are one value: top-k keeps both, and top logprobs order them by id. The small selections
    (top-k head, top-N) are ranked branch-free on (value, id); they must read -0 == +0 as the comparison order does."""
    vocab = 100
    x = np.full((2, vocab), -5.0, dtype=np.float32)
    x[:, 10:50:2] = -0.0
    x[:, 11:50:2] = 0.0
    x[1, 60] = 0.0
    params = [SamplingParams(seed=3, top_k=30, logprobs=True, top_logprobs=20, logprobs_mode=mode),
              SamplingParams(seed=4, top_k=3, logprobs=True, top_logprobs=20, logprobs_mode=mode)]
    out = fastsampler.sample(torch.from_numpy(x), params, backend="cpu")
    assert out.top_logprob_ids[0].tolist() == list(range(10, 30))
    assert out.top_logprob_ids[1].tolist() == list(range(10, 30))
    assert 10 <= out.tokens[0].item() < 50 and 10 <= out.tokens[1].item() < 61
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NearTieWarning)
        check_against_reference("cpu", torch.from_numpy(x), params)


def test_advance_arrays_updates_and_checks():
    """`fastsampler.backends.cpu.advance_arrays`, a Sampler step's state update: valid rows step and count (saturating),
    every row stores its mu; a slot or token outside the state raises before anything is written."""
    steps = np.array([5, 7, 9], dtype=np.int64)
    mu = np.zeros(3, dtype=np.float32)
    counts = np.zeros((3, 4), dtype=np.int16)
    counts[0, 2] = 32767
    slots = np.array([2, 0], dtype=np.int64)
    fcpu.advance_arrays(steps, mu, counts, slots, np.array([1, 2]), np.array([True, True]),
                        np.array([1.5, 2.5], dtype=np.float32))
    assert steps.tolist() == [6, 7, 10] and mu.tolist() == [2.5, 0.0, 1.5]
    assert counts[2].tolist() == [0, 1, 0, 0] and counts[0, 2] == 32767
    fcpu.advance_arrays(steps, mu, counts, slots, np.array([-1, 3]), np.array([False, True]),
                        np.array([3.0, 4.0], dtype=np.float32))
    assert steps.tolist() == [7, 7, 10] and mu.tolist() == [4.0, 0.0, 3.0] and counts[0, 3] == 1
    before = (steps.copy(), mu.copy(), counts.copy())
    with pytest.raises(ValueError, match=r"slots holds 3, outside \[0, 3\)"):
        fcpu.advance_arrays(steps, mu, counts, np.array([0, 3]), np.array([0, 0]), np.array([True, True]),
                            np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"tokens holds 4, outside \[0, 4\)"):
        fcpu.advance_arrays(steps, mu, counts, slots, np.array([0, 4]), np.array([True, True]),
                            np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="counts must be int16"):
        fcpu.advance_arrays(steps, mu, counts.astype(np.int32), slots, np.array([0, 0]), np.array([True, True]),
                            np.zeros(2, dtype=np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(before, (steps, mu, counts), strict=True))
