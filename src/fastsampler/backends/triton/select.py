"""Exact value thresholds without sorting: a radix select over an order-preserving uint32 key of float32 values.

Every truncation rule of docs/semantics.md §3 E is a value threshold. For a row, a *select* finds the value ``v``
of the element at which a running total, accumulated in descending key order, first reaches a target: the ``k``-th
largest value (count target: top-k, min_keep, top-N, mirostat v1) or the value where the cumulative probability mass
first reaches ``p`` (mass target: top-p, typical-p). Elements tied at ``v`` share one key, so ties stay together.

The key of a float ``x`` (``-0`` folded into ``+0``) is its bit pattern with the sign bit flipped for ``x >= 0`` and
all bits flipped for ``x < 0``. Each level histograms ``DIGIT_BITS`` bits of the key (count and mass per bucket)
over the elements whose higher bits equal the prefix found so far, picks the boundary bucket and descends: after
``32 / DIGIT_BITS`` levels the prefix is the exact key of ``v``; a row stops early (its later levels read nothing)
as soon as every element of its boundary bucket has the same key (tracked per bucket as min / max key).

A select is one program per row (`radix_select`, a device function): it loops over its levels, reading the row once
per level, with the histogram in registers -- one launch per select, whatever the number of levels, and no launch
at all for a rule that no row of the batch uses (host flags). What is selected is chosen by ``KIND``:

- ``KIND_Z``: ``z`` over the finite ``z >= lo``; mass ``exp(z - max)``.
- ``KIND_NEG_S``: ``-s`` (typical-p; ascending ``s``) over the survivors ``z >= lo``; mass ``exp(z - max)``.
- ``KIND_LP``: the value whose order is the row's logprob order (raw logits, ``z``, or ``z`` on the kept set and
  ``-inf`` elsewhere for ``final``) over all ids ``< vocab_size``; count only.

The kernels here are the truncation stages that need a select: `_select_kernel` (top-k, min_keep, top-p),
`_typical_kernel` (typical-p, after `stats._entropy_kernel`) and `_eta_kernel` (eta over the survivors, after
`stats._entropy_kernel` over them: a select only for min_keep).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import F_ETA, F_TEMPERATURE, F_TOP_P, F_TYPICAL_P, I_MIN_KEEP, I_TOP_K, NF, NI
from .penalties import (
    NRF,
    NRI,
    P_M,
    P_N,
    P_S,
    P_W,
    PF,
    RF_DOM_LO,
    RF_HC,
    RF_LS,
    RF_M,
    RF_MK,
    RF_MS,
    RF_STHR,
    RF_ZLO,
    RI_NFIN,
    RI_VALID,
    block_z,
    kept_mask,
    minp_threshold,
    nsigma_stat,
    row_scalars,
    slot_row,
    typical_s,
)

KIND_Z, KIND_NEG_S, KIND_LP = 0, 1, 2
STAGE_TOP_K, STAGE_MIN_KEEP, STAGE_TOP_P = 0, 1, 2

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_LS: tl.constexpr = tl.constexpr(RF_LS)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_DOM_LO: tl.constexpr = tl.constexpr(RF_DOM_LO)
_RF_MK: tl.constexpr = tl.constexpr(RF_MK)
_RF_STHR: tl.constexpr = tl.constexpr(RF_STHR)
_RF_MS: tl.constexpr = tl.constexpr(RF_MS)
_RF_HC: tl.constexpr = tl.constexpr(RF_HC)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_NFIN: tl.constexpr = tl.constexpr(RI_NFIN)
_PF: tl.constexpr = tl.constexpr(PF)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_P_W: tl.constexpr = tl.constexpr(P_W)
_P_N: tl.constexpr = tl.constexpr(P_N)


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
def select_value(row, offs, raw, z, V, lo, m, ms, hc, mode, rowf_ptr, rowi_ptr, KIND: tl.constexpr,
                 KEPT: tl.constexpr):
    """(value, in-domain mask, mass weight) of the block ``offs`` for a select of kind ``KIND``: ``lo`` the domain's
    lower bound on ``z``, ``m`` the row's max ``z``, ``ms`` / ``hc`` the typical-p distance parameters, ``mode``
    the logprobs mode (``KIND_LP``)."""
    if KIND == 0:
        v = z
        dom = (z > float("-inf")) & (z >= lo)
        w = tl.exp(z - m)
    elif KIND == 1:
        dom = (z > float("-inf")) & (z >= lo)
        v = -typical_s(z, ms, hc)
        w = tl.exp(z - m)
    else:
        keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT)
        v = tl.where(mode == 0, raw, tl.where(mode == 1, z, tl.where(keep, z, float("-inf"))))
        dom = offs < V
        w = tl.zeros_like(z)
    return v, dom, w


@triton.jit
def radix_select(row, srow, target, active, lo, m, ms, hc, mode,
                 logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                 dry_ids_ptr, dry_vals_ptr,
                 rowf_ptr,
                 rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                 t, rep, freq, pres, ban, blo, bhi,
                 HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                 HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr,
                 BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr, KEPT: tl.constexpr, KIND: tl.constexpr,
                 MASS: tl.constexpr, DIGIT_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The threshold value of row ``row`` (garbage where ``active`` is false, which reads nothing).

    ``target`` is a count ``k`` (the ``k``-th largest value) or, with ``MASS``, the fraction ``p`` of the domain's
    mass that the kept values must reach; the other arguments are `select_value`'s and `block_z`'s.
    """
    NB: tl.constexpr = 1 << DIGIT_BITS
    LEVELS: tl.constexpr = 32 // DIGIT_BITS
    bk = tl.arange(0, NB)
    ge = bk[None, :] >= bk[:, None]  # [b, b']: b' >= b
    prefix = row * 0
    above_c = tl.sum(tl.zeros((NB,), tl.int32), 0)
    above_m = tl.sum(tl.zeros((NB,), tl.float32), 0)
    tgt = target
    done = active == 0
    value = tl.sum(tl.zeros((NB,), tl.float32), 0)
    for lvl in range(LEVELS):
        shift = 32 - DIGIT_BITS * (lvl + 1)
        hi = shift + DIGIT_BITS
        want = prefix >> hi
        cnt = tl.zeros((NB,), tl.int32)
        mass = tl.zeros((NB,), tl.float32)
        kmin = tl.full((NB,), 0x100000000, tl.int64)
        kmax = tl.full((NB,), -1, tl.int64)
        n = tl.where(done, 0, VC)
        ep = blo
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            raw, z, b, ep = block_z(row, srow, offs, ep, start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                                   allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr,
                                   dry_vals_ptr, stride_l, stride_c,
                                   stride_p, stride_a, stride_m, stride_bt, stride_d, V,
                                   VC, E, t, rep, freq, pres, ban, bhi,
                                   HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                                   HAS_DRY)
            v, dom, w = select_value(row, offs, raw, z, V, lo, m, ms, hc, mode, rowf_ptr, rowi_ptr, KIND, KEPT)
            key = float_key(v)
            match = dom & ((key >> hi) == want)
            digit = ((key >> shift) & (NB - 1)).to(tl.int32)
            hot = (digit[:, None] == bk[None, :]) & match[:, None]
            cnt += tl.sum(hot.to(tl.int32), 0)
            if MASS:
                mass += tl.sum(tl.where(hot, w[:, None], 0.0), 0)
            kmin = tl.minimum(kmin, tl.min(tl.where(hot, key[:, None], 0x100000000), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(hot, key[:, None], -1), 0))
        cumc = tl.sum(tl.where(ge, cnt[None, :], 0), 1)
        if MASS:
            cumm = tl.sum(tl.where(ge, mass[None, :], 0.0), 1)
            tgt = tl.where(lvl == 0, target * tl.sum(mass, 0), tgt)  # a fraction of the domain's total mass
            reach = (above_m + cumm) >= tgt
        else:
            reach = (above_c + cumc).to(tl.float32) >= target
        hit = reach & (cnt > 0)
        best = tl.max(tl.where(hit, bk, -1), 0)
        lowest = tl.min(tl.where(cnt > 0, bk, NB - 1), 0)
        digit = tl.where(best >= 0, best, lowest)
        above = bk > digit
        at = bk == digit
        # resolved early when every element of the boundary bucket has the same key
        kmn = tl.min(tl.where(at, kmin, 0x100000000), 0)
        kmx = tl.max(tl.where(at, kmax, -1), 0)
        fin = (kmn == kmx) | (lvl == LEVELS - 1)
        nxt = prefix | (digit.to(tl.int64) << shift)
        nxt = tl.where(fin & (kmx >= 0), kmx, nxt)
        above_c = tl.where(done, above_c, above_c + tl.sum(tl.where(above, cnt, 0), 0))
        if MASS:
            above_m = tl.where(done, above_m, above_m + tl.sum(tl.where(above, mass, 0.0), 0))
        value = tl.where(done, value, key_float(nxt))
        prefix = tl.where(done, prefix, nxt)
        done = done | fin
    return value


@triton.jit
def _select_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                   bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                   rowf_ptr, rowi_ptr,
                   stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                   V, VC, E,
                   HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                   HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                   SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                   HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                   BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                   HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                   HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                   STAGE: tl.constexpr,  # STAGE_TOP_K, STAGE_MIN_KEEP or STAGE_TOP_P
                   FOLD_MINP: tl.constexpr,  # (min_keep stage) fold min-p's threshold, which is raised to min_keep's
                   NSIGMA: tl.constexpr,  # some row uses top-n-sigma (its sigma in rowf)
                   DIGIT_BITS: tl.constexpr,  # key bits per level
                   BLOCK: tl.constexpr):  # ids per loop step (the one-hot histogram block is BLOCK x 2^DIGIT_BITS)
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    samp = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0)
    nfin = tl.load(rowi_ptr + row * _NRI + _RI_NFIN)
    m = tl.load(rowf_ptr + row * _NRF + _RF_M)
    mk = tl.load(iparams_ptr + srow * NI + I_MIN_KEEP)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    rf = rowf_ptr + row * _NRF
    if STAGE == 0:
        # top-k: keep z >= the k'-th largest, k' = max(k, min_keep); off when k <= 0 or k' >= survivors (§3 E 1)
        k = tl.load(iparams_ptr + srow * NI + I_TOP_K)
        keff = tl.where(k > 0, tl.maximum(k, mk), 0)
        act = samp & (k > 0) & (keff < nfin)
        thr = radix_select(row, srow, keff.to(tl.float32), act, float("-inf"), m, 0.0, 0.0, 0,
                           logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                           bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                           rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                           V, VC, E,
                           t, rep, freq, pres, ban, blo, bhi,
                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                           HAS_DRY, False,
                           0, False, DIGIT_BITS, BLOCK)
        if act:
            tl.store(rf + _RF_ZLO, tl.maximum(tl.load(rf + _RF_ZLO), thr))
            tl.store(rf + _RF_DOM_LO, thr)  # top-p acts on the top-k survivors
    elif STAGE == 1:
        # the min_keep-th largest z, over all finite z: top-p and min-p keep at least that many (§3 E, §9 item 5)
        act = samp & (mk > 1)
        thr = radix_select(row, srow, mk.to(tl.float32), act, float("-inf"), m, 0.0, 0.0, 0,
                           logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                           bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                           rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                           V, VC, E,
                           t, rep, freq, pres, ban, blo, bhi,
                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                           HAS_DRY, False,
                           0, False, DIGIT_BITS, BLOCK)
        thr_mk = tl.where(act, thr, m)
        tl.store(rf + _RF_MK, thr_mk)
        if FOLD_MINP:
            # min-p / epsilon: keep z >= their threshold, lowered to the min_keep-th largest (§3 E 3)
            sg = nsigma_stat(rowf_ptr, row, NSIGMA)
            act_mp, thr_p = minp_threshold(fparams_ptr, srow, m, tl.load(rf + _RF_LS), sg, NSIGMA)
            zlo = tl.load(rf + _RF_ZLO)
            tl.store(rf + _RF_ZLO, tl.where(samp & act_mp, tl.maximum(zlo, tl.minimum(thr_p, thr_mk)), zlo))
    else:
        # top-p over the top-k survivors: keep z >= the value where the cumulative mass first reaches p (§3 E 2)
        p = tl.load(fparams_ptr + srow * NF + F_TOP_P)
        act = samp & (p < 1.0)
        lo = tl.load(rf + _RF_DOM_LO)
        thr = radix_select(row, srow, p, act, lo, m, 0.0, 0.0, 0,
                           logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                           bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                           rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                           V, VC, E,
                           t, rep, freq, pres, ban, blo, bhi,
                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                           HAS_DRY, False,
                           0, True, DIGIT_BITS, BLOCK)
        if act:
            tl.store(rf + _RF_ZLO, tl.maximum(tl.load(rf + _RF_ZLO), tl.minimum(thr, tl.load(rf + _RF_MK))))


@triton.jit
def _typical_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
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
                    TYP_MK: tl.constexpr,  # some row has min_keep > 1: also select the min_keep-th smallest s
                    DIGIT_BITS: tl.constexpr,  # key bits per level
                    BLOCK: tl.constexpr,  # ids per loop step (the one-hot histogram block is BLOCK x 2^DIGIT_BITS)
                    BT: tl.constexpr):  # power of two >= NC: all chunk partials in one block
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    tp = tl.load(fparams_ptr + srow * NF + F_TYPICAL_P)
    act = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0) & (tp < 1.0)
    rf = rowf_ptr + row * _NRF
    # the survivors' max m_s and hc = sum q (m_s - z) from the chunk partials of stats._entropy_kernel
    c = tl.arange(0, BT)
    o = part_f_ptr + (row * NC + c) * _PF
    mt = tl.load(o + _P_M, mask=c < NC, other=float("-inf"))
    st = tl.load(o + _P_S, mask=c < NC, other=0.0)
    wt = tl.load(o + _P_W, mask=c < NC, other=0.0)
    ms = tl.max(mt, 0)
    safe = tl.where(ms == float("-inf"), 0.0, ms)
    sc = tl.where(mt == float("-inf"), 0.0, tl.exp(mt - safe))
    d = tl.where(mt == float("-inf"), 0.0, mt - safe)
    s = tl.sum(st * sc, 0)
    # sum_i e^{z_i - m} (z_i - m) over all chunks; a chunk whose weight underflows to 0 adds 0 (its d may be -inf
    # when mt - m overflows: 0 · ln 0 = 0, docs/semantics.md §3 E item 4)
    w = tl.sum(tl.where(sc > 0.0, sc * (wt + d * st), 0.0), 0)
    # H = -sum q ln q = ln s + sum q (m - z); typical_s needs only m and hc = sum q (m - z) = -w / s
    hc = -w / tl.where(act, s, 1.0)
    hc = tl.where(act, hc, 0.0)
    safe = tl.where(act, safe, 0.0)
    if act:  # other rows keep (0, 0): s stays finite, their s_thr is +inf
        tl.store(rf + _RF_MS, safe)
        tl.store(rf + _RF_HC, hc)
    zlo = tl.load(rf + _RF_ZLO)
    m = tl.load(rf + _RF_M)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    # ascending s: select on -s; keep s <= s at the first cumulative mass >= tau (§3 E 4)
    s_sel = -radix_select(row, srow, tp, act, zlo, m, safe, hc, 0,
                          logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                          bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                          rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                          V, VC, E,
                          t, rep, freq, pres, ban, blo, bhi,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                          False,
                          1, True, DIGIT_BITS, BLOCK)
    sthr = s_sel
    if TYP_MK:
        mk = tl.load(iparams_ptr + srow * NI + I_MIN_KEEP)
        act_mk = act & (mk > 1)
        s_mk = -radix_select(row, srow, mk.to(tl.float32), act_mk, zlo, m, safe, hc, 0,
                             logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                             bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                             rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt,
                             stride_d, V, VC, E,
                             t, rep, freq, pres, ban, blo, bhi,
                             HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                             HAS_DRY,
                             False, 1, False, DIGIT_BITS,
                             BLOCK)
        sthr = tl.where(act_mk, tl.maximum(s_sel, s_mk), s_sel)
    tl.store(rf + _RF_STHR, tl.where(act, sthr, float("inf")))


@triton.jit
def _eta_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
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
                KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p
                ETA_MK: tl.constexpr,  # some row has min_keep > 1: also select the min_keep-th largest survivor
                DIGIT_BITS: tl.constexpr,  # key bits per level
                BLOCK: tl.constexpr,  # ids per loop step (the one-hot histogram block is BLOCK x 2^DIGIT_BITS)
                BT: tl.constexpr):  # power of two >= NC: all chunk partials in one block
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    eta = tl.load(fparams_ptr + srow * NF + F_ETA)
    act = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0) & (eta > 0.0)
    rf = rowf_ptr + row * _NRF
    # the survivors' max m_s, ln s_s, entropy H and count from the chunk partials of stats._entropy_kernel, merged in
    # a fixed order in float64: H = ln s - sum e^(z - m_s)(z - m_s) / s
    c = tl.arange(0, BT)
    o = part_f_ptr + (row * NC + c) * _PF
    mt = tl.load(o + _P_M, mask=c < NC, other=float("-inf"))
    st = tl.load(o + _P_S, mask=c < NC, other=0.0).to(tl.float64)
    wt = tl.load(o + _P_W, mask=c < NC, other=0.0).to(tl.float64)
    n_s = tl.sum(tl.load(o + _P_N, mask=c < NC, other=0.0), 0).to(tl.int32)
    ms = tl.max(mt, 0)
    safe = tl.where(ms == float("-inf"), 0.0, ms)
    d = tl.where(mt == float("-inf"), 0.0, mt - safe).to(tl.float64)
    sc = tl.where(mt == float("-inf"), 0.0, tl.exp(d))
    s = tl.sum(st * sc, 0)
    w = tl.sum(tl.where(sc > 0.0, sc * (wt + d * st), 0.0), 0)
    ls = tl.log(tl.where(s > 0.0, s, 1.0))
    h = tl.maximum(ls - w / tl.where(s > 0.0, s, 1.0), 0.0)
    # keep q >= min(eta, sqrt(eta) e^-H): z >= m_s + ln s_s + min(ln eta, ln eta / 2 - H), at most m_s (§3 E 5)
    ln_eta = tl.log(tl.where(eta > 0.0, eta, 1.0)).to(tl.float64)
    thr = tl.minimum(ms, (safe.to(tl.float64) + ls + tl.minimum(ln_eta, 0.5 * ln_eta - h)).to(tl.float32))
    if ETA_MK:
        # lowered to the min(min_keep, |S|)-th largest survivor (a no-op where at least min_keep survive)
        mk = tl.load(iparams_ptr + srow * NI + I_MIN_KEEP)
        act_mk = act & (mk > 1)
        t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr,
                                                        bias_indptr_ptr, stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
        v = radix_select(row, srow, tl.minimum(mk, n_s).to(tl.float32), act_mk, float("-inf"), ms, 0.0, 0.0, 2,
                         logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                         bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                         rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                         V, VC, E,
                         t, rep, freq, pres, ban, blo, bhi,
                         HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                         KEPT, 2, False, DIGIT_BITS, BLOCK)
        thr = tl.where(act_mk, tl.minimum(thr, v), thr)
    if act:  # the survivors of eta: z >= thr among the survivors so far
        tl.store(rf + _RF_ZLO, tl.maximum(tl.load(rf + _RF_ZLO), thr))


def select_pass(ctx, stage: int, fold_minp: bool = False) -> None:
    """One truncation stage's select for every row that uses it (`_select_kernel`), one program per row."""
    _select_kernel[(ctx.B,)](*ctx.zargs(), ctx.rowf, ctx.rowi, *ctx.zstrides(), *ctx.zsizes_row(), **ctx.zflags(),
                             STAGE=stage, FOLD_MINP=fold_minp, NSIGMA=ctx.nsigma, DIGIT_BITS=ctx.DIGIT_BITS,
                             BLOCK=ctx.SBLOCK)


def typical_pass(ctx) -> None:
    """The typical-p threshold ``rowf[:, RF_STHR]`` (after `stats.entropy_pass`), one program per row."""
    _typical_kernel[(ctx.B,)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, *ctx.zstrides(), *ctx.zsizes(),
                              **ctx.zflags(), TYP_MK=ctx.flags.any_min_keep, DIGIT_BITS=ctx.DIGIT_BITS,
                              BLOCK=ctx.SBLOCK, BT=ctx.BT)


def eta_pass(ctx) -> None:
    """eta's threshold over the survivors (after `stats.entropy_pass` with ``eta``), raising ``rowf[:, RF_ZLO]``:
    one program per row."""
    _eta_kernel[(ctx.B,)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, *ctx.zstrides(), *ctx.zsizes(),
                          **ctx.zflags(), KEPT=ctx.kept & 1, ETA_MK=ctx.flags.any_min_keep,
                          DIGIT_BITS=ctx.DIGIT_BITS, BLOCK=ctx.SBLOCK, BT=ctx.BT)
