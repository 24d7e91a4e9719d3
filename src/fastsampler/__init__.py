"""fastsampler: fused sampling kernels for LLM inference.

One call per decoding step samples a token for every row of a ``[batch, vocab]`` logits tensor with per-row
parameters, with exactly defined, batch-invariant and backend-independent results (see ``docs/semantics.md``).
"""

from __future__ import annotations

import sys

from . import backends
from ._api import SeedWithoutStepsWarning, available_backends, sample, sampling_probs
from ._score import score
from .backends import reference
from .output import SampleOutput, ScoreOutput, VerifyOutput
from .params import SamplingParams
from .sampler import Sampler

# ``fastsampler.reference`` is the public name of the numpy reference: the same module, importable under both names
sys.modules[f"{__name__}.reference"] = reference

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

__all__ = [
    "SampleOutput",
    "Sampler",
    "ScoreOutput",
    "VerifyOutput",
    "SamplingParams",
    "SeedWithoutStepsWarning",
    "available_backends",
    "backends",
    "reference",
    "sample",
    "sampling_probs",
    "score",
    "__version__",
]
