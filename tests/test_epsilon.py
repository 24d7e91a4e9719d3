"""``epsilon_cutoff`` (docs/semantics.md §3 E item 3): keep the tokens whose probability in the whole distribution is
at least epsilon, at min-p's place in the rules, checked against a hand computation and against an independent
implementation of Hugging Face's ``EpsilonLogitsWarper`` rule (used alone, the two agree)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams
from tests.backend_checks import backend_device, backend_params, check_exact


def hf_epsilon_keep(x: np.ndarray, eps: float, min_keep: int) -> np.ndarray:
    """Hugging Face's rule, written independently: drop q < eps unless among the min_keep largest logits."""
    q = np.exp(x - x.max())
    q /= q.sum()
    kth = np.sort(x)[::-1][min(min_keep, x.size) - 1]
    return (q >= eps) | (x >= kth)


@pytest.mark.parametrize("backend", backend_params())
def test_hand_computed(backend: str) -> None:
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -5.0]])
    # q = (0.636, 0.234, 0.086, 0.032, 0.012, 0.0002): 0.05 keeps three, 0.3 keeps one, 0.9 keeps the maximum
    for eps, kept in ((0.05, 3), (0.3, 1), (0.9, 1), (0.0115, 5)):
        p = fastsampler.sampling_probs(x.to(backend_device(backend)), SamplingParams(epsilon_cutoff=eps),
                                       backend=backend).cpu()
        assert int((p[0] > 0).sum()) == kept, eps
    # min_keep raises the cut; min-p and epsilon together keep the larger threshold
    p = fastsampler.sampling_probs(x, SamplingParams(epsilon_cutoff=0.3, min_keep=3), backend=backend)
    assert int((p[0] > 0).sum()) == 3
    p = fastsampler.sampling_probs(x, SamplingParams(epsilon_cutoff=0.01, min_p=0.3), backend=backend)
    assert int((p[0] > 0).sum()) == 2  # min-p 0.3 keeps q >= 0.19: two


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_independent_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((8, 300)) * rng.uniform(0.5, 4.0)
    for r in range(8):
        eps = float(np.float32(rng.choice([1e-4, 1e-3, 0.01, 0.05, 0.3])))
        mk = int(rng.integers(1, 4))
        p = fastsampler.reference.sampling_probs(x[r:r + 1], SamplingParams(epsilon_cutoff=eps, min_keep=mk))
        np.testing.assert_array_equal(p[0] > 0, hf_epsilon_keep(x[r], eps, mk))


@pytest.mark.parametrize("backend", backend_params())
def test_exact_on_every_path(backend: str) -> None:
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.standard_normal((6, 4097)) * 3).astype(np.float32)).to(backend_device(backend))
    params = [SamplingParams(seed=i, epsilon_cutoff=e, **kw) for i, (e, kw) in enumerate([
        (0.01, {}), (0.005, {"top_k": 40}), (0.02, {"min_p": 0.01, "min_keep": 4}), (0.001, {"top_p": 0.8}),
        (0.03, {"typical_p": 0.9}), (0.99, {"min_keep": 2})])]
    check_exact(backend, x, params, steps=list(range(6)))


def test_validation_and_config() -> None:
    for bad in (-0.1, 1.0, math.nan):
        with pytest.raises(ValueError, match="epsilon_cutoff"):
            SamplingParams(epsilon_cutoff=bad)
    with pytest.raises(ValueError, match="epsilon_cutoff"):
        SamplingParams(epsilon_cutoff=0.01, mirostat_mode=2)
    assert SamplingParams.from_generation_config({"epsilon_cutoff": 3e-4}).epsilon_cutoff == 3e-4
