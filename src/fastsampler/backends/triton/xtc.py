"""XTC, Exclude Top Choices (docs/semantics.md §3 E item 6): the last truncation rule, an upper bound ``zhi`` on the
kept set (``RF_ZHI``; `penalties.kept_mask` tests ``z <= zhi`` under its ``KEPT`` bit 2).

A row whose coin fires (``u = (w0 + 0.5) 2^-32 < p`` in float64, ``w0`` word 0 of Philox at counter
``(0, step, seq, 3)``, §7 stream 3) and whose kept set ``S`` (after typical-p) is known takes
``A = {t in S : z >= max_S + ln sum_S e^(z - max_S) + ln theta}``; when ``|A| >= 2``, ``a = min_A z`` and
``#{S : z <= a} >= min_keep``, the kept set loses every ``z > a`` (``zhi = a``); otherwise ``zhi = +inf``.

- Without the candidate engine: `_xtc_kernel` (one program per row, after `stats._kept_kernel`, whose chunk weights
  give ``S``'s log-normaliser): one pass over the row for ``A`` (`xtc_cut`) and, when it cuts, one for the new kept
  tile weights (`kept_tile_weights`), which replace the chunk partials `draw._finish_kernel` draws from. A row whose
  coin does not fire reads nothing.
- In the candidate engine: `candidates._trunc_kernel` applies the same rule on the sorted candidate buffer (which
  holds ``S``), or, on its exact fallback, with `xtc_cut` and `kept_tile_weights`.

Launched only when some row may use XTC (``BatchFlags.any_xtc``): one kernel on the select path, none on the
candidate path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import F_TEMPERATURE, F_XTC_P, F_XTC_T, I_MIN_KEEP, NF, NI
from .penalties import (
    NRF,
    NRI,
    P_M,
    P_S,
    PF,
    RF_HC,
    RF_MS,
    RF_STHR,
    RF_ZHI,
    RF_ZLO,
    RI_VALID,
    block_z,
    online_lse,
    row_scalars,
    slot_row,
    typical_s,
)
from .philox import philox_word, seed_key

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_ZHI: tl.constexpr = tl.constexpr(RF_ZHI)
_RF_STHR: tl.constexpr = tl.constexpr(RF_STHR)
_RF_MS: tl.constexpr = tl.constexpr(RF_MS)
_RF_HC: tl.constexpr = tl.constexpr(RF_HC)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_PF: tl.constexpr = tl.constexpr(PF)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def xtc_coin(seeds_ptr, steps_ptr, seqs_ptr, srow, p):
    """Whether the row's XTC coin fires: ``(w0 + 0.5) 2^-32 < p`` in float64 (``p`` the float32 F_XTC_P)."""
    k0, k1 = seed_key(tl.load(seeds_ptr + srow))
    step = (tl.load(steps_ptr + srow) & 0xFFFFFFFF).to(tl.uint32)
    seq = (tl.load(seqs_ptr + srow) & 0xFFFFFFFF).to(tl.uint32)
    j = tl.arange(0, 2).to(tl.uint32)
    w = philox_word(j * 0, step, seq, 3, k0, k1)  # word 0 of counter (0, step, seq, 3), in both lanes
    u = (tl.max(w, 0).to(tl.int64).to(tl.float64) + 0.5) * 2.3283064365386963e-10
    return u < p.to(tl.float64)


@triton.jit
def xtc_cut(row, srow, act, m_s, ls_s, zlo, theta, mk,
            logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
            dry_ids_ptr, dry_vals_ptr, rowf_ptr,
            stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
            t, rep, freq, pres, ban, blo, bhi,
            HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_ALLOWED: tl.constexpr,
            HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr, BIAS_TABLE: tl.constexpr,
            HAS_DRY: tl.constexpr, TYP: tl.constexpr, BLOCK: tl.constexpr):
    """XTC's ``zhi`` of row ``row`` from one pass over it (``+inf`` where ``act`` is false, which reads nothing, or
    where XTC removes nothing). ``S``: the finite ``z >= zlo`` (and typical-p's ``s <= s_thr`` with ``TYP``), with
    log-normaliser ``(m_s, ls_s)``; ``theta`` the threshold, ``mk`` min_keep."""
    za = m_s + ls_s + tl.log(tl.where(theta > 0.0, theta, 1.0))
    za = tl.where(theta > 0.0, za, float("-inf"))  # theta = 0: every kept token is a top choice
    sthr = float("inf")
    ms = 0.0
    hc = 0.0
    if TYP:
        sthr = tl.load(rowf_ptr + row * _NRF + _RF_STHR)
        ms = tl.load(rowf_ptr + row * _NRF + _RF_MS)
        hc = tl.load(rowf_ptr + row * _NRF + _RF_HC)
    n_s = tl.sum(tl.zeros((2,), tl.int32), 0)  # |S|
    n_a = n_s  # |A|
    amin = float("inf")  # min z over A, and how many of A are at it
    n_at = n_s
    n = tl.where(act, VC, 0)
    ep = blo
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, start + BLOCK, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr,
                               tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l,
                               stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        keep = (z > float("-inf")) & (z >= zlo)
        if TYP:
            keep = keep & (typical_s(z, ms, hc) <= sthr)
        ina = keep & (z >= za)
        n_s += tl.sum(keep.to(tl.int32), 0)
        n_a += tl.sum(ina.to(tl.int32), 0)
        bmin = tl.min(tl.where(ina, z, float("inf")), 0)
        bat = tl.sum((ina & (z == bmin)).to(tl.int32), 0)
        n_at = tl.where(bmin < amin, bat, tl.where(bmin == amin, n_at + bat, n_at))
        amin = tl.minimum(amin, bmin)
    # {S : z <= a} = S minus the part of A above a
    cut = act & (n_a >= 2) & ((n_s - (n_a - n_at)) >= mk)
    return tl.where(cut, amin, float("inf"))


@triton.jit
def kept_tile_weights(row, srow, zlo, zhi,
                      logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                      dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                      stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, NT,
                      t, rep, freq, pres, ban, blo, bhi,
                      HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                      HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr,
                      BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr, TYP: tl.constexpr, TILE: tl.constexpr,
                      BT_TILES: tl.constexpr, BLOCK: tl.constexpr, rho, DYN: tl.constexpr):
    """Per-tile ``(max, sum exp(z - max))`` of the kept set ``zlo <= z <= zhi`` (and typical-p's test with ``TYP``),
    one pass over the row, as ``(BT_TILES,)`` blocks (``(-inf, 0)`` for tiles with nothing kept); with ``DYN`` of the
    kept values ``z' = z rho`` (dynamic temperature, `dyntemp`)."""
    tt = tl.arange(0, BT_TILES)
    sthr = float("inf")
    ms = 0.0
    hc = 0.0
    if TYP:
        sthr = tl.load(rowf_ptr + row * _NRF + _RF_STHR)
        ms = tl.load(rowf_ptr + row * _NRF + _RF_MS)
        hc = tl.load(rowf_ptr + row * _NRF + _RF_HC)
    ep = blo
    mt = tl.full((BT_TILES,), float("-inf"), tl.float32)
    st = tl.zeros((BT_TILES,), tl.float32)
    for tile in range(0, NT):
        tbase = tile * TILE
        tm = float("-inf")
        ts = 0.0
        for start in range(0, tl.minimum(TILE, VC - tbase), BLOCK):
            offs = tbase + start + tl.arange(0, BLOCK)
            raw, z, b, ep = block_z(row, srow, offs, ep, tbase + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                                   allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr,
                                   dry_vals_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt,
                                   stride_d, V, VC, E, t, rep, freq, pres, ban, bhi,
                                   HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                   BIAS_TABLE, HAS_DRY)
            keep = (z > float("-inf")) & (z >= zlo) & (z <= zhi)  # ids >= V have z = -inf
            if TYP:
                keep = keep & (typical_s(z, ms, hc) <= sthr)
            if DYN:
                z = z * rho
            tm, ts = online_lse(tm, ts, tl.where(keep, z, float("-inf")))
        mt = tl.where(tt == tile, tm, mt)
        st = tl.where(tt == tile, ts, st)
    return mt, st


@triton.jit
def store_tile_weights(part_f_ptr, row, NC, t, mt, st, SPLIT: tl.constexpr, S2: tl.constexpr):
    """Kept weights of the tiles ``t`` (a block) as chunk partials: ``(mt, st)`` in the first chunk of each tile,
    ``(-inf, 0)`` in its other chunks (`draw._finish_kernel` combines the chunks of a tile)."""
    i = tl.arange(0, S2)
    c = t[:, None] * SPLIT + i[None, :]
    ok = (i[None, :] < SPLIT) & (c < NC)
    first = i[None, :] == 0
    o = part_f_ptr + (row * NC + c) * _PF
    tl.store(o + _P_M, tl.where(first, mt[:, None], float("-inf")), mask=ok)
    tl.store(o + _P_S, tl.where(first, st[:, None], 0.0), mask=ok)


@triton.jit
def _xtc_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                seeds_ptr, seqs_ptr, rowf_ptr, rowi_ptr, part_f_ptr,
                stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                V, VC, E, NC, NT,
                HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                TYP: tl.constexpr,  # some row uses typical-p: the kept set includes s <= s_thr
                TILE: tl.constexpr,  # ids per tile of the draw (docs/semantics.md §3 F)
                SPLIT: tl.constexpr,  # chunks per tile (TILE / CHUNK)
                S2: tl.constexpr,  # power of two >= SPLIT, >= 2
                BT: tl.constexpr,  # power of two >= NC: every chunk in one block
                BT_TILES: tl.constexpr,  # power of two >= NT: every tile in one block
                BLOCK: tl.constexpr):  # ids per loop step of the passes over the row
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    p = tl.load(fparams_ptr + srow * NF + F_XTC_P)
    samp = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0)
    act = samp & (p > 0.0) & xtc_coin(seeds_ptr, steps_ptr, seqs_ptr, srow, p)
    zhi = float("inf")
    if act:
        # S's log-normaliser from the kept chunk weights of stats._kept_kernel, in a fixed order
        c = tl.arange(0, BT)
        o = part_f_ptr + (row * NC + c) * _PF
        mc = tl.load(o + _P_M, mask=c < NC, other=float("-inf"))
        sc = tl.load(o + _P_S, mask=c < NC, other=0.0)
        m_s = tl.max(mc, 0)
        safe = tl.where(m_s == float("-inf"), 0.0, m_s)
        ls_s = tl.log(tl.sum(tl.where(mc == float("-inf"), 0.0, sc * tl.exp(mc - safe)), 0))
        t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr,
                                                        bias_indptr_ptr, stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
        zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
        theta = tl.load(fparams_ptr + srow * NF + F_XTC_T)
        mk = tl.load(iparams_ptr + srow * NI + I_MIN_KEEP)
        zhi = xtc_cut(row, srow, act, m_s, ls_s, zlo, theta, mk,
                      logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                      dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                      stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                      t, rep, freq, pres, ban, blo, bhi,
                      HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                      TYP, BLOCK)
        if zhi < float("inf"):
            # the new kept set's tile weights replace the chunk partials the draw reads
            mt, st = kept_tile_weights(row, srow, zlo, zhi,
                                       logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                       bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                                       stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                                       E, NT, t, rep, freq, pres, ban, blo, bhi,
                                       HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                       BIAS_TABLE, HAS_DRY, TYP, TILE, BT_TILES, BLOCK, 1.0, False)
            store_tile_weights(part_f_ptr, row, NC, tl.arange(0, BT_TILES), mt, st, SPLIT, S2)
    tl.store(rowf_ptr + row * _NRF + _RF_ZHI, zhi)


def xtc_pass(ctx) -> None:
    """XTC's ``zhi`` of every row (``+inf`` where it removes nothing) and, where it cuts, the new kept tile weights
    (`_xtc_kernel`, one program per row, after `stats.kept_pass`)."""
    split = ctx.TILE // ctx.CHUNK
    _xtc_kernel[(ctx.B,)](*ctx.zargs(), ctx.seeds, ctx.seqs, ctx.rowf, ctx.rowi, ctx.part_f, *ctx.zstrides(),
                          *ctx.zsizes(), ctx.NT, **ctx.zflags(), TYP=ctx.flags.any_typical, TILE=ctx.TILE,
                          SPLIT=split, S2=max(2, split), BT=ctx.BT, BT_TILES=ctx.BT_TILES, BLOCK=ctx.SBLOCK)
