"""The numpy reference (public name): the definition of fastsampler's semantics, float64 inside.

Same functions as `fastsampler.backends.reference`; see docs/semantics.md.
"""

from __future__ import annotations

from .backends.reference import (
    BOUNDARY_TOL,
    RACE_TIE_TOL,
    diagnose,
    exp_noise,
    mirostat_v1_k,
    philox4x32,
    process_logits,
    sample,
    sampling_probs,
    tile_noise,
    token_noise,
)

__all__ = [
    "BOUNDARY_TOL",
    "RACE_TIE_TOL",
    "diagnose",
    "exp_noise",
    "mirostat_v1_k",
    "philox4x32",
    "process_logits",
    "sample",
    "sampling_probs",
    "tile_noise",
    "token_noise",
]
