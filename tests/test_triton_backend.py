"""What only the Triton backend has: its tuning knobs (ids per program, radix digit width) giving the same tokens,
the logit bias applied from the CSR across chunk boundaries and from a `Sampler`'s padded per-slot tables, batch
invariance with the CUDA row split, and on CUDA: no host synchronisation and CUDA-graph capture.

Runs under ``TRITON_INTERPRET=1`` on the CPU (small shapes) and natively on CUDA. Exact tokens, invalid rows, batch
invariance, dtypes and chi-square are in ``test_conformance.py``, which runs them on every backend.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams as SP
from fastsampler import reference
from tests.backend_checks import (
    INVARIANCE,
    assert_batch_invariant,
    check_exact,
    random_logits,
    slow_in_interpreter,
    triton_available,
)

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    # the interpreter evaluates masked-off lanes too (log(0), inf - inf): numpy warns, results are unaffected
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning"),
]




# ------------------------------------------------------------------------------------------------------- exact
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
    logits = random_logits(len(params), v, seed=17, scale=2.0, device=device)
    if not slots:
        check_exact("triton", logits, params, steps=[1, 2, 3, 4, 5])
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


@pytest.mark.parametrize("bits", [4, 2])
def test_exact_other_digit_widths(device, monkeypatch, bits):
    """The radix select with 4-bit digits (the CUDA default) and 2-bit digits gives the same thresholds."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_DIGIT_BITS", str(bits))
    params = [SP(seed=41, top_k=7, top_p=0.7, logprobs=True, top_logprobs=3), SP(seed=42, typical_p=0.6, min_keep=3),
              SP(seed=43, mirostat_mode=1)]
    check_exact("triton", random_logits(3, 1000, seed=11, ties=True, device=device), params)


@pytest.mark.parametrize("chunk", [1024, pytest.param(256, marks=[pytest.mark.large, slow_in_interpreter])])
def test_exact_row_split(device, monkeypatch, chunk):
    """Each 4096-id tile split over several programs (1024 ids each is the CUDA default): per-chunk partial results
    are combined per tile for the draw and per row for the statistics."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", str(chunk))
    params = [SP(seed=61, top_k=40, top_p=0.8, min_p=0.02, logprobs=True, top_logprobs=5),
              SP(seed=62, typical_p=0.7, min_keep=2, logprobs=True, logprobs_mode="final", top_logprobs=2),
              SP(seed=63, mirostat_mode=1, logprobs=True, logprobs_mode="processed"),
              SP(seed=64, temperature=0.0, repetition_penalty=1.5, logprobs=True), SP(seed=65)]
    check_exact("triton", random_logits(len(params), 4097 + 2048, seed=16, scale=2.5, device=device), params,
                steps=[3, 1, 4, 1, 5], output_token_ids=[[1], [2, 2], [], [6000], [4096]])


# ---------------------------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("path", sorted(INVARIANCE))
def test_batch_invariance_with_cuda_row_split(device, monkeypatch, path):
    """test_conformance's batch invariance with the CUDA default of 1024-id programs (the interpreter's default is one
    program per 4096-id tile), on the radix selects and on the candidate engine."""
    monkeypatch.setenv("FASTSAMPLER_TRITON_CHUNK", "1024")
    target, others = INVARIANCE[path]
    assert_batch_invariant("triton", target, others, device)


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
    logits = random_logits(len(params), v, seed=21, scale=3.0, device="cuda")
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
