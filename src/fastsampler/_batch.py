"""Packing: a batch of `SamplingParams` and per-row state becomes flat per-row tensors that every backend reads.

This module is the internal contract between the public API and the backends (Triton, C++ CPU, reference adapter).

Packed form (all torch tensors on the logits' device, ``B`` rows, ``V = logits.shape[1]``, ``W = ceil(V / 32)``):

``fparams`` (B, NF) float32
    Columns ``F_*`` below: temperature, top_p, min_p, typical_p, frequency / presence / repetition penalty,
    mirostat tau (bits) and eta.
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
``vocab_size``
    Columns ``>= vocab_size`` are padding and never sampled.
``n_top``
    Width ``N`` of the top-logprob outputs: at least the max ``top_logprobs`` over rows (a `Sampler` given slots as
    a device tensor uses the max over all its slots); entries beyond a row's own ``top_logprobs`` are -1 / NaN.
``flags``
    Host-known booleans from the params (no device data is read to compute them), used to specialise kernels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .params import LOGPROBS_MODES, SamplingParams

# float parameter columns
F_TEMPERATURE, F_TOP_P, F_MIN_P, F_TYPICAL_P, F_FREQ, F_PRES, F_REP, F_MIRO_TAU, F_MIRO_ETA = range(9)
NF = 9
# int parameter columns
I_TOP_K, I_MIN_KEEP, I_MIRO_MODE, I_MIN_TOKENS, I_IGNORE_EOS, I_LOGPROBS, I_TOP_LOGPROBS, I_LOGPROBS_MODE = range(8)
NI = 8

MODE_RAW, MODE_PROCESSED, MODE_FINAL = 0, 1, 2

# logits may have at most this many columns: the kernels carry token ids in float32 lanes, exact up to 2^24
MAX_COLUMNS = (1 << 24) - 1


@dataclass(frozen=True)
class BatchFlags:
    """What the rows of a batch use; known on the host from the params alone."""

    any_greedy: bool = False
    all_greedy: bool = False
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    any_typical: bool = False
    any_min_keep: bool = False  # some row has min_keep > 1
    any_mirostat: bool = False
    any_penalty: bool = False  # repetition / frequency / presence on some row
    any_logprobs: bool = False
    any_eos_rule: bool = False  # some row bans EOS (min_tokens > 0 or ignore_eos)

    @property
    def any_truncation(self) -> bool:
        return self.any_top_k or self.any_top_p or self.any_min_p or self.any_typical or self.any_mirostat


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

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]

    @property
    def device(self) -> torch.device:
        return self.logits.device


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


def batch_flags(plist: Sequence[SamplingParams]) -> BatchFlags:
    greedy = [p.temperature == 0.0 for p in plist]
    return BatchFlags(
        any_greedy=any(greedy),
        all_greedy=bool(plist) and all(greedy),
        any_top_k=any(p.top_k > 0 for p in plist),
        any_top_p=any(p.top_p < 1.0 for p in plist),
        any_min_p=any(p.min_p > 0.0 for p in plist),
        any_typical=any(p.typical_p < 1.0 for p in plist),
        any_min_keep=any(p.min_keep > 1 for p in plist),
        any_mirostat=any(p.mirostat_mode != 0 for p in plist),
        any_penalty=any(
            p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in plist
        ),
        any_logprobs=any(p.logprobs for p in plist),
        any_eos_rule=any(p.min_tokens > 0 or p.ignore_eos for p in plist),
    )


def pack_param_rows(plist: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
    """(B, NF) float32 and (B, NI) int32 host arrays of the scalar parameters."""
    b = len(plist)
    f = np.zeros((b, NF), dtype=np.float32)
    i = np.zeros((b, NI), dtype=np.int32)
    for r, p in enumerate(plist):
        f[r] = (p.temperature, p.top_p, p.min_p, p.typical_p, p.frequency_penalty, p.presence_penalty,
                p.repetition_penalty, p.mirostat_target, p.mirostat_lr)
        i[r] = (p.top_k, p.min_keep, p.mirostat_mode, p.min_tokens, int(p.ignore_eos), int(p.logprobs),
                p.top_logprobs, LOGPROBS_MODES.index(p.logprobs_mode))
    return f, i


_INDEX_RANGES = {  # host values of the per-row index arguments: what is allowed
    "seeds": (-(1 << 63), (1 << 64) - 1, "in [0, 2**64) (or its int64 bit pattern, >= -2**63)"),
    "steps": (0, (1 << 63) - 1, "in [0, 2**63)"),
    "seqs": (0, (1 << 63) - 1, "in [0, 2**63)"),
}


def _as_index_tensor(x: Any, name: str, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A ``(batch,)`` tensor of ``dtype`` on ``device`` from a tensor (used as it is: reading it would synchronise)
    or host values (checked: integers in the argument's range for the index columns, reals for ``mirostat_mu``)."""
    if isinstance(x, torch.Tensor):
        if dtype == torch.int64 and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        t = x.to(device=device, dtype=dtype, non_blocking=True)
    else:
        arr = np.asarray(x)
        if arr.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {arr.shape}")
        if dtype == torch.int64:
            lo, hi, rng = _INDEX_RANGES[name]
            vals = [check_int(f"{name}[{r}]", v.item() if isinstance(v, np.generic) else v, lo, hi, rng)
                    for r, v in enumerate(arr.tolist() if arr.dtype != object else list(arr))]
            t = torch.tensor([seed_to_int64(v) for v in vals], dtype=torch.int64).to(device)
        else:
            if arr.dtype.kind not in "iuf":
                raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
            t = torch.as_tensor(arr.astype(np.float32), device=device, dtype=dtype)
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
    return t


def _as_state_tensor(x: Any, name: str) -> torch.Tensor:
    """A caller's state array (numpy or torch) as a torch tensor, keeping its dtype."""
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError(f"{name} must be a torch tensor or a numpy array of integers, got {type(x).__name__}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def pack_batch(
    logits: torch.Tensor,
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
) -> PackedBatch:
    """Pack a batch for a backend. ``logits`` is a (B, V) torch tensor; all packed tensors land on its device.

    Sequence arguments (token histories) are packed here on the host; tensor arguments are used as they are (moved
    to the logits' device, no host synchronisation).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (batch_size, vocab_size), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    if v > MAX_COLUMNS:
        raise ValueError(f"logits may have at most 2^24 - 1 = {MAX_COLUMNS} columns (token ids are exact in float32 "
                         f"lanes up to 2^24), got {v}")
    vocab = v if vocab_size is None else check_int("vocab_size", vocab_size, 1, v)
    plist = normalize_params(params, b)
    flags = batch_flags(plist)
    f, i = pack_param_rows(plist)

    # seeds: explicit tensor > params.seed > fresh random
    if seeds is None:
        seed_arr = np.array([seed_to_int64(p.seed if p.seed is not None else random_seed()) for p in plist],
                            dtype=np.int64)
        seeds_t = torch.from_numpy(seed_arr).to(dev)
    else:
        seeds_t = _as_index_tensor(seeds, "seeds", b, dev, torch.int64)
    steps_t = torch.zeros(b, dtype=torch.int64, device=dev) if steps is None else _as_index_tensor(
        steps, "steps", b, dev, torch.int64)
    seqs_t = torch.zeros(b, dtype=torch.int64, device=dev) if seqs is None else _as_index_tensor(
        seqs, "seqs", b, dev, torch.int64)
    if mirostat_mu is None:
        with np.errstate(over="ignore"):  # 2 * tau beyond FLT_MAX is mu = inf (keeps every token), as in float32
            mu = np.array([2.0 * p.mirostat_target if p.mirostat_mode else np.nan for p in plist], dtype=np.float32)
        mu_t = torch.from_numpy(mu).to(dev)
    else:
        mu_t = _as_index_tensor(mirostat_mu, "mirostat_mu", b, dev, torch.float32)

    w = mask_words(v)
    # allowed / banned ids -> allowed bitmask
    allowed_np = None
    if any(p.allowed_token_ids is not None or p.banned_token_ids is not None for p in plist):
        allowed_np = np.full((b, w), -1, dtype=np.int32)
        for r, p in enumerate(plist):
            if p.allowed_token_ids is not None:
                check_ids("allowed_token_ids", r, p.allowed_token_ids, vocab)
                allowed_np[r] = ids_to_bitmask([p.allowed_token_ids], v)[0]
            if p.banned_token_ids is not None:
                check_ids("banned_token_ids", r, p.banned_token_ids, vocab)
                allowed_np[r] &= ~ids_to_bitmask([p.banned_token_ids], v)[0]
    allowed_t = None if allowed_np is None else torch.from_numpy(allowed_np).to(dev)
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
        allowed_t = tb.contiguous() if allowed_t is None else (allowed_t & tb)

    # penalty state
    if prompt_mask is None and prompt_token_ids is not None:
        if len(prompt_token_ids) != b:
            raise ValueError(f"prompt_token_ids must hold batch_size={b} sequences, got {len(prompt_token_ids)}")
        for r, ids in enumerate(prompt_token_ids):
            check_ids("prompt_token_ids", r, ids, vocab)
        prompt_mask = torch.from_numpy(ids_to_bitmask(prompt_token_ids, v)).to(dev)
    elif prompt_mask is not None:
        prompt_mask = _as_state_tensor(prompt_mask, "prompt_mask")
        if prompt_mask.dtype != torch.int32 or tuple(prompt_mask.shape) != (b, w):
            raise ValueError(f"prompt_mask must be int32 of shape ({b}, {w}), got {prompt_mask.dtype} "
                             f"{tuple(prompt_mask.shape)}")
        prompt_mask = prompt_mask.to(dev)
    if output_counts is None and output_token_ids is not None:
        if len(output_token_ids) != b:
            raise ValueError(f"output_token_ids must hold batch_size={b} sequences, got {len(output_token_ids)}")
        counts = np.zeros((b, v), dtype=np.int32)
        for r, ids in enumerate(output_token_ids):
            check_ids("output_token_ids", r, ids, vocab)
            if len(ids):
                np.add.at(counts[r], np.asarray(ids, dtype=np.int64), 1)
        output_counts = torch.from_numpy(counts).to(dev)
    elif output_counts is not None:
        output_counts = _as_state_tensor(output_counts, "output_counts")
        if output_counts.dtype not in (torch.int16, torch.int32) or output_counts.dim() != 2 or (
            output_counts.shape[0] != b or output_counts.shape[1] < vocab
        ):
            raise ValueError(f"output_counts must be int16 or int32 of shape ({b}, >= {vocab}), got "
                             f"{output_counts.dtype} {tuple(output_counts.shape)}")
        output_counts = output_counts.to(dev)

    # logit bias, CSR
    bias_indptr = bias_ids = bias_vals = None
    if any(p.logit_bias for p in plist):
        indptr = np.zeros(b + 1, dtype=np.int32)
        ids_l: list[int] = []
        vals_l: list[float] = []
        for r, p in enumerate(plist):
            check_ids("logit_bias", r, p.logit_bias.keys(), vocab)
            ids_l.extend(p.logit_bias.keys())
            vals_l.extend(p.logit_bias.values())
            indptr[r + 1] = len(ids_l)
        bias_indptr = torch.from_numpy(indptr).to(dev)
        bias_ids = torch.tensor(ids_l, dtype=torch.int32, device=dev)
        bias_vals = torch.tensor(vals_l, dtype=torch.float32, device=dev)

    if isinstance(eos_token_ids, torch.Tensor):
        if eos_token_ids.dtype.is_floating_point or eos_token_ids.dtype == torch.bool or eos_token_ids.dim() != 1:
            raise TypeError(f"eos_token_ids must be a 1-D integer tensor or a sequence of ints, got "
                            f"{eos_token_ids.dtype} of shape {tuple(eos_token_ids.shape)}")
        e64 = eos_token_ids.to(torch.int64)
        if e64.device.type == "cpu":  # checked where reading costs no device sync
            check_ids("eos_token_ids", None, e64.tolist(), vocab)
        else:  # not read back: an id outside [0, vocab_size) must not wrap into the vocabulary; it bans nothing
            e64 = torch.where((e64 >= 0) & (e64 < vocab), e64, -1)
        eos_t = e64.to(device=dev, dtype=torch.int32)
    else:
        eos_list = list(np.asarray(eos_token_ids).reshape(-1).tolist()) if isinstance(eos_token_ids, np.ndarray) \
            else list(eos_token_ids)
        check_ids("eos_token_ids", None, eos_list, vocab)
        eos_t = torch.tensor([int(t) for t in eos_list], dtype=torch.int32, device=dev)

    return PackedBatch(
        logits=logits,
        vocab_size=vocab,
        fparams=torch.from_numpy(f).to(dev),
        iparams=torch.from_numpy(i).to(dev),
        seeds=seeds_t,
        steps=steps_t,
        seqs=seqs_t,
        mirostat_mu=mu_t,
        allowed_mask=allowed_t,
        prompt_mask=prompt_mask,
        output_counts=output_counts,
        bias_indptr=bias_indptr,
        bias_ids=bias_ids,
        bias_vals=bias_vals,
        eos_ids=eos_t,
        n_top=max((p.top_logprobs for p in plist), default=0),
        flags=flags,
    )
