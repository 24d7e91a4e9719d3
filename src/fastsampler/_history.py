"""History rules (docs/semantics.md §3 A, C): ``no_repeat_ngram_size`` and ``bad_words_ids`` ban tokens from a
request's token history (prompt, then generated tokens); DRY penalises the tokens that would extend a repeat of it.

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

import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["WILD", "bad_words_table", "breakers_table", "dry_table", "dry_penalty", "history_keep", "histories",
           "ordered_history", "ring_keep"]

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


# ------------------------------------------------------------------------------------------------------------- DRY
DRY_FLOAT_MAX_LOG = 88.7228391  # DRY's exponent clamp: floor(this / ln base) when base > 1.000001 (§3 C)
DRY_PAD = (1 << 31) - 1  # the id of an unused DRY table entry (`PackedBatch.dry_ids`), above every token id


def breakers_table(breakers: Sequence[Sequence[int]], p: int, m: int) -> np.ndarray:
    """One request's DRY sequence breakers as a ``(p, m)`` int64 table, each left-aligned and padded with -1."""
    out = np.full((p, m), _NONE, dtype=np.int64)
    for i, s in enumerate(breakers):
        out[i, :len(s)] = s
    return out


def dry_penalty(length: Any, multiplier: Any, base: Any, allowed: Any) -> Any:
    """``multiplier * base^e`` with ``e = length - allowed`` clamped to ``floor(88.7228391 / ln base)`` when
    ``base > 1.000001`` (docs/semantics.md §3 C, DRY step 4), float64; numpy or torch operands."""
    lib = torch if isinstance(length, torch.Tensor) else np
    e = (length - allowed).to(torch.float64) if lib is torch else np.asarray(length - allowed, dtype=np.float64)
    big = base > 1.000001
    emax = lib.floor(DRY_FLOAT_MAX_LOG / lib.log(lib.where(big, base, 2.0)))
    e = lib.where(big, lib.minimum(e, emax), e)
    return multiplier * base ** e


def dry_table(ring: torch.Tensor, total: torch.Tensor, rows: torch.Tensor, fd: torch.Tensor, idry: torch.Tensor,
              breakers: torch.Tensor | None, kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The DRY penalties of the rows ``rows`` of history rings (docs/semantics.md §3 C) as a sparse table:
    ``(len(rows), K)`` int32 ids (unique and ascending per row, unused entries `DRY_PAD`) and float32 penalties
    (0 there). ``fd`` ``(S, 2)`` float64 (multiplier, base; multiplier 0: no DRY), ``idry`` ``(S, 2)`` int64
    (allowed length, window ``dry_penalty_last_n``), ``breakers`` ``(S, P, M)`` int64 (`breakers_table`) or None,
    all indexed by slot like ``ring`` / ``total``; ``kmax``: `dry_table_torch`'s bound, host-known (required when
    ``fd`` is on a device).

    On CPU tensors the C++ extension computes it (O(n log n) per row for a window of n tokens); on a device one
    Triton launch (`fastsampler.backends.triton.dry`, rings of up to 4096 tokens) or else torch, with a table of
    ``K = L - 1`` entries per row (no read-back). Costs grow with the history, never with the vocabulary.
    """
    if ring.device.type == "cpu":
        from .backends import cpu

        if cpu.is_available()[0] and hasattr(cpu, "dry_edits"):
            ids, vals = cpu.dry_edits(ring, total, rows, fd, idry, breakers)
            return torch.from_numpy(ids), torch.from_numpy(vals)
    if kmax is None:
        kmax = dry_kmax(fd.cpu().numpy(), idry.cpu().numpy(), ring.shape[1])  # (host tensors: no sync)
    if ring.device.type != "cpu" and _triton_dry(ring.shape[1]):  # one launch on a device
        from .backends.triton import dry

        return dry.dry_table(ring, total, rows, fd, idry, breakers, kmax)
    seq = ordered_history(ring.index_select(0, rows), total.index_select(0, rows))
    out = dry_table_torch(seq, fd.index_select(0, rows), idry.index_select(0, rows),
                          None if breakers is None else breakers.index_select(0, rows), kmax)
    if ring.device.type == "cpu":  # (no sync to avoid on the host: trim the unused columns)
        k = int((out[0] != DRY_PAD).sum(1).max()) if out[0].numel() else 0
        out = (out[0][:, :k].contiguous(), out[1][:, :k].contiguous())
    return out


def _triton_dry(length: int) -> bool:
    """Whether the Triton kernel builds the DRY table of rings of ``length`` tokens: triton importable, and the ring
    short enough for one program (`fastsampler.backends.triton.dry.MAX_RING`)."""
    import importlib.util

    return length <= _TRITON_MAX_RING and importlib.util.find_spec("triton") is not None


_TRITON_MAX_RING = 4096  # fastsampler.backends.triton.dry.MAX_RING (checked by its test)


def dry_kmax(fd: Any, idry: Any, length: int) -> int:
    """The longest repeat length that can change a DRY penalty of these rows (host values): the allowed length for
    ``base == 1``, plus the exponent clamp for ``base > 1.000001``, the whole history otherwise."""
    fd, idry = np.asarray(fd, dtype=np.float64).reshape(-1, 2), np.asarray(idry, dtype=np.int64).reshape(-1, 2)
    k = 0
    for (mult, base), (allowed, _) in zip(fd, idry, strict=True):
        if mult <= 0:
            continue
        if base == 1.0:
            k = max(k, int(allowed))
        elif base > 1.000001:
            k = max(k, int(allowed) + int(math.floor(DRY_FLOAT_MAX_LOG / math.log(base))))
        else:
            k = length
    return min(k, length)


def dry_table_torch(seq: torch.Tensor, fd: torch.Tensor, idry: torch.Tensor, breakers: torch.Tensor | None,
                    kmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`dry_table` on right-aligned histories ``seq`` ``(B, L)`` (-1 padding) and per-row parameters, with torch:
    ``(B, L - 1)`` tables. Repeat lengths are counted up to ``kmax`` (host-known, `dry_kmax` of the parameters by
    default: the longest that can change a penalty), so the work is ``O(L * kmax)`` per row."""
    b, length = seq.shape
    dev = seq.device
    mult, base = fd[:, 0], fd[:, 1]
    allowed, last_n = idry[:, 0], idry[:, 1]
    have = (seq >= 0).sum(1)
    n = torch.where(last_n < 0, have, torch.minimum(have, last_n))  # the window's length
    n = torch.where(mult > 0, n, 0)
    pos = torch.arange(length, device=dev)
    start = length - n  # the window is seq[:, start:]
    in_win = pos[None, :] >= start[:, None]
    # 1. the breaker limit rho: the newest breaker head whose whole sequence occurs (the longest at that head)
    rho = n.clone()
    single = torch.zeros(b, length, dtype=torch.bool, device=dev)  # token at pos is a one-token breaker
    if breakers is not None and breakers.shape[1]:
        m = breakers.shape[2]
        blen = (breakers >= 0).sum(2)  # (B, P)
        padded = torch.nn.functional.pad(seq, (0, m), value=-2)
        hit = (blen > 0)[:, :, None] & in_win[:, None, :]
        for t in range(m):
            tok = padded[:, t:t + length]  # token t after each position
            hit = hit & ((breakers[:, :, t:t + 1] < 0) | (tok[:, None, :] == breakers[:, :, t:t + 1]))
        hit = hit & (pos[None, None, :] + blen[:, :, None] - 1 <= length - 1)
        mlen = torch.where(hit, blen[:, :, None], -1).amax(1)  # (B, L): the longest breaker at each head
        j = torch.where(mlen >= 0, pos[None, :], -1).amax(1)  # the newest head with an occurrence
        found = j >= 0
        at = mlen.gather(1, j.clamp(min=0)[:, None])[:, 0]
        rho = torch.where(found, (length - 1 - j) - (at - 1), rho)
        single = ((blen == 1)[:, :, None] & (seq[:, None, :] == breakers[:, :, 0:1])).any(1)
    # 2. repeat lengths: how long the history's suffix also ends at each position, counted up to kmax (a length
    # beyond the allowed length plus the exponent clamp gives the same penalty)
    if kmax is None:
        kmax = dry_kmax(fd, idry, length)
    kk = max(1, min(kmax, length))
    # eq[r, j, k] = (seq[j - k] == seq[L - 1 - k]) for k < kk: windows of the left-padded history, newest first
    padded = torch.nn.functional.pad(seq, (kk, 0), value=-2)
    tail = seq[:, length - kk:].flip(1)  # (B, kk): seq[L - 1 - k]
    lens = torch.empty(b, length, dtype=torch.int64, device=dev)
    rows = max(1, (1 << 26) // max(1, length * kk))  # rows per chunk: at most 64 M compared pairs at once
    for r0 in range(0, b, rows):
        win = padded[r0:r0 + rows].unfold(1, kk, 1)[:, 1:].flip(2)  # (R, L, kk): seq[j - k]
        eq = win == tail[r0:r0 + rows, None, :]
        first_miss = (~eq).to(torch.uint8).argmax(2)  # the first k that does not match (0 when all match)
        lens[r0:r0 + rows] = torch.where(eq.all(2), kk, first_miss)
    # a repeat never reaches before the window (j - start + 1 tokens of it end at j), nor starts outside it
    lens = torch.where(in_win, torch.minimum(lens, pos[None, :] - start[:, None] + 1), 0)
    lens = torch.minimum(lens, rho[:, None])
    # 3. candidates: the token after each position whose repeat reaches the allowed length
    cand = in_win & (pos[None, :] <= length - 2) & (lens >= allowed[:, None]) & (rho >= allowed)[:, None] & (
        n > allowed)[:, None]
    nxt = torch.nn.functional.pad(seq, (0, 1), value=-1)[:, 1:]
    nxt_single = torch.nn.functional.pad(single, (0, 1), value=False)[:, 1:]
    cand = cand & ~nxt_single
    key = torch.where(cand, (nxt << 20) + lens.clamp(max=(1 << 20) - 1), (1 << 62))
    key, _ = key.sort(1)
    tok = key >> 20
    last_of = torch.ones_like(key, dtype=torch.bool)
    last_of[:, :-1] = tok[:, 1:] != tok[:, :-1]
    take = last_of & (key < (1 << 62))
    pen = dry_penalty(key & ((1 << 20) - 1), mult[:, None], base[:, None], allowed[:, None])
    ids = torch.where(take, tok, DRY_PAD)
    ids, order = ids[:, :length - 1].sort(1)
    vals = torch.where(take, pen, 0.0)[:, :length - 1].gather(1, order).to(torch.float32)
    return ids.to(torch.int32), vals
