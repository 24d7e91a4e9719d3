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

`sample_packed` goes through the op only where it is needed: while ``torch.compile`` / ``torch.export`` trace, or on
tensor subclasses and under a torch dispatch mode (fake tensors, ``make_fx``). An eager call on plain tensors runs
the backend directly (`run_backend`, the same post-processing as the op): the op's dispatch costs tens of
microseconds per call on the host, and its first call imports ``torch._dynamo`` (seconds).
"""

# No ``from __future__ import annotations`` here: torch infers the op schema from the runtime annotations.

import dataclasses
from typing import Optional

import torch

from . import backends
from ._batch import PackedBatch, advance_state
from .output import SampleOutput

__all__ = ["sample_packed", "run_backend", "use_op"]

_OUT_DTYPES = (torch.int64, torch.bool, torch.float32, torch.int64, torch.float32, torch.int64, torch.float32)
_len_dispatch_stack = torch._C._len_torch_dispatch_stack

_MODULE_CACHE: dict[str, object] = {}


def _backend_module(name: str):
    mod = _MODULE_CACHE.get(name)
    if mod is None:
        mod = _MODULE_CACHE[name] = backends.load(name)
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
    dry_ids: Optional[torch.Tensor],
    dry_vals: Optional[torch.Tensor],
    vocab_size: int,
    n_top: int,
    flags: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = PackedBatch.from_op_args(logits, fparams, iparams, seeds, steps, seqs, mirostat_mu, allowed_mask,
                                     prompt_mask, output_counts, bias_indptr, bias_ids, bias_vals, eos_ids, dry_ids,
                                     dry_vals, vocab_size, n_top, flags)
    return tuple(_finish(_backend_module(backend).sample_packed(batch), batch))


def _finish(out: SampleOutput, batch: PackedBatch) -> list[torch.Tensor]:
    """The backend's outputs as contiguous tensors of the op's dtypes on the logits' device, none of them sharing
    memory with an input (an output a backend passes through, e.g. ``mirostat_mu``, is copied)."""
    inputs = [t for t in (batch.logits, *batch.arrays()) if t is not None]
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    res = []
    for x, dt in zip(out, _OUT_DTYPES, strict=True):
        x = torch.as_tensor(x).to(device=batch.logits.device, dtype=dt)
        if x.numel() and x.untyped_storage().data_ptr() in ptrs:
            x = x.clone()  # a custom op may not return (a view of) an input
        res.append(x.contiguous())
    return res


@_sample_packed_op.register_fake
def _(logits, fparams, iparams, seeds, steps, seqs, mirostat_mu, allowed_mask, prompt_mask, output_counts,
      bias_indptr, bias_ids, bias_vals, eos_ids, dry_ids, dry_vals, vocab_size, n_top, flags, backend):
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


def use_op(logits: torch.Tensor) -> bool:
    """True when a step on ``logits`` must go through the custom op: ``torch.compile`` / ``torch.export`` is tracing,
    ``logits`` is a tensor subclass (fake, functional, ...) or a torch dispatch mode is active (``make_fx``).

    Cheap (well under a microsecond) and imports nothing: ``torch.compiler.is_compiling`` reads a flag, which dynamo
    traces as True.
    """
    return torch.compiler.is_compiling() or type(logits) is not torch.Tensor or _len_dispatch_stack() > 0


def run_backend(backend: str, batch: PackedBatch) -> SampleOutput:
    """Run ``backend``'s ``sample_packed`` on ``batch`` directly, with the op's guarantees on the outputs.

    The C++ backend's outputs already are fresh tensors of the right dtypes on the CPU; other backends' outputs go
    through the op's post-processing (dtype, device, contiguous, a copy where an output shares an input's memory).
    """
    if batch.logits.requires_grad:  # as the op sees them: sampling is not differentiable
        batch = dataclasses.replace(batch, logits=batch.logits.detach())
    mod = _backend_module(backend)
    if batch.slot_index is not None and "slot_index" not in mod.CAPABILITIES.features:
        return _gathered_step(backend, batch, run_backend)
    out = mod.sample_packed(batch)
    if "host_batch" in mod.CAPABILITIES.features:  # the C++ outputs: fresh tensors of the op's dtypes on the CPU
        return out
    return SampleOutput(*_finish(out, batch))


def _gathered_step(backend: str, batch: PackedBatch, run) -> SampleOutput:
    """A slot-indexed batch (`PackedBatch.slot_index`) as its row-indexed form (`PackedBatch.gathered`) through
    ``run``, then its state update (``update_state``) applied with torch ops (`advance_state`)."""
    rows = batch.gathered()
    out = run(backend, rows)
    if batch.update_state:
        assert batch.output_counts is not None
        advance_state(batch.steps, batch.mirostat_mu, batch.output_counts, batch.slot_index, rows.steps, out)
    return out


def sample_packed(backend: str, batch: PackedBatch) -> SampleOutput:
    """Run ``backend``'s ``sample_packed`` on ``batch``: through the ``fastsampler::sample_packed`` custom op while
    tracing (see `use_op`), directly otherwise (`run_backend`; same results, no dispatch cost).

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
    if not use_op(batch.logits):
        return run_backend(backend, batch)
    if batch.slot_index is not None:  # the op takes row-indexed tensors and mutates none of them
        return _gathered_step(backend, batch, sample_packed)
    logits, *rest = batch.op_args()
    out = torch.ops.fastsampler.sample_packed(logits.detach(), *rest, backend)
    return SampleOutput(*out)
