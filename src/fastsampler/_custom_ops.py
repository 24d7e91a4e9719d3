"""torch custom ops: the sampling step as an opaque operator that ``torch.compile`` and CUDA graphs can hold.

``torch.ops.fastsampler.sample_packed`` takes the tensors of a `PackedBatch` plus its host-known scalars (vocabulary
size, output width, flags, backend name) and calls the backend's ``sample_packed``. Its fake (meta) implementation
gives the output shapes from the input shapes alone, so a model step that ends in sampling traces without running
the backend:

=====================  ======  ========
output                 dtype   shape
=====================  ======  ========
tokens                 int64   (B,)
valid                  bool    (B,)
logprobs               float32 (B,)
top_logprob_ids        int64   (B, N)
top_logprobs           float32 (B, N)
ranks                  int64   (B,)
mirostat_mu            float32 (B,)
=====================  ======  ========

``B = logits.shape[0]`` and ``N = n_top``. The op never mutates its inputs and never returns one of them (an output
that a backend passes through, e.g. ``mirostat_mu`` of a batch without mirostat rows, is copied).
"""

# No ``from __future__ import annotations`` here: torch infers the op schema from the runtime annotations.

import dataclasses
from typing import Optional

import torch

from ._batch import BatchFlags, PackedBatch
from .output import SampleOutput

__all__ = ["sample_packed", "flags_to_int", "int_to_flags"]

_FLAG_FIELDS = tuple(f.name for f in dataclasses.fields(BatchFlags))
_OUT_DTYPES = (torch.int64, torch.bool, torch.float32, torch.int64, torch.float32, torch.int64, torch.float32)


def flags_to_int(flags: BatchFlags) -> int:
    """Encode `BatchFlags` as an int, bit ``i`` = the ``i``-th field (declaration order)."""
    return sum(1 << i for i, name in enumerate(_FLAG_FIELDS) if getattr(flags, name))


def int_to_flags(bits: int) -> BatchFlags:
    """Inverse of `flags_to_int`."""
    return BatchFlags(**{name: bool((bits >> i) & 1) for i, name in enumerate(_FLAG_FIELDS)})


_MODULE_CACHE: dict[str, object] = {}


def _backend_module(name: str):
    mod = _MODULE_CACHE.get(name)
    if mod is None:
        from ._api import _load

        mod = _MODULE_CACHE[name] = _load(name)
    return mod


@torch.library.custom_op("fastsampler::sample_packed", mutates_args=())
def _sample_packed_op(
    logits: torch.Tensor,
    fparams: torch.Tensor,
    iparams: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    seqs: torch.Tensor,
    mirostat_mu: torch.Tensor,
    allowed_mask: Optional[torch.Tensor],
    prompt_mask: Optional[torch.Tensor],
    output_counts: Optional[torch.Tensor],
    bias_indptr: Optional[torch.Tensor],
    bias_ids: Optional[torch.Tensor],
    bias_vals: Optional[torch.Tensor],
    eos_ids: torch.Tensor,
    vocab_size: int,
    n_top: int,
    flags: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = PackedBatch(
        logits=logits, vocab_size=vocab_size, fparams=fparams, iparams=iparams, seeds=seeds, steps=steps, seqs=seqs,
        mirostat_mu=mirostat_mu, allowed_mask=allowed_mask, prompt_mask=prompt_mask, output_counts=output_counts,
        bias_indptr=bias_indptr, bias_ids=bias_ids, bias_vals=bias_vals, eos_ids=eos_ids, n_top=n_top,
        flags=int_to_flags(flags),
    )
    out = _backend_module(backend).sample_packed(batch)
    inputs = [t for t in (logits, fparams, iparams, seeds, steps, seqs, mirostat_mu, allowed_mask, prompt_mask,
                          output_counts, bias_indptr, bias_ids, bias_vals, eos_ids) if t is not None]
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    res = []
    for x, dt in zip(out, _OUT_DTYPES, strict=True):
        x = torch.as_tensor(x).to(device=logits.device, dtype=dt)
        if x.numel() and x.untyped_storage().data_ptr() in ptrs:
            x = x.clone()  # a custom op may not return (a view of) an input
        res.append(x.contiguous())
    return tuple(res)


@_sample_packed_op.register_fake
def _(logits, fparams, iparams, seeds, steps, seqs, mirostat_mu, allowed_mask, prompt_mask, output_counts,
      bias_indptr, bias_ids, bias_vals, eos_ids, vocab_size, n_top, flags, backend):
    b = logits.shape[0]
    return (
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((b,), dtype=torch.bool),
        logits.new_empty((b,), dtype=torch.float32),
        logits.new_empty((b, n_top), dtype=torch.int64),
        logits.new_empty((b, n_top), dtype=torch.float32),
        logits.new_empty((b,), dtype=torch.int64),
        logits.new_empty((b,), dtype=torch.float32),
    )


def sample_packed(backend: str, batch: PackedBatch) -> SampleOutput:
    """Run ``backend``'s ``sample_packed`` on ``batch`` through the ``fastsampler::sample_packed`` custom op.

    Parameters
    ----------
    backend : str
        A resolved backend name (``'triton'``, ``'cpu'`` or ``'reference'``).
    batch : PackedBatch
        The packed batch; its tensors must be on the logits' device.

    Returns
    -------
    SampleOutput
        Torch tensors on the logits' device.

    Examples
    --------
    >>> import torch
    >>> from fastsampler._batch import pack_batch
    >>> from fastsampler.params import SamplingParams
    >>> batch = pack_batch(torch.tensor([[0.0, 4.0, 1.0]]), SamplingParams(temperature=0.0))
    >>> sample_packed("reference", batch).tokens.tolist()
    [1]
    """
    out = torch.ops.fastsampler.sample_packed(
        batch.logits.detach(), batch.fparams, batch.iparams, batch.seeds, batch.steps, batch.seqs, batch.mirostat_mu,
        batch.allowed_mask, batch.prompt_mask, batch.output_counts, batch.bias_indptr, batch.bias_ids,
        batch.bias_vals, batch.eos_ids, int(batch.vocab_size), int(batch.n_top), flags_to_int(batch.flags), backend,
    )
    return SampleOutput(*out)
