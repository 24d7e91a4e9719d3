"""FlashInfer's sampling API (``flashinfer.sampling``) on fastsampler's backends: an engine switches with one import.

The names, the positional order of the arguments, the defaults and the return conventions follow the API of
FlashInfer 0.6.18 (``flashinfer.sampling``), so that

.. code-block:: python

    import fastsampler.compat.flashinfer as sampling          # instead of: import flashinfer.sampling as sampling
    tokens = sampling.top_k_top_p_sampling_from_logits(logits, top_k, top_p)

runs unchanged. The work is done by fastsampler's pipeline (docs/semantics.md) on the backend that
`fastsampler.sample` would pick for the tensor: the C++ backend for CPU tensors, Triton for CUDA tensors. Every
function also takes a keyword-only ``backend`` (``"auto"``, ``"cpu"``, ``"triton"``, ``"reference"``), which
FlashInfer does not have.

Conventions (as FlashInfer's, unless said otherwise):

- ``probs`` / ``logits`` are ``(batch_size, vocab_size)`` float32, float16, bfloat16 or float64 tensors (float64 is
  read as float32, as FlashInfer does). ``*_from_probs`` functions take ``log(probs)`` (``p = 0`` gives ``-inf``)
  and run the same pipeline, so they draw exactly from the given distribution renormalised over its row (a row
  need not sum to 1).
- A per-row parameter (``top_k``, ``top_p``, ``min_p``, ``temperature``) is a Python scalar or a 1-D tensor with one
  value per output row. Scalars are range-checked; the values of a CPU tensor are checked too; a device tensor is
  used without reading it back (that would synchronise). ``top_k <= 0`` or ``>= vocab_size`` keeps every token.
- ``indices``: an optional ``(batch_size,)`` int32 / int64 tensor on the input's device; output row ``i`` is drawn
  from input row ``indices[i]`` (several samples of one prompt), and the output then has ``indices``' dtype
  (int32 otherwise). Per-row parameters, ``seed`` and ``offset`` are indexed by output row. The selected rows are
  gathered into a ``(batch_size, vocab_size)`` copy first.
- Samples are int32 (or ``indices``' dtype). A row with no valid distribution (a NaN or ``+inf`` in it, a negative
  probability, nothing positive left) returns token 0, and ``False`` in the ``valid`` tensor of ``return_valid=True``
  (the functions that have that argument in FlashInfer 0.6.18).
- ``check_nan=True`` raises ``ValueError`` when the input holds a NaN (this reads the device: it synchronises).
- ``deterministic`` is accepted and has no effect: fastsampler's draws are always deterministic (below).

Ties (FlashInfer's documentation leaves them open; fastsampler's rules, docs/semantics.md §4, apply): top-k keeps
every token tied with the k-th largest value, so a row may keep more than ``k`` tokens; top-p keeps the shortest
prefix of the tokens sorted by probability whose mass reaches ``top_p``, the boundary token included, together with
every token tied with it; min-p keeps ``p >= min_p * max(p)``, inclusive.

Random numbers. fastsampler's draw for a row is a function of ``(seed, step, seq)`` (docs/semantics.md §7); it is an
exact draw from the row's distribution (no rejection rounds, no float-rounded CDF), the same on every backend.

- ``seed`` and ``offset`` given (both Python ints in ``[-2**63, 2**64)``, read modulo ``2**64``, or both int64 /
  uint64 tensors of length 1 or ``batch_size`` on the input's device): output row ``i`` draws with
  ``seed_i XOR (offset_i >> 32)`` as fastsampler's 64-bit seed, ``step = offset_i mod 2**32`` and ``seq = i``.
  The same ``(seed, offset)`` always gives the same tokens; ``fastsampler.sample(..., seeds=, steps=, seqs=)`` with
  those values gives them too. Giving only one of the two raises ``ValueError`` (FlashInfer would ignore it).
- Otherwise one 64-bit seed per output row is drawn from ``generator`` (``torch.default_generator`` or the CUDA
  device's default generator when ``generator`` is None), with ``step = 0`` and ``seq = i``: one small random op on
  the generator's device, no host synchronisation. ``torch.manual_seed`` therefore makes the results reproducible.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from .. import backends
from .._api import _backend_of
from .._batch import PackedBatch, pack_param_rows
from .._custom_ops import sample_packed as _sample_packed
from ..layout import F_MIN_P, F_TEMPERATURE, F_TOP_P, I_TOP_K, NF, NI, BatchFlags
from ..params import SamplingParams

__all__ = [
    "FLASHINFER_VERSION",
    "min_p_sampling_from_probs",
    "sampling_from_logits",
    "sampling_from_probs",
    "softmax",
    "top_k_mask_logits",
    "top_k_renorm_prob",
    "top_k_renorm_probs",
    "top_k_sampling_from_probs",
    "top_k_top_p_sampling_from_logits",
    "top_k_top_p_sampling_from_probs",
    "top_p_renorm_prob",
    "top_p_renorm_probs",
    "top_p_sampling_from_probs",
]

FLASHINFER_VERSION = "0.6.18"  # the version of flashinfer.sampling whose API this module follows

PerRow = int | float | torch.Tensor
Samples = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_FLT_MIN = 1.1754943508222875e-38  # the smallest normal float32: the smallest temperature the kernels represent
_U64 = 1 << 64


# ------------------------------------------------------------------------------------------------ argument checks
def _check_input(x: Any, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (batch_size, vocab_size), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be (batch_size, vocab_size), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have vocab_size >= 1, got shape {tuple(x.shape)}")
    return x


def _check_nan(x: torch.Tensor, name: str, check_nan: bool) -> None:
    if check_nan and bool(torch.isnan(x).any()):  # reads the device, as FlashInfer's check does
        raise ValueError(f"{name} contains NaN (check_nan=True)")


def _rows(x: torch.Tensor, indices: Any, name: str) -> tuple[torch.Tensor, torch.dtype]:
    """The (n, V) input rows of the n outputs and the samples' dtype."""
    if indices is None:
        return x, torch.int32
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"indices must be an int32 or int64 tensor of shape (batch_size,), got {got}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D (batch_size,), got shape {tuple(indices.shape)}")
    if indices.device != x.device:
        raise ValueError(f"indices must be on {name}'s device {x.device}, got {indices.device}")
    if indices.device.type == "cpu" and indices.numel():  # free to check on the host; a device tensor is not read
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= x.shape[0]:
            raise ValueError(f"indices must be in [0, {x.shape[0]}) (rows of {name}), got values in [{lo}, {hi}]")
    return x.index_select(0, indices.long()), indices.dtype


def _per_row(value: Any, name: str, n: int, *, integer: bool, lo: float, hi: float, lo_open: bool = False,
             what: str = "") -> PerRow:
    """A scalar (checked) or a (n,) tensor (checked when on the CPU) for one per-row parameter."""
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_complex or (integer and value.dtype.is_floating_point):
            kind = "an integer" if integer else "a real"
            raise ValueError(f"{name} must be a scalar or {kind} 1-D tensor, got a {value.dtype} tensor")
        if value.dim() != 1:
            raise ValueError(f"{name} must be a scalar or a 1-D tensor of shape ({n},), got a {value.dim()}-D "
                             f"tensor of shape {tuple(value.shape)}")
        if value.shape[0] != n:
            raise ValueError(f"{name} must have one value per output row, shape ({n},), got ({value.shape[0]},)")
        if value.device.type == "cpu" and n:
            v = value.double()
            bad = torch.isnan(v) | (v < lo) | (v > hi) | ((v == lo) if lo_open else False)
            if bool(bad.any()):
                raise ValueError(f"{name} values must be in {span}{what}, got {v[bad][0].item()!r}")
        return value
    if integer:  # Python or numpy integers; a float is refused, never truncated
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int or a 1-D integer tensor, got {value!r}")
        if not -(1 << 31) <= int(value) < (1 << 31):
            raise ValueError(f"{name} must fit in int32, got {value}")
        return int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float or a 1-D tensor, got {value!r}")
    v = float(value)
    if math.isnan(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name} must be in {span}{what}, got {value!r}")
    return v


def _seed_value(value: int, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int or an int64 / uint64 tensor, got {value!r}")
    if not -(1 << 63) <= int(value) < _U64:
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {value}")
    return int(value) % _U64


def _seed_tensor(value: torch.Tensor, name: str, n: int, device: torch.device) -> torch.Tensor:
    if value.dtype not in (torch.int64, torch.uint64):
        raise ValueError(f"{name} tensor must be int64 or uint64, got {value.dtype}")
    if value.dim() != 1 or value.shape[0] not in (1, n):
        raise ValueError(f"{name} tensor must be 1-D of length 1 or {n}, got shape {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} tensor must be on the input's device {device}, got {value.device}")
    v = value.view(torch.int64) if value.dtype == torch.uint64 else value
    return v.expand(n)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[idx]
    return torch.default_generator


def _rng(n: int, device: torch.device, generator: torch.Generator | None, seed: Any,
         offset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seeds, steps, seqs), int64 (n,) tensors on ``device``: the mapping of the module docstring."""
    seqs = torch.arange(n, dtype=torch.int64, device=device)
    if seed is None and offset is None:
        gen = _default_generator(device) if generator is None else generator
        seeds = torch.empty(n, dtype=torch.int64, device=gen.device).random_(-(1 << 63), None, generator=gen)
        return seeds.to(device, non_blocking=True), torch.zeros(n, dtype=torch.int64, device=device), seqs
    if seed is None or offset is None:
        raise ValueError(f"seed and offset must be given together, got seed={seed!r} and offset={offset!r}")
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError(f"seed and offset must both be ints or both be tensors, got {type(seed).__name__} and "
                         f"{type(offset).__name__}")
    if isinstance(seed, torch.Tensor):
        s = _seed_tensor(seed, "seed", n, device)
        o = _seed_tensor(offset, "offset", n, device)
        return s ^ ((o >> 32) & 0xFFFFFFFF), o & 0xFFFFFFFF, seqs
    s, o = _seed_value(seed, "seed"), _seed_value(offset, "offset")
    key = s ^ (o >> 32)
    key -= _U64 if key >= (1 << 63) else 0  # the uint64 bit pattern as int64
    return (torch.full((n,), key, dtype=torch.int64, device=device),
            torch.full((n,), o & 0xFFFFFFFF, dtype=torch.int64, device=device), seqs)


# ------------------------------------------------------------------------------------------------------- the batch
def _fill(col: torch.Tensor, value: PerRow) -> None:
    if isinstance(value, torch.Tensor):
        col.copy_(value.to(device=col.device, dtype=col.dtype, non_blocking=True))
    else:
        col.fill_(value)


_DEFAULT_ROWS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _default_rows(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed parameter row of ``SamplingParams()`` (every feature off) on ``device``, copied there once: later
    calls build their columns on the device without a host-to-device copy."""
    hit = _DEFAULT_ROWS.get(device)
    if hit is None:
        f0, i0 = pack_param_rows([SamplingParams()])
        hit = _DEFAULT_ROWS[device] = (torch.from_numpy(f0).to(device), torch.from_numpy(i0).to(device))
    return hit


def _batch(logits: torch.Tensor, *, temperature: PerRow = 1.0, top_k: PerRow = -1, top_p: PerRow = 1.0,
           min_p: PerRow = 0.0, rng: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> PackedBatch:
    """A packed batch of ``logits`` with only these parameters set (every other feature off)."""
    n = logits.shape[0]
    dev = logits.device
    f_row, i_row = _default_rows(dev)
    f = f_row.expand(n, NF).clone()
    i = i_row.expand(n, NI).clone()
    _fill(f[:, F_TEMPERATURE], temperature)
    _fill(f[:, F_TOP_P], top_p)
    _fill(f[:, F_MIN_P], min_p)
    _fill(i[:, I_TOP_K], top_k)
    flags = BatchFlags(
        any_greedy=isinstance(temperature, torch.Tensor),  # a temperature tensor may hold zeros (greedy rows)
        any_top_k=not (isinstance(top_k, int) and top_k <= 0),
        any_top_p=not (isinstance(top_p, float) and top_p >= 1.0),
        any_min_p=not (isinstance(min_p, float) and min_p <= 0.0),
    )
    zeros = torch.zeros(n, dtype=torch.int64, device=dev)
    seeds, steps, seqs = rng if rng is not None else (zeros, zeros, zeros)
    return PackedBatch(
        logits=logits, vocab_size=logits.shape[1], fparams=f, iparams=i, seeds=seeds, steps=steps, seqs=seqs,
        mirostat_mu=torch.full((n,), float("nan"), dtype=torch.float32, device=dev), flags=flags,
        eos_ids=torch.zeros(0, dtype=torch.int32, device=dev),
    )


def _as_logits(x: torch.Tensor, from_probs: bool) -> torch.Tensor:
    if from_probs:
        return torch.log(x.float())  # p = 0 -> -inf; a negative p -> NaN, an invalid row
    return x.float() if x.dtype == torch.float64 else x


def _backend(backend: str, logits: torch.Tensor) -> str:
    name, mod = _backend_of(backend, logits.device, logits.dtype)  # resolved once per (backend, device, dtype)
    if not mod.supports(logits.device, logits.dtype):
        raise ValueError(f"backend={name!r} does not support {logits.dtype} on {logits.device}")
    return name


def _kept(logits: torch.Tensor, backend: str, **params: PerRow) -> torch.Tensor:
    """(n, V) bool: each row's kept set under ``params`` (the backend's thresholds, not float32 probabilities)."""
    name = _backend(backend, logits)
    return backends.load(name).kept_mask_packed(_batch(logits, **params)).to(logits.device)


def _sample(x: Any, name: str, *, from_probs: bool, indices: Any, generator: torch.Generator | None,
            check_nan: bool, seed: Any, offset: Any, return_valid: bool, backend: str, top_k: Any = None,
            top_p: Any = None, min_p: Any = None, joint: bool = False) -> Samples:
    x = _check_input(x, name)
    _check_nan(x, name, check_nan)
    rows, out_dtype = _rows(x, indices, name)
    n = rows.shape[0]
    params: dict[str, PerRow] = {}
    if top_k is not None:
        params["top_k"] = _per_row(top_k, "top_k", n, integer=True, lo=-(1 << 31), hi=(1 << 31) - 1)
    if top_p is not None:
        params["top_p"] = _per_row(top_p, "top_p", n, integer=False, lo=0.0, hi=1.0, lo_open=True)
    if min_p is not None:
        params["min_p"] = _per_row(min_p, "min_p", n, integer=False, lo=0.0, hi=1.0)
    rng = _rng(n, x.device, generator, seed, offset)
    if n == 0:
        empty = torch.empty(0, dtype=out_dtype, device=x.device)
        return (empty, torch.empty(0, dtype=torch.bool, device=x.device)) if return_valid else empty
    logits = _as_logits(rows, from_probs)
    if joint:  # top-k and top-p both measured on the whole row: the intersection of their kept sets
        kept = _kept(logits, backend, top_k=params.pop("top_k")) & _kept(logits, backend, top_p=params.pop("top_p"))
        logits = logits.masked_fill(~kept, float("-inf"))
    out = _sample_packed(_backend(backend, logits), _batch(logits, rng=rng, **params))
    valid = out.valid.to(x.device)
    tokens = torch.where(valid, out.tokens.to(x.device), 0).to(out_dtype)  # FlashInfer's token for an invalid row
    return (tokens, valid) if return_valid else tokens


# -------------------------------------------------------------------------------------------------------- sampling
def sampling_from_logits(
    logits: torch.Tensor,
    indices: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Draw one token per output row from ``softmax(logits)``.

    Parameters
    ----------
    logits : (unique_batch_size, vocab_size) tensor
        Row ``i`` of the output is drawn from ``logits[i]``, or from ``logits[indices[i]]``.
    indices : (batch_size,) int32 / int64 tensor, optional
        Input row of each output row; the samples then have its dtype.
    deterministic : bool
        Accepted for compatibility; every draw is deterministic.
    generator : torch.Generator, optional
        Source of the per-row seeds when ``seed`` / ``offset`` are not given.
    check_nan : bool
        Raise ``ValueError`` when ``logits`` holds a NaN.
    seed, offset : int or int64 / uint64 tensor of length 1 or batch_size, optional
        Explicit random state (module docstring: how it maps to fastsampler's ``(seed, step, seq)``).
    backend : {'auto', 'cpu', 'triton', 'reference'}, keyword-only
        fastsampler's backend; ``auto`` picks it from the device.

    Returns
    -------
    samples : (batch_size,) int32 tensor (``indices``' dtype when given); 0 for a row with no valid distribution.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> logits = torch.tensor([[0.0, 30.0, 0.0], [-1e9, -1e9, 0.0]])
    >>> flashinfer.sampling_from_logits(logits, seed=7, offset=0).tolist()
    [1, 2]
    """
    return _sample(logits, "logits", from_probs=False, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=False, backend=backend)


def sampling_from_probs(
    probs: torch.Tensor,
    indices: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_valid: bool = False,
    *,
    backend: str = "auto",
) -> Samples:
    """Draw one token per output row from the distribution ``probs`` (renormalised over its row).

    Parameters
    ----------
    probs : (unique_batch_size, vocab_size) tensor
        Non-negative weights; zeros are never drawn. A NaN, ``+inf`` or negative entry, or an all-zero row, makes the
        row invalid.
    indices, deterministic, generator, check_nan, seed, offset, backend
        As in `sampling_from_logits`.
    return_valid : bool
        Also return the ``(batch_size,)`` bool tensor of the rows that had a valid distribution.

    Returns
    -------
    samples, or (samples, valid) when ``return_valid``.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> probs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    >>> tokens, valid = flashinfer.sampling_from_probs(probs, seed=1, offset=0, return_valid=True)
    >>> tokens.tolist(), valid.tolist()
    ([2, 0], [True, False])
    """
    return _sample(probs, "probs", from_probs=True, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=return_valid, backend=backend)


def top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_p: float | torch.Tensor,
    indices: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_valid: bool = False,
    *,
    backend: str = "auto",
) -> Samples:
    """Top-p (nucleus) sampling from ``probs``.

    Keeps the shortest prefix of the tokens in decreasing probability whose mass reaches ``top_p`` (the boundary
    token and every token tied with it included), then draws from the kept tokens renormalised.

    Parameters
    ----------
    probs : (unique_batch_size, vocab_size) tensor
    top_p : float in (0, 1], or (batch_size,) tensor
        ``1`` keeps every token.
    indices, deterministic, generator, check_nan, seed, offset, return_valid, backend
        As in `sampling_from_probs`.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.top_p_sampling_from_probs(torch.tensor([[0.7, 0.2, 0.1]]), 0.5, seed=3, offset=0).tolist()
    [0]
    """
    return _sample(probs, "probs", from_probs=True, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=return_valid, backend=backend, top_p=top_p)


def top_k_sampling_from_probs(
    probs: torch.Tensor,
    top_k: int | torch.Tensor,
    indices: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_valid: bool = False,
    *,
    backend: str = "auto",
) -> Samples:
    """Top-k sampling from ``probs``: draws from the ``top_k`` most probable tokens renormalised.

    Every token tied with the k-th largest probability is kept too.

    Parameters
    ----------
    probs : (unique_batch_size, vocab_size) tensor
    top_k : int or (batch_size,) integer tensor
        ``<= 0`` or ``>= vocab_size`` keeps every token.
    indices, deterministic, generator, check_nan, seed, offset, return_valid, backend
        As in `sampling_from_probs`.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.top_k_sampling_from_probs(torch.tensor([[0.1, 0.6, 0.3]]), 1, seed=3, offset=0).tolist()
    [1]
    """
    return _sample(probs, "probs", from_probs=True, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=return_valid, backend=backend, top_k=top_k)


def min_p_sampling_from_probs(
    probs: torch.Tensor,
    min_p: float | torch.Tensor,
    indices: torch.Tensor | None = None,
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_valid: bool = False,
    *,
    backend: str = "auto",
) -> Samples:
    """Min-p sampling from ``probs``: keeps the tokens with ``p >= min_p * max(p)`` (inclusive) and draws from them.

    Parameters
    ----------
    probs : (unique_batch_size, vocab_size) tensor
    min_p : float in [0, 1], or (batch_size,) tensor
        ``0`` keeps every token; ``1`` keeps the most probable token and its ties.
    indices, deterministic, generator, check_nan, seed, offset, return_valid, backend
        As in `sampling_from_probs`.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.min_p_sampling_from_probs(torch.tensor([[0.05, 0.9, 0.05]]), 0.5, seed=3, offset=0).tolist()
    [1]
    """
    return _sample(probs, "probs", from_probs=True, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=return_valid, backend=backend, min_p=min_p)


def _order(filter_apply_order: str) -> bool:
    if filter_apply_order not in ("top_k_first", "joint"):
        raise ValueError(f"filter_apply_order must be 'top_k_first' or 'joint', got {filter_apply_order!r}")
    return filter_apply_order == "joint"


def top_k_top_p_sampling_from_logits(
    logits: torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    indices: torch.Tensor | None = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Top-k and top-p sampling from ``logits`` (no temperature: scale the logits first).

    Parameters
    ----------
    logits : (unique_batch_size, vocab_size) tensor
    top_k : int or (batch_size,) integer tensor
        As in `top_k_sampling_from_probs`.
    top_p : float in (0, 1], or (batch_size,) tensor
        As in `top_p_sampling_from_probs`.
    filter_apply_order : {'top_k_first', 'joint'}
        ``top_k_first``: top-k, then top-p over the top-k tokens renormalised (fastsampler's own pipeline order).
        ``joint``: top-k and top-p both measured on the whole row; the tokens kept by both.
    indices, deterministic, generator, check_nan, seed, offset, backend
        As in `sampling_from_logits`.

    Returns
    -------
    samples : (batch_size,) int32 tensor (``indices``' dtype when given).

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> logits = torch.tensor([[3.0, 2.9, -5.0, 0.0]])
    >>> flashinfer.top_k_top_p_sampling_from_logits(logits, 2, 0.5, seed=0, offset=0).tolist()
    [0]
    """
    joint = _order(filter_apply_order)
    return _sample(logits, "logits", from_probs=False, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=False, backend=backend, top_k=top_k, top_p=top_p,
                   joint=joint)


def top_k_top_p_sampling_from_probs(
    probs: torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    indices: torch.Tensor | None = None,
    filter_apply_order: str = "top_k_first",
    deterministic: bool = True,
    generator: torch.Generator | None = None,
    check_nan: bool = False,
    seed: int | torch.Tensor | None = None,
    offset: int | torch.Tensor | None = None,
    return_valid: bool = False,
    *,
    backend: str = "auto",
) -> Samples:
    """Top-k and top-p sampling from ``probs``; arguments as in `top_k_top_p_sampling_from_logits` and
    `sampling_from_probs`.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> probs = torch.tensor([[0.5, 0.3, 0.2]])
    >>> flashinfer.top_k_top_p_sampling_from_probs(probs, 2, 0.6, seed=0, offset=0, return_valid=True)[1].tolist()
    [True]
    """
    joint = _order(filter_apply_order)
    return _sample(probs, "probs", from_probs=True, indices=indices, generator=generator, check_nan=check_nan,
                   seed=seed, offset=offset, return_valid=return_valid, backend=backend, top_k=top_k, top_p=top_p,
                   joint=joint)


# --------------------------------------------------------------------------------------------- renorm, mask, softmax
def _renorm(probs: Any, backend: str, **params: Any) -> torch.Tensor:
    probs = _check_input(probs, "probs")
    n = probs.shape[0]
    p = probs.float()
    if "top_k" in params:
        params["top_k"] = _per_row(params["top_k"], "top_k", n, integer=True, lo=-(1 << 31), hi=(1 << 31) - 1)
    if "top_p" in params:
        params["top_p"] = _per_row(params["top_p"], "top_p", n, integer=False, lo=0.0, hi=1.0, lo_open=True)
    if n == 0:
        return probs.clone()
    kept = _kept(torch.log(p), backend, **params)
    p = torch.where(kept, p, 0.0)
    total = p.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, p / total, 0.0).to(probs.dtype)  # a row with nothing valid stays all zero


def top_p_renorm_probs(
    probs: torch.Tensor,
    top_p: float | torch.Tensor,
    is_deterministic: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``probs`` restricted to each row's top-p nucleus and renormalised to sum to 1.

    The nucleus is the kept set of `top_p_sampling_from_probs` (boundary token and its ties kept), so sampling the
    result with `sampling_from_probs` is the same distribution as `top_p_sampling_from_probs`.

    Parameters
    ----------
    probs : (batch_size, vocab_size) tensor
    top_p : float in (0, 1], or (batch_size,) tensor
    is_deterministic : bool
        Accepted for compatibility; the result is always deterministic.
    backend : keyword-only, as in `sampling_from_logits`

    Returns
    -------
    (batch_size, vocab_size) tensor of ``probs``' dtype; all zero for a row with no valid distribution.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.top_p_renorm_probs(torch.tensor([[0.5, 0.25, 0.25]]), 0.6).tolist()  # the tie at 0.25 is kept
    [[0.5, 0.25, 0.25]]
    """
    return _renorm(probs, backend, top_p=top_p)


def top_k_renorm_probs(
    probs: torch.Tensor,
    top_k: int | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``probs`` restricted to each row's ``top_k`` largest values (and every value tied with the k-th) and
    renormalised to sum to 1.

    Parameters
    ----------
    probs : (batch_size, vocab_size) tensor
    top_k : int or (batch_size,) integer tensor
        ``<= 0`` or ``>= vocab_size`` keeps every token.
    backend : keyword-only, as in `sampling_from_logits`

    Returns
    -------
    (batch_size, vocab_size) tensor of ``probs``' dtype; all zero for a row with no valid distribution.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.top_k_renorm_probs(torch.tensor([[0.5, 0.3, 0.2]]), 2).tolist()
    [[0.625, 0.375, 0.0]]
    """
    return _renorm(probs, backend, top_k=top_k)


top_p_renorm_prob = top_p_renorm_probs  # the singular names FlashInfer also exports
top_k_renorm_prob = top_k_renorm_probs


def top_k_mask_logits(
    logits: torch.Tensor,
    top_k: int | torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``logits`` with every token outside the top ``top_k`` values set to ``-inf``.

    Every token tied with the k-th largest value is kept; ``softmax`` of the result equals `top_k_renorm_probs` of
    ``softmax(logits)``.

    Parameters
    ----------
    logits : (batch_size, vocab_size) tensor
    top_k : int or (batch_size,) integer tensor
        ``<= 0`` or ``>= vocab_size`` keeps every token.
    backend : keyword-only, as in `sampling_from_logits`

    Returns
    -------
    (batch_size, vocab_size) tensor of ``logits``' dtype; all ``-inf`` for a row with a NaN or ``+inf``.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> flashinfer.top_k_mask_logits(torch.tensor([[1.0, 3.0, 1.0, 0.0]]), 2).tolist()
    [[1.0, 3.0, 1.0, -inf]]
    """
    logits = _check_input(logits, "logits")
    k = _per_row(top_k, "top_k", logits.shape[0], integer=True, lo=-(1 << 31), hi=(1 << 31) - 1)
    if logits.shape[0] == 0:
        return logits.clone()
    kept = _kept(_as_logits(logits, False), backend, top_k=k)
    return logits.masked_fill(~kept, float("-inf"))


def softmax(
    logits: torch.Tensor,
    temperature: float | torch.Tensor | None = None,
    enable_pdl: bool | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(logits / temperature)`` per row, float32.

    Parameters
    ----------
    logits : (batch_size, vocab_size) tensor
    temperature : float > 0, or (batch_size,) tensor, optional
        Default 1. A tensor may hold 0 for a row: its result is one-hot at the largest logit (lowest id on a tie).
    enable_pdl : bool, optional
        A launch option of FlashInfer's CUDA kernel; accepted and ignored (it does not change the result).
    backend : keyword-only, as in `sampling_from_logits`

    Returns
    -------
    (batch_size, vocab_size) float32 tensor; all zero for a row with a NaN or ``+inf`` or without a finite logit.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.compat import flashinfer
    >>> [round(p, 4) for p in flashinfer.softmax(torch.tensor([[0.0, 1.0]]), temperature=0.5)[0].tolist()]
    [0.1192, 0.8808]
    """
    logits = _check_input(logits, "logits")
    n = logits.shape[0]
    t = _per_row(1.0 if temperature is None else temperature, "temperature", n, integer=False, lo=0.0,
                 hi=float("inf"), lo_open=not isinstance(temperature, torch.Tensor), what=" (0: greedy)")
    if isinstance(t, float) and not math.isfinite(t):
        raise ValueError(f"temperature must be finite, got {temperature!r}")
    if isinstance(t, float) and t < _FLT_MIN:
        raise ValueError(f"temperature must be at least {_FLT_MIN:g} (the smallest normal float32), got {t!r}")
    if n == 0:
        return torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    x = _as_logits(logits, False)
    probs = backends.load(_backend(backend, x)).sampling_probs_packed(_batch(x, temperature=t))
    return probs.to(logits.device)
