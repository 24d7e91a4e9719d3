"""Row passes over ``(B, NC)`` grids (one program per chunk of ``CHUNK`` ids, a power-of-two part of the 4096-id tile
of the draw: 1024 on CUDA whatever the batch size) and the per-row combine of their partial results.

- `_stats_kernel` reads the row once: max / log-normaliser of ``z`` (and of the raw logits for raw logprobs), the
  argmax (when some row is greedy), finite count, invalid inputs; with top-n-sigma on some row also the mean and M2
  of its finite ``z`` (``part_x``), and in a batch without truncation with dynamic temperature the kept set's
  entropy partials (`dyntemp.dyn_fold`, ``part_d``: the kept set is every finite ``z``). Its per-chunk weights
  are also the tile weights of the draw for a batch without truncation, so such a batch needs no other pass over
  the whole row: the token race runs in `draw._finish_kernel` over the one tile the tile race picks
  (docs/semantics.md §3 F). In a batch of the candidate engine (`candidates`) it also stores the maximum ``z`` of
  every group of ``GROUP`` ids (and of the raw logits, for raw logprobs);
- `_combine_kernel` (one program per row) turns the chunk partials into the row statistics (with `nsigma_combine`
  the standard deviation ``sigma`` of ``z``, merged in a fixed order in float64) and the thresholds that need no
  select (the min-p stage without min_keep: min-p, epsilon, top-n-sigma; Mirostat v2, §3 E), and the candidate
  bound of each candidate row;
- `_entropy_kernel`: max / sum / entropy sum of the typical-p survivors, or (``ETA``) of eta's survivors -- the kept
  set after typical-p -- and their count (`select._eta_kernel`);
- `_kept_kernel`: per-chunk weights of the kept set (the tile weights of the draw after truncation), and with
  ``DYN`` its dynamic-temperature partials (`dyntemp`).

Per-chunk partials live in ``part_f`` (B, NC, PF) float32 and ``part_i`` (B, NC, PI) int32 (slots ``P*`` of
`penalties`)
and are combined in a fixed order by one program per row, so a row's result never depends on the batch. The row
passes compute no random numbers: per-id noise is needed only in the winning tile.

On CUDA the row passes run one warp per program (``ROW_WARPS``): each thread then holds 32 of the chunk's 1024 ids,
so the block reductions (max, sum, counts) are mostly in-thread adds and shuffles, with no shared memory or barrier,
and a program's fixed work (row scalars, partial stores) is spread over 32 ids per thread instead of 8.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .candidates import kth_largest
from .columns import F_ETA, F_TEMPERATURE, F_TYPICAL_P, I_MIN_KEEP, I_MIRO_MODE, I_TOP_K, NF, NI
from .dyntemp import dyn_fold, store_dyn_partials
from .penalties import (
    NRF,
    NRI,
    P_AMAX,
    P_BAD,
    P_M,
    P_N,
    P_NFIN,
    P_RM,
    P_RS,
    P_S,
    P_W,
    P_XM2,
    P_XMEAN,
    PF,
    PI,
    PX,
    RF_BOUND,
    RF_DOM_LO,
    RF_HC,
    RF_LS,
    RF_LS_KEPT,
    RF_LS_RAW,
    RF_M,
    RF_M_KEPT,
    RF_M_RAW,
    RF_MK,
    RF_MS,
    RF_SIGMA,
    RF_STHR,
    RF_ZLO,
    RI_CCOUNT,
    RI_GID,
    RI_NFIN,
    RI_VALID,
    bias_lower_bound,
    block_z,
    kept_mask,
    minp_threshold,
    online_lse,
    row_scalars,
    slot_row,
)

LN2 = 0.6931471805599453

_RF_BOUND: tl.constexpr = tl.constexpr(RF_BOUND)
_RI_CCOUNT: tl.constexpr = tl.constexpr(RI_CCOUNT)
_PF: tl.constexpr = tl.constexpr(PF)
_PI: tl.constexpr = tl.constexpr(PI)
_PX: tl.constexpr = tl.constexpr(PX)
_P_N: tl.constexpr = tl.constexpr(P_N)
_P_XMEAN: tl.constexpr = tl.constexpr(P_XMEAN)
_P_XM2: tl.constexpr = tl.constexpr(P_XM2)
_RF_SIGMA: tl.constexpr = tl.constexpr(RF_SIGMA)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_P_RM: tl.constexpr = tl.constexpr(P_RM)
_P_RS: tl.constexpr = tl.constexpr(P_RS)
_P_W: tl.constexpr = tl.constexpr(P_W)
_P_AMAX: tl.constexpr = tl.constexpr(P_AMAX)
_P_NFIN: tl.constexpr = tl.constexpr(P_NFIN)
_P_BAD: tl.constexpr = tl.constexpr(P_BAD)
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
_RF_MK: tl.constexpr = tl.constexpr(RF_MK)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_NFIN: tl.constexpr = tl.constexpr(RI_NFIN)
_LN2: tl.constexpr = tl.constexpr(LN2)
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _stats_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                  bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                  part_f_ptr, part_i_ptr, part_x_ptr, part_d_ptr, gmax_ptr,
                  stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                  V, VC, E, NC, NG,
                  HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                  HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                  SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                  HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                  BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                  HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                  HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                  NEED_RAW: tl.constexpr,  # some row wants raw logprobs: also reduce the raw logits
                  ARGMAX: tl.constexpr,  # some row is greedy: also find the argmax
                  LSE: tl.constexpr,  # the log-normaliser is needed (not for an all-greedy batch without logprobs)
                  GROUP: tl.constexpr,  # > 0: also store the max z of every GROUP ids (candidates.py), (B, NG)
                  RAW_GROUP: tl.constexpr,  # with GROUP: also the raw logits' group maxima, (B, NG) after z's
                  NSIGMA: tl.constexpr,  # some row uses top-n-sigma: the finite z's mean and M2 into part_x
                  DYN: tl.constexpr,  # no truncation and dynamic temperature: the kept set's partials into part_d
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    n = tl.minimum(CHUNK, VC - base)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
    m = float("-inf")
    s = 0.0
    rm = float("-inf")
    rs = 0.0
    amax = _BIG
    xn = 0.0  # NSIGMA: the finite z's count / mean / sum of squared deviations
    xmean = 0.0
    xm2 = 0.0
    dm = float("-inf")  # DYN: dyntemp.dyn_fold over every finite z at the row's temperature
    ds = 0.0
    dw = 0.0
    dn = 0
    nfb = 0  # finite count + (invalid count << 16): one reduction for both (a chunk has at most 4096 ids)
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, base + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                               allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                               stride_l, stride_c,
                               stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        zf = tl.where(b, float("-inf"), z)
        bm = tl.max(zf, 0)
        if ARGMAX:
            # a chunk whose ids are all -inf reports its first id: it is never the argmax of a valid row
            bidx = tl.min(tl.where(zf == bm, offs, _BIG), 0)
            amax = tl.where(bm > m, bidx, amax)
        if DYN:
            dm, ds, dw, dn = dyn_fold(dm, ds, dw, dn, zf, t)
        if NSIGMA:
            # Chan's merge of the block's (count, mean, M2) of the finite z into the chunk's
            fin = zf > float("-inf")
            bn = tl.sum(fin.to(tl.float32), 0)
            bmean = tl.sum(tl.where(fin, zf, 0.0), 0) / tl.maximum(bn, 1.0)
            bm2 = tl.sum(tl.where(fin, (zf - bmean) * (zf - bmean), 0.0), 0)
            tot = xn + bn
            delta = bmean - xmean
            frac = bn / tl.maximum(tot, 1.0)
            xmean = xmean + delta * frac
            xm2 = xm2 + bm2 + delta * delta * xn * frac
            xn = tot
        if LSE:
            m, s = online_lse(m, s, zf)
        else:
            m = tl.maximum(m, bm)
        nfb += tl.sum((zf > float("-inf")).to(tl.int32) + (b.to(tl.int32) << 16), 0)
        if GROUP > 0:  # group maxima: the candidate bound of candidates.py (-inf for a group with no finite z)
            gm = tl.max(tl.reshape(zf, (BLOCK // GROUP, GROUP)), 1)
            gi = (base + start) // GROUP + tl.arange(0, BLOCK // GROUP)
            tl.store(gmax_ptr + row * NG + gi, gm, mask=gi < NG)
            if RAW_GROUP:  # raw logprobs' top-N and rank (logprobs.py)
                rg = tl.max(tl.reshape(tl.where(b, float("-inf"), raw), (BLOCK // GROUP, GROUP)), 1)
                tl.store(gmax_ptr + (tl.num_programs(0) + row) * NG + gi, rg, mask=gi < NG)
        if NEED_RAW:
            rm, rs = online_lse(rm, rs, tl.where(b, float("-inf"), raw))
    o = part_f_ptr + (row * NC + chunk) * _PF
    tl.store(o + _P_M, m)
    tl.store(o + _P_S, s)
    tl.store(o + _P_RM, rm)
    tl.store(o + _P_RS, rs)
    if DYN:
        store_dyn_partials(part_d_ptr, row, chunk, NC, dm, ds, dw, dn)
    if NSIGMA:
        ox = part_x_ptr + (row * NC + chunk) * _PX
        tl.store(ox + _P_XMEAN, xmean)
        tl.store(ox + _P_XM2, xm2)
    oi = part_i_ptr + (row * NC + chunk) * _PI
    tl.store(oi + _P_AMAX, amax)
    tl.store(oi + _P_NFIN, nfb & 0xFFFF)
    tl.store(oi + _P_BAD, nfb >> 16)


@triton.jit
def combine_lse(mt, st):
    """Combine per-chunk (max, sum) blocks (empty chunks hold -inf / 0) into (max ``m``, ``ln s``) with ``s`` the
    sum of ``exp(x - m)``; the caller forms ``(x - m) - ln s``, never ``x - (m + ln s)`` (docs/semantics.md §6)."""
    m = tl.max(mt, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - safe)), 0)
    return m, tl.log(s)


@triton.jit
def stats_combine(row, srow, part_f_ptr, part_i_ptr, fparams_ptr, rowf_ptr, rowi_ptr, NC, BT: tl.constexpr):
    """The row statistics from the chunk partials of `_stats_kernel`, stored in ``rowf`` / ``rowi`` (every column:
    the thresholds start switched off) and returned: ``(m, ls, valid, gid, nfin, samp)``."""
    t = tl.arange(0, BT)
    tm = t < NC
    o = part_f_ptr + (row * NC + t) * _PF
    oi = part_i_ptr + (row * NC + t) * _PI
    mt = tl.load(o + _P_M, mask=tm, other=float("-inf"))
    st = tl.load(o + _P_S, mask=tm, other=0.0)
    rmt = tl.load(o + _P_RM, mask=tm, other=float("-inf"))
    rst = tl.load(o + _P_RS, mask=tm, other=0.0)
    at = tl.load(oi + _P_AMAX, mask=tm, other=_BIG)
    nf = tl.sum(tl.load(oi + _P_NFIN, mask=tm, other=0), 0)
    bad = tl.sum(tl.load(oi + _P_BAD, mask=tm, other=0), 0)
    m, ls = combine_lse(mt, st)
    m_raw, ls_raw = combine_lse(rmt, rst)
    amax = tl.min(tl.where(mt == m, at, _BIG), 0)
    valid = (bad == 0) & (nf > 0)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    gid = tl.where(valid & (temp == 0.0), amax, -1)
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
    tl.store(rf + _RF_MK, m)
    ri = rowi_ptr + row * _NRI
    tl.store(ri + _RI_VALID, valid.to(tl.int32))
    tl.store(ri + _RI_GID, gid)
    tl.store(ri + _RI_NFIN, nf)
    return m, ls, valid, gid, nf, valid & (temp > 0.0)


@triton.jit
def nsigma_combine(row, part_i_ptr, part_x_ptr, NC, BT: tl.constexpr):
    """The row's population standard deviation ``sigma`` of its finite ``z`` (top-n-sigma, docs/semantics.md §3 E
    item 3) from the chunk partials of `_stats_kernel`, merged in a fixed order in float64: the chunks' (count, mean,
    M2) by the parallel formula ``M2 = sum M2_c + sum n_c (mean_c - mean)^2``."""
    c = tl.arange(0, BT)
    cm = c < NC
    ox = part_x_ptr + (row * NC + c) * _PX
    nt = tl.load(part_i_ptr + (row * NC + c) * _PI + _P_NFIN, mask=cm, other=0).to(tl.float64)
    mean_t = tl.load(ox + _P_XMEAN, mask=cm, other=0.0).to(tl.float64)
    m2t = tl.load(ox + _P_XM2, mask=cm, other=0.0).to(tl.float64)
    n = tl.sum(nt, 0)
    mean = tl.sum(nt * mean_t, 0) / tl.maximum(n, 1.0)
    m2 = tl.sum(m2t + nt * (mean_t - mean) * (mean_t - mean), 0)
    return tl.sqrt(m2 / tl.maximum(n, 1.0)).to(tl.float32)


@triton.jit
def _combine_kernel(part_f_ptr, part_i_ptr, part_x_ptr, fparams_ptr, iparams_ptr, mu_ptr, slot_ptr, rowf_ptr,
                    rowi_ptr, gmax_ptr,
                    NC, NG,
                    SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                    MINP: tl.constexpr,  # fold min-p's threshold in here (no min_keep select runs, §3 E item 3)
                    MIRO2: tl.constexpr,  # some row uses Mirostat v2: its threshold needs no select
                    CAND: tl.constexpr,  # the candidate engine (candidates.py): the bound of each top-k row
                    NSIGMA: tl.constexpr,  # some row uses top-n-sigma: sigma from part_x into rowf
                    GBLOCK: tl.constexpr,  # group maxima per step of the bound's select
                    BT: tl.constexpr):  # power of two >= NC: all chunks in one block
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    m, ls, valid, gid, nf, samp = stats_combine(row, srow, part_f_ptr, part_i_ptr, fparams_ptr, rowf_ptr, rowi_ptr,
                                                NC, BT)
    sigma = m * 0.0
    if NSIGMA:
        sigma = nsigma_combine(row, part_i_ptr, part_x_ptr, NC, BT)
        tl.store(rowf_ptr + row * _NRF + _RF_SIGMA, sigma)
    zlo = float("-inf")
    if MINP:
        # min-p / epsilon / top-n-sigma: keep z >= the largest active threshold (at most max z)
        act_mp, thr_mp = minp_threshold(fparams_ptr, srow, m, ls, sigma, NSIGMA)
        zlo = tl.where(samp & act_mp, thr_mp, zlo)
    if MIRO2:
        mode = tl.load(iparams_ptr + srow * NI + I_MIRO_MODE)
        mu = tl.load(mu_ptr + srow)
        # keep ln q = (z - m) - ln s >= -mu ln 2, i.e. z >= m + (ln s - mu ln 2); no token qualifies -> the max
        zlo = tl.where(samp & (mode == 2), tl.minimum(m + (ls - mu * _LN2), m), zlo)
    tl.store(rowf_ptr + row * _NRF + _RF_ZLO, zlo)
    if CAND:
        # a row with an active top-k (k' = max(k, min_keep) below the finite count) or Mirostat v1 is a candidate
        # row: its bound is the k'-th largest group maximum, a lower bound on its k'-th largest z (candidates.py)
        k = tl.load(iparams_ptr + srow * NI + I_TOP_K)
        keff = tl.maximum(k, tl.load(iparams_ptr + srow * NI + I_MIN_KEEP))
        cand = samp & (k > 0) & (keff < nf)
        # Mirostat v1 (no top-k: validation) needs its row's 100 largest z
        miro1 = samp & (tl.load(iparams_ptr + srow * NI + I_MIRO_MODE) == 1)
        keff = tl.where(miro1, tl.minimum(nf, 100), keff)
        cand = cand | miro1
        bound = kth_largest(gmax_ptr + row * NG, NG, keff, cand, GBLOCK)
        tl.store(rowf_ptr + row * _NRF + _RF_BOUND, bound)
        tl.store(rowi_ptr + row * _NRI + _RI_CCOUNT, tl.where(cand, 0, -1))


@triton.jit
def _entropy_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                    bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                    rowf_ptr, rowi_ptr, part_f_ptr,
                    stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                    V, VC, E, NC,
                    HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                    HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                    SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                    HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                    BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                    HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                    HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                    ETA: tl.constexpr,  # False: typical-p's survivors z >= zlo; True: eta's, the kept set so far
                    KEPT: tl.constexpr,  # (ETA) kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    if ETA:  # noqa: SIM108 (a constexpr branch)
        on = tl.load(fparams_ptr + srow * NF + F_ETA) > 0.0
    else:
        on = tl.load(fparams_ptr + srow * NF + F_TYPICAL_P) < 1.0
    active = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0) & on
    n = tl.where(active, tl.minimum(CHUNK, VC - base), 0)
    zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
    m = float("-inf")
    s = 0.0
    w = 0.0
    cnt = 0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, base + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                               allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                               stride_l, stride_c,
                               stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        if ETA:
            keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT) & (offs < V)  # the survivors before eta
        else:
            keep = (z > float("-inf")) & (z >= zlo)  # the survivors of the rules before typical-p
        zk = tl.where(keep, z, float("-inf"))
        if ETA:
            cnt += tl.sum(keep.to(tl.int32), 0)
        nm = tl.maximum(m, tl.max(zk, 0))
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        sc = tl.exp(m - safe)
        e = tl.exp(zk - safe)
        # sum of e * (z - nm), rescaled: sum_old e'(z - m) -> sc * (sum_old + (m - nm) * s_old). A term with e == 0
        # is 0 (q = 0: 0 · ln 0 = 0, docs/semantics.md §3 E item 4), also where z - nm (or m - nm) overflows to
        # -inf in float32, which would make 0 * -inf = NaN.
        w = tl.where(sc > 0.0, sc * (w + tl.where(m == float("-inf"), 0.0, m - safe) * s), 0.0) + tl.sum(
            tl.where(keep & (e > 0.0), e * (zk - safe), 0.0), 0)
        s = s * sc + tl.sum(e, 0)
        m = nm
    o = part_f_ptr + (row * NC + chunk) * _PF
    tl.store(o + _P_M, m)
    tl.store(o + _P_S, s)
    tl.store(o + _P_W, w)
    if ETA:
        tl.store(o + _P_N, cnt.to(tl.float32))


@triton.jit
def _kept_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                 bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                 rowf_ptr, rowi_ptr, part_f_ptr, part_d_ptr,
                 stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                 V, VC, E, NC,
                 HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                 HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                 SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                 HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                 BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                 HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                 HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                 KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC
                 DYN: tl.constexpr,  # also dynamic temperature's partials of the kept set into part_d
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    active = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0)  # greedy / invalid rows: no draw
    n = tl.where(active, tl.minimum(CHUNK, VC - base), 0)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
    m = float("-inf")
    s = 0.0
    dm = float("-inf")  # DYN: dyntemp.dyn_fold of the kept z at the row's temperature
    ds = 0.0
    dw = 0.0
    dn = 0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, base + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                               allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                               stride_l, stride_c,
                               stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT) & (offs < V)
        zk = tl.where(keep, z, float("-inf"))
        m, s = online_lse(m, s, zk)
        if DYN:
            dm, ds, dw, dn = dyn_fold(dm, ds, dw, dn, zk, t)
    o = part_f_ptr + (row * NC + chunk) * _PF
    tl.store(o + _P_M, m)
    tl.store(o + _P_S, s)
    if DYN:
        store_dyn_partials(part_d_ptr, row, chunk, NC, dm, ds, dw, dn)


def stats_pass(ctx) -> None:
    """`_stats_kernel` over every chunk of every row: the chunk partials of ``ctx.part_f`` / ``ctx.part_i`` (and of
    ``ctx.part_x`` with top-n-sigma, ``ctx.part_d`` with dynamic temperature and no truncation)."""
    _stats_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.part_f, ctx.part_i, ctx.part_x, ctx.part_d, ctx.gmax,
                                   *ctx.zstrides(), *ctx.zsizes(),
                                   ctx.NG, **ctx.zflags(), NEED_RAW=ctx.need_raw, ARGMAX=ctx.flags.any_greedy,
                                   LSE=not (ctx.flags.all_greedy and not ctx.flags.any_logprobs),
                                   GROUP=ctx.GROUP if ctx.cand else 0, RAW_GROUP=ctx.lp_cand and ctx.need_raw,
                                   NSIGMA=ctx.nsigma, DYN=ctx.dyn and not ctx.truncation,
                                   BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK,
                                   num_warps=ctx.ROW_WARPS)


def combine_pass(ctx, minp: bool) -> None:
    """Row statistics into ``ctx.rowf`` / ``ctx.rowi`` and the select-free thresholds (min-p when ``minp``,
    Mirostat v2)."""
    _combine_kernel[(ctx.B,)](ctx.part_f, ctx.part_i, ctx.part_x, ctx.fparams, ctx.iparams, ctx.mu, ctx.slots,
                              ctx.rowf, ctx.rowi,
                              ctx.gmax, ctx.NC, ctx.NG, SLOTS=ctx.slot_mode, MINP=minp, MIRO2=ctx.miro_v2,
                              CAND=ctx.cand, NSIGMA=ctx.nsigma, GBLOCK=ctx.GBLOCK, BT=ctx.BT)


def entropy_pass(ctx, eta: bool = False) -> None:
    """Per-chunk (max, sum, entropy sum) of typical-p's survivors ``z >= zlo`` (or with ``eta`` of eta's, the kept
    set after typical-p, and their count) into ``ctx.part_f``."""
    _entropy_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, *ctx.zstrides(), *ctx.zsizes(),
                                     **ctx.zflags(), ETA=eta, KEPT=ctx.kept & 1 if eta else 0, BLOCK=ctx.BLOCK,
                                     CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)


def kept_pass(ctx, kept: int, dyn: bool = False) -> None:
    """Per-chunk kept-set weights of every sampled row into ``ctx.part_f`` (``kept``: the `penalties.kept_mask` bits
    to test; XTC's bound comes after this pass), with ``dyn`` also the kept set's dynamic-temperature partials into
    ``ctx.part_d`` (`dyntemp`)."""
    _kept_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, ctx.part_d, *ctx.zstrides(),
                                  *ctx.zsizes(), **ctx.zflags(), KEPT=kept, DYN=dyn, BLOCK=ctx.BLOCK,
                                  CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)
