"""The numpy reference: the definition of fastsampler's semantics (docs/semantics.md §2–§8, §11), float64 inside.

Every backend is tested against these functions, token for token except at near-ties (see `diagnose`).
"""

from __future__ import annotations

from .philox import exp_noise, philox4x32, tile_noise, token_noise
from .pipeline import (
    BOUNDARY_TOL,
    RACE_TIE_TOL,
    diagnose,
    dry_penalties,
    mirostat_v1_k,
    process_logits,
    sample,
    sampling_probs,
)
from .speculative import verify

__all__ = [
    "BOUNDARY_TOL",
    "RACE_TIE_TOL",
    "diagnose",
    "dry_penalties",
    "exp_noise",
    "mirostat_v1_k",
    "philox4x32",
    "process_logits",
    "sample",
    "sampling_probs",
    "tile_noise",
    "token_noise",
    "verify",
]
