"""History rules of stage A (docs/semantics.md §3 A): ``no_repeat_ngram_size`` and ``bad_words_ids`` ban tokens
from a request's token history (prompt, then generated tokens).

Both become a ban bitmask that is AND-ed into the allowed mask the backends read, so no kernel changes and every
backend applies them alike. The bans are computed with torch on the history alone: the cost grows with the history
length ``L`` (``O(L n)`` per row for the n-gram rule, ``O(P M)`` for ``P`` bad words of up to ``M`` tokens), never
with the vocabulary, plus one ``(B, W)`` word mask. Nothing is read back from the device.

Histories are rings: token ``j`` of a row's prompt + output at column ``j % L``, with the number of tokens written
(`histories` builds them from host sequences for `fastsampler.sample`; a `Sampler` keeps the last ``history_len``
tokens of each slot in one). `ring_keep` computes the bans: on the CPU in the C++ extension
(``csrc/include/fastsampler/history.h``), elsewhere with torch on `ordered_history`, the ``(B, L)`` int64 history
oldest first and right-aligned (a row with fewer than ``L`` tokens padded on the left with -1).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["WILD", "bad_words_table", "history_keep", "histories", "ordered_history", "ring_keep"]

WILD = -3  # a bad word's prefix position that matches anything (prefixes shorter than the table are right-aligned)
_LITTLE_ENDIAN = sys.byteorder == "little"
_NONE = -1  # no token (history padding; a bad word slot without a sequence has last token -1)


def bad_words_table(bad_words: Sequence[Sequence[int]] | None, p: int, m: int) -> np.ndarray:
    """One request's bad words as a ``(p, m)`` int64 table: row ``i`` holds sequence ``i`` right-aligned (its last
    token in column ``m - 1``, its prefix before, `WILD` in front); unused rows end in -1 (they ban nothing)."""
    out = np.full((p, m), WILD, dtype=np.int64)
    out[:, m - 1] = _NONE
    for i, s in enumerate(bad_words or ()):
        out[i, m - len(s):] = s
    return out


def histories(prompts: Sequence[Sequence[int]] | None, outputs: Sequence[Sequence[int]] | None, b: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Host sequences (prompt, then output) as history rings: ``(b, L)`` int32 with token ``j`` of a row at column
    ``j`` (``L`` the longest history, at least 1), and each row's token count, int64."""
    rows = []
    for r in range(b):
        parts = ([np.asarray(prompts[r], dtype=np.int64)] if prompts is not None else []) + (
            [np.asarray(outputs[r], dtype=np.int64)] if outputs is not None else [])
        rows.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    total = np.array([h.size for h in rows], dtype=np.int64)
    ring = np.zeros((b, max(1, int(total.max(initial=0)))), dtype=np.int32)
    for r, h in enumerate(rows):
        ring[r, :h.size] = h
    return ring, total


def ordered_history(ring: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The right-aligned history of ring buffers: ``ring`` ``(B, L)`` holds token ``j`` of a sequence at column
    ``j % L``; ``total`` ``(B,)`` counts the tokens written. The last ``min(total, L)`` tokens, oldest first."""
    b, length = ring.shape
    j = torch.arange(length, device=ring.device)
    src = (total[:, None] - length + j[None, :]) % length
    seq = ring.to(torch.int64).gather(1, src)
    return torch.where(j[None, :] >= length - total.clamp(max=length)[:, None], seq, _NONE)


def history_keep(seq: torch.Tensor, ngram: torch.Tensor, ngram_sizes: Sequence[int], bad: torch.Tensor | None,
                 words: int) -> torch.Tensor:
    """``(B, words)`` int32 allowed bits (1 = allowed) from the history rules of docs/semantics.md §3 A.

    Parameters
    ----------
    seq : (B, L) int64
        Right-aligned histories (-1 padding).
    ngram : (B,) int
        Each row's ``no_repeat_ngram_size`` (0: off).
    ngram_sizes : sequence of int
        The distinct sizes > 0 among the rows (host-known), one vectorised pass each.
    bad : (B, P, M) int64 or None
        Each row's `bad_words_table`.
    words : int
        Width of the mask in 32-bit words.
    """
    b, length = seq.shape
    dev = seq.device
    cands = []
    for n in ngram_sizes:
        rows = (ngram == n)[:, None]
        if n == 1:  # every token of the history
            cands.append(torch.where(rows & (seq >= 0), seq, _NONE))
            continue
        if length < n:
            continue
        win = seq.unfold(1, n, 1)  # (B, L - n + 1, n): every n-gram, oldest first
        suffix = seq[:, length - n + 1:]  # the last n - 1 tokens
        # (padding is on the left only: a window whose first token is real is real throughout)
        hit = (win[:, :, :n - 1] == suffix[:, None, :]).all(-1) & (win[:, :, 0] >= 0)
        cands.append(torch.where(rows & hit, win[:, :, n - 1], _NONE))
    if bad is not None and bad.shape[1]:
        m = bad.shape[2]
        tail = seq[:, length - (m - 1):] if m > 1 else seq[:, :0]
        if tail.shape[1] < m - 1:  # a history shorter than the longest prefix: pad (never matches a real id)
            tail = torch.nn.functional.pad(tail, (m - 1 - tail.shape[1], 0), value=_NONE)
        pre = bad[:, :, :m - 1]
        ok = ((pre == tail[:, None, :]) | (pre == WILD)).all(-1)
        cands.append(torch.where(ok, bad[:, :, m - 1], _NONE))
    allowed = torch.full((b, words), -1, dtype=torch.int32, device=dev)
    if not cands:
        return allowed
    ids = torch.cat(cands, 1)
    big = words * 32
    key, _ = torch.where(ids >= 0, ids, big).sort(1)
    first = torch.ones_like(key, dtype=torch.bool)
    first[:, 1:] = key[:, 1:] != key[:, :-1]
    take = first & (key < big)
    word = torch.where(take, key >> 5, 0)
    bit = torch.where(take, torch.ones_like(key) << (key & 31), 0)
    banned = torch.zeros(b, words, dtype=torch.int64, device=dev).scatter_add_(1, word, bit)  # distinct bits: = OR
    low = banned.view(torch.int32)[:, 0::2] if _LITTLE_ENDIAN else banned.view(torch.int32)[:, 1::2]  # low words
    return ~low


def ring_keep(ring: torch.Tensor, total: torch.Tensor, ngram: torch.Tensor, ngram_sizes: Sequence[int],
              bad: torch.Tensor | None, rows: torch.Tensor, words: int) -> torch.Tensor:
    """`history_keep` of the rows ``rows`` of history rings (``ring`` ``(S, L)`` int32, ``total``, ``ngram`` and
    ``bad`` indexed by slot): on CPU tensors by the C++ extension (one loop per row, no torch op), elsewhere with
    torch on the device."""
    if ring.device.type == "cpu":
        from .backends import cpu

        if cpu.is_available()[0]:
            return torch.from_numpy(cpu.history_keep(ring, total, ngram, bad, rows, words))
    seq = ordered_history(ring.index_select(0, rows), total.index_select(0, rows))
    return history_keep(seq, ngram.index_select(0, rows), ngram_sizes,
                        None if bad is None else bad.index_select(0, rows), words)
