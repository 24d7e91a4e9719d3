"""The per-slot state of a `fastsampler.distributed.Sampler` on one rank (`ShardTables`): the small state replicated
on every rank, and the vocabulary-sized state of this rank's slice of ids only.

Replicated (every rank holds the same values and updates them the same way): the packed parameter rows, seed and
seq (host arrays, written by `write` only); on the device, the seeds and seqs again, each slot's step and Mirostat
``mu`` (a step updates them without reading anything back), and the history ring with its rules (n-gram size, bad
words, DRY's parameters and breakers, the penalty window). Sharded: the output counts of the slice's ids, int16
``(S, V_local)``, and the prompt and allowed bitmasks of the slice, int32 ``(S, ceil(V_local / 32))`` with bit ``j``
for id ``vocab_start + j`` (the slice's own bit order, not word-aligned with the whole vocabulary's masks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ._batch import PackedRequest, ids_to_bitmask, mask_words
from ._history import DRY_PAD, dry_table, ordered_history, ring_keep
from ._slots import HistoryTables, RuleInfo
from .layout import COUNT_MAX, NF, NI

__all__ = ["ShardTables", "local_bits", "local_mask"]


def local_mask(ids: Sequence[int] | np.ndarray, lo: int, width: int) -> np.ndarray:
    """``(ceil(width / 32),)`` int32 bitmask of the ids in ``[lo, lo + width)``, bit ``j`` for id ``lo + j``."""
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    a = a[(a >= lo) & (a < lo + width)] - lo
    return ids_to_bitmask([a], width)[0]


def local_bits(words: torch.Tensor, width: int) -> torch.Tensor:
    """``(B, width)`` bool from ``(B, ceil(width / 32))`` int32 local bitmasks."""
    j = torch.arange(width, device=words.device)
    return ((words[:, j >> 5] >> (j & 31).to(torch.int32)) & 1).to(torch.bool)


class ShardTables(HistoryTables):
    """One rank's per-slot state for ``slots`` slots over a vocabulary of ``vocab`` ids, of which the rank holds
    ``[lo, lo + width)`` (``width`` the local logits' columns, padding included)."""

    def __init__(self, slots: int, vocab: int, lo: int, width: int, device: torch.device, history_len: int) -> None:
        self.slots, self.vocab, self.lo, self.width, self.device = slots, vocab, lo, width, device
        self.history_len = history_len
        self.local_words = mask_words(width)
        kw = dict(device=device)
        # replicated, on the host
        self.f = np.zeros((slots, NF), dtype=np.float32)
        self.i = np.zeros((slots, NI), dtype=np.int32)
        self.seeds = np.zeros(slots, dtype=np.int64)
        self.seqs = np.zeros(slots, dtype=np.int64)
        # replicated, on the device (what a step reads and writes)
        self.seeds_d = torch.zeros(slots, dtype=torch.int64, **kw)
        self.seqs_d = torch.zeros(slots, dtype=torch.int64, **kw)
        self.steps = torch.zeros(slots, dtype=torch.int64, **kw)
        self.mu = torch.full((slots,), math.nan, dtype=torch.float32, **kw)
        self.stop_ids: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * slots  # banned before min_tokens
        # sharded, on the device
        self.counts = torch.zeros(slots, width, dtype=torch.int16, **kw)
        self.counts_lo, self.counts_slice = lo, True  # (`HistoryTables.advance_history`)
        self.prompt = torch.zeros(slots, self.local_words, dtype=torch.int32, **kw)
        self.allowed: torch.Tensor | None = None  # (S, local words), once some request restricts ids
        # replicated, on the device: the history ring and its rules (`fastsampler._slots.HistoryTables`)
        self._init_history(slots, history_len, device)

    @property
    def nbytes_per_slot(self) -> int:
        """Device bytes per slot of the sharded tables (counts, prompt mask, and the allowed mask once allocated)."""
        n = 2 * self.width + 4 * self.local_words
        return n + (4 * self.local_words if self.allowed is not None else 0)

    @torch.inference_mode(False)
    def write(self, slots: Sequence[int], req: PackedRequest, seed_bits: int, prompt: np.ndarray,
              output: np.ndarray | None, *, step: int, mu: float | None, first_seq: int = 0,
              restored: tuple[np.ndarray, np.ndarray, np.ndarray, int, int] | None = None) -> None:
        """Fill ``slots`` for a request (sample ``seq = first_seq + i`` in ``slots[i]``): its rows and scalars, the
        slice's prompt bits, counts of its ``output`` tokens (those in the penalty window), allowed bits, and its
        history rules and history (prompt, then output). ``restored`` (`restore`): the slice's counts and prompt
        bits and the history (tokens, total, start) as exported, instead of those from ``prompt`` / ``output``."""
        dev, lo, width = self.device, self.lo, self.width
        idx = torch.tensor(list(slots), dtype=torch.int64, device=dev)
        for k, s in enumerate(slots):
            self.f[s], self.i[s], self.seeds[s], self.seqs[s] = req.f, req.i, seed_bits, first_seq + k
            self.stop_ids[s] = req.stop_ids if req.stop_ban else np.zeros(0, dtype=np.int64)
        self.seeds_d[idx] = torch.from_numpy(self.seeds[list(slots)]).to(dev)
        self.seqs_d[idx] = torch.from_numpy(self.seqs[list(slots)]).to(dev)
        self.steps[idx] = step
        self.mu[idx] = float(req.mu) if mu is None else float(mu)
        self.prompt[idx] = torch.from_numpy(local_mask(prompt, lo, width)).to(dev)
        counts = np.zeros(width, dtype=np.int16)
        if output is not None and output.size:
            win = req.window
            counted = output if win < 0 else output[max(0, output.size - win):] if win else output[:0]
            mine = counted[(counted >= lo) & (counted < lo + width)] - lo
            counts = np.minimum(np.bincount(mine, minlength=width), COUNT_MAX).astype(np.int16)
        if restored is not None:
            counts, bits = restored[0], restored[1]
            self.prompt[idx] = torch.from_numpy(np.asarray(bits, dtype=np.int32)).to(dev)
        self.counts[idx] = torch.from_numpy(np.asarray(counts, dtype=np.int16)).to(dev)
        if req.restricted:
            if self.allowed is None:
                self.allowed = torch.full((self.slots, self.local_words), -1, dtype=torch.int32, device=dev)
            allowed_ids, banned_ids = req._ids
            row = np.full(self.local_words, -1, dtype=np.int32) if allowed_ids is None else local_mask(
                allowed_ids, lo, width)
            if banned_ids is not None:
                row &= ~local_mask(banned_ids, lo, width)
            self.allowed[idx] = torch.from_numpy(row).to(dev)
        elif self.allowed is not None:
            self.allowed[idx] = -1
        if restored is not None:
            self.write_history(idx, req, restored[2], restored[3], restored[4])
        else:
            self.write_history(idx, req, prompt if output is None else np.concatenate((prompt, output)), None,
                               int(prompt.size))

    def read(self, slot: int) -> tuple[int, int, float, np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Host copies of ``slot``'s state (`export`; reads the device): (seq, step, ``mu``, the slice's counts
        ``(V_local,)`` int16 and prompt bits ``(ceil(V_local / 32),)`` int32, the history (its last tokens, oldest
        first), its length in all, where the output starts in it)."""
        hist, total = np.zeros(0, dtype=np.int64), int(self.hist_total[slot].item())
        if self.hist is not None:
            idx = torch.tensor([slot], device=self.device)
            seq = ordered_history(self.hist.index_select(0, idx), self.hist_total.index_select(0, idx))[0]
            hist = seq[seq >= 0].cpu().numpy().astype(np.int64)
        return (int(self.seqs[slot]), int(self.steps[slot].item()), float(self.mu[slot].item()),
                self.counts[slot].cpu().numpy().copy(), self.prompt[slot].cpu().numpy().copy(), hist, total,
                int(self.hist_start[slot].item()))

    # ---------------------------------------------------------------------------------------------- one step
    def history_bans(self, idx: torch.Tensor, info: RuleInfo) -> torch.Tensor | None:
        """``(B, V_local)`` bool allowed by the history rules (n-gram, bad words) of the slots ``idx``, or None.
        The rules run on the replicated ring (`fastsampler._history.ring_keep`, a whole-vocabulary word mask per row
        for the step only), and the slice's bits are taken from it."""
        if not info.history:
            return None
        assert self.hist is not None
        from .distributed import _shard_bits

        keep = ring_keep(self.hist, self.hist_total, self.ngram, info.ngram_sizes,
                         self.bad if info.bad_words else None, idx, mask_words(self.vocab))
        hi = max(min(self.lo + self.width, self.vocab), self.lo)
        return _shard_bits(keep, self.lo, hi, self.width, self.device)

    def dry_entries(self, idx: torch.Tensor, info: RuleInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """DRY's penalties of the slots ``idx`` on the slice, as (row, local column, value) entries: the table of
        `fastsampler._history.dry_table` on the replicated ring (the same table a single-device `Sampler` uses)."""
        if not info.dry:
            return None
        assert self.hist is not None and self.dry_f is not None and self.dry_i is not None
        ids, vals = dry_table(self.hist, self.hist_total, idx, self.dry_f, self.dry_i,
                              self.breakers if info.dry_breakers else None, kmax=min(info.dry_kmax, self.history_len))
        if not ids.shape[1]:
            return None
        # on the device, nothing read back: an entry that is not the slice's goes to column V_local (dropped)
        ids = ids.to(torch.int64)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        sel = (ids != DRY_PAD) & (ids >= self.lo) & (ids < self.lo + self.width)
        cols = torch.where(sel, ids - self.lo, self.width)
        return rows.reshape(-1), cols.reshape(-1), vals.to(torch.float64).reshape(-1)

    @torch.inference_mode(False)
    def advance(self, idx: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor, mu: torch.Tensor) -> None:
        """After a step (slots ``idx`` distinct), on the device: steps += valid and ``mu`` stored, this slice's count
        of each valid token (int16, saturating at `COUNT_MAX`), the token appended to the history ring, and a token
        that left a slot's penalty window taken out of the counts when it is one of the slice's ids."""
        self.steps.index_add_(0, idx, valid.to(torch.int64))
        self.mu.index_copy_(0, idx, mu.to(torch.float32))
        lo, width = self.lo, self.width
        loc = tokens.to(torch.int64) - lo
        mine = valid & (loc >= 0) & (loc < width)
        cflat = self.counts.view(-1)
        pos = idx * width + torch.where(mine, loc, 0)
        cur = cflat.index_select(0, pos)
        cflat.index_copy_(0, pos, torch.where(mine & (cur < COUNT_MAX), cur + 1, cur))
        self.advance_history(idx, tokens, valid)
