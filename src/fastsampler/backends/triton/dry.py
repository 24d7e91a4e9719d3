"""DRY's penalty table from a `Sampler`'s history rings in one launch (docs/semantics.md §3 C, DRY): the device form
of `fastsampler._history.dry_table`, which otherwise takes about a hundred torch ops per step on a device.

One program per row holds the row's window (``BLOCK``, a power of two at least the ring's length ``L``) in
registers:

1. the breaker limit ``rho``: each breaker matched at every position (``P x M`` gathers of the ring), the newest head
   with a whole occurrence wins (the longest breaker there);
2. repeat lengths: ``len[j]`` grows while ``seq[j - k] == seq[L - 1 - k]`` for ``k = 0, 1, ...``, up to ``KMAX`` (the
   longest length that can change a penalty, host-known) and no longer than any position still matches (the loop
   ends when none does);
3. candidates: the token after each position whose repeat reaches the allowed length (one-token breakers excluded),
   keyed ``token << 20 | length``; a sort puts each token's longest repeat last in its group, a second sort (the
   other entries keyed past every id) packs those ascending at the front;
4. penalties ``multiplier * base^min(length - allowed, floor(88.7228391 / ln base))`` (the clamp for
   ``base > 1.000001``) in float64, stored as float32 next to their ids; unused entries hold `DRY_PAD` and 0.

The table has ``L - 1`` entries per row (the most a window of ``L`` tokens can produce), so its shape never depends
on device data: nothing is read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._history import DRY_FLOAT_MAX_LOG, DRY_PAD

__all__ = ["MAX_RING", "dry_table"]

MAX_RING = 4096  # the longest ring one program holds in registers (longer rings: the torch form)

_PAD: tl.constexpr = tl.constexpr(DRY_PAD)
_FLOAT_MAX_LOG: tl.constexpr = tl.constexpr(DRY_FLOAT_MAX_LOG)
_KEY_PAST: tl.constexpr = tl.constexpr(1 << 62)  # a key past every (token << 20 | length)


@triton.jit
def _tok(ring_ptr, srow, total, L, j, ok):
    """The history token at right-aligned position ``j`` (oldest first; -2 where not ``ok``)."""
    idx = (total - L + j) % L
    idx = tl.where(ok & (idx >= 0) & (idx < L), idx, 0)  # (always in the ring: no mask needed)
    return tl.where(ok, tl.load(ring_ptr + srow * L + idx).to(tl.int64), -2)


@triton.jit
def _dry_table_kernel(ring_ptr, total_ptr, rows_ptr, fd_ptr, idry_ptr, brk_ptr, ids_ptr, vals_ptr, tmp_ptr,
                      L, P, M, KMAX, stride_o,
                      BLOCK: tl.constexpr, HAS_BRK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    srow = tl.load(rows_ptr + r).to(tl.int64)
    total = tl.load(total_ptr + srow).to(tl.int64)
    mult = tl.load(fd_ptr + srow * 2)
    base = tl.load(fd_ptr + srow * 2 + 1)
    allowed = tl.load(idry_ptr + srow * 2)
    last_n = tl.load(idry_ptr + srow * 2 + 1)
    have = tl.minimum(total, L)
    n = tl.where(last_n < 0, have, tl.minimum(have, last_n))
    n = tl.where(mult > 0.0, n, 0)
    start = L - n  # the window: positions [start, L)
    j = tl.arange(0, BLOCK).to(tl.int64)
    in_win = (j >= start) & (j < L)
    nxt = _tok(ring_ptr, srow, total, L, j + 1, in_win & (j + 1 < L))
    # 1. the breaker limit, and the candidates that are one-token breakers
    rho = n
    single = j < 0
    if HAS_BRK:
        mlen = tl.full([BLOCK], -1, tl.int64)
        for p in range(P):
            blen = 0
            match = in_win
            for t in range(M):
                bt = tl.load(brk_ptr + (srow * P + p) * M + t)
                blen += (bt >= 0).to(tl.int32)
                tok = _tok(ring_ptr, srow, total, L, j + t, in_win & (j + t < L))
                match = match & ((bt < 0) | (tok == bt))
            b0 = tl.load(brk_ptr + (srow * P + p) * M)
            hit = match & (blen > 0) & (j + blen - 1 <= L - 1)
            mlen = tl.maximum(mlen, tl.where(hit, blen, -1))
            single = single | ((blen == 1) & (nxt == b0))
        jstar = tl.max(tl.where(mlen >= 0, j, -1), 0)
        at = tl.max(tl.where(j == jstar, mlen, -1), 0)
        rho = tl.where(jstar >= 0, (L - 1 - jstar) - (at - 1), n)
    # 2. repeat lengths, up to KMAX, while some position still matches
    alive = in_win & (j <= L - 2)
    lens = tl.zeros([BLOCK], tl.int64)
    for k in range(0, KMAX):
        if tl.max(alive.to(tl.int32), 0) > 0:  # (nothing left to extend: the remaining steps do no work)
            back = j - k
            a = _tok(ring_ptr, srow, total, L, back, alive & (back >= start))
            bk = tl.load(ring_ptr + srow * L + ((total - 1 - k) % L + L) % L).to(tl.int64)
            alive = alive & (back >= start) & (a == bk) & (L - 1 - k >= start)
            lens += alive.to(tl.int64)
    lens = tl.minimum(lens, rho)
    # 3. candidates: each token's longest repeat, ascending by token
    cand = in_win & (j <= L - 2) & (lens >= allowed) & (rho >= allowed) & (n > allowed) & ~single
    key = tl.where(cand, (nxt << 20) | tl.minimum(lens, (1 << 20) - 1), _KEY_PAST)
    key = tl.sort(key)
    tok = key >> 20
    # the last entry of a token's group holds its longest repeat: keep it, push the others past every id (the next
    # entry's token through the row's scratch: a store, a barrier, a shifted load)
    tl.store(tmp_ptr + r * BLOCK + j, tok)
    tl.debug_barrier()
    after = tl.load(tmp_ptr + r * BLOCK + j + 1, mask=j + 1 < BLOCK, other=-1)
    last = (key < _KEY_PAST) & (after != tok)
    key = tl.sort(tl.where(last, key, _KEY_PAST))
    tok = key >> 20
    length = (key & ((1 << 20) - 1)).to(tl.float64)
    # 4. the penalties
    big = base > 1.000001
    lb = tl.log(tl.where(big, base, 2.0))
    emax = ((lb * 0.0 + _FLOAT_MAX_LOG) / lb).to(tl.int64).to(tl.float64)  # (floor: a positive quotient)
    e = length - allowed.to(tl.float64)
    e = tl.where(big, tl.minimum(e, emax), e)
    pen = mult * tl.exp(e * tl.log(base))
    used = key < _KEY_PAST
    out = j < L - 1
    tl.store(ids_ptr + r * stride_o + j, tl.where(used, tok, _PAD).to(tl.int32), mask=out)
    tl.store(vals_ptr + r * stride_o + j, tl.where(used, pen, 0.0).to(tl.float32), mask=out)


def dry_table(ring: torch.Tensor, total: torch.Tensor, rows: torch.Tensor, fd: torch.Tensor, idry: torch.Tensor,
              breakers: torch.Tensor | None, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fastsampler._history.dry_table` of the rows ``rows`` (slots) of history rings ``ring`` ``(S, L)`` with
    ``L <= MAX_RING``, in one launch: ``(B, L - 1)`` int32 ids and float32 penalties on the ring's device."""
    b, length = rows.shape[0], ring.shape[1]
    dev = ring.device
    block = max(16, 1 << max(length - 1, 1).bit_length())
    width = max(length - 1, 0)
    ids = torch.empty((b, width), dtype=torch.int32, device=dev)
    vals = torch.empty((b, width), dtype=torch.float32, device=dev)
    if b == 0 or width == 0:
        return ids, vals
    tmp = torch.empty((b, block), dtype=torch.int64, device=dev)
    has_brk = breakers is not None and breakers.shape[1] > 0 and breakers.shape[2] > 0
    brk = breakers.contiguous() if has_brk else ids
    p, m = (breakers.shape[1], breakers.shape[2]) if has_brk else (0, 0)
    _dry_table_kernel[(b,)](
        ring.contiguous(), total.to(torch.int64).contiguous(), rows.to(torch.int64).contiguous(),
        fd.to(torch.float64).contiguous(), idry.to(torch.int64).contiguous(), brk, ids, vals, tmp,
        length, p, m, int(kmax), width, BLOCK=block, HAS_BRK=has_brk, num_warps=4,
    )
    return ids, vals
