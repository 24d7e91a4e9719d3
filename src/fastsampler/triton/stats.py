"""Row statistics: one pass over the row for max / log-normaliser / argmax / validity, and per-tile weights.

Kernels run over a grid ``(B, NC)`` with one program per chunk of ``CHUNK`` ids (a power-of-two part of the 4096-id
tile of the draw: 1024 on CUDA whatever the batch size; ``NC = ceil(V / CHUNK)``); per-chunk partial results are
combined by a one-program-per-row kernel in a fixed order, so a row's result never depends on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .penalties import (
    NRF,
    NRI,
    RF_DOM_LO,
    RF_HC,
    RF_LS,
    RF_LS_KEPT,
    RF_LS_RAW,
    RF_M,
    RF_M_KEPT,
    RF_M_RAW,
    RF_MS,
    RF_STHR,
    RF_ZLO,
    RI_ARGMAX,
    RI_GID,
    RI_NFIN,
    RI_VALID,
    kept_mask,
    row_z,
)

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_LS: tl.constexpr = tl.constexpr(RF_LS)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_STHR: tl.constexpr = tl.constexpr(RF_STHR)
_RF_MS: tl.constexpr = tl.constexpr(RF_MS)
_RF_HC: tl.constexpr = tl.constexpr(RF_HC)
_RF_M_RAW: tl.constexpr = tl.constexpr(RF_M_RAW)
_RF_LS_RAW: tl.constexpr = tl.constexpr(RF_LS_RAW)
_RF_M_KEPT: tl.constexpr = tl.constexpr(RF_M_KEPT)
_RF_LS_KEPT: tl.constexpr = tl.constexpr(RF_LS_KEPT)
_RF_DOM_LO: tl.constexpr = tl.constexpr(RF_DOM_LO)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_ARGMAX: tl.constexpr = tl.constexpr(RI_ARGMAX)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_NFIN: tl.constexpr = tl.constexpr(RI_NFIN)
_TF: tl.constexpr = tl.constexpr(4)  # float slots per chunk in the stats pass
_TI: tl.constexpr = tl.constexpr(3)  # int slots per chunk in the stats pass
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _online_lse(m, s, x):
    """Fold the block ``x`` into the running (max, sum of exp(x - max)); -inf safe."""
    bm = tl.max(x, 0)
    nm = tl.maximum(m, bm)
    safe = tl.where(nm == float("-inf"), 0.0, nm)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
    return nm, s


@triton.jit
def _stats_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                  tile_f_ptr, tile_i_ptr,
                  stride_l, stride_b, stride_c, stride_p, stride_a,
                  V, VC, E, NC,
                  HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                  HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                  NEED_RAW: tl.constexpr,  # some row wants raw logprobs: also reduce the raw logits
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    n = tl.minimum(CHUNK, VC - base)
    m = float("-inf")
    s = 0.0
    rm = float("-inf")
    rs = 0.0
    amax = _BIG
    nfin = 0
    bad = 0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        zf = tl.where(b, float("-inf"), z)
        bm = tl.max(zf, 0)
        bidx = tl.min(tl.where((zf == bm) & (zf > float("-inf")), offs, _BIG), 0)
        amax = tl.where(bm > m, bidx, amax)
        m, s = _online_lse(m, s, zf)
        nfin += tl.sum((zf > float("-inf")).to(tl.int32), 0)
        bad += tl.sum(b.to(tl.int32), 0)
        if NEED_RAW:
            rm, rs = _online_lse(rm, rs, tl.where(b, float("-inf"), raw))
    o = (row * NC + chunk) * _TF
    tl.store(tile_f_ptr + o + 0, m)
    tl.store(tile_f_ptr + o + 1, s)
    tl.store(tile_f_ptr + o + 2, rm)
    tl.store(tile_f_ptr + o + 3, rs)
    oi = (row * NC + chunk) * _TI
    tl.store(tile_i_ptr + oi + 0, amax)
    tl.store(tile_i_ptr + oi + 1, nfin)
    tl.store(tile_i_ptr + oi + 2, bad)


@triton.jit
def _combine_lse(mt, st):
    """Combine per-tile (max, sum) blocks (masked tiles hold -inf / 0) into (max ``m``, ``ln s``) with ``s`` the sum
    of ``exp(x - m)``; the caller forms ``(x - m) - ln s``, never ``x - (m + ln s)`` (docs/semantics.md §6)."""
    m = tl.max(mt, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - safe)), 0)
    return m, tl.log(s)


@triton.jit
def _stats_combine_kernel(tile_f_ptr, tile_i_ptr, fparams_ptr, rowf_ptr, rowi_ptr,
                          NC,
                          NF: tl.constexpr, F_TEMPERATURE: tl.constexpr,  # fparams layout
                          BT: tl.constexpr):  # power of two >= NC: all chunks in one block
    row = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BT)
    tm = t < NC
    o = (row * NC + t)
    mt = tl.load(tile_f_ptr + o * _TF + 0, mask=tm, other=float("-inf"))
    st = tl.load(tile_f_ptr + o * _TF + 1, mask=tm, other=0.0)
    rmt = tl.load(tile_f_ptr + o * _TF + 2, mask=tm, other=float("-inf"))
    rst = tl.load(tile_f_ptr + o * _TF + 3, mask=tm, other=0.0)
    at = tl.load(tile_i_ptr + o * _TI + 0, mask=tm, other=_BIG)
    nf = tl.sum(tl.load(tile_i_ptr + o * _TI + 1, mask=tm, other=0), 0)
    bad = tl.sum(tl.load(tile_i_ptr + o * _TI + 2, mask=tm, other=0), 0)
    m, ls = _combine_lse(mt, st)
    m_raw, ls_raw = _combine_lse(rmt, rst)
    amax = tl.min(tl.where(mt == m, at, _BIG), 0)
    valid = (bad == 0) & (nf > 0)
    temp = tl.load(fparams_ptr + row * NF + F_TEMPERATURE)
    rf = rowf_ptr + row * _NRF
    tl.store(rf + _RF_M, m)
    tl.store(rf + _RF_LS, ls)
    tl.store(rf + _RF_M_RAW, m_raw)
    tl.store(rf + _RF_LS_RAW, ls_raw)
    tl.store(rf + _RF_M_KEPT, m)
    tl.store(rf + _RF_LS_KEPT, ls)
    tl.store(rf + _RF_ZLO, float("-inf"))
    tl.store(rf + _RF_DOM_LO, float("-inf"))
    tl.store(rf + _RF_STHR, float("inf"))
    tl.store(rf + _RF_MS, 0.0)
    tl.store(rf + _RF_HC, 0.0)
    ri = rowi_ptr + row * _NRI
    tl.store(ri + _RI_VALID, valid.to(tl.int32))
    tl.store(ri + _RI_ARGMAX, tl.where(valid, amax, -1))
    tl.store(ri + _RI_GID, tl.where(valid & (temp == 0.0), amax, -1))
    tl.store(ri + _RI_NFIN, nf)


@triton.jit
def _kept_stats_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                       rowf_ptr, active_ptr, tile_w_ptr,
                       stride_l, stride_b, stride_c, stride_p, stride_a,
                       V, VC, E, NC,
                       HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                       HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                       HAS_TYP: tl.constexpr,  # some row uses typical-p: the kept test includes s <= s_thr
                       SURVIVORS: tl.constexpr,  # True: survivors z >= zlo with the entropy sum (typical-p)
                       BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    active = tl.load(active_ptr + row)
    n = tl.where(active != 0, tl.minimum(CHUNK, VC - base), 0)
    zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        if SURVIVORS:  # noqa: SIM108 - constexpr branch
            keep = (z > float("-inf")) & (z >= zlo)
        else:
            keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, HAS_TYP)
        zk = tl.where(keep, z, float("-inf"))
        bm = tl.max(zk, 0)
        nm = tl.maximum(m, bm)
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        sc = tl.exp(m - safe)
        e = tl.exp(zk - safe)
        if SURVIVORS:
            # sum of e * (z - nm), rescaled: sum_old e'(z - m) -> sc * (sum_old + (m - nm) * s_old). A term with
            # e == 0 is 0 (q = 0: 0 · ln 0 = 0, docs/semantics.md §3 E item 4), also where z - nm (or m - nm)
            # overflows to -inf in float32, which would make 0 * -inf = NaN.
            w = tl.where(sc > 0.0, sc * (w + tl.where(m == float("-inf"), 0.0, m - safe) * s), 0.0) + tl.sum(
                tl.where(keep & (e > 0.0), e * (zk - safe), 0.0), 0)
        s = s * sc + tl.sum(e, 0)
        m = nm
    o = (row * NC + chunk) * 3
    if active != 0:  # inactive rows keep what tile_w holds
        tl.store(tile_w_ptr + o + 0, m)
        tl.store(tile_w_ptr + o + 1, s)
        tl.store(tile_w_ptr + o + 2, w)


@triton.jit
def _typical_combine_kernel(tile_w_ptr, rowf_ptr, active_ptr,
                            NC,
                            BT: tl.constexpr):  # power of two >= NC: all chunks in one block
    row = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, BT)
    tm = t < NC
    o = (row * NC + t) * 3
    mt = tl.load(tile_w_ptr + o + 0, mask=tm, other=float("-inf"))
    st = tl.load(tile_w_ptr + o + 1, mask=tm, other=0.0)
    wt = tl.load(tile_w_ptr + o + 2, mask=tm, other=0.0)
    m = tl.max(mt, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    sc = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - safe))
    d = tl.where(mt == float("-inf"), 0.0, mt - safe)
    s = tl.sum(st * sc, 0)
    # sum_i e^{z_i - m} (z_i - m) over all tiles; a chunk whose weight underflows to 0 adds 0 (its d may be -inf
    # when mt - m overflows: 0 · ln 0 = 0, docs/semantics.md §3 E item 4)
    w = tl.sum(tl.where(sc > 0.0, sc * (wt + d * st), 0.0), 0)
    # H = -sum q ln q = ln s + sum q (m - z); typical_s needs only m and hc = sum q (m - z) = -w / s
    hc = -w / s
    if tl.load(active_ptr + row) != 0:  # other rows keep (0, 0): s stays finite, their s_thr is +inf
        tl.store(rowf_ptr + row * _NRF + _RF_MS, safe)
        tl.store(rowf_ptr + row * _NRF + _RF_HC, hc)


def stats_pass(ctx) -> None:
    """Stage statistics of every row into ``ctx.rowf`` / ``ctx.rowi`` and the per-chunk (max, sum) of ``z``.

    Fills ``ctx.tile_w`` (B, NC, 3) with the per-chunk (max z, sum exp(z - max), 0) of all finite ``z``: the draw's
    tile weights (chunks are combined per tile) when the batch has no truncation.
    """
    b, nt = ctx.B, ctx.NC
    tile_f = ctx.empty((b, nt, 4), "f")
    tile_i = ctx.empty((b, nt, 3), "i")
    _stats_kernel[(b, nt)](*ctx.zargs(), tile_f, tile_i, *ctx.zstrides(), *ctx.zsizes(), **ctx.zflags(),
                           NEED_RAW=ctx.need_raw, BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK)
    _stats_combine_kernel[(b,)](tile_f, tile_i, ctx.fparams, ctx.rowf, ctx.rowi, nt, NF=ctx.NF,
                                F_TEMPERATURE=ctx.F_TEMPERATURE, BT=ctx.BT)
    ctx.tile_w = ctx.empty((b, nt, 3), "f")
    ctx.tile_w[:, :, 0:2] = tile_f[:, :, 0:2]


def kept_weights_pass(ctx, active) -> None:
    """Per-chunk (max z, sum exp(z - max)) over the kept set into ``ctx.tile_w`` (B, NC, 3), for the ``active``
    rows (B,) int32 (rows with a truncation); other rows keep the all-finite weights of the stats pass."""
    b, nc = ctx.B, ctx.NC
    _kept_stats_kernel[(b, nc)](*ctx.zargs(), ctx.rowf, active, ctx.tile_w, *ctx.zstrides(), *ctx.zsizes(),
                                **ctx.zflags(), HAS_TYP=ctx.has_typ, SURVIVORS=False, BLOCK=ctx.BLOCK,
                                CHUNK=ctx.CHUNK)


def typical_entropy_pass(ctx, active) -> None:
    """Max and mean distance to it (what the typical-p distance needs, `penalties.typical_s`) of the survivors
    ``z >= zlo`` of the ``active`` rows (B,) int32 into ``rowf[:, RF_MS / RF_HC]``."""
    b, nc = ctx.B, ctx.NC
    tw = torch.zeros((b, nc, 3), dtype=torch.float32, device=ctx.device)
    _kept_stats_kernel[(b, nc)](*ctx.zargs(), ctx.rowf, active, tw, *ctx.zstrides(), *ctx.zsizes(), **ctx.zflags(),
                                HAS_TYP=False, SURVIVORS=True, BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK)
    _typical_combine_kernel[(b,)](tw, ctx.rowf, active, nc, BT=ctx.BT)
