"""Packing: a batch of `SamplingParams` and per-row state becomes flat per-row tensors that every backend reads.

This module is the internal contract between the public API and the backends (Triton, C++ CPU, reference adapter).

Packed form (all torch tensors on the logits' device, ``B`` rows, ``V = logits.shape[1]``, ``W = ceil(V / 32)``):

``fparams`` (B, NF) float32
    Columns ``F_*`` below: temperature, top_p, min_p, typical_p, frequency / presence / repetition penalty,
    mirostat tau (bits) and eta, epsilon_cutoff, eta_cutoff, top_n_sigma, XTC's effective probability (0 when its
    threshold is above 0.5) and threshold, dynatemp_range and dynatemp_exponent.
``iparams`` (B, NI) int32
    Columns ``I_*`` below: top_k, min_keep, mirostat mode, min_tokens, ignore_eos, logprobs (0/1), top_logprobs,
    logprobs mode (0 raw, 1 processed, 2 final).
``seeds`` (B,) int64
    The uint64 seed's bit pattern (``seed - 2**64`` when ``seed >= 2**63``).
``steps``, ``seqs`` (B,) int64
    Philox counter words (used modulo ``2**32``).
``mirostat_mu`` (B,) float32
    Mirostat state before this step (NaN for rows without mirostat).
``allowed_mask`` (B, W) int32 or None
    Bit ``t % 32`` of word ``t // 32`` set = token ``t`` may be sampled (allowed / banned ids and a caller's token
    bitmask, AND-ed). ``None``: nothing restricted.
``prompt_mask`` (B, W) int32 or None
    Bit set = token occurred in the prompt (repetition penalty).
``output_counts`` (B, >= vocab_size) int16 or int32 or None
    How often each token was generated so far (frequency / presence / repetition penalties).
``bias_indptr`` (B + 1,) int32, ``bias_ids`` (nnz,) int32, ``bias_vals`` (nnz,) float32, or all None
    Logit bias in CSR form; ids within a row are unique and sorted ascending. A row may also carry filler
    entries of value 0.0 (a `Sampler` building the table on the device pads every row to the same length); adding
    0.0 changes nothing.
``eos_ids`` (E,) int32
    EOS ids, banned where ``step < min_tokens`` or ``ignore_eos``.
``dry_ids`` (B, K) int32, ``dry_vals`` (B, K) float32, or both None
    DRY penalties (docs/semantics.md §3 C), row-indexed in every form: row ``r`` subtracts ``dry_vals[r, j]`` from
    the logit of ``dry_ids[r, j]`` after the frequency and presence penalties. Ids are unique and ascending within a
    row; unused entries hold `DRY_PAD` (larger than every id) with value 0.0.
``vocab_size``
    Columns ``>= vocab_size`` are padding and never sampled.
``n_top``
    Width ``N`` of the top-logprob outputs: at least the max ``top_logprobs`` over rows (a `Sampler` given slots as
    a device tensor uses the max over all its slots); entries beyond a row's own ``top_logprobs`` are -1 / NaN.
``flags``
    Host-known booleans from the params (no device data is read to compute them), used to specialise kernels.
``stops``
    Some row has ``stop_token_ids`` (host-known): the caller reports `SampleOutput.stopped` (`stopped_rows`).
``forced_tokens`` (B,) int64 or None
    Row-indexed form only: the rows' tokens are given, in ``[0, vocab_size)``, and not drawn. A valid row returns
    its forced token with that token's logprob, rank and Mirostat update (top-N as usual); an invalid row still
    returns -1. Final-mode logprobs and the Mirostat update are defined for kept tokens only (a greedy row's kept
    token is its argmax). Used by `fastsampler.score` and `fastsampler.Sampler.verify`; `sample_packed` only.

Slot-indexed form (a `Sampler`'s step on the Triton backend; `PackedBatch.gathered` turns it into the form above for
the other backends):

``slot_index`` (B,) int64 or None
    When set, ``fparams``, ``iparams``, ``seeds``, ``steps``, ``seqs``, ``mirostat_mu``, ``allowed_mask``,
    ``prompt_mask`` and ``output_counts`` are the Sampler's whole ``(S, ...)`` tables, and row ``r`` uses row
    ``slot_index[r]`` of each (slots distinct). ``allowed_mask`` / ``prompt_mask`` then have ``ceil(vocab_size / 32)``
    words (ids ``>= vocab_size`` are padding anyway). The logits and ``token_bitmask`` stay row-indexed.
``token_bitmask`` (B, >= ceil(vocab_size / 32)) int32 or None
    A per-step bitmask per row, AND-ed with the slot's ``allowed_mask`` (only with ``slot_index``; the row-indexed
    form folds it into ``allowed_mask``).
``bias_table_ids`` (S, K) int32, ``bias_table_vals`` (S, K) float32, ``bias_table_len`` (S,) int32, or all None
    The logit bias as per-slot tables (only with ``slot_index``, in place of the CSR): slot ``s`` biases ids
    ``bias_table_ids[s, :len[s]]`` (ascending, unique) by ``bias_table_vals[s, :len[s]]``.
``update_state``
    With ``slot_index``: the backend also applies the Sampler's state update (`advance_state`): for every row ``r``
    with slot ``s``, ``mirostat_mu[s]`` = the returned mu, and for a valid row ``steps[s] += 1`` and
    ``output_counts[s, token] += 1`` (saturating at 32767).
"""

from __future__ import annotations

import secrets
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import numpy as np
import torch

from ._history import bad_words_table, breakers_table, dry_table, histories, ring_keep
from .layout import (
    COUNT_MAX,
    I_MIN_TOKENS,
    LOGPROBS_MODES,
    MAX_COLUMNS,
    NF,
    NI,
    BatchFlags,
    combine_bits,
    flags_to_int,
    int_to_flags,
)
from .params import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Unpack


NO_TOKEN = -2  # pads id tables that are compared with sampled tokens (an invalid row's token is -1)

# the array fields of a packed batch, in the order of every positional form (the custom op's arguments, the C++
# extension's, `HostBatch`): `PackedBatch.arrays` / `PackedBatch.op_args` / `PackedBatch.from_op_args` use it
ARRAY_FIELDS = ("fparams", "iparams", "seeds", "steps", "seqs", "mirostat_mu", "allowed_mask", "prompt_mask",
                "output_counts", "bias_indptr", "bias_ids", "bias_vals", "eos_ids", "dry_ids", "dry_vals")


@dataclass
class PackedBatch:
    logits: torch.Tensor
    vocab_size: int
    fparams: torch.Tensor
    iparams: torch.Tensor
    seeds: torch.Tensor
    steps: torch.Tensor
    seqs: torch.Tensor
    mirostat_mu: torch.Tensor
    allowed_mask: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    output_counts: torch.Tensor | None = None
    bias_indptr: torch.Tensor | None = None
    bias_ids: torch.Tensor | None = None
    bias_vals: torch.Tensor | None = None
    eos_ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    n_top: int = 0
    flags: BatchFlags = field(default_factory=BatchFlags)
    slot_index: torch.Tensor | None = None
    token_bitmask: torch.Tensor | None = None
    bias_table_ids: torch.Tensor | None = None
    bias_table_vals: torch.Tensor | None = None
    bias_table_len: torch.Tensor | None = None
    update_state: bool = False
    forced_tokens: torch.Tensor | None = None
    stops: bool = False
    dry_ids: torch.Tensor | None = None
    dry_vals: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def arrays(self) -> tuple[torch.Tensor | None, ...]:
        """The row-indexed array fields in `ARRAY_FIELDS` order."""
        return tuple(getattr(self, name) for name in ARRAY_FIELDS)

    def op_args(self) -> tuple[Any, ...]:
        """The batch as the custom op ``fastsampler::sample_packed`` takes it (before the backend name): the
        logits, the `arrays`, ``vocab_size``, ``n_top`` and the flags as an int (`flags_to_int`). Row-indexed
        batches only (`gathered` first)."""
        assert self.slot_index is None, "a slot-indexed batch has no positional form: use gathered()"
        return (self.logits, *self.arrays(), int(self.vocab_size), int(self.n_top), flags_to_int(self.flags))

    @classmethod
    def from_op_args(cls, logits: torch.Tensor, *args: Any) -> PackedBatch:
        """Inverse of `op_args`."""
        *arrays, vocab_size, n_top, flags = args
        return cls(logits=logits, vocab_size=vocab_size, **dict(zip(ARRAY_FIELDS, arrays, strict=True)), n_top=n_top,
                   flags=int_to_flags(flags))

    def gathered(self) -> PackedBatch:
        """The row-indexed form of a slot-indexed batch (itself when ``slot_index`` is None): each table's rows
        gathered, masks padded to the logits' width, the token bitmask AND-ed into the allowed mask and the bias
        tables as a CSR. ``update_state`` is dropped: the caller applies `advance_state` after the backend."""
        if self.slot_index is None:
            return self
        idx = self.slot_index
        wl = mask_words(self.logits.shape[1])

        def take(t: torch.Tensor | None, fill: int | None = None) -> torch.Tensor | None:
            if t is None:
                return None
            t = t.index_select(0, idx)
            if fill is not None and t.shape[1] < wl:  # columns beyond vocab_size: padding, masked anyway
                t = torch.nn.functional.pad(t, (0, wl - t.shape[1]), value=fill)
            return t

        allowed = take(self.allowed_mask, -1)
        if self.token_bitmask is not None:
            tb = self.token_bitmask
            if tb.shape[1] < wl:
                tb = torch.nn.functional.pad(tb, (0, wl - tb.shape[1]), value=-1)
            tb = tb[:, :wl]
            allowed = tb.contiguous() if allowed is None else allowed[:, :wl] & tb
        indptr = ids = vals = None
        if self.bias_table_ids is not None and self.bias_table_ids.shape[1]:
            assert self.bias_table_vals is not None and self.bias_table_len is not None
            k = min(self.bias_table_ids.shape[1], self.vocab_size)
            indptr, ids, vals = bias_tables_to_csr(self.bias_table_ids, self.bias_table_vals, self.bias_table_len,
                                                   idx, k, self.vocab_size)
        return PackedBatch(
            logits=self.logits, vocab_size=self.vocab_size, fparams=take(self.fparams), iparams=take(self.iparams),
            seeds=take(self.seeds), steps=take(self.steps), seqs=take(self.seqs), mirostat_mu=take(self.mirostat_mu),
            allowed_mask=allowed, prompt_mask=take(self.prompt_mask, 0), output_counts=take(self.output_counts),
            bias_indptr=indptr, bias_ids=ids, bias_vals=vals, eos_ids=self.eos_ids, n_top=self.n_top,
            flags=self.flags, dry_ids=self.dry_ids, dry_vals=self.dry_vals,
        )


def advance_state(steps: torch.Tensor, mu: torch.Tensor, counts: torch.Tensor, slot_index: torch.Tensor,
                  steps_rows: torch.Tensor, out: Any) -> None:
    """A `Sampler` step's state update on the device, in place (slots distinct, so the scatters do not collide):
    ``steps[s] = steps_rows[r] + valid[r]``, ``mu[s]`` = the returned mu, ``counts[s, token] += 1`` for valid rows
    up to `COUNT_MAX` (``steps_rows``: the rows' steps before the step; ``counts``: (S, V) contiguous)."""
    valid = out.valid
    steps.index_copy_(0, slot_index, steps_rows + valid.to(torch.int64))
    mu.index_copy_(0, slot_index, out.mirostat_mu)
    flat = counts.view(-1)
    pos = slot_index * counts.shape[1] + out.tokens.clamp(min=0)
    cur = flat.index_select(0, pos)
    flat.index_copy_(0, pos, torch.where(valid & (cur < COUNT_MAX), cur + 1, cur))


def bias_tables_to_csr(table_ids: torch.Tensor, table_vals: torch.Tensor, table_len: torch.Tensor,
                       slot_index: torch.Tensor, k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logit bias of the slots ``slot_index`` in CSR form, built on the device from per-slot tables (no host
    sync).

    The entry count must not depend on device data, so every row gets exactly ``k`` entries (at least the largest
    bias of the slots, at most ``vocab``): its own, plus zero-valued entries at the lowest ids it does not bias
    (adding ``0.0`` to a logit changes nothing), kept sorted and unique per row as the `PackedBatch` contract asks.
    """
    b, dev, v = slot_index.shape[0], slot_index.device, vocab
    lens = table_len.index_select(0, slot_index).to(torch.int64)
    ids = table_ids.index_select(0, slot_index)[:, :k].to(torch.int64)
    vals = table_vals.index_select(0, slot_index)[:, :k]
    real = torch.arange(k, device=dev)[None, :] < lens[:, None]
    c = min(v, 2 * k)  # candidate filler ids [0, c): at least k - len of them are free in every row
    taken = torch.zeros(b, c + 1, dtype=torch.bool, device=dev)
    taken.scatter_(1, torch.where(real & (ids < c), ids, c), True)
    free = ~taken[:, :c]
    cand = torch.arange(c, device=dev)
    pick = free & (torch.cumsum(free, 1) <= (k - lens)[:, None])
    keys = torch.cat((torch.where(real, ids, v), torch.where(pick, cand[None, :], v)), 1)
    allv = torch.cat((torch.where(real, vals, 0.0), torch.zeros(b, c, dtype=torch.float32, device=dev)), 1)
    keys, order = torch.sort(keys, 1)
    out_ids = keys[:, :k].to(torch.int32).reshape(-1)
    out_vals = torch.gather(allv, 1, order[:, :k]).reshape(-1)
    indptr = torch.arange(b + 1, dtype=torch.int32, device=dev) * k
    return indptr, out_ids, out_vals


def to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``: no copy on the CPU (the tensor shares the array's memory); on CUDA a
    pinned staging copy and an asynchronous (``non_blocking``) host-to-device copy, which the CUDA caching host
    allocator keeps alive until the copy has run; elsewhere an ordinary copy."""
    t = torch.from_numpy(arr)
    if device.type == "cpu":
        return t
    if device.type == "cuda" and t.numel():
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def mask_words(vocab: int) -> int:
    """Number of int32 words of a token bitmask over ``vocab`` ids."""
    return (vocab + 31) // 32


def ids_to_bitmask(rows: Sequence[Sequence[int] | None], vocab: int) -> np.ndarray:
    """(B, W) int32 bitmask with the bits of each row's ids set (rows that are None stay zero)."""
    words = np.zeros((len(rows), mask_words(vocab)), dtype=np.uint32)
    for r, ids in enumerate(rows):
        if ids is None or len(ids) == 0:
            continue
        a = np.asarray(ids, dtype=np.int64)
        np.bitwise_or.at(words[r], a >> 5, (np.uint32(1) << (a & 31).astype(np.uint32)))
    return words.view(np.int32)


def bitmask_to_bool(mask: np.ndarray, vocab: int) -> np.ndarray:
    """Inverse of `ids_to_bitmask` for one or many rows: (..., W) int32 -> (..., vocab) bool."""
    m = np.asarray(mask).astype(np.int64) & 0xFFFFFFFF
    bits = (m[..., :, None] >> np.arange(32, dtype=np.int64)) & 1
    return bits.reshape(*m.shape[:-1], -1)[..., :vocab].astype(bool)


def seed_to_int64(seed: int) -> int:
    """The uint64 seed's bit pattern as a signed int64."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def random_seed() -> int:
    """A fresh random 64-bit seed."""
    return secrets.randbits(64)


def normalize_params(params: SamplingParams | Sequence[SamplingParams], batch: int) -> list[SamplingParams]:
    """One SamplingParams per row (a single one is used for every row)."""
    if isinstance(params, SamplingParams):
        return [params] * batch
    plist = list(params)
    if len(plist) != batch:
        raise ValueError(f"params must be one SamplingParams or a sequence of batch_size={batch}, got {len(plist)}")
    for i, p in enumerate(plist):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    return plist


def _is_int(x: Any) -> bool:
    return (isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)))


def check_int(name: str, value: Any, lo: int, hi: int | None = None, rng: str | None = None) -> int:
    """``int(value)`` after checking that it is an integer (not a float or a bool) in ``[lo, hi]`` (``rng``: how
    the message spells that range)."""
    rng = rng or (f"in [{lo}, {hi}]" if hi is not None else f">= {lo}")
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer {rng}, got {value!r} of type {type(value).__name__}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an integer {rng}, got {v}")
    return v


def id_array(ids: Any, name: str) -> np.ndarray:
    """Token ids (``name``, for the errors) as a 1-D int64 array; floats (which would be truncated) and bools are
    refused."""
    if ids is None:
        return np.zeros(0, dtype=np.int64)
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a {ids.dtype} tensor")
        return ids.detach().to("cpu", torch.int64).reshape(-1).numpy()
    if isinstance(ids, (int, np.integer, str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a sequence of ints, got {ids!r}")
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        bad = next((t for t in arr.reshape(-1).tolist() if not isinstance(t, int) or isinstance(t, bool)), arr.dtype)
        raise TypeError(f"{name} must hold integer token ids, got {bad!r} (dtype {arr.dtype})")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) >= 1 << 63:
        raise ValueError(f"{name} holds token id {int(arr.max())}, outside the int64 range")
    return arr.astype(np.int64).reshape(-1)


def token_array(ids: Any, name: str, vocab: int) -> np.ndarray:
    """`id_array`, every id checked against ``[0, vocab)``."""
    arr = id_array(ids, name)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        bad = int(arr[(arr < 0) | (arr >= vocab)][0])
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab})")
    return arr


def _checked_row(name: str, row: int, ids: Any, vocab: int) -> np.ndarray:
    """One row of token ids as an int64 array, checked in ``[0, vocab)`` (`check_ids` names a bad one)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    arr = np.asarray(ids)
    if arr.size and arr.ndim == 1 and arr.dtype.kind in "iu" and int(arr.min()) >= 0 and int(arr.max()) < vocab:
        return arr.astype(np.int64, copy=False)
    check_ids(name, row, ids, vocab)  # raises, naming the first id that is not an integer in [0, vocab)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise TypeError(f"{name} of row {row} must be a flat sequence of token ids, got shape {arr.shape}")
    return arr.astype(np.int64)


def id_tensor(ids: torch.Tensor, name: str, vocab: int, device: torch.device) -> torch.Tensor:
    """An integer tensor of token ids (``name``, for the errors) as int64 on ``device``, every id checked in
    ``[0, vocab)``: float, complex and bool tensors are refused, and a device tensor is read back once for the
    check."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got a {ids.dtype} tensor")
    out = ids.to(device=device, dtype=torch.int64)
    bad = (out < 0) | (out >= vocab)
    if out.numel() and bool(bad.any()):
        raise ValueError(f"{name} holds token id {int(out[bad][0])}, outside the vocabulary [0, {vocab})")
    return out


def check_ids(name: str, row: int | None, ids: Sequence[int], vocab: int) -> None:
    """Raise naming the row (``None``: no row) and the first id that is not an integer in ``[0, vocab)``."""
    where = name if row is None else f"{name} of row {row}"
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    for t in ids:
        if not _is_int(t):
            raise TypeError(f"{where} holds {t!r} of type {type(t).__name__}; token ids must be integers")
        if not 0 <= int(t) < vocab:
            raise ValueError(f"{where} holds token id {int(t)}, outside the vocabulary [0, {vocab})")


def request_flags(p: SamplingParams) -> BatchFlags:
    """The `BatchFlags` of a batch holding only ``p``: what this request uses."""
    greedy = p.temperature == 0.0
    return BatchFlags(
        any_greedy=greedy,
        all_greedy=greedy,
        any_top_k=p.top_k > 0,
        any_top_p=p.top_p < 1.0,
        # (epsilon and top-n-sigma are thresholds of the min-p stage)
        any_min_p=p.min_p > 0.0 or p.epsilon_cutoff > 0.0 or p.top_n_sigma > 0.0,
        any_typical=p.typical_p < 1.0,
        any_min_keep=p.min_keep > 1,
        any_mirostat=p.mirostat_mode != 0,
        any_penalty=p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0,
        any_logprobs=p.logprobs,
        any_eos_rule=p.min_tokens > 0 or p.ignore_eos,
        any_mirostat_v1=p.mirostat_mode == 1,
        any_mirostat_v2=p.mirostat_mode == 2,
        any_eta=p.eta_cutoff > 0.0,
        any_nsigma=p.top_n_sigma > 0.0,
        any_xtc=p.xtc_active and not greedy,
        any_dynatemp=p.dynatemp_range > 0.0,
        any_dry=p.dry_active,
    )


def batch_flags(plist: Sequence[SamplingParams]) -> BatchFlags:
    """The `BatchFlags` of a batch: its requests' flags combined (`combine_bits`)."""
    return int_to_flags(combine_bits([pack_request(p).bits for p in plist]))


def initial_mu(p: SamplingParams) -> np.float32:
    """Mirostat ``mu`` before a request's first step: ``2 * mirostat_target`` in float32 (beyond FLT_MAX it is inf,
    which keeps every token, as in float32), NaN without Mirostat."""
    with np.errstate(over="ignore"):
        return np.array(2.0 * p.mirostat_target if p.mirostat_mode else np.nan, dtype=np.float32)[()]


class PackedRequest:
    """One request's share of a batch, computed once per `SamplingParams` object (`pack_request`): its parameter
    rows, flag bits, seed, Mirostat ``mu`` before the first step, logit bias and allowed row. `pack_batch` and
    `Sampler.add` both build their rows from it.

    Attributes
    ----------
    f, i : np.ndarray
        The ``(NF,)`` float32 and ``(NI,)`` int32 parameter rows (columns ``F_*`` / ``I_*`` of `fastsampler.layout`).
    bits : int
        ``flags_to_int(request_flags(params))``.
    seed : int or None
        The seed's int64 bit pattern; None when ``params.seed`` is None (a fresh seed per call).
    mu : np.float32
        `initial_mu`.
    n_top : int
        ``params.top_logprobs``.
    restricted : bool
        Allowed or banned ids are set.
    bias_ids, bias_vals : np.ndarray
        The logit bias, int32 ids ascending and their float32 values.
    max_id : int
        The largest token id the params name (allowed, banned, logit bias, stop ids); -1 when none.
    stop_ids : np.ndarray
        ``params.stop_token_ids``, int64 ascending (empty when None).
    stop_ban : bool
        The stop ids are banned at first (``min_tokens > 0``).
    ignore_eos : bool
        ``params.ignore_eos`` (an EOS id then does not end the request).
    ngram, bad_words : int, tuple of tuples
        ``params.no_repeat_ngram_size`` and ``params.bad_words_ids`` (empty when None).
    history_rules : bool
        Some history rule applies (`fastsampler._history`).
    window : int
        The generated tokens the penalties count (``params.penalty_last_n``; -1, all, also when no penalty is on).
    dry : bool
        DRY applies (`SamplingParams.dry_active`).
    dry_f, dry_i, breakers : tuple
        ``(dry_multiplier, dry_base)``, ``(dry_allowed_length, dry_penalty_last_n)`` and the sequence breakers.
    """

    __slots__ = ("f", "i", "bits", "seed", "mu", "n_top", "restricted", "bias_ids", "bias_vals", "max_id", "_ids",
                 "_allowed", "stop_ids", "stop_ban", "ignore_eos", "ngram", "bad_words", "history_rules", "window",
                 "dry", "dry_f", "dry_i", "breakers")

    def __init__(self, p: SamplingParams) -> None:
        self.f = np.array((p.temperature, p.top_p, p.min_p, p.typical_p, p.frequency_penalty, p.presence_penalty,
                           p.repetition_penalty, p.mirostat_target, p.mirostat_lr, p.epsilon_cutoff, p.eta_cutoff,
                           p.top_n_sigma, p.xtc_probability if p.xtc_active else 0.0, p.xtc_threshold,
                           p.dynatemp_range, p.dynatemp_exponent), dtype=np.float32)
        self.i = np.array((p.top_k, p.min_keep, p.mirostat_mode, p.min_tokens, int(p.ignore_eos), int(p.logprobs),
                           p.top_logprobs, LOGPROBS_MODES.index(p.logprobs_mode)), dtype=np.int32)
        assert self.f.shape == (NF,) and self.i.shape == (NI,)
        self.bits = flags_to_int(request_flags(p))
        self.seed = None if p.seed is None else seed_to_int64(p.seed)
        self.mu = initial_mu(p)
        self.n_top = p.top_logprobs
        self.restricted = p.allowed_token_ids is not None or p.banned_token_ids is not None
        nb = len(p.logit_bias)
        self.bias_ids = np.fromiter(p.logit_bias.keys(), dtype=np.int32, count=nb)
        self.bias_vals = np.fromiter(p.logit_bias.values(), dtype=np.float32, count=nb)
        self.max_id = max(-1, *(max(ids, default=-1) for ids in (p.allowed_token_ids or (), p.banned_token_ids or (),
                                                                  p.logit_bias.keys(), p.stop_token_ids or (),
                                                                  *(p.bad_words_ids or ()))))
        self._ids = (p.allowed_token_ids, p.banned_token_ids)  # for the allowed rows, built per width
        self._allowed: dict[int, np.ndarray] = {}
        self.stop_ids = np.array(p.stop_token_ids or (), dtype=np.int64)
        self.stop_ban = bool(self.stop_ids.size) and p.min_tokens > 0
        self.ignore_eos = p.ignore_eos
        self.ngram = p.no_repeat_ngram_size
        self.bad_words = p.bad_words_ids or ()
        self.history_rules = self.ngram > 0 or bool(self.bad_words)
        # the penalties' window over generated tokens (-1: all of them); only where some penalty counts them
        penal = p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        self.window = p.penalty_last_n if penal else -1
        # DRY (§3 C): its float (multiplier, base) and int (allowed length, window) parameters and breakers
        self.dry = p.dry_active
        self.dry_f = (p.dry_multiplier, p.dry_base)
        self.dry_i = (p.dry_allowed_length, p.dry_penalty_last_n)
        self.breakers = p.dry_sequence_breakers or ()

    def allowed_row(self, v: int) -> np.ndarray:
        """The ``(ceil(v / 32),)`` int32 allowed bitmask over ``v`` columns (all ones when nothing is restricted).
        Cached for a few widths: do not modify it."""
        row = self._allowed.get(v)
        if row is None:
            allowed, banned = self._ids
            row = np.full(mask_words(v), -1, dtype=np.int32) if allowed is None else ids_to_bitmask([allowed], v)[0]
            if banned is not None:
                row &= ~ids_to_bitmask([banned], v)[0]
            if len(self._allowed) < 8:  # a few logits widths per params
                self._allowed[v] = row
        return row


def pack_param_rows(plist: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
    """(B, NF) float32 and (B, NI) int32 host arrays of the scalar parameters."""
    rows = [pack_request(p) for p in plist]
    if not rows:
        return np.zeros((0, NF), dtype=np.float32), np.zeros((0, NI), dtype=np.int32)
    return np.stack([r.f for r in rows]), np.stack([r.i for r in rows])


_REQUESTS: dict[int, tuple[weakref.ref, PackedRequest]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    hit = _REQUESTS.get(key)
    if hit is not None and hit[0] is ref:
        _REQUESTS.pop(key, None)


def pack_request(p: SamplingParams) -> PackedRequest:
    """The `PackedRequest` of ``p``, cached while ``p`` lives (`SamplingParams` is frozen; keyed on the object, so no
    hashing of its fields)."""
    if torch.compiler.is_compiling():  # traced by dynamo: no cache (weak references, module state)
        return PackedRequest(p)
    key = id(p)
    hit = _REQUESTS.get(key)
    if hit is not None and hit[0]() is p:
        return hit[1]
    row = PackedRequest(p)
    try:
        ref = weakref.ref(p, lambda r, k=key: _forget(k, r))
    except TypeError:  # pragma: no cover - a subclass without weak references: not cached
        return row
    _REQUESTS[key] = (ref, row)
    return row


class ParamBatch:
    """What packing needs from one `SamplingParams` per row, for a batch: cached per list of params objects (or per
    single params and batch size) by `param_batch`, so that a decoding loop that passes the same params each step packs
    them once. The arrays are read-only (shared between calls); `pack_batch` hands out copies.
    """

    __slots__ = ("params", "rows", "f", "i", "bits", "n_top", "seeds", "mu", "restricted", "max_id", "bias", "single",
                 "stops", "stop_ban", "history_rules", "windowed", "_history_args", "dry", "_dry_args")

    def __init__(self, params: SamplingParams | tuple[SamplingParams, ...], rows: list[PackedRequest], single: bool,
                 readonly: bool = True) -> None:
        _readonly = _set_readonly if readonly else _same
        self.params = params  # strong references: the cache key holds their ids
        self.rows = rows
        self.single = single
        b = len(rows)
        uniq = rows[:1] if single else rows
        self.f = _readonly(np.stack([e.f for e in rows]) if b else np.zeros((0, NF), dtype=np.float32))
        self.i = _readonly(np.stack([e.i for e in rows]) if b else np.zeros((0, NI), dtype=np.int32))
        self.bits = combine_bits([e.bits for e in uniq])
        self.n_top = max((e.n_top for e in uniq), default=0)
        self.seeds = None if any(e.seed is None for e in uniq) else _readonly(
            np.array([e.seed for e in rows], dtype=np.int64))
        self.mu = _readonly(np.array([e.mu for e in rows], dtype=np.float32))
        self.restricted = any(e.restricted for e in uniq)
        self.max_id = max((e.max_id for e in uniq), default=-1)
        self.stops = any(e.stop_ids.size for e in uniq)  # some row has stop ids: outputs report `stopped`
        self.stop_ban = any(e.stop_ban for e in uniq)  # some row bans its stop ids before min_tokens
        self.history_rules = any(e.history_rules for e in uniq)  # some row bans tokens from its history
        self.windowed = any(e.window >= 0 for e in uniq)  # some row's penalties count its last tokens only
        self._history_args: tuple[np.ndarray, list[int], np.ndarray | None] | None = None
        self.dry = any(e.dry for e in uniq)  # some row has DRY penalties
        self._dry_args: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
        self.bias: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if any(e.bias_ids.size for e in uniq):
            indptr = np.zeros(b + 1, dtype=np.int32)
            np.cumsum([e.bias_ids.size for e in rows], out=indptr[1:])
            self.bias = (_readonly(indptr), _readonly(np.concatenate([e.bias_ids for e in rows])),
                         _readonly(np.concatenate([e.bias_vals for e in rows])))

    def allowed(self, v: int) -> np.ndarray:
        """``(B, ceil(v / 32))`` int32 allowed bitmask (built per call: it can be large, so it is not cached here)."""
        if self.single:
            return np.repeat(self.rows[0].allowed_row(v)[None, :], len(self.rows), axis=0)
        return np.stack([e.allowed_row(v) for e in self.rows])

    def plist(self) -> list[SamplingParams]:
        return [self.params] * len(self.rows) if self.single else list(self.params)  # type: ignore[arg-type]

    def history_args(self) -> tuple[np.ndarray, list[int], np.ndarray | None]:
        """The rows' history rules as `fastsampler._history.history_keep` takes them: ``no_repeat_ngram_size`` per
        row, the distinct sizes, and the ``(B, P, M)`` bad-words table (None when no row has bad words); built once
        per `ParamBatch` (it depends on the params alone). Read-only."""
        if self._history_args is None:
            self._history_args = self._build_history_args()
        return self._history_args

    def _build_history_args(self) -> tuple[np.ndarray, list[int], np.ndarray | None]:
        ngram = np.array([e.ngram for e in self.rows], dtype=np.int64)
        p = max((len(e.bad_words) for e in self.rows), default=0)
        bad = None
        if p:
            m = max(len(w) for e in self.rows for w in e.bad_words)
            bad = np.stack([bad_words_table(e.bad_words, p, m) for e in self.rows])
        return ngram, sorted({int(n) for n in ngram if n > 0}), bad

    def dry_args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The rows' DRY parameters as `fastsampler._history.dry_table` takes them, built once per `ParamBatch`:
        ``(B, 2)`` float64 (multiplier, base; multiplier 0 on rows without DRY), ``(B, 2)`` int64 (allowed length,
        window) and the ``(B, P, M)`` breakers table (`breakers_table`; None when no row has breakers). Read-only."""
        if self._dry_args is None:
            fd = np.array([e.dry_f if e.dry else (0.0, 1.0) for e in self.rows], dtype=np.float64).reshape(-1, 2)
            idry = np.array([e.dry_i for e in self.rows], dtype=np.int64).reshape(-1, 2)
            p = max((len(e.breakers) for e in self.rows if e.dry), default=0)
            brk = None
            if p:
                m = max(len(w) for e in self.rows for w in e.breakers)
                brk = np.stack([breakers_table(e.breakers if e.dry else (), p, m) for e in self.rows])
            for a in (fd, idry, brk):
                if a is not None:
                    a.flags.writeable = False
            self._dry_args = (fd, idry, brk)
        return self._dry_args

    def stop_masks(self, v: int) -> np.ndarray:
        """``(B, ceil(v / 32))`` int32: the bits of each row's stop ids where it bans them (``min_tokens > 0``),
        zero elsewhere."""
        return ids_to_bitmask([e.stop_ids.tolist() if e.stop_ban else () for e in self.rows], v)

    def stop_table(self) -> np.ndarray:
        """``(B, L)`` int64: each row's stop ids padded with `NO_TOKEN` (never a token, not even an invalid row's
        -1)."""
        out = np.full((len(self.rows), max((e.stop_ids.size for e in self.rows), default=0)), NO_TOKEN,
                      dtype=np.int64)
        for r, e in enumerate(self.rows):
            out[r, :e.stop_ids.size] = e.stop_ids
        return out


def _set_readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _same(a: np.ndarray) -> np.ndarray:
    return a


_PARAM_BATCHES: dict[tuple[Any, ...], ParamBatch] = {}
_MAX_PARAM_BATCHES = 64
_BIG_BIAS = 1 << 16  # a batch with more logit-bias entries than this is not cached (memory)


def param_batch(params: SamplingParams | Sequence[SamplingParams], b: int) -> ParamBatch:
    """The `ParamBatch` of ``params`` (one for every row, or one per row) for ``b`` rows, checked and cached.

    The cache is keyed on the params objects' ids and holds references to them (so an id in a key cannot be reused
    while the entry lives); it holds at most `_MAX_PARAM_BATCHES` batches (then starts over).
    """
    single = isinstance(params, SamplingParams)
    if torch.compiler.is_compiling():  # traced by dynamo: no cache, no read-only flags
        if single:
            return ParamBatch(params, [pack_request(params)] * b, True, readonly=False)  # type: ignore[arg-type]
        plist = normalize_params(params, b)
        return ParamBatch(tuple(plist), [pack_request(p) for p in plist], False, readonly=False)
    if single:
        key: tuple[Any, ...] = ("one", id(params), b)
    else:
        if not isinstance(params, (list, tuple)):
            params = list(params)  # an iterator: read once
        key = tuple(map(id, params))
    hit = _PARAM_BATCHES.get(key)
    if hit is not None and len(hit.rows) == b:  # (a list's key does not hold b: one of another length is refused)
        return hit
    if single:
        pb = ParamBatch(params, [pack_request(params)] * b, True)  # type: ignore[arg-type]
    else:
        plist = normalize_params(params, b)
        pb = ParamBatch(tuple(plist), [pack_request(p) for p in plist], False)
    if pb.bias is None or pb.bias[1].size <= _BIG_BIAS:
        if len(_PARAM_BATCHES) >= _MAX_PARAM_BATCHES:
            _PARAM_BATCHES.clear()  # (atomic: other threads may be packing)
        _PARAM_BATCHES[key] = pb
    return pb


_INDEX_RANGES = {  # host values of the per-row index arguments: what is allowed
    "seeds": (-(1 << 63), (1 << 64) - 1, "in [0, 2**64) (or its int64 bit pattern, >= -2**63)"),
    "steps": (0, (1 << 63) - 1, "in [0, 2**63)"),
    "seqs": (0, (1 << 63) - 1, "in [0, 2**63)"),
}


def _index_values(x: Any, name: str, batch: int, device: torch.device,
                  dtype: torch.dtype) -> torch.Tensor | np.ndarray:
    """A ``(batch,)`` tensor of ``dtype`` on ``device`` from a tensor (used as it is: reading it would synchronise),
    or a host array from host values (checked: integers in the argument's range for the index columns, reals for
    ``mirostat_mu``)."""
    if isinstance(x, torch.Tensor):
        if dtype == torch.int64 and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        t: torch.Tensor | np.ndarray = x.to(device=device, dtype=dtype, non_blocking=True)
    else:
        arr = np.asarray(x)
        if arr.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {arr.shape}")
        if dtype == torch.int64:
            lo, hi, rng = _INDEX_RANGES[name]
            vals = [check_int(f"{name}[{r}]", v.item() if isinstance(v, np.generic) else v, lo, hi, rng)
                    for r, v in enumerate(arr.tolist() if arr.dtype != object else list(arr))]
            t = np.array([seed_to_int64(v) for v in vals], dtype=np.int64)
        else:
            if arr.dtype.kind not in "iuf":
                raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
            t = arr.astype(np.float32)
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    return t


def _as_index_tensor(x: Any, name: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_index_values` as a tensor on ``device``."""
    t = _index_values(x, name, batch, device, dtype)
    return to_device(t, device) if isinstance(t, np.ndarray) else t


def _as_state_tensor(x: Any, name: str) -> torch.Tensor:
    """A caller's state array (numpy or torch) as a torch tensor, keeping its dtype."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a torch tensor or a numpy array of integers, got {type(x).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr))


class HostBatch(NamedTuple):
    """`pack_host`: the packed batch of CPU logits with numpy arrays in place of tensors (the fields and their
    meaning are those of `PackedBatch`). The arrays may be shared with a cache or with the caller's tensors: read
    them, never write them."""

    logits: torch.Tensor
    vocab_size: int
    fparams: np.ndarray
    iparams: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray
    seqs: np.ndarray
    mirostat_mu: np.ndarray
    allowed_mask: np.ndarray | None
    prompt_mask: np.ndarray | None
    output_counts: np.ndarray | None
    bias_indptr: np.ndarray | None
    bias_ids: np.ndarray | None
    bias_vals: np.ndarray | None
    eos_ids: np.ndarray
    dry_ids: np.ndarray | None
    dry_vals: np.ndarray | None
    n_top: int
    flags: BatchFlags
    stops: bool = False

    def arrays(self) -> tuple[np.ndarray | None, ...]:
        """The array fields in `ARRAY_FIELDS` order (the C++ extension's positional arguments)."""
        return tuple(getattr(self, name) for name in ARRAY_FIELDS)


def _host_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor."""
    return (t.detach() if t.requires_grad else t).numpy()


_EMPTY_EOS = _set_readonly(np.zeros(0, dtype=np.int32))


class StepInputs(TypedDict, total=False):
    """The per-call inputs of a step besides the logits and the params: the keyword arguments of `fastsampler.sample`
    / `fastsampler.sampling_probs` (documented there), which `pack_batch` and `pack_host` take as they are."""

    prompt_token_ids: Sequence[Sequence[int]] | None
    output_token_ids: Sequence[Sequence[int]] | None
    steps: Any
    seqs: Any
    mirostat_mu: Any
    vocab_size: int | None
    seeds: Any
    prompt_mask: torch.Tensor | None
    output_counts: torch.Tensor | None
    token_bitmask: torch.Tensor | None
    eos_token_ids: Sequence[int] | torch.Tensor


_STEP_INPUTS = frozenset(StepInputs.__annotations__)


def _pack(
    logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams], host: bool, inputs: StepInputs, fn: str
) -> tuple[list[Any], int, int, BatchFlags, bool]:
    """The packing of `pack_batch` / `pack_host` (``fn``, for the error of an unknown keyword): the 15 array fields
    of a packed batch (`ARRAY_FIELDS`), the vocabulary size, ``n_top``, the flags and whether some row has stop ids.
    Fields are numpy arrays (``host``) or tensors on the logits' device."""
    unknown = sorted(inputs.keys() - _STEP_INPUTS)
    if unknown:
        raise TypeError(f"{fn}() got an unexpected keyword argument {unknown[0]!r}")
    prompt_token_ids = inputs.get("prompt_token_ids")
    output_token_ids = inputs.get("output_token_ids")
    steps, seqs, mirostat_mu = inputs.get("steps"), inputs.get("seqs"), inputs.get("mirostat_mu")
    vocab_size, seeds = inputs.get("vocab_size"), inputs.get("seeds")
    prompt_mask, output_counts = inputs.get("prompt_mask"), inputs.get("output_counts")
    token_bitmask, eos_token_ids = inputs.get("token_bitmask"), inputs.get("eos_token_ids", ())
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (batch_size, vocab_size), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    if v > MAX_COLUMNS:
        raise ValueError(f"logits may have at most 2^24 - 1 = {MAX_COLUMNS} columns (token ids are exact in float32 "
                         f"lanes up to 2^24), got {v}")
    vocab = v if vocab_size is None else check_int("vocab_size", vocab_size, 1, v)
    pb = param_batch(params, b)
    # a token id of the params outside [0, vocab): the per-row checks below raise, naming the row
    bad_ids = pb.max_id >= vocab

    # host arrays from the cache are shared: copied where they become tensors the caller could write to
    def own(a: np.ndarray) -> np.ndarray:
        return a if host else a.copy()

    # seeds: explicit tensor > params.seed > fresh random
    if seeds is None:
        if pb.seeds is not None:
            seeds_v: Any = own(pb.seeds)
        else:
            seeds_v = np.array([e.seed if e.seed is not None else seed_to_int64(random_seed()) for e in pb.rows],
                               dtype=np.int64)
    else:
        seeds_v = _index_values(seeds, "seeds", b, dev, torch.int64)
    steps_v = np.zeros(b, dtype=np.int64) if steps is None else _index_values(steps, "steps", b, dev, torch.int64)
    seqs_v = np.zeros(b, dtype=np.int64) if seqs is None else _index_values(seqs, "seqs", b, dev, torch.int64)
    mu_v = own(pb.mu) if mirostat_mu is None else _index_values(mirostat_mu, "mirostat_mu", b, dev, torch.float32)

    w = mask_words(v)
    # allowed / banned ids -> allowed bitmask
    allowed: Any = None
    if pb.restricted:
        if bad_ids:
            for r, p in enumerate(pb.plist()):
                if p.allowed_token_ids is not None:
                    check_ids("allowed_token_ids", r, p.allowed_token_ids, vocab)
                if p.banned_token_ids is not None:
                    check_ids("banned_token_ids", r, p.banned_token_ids, vocab)
        allowed = pb.allowed(v)
    if token_bitmask is not None:
        tb = _as_state_tensor(token_bitmask, "token_bitmask")
        if tb.dtype != torch.int32 or tb.dim() != 2 or tb.shape[0] != b or tb.shape[1] < mask_words(vocab):
            raise ValueError(
                f"token_bitmask must be int32 of shape ({b}, >= {mask_words(vocab)}), got {tb.dtype} "
                f"{tuple(tb.shape)}"
            )
        tb = tb.to(dev, non_blocking=True)
        if tb.shape[1] < w:  # pad: columns beyond vocab_size are masked anyway
            tb = torch.nn.functional.pad(tb, (0, w - tb.shape[1]), value=-1)
        tb = tb[:, :w]
        allowed = tb.contiguous() if allowed is None else (to_device(allowed, dev) & tb)
    if pb.stops and bad_ids:
        for r, p in enumerate(pb.plist()):
            check_ids("stop_token_ids", r, p.stop_token_ids or (), vocab)
    if pb.stop_ban:  # stop ids banned while step < min_tokens (docs/semantics.md §3 A): folded into the allowed mask
        allowed = _ban_stop_ids(allowed, pb.stop_masks(v), steps_v, pb.i[:, I_MIN_TOKENS], dev)
    # penalty state
    prompt: Any = None
    if prompt_mask is None and prompt_token_ids is not None:
        if len(prompt_token_ids) != b:
            raise ValueError(f"prompt_token_ids must hold batch_size={b} sequences, got {len(prompt_token_ids)}")
        # the rows as checked int64 arrays, converted once (the history rules read them again below)
        prompt_token_ids = [_checked_row("prompt_token_ids", r, ids, vocab) for r, ids in enumerate(prompt_token_ids)]
        prompt = ids_to_bitmask(prompt_token_ids, v)
    elif prompt_mask is not None:
        prompt = _as_state_tensor(prompt_mask, "prompt_mask")
        if prompt.dtype != torch.int32 or tuple(prompt.shape) != (b, w):
            raise ValueError(f"prompt_mask must be int32 of shape ({b}, {w}), got {prompt.dtype} "
                             f"{tuple(prompt.shape)}")
        prompt = prompt.to(dev)
    counts: Any = None
    if output_counts is None and output_token_ids is not None:
        if len(output_token_ids) != b:
            raise ValueError(f"output_token_ids must hold batch_size={b} sequences, got {len(output_token_ids)}")
        # the rows as checked int64 arrays, converted once (the history rules read them again below)
        output_token_ids = [_checked_row("output_token_ids", r, ids, vocab) for r, ids in enumerate(output_token_ids)]
        counted = []
        for r, ids in enumerate(output_token_ids):
            n = pb.rows[r].window  # penalty_last_n: the last n generated tokens only
            counted.append(ids if n < 0 else ids[max(0, ids.size - n):] if n else ids[:0])
        counts = np.zeros((b, v), dtype=np.int32)
        flat = np.concatenate([ids + r * v for r, ids in enumerate(counted)]) if b else np.zeros(0, dtype=np.int64)
        np.add.at(counts.reshape(-1), flat, 1)
    elif output_counts is not None:
        if pb.windowed:
            raise ValueError("penalty_last_n counts the last generated tokens in order: pass output_token_ids "
                             "(sequences), not output_counts")
        counts = _as_state_tensor(output_counts, "output_counts")
        if counts.dtype not in (torch.int16, torch.int32) or counts.dim() != 2 or (
            counts.shape[0] != b or counts.shape[1] < vocab
        ):
            raise ValueError(f"output_counts must be int16 or int32 of shape ({b}, >= {vocab}), got "
                             f"{counts.dtype} {tuple(counts.shape)}")
        counts = counts.to(dev)

    if pb.history_rules:  # n-gram / bad-word bans from the rows' histories (§3 A), folded into the allowed mask
        if bad_ids:
            for r, p in enumerate(pb.plist()):
                for seq in p.bad_words_ids or ():
                    check_ids("bad_words_ids", r, seq, vocab)
        for given, name, alt in ((prompt_mask, "prompt_mask", "prompt_token_ids"),
                                 (output_counts, "output_counts", "output_token_ids")):
            seqs = inputs.get(alt)
            if given is not None and seqs is None:
                raise ValueError(f"no_repeat_ngram_size / bad_words_ids read the token history in order: pass "
                                 f"{alt} (sequences), not only {name}")
            if given is not None:  # (not checked above, where the tensor won)
                if len(seqs) != b:
                    raise ValueError(f"{alt} must hold batch_size={b} sequences, got {len(seqs)}")
                for r, ids in enumerate(seqs):
                    check_ids(alt, r, ids, vocab)
        ngram, sizes, bad = pb.history_args()
        ring, total = histories(prompt_token_ids, output_token_ids, b)
        keep = ring_keep(torch.from_numpy(ring), torch.from_numpy(total), torch.from_numpy(ngram), sizes,
                         None if bad is None else torch.from_numpy(bad), torch.arange(b), w)
        if isinstance(allowed, torch.Tensor):
            allowed = allowed & keep.to(dev)
        else:
            allowed = keep.numpy() if allowed is None else allowed & keep.numpy()

    dry_ids = dry_vals = None
    if pb.dry:  # DRY penalties from the rows' histories (§3 C), a sparse (B, K) table
        for given, name, alt in ((prompt_mask, "prompt_mask", "prompt_token_ids"),
                                 (output_counts, "output_counts", "output_token_ids")):
            seqs = inputs.get(alt)
            if given is not None and seqs is None:
                raise ValueError(f"dry_multiplier reads the token history in order: pass {alt} (sequences), not "
                                 f"only {name}")
            if seqs is not None and len(seqs) != b:
                raise ValueError(f"{alt} must hold batch_size={b} sequences, got {len(seqs)}")
            if given is not None:  # (not checked above, where the tensor won)
                for r, ids in enumerate(seqs):
                    check_ids(alt, r, ids, vocab)
        if bad_ids:
            for r, p in enumerate(pb.plist()):
                for seq in p.dry_sequence_breakers or ():
                    check_ids("dry_sequence_breakers", r, seq, vocab)
        fd, idry, brk = pb.dry_args()
        ring, total = histories(prompt_token_ids, output_token_ids, b)
        ids_t, vals_t = dry_table(torch.from_numpy(ring), torch.from_numpy(total), torch.arange(b),
                                  torch.tensor(fd), torch.tensor(idry), None if brk is None else torch.tensor(brk))
        if ids_t.shape[1]:
            dry_ids, dry_vals = ids_t.numpy(), vals_t.numpy()

    # logit bias, CSR (ids sorted within a row: SamplingParams keeps logit_bias sorted)
    bias_indptr = bias_ids = bias_vals = None
    if pb.bias is not None:
        if bad_ids:
            for r, p in enumerate(pb.plist()):
                check_ids("logit_bias", r, p.logit_bias.keys(), vocab)
        bias_indptr, bias_ids, bias_vals = (own(a) for a in pb.bias)

    eos: Any
    if isinstance(eos_token_ids, torch.Tensor):
        if eos_token_ids.dtype.is_floating_point or eos_token_ids.dtype == torch.bool or eos_token_ids.dim() != 1:
            raise TypeError(f"eos_token_ids must be a 1-D integer tensor or a sequence of ints, got "
                            f"{eos_token_ids.dtype} of shape {tuple(eos_token_ids.shape)}")
        e64 = eos_token_ids.to(torch.int64)
        if e64.device.type == "cpu":  # checked where reading costs no device sync
            check_ids("eos_token_ids", None, e64.tolist(), vocab)
        else:  # not read back: an id outside [0, vocab_size) must not wrap into the vocabulary; it bans nothing
            e64 = torch.where((e64 >= 0) & (e64 < vocab), e64, -1)
        eos = e64.to(device=dev, dtype=torch.int32)
    elif isinstance(eos_token_ids, tuple) and not eos_token_ids:  # the default: no EOS ids
        eos = _EMPTY_EOS if host else np.zeros(0, dtype=np.int32)
    else:
        eos_list = list(np.asarray(eos_token_ids).reshape(-1).tolist()) if isinstance(eos_token_ids, np.ndarray) \
            else list(eos_token_ids)
        check_ids("eos_token_ids", None, eos_list, vocab)
        eos = np.array([int(t) for t in eos_list], dtype=np.int32)

    fields = [own(pb.f), own(pb.i), seeds_v, steps_v, seqs_v, mu_v, allowed, prompt, counts, bias_indptr, bias_ids,
              bias_vals, eos, dry_ids, dry_vals]
    if host:  # every field a numpy array (tensors here are on the CPU: views)
        fields = [x if x is None or isinstance(x, np.ndarray) else _host_array(x) for x in fields]
    else:  # every field a tensor on the logits' device
        fields = [to_device(x, dev) if isinstance(x, np.ndarray) else x for x in fields]
    return fields, vocab, pb.n_top, int_to_flags(pb.bits if b else 0), pb.stops


def _ban_stop_ids(allowed: Any, ban: np.ndarray, steps: Any, min_tokens: np.ndarray, dev: torch.device) -> Any:
    """``allowed`` (None, a host array or a tensor) with the ``ban`` bits cleared on rows whose step is below their
    ``min_tokens``: on the host for host steps, else on the device (no read-back)."""
    if isinstance(steps, np.ndarray):
        ban = np.where((steps < min_tokens)[:, None], ban, 0).astype(np.int32)
        if not ban.any():
            return allowed
        if isinstance(allowed, torch.Tensor):
            return allowed & to_device(~ban, dev)
        return (np.full(ban.shape, -1, dtype=np.int32) if allowed is None else allowed) & ~ban
    cond = steps < torch.from_numpy(np.ascontiguousarray(min_tokens, dtype=np.int64)).to(dev)
    keep = torch.where(cond[:, None], ~to_device(ban, dev), -1)
    if allowed is None:
        return keep
    return (to_device(allowed, dev) if isinstance(allowed, np.ndarray) else allowed) & keep


def stopped_rows(tokens: Any, params: SamplingParams | Sequence[SamplingParams], eos: Any) -> Any:
    """`SampleOutput.stopped` of a batch: None unless some row has stop ids, else whether each row's token is one
    of its stop ids or, unless it ignores EOS, an EOS id (numpy or torch, as ``tokens``; no read-back)."""
    if isinstance(params, SamplingParams) and params.stop_token_ids is None:  # (the common case: no lookup)
        return None
    b = int(tokens.shape[0])
    pb = param_batch(params, b)
    if not pb.stops:
        return None
    table = pb.stop_table()
    use_eos = np.array([not e.ignore_eos for e in pb.rows], dtype=bool)
    if isinstance(tokens, torch.Tensor):
        dev = tokens.device
        e = eos.to(dev) if isinstance(eos, torch.Tensor) else to_device(np.asarray(eos, dtype=np.int64), dev)
        hit_eos = (tokens[:, None] == e.to(torch.int64)[None, :]).any(1) & to_device(use_eos, dev)
        return (tokens[:, None] == to_device(table, dev)).any(1) | hit_eos
    t = np.asarray(tokens)
    e = np.asarray(eos.cpu() if isinstance(eos, torch.Tensor) else eos, dtype=np.int64).reshape(-1)
    return (t[:, None] == table).any(1) | ((t[:, None] == e[None, :]).any(1) & use_eos)


def pack_batch(
    logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams], **inputs: Unpack[StepInputs]
) -> PackedBatch:
    """Pack a batch for a backend. ``logits`` is a (B, V) torch tensor; all packed tensors land on its device.

    Sequence arguments (token histories) are packed here on the host; tensor arguments are used as they are (moved
    to the logits' device, no host synchronisation). What depends only on the params (parameter rows, flags, seeds,
    logit bias) is computed once per params object and list of them (`param_batch`). Host arrays become tensors
    without a copy on the CPU, and through pinned memory with asynchronous copies on CUDA (`to_device`).
    """
    fields, vocab, n_top, flags, stops = _pack(logits, params, False, inputs, "pack_batch")
    return PackedBatch(logits=logits, vocab_size=vocab, **dict(zip(ARRAY_FIELDS, fields, strict=True)), n_top=n_top,
                       flags=flags, stops=stops)


def pack_host(
    logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams], **inputs: Unpack[StepInputs]
) -> HostBatch:
    """`pack_batch` for CPU logits, with numpy arrays in place of tensors (what the C++ backend reads): no tensor
    is made only to be read back. The same checks and errors as `pack_batch`.

    Examples
    --------
    >>> import torch
    >>> from fastsampler.params import SamplingParams
    >>> hb = pack_host(torch.zeros(2, 40), SamplingParams(seed=3, top_k=5))
    >>> hb.fparams.shape, hb.seeds.tolist(), hb.flags.any_top_k
    ((2, 16), [3, 3], True)
    """
    if logits.device.type != "cpu":
        raise ValueError(f"pack_host packs CPU logits, got logits on {logits.device}")
    fields, vocab, n_top, flags, stops = _pack(logits, params, True, inputs, "pack_host")
    return HostBatch(logits=logits, vocab_size=vocab, **dict(zip(ARRAY_FIELDS, fields, strict=True)), n_top=n_top,
                     flags=flags, stops=stops)
