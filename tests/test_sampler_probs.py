"""`Sampler.sampling_probs`: the distribution a step would draw from, for engines that need p (speculative
decoding), equal to the functional `fastsampler.sampling_probs` on the same state; nothing advances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams
from tests.backend_checks import backend_params

V = 80
EOS = 1
REQS = [
    SamplingParams(seed=1, top_k=10, top_p=0.8, repetition_penalty=1.2, presence_penalty=0.3, logit_bias={4: 1.0}),
    SamplingParams(seed=2, temperature=0.0),
    SamplingParams(seed=3, typical_p=0.7, min_tokens=3, banned_token_ids=[5, 6]),
    SamplingParams(seed=4, mirostat_mode=2, mirostat_target=2.5),
]
PROMPTS = [[7, 8], [], [9], [10, 11, 12]]


def _logits(b: int, salt: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(5 + salt)) * 3.0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("as_tensor", [False, True])
def test_matches_the_functional_probs_and_advances_nothing(backend: str, as_tensor: bool) -> None:
    s = Sampler(V, 6, backend=backend, eos_token_ids=[EOS])
    slots = [s.add(p, pr)[0] for p, pr in zip(REQS, PROMPTS, strict=True)]
    history: list[list[int]] = [[] for _ in slots]
    for k in range(2):  # some state: steps, counts, mu
        toks = s.sample(_logits(len(slots), 10 + k), slots).tokens.tolist()
        for h, t in zip(history, toks, strict=True):
            h.append(t)
    x = _logits(len(slots))
    arg = torch.tensor(slots) if as_tensor else slots
    steps_before = [s.step_of(x_) for x_ in slots]
    got = s.sampling_probs(x, arg)
    assert [s.step_of(x_) for x_ in slots] == steps_before
    mu = torch.tensor([s.mirostat_mu_of(x_) for x_ in slots], dtype=torch.float32)
    want = fastsampler.sampling_probs(x, REQS, prompt_token_ids=PROMPTS, output_token_ids=history,
                                      steps=steps_before, mirostat_mu=mu, eos_token_ids=[EOS], backend=backend)
    assert got.shape == (len(slots), V) and got.dtype == torch.float32
    assert torch.equal(got, want)
    # and the token the next step draws has positive probability there
    out = s.sample(x, slots)
    assert all(got[r, t] > 0 for r, t in enumerate(out.tokens.tolist()))


def test_numpy_logits_empty_slots_and_errors() -> None:
    s = Sampler(V, 2, backend="reference", eos_token_ids=[EOS])
    slot = s.add(SamplingParams(top_k=2))[0]
    p = s.sampling_probs(_logits(1).numpy(), [slot])
    assert isinstance(p, np.ndarray) and p.shape == (1, V) and np.isclose(p.sum(), 1.0) and (p > 0).sum() == 2
    assert s.sampling_probs(torch.zeros(0, V), []).shape == (0, V)
    with pytest.raises(ValueError, match="not in use"):
        s.sampling_probs(_logits(1), [1])
    with pytest.raises(ValueError, match="logits must have shape"):
        s.sampling_probs(_logits(2), [slot])
