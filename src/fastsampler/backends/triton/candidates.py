"""The candidate engine of the truncation stage (docs/semantics.md §3 E): top-k, min_keep, top-p, min-p and Mirostat
v1 of a row finished exactly on a small buffer of candidate ids instead of selects over the whole row.

A batch takes this path when some row uses top-k or Mirostat v1 and no row uses typical-p or Mirostat v2 (host
flags). The step then reads each row once in full, and a few groups of ids around the kept set a second time:

1. `stats._stats_kernel` (row pass, already the step's first pass) also stores the maximum ``z`` of every group of
   ``GROUP`` consecutive ids (``gmax``, ``(B, NG)``);
2. `stats._combine_kernel` (one program per row) picks, on a row whose top-k is active (``k > 0``,
   ``k' = max(k, min_keep)`` below the number of finite ``z``) or that uses Mirostat v1 (``k' = min(100, finite)``),
   the **bound**: the ``k'``-th largest group maximum (`kth_largest`, a radix select over the ``NG`` group maxima, not
   over the row). It zeroes the row's candidate count; other rows get the count ``-1``;
3. `_compact_kernel` (``(B, NC)`` grid) gathers every id with a finite ``z >= bound`` into the row's buffer of
   ``CAP`` slots, reading only the groups whose maximum reaches the bound (a chunk whose maximum is below it reads
   nothing): each block of ids (one group on CUDA) reserves its slots with one integer atomic add on the row's count
   and places its candidates by a prefix sum. The order of the buffer depends on the order of the atomics; the *set*
   does not, and what reads the buffer sorts its values or sums by tile, so the result is deterministic and
   batch-invariant;
4. `_trunc_kernel` (one program per row) sorts the candidates' values and finishes top-k, min_keep, top-p (mass
   relative to the top-k survivors), min-p, and Mirostat v1 (``s`` from the 100 largest, then the ``k`` largest) on
   them, exactly as §3 E defines them; it writes the kept threshold ``zlo`` and the per-tile kept weights that
   `draw._finish_kernel` draws from. `logprobs` reads the same group maxima for the rank and the top-N.

**Why the buffer holds the whole kept set (the superset property).** Let ``g`` be the ``k'``-th largest of the group
maxima. At least ``k'`` groups have a maximum ``>= g``, and each such maximum is a distinct id whose ``z >= g``, so
at least ``k'`` ids have ``z >= g``: the ``k'``-th largest ``z`` (counted with multiplicity), ``z_(k')``, is
``>= g``. Top-k keeps ``z >= z_(k')``, so every top-k survivor, ties included, has ``z >= g`` and is in the buffer.
Top-p, min-p and min_keep only raise the threshold above ``z_(k')`` (they act on the top-k survivors; min_keep
counts at most ``k'`` ids, since ``k' >= min_keep``), so the kept set is a subset of the top-k survivors. The buffer
holds every finite ``z >= g``, so it holds the ``count >= k'`` largest values of the row with their ids, and every
rank the rules need (``k'``-th, ``min_keep``-th, the top-p boundary among the survivors) is a position in the sorted
buffer. A group with no finite ``z`` has maximum ``-inf``; when fewer than ``k'`` groups hold a finite ``z`` the
bound is ``-inf`` and the buffer must hold every finite ``z``.

Mirostat v1 reads positions 0 to 99 of the sorted buffer, which holds at least ``min(100, finite)`` values by the
same argument; its ``k``-th largest is a position of the buffer when ``k <= count``.

**Exact fallback.** A row whose candidates overflow the buffer (heavy ties, a large ``k``, a flat row), a Mirostat v1
row whose ``k`` reaches past its buffer, and a truncating row of the batch that has no active top-k (top-p or min-p
alone) are finished in the same program by the exact radix selects of `select` (and `mirostat`) over the whole row
and one pass for its kept weights: slower, same tokens.
``FASTSAMPLER_TRITON_CANDIDATES`` (a power of two, 16 to 4096; default 512) sets ``CAP``; tests set it small to
force the fallback.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import (
    F_DYN_RANGE,
    F_ETA,
    F_TEMPERATURE,
    F_TOP_P,
    F_XTC_P,
    F_XTC_T,
    I_MIN_KEEP,
    I_MIRO_MODE,
    I_TOP_K,
    NF,
    NI,
)
from .dyntemp import dyn_combine, dyn_rho, row_entropy
from .mirostat import BM, mirostat_k, mirostat_v1_threshold
from .penalties import (
    NRF,
    NRI,
    P_M,
    P_S,
    PF,
    RF_BOUND,
    RF_LS,
    RF_M,
    RF_RHO,
    RF_ZHI,
    RF_ZLO,
    RI_CCOUNT,
    RI_NFIN,
    RI_VALID,
    bias_lower_bound,
    block_z,
    minp_threshold,
    nsigma_stat,
    online_lse,
    row_scalars,
    slot_row,
)
from .select import float_key, key_float, radix_select
from .xtc import kept_tile_weights, xtc_coin, xtc_cut

GROUP = 128  # ids per group maximum, at most (the bound's resolution: larger groups, fewer maxima, a looser bound)
CAP = 512  # default candidate slots per row (chosen by the cost model, docs/benchmarks.md)

_BM: tl.constexpr = tl.constexpr(BM)
_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_LS: tl.constexpr = tl.constexpr(RF_LS)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_ZHI: tl.constexpr = tl.constexpr(RF_ZHI)
_RF_RHO: tl.constexpr = tl.constexpr(RF_RHO)
_RF_BOUND: tl.constexpr = tl.constexpr(RF_BOUND)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_NFIN: tl.constexpr = tl.constexpr(RI_NFIN)
_RI_CCOUNT: tl.constexpr = tl.constexpr(RI_CCOUNT)
_PF: tl.constexpr = tl.constexpr(PF)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def kth_largest(ptr, n, k, active, BLOCK: tl.constexpr):
    """The ``k``-th largest (counted with multiplicity) of the float32 values ``ptr[0:n]`` (``-inf`` allowed, no
    NaN); ``-inf`` where ``active`` is false or ``k`` is outside ``[1, n]`` (nothing is read then).

    A radix select over `select.float_key` with 4-bit digits: each level counts the values under the prefix found so
    far per digit, reading the ``n`` values in blocks of ``BLOCK``; it stops as soon as the boundary digit holds a
    single key."""
    bk = tl.arange(0, 16)
    ge = bk[None, :] >= bk[:, None]  # [b, b']: b' >= b
    ok = (active != 0) & (k >= 1) & (k <= n)
    done = ok == 0
    prefix = (n * 0).to(tl.int64)
    above = n * 0
    for lvl in range(8):
        shift = 28 - 4 * lvl
        hi = shift + 4
        want = prefix >> hi
        cnt = tl.zeros((16,), tl.int32)
        kmin = tl.full((16,), 0x100000000, tl.int64)
        kmax = tl.full((16,), -1, tl.int64)
        nn = tl.where(done, 0, n)
        for start in range(0, nn, BLOCK):
            o = start + tl.arange(0, BLOCK)
            x = tl.load(ptr + o, mask=o < nn, other=float("-inf"))
            key = float_key(x)
            match = (o < nn) & ((key >> hi) == want)
            digit = ((key >> shift) & 15).to(tl.int32)
            hot = (digit[:, None] == bk[None, :]) & match[:, None]
            cnt += tl.sum(hot.to(tl.int32), 0)
            kmin = tl.minimum(kmin, tl.min(tl.where(hot, key[:, None], 0x100000000), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(hot, key[:, None], -1), 0))
        cumc = tl.sum(tl.where(ge, cnt[None, :], 0), 1)  # values under the prefix with digit >= b
        best = tl.max(tl.where(((above + cumc) >= k) & (cnt > 0), bk, -1), 0)
        digit = tl.maximum(best, 0)
        at = bk == digit
        kmn = tl.min(tl.where(at, kmin, 0x100000000), 0)
        kmx = tl.max(tl.where(at, kmax, -1), 0)
        fin = (kmn == kmx) | (lvl == 7)
        nxt = prefix | (digit.to(tl.int64) << shift)
        nxt = tl.where(fin & (kmx >= 0), kmx, nxt)
        above = tl.where(done, above, above + tl.sum(tl.where(bk > digit, cnt, 0), 0))
        prefix = tl.where(done, prefix, nxt)
        done = done | fin
    return tl.where(ok, key_float(prefix), float("-inf"))


@triton.jit
def _compact_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                    bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                    rowf_ptr, rowi_ptr, part_f_ptr,
                    gmax_ptr, cid_ptr, cz_ptr,
                    stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                    V, VC, E, NC, NG,
                    HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                    HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                    SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                    HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                    BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                    HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                    HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                    CAP: tl.constexpr,  # candidate slots per row
                    GROUP: tl.constexpr,  # ids per group maximum: the unit read
                    CBLOCK: tl.constexpr,  # ids per step: GROUP on CUDA, BLOCK in the interpreter
                    CHUNK: tl.constexpr):  # ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    cnt_ptr = rowi_ptr + row * _NRI + _RI_CCOUNT
    bound = tl.load(rowf_ptr + row * _NRF + _RF_BOUND)
    # the chunk's max z (its stats partial) and then each group's decide what is read: only the groups whose max
    # reaches the bound hold candidates. A count of -1 marks a row that is not a candidate row (the programs of a
    # candidate row see 0 or a partial count, never -1).
    cmax = tl.load(part_f_ptr + (row * NC + chunk) * _PF + _P_M)
    live = (tl.load(cnt_ptr) >= 0) & (cmax >= bound)
    n = tl.where(live, tl.minimum(CHUNK, VC - base), 0)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    for start in range(0, n, CBLOCK):
        offs = base + start + tl.arange(0, CBLOCK)
        # the block's groups that reach the bound (on CUDA a block is one group: read it or skip it)
        glive = tl.load(gmax_ptr + row * NG + offs // GROUP, mask=offs < VC, other=float("-inf")) >= bound
        if tl.max(glive.to(tl.int32), 0) > 0:
            ep = blo
            if HAS_BIAS:
                ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base + start)
            offs = tl.where(glive, offs, VC)  # lanes of the other groups read nothing
            raw, z, b, ep = block_z(row, srow, offs, ep, base + start + CBLOCK, logits_ptr, counts_ptr, prompt_ptr,
                                   allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr,
                                   dry_vals_ptr, stride_l, stride_c,
                                   stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                                   E, t, rep, freq, pres, ban, bhi,
                                   HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                   BIAS_TABLE, HAS_DRY)
            sel = (z > float("-inf")) & (z >= bound)  # ids >= V (and the lanes set to VC) have z = -inf
            s32 = sel.to(tl.int32)
            # one atomic per block reserves its slots; the count keeps growing past CAP (the finisher then falls
            # back to the exact selects)
            pos = tl.atomic_add(cnt_ptr, tl.sum(s32, 0)) + tl.cumsum(s32, 0) - 1
            ok = sel & (pos < CAP)
            tl.store(cid_ptr + row * CAP + pos, offs, mask=ok)
            tl.store(cz_ptr + row * CAP + pos, z, mask=ok)


@triton.jit
def _store_tiles(part_f_ptr, row, NC, t, mt, st, SPLIT: tl.constexpr, S2: tl.constexpr):
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
def _trunc_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                  bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                  mu_ptr, rowf_ptr, rowi_ptr, part_f_ptr,
                  cid_ptr, cz_ptr, top_ptr, seeds_ptr, seqs_ptr,
                  stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                  V, VC, E, NC, NT,
                  HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                  HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                  SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                  HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                  BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                  HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                  HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                  MIRO1: tl.constexpr,  # some row uses Mirostat v1 (its 100 largest z from the buffer)
                  NSIGMA: tl.constexpr,  # some row uses top-n-sigma (its sigma in rowf)
                  ETA: tl.constexpr,  # some row uses eta: its threshold over the survivors after the min-p stage
                  XTC: tl.constexpr,  # some row may use XTC: its bound zhi (RF_ZHI) after the other rules
                  CAP: tl.constexpr,  # candidate slots per row
                  TILE: tl.constexpr,  # ids per tile of the draw (docs/semantics.md §3 F)
                  SPLIT: tl.constexpr,  # chunks per tile (TILE / CHUNK)
                  S2: tl.constexpr,  # power of two >= SPLIT, >= 2
                  BT_TILES: tl.constexpr,  # power of two >= NT: every tile in one block
                  DIGIT_BITS: tl.constexpr,  # key bits per level of the fallback selects
                  SBLOCK: tl.constexpr,  # ids per step of the fallback selects
                  BLOCK: tl.constexpr):  # ids per step of the fallback's kept-weight pass
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    rf = rowf_ptr + row * _NRF
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    samp = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0)
    nf = tl.load(rowi_ptr + row * _NRI + _RI_NFIN)
    m = tl.load(rf + _RF_M)
    k = tl.load(iparams_ptr + srow * NI + I_TOP_K)
    mk = tl.load(iparams_ptr + srow * NI + I_MIN_KEEP)
    p = tl.load(fparams_ptr + srow * NF + F_TOP_P)
    miro1 = samp & (nf < 0)  # false (a count is never negative), typed like samp; Mirostat v1 rows below
    mu = tl.load(mu_ptr + srow)
    if MIRO1:
        miro1 = samp & (tl.load(iparams_ptr + srow * NI + I_MIRO_MODE) == 1)
    keff = tl.where(k > 0, tl.maximum(k, mk), 0)
    cnt = tl.load(rowi_ptr + row * _NRI + _RI_CCOUNT)
    # a candidate row (top-k active, or Mirostat v1) whose candidates all fit; Mirostat v1 may still need the
    # fallback when its k reaches past the buffer (ok below)
    fast = (cnt >= 0) & (cnt <= CAP)
    ok = fast
    tiles = fast  # store the kept tile weights (not when every finite z is kept: the stats partials are those)
    # min-p / epsilon / top-n-sigma: keep z >= max z + ln min_p, z >= max z + ln epsilon + ln s, ... (§3 E item 3)
    sg = nsigma_stat(rowf_ptr, row, NSIGMA)
    mpa, thr_minp = minp_threshold(fparams_ptr, srow, m, tl.load(rf + _RF_LS), sg, NSIGMA)
    # eta (§3 E item 5) over the survivors of the rules before it
    eact = samp & (nf < 0)  # false, typed like samp
    ln_eta = tl.zeros_like(m)
    if ETA:
        eta = tl.load(fparams_ptr + srow * NF + F_ETA)
        eact = samp & (eta > 0.0)
        ln_eta = tl.log(tl.where(eta > 0.0, eta, 1.0))
    # dynamic temperature (§3 E, after the rules): rho = T / T' of the kept set, 1 on the other rows
    dact = samp & (nf < 0)  # false, typed like samp
    rho = tl.where(samp, 1.0, 1.0)
    if HAS_DYN:
        dact = samp & (tl.load(fparams_ptr + srow * NF + F_DYN_RANGE) > 0.0)
    tt = tl.arange(0, BT_TILES)
    # XTC (§3 E item 6): a row whose coin fires removes its top choices above a (zhi = a), after the other rules
    xact = samp & (nf < 0)  # false, typed like samp
    zhi = tl.where(samp, float("inf"), float("inf"))
    theta = tl.load(fparams_ptr + srow * NF + F_XTC_T)
    if XTC:
        xp = tl.load(fparams_ptr + srow * NF + F_XTC_P)
        xact = samp & (xp > 0.0) & xtc_coin(seeds_ptr, steps_ptr, seqs_ptr, srow, xp)
    if fast:
        # the candidates' z sorted descending (empty slots -inf, last). Every threshold below is a value at a
        # position of this order or a cumulative mass along it; equal values carry equal masses, so neither depends
        # on how ties are ordered (the ids are not sorted; the kept test below is by value)
        j = tl.arange(0, CAP)
        live = j < cnt
        ids = tl.load(cid_ptr + row * CAP + j, mask=live, other=0)
        zc = tl.load(cz_ptr + row * CAP + j, mask=live, other=float("-inf"))
        zs = tl.sort(zc, descending=True)
        # top-k: the k'-th largest value, counted with multiplicity (position k' - 1 < cnt)
        thr_k = tl.max(tl.where(j == keff - 1, zs, float("-inf")), 0)
        surv = live & (zs >= thr_k)  # the top-k survivors, a prefix of the sorted buffer (ties included)
        n1 = tl.sum(surv.to(tl.int32), 0)
        # top-p over the survivors: the first position whose cumulative mass reaches p of their total, raised to
        # min_keep - 1, capped at the last survivor; keep z >= the value there (§3 E item 2)
        e = tl.where(surv, tl.exp(zs - m), 0.0)
        cum = tl.cumsum(e, 0)
        c = tl.min(tl.where(surv & (cum >= p * tl.sum(e, 0)), j, _BIG), 0)
        c = tl.minimum(tl.maximum(tl.where(c == _BIG, n1 - 1, c), mk - 1), n1 - 1)
        thr_p = tl.where(p < 1.0, tl.max(tl.where(j == c, zs, float("-inf")), 0), float("-inf"))
        # min-p, lowered to the min_keep-th largest z (position min_keep - 1 <= k' - 1)
        thr_mk = tl.max(tl.where(j == mk - 1, zs, float("-inf")), 0)
        thr_mp = tl.where(mpa, tl.minimum(thr_minp, thr_mk), float("-inf"))
        zlo = tl.maximum(tl.maximum(thr_k, thr_p), thr_mp)
        if ETA:
            # eta over the survivors S = {z >= zlo} (a prefix of the sorted buffer): keep
            # z >= m_s + ln s_s + min(ln eta, ln eta / 2 - H), at most m_s, lowered to the min(min_keep, |S|)-th
            ks = live & (zs >= zlo)
            n_s = tl.sum(ks.to(tl.int32), 0)
            m_s = tl.max(tl.where(ks, zs, float("-inf")), 0)
            safe = tl.where(m_s == float("-inf"), 0.0, m_s)
            d = (zs - safe).to(tl.float64)
            e = tl.where(ks, tl.exp(d), 0.0)
            s_s = tl.sum(e, 0)
            ls_s = tl.log(tl.where(s_s > 0.0, s_s, 1.0))
            h = tl.maximum(ls_s - tl.sum(tl.where(e > 0.0, e * d, 0.0), 0) / tl.where(s_s > 0.0, s_s, 1.0), 0.0)
            thr_e = tl.minimum(m_s, (safe.to(tl.float64) + ls_s + tl.minimum(ln_eta, 0.5 * ln_eta - h)).to(tl.float32))
            thr_e = tl.minimum(thr_e, tl.max(tl.where(j == tl.minimum(mk, n_s) - 1, zs, float("-inf")), 0))
            zlo = tl.where(eact, tl.maximum(zlo, thr_e), zlo)
        if MIRO1:
            # Mirostat v1: k from the 100 largest z (positions 0 .. 99 of the sorted buffer, which holds at least
            # min(100, finite) values), then keep the k largest with ties: position k - 1 when k < cnt. The sorted
            # values go through the row's scratch to pair each with the next one.
            tl.store(top_ptr + row * _BM + j, zs, mask=j < _BM)
            tl.debug_barrier()  # stored by other threads of this program
            r = tl.arange(0, _BM)
            sv = tl.load(top_ptr + row * _BM + r, mask=r < CAP, other=float("-inf"))
            sv1 = tl.load(top_ptr + row * _BM + r + 1, mask=(r + 1 < _BM) & (r + 1 < CAP), other=float("-inf"))
            km = mirostat_k(sv, sv1, r, mu, V)
            zlo_m = tl.where(km < nf, tl.max(tl.where(j == km - 1, zs, float("-inf")), 0), float("-inf"))
            zlo = tl.where(miro1, zlo_m, zlo)
            ok = (miro1 == 0) | (km >= nf) | (km <= cnt)
            tiles = (miro1 == 0) | (km < nf)
        if XTC:
            # on the sorted buffer, which holds the whole kept set S = {z >= zlo}: A = {z in S : q_S >= theta}
            ks = live & (zs >= zlo)
            m_s = tl.max(tl.where(ks, zs, float("-inf")), 0)
            safe = tl.where(m_s == float("-inf"), 0.0, m_s)
            ls_s = tl.log(tl.sum(tl.where(ks, tl.exp(zs - safe), 0.0), 0))
            za = tl.where(theta > 0.0, (m_s + ls_s) + tl.log(tl.where(theta > 0.0, theta, 1.0)), float("-inf"))
            ina = ks & (zs >= za)
            n_a = tl.sum(ina.to(tl.int32), 0)
            amin = tl.min(tl.where(ina, zs, float("inf")), 0)
            n_at = tl.sum((ina & (zs == amin)).to(tl.int32), 0)
            n_s = tl.sum(ks.to(tl.int32), 0)
            zhi = tl.where(xact & (n_a >= 2) & ((n_s - (n_a - n_at)) >= mk), amin, float("inf"))
        zv = zc
        if HAS_DYN:
            # the kept set's entropy at temperature 1 (l = z T) on the sorted buffer, then rho; a row whose kept set
            # is every finite z (Mirostat v1 with k past the finite count) is not in the buffer: the fallback
            kd = live & (zs >= zlo) & (zs <= zhi)
            h_d = dyn_combine(tl.where(kd, zs, float("-inf")), tl.where(kd, 1.0, 0.0), tl.zeros_like(zs), temp)
            rho = dyn_rho(fparams_ptr, srow, dact, h_d, tl.sum(kd.to(tl.int32), 0))
            ok = ok & ((dact == 0) | tiles)
            zv = zc * rho  # z' on the kept set
        if ok & tiles:
            # the kept weights per tile of the draw, from the unsorted buffer (at z' with dynamic temperature)
            kept = live & (zc >= zlo)
            if XTC:
                kept = kept & (zc <= zhi)
            hot = kept[:, None] & ((ids // TILE)[:, None] == tt[None, :])
            mt = tl.max(tl.where(hot, zv[:, None], float("-inf")), 0)
            mts = tl.where(mt == float("-inf"), 0.0, mt)
            st = tl.sum(tl.where(hot, tl.exp(zv[:, None] - mts[None, :]), 0.0), 0)
            _store_tiles(part_f_ptr, row, NC, tt, mt, st, SPLIT, S2)
        if ok:
            tl.store(rf + _RF_ZLO, zlo)
    rules_on = (k > 0) | (p < 1.0) | mpa | miro1 | eact | dact
    if XTC:
        rules_on = rules_on | xact
    slow = samp & rules_on & ((fast & ok) == 0)
    if slow:
        # the exact fallback: radix selects over the whole row (select.py), as §3 E defines each rule
        t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr,
                                                        bias_indptr_ptr, stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
        rules = miro1 == 0
        act_k = rules & (k > 0) & (keff < nf)
        thr_k = radix_select(row, srow, keff.to(tl.float32), act_k, float("-inf"), m, 0.0, 0.0, 0,
                             logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                             bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, stride_l, stride_c,
                             stride_p, stride_a, stride_m,
                             stride_bt, stride_d, V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                             HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                             HAS_DRY,
                             False, 0, False, DIGIT_BITS, SBLOCK)
        lo_k = tl.where(act_k, thr_k, float("-inf"))
        # the min_keep-th largest z over all finite z: top-p and min-p keep at least that many
        act_mk = rules & (mk > 1) & ((p < 1.0) | mpa)
        thr_mk = radix_select(row, srow, mk.to(tl.float32), act_mk, float("-inf"), m, 0.0, 0.0, 0,
                              logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                              bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, stride_l, stride_c,
                              stride_p, stride_a, stride_m,
                              stride_bt, stride_d, V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                              HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                              HAS_DRY,
                              False, 0, False, DIGIT_BITS, SBLOCK)
        thr_mk = tl.where(act_mk, thr_mk, m)
        act_p = rules & (p < 1.0)
        thr_p = radix_select(row, srow, p, act_p, lo_k, m, 0.0, 0.0, 0,
                             logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                             bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, stride_l, stride_c,
                             stride_p, stride_a, stride_m,
                             stride_bt, stride_d, V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                             HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                             HAS_DRY,
                             False, 0, True, DIGIT_BITS, SBLOCK)
        zlo = tl.where(act_p, tl.maximum(lo_k, tl.minimum(thr_p, thr_mk)), lo_k)
        zlo = tl.where(rules & mpa, tl.maximum(zlo, tl.minimum(thr_minp, thr_mk)), zlo)
        if ETA:
            # eta over the survivors S = {finite z >= zlo}: one pass for their max, log-normaliser, entropy and
            # count, and for min_keep > 1 the min(min_keep, |S|)-th largest of them (a select)
            m_e, s_e, w_e, n_e = row_entropy(row, srow, eact, zlo, float("inf"), 1.0,
                                             logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                             bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                                             stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                                             V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                                             HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                             BIAS_TABLE, HAS_DRY, BLOCK)
            ls_e = tl.log(tl.where(s_e > 0.0, s_e, 1.0)).to(tl.float64)
            h_e = tl.maximum(ls_e - (w_e / tl.where(s_e > 0.0, s_e, 1.0)).to(tl.float64), 0.0)
            safe_e = tl.where(m_e == float("-inf"), 0.0, m_e).to(tl.float64)
            thr_e = tl.minimum(m_e, (safe_e + ls_e + tl.minimum(ln_eta, 0.5 * ln_eta - h_e)).to(tl.float32))
            act_emk = eact & (mk > 1)
            v_e = radix_select(row, srow, tl.minimum(mk, n_e).to(tl.float32), act_emk, zlo, m, 0.0, 0.0, 0,
                               logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                               bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, stride_l, stride_c,
                               stride_p, stride_a, stride_m,
                               stride_bt, stride_d, V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY,
                               False, 0, False, DIGIT_BITS, SBLOCK)
            thr_e = tl.where(act_emk, tl.minimum(thr_e, v_e), thr_e)
            zlo = tl.where(eact, tl.maximum(zlo, thr_e), zlo)
        if MIRO1:
            thr1, act1 = mirostat_v1_threshold(row, srow, miro1, nf, m, mu,
                                               logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                               bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                                               rowi_ptr, top_ptr,
                                               stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                                               V, VC, E,
                                               t, rep, freq, pres, ban, blo, bhi,
                                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS,
                                               HAS_TBM, BIAS_TABLE, HAS_DRY, DIGIT_BITS, SBLOCK, BLOCK)
            zlo = tl.where(miro1, tl.where(act1, thr1, float("-inf")), zlo)
        tl.store(rf + _RF_ZLO, zlo)
        # the kept weights per tile, one pass over the row (none when every finite z is kept: the stats partials
        # are those weights)
        ep = blo
        mt = tl.full((BT_TILES,), float("-inf"), tl.float32)
        st = tl.zeros((BT_TILES,), tl.float32)
        for tile in range(0, tl.where(zlo > float("-inf"), NT, 0)):
            tbase = tile * TILE
            tm = float("-inf")
            ts = 0.0
            for start in range(0, tl.minimum(TILE, VC - tbase), BLOCK):
                offs = tbase + start + tl.arange(0, BLOCK)
                raw, z, b, ep = block_z(row, srow, offs, ep, tbase + start + BLOCK, logits_ptr, counts_ptr,
                                       prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                                       dry_ids_ptr, dry_vals_ptr,
                                       stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                                       E, t, rep, freq, pres, ban, bhi,
                                       HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                       BIAS_TABLE, HAS_DRY)
                keep = (z > float("-inf")) & (z >= zlo)  # ids >= V have z = -inf
                tm, ts = online_lse(tm, ts, tl.where(keep, z, float("-inf")))
            mt = tl.where(tt == tile, tm, mt)
            st = tl.where(tt == tile, ts, st)
        cut = zlo > float("-inf")
        if XTC:
            # S's log-normaliser from the tile weights (the row's own when every finite z is kept), then A
            m_s = tl.max(mt, 0)
            safe = tl.where(m_s == float("-inf"), 0.0, m_s)
            ls_s = tl.log(tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - safe)), 0))
            m_s = tl.where(cut, m_s, m)
            ls_s = tl.where(cut, ls_s, tl.load(rf + _RF_LS))
            zhi = xtc_cut(row, srow, xact, m_s, ls_s, zlo, theta, mk,
                          logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                          bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                          stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                          t, rep, freq, pres, ban, blo, bhi,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                          HAS_DRY, False, SBLOCK)
            if zhi < float("inf"):
                mt, st = kept_tile_weights(row, srow, zlo, zhi,
                                           logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                           bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                                           stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                                           V, VC, E, NT, t, rep, freq, pres, ban, blo, bhi,
                                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                           BIAS_TABLE, HAS_DRY, False, TILE, BT_TILES, BLOCK, 1.0, False)
            cut = cut | (zhi < float("inf"))
        if HAS_DYN:
            # the kept set's entropy at temperature 1 (one pass), rho, and its tile weights at z' = z rho (another)
            m_d, s_d, w_d, n_d = row_entropy(row, srow, dact, zlo, zhi, temp,
                                             logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                             bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                                             stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                                             V, VC, E, t, rep, freq, pres, ban, blo, bhi,
                                             HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                             BIAS_TABLE, HAS_DRY, BLOCK)
            s_d64 = tl.where(s_d > 0.0, s_d, 1.0).to(tl.float64)
            h_d = tl.maximum(tl.log(s_d64) - w_d.to(tl.float64) / s_d64, 0.0)
            rho = dyn_rho(fparams_ptr, srow, dact, h_d, n_d)
            if dact:
                mt, st = kept_tile_weights(row, srow, zlo, zhi,
                                           logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                           bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr,
                                           stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                                           V, VC, E, NT, t, rep, freq, pres, ban, blo, bhi,
                                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                           BIAS_TABLE, HAS_DRY, False, TILE, BT_TILES, BLOCK, rho, True)
            cut = cut | dact
        if cut:
            _store_tiles(part_f_ptr, row, NC, tt, mt, st, SPLIT, S2)
    if XTC:  # every row: +inf where XTC removes nothing (penalties.kept_mask)
        tl.store(rf + _RF_ZHI, zhi)
    if HAS_DYN:  # every row: 1 without dynamic temperature
        tl.store(rf + _RF_RHO, rho)


def compact_pass(ctx) -> None:
    """Every candidate ``z >= bound`` of each candidate row into its buffer (`_compact_kernel`, a row pass)."""
    _compact_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, ctx.gmax, ctx.cand_ids,
                                     ctx.cand_z, *ctx.zstrides(), *ctx.zsizes(), ctx.NG, **ctx.zflags(), CAP=ctx.CAP,
                                     GROUP=ctx.GROUP, CBLOCK=ctx.BLOCK if ctx.interp else ctx.GROUP,
                                     CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)


def trunc_pass(ctx) -> None:
    """Top-k / min_keep / top-p / min-p thresholds and the kept tile weights of every row (`_trunc_kernel`)."""
    split = ctx.TILE // ctx.CHUNK
    _trunc_kernel[(ctx.B,)](*ctx.zargs(), ctx.mu, ctx.rowf, ctx.rowi, ctx.part_f, ctx.cand_ids, ctx.cand_z,
                            ctx.miro_top, ctx.seeds, ctx.seqs, *ctx.zstrides(), *ctx.zsizes(), ctx.NT, **ctx.zflags(),
                            MIRO1=ctx.miro_v1,
                            NSIGMA=ctx.nsigma, ETA=ctx.flags.any_eta, XTC=ctx.xtc,
                            CAP=ctx.CAP, TILE=ctx.TILE,
                            SPLIT=split, S2=max(2, split), BT_TILES=ctx.BT_TILES, DIGIT_BITS=ctx.DIGIT_BITS,
                            SBLOCK=ctx.SBLOCK, BLOCK=ctx.BLOCK)
