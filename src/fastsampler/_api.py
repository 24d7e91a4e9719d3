"""The functional API: `sample` and `sampling_probs`, dispatched to a backend."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from . import backends
from ._batch import ParamBatch, StepInputs, pack_batch, pack_host, param_batch, stopped_rows
from ._custom_ops import sample_packed as _sample_packed_op
from ._custom_ops import use_op
from .output import SampleOutput
from .params import SamplingParams

__all__ = ["sample", "sampling_probs", "available_backends", "resolve_backend", "SeedWithoutStepsWarning"]

Backend = Literal["auto", "triton", "cpu", "reference"]


def available_backends() -> list[str]:
    """Names of the backends that import and can run here.

    >>> "reference" in available_backends()
    True
    """
    return backends.available()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run for logits on ``device`` of ``dtype`` (``auto`` picks the fastest available)."""
    return backends.resolve(backend, device, dtype)


class SeedWithoutStepsWarning(UserWarning):
    """`fastsampler.sample` was given a fixed seed (``params.seed`` or ``seeds``) for some row but no ``steps``.

    The noise of a row depends only on (seed, step, seq) (docs/semantics.md §7): without ``steps`` every call draws
    at step 0, so a loop that calls `fastsampler.sample` with the same seeded params each step draws the same noise
    every step (and, for peaked logits, the same token). Pass ``steps`` (the tokens generated so far by each row), or
    let `fastsampler.Sampler` count them. Shown once per call site by Python's default warning filter; silence it
    with ``warnings.filterwarnings("ignore", category=fastsampler.SeedWithoutStepsWarning)`` where one draw at step 0
    is what is meant.
    """


_SEED_WARNING = (
    "fastsampler.sample got a fixed seed (params.seed or seeds) but no steps: every call draws at step 0, so "
    "calling it in a loop repeats the same random noise each step. Pass steps (the tokens generated so far by each "
    "row), or use fastsampler.Sampler, which counts them"
)
# ParamBatch id -> (that ParamBatch, whether some row has a seed): a list of params is scanned once, not per call
_SEEDED: dict[int, tuple[ParamBatch, bool]] = {}


def _has_seeded_row(params: Any, b: int) -> bool:
    """Whether some row of ``params`` has ``params.seed`` set, from the `ParamBatch` that packing cached (a hit: no
    repacking); a list of params is scanned once and remembered."""
    if b == 0:
        return False
    if isinstance(params, SamplingParams):
        return params.seed is not None
    pb = param_batch(params, b)
    if pb.seeds is not None:  # every row seeded
        return True
    hit = _SEEDED.get(id(pb))
    if hit is not None and hit[0] is pb:
        return hit[1]
    seeded = any(e.seed is not None for e in pb.rows)
    if len(_SEEDED) >= 64:
        _SEEDED.clear()
    _SEEDED[id(pb)] = (pb, seeded)
    return seeded


def _as_torch(logits: Any) -> tuple[torch.Tensor, bool]:
    if isinstance(logits, torch.Tensor):
        return logits, False
    arr = np.asarray(logits)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)), True


def _to_numpy_output(out: SampleOutput) -> SampleOutput:
    return out.numpy()


_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (backend, device type, dtype) -> (resolved name, module): valid while sys.modules holds that same module
_RESOLVED: dict[tuple[str, str, torch.dtype], tuple[str, Any]] = {}


def _backend_of(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[str, Any]:
    """`backends.resolve` + `backends.load`, remembered per (backend, device type, dtype): the resolution only
    depends on which backend modules import, so a hit is re-validated against ``sys.modules`` (a module that stopped
    importing resolves again)."""
    key = (backend, device.type, dtype)
    hit = _RESOLVED.get(key)
    if hit is not None and backends.loaded(hit[0]) is hit[1]:
        return hit
    name = backends.resolve(backend, device, dtype)
    mod = backends.load(name)
    if backend != "triton" or device.type != "cpu":  # Triton on the CPU depends on TRITON_INTERPRET, read per call
        _RESOLVED[key] = (name, mod)
    return name, mod


def _prepare(logits: Any, params: Any, backend: str, kw: StepInputs) -> tuple[str, Any, torch.Tensor, bool]:
    t, was_numpy = _as_torch(logits)
    if t.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {t.dtype}")
    name, mod = _backend_of(backend, t.device, t.dtype)
    if not mod.supports(t.device, t.dtype):
        raise ValueError(f"backend={name!r} does not support logits of dtype {t.dtype} on device {t.device}")
    return name, mod, t, was_numpy


def sample(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    steps: Any = None,
    seqs: Any = None,
    mirostat_mu: Any = None,
    vocab_size: int | None = None,
    seeds: Any = None,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
    eos_token_ids: Sequence[int] | torch.Tensor = (),
    backend: Backend = "auto",
) -> SampleOutput:
    """Sample one token per row of ``logits``.

    Parameters
    ----------
    logits : (batch_size, vocab_size) torch.Tensor or numpy array
        float32, float16 or bfloat16 (float64: reference backend only). Read as they are, never modified.
    params : SamplingParams or sequence of batch_size SamplingParams
        One for every row, or one per row.
    prompt_token_ids, output_token_ids : sequence of batch_size token-id sequences, optional
        Histories for the penalties (packed here on the host). Callers that keep state on the device pass
        ``prompt_mask`` / ``output_counts`` instead.
    steps, seqs : (batch_size,) ints, optional
        Tokens generated so far by each sequence, and the sample index within its request (default 0): the Philox
        counter of docs/semantics.md §7.
    mirostat_mu : (batch_size,) floats, optional
        Mirostat state; default ``2 * mirostat_target``.
    vocab_size : int, optional
        Real vocabulary size; columns at and beyond it are padding and never sampled.
    seeds : (batch_size,) int64 tensor, optional
        uint64 seed bit patterns, overriding ``params.seed``.
    prompt_mask : (batch_size, ceil(V / 32)) int32 tensor, optional
        Packed prompt-token bitmask (bit ``t % 32`` of word ``t // 32``).
    output_counts : (batch_size, V) int16 or int32 tensor, optional
        Generated-token counts.
    token_bitmask : (batch_size, ceil(V / 32)) int32 tensor, optional
        Allowed-token bitmask (bit set = allowed), e.g. from a grammar engine.
    eos_token_ids : sequence of int, optional
        EOS ids for ``min_tokens`` / ``ignore_eos``.
    backend : {'auto', 'triton', 'cpu', 'reference'}
        ``auto`` picks Triton for CUDA tensors and the C++ backend for CPU tensors / numpy arrays.

    Returns
    -------
    SampleOutput
        Torch tensors on the logits' device (numpy arrays for numpy input).

    Warns
    -----
    SeedWithoutStepsWarning
        When some row has a fixed seed (``params.seed`` or ``seeds``) and ``steps`` is None: every such call draws
        at step 0, so a loop repeats its noise. Pass ``steps``, or use `fastsampler.Sampler`.

    Examples
    --------
    >>> import torch, fastsampler
    >>> logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    >>> out = fastsampler.sample(logits, fastsampler.SamplingParams(temperature=0.0))
    >>> out.tokens.tolist()
    [1, 0]
    """
    kw = StepInputs(prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids, steps=steps, seqs=seqs,
                    mirostat_mu=mirostat_mu, vocab_size=vocab_size, seeds=seeds, prompt_mask=prompt_mask,
                    output_counts=output_counts, token_bitmask=token_bitmask, eos_token_ids=eos_token_ids)
    name, mod, t, was_numpy = _prepare(logits, params, backend, kw)
    if not isinstance(params, (SamplingParams, list, tuple)):
        params = list(params)  # an iterator: read once here (packing and the seed check below both read it)
    if "host_batch" in mod.CAPABILITIES.features and not use_op(t):
        hb = pack_host(t, params, **kw)
        out, stops = mod.sample_host(hb), hb.stops  # numpy in, numpy to the kernels: no tensor round trip
    else:
        # the backend directly, or while tracing through the torch custom op fastsampler::sample_packed (so that
        # torch.compile / CUDA graphs can hold the step)
        batch = pack_batch(t, params, **kw)
        out, stops = _sample_packed_op(name, batch), batch.stops
    if stops:  # some row has stop ids: report the rows whose token ends their request
        out.stopped = stopped_rows(out.tokens, params, eos_token_ids)
    # a seeded row without steps draws at step 0 on every call (checked after packing: the params are cached then)
    if steps is None and not torch.compiler.is_compiling() and (
            seeds is not None or _has_seeded_row(params, t.shape[0])):
        warnings.warn(_SEED_WARNING, SeedWithoutStepsWarning, stacklevel=2)
    return _to_numpy_output(out) if was_numpy else out


def sampling_probs(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    steps: Any = None,
    seqs: Any = None,
    mirostat_mu: Any = None,
    vocab_size: int | None = None,
    seeds: Any = None,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
    eos_token_ids: Sequence[int] | torch.Tensor = (),
    backend: Backend = "auto",
) -> Any:
    """The distribution each row's token is drawn from, ``(batch_size, V)`` float32.

    Zero outside the kept set, one-hot for greedy rows, all zero for invalid rows. Arguments as in `sample`.

    Examples
    --------
    >>> import torch, fastsampler
    >>> p = fastsampler.sampling_probs(torch.tensor([[0.0, 0.0, -1e9]]), fastsampler.SamplingParams())
    >>> [round(x, 3) for x in p[0].tolist()]
    [0.5, 0.5, 0.0]
    """
    kw = StepInputs(prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids, steps=steps, seqs=seqs,
                    mirostat_mu=mirostat_mu, vocab_size=vocab_size, seeds=seeds, prompt_mask=prompt_mask,
                    output_counts=output_counts, token_bitmask=token_bitmask, eos_token_ids=eos_token_ids)
    _, mod, t, was_numpy = _prepare(logits, params, backend, kw)
    probs = mod.sampling_probs_packed(pack_batch(t, params, **kw))
    return probs.detach().cpu().numpy() if was_numpy else probs
