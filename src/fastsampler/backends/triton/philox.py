"""Philox4x32-10 and the exponential noise of docs/semantics.md §7, as Triton device functions.

Every exponential variate of the race is word ``j & 3`` of
``Philox4x32-10(key=(seed lo32, seed hi32), counter=(j >> 2, step, seq, stream))``. Token noise uses ``j = id``,
stream 0; tile noise ``j = tile index``, stream 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["philox4x32", "philox_words"]

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85


@triton.jit
def _philox_round(c0, c1, c2, c3, k0, k1):
    m0 = tl.full(c0.shape, 0xD2511F53, tl.uint32)
    m1 = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
    hi0 = tl.umulhi(m0, c0)
    lo0 = m0 * c0
    hi1 = tl.umulhi(m1, c2)
    lo1 = m1 * c2
    return hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0


@triton.jit
def philox4(c0, step, seq, stream, k0, k1):
    """The four words of Philox4x32-10(key=(k0, k1), counter=(c0, step, seq, stream)); all uint32.

    ``c0`` is a uint32 block of counters; ``step``, ``seq``, ``k0``, ``k1`` are uint32 scalars; ``stream`` a python
    int. One call serves the four consecutive variates ``j = 4 c0 .. 4 c0 + 3`` (word ``j & 3``, docs/semantics.md
    §7).
    """
    c1 = tl.zeros(c0.shape, tl.uint32) + step
    c2 = tl.zeros(c0.shape, tl.uint32) + seq
    c3 = tl.zeros(c0.shape, tl.uint32) + stream
    a = tl.zeros(c0.shape, tl.uint32) + k0
    b = tl.zeros(c0.shape, tl.uint32) + k1
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(9):
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, a, b)
        a = a + w0
        b = b + w1
    return _philox_round(c0, c1, c2, c3, a, b)


@triton.jit
def philox_word(j, step, seq, stream, k0, k1):
    """Word ``j & 3`` of Philox4x32-10(key=(k0, k1), counter=(j >> 2, step, seq, stream)); all uint32.

    ``j`` is a uint32 block; ``step``, ``seq``, ``k0``, ``k1`` are uint32 scalars; ``stream`` a python int. Used
    where ``j`` is not a run of four (the tile noise); blocks of ids use `philox4` once per four ids.
    """
    c0, c1, c2, c3 = philox4(j >> 2, step, seq, stream, k0, k1)
    w = j & 3
    return tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3)))


@triton.jit
def philox_quads(first, step, seq, stream, k0, k1, R: tl.constexpr):
    """Words of the ``4 R`` consecutive variates ``j = 4 first .. 4 (first + R) - 1`` as an ``(R, 4)`` block (row
    ``i`` holds ``j = 4 (first + i) + 0 .. 3``): one Philox call per four ids (docs/semantics.md §7)."""
    c0, c1, c2, c3 = philox4(first.to(tl.uint32) + tl.arange(0, R).to(tl.uint32), step, seq, stream, k0, k1)
    col = tl.arange(0, 4)[None, :]
    return tl.where(col == 0, c0[:, None], tl.where(col == 1, c1[:, None], tl.where(col == 2, c2[:, None],
                                                                                     c3[:, None])))


@triton.jit
def neg_log_exp_noise(r):
    """``-ln E`` for the exponential variate ``E`` of the uint32 word ``r`` (float32, docs/semantics.md §7).

    ``E = -ln((r + 0.5) 2^-32)`` for ``r < 2^31``, else ``E = -log1p(-((~r) + 0.5) 2^-32)``; log1p is evaluated with
    the ``log(1 + x) * x / ((1 + x) - 1)`` correction so that tiny ``E`` keep their relative precision.
    """
    lo = r < 0x80000000
    nr = (~r).to(tl.float32)
    u = (tl.where(lo, r.to(tl.float32), nr) + 0.5) * 2.3283064365386963e-10
    w = 1.0 - u
    # one logarithm serves both branches: ln u (r < 2^31) or ln w for log1p(-u) = ln(w) * (-u) / (w - 1); when w
    # rounds to 1, log1p(-u) = -u
    lg = tl.log(tl.where(lo, u, w))
    l1p = tl.where(w == 1.0, -u, lg * (-u) / tl.where(w == 1.0, -1.0, w - 1.0))
    e = tl.where(lo, -lg, -l1p)
    return -tl.log(e)


@triton.jit
def seed_key(seed):
    """(k0, k1) uint32 key words of an int64 seed bit pattern."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1


@triton.jit
def _philox_block_kernel(out_ptr, ctr_ptr, key_ptr, N, BLOCK: tl.constexpr):  # BLOCK: one block holds every counter
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    c0 = tl.load(ctr_ptr + offs * 4 + 0, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(ctr_ptr + offs * 4 + 1, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(ctr_ptr + offs * 4 + 2, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(ctr_ptr + offs * 4 + 3, mask=mask, other=0).to(tl.uint32)
    a = tl.load(key_ptr + offs * 2 + 0, mask=mask, other=0).to(tl.uint32)
    b = tl.load(key_ptr + offs * 2 + 1, mask=mask, other=0).to(tl.uint32)
    w0 = tl.full(c0.shape, 0x9E3779B9, tl.uint32)
    w1 = tl.full(c0.shape, 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(9):
        c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, a, b)
        a = a + w0
        b = b + w1
    c0, c1, c2, c3 = _philox_round(c0, c1, c2, c3, a, b)
    tl.store(out_ptr + offs * 4 + 0, c0.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 1, c1.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 2, c2.to(tl.int64), mask=mask)
    tl.store(out_ptr + offs * 4 + 3, c3.to(tl.int64), mask=mask)


@triton.jit
def _noise_kernel(out_ptr, word_ptr, N, BLOCK: tl.constexpr):  # BLOCK: one block holds every word
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    r = tl.load(word_ptr + offs, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, neg_log_exp_noise(r), mask=mask)


def philox4x32(counters: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of many (counter, key) pairs, for tests.

    Parameters
    ----------
    counters : (n, 4) int64 tensor of uint32 values
    keys : (n, 2) int64 tensor of uint32 values

    Returns
    -------
    (n, 4) int64 tensor of the output words (uint32 values).
    """
    n = counters.shape[0]
    out = torch.empty((n, 4), dtype=torch.int64, device=counters.device)
    _philox_block_kernel[(1,)](out, counters.contiguous(), keys.contiguous(), n,
                               BLOCK=triton.next_power_of_2(max(n, 2)))
    return out


def philox_words(words: torch.Tensor) -> torch.Tensor:
    """``-ln E`` (float32) of the exponential variate of each uint32 word (int64 tensor), for tests."""
    n = words.numel()
    out = torch.empty(n, dtype=torch.float32, device=words.device)
    _noise_kernel[(1,)](out, words.contiguous(), n, BLOCK=triton.next_power_of_2(max(n, 2)))
    return out
