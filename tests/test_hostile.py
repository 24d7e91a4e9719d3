"""Hostile inputs on every backend: no hang, one answer everywhere, and clear errors at the door.

Each case is a value or a call an adversarial user tried: logits at the edges of float32 (``±FLT_MAX``, spans beyond
``FLT_MAX``, overflow under temperature and penalties), parameters that float32 cannot hold, negative output counts,
kept tokens whose float32 probability underflows, tokens of invalid rows handed to the ops, repeated bias ids, bad
argument types, a `Sampler` shared between threads, and log-sums lost at large magnitudes. The contract is
``docs/semantics.md`` §3 C (negative counts), §5 (overflow), §6 (logprob precision) and §8 (float32 parameters,
near-ties). Random hostile batches are in ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams, ops, reference
from fastsampler.backends.reference import pipeline as ref_pipeline

BACKENDS = fastsampler.available_backends()  # reference always; cpu when built; triton (interpreter on CPU)
# the interpreter evaluates masked-off lanes too (log(0), inf - inf): numpy warns, results are unaffected
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SPAN = [[3e38, -3e38]]  # kept logits spanning more than FLT_MAX
# parameter sets that reach the non-fused typical / mass paths of the kernels (the hang of the C++ backend)
SPAN_PARAMS = {
    "typical+top_k": dict(typical_p=0.5, top_k=2),
    "top_p+min_keep": dict(top_p=0.5, min_keep=2),
    "min_p+min_keep": dict(min_p=0.1, min_keep=2),
    "typical+top_p+min_keep": dict(typical_p=0.5, top_p=0.9, min_keep=2),
    "typical": dict(typical_p=0.5),
}


def _run(backend: str, logits: torch.Tensor, params, **kw) -> fastsampler.SampleOutput:
    return fastsampler.sample(logits, params, backend=backend, **kw)


# ----------------------------------------------------------------------------------------- 1. no hang, one answer
@pytest.mark.parametrize("backend", BACKENDS)
def test_span_beyond_flt_max_returns_the_reference_token(backend: str) -> None:
    """The calls return (run in a subprocess with a time limit, so a hang cannot take the suite with it) and give
    the reference's token, 0: the low token has probability 0 and ``0 · ln 0 = 0`` in the typical entropy (§3 E).
    float32 and bfloat16 logits, every parameter set of ``SPAN_PARAMS``."""
    code = (
        "import torch, fastsampler\n"
        f"cases = {list(SPAN_PARAMS.values())!r}\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        f"    x = torch.tensor({SPAN!r}).to(dtype)\n"
        "    for kw in cases:\n"
        "        p = fastsampler.SamplingParams(seed=1, **kw)\n"
        f"        print(fastsampler.sample(x, p, backend={backend!r}).tokens.tolist(), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    want = [str(reference.sample(np.array(SPAN, dtype=np.float32), SamplingParams(seed=1, **kw)).tokens.tolist())
            for kw in SPAN_PARAMS.values()]
    assert set(want) == {"[0]"}
    assert proc.stdout.strip().splitlines() == want * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_overflow_is_a_masked_token(backend: str) -> None:
    """§5: ``l / T`` below ``-FLT_MAX`` is ``-inf``. All tokens overflowing leaves nothing: invalid. Some
    overflowing: the row samples among the rest."""
    x = torch.tensor([[-3e38, -2e38], [-3e38, 5.0], [1.0, 2.0]])
    params = [SamplingParams(temperature=1e-3, seed=s) for s in range(3)]
    out = _run(backend, x, params)
    ref = reference.sample(x.numpy(), params)
    assert out.tokens.tolist() == ref.tokens.tolist()
    assert out.tokens.tolist()[:2] == [-1, 1]
    assert out.valid.tolist() == [False, True, True]
    probs = fastsampler.sampling_probs(x, params, backend=backend)
    assert probs[0].tolist() == [0.0, 0.0] and probs[1].tolist() == [0.0, 1.0]
    # a repetition penalty pushing every logit below -FLT_MAX: the same
    rep = SamplingParams(repetition_penalty=3e38, seed=0)
    out = _run(backend, torch.tensor([[-2.0, -3.0]]), rep, prompt_token_ids=[[0, 1]])
    assert out.tokens.tolist() == [-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_overflow_is_invalid_and_isolated(backend: str) -> None:
    x = torch.tensor([[3e38, 1.0], [0.0, 1.0]])
    params = [SamplingParams(temperature=0.5, seed=0), SamplingParams(seed=0)]
    out = _run(backend, x, params)
    assert out.tokens[0].item() == -1 and not out.valid[0]
    assert out.tokens[1].item() == reference.sample(x[1:].numpy(), params[1:]).tokens[0]


# --------------------------------------------------------------------------------- 2. float32 parameter domain
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_p": 1e-46}, r"top_p must be in \(0, 1\] and representable in float32 .* got 1e-46, which rounds to 0"),
        ({"typical_p": 1e-46}, r"typical_p must be in \(0, 1\] and representable in float32 .* rounds to 0"),
        ({"min_p": 1e-46}, r"min_p must be in \[0, 1\] and representable in float32 .* rounds to 0"),
        ({"repetition_penalty": 1e-46}, r"repetition_penalty must be in \(0, inf\) .* rounds to 0"),
        ({"repetition_penalty": 1e39}, r"repetition_penalty must be in \(0, inf\) .* got 1e\+39, which overflows"),
        ({"temperature": 1e39}, r"temperature must be in \[0, inf\) and representable in float32 .* overflows"),
        ({"frequency_penalty": -1e-300}, r"frequency_penalty must be in \[-2, 2\] .* rounds to 0"),
        ({"mirostat_mode": 2, "mirostat_target": 1e39}, r"mirostat_target .* overflows to inf"),
        ({"mirostat_mode": 2, "mirostat_lr": 1e-46}, r"mirostat_lr .* rounds to 0"),
        ({"logit_bias": {3: 1e-46}}, r"logit_bias\[3\] must be in \[-100, 100\] or -inf .* rounds to 0"),
    ],
)
def test_parameters_outside_float32_are_refused_at_construction(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_float32_edge_parameters_are_accepted_and_agree() -> None:
    """The smallest positive and largest finite float32 values are valid parameters, on every backend."""
    x = torch.tensor([[0.0, 1.0, -1.0, 0.5]])
    params = [SamplingParams(top_p=1.5e-45, seed=1), SamplingParams(temperature=3.4e38, seed=2),
              SamplingParams(repetition_penalty=3.4e38, seed=3), SamplingParams(min_p=1.5e-45, seed=4)]
    x4 = x.expand(4, 4).contiguous()
    ref = reference.sample(x4.numpy(), params, prompt_token_ids=[[1]] * 4)
    for backend in BACKENDS:
        out = _run(backend, x4, params, prompt_token_ids=[[1]] * 4)
        assert out.tokens.tolist() == ref.tokens.tolist(), backend


def test_a_refused_request_never_poisons_a_sampler() -> None:
    s = Sampler(vocab_size=8, max_slots=2, backend="reference")
    ok = s.add(SamplingParams(seed=1))
    with pytest.raises(ValueError, match="top_p"):
        s.add(SamplingParams(top_p=1e-46, seed=2))
    assert s.sample(torch.zeros(1, 8), ok).valid.tolist() == [True]


# --------------------------------------------------------------------------------------------- 3. negative counts
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_negative_counts_count_as_zero(backend: str, dtype: torch.dtype) -> None:
    """§3 C: ``max(count, 0)`` for frequency, ``count > 0`` for presence and repetition, on every backend."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 40, generator=g) * 2
    neg = torch.zeros(4, 40, dtype=dtype)
    neg[:, :10] = -1
    neg[:, 10:20] = torch.iinfo(dtype).min
    neg[:, 20:25] = 3
    zeroed = neg.clamp_min(0)
    params = [SamplingParams(repetition_penalty=3.0, frequency_penalty=2.0, presence_penalty=2.0, seed=s)
              for s in range(4)]
    a = _run(backend, x, params, output_counts=neg)
    b = _run(backend, x, params, output_counts=zeroed)
    ref = reference.sample(x.numpy(), params, output_counts=zeroed.numpy())
    assert a.tokens.tolist() == b.tokens.tolist() == ref.tokens.tolist()
    pa = fastsampler.sampling_probs(x, params, output_counts=neg, backend=backend)
    pb = fastsampler.sampling_probs(x, params, output_counts=zeroed, backend=backend)
    assert torch.equal(pa, pb)
    ya = ops.apply_penalties_(x.clone(), output_counts=neg, repetition_penalty=3.0, frequency_penalty=2.0,
                              presence_penalty=2.0)
    yb = ops.apply_penalties_(x.clone(), output_counts=zeroed, repetition_penalty=3.0, frequency_penalty=2.0,
                              presence_penalty=2.0)
    assert torch.equal(ya, yb)


# ------------------------------------------------------------------------------- 4. ops keep underflowing tokens
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_keep_tokens_whose_probability_underflows(backend: str) -> None:
    got = ops.typical_mask_logits(torch.tensor([[0.0, -120.0, -120.0]]), 0.5, min_keep=3, backend=backend)
    assert got.tolist() == [[0.0, -120.0, -120.0]]
    got = ops.top_k_mask_logits(torch.tensor([[0.0, -200.0, -300.0]]), 2, backend=backend)
    assert got.tolist() == [[0.0, -200.0, -math.inf]]
    lp = ops.truncation_logprobs(torch.tensor([[0.0, -200.0, -300.0]]), top_k=2, backend=backend)
    assert lp[0, :2].tolist() == [0.0, -200.0] and lp[0, 2].item() == -math.inf
    # the mask is exactly the set the reference keeps
    ref = ref_pipeline
    rows = ref._rows_from_args(np.array([[0.0, -200.0, -300.0]]), SamplingParams(top_k=2))
    assert ref._run_row(rows[0]).keep.tolist() == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_mask_of_an_invalid_row_is_empty(backend: str) -> None:
    x = torch.tensor([[float("nan"), 1.0, 2.0], [0.0, 1.0, 2.0]])
    got = ops.top_k_mask_logits(x, 2, backend=backend)
    assert torch.isinf(got[0]).all() and got[1].tolist() == [-math.inf, 1.0, 2.0]


# ------------------------------------------------------------------------------------------- 6. invalid tokens
def test_compute_logprobs_of_an_invalid_row_is_nan() -> None:
    x = torch.tensor([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    lp, ids, top, ranks = ops.compute_logprobs(x, torch.tensor([-1, 1, 7]), top_n=1)
    assert math.isnan(lp[0]) and math.isnan(lp[2]) and lp[1].item() == pytest.approx(-math.log(2))
    assert ranks.tolist() == [-1, 1, -1]
    assert ids.tolist() == [[1], [0], [0]]  # the top entries still describe the logits
    out = fastsampler.sample(torch.tensor([[float("nan"), 0.0]]), SamplingParams(seed=0))
    lp, *_ = ops.compute_logprobs(torch.tensor([[float("nan"), 0.0]]), out.tokens)
    assert out.tokens.tolist() == [-1] and math.isnan(lp.item())


def test_compute_logprobs_keeps_the_log_sum_at_large_magnitudes() -> None:
    lp, _, top, _ = ops.compute_logprobs(torch.full((1, 4), 1e30), torch.tensor([2]), top_n=2)
    assert lp.item() == pytest.approx(-math.log(4), abs=1e-6)
    assert top[0].tolist() == pytest.approx([-math.log(4)] * 2, abs=1e-6)


# ------------------------------------------------------------------------------------------- 7. duplicate bias
def test_apply_logit_bias_sums_duplicate_ids() -> None:
    x = torch.zeros(2, 4)
    ops.apply_logit_bias_(x, torch.tensor([[1, 1, 3], [2, -1, 2]]), torch.tensor([[1.0, 2.5, -1.0], [4.0, 9.0, 4.0]]))
    assert x.tolist() == [[0.0, 3.5, 0.0, -1.0], [0.0, 0.0, 8.0, 0.0]]
    y = torch.zeros(1, 3, dtype=torch.bfloat16)
    ops.apply_logit_bias_(y, torch.tensor([[0, 0]]), torch.tensor([[-math.inf, 5.0]]))
    assert y.float().tolist() == [[-math.inf, 0.0, 0.0]]
    with pytest.raises(TypeError, match="token_ids must be an integer tensor"):
        ops.apply_logit_bias_(x, torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [1.0]]))


# ------------------------------------------------------------------------------------ 8. errors at the door
X8 = torch.zeros(1, 8)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: fastsampler.sample(X8, SamplingParams(frequency_penalty=1.0),
                                    output_counts=np.zeros((1, 8), np.int64)), ValueError,
         r"output_counts must be int16 or int32 .* got torch.int64"),
        (lambda: fastsampler.sample(X8, SamplingParams(), seeds=[2**64]), ValueError,
         r"seeds\[0\] must be an integer in \[0, 2\*\*64\) .* got 18446744073709551616"),
        (lambda: fastsampler.sample(X8, SamplingParams(), steps=[2**63]), ValueError,
         r"steps\[0\] must be an integer in \[0, 2\*\*63\), got 9223372036854775808"),
        (lambda: fastsampler.sample(X8, SamplingParams(), steps=[1.5]), TypeError,
         r"steps\[0\] must be an integer .* got 1.5 of type float"),
        (lambda: fastsampler.sample(X8, SamplingParams(), steps=torch.tensor([1.5])), TypeError,
         r"steps must be an integer tensor, got torch.float32"),
        (lambda: fastsampler.sample(X8, SamplingParams(), vocab_size=4.0), TypeError,
         r"vocab_size must be an integer in \[1, 8\], got 4.0 of type float"),
        (lambda: fastsampler.sample(X8, SamplingParams(), prompt_token_ids=[[1.5]]), TypeError,
         r"prompt_token_ids of row 0 holds 1.5 of type float"),
        (lambda: fastsampler.sample(X8, SamplingParams(), eos_token_ids=[2**32 + 5]), ValueError,
         r"eos_token_ids holds token id 4294967301, outside the vocabulary \[0, 8\)"),
        (lambda: fastsampler.sample(X8, SamplingParams(), eos_token_ids=torch.tensor([2**32 + 5])), ValueError,
         r"eos_token_ids holds token id 4294967301"),
        (lambda: fastsampler.sample(X8, SamplingParams(), eos_token_ids=torch.tensor([1.0])), TypeError,
         r"eos_token_ids must be a 1-D integer tensor"),
        (lambda: fastsampler.sample(torch.zeros(1, 2**24), SamplingParams()), ValueError,
         r"logits may have at most 2\^24 - 1 = 16777215 columns"),
        (lambda: ops.top_k_mask_logits(X8, torch.tensor([2.5])), TypeError,
         r"top_k must be an int or an integer \(batch_size,\) tensor, got a torch.float32 tensor"),
        (lambda: ops.top_k_mask_logits(X8, 2.5), TypeError, r"top_k must be an int .* got 2.5 of type float"),
        (lambda: Sampler(vocab_size=2**24, max_slots=1), ValueError,
         r"vocab_size must be at most 2\^24 - 1 = 16777215"),
        (lambda: Sampler(vocab_size=8, max_slots=1, eos_token_ids=[2**32 + 5]), ValueError,
         r"eos_token_ids holds token id 4294967301, outside the vocabulary \[0, 8\)"),
        (lambda: Sampler(vocab_size=8, max_slots=1).remove(True), TypeError,
         r"slots must be an int or an iterable of ints, got True of type bool"),
        (lambda: Sampler(vocab_size=8, max_slots=1).add(SamplingParams(), prompt_token_ids=[1.5]), TypeError,
         r"prompt_token_ids must hold integer token ids, got 1.5"),
        (lambda: Sampler(vocab_size=8, max_slots=1).add(SamplingParams(banned_token_ids=[9])), ValueError,
         r"^params.banned_token_ids holds token id 9, outside the vocabulary \[0, 8\)$"),
    ],
    ids=["counts-int64", "seed-2**64", "step-2**63", "float-step", "float-step-tensor", "float-vocab",
         "float-prompt-id", "eos-2**32", "eos-tensor-2**32", "eos-float-tensor", "2**24-columns", "float-top_k-tensor",
         "float-top_k", "sampler-2**24", "sampler-eos-2**32", "remove-bool", "sampler-float-prompt",
         "sampler-banned-id"],
)
def test_clear_errors_name_the_argument_and_value(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_numpy_state_arrays_are_accepted() -> None:
    """numpy ``output_counts`` / ``prompt_mask`` / ``token_bitmask`` mean what the same torch tensors mean."""
    x = torch.randn(2, 40, generator=torch.Generator().manual_seed(3))
    counts = np.zeros((2, 40), np.int32)
    counts[:, :5] = 2
    prompt = np.zeros((2, 2), np.int32)
    prompt[:, 0] = 0xFF
    mask = np.full((2, 2), -1, np.int32)
    mask[:, 1] = 0
    p = SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, seed=5)
    a = fastsampler.sample(x, p, output_counts=counts, prompt_mask=prompt, token_bitmask=mask)
    b = fastsampler.sample(x, p, output_counts=torch.from_numpy(counts), prompt_mask=torch.from_numpy(prompt),
                           token_bitmask=torch.from_numpy(mask))
    assert a.tokens.tolist() == b.tokens.tolist() and (a.tokens < 32).all()


def test_seed_2_64_minus_1_is_the_int64_bit_pattern() -> None:
    x = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    a = fastsampler.sample(x, SamplingParams(), seeds=[2**64 - 1])
    b = fastsampler.sample(x, SamplingParams(), seeds=torch.tensor([-1]))
    c = fastsampler.sample(x, SamplingParams(seed=2**64 - 1))
    assert a.tokens.tolist() == b.tokens.tolist() == c.tokens.tolist()


# ---------------------------------------------------------------------------------------------- 9. concurrency
def test_sampler_shared_between_threads_loses_no_update() -> None:
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    v, steps, nthreads = 64, 25, 3
    s = Sampler(vocab_size=v, max_slots=4, backend=backend)
    slots = s.add(SamplingParams(seed=9, n=4, frequency_penalty=0.5))
    x = torch.randn(4, v, generator=torch.Generator().manual_seed(1))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(steps):
                s.sample(x, slots)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for slot in slots:
        assert s.step_of(slot) == steps * nthreads
        assert int(s.output_counts_of(slot).sum()) == steps * nthreads


# -------------------------------------------------------------------------------------- 11. precision at edges
@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_survives_large_equal_logits(backend: str) -> None:
    """§6: ``(x - m) - ln Σ exp(x - m)``; four equal logits of 1e30 give ``-ln 4`` and a Mirostat surprise of 2
    bits (``mu = 10 - 0.1 · (2 - 5) = 10.3``)."""
    x = torch.full((2, 4), 1e30)
    params = [SamplingParams(logprobs=True, top_logprobs=2, seed=1), SamplingParams(mirostat_mode=2, seed=2)]
    out = _run(backend, x, params)
    assert out.logprobs[0].item() == pytest.approx(-math.log(4), abs=1e-6)
    assert out.top_logprobs[0].tolist() == pytest.approx([-math.log(4)] * 2, abs=1e-6)
    assert out.mirostat_mu[1].item() == pytest.approx(10.3, abs=1e-5)


def test_diagnose_flags_logprob_rounding_ties_and_denormal_typical_ties() -> None:
    # logits 1e-6 apart, logprobs near -ln 1000: a float32 logprob there has a spacing of 5e-7, so the kernels may
    # round distinct logprobs together (or apart) and report another rank or top-N order
    x = np.zeros((1, 1000), dtype=np.float32)
    x[0, 0] = 1e-6
    d = reference.diagnose(x, SamplingParams(logprobs=True, top_logprobs=2, seed=0))
    assert d["near_tie"].tolist() == [True]
    assert any("logprobs" in r for r in d["reasons"][0])
    # scores equal in float64 for logits that differ (0 and a denormal): float32 may order them either way
    d = reference.diagnose(np.array([[0.0, 1e-40]], dtype=np.float32), SamplingParams(typical_p=1e-9, seed=0))
    assert d["near_tie"].tolist() == [True] and "typical_p" in d["reasons"][0][0]
    # a clear row is not flagged
    d = reference.diagnose(np.array([[0.0, 5.0, -3.0]], dtype=np.float32),
                           SamplingParams(typical_p=0.5, logprobs=True, top_logprobs=2, seed=0))
    assert d["near_tie"].tolist() == [False]
