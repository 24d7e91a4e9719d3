"""Exact value thresholds without sorting: a radix select over an order-preserving uint32 key of float32 values.

Every truncation rule of docs/semantics.md §3 E is a value threshold. For a row, a *select* finds the value ``v``
of the element at which a running total, accumulated in descending key order, first reaches a target: the ``k``-th
largest value (count target: top-k, min_keep, top-N, mirostat v1) or the value where the cumulative probability mass
first reaches ``p`` (mass target: top-p, typical-p). Elements tied at ``v`` share one key, so ties stay together.

The key of a float ``x`` (``-0`` folded into ``+0``) is its bit pattern with the sign bit flipped for ``x >= 0`` and
all bits flipped for ``x < 0``. Each level histograms ``DIGIT_BITS`` bits of the key (count and mass per bucket)
over the elements whose higher bits equal the prefix found so far, picks the boundary bucket and descends: after
``32 / DIGIT_BITS`` levels the prefix is the exact key of ``v``; a row stops early (its later passes read nothing)
as soon as every element of its boundary bucket has the same key (tracked per bucket as min / max key). A level is
a ``(B, NC)`` pass over the row (one program per chunk of ids) plus a one-program-per-row combine.

What is selected is chosen by ``KIND``:

- ``KIND_Z``: ``z`` over the finite ``z >= rowf[RF_DOM_LO]``; mass ``exp(z - max)``.
- ``KIND_NEG_S``: ``-s`` (typical-p; ascending ``s``) over the survivors ``z >= rowf[RF_ZLO]``; mass ``exp(z - max)``.
- ``KIND_LP``: the value whose order is the row's logprob order (raw logits, ``z``, or ``z`` on the kept set and
  ``-inf`` elsewhere for ``final``) over all ids ``< vocab_size``; count only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .penalties import NRF, NRI, RF_DOM_LO, RF_M, RF_ZLO, RI_LP_MODE, kept_mask, row_z, typical_s

KIND_Z, KIND_NEG_S, KIND_LP = 0, 1, 2

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_DOM_LO: tl.constexpr = tl.constexpr(RF_DOM_LO)
_RI_LP_MODE: tl.constexpr = tl.constexpr(RI_LP_MODE)


@triton.jit
def float_key(x):
    """Order-preserving int64 key in [0, 2^32) of float32 ``x`` (``-0`` and ``+0`` share a key)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 0x80000000, -1 - bits)


@triton.jit
def key_float(key):
    """Inverse of `float_key`."""
    bits = tl.where(key >= 0x80000000, key - 0x80000000, -1 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def select_value(row, offs, raw, z, V, rowf_ptr, rowi_ptr, KIND: tl.constexpr, HAS_TYP: tl.constexpr):
    """(value, in-domain mask, mass weight) of the block ``offs`` for a select of kind ``KIND``."""
    m = tl.load(rowf_ptr + row * _NRF + _RF_M)
    if KIND == 0:
        lo = tl.load(rowf_ptr + row * _NRF + _RF_DOM_LO)
        v = z
        dom = (z > float("-inf")) & (z >= lo)
        w = tl.exp(z - m)
    elif KIND == 1:
        zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
        dom = (z > float("-inf")) & (z >= zlo)
        v = -typical_s(row, z, rowf_ptr)
        w = tl.exp(z - m)
    else:
        mode = tl.load(rowi_ptr + row * _NRI + _RI_LP_MODE)
        keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, HAS_TYP)
        v = tl.where(mode == 0, raw, tl.where(mode == 1, z, tl.where(keep, z, float("-inf"))))
        dom = offs < V
        w = tl.zeros_like(z)
    return v, dom, w


@triton.jit
def _level_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                  rowf_ptr, prefix_ptr, active_ptr, hcnt_ptr, hmass_ptr, hkmin_ptr, hkmax_ptr,
                  stride_l, stride_b, stride_c, stride_p, stride_a,
                  V, VC, E, NC, SHIFT,
                  HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                  HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                  HAS_TYP: tl.constexpr,  # some row uses typical-p (kept test of KIND_LP)
                  KIND: tl.constexpr,  # what is selected (KIND_*)
                  WANT_MASS: tl.constexpr,  # mass target: also histogram the mass
                  DIGIT_BITS: tl.constexpr,  # key bits per level (buckets = 2**DIGIT_BITS)
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    NB: tl.constexpr = 1 << DIGIT_BITS
    base = chunk * CHUNK
    active = tl.load(active_ptr + row)
    n = tl.where(active != 0, tl.minimum(CHUNK, VC - base), 0)
    prefix = tl.load(prefix_ptr + row)
    hi = SHIFT + DIGIT_BITS
    want = prefix >> hi
    buckets = tl.arange(0, NB)
    cnt = tl.zeros((NB,), tl.int32)
    mass = tl.zeros((NB,), tl.float32)
    kmin = tl.full((NB,), 0x100000000, tl.int64)
    kmax = tl.full((NB,), -1, tl.int64)
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        v, dom, w = select_value(row, offs, raw, z, V, rowf_ptr, rowi_ptr, KIND, HAS_TYP)
        key = float_key(v)
        match = dom & ((key >> hi) == want)
        digit = ((key >> SHIFT) & (NB - 1)).to(tl.int32)
        hot = (digit[:, None] == buckets[None, :]) & match[:, None]
        cnt += tl.sum(hot.to(tl.int32), 0)
        if WANT_MASS:
            mass += tl.sum(tl.where(hot, w[:, None], 0.0), 0)
        kmin = tl.minimum(kmin, tl.min(tl.where(hot, key[:, None], 0x100000000), 0))
        kmax = tl.maximum(kmax, tl.max(tl.where(hot, key[:, None], -1), 0))
    o = (row * NC + chunk) * NB + buckets
    tl.store(hcnt_ptr + o, cnt)
    tl.store(hkmin_ptr + o, kmin)
    tl.store(hkmax_ptr + o, kmax)
    if WANT_MASS:
        tl.store(hmass_ptr + o, mass)


@triton.jit
def _combine_kernel(hcnt_ptr, hmass_ptr, hkmin_ptr, hkmax_ptr, prefix_ptr, above_c_ptr, selm_ptr, target_ptr,
                    active_ptr, tile_gt_ptr, tile_eq_ptr, out_ptr,
                    NC, SHIFT,
                    FIRST: tl.constexpr,  # first level: the mass target is scaled by the domain's total mass
                    LAST: tl.constexpr,  # last level: the prefix is the whole key
                    WANT_MASS: tl.constexpr,  # mass target (else count target)
                    GATHER: tl.constexpr,  # keep per-chunk counts of elements above / at the threshold
                    DIGIT_BITS: tl.constexpr,  # key bits per level
                    BT: tl.constexpr):  # power of two >= NC: all chunks in one block
    row = tl.program_id(0).to(tl.int64)
    NB: tl.constexpr = 1 << DIGIT_BITS
    active = tl.load(active_ptr + row)
    if active != 0:
        bk = tl.arange(0, NB)
        t = tl.arange(0, BT)
        tm = t < NC
        o = (row * NC + t[:, None]) * NB + bk[None, :]
        h = tl.load(hcnt_ptr + o, mask=tm[:, None], other=0)
        cnt = tl.sum(h, 0)
        ge = bk[None, :] >= bk[:, None]  # [b, b']: b' >= b
        cumc = tl.sum(tl.where(ge, cnt[None, :], 0), 1)
        above_c = tl.load(above_c_ptr + row)
        if WANT_MASS:
            hm = tl.load(hmass_ptr + o, mask=tm[:, None], other=0.0)
            mass = tl.sum(hm, 0)
            cumm = tl.sum(tl.where(ge, mass[None, :], 0.0), 1)
            above_m = tl.load(selm_ptr + row * 2 + 0)
            if FIRST:
                target = tl.load(target_ptr + row) * tl.sum(mass, 0)
                tl.store(selm_ptr + row * 2 + 1, target)
            else:
                target = tl.load(selm_ptr + row * 2 + 1)
            reach = (above_m + cumm) >= target
        else:
            target = tl.load(target_ptr + row)
            reach = (above_c + cumc).to(tl.float32) >= target
        hit = reach & (cnt > 0)
        best = tl.max(tl.where(hit, bk, -1), 0)
        lowest = tl.min(tl.where(cnt > 0, bk, NB - 1), 0)
        digit = tl.where(best >= 0, best, lowest)
        above = bk > digit
        tl.store(above_c_ptr + row, above_c + tl.sum(tl.where(above, cnt, 0), 0))
        if WANT_MASS:
            tl.store(selm_ptr + row * 2 + 0, above_m + tl.sum(tl.where(above, mass, 0.0), 0))
        prefix = tl.load(prefix_ptr + row) | (digit.to(tl.int64) << SHIFT)
        # resolved early when every element of the boundary bucket has the same key
        at = bk[None, :] == digit
        kmin = tl.min(tl.min(tl.where(at, tl.load(hkmin_ptr + o, mask=tm[:, None], other=0x100000000),
                                      0x100000000), 1), 0)
        kmax = tl.max(tl.max(tl.where(at, tl.load(hkmax_ptr + o, mask=tm[:, None], other=-1), -1), 1), 0)
        done = (kmin == kmax) | LAST
        prefix = tl.where(done & (kmax >= 0), kmax, prefix)
        tl.store(prefix_ptr + row, prefix)
        if GATHER:
            gt = tl.load(tile_gt_ptr + row * NC + t, mask=tm, other=0)
            tl.store(tile_gt_ptr + row * NC + t, gt + tl.sum(tl.where(above[None, :], h, 0), 1), mask=tm)
            dvec = (tl.zeros((BT,), tl.int32) + done.to(tl.int32)) != 0
            tl.store(tile_eq_ptr + row * NC + t, tl.sum(tl.where(at, h, 0), 1), mask=tm & dvec)
        if done:
            tl.store(out_ptr + row, key_float(prefix))
            tl.store(active_ptr + row, 0)


def radix_select(ctx, kind: int, target: torch.Tensor, active: torch.Tensor, *, mass: bool = False,
                 gather: bool = False):
    """Threshold value per row, (B,) float32 (garbage where ``active`` is 0).

    Parameters
    ----------
    ctx : backend context (pointers, sizes, flags of the batch)
    kind : KIND_Z, KIND_NEG_S or KIND_LP
    target : (B,) float32
        Count target ``k`` (the ``k``-th largest value) or, with ``mass=True``, the fraction ``p`` of the domain's
        mass that the kept values must reach.
    active : (B,) int32
        Rows to select for; other rows read nothing.
    gather : bool
        Also return per-chunk counts (B, NC) int32 of the elements strictly above and exactly at the threshold.

    Returns
    -------
    value, or (value, tile_gt, tile_eq) with ``gather``.
    """
    b, nt = ctx.B, ctx.NC
    d = ctx.DIGIT_BITS
    nb = 1 << d
    dev = ctx.device
    prefix = torch.zeros(b, dtype=torch.int64, device=dev)
    above_c = torch.zeros(b, dtype=torch.int32, device=dev)
    selm = torch.zeros((b, 2), dtype=torch.float32, device=dev)
    hcnt = torch.empty((b, nt, nb), dtype=torch.int32, device=dev)
    hmass = torch.empty((b, nt, nb), dtype=torch.float32, device=dev) if mass else hcnt
    hkmin = torch.empty((b, nt, nb), dtype=torch.int64, device=dev)
    hkmax = torch.empty((b, nt, nb), dtype=torch.int64, device=dev)
    tile_gt = torch.zeros((b, nt), dtype=torch.int32, device=dev) if gather else above_c
    tile_eq = torch.zeros((b, nt), dtype=torch.int32, device=dev) if gather else above_c
    out = torch.zeros(b, dtype=torch.float32, device=dev)
    target = target.to(torch.float32).contiguous()
    active = active.to(torch.int32).clone()  # rows resolved early are switched off in this copy
    levels = 32 // d
    for lvl in range(levels):
        shift = 32 - d * (lvl + 1)
        _level_kernel[(b, nt)](*ctx.zargs(), ctx.rowf, prefix, active, hcnt, hmass, hkmin, hkmax, *ctx.zstrides(),
                               *ctx.zsizes(), shift, **ctx.zflags(), HAS_TYP=ctx.has_typ, KIND=kind, WANT_MASS=mass,
                               DIGIT_BITS=d, BLOCK=ctx.block_for(nb), CHUNK=ctx.CHUNK)
        _combine_kernel[(b,)](hcnt, hmass, hkmin, hkmax, prefix, above_c, selm, target, active, tile_gt, tile_eq, out,
                              nt, shift,
                              FIRST=lvl == 0, LAST=lvl == levels - 1, WANT_MASS=mass, GATHER=gather, DIGIT_BITS=d,
                              BT=ctx.BT)
    if gather:
        return out, tile_gt, tile_eq
    return out
