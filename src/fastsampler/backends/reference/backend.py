"""The reference as a backend (``backend="reference"``): runs on the host, returns tensors on the logits' device.

Slow (numpy, one row at a time) and it synchronises with the device; use it for tests and as the last fallback.
"""

from __future__ import annotations

import numpy as np
import torch

from ..._batch import PackedBatch
from ...output import SampleOutput
from .. import Capabilities
from .pipeline import _run_row, probs_rows, rows_from_packed, sample_rows

__all__ = ["CAPABILITIES", "is_available", "supports", "sample_packed", "sampling_probs_packed", "kept_mask_packed"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAPABILITIES = Capabilities(devices=("cpu", "cuda"), dtypes=_DTYPES)


def is_available() -> tuple[bool, str]:
    """Always ``(True, "")``: numpy only."""
    return True, ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Any device (the rows are copied to the host), float16 / bfloat16 / float32 / float64."""
    return dtype in _DTYPES


def sample_packed(batch: PackedBatch) -> SampleOutput:
    rows = rows_from_packed(batch)
    out, _ = sample_rows(rows, batch.logits.shape[1])
    out.mirostat_mu = out.mirostat_mu.astype(np.float32)
    dev = batch.device

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    # n_top may exceed the rows' largest top_logprobs (Sampler with device-tensor slots): pad with -1 / NaN
    b, n = batch.batch_size, batch.n_top
    k = max((int(row.p.top_logprobs) for row in rows), default=0)
    top_ids = np.full((b, n), -1, dtype=np.int64)
    top_lps = np.full((b, n), np.nan)
    top_ids[:, :k] = out.top_logprob_ids.reshape(b, k)
    top_lps[:, :k] = out.top_logprobs.reshape(b, k)
    return SampleOutput(
        tokens=t(out.tokens, torch.int64),
        valid=t(out.valid, torch.bool),
        logprobs=t(out.logprobs, torch.float32),
        top_logprob_ids=t(top_ids, torch.int64),
        top_logprobs=t(top_lps, torch.float32),
        ranks=t(out.ranks, torch.int64),
        mirostat_mu=t(out.mirostat_mu, torch.float32),
    )


def sampling_probs_packed(batch: PackedBatch) -> torch.Tensor:
    probs = probs_rows(rows_from_packed(batch), batch.logits.shape[1])
    return torch.from_numpy(probs).to(device=batch.device, dtype=torch.float32)


def kept_mask_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) bool: each row's kept set (greedy rows: the argmax; invalid rows and padding: nothing)."""
    rows = rows_from_packed(batch)
    out = np.zeros((len(rows), batch.logits.shape[1]), dtype=bool)
    for r, row in enumerate(rows):
        res = _run_row(row)
        if res.valid:
            out[r, : row.vocab] = res.keep
    return torch.from_numpy(out).to(device=batch.device)
