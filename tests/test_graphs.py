"""`Sampler.graphed`: a `sample` step captured in a CUDA graph (CUDA only), and its errors (everywhere)."""

from __future__ import annotations

import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams

V = 300


def test_graphed_needs_cuda_and_checks_its_arguments() -> None:
    s = Sampler(V, 4, "cpu", backend="reference")
    with pytest.raises(ValueError, match=r"graphed\(\) needs a Sampler on a CUDA device .* got device cpu"):
        s.graphed(2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or "triton" not in fastsampler.available_backends(),
                                reason="CUDA graphs need a CUDA device and the Triton backend")


def _requests(s: Sampler) -> list[int]:
    a = s.add(SamplingParams(top_p=0.9, seed=1, logprobs=True, top_logprobs=2), [1, 2, 3])
    b = s.add(SamplingParams(mirostat_mode=2, seed=2, repetition_penalty=1.3, n=2))
    return a + b


@needs_cuda
def test_graphed_step_follows_an_eager_twin_and_recaptures() -> None:
    dev = torch.device("cuda")
    eager, graphed = (Sampler(V, 8, dev, eos_token_ids=[0], backend="triton") for _ in range(2))
    slots = _requests(eager)
    assert _requests(graphed) == slots
    step = graphed.graphed(len(slots))
    with pytest.raises(ValueError, match="logits must be a"):
        step(torch.zeros(len(slots), V + 1, device=dev), slots)
    g = torch.Generator(device=dev).manual_seed(0)
    for i in range(6):
        x = torch.randn(len(slots), V, device=dev, generator=g)
        if i == 3:  # a feature no live slot used: the next call captures again
            for s in (eager, graphed):
                s.remove(slots[-1])
                s.add(SamplingParams(seed=3, logit_bias={5: 2.0}, presence_penalty=0.5))
        out = step(x, slots)
        ref = eager.sample(x, torch.tensor(slots, device=dev))
        assert torch.equal(out.tokens, ref.tokens)
        assert torch.allclose(out.mirostat_mu, ref.mirostat_mu, equal_nan=True)
    assert step.captures == 2
    assert torch.equal(graphed._tables.steps, eager._tables.steps)
    assert torch.equal(graphed._tables.counts, eager._tables.counts)
