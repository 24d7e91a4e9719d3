"""Op-level functions against the reference, on every available backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams, ops, reference

# the Triton interpreter is slow: the ops run on small shapes here
BACKENDS = [b for b in fastsampler.available_backends()]


def _logits(b: int = 3, v: int = 300, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, v, generator=g) * 2
    x[0, :10] = torch.round(x[0, :10])  # some exact ties
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("fn", "field", "values"),
    [
        (ops.top_k_mask_logits, "top_k", [1, 7, 50]),
        (ops.top_p_mask_logits, "top_p", [0.3, 0.8, 0.95]),
        (ops.min_p_mask_logits, "min_p", [0.02, 0.1, 0.5]),
        (ops.typical_mask_logits, "typical_p", [0.3, 0.7, 0.9]),
    ],
    ids=["top_k", "top_p", "min_p", "typical"],
)
def test_masks_match_reference_kept_set(backend: str, fn, field: str, values: list) -> None:
    x = _logits()
    per_row = torch.tensor(values)
    got = fn(x, per_row, backend=backend)
    want = reference.sampling_probs(x.numpy(), [SamplingParams(**{field: v}) for v in values]) > 0
    np.testing.assert_array_equal(torch.isfinite(got).numpy(), want)
    kept = torch.isfinite(got)
    assert torch.equal(got[kept], x[kept]), "kept logits must pass through unchanged"


@pytest.mark.parametrize("backend", BACKENDS)
def test_renorm_probs_match_reference(backend: str) -> None:
    probs = torch.softmax(_logits(), dim=-1)
    got = ops.top_p_renorm_probs(probs, 0.9, backend=backend)
    want = reference.sampling_probs(np.log(probs.numpy().astype(np.float64)), SamplingParams(top_p=0.9))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    got = ops.top_k_renorm_probs(probs, torch.tensor([1, 5, 300]), backend=backend)
    assert torch.allclose(got.sum(-1), torch.ones(3), atol=1e-5)
    assert (got > 0).sum(-1).tolist()[1:] == [5, 300]


def test_bad_arguments_raise() -> None:
    x = _logits()
    with pytest.raises(ValueError, match="top_p must be in"):
        ops.top_p_mask_logits(x, 1.5)
    with pytest.raises(ValueError, match=r"top_k must be a scalar or a \(3,\) tensor"):
        ops.top_k_mask_logits(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="logits must be"):
        ops.top_k_mask_logits(x[0], 3)
    with pytest.raises(ValueError, match=r"top_n must be an int in \[0, 20\], got 21"):
        ops.compute_logprobs(x, torch.zeros(3, dtype=torch.long), top_n=21)


def test_apply_penalties_matches_reference() -> None:
    x = _logits(v=100)
    hist = [[1, 1, 2, 99], [], [5]]
    prompt = [[3, 4], [0, 1, 2], []]
    counts = torch.zeros(3, 100, dtype=torch.int32)
    for r, h in enumerate(hist):
        for t in h:
            counts[r, t] += 1
    pmask = torch.from_numpy(fastsampler._batch.ids_to_bitmask(prompt, 100))
    rep = torch.tensor([1.3, 0.7, 1.0])
    got = ops.apply_penalties_(x.clone(), output_counts=counts, prompt_mask=pmask, repetition_penalty=rep,
                               frequency_penalty=0.25, presence_penalty=-0.5)
    params = [SamplingParams(repetition_penalty=float(r), frequency_penalty=0.25, presence_penalty=-0.5)
              for r in rep.tolist()]
    want = reference.process_logits(x.numpy(), params, prompt_token_ids=prompt, output_token_ids=hist)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_apply_logit_bias() -> None:
    x = torch.zeros(2, 5)
    ops.apply_logit_bias_(x, torch.tensor([[0, 4], [2, -1]]), torch.tensor([[1.0, -2.0], [3.0, 100.0]]))
    assert x.tolist() == [[1.0, 0, 0, 0, -2.0], [0, 0, 3.0, 0, 0]]


def test_compute_logprobs_matches_reference_raw_mode() -> None:
    x = _logits(v=50)
    x[1, 10:20] = 3.0  # a block of ties at the top: top-n must take the lowest ids first
    p = SamplingParams(seed=3, logprobs=True, top_logprobs=5)
    ref = reference.sample(x.numpy(), p)
    lp, ids, top, ranks = ops.compute_logprobs(x, torch.from_numpy(ref.tokens), top_n=5)
    np.testing.assert_allclose(lp.numpy(), ref.logprobs, atol=1e-5)
    np.testing.assert_array_equal(ids.numpy(), ref.top_logprob_ids)
    np.testing.assert_allclose(top.numpy(), ref.top_logprobs, atol=1e-5)
    np.testing.assert_array_equal(ranks.numpy(), ref.ranks)
