"""Mirostat v1's threshold (docs/semantics.md §3 E): ``k`` from the row's 100 largest ``z`` (`mirostat_k`, the
exponent ``s`` and ``k`` in float64 like the reference), then the ``k``-th largest ``z``.

In a batch of the candidate engine the 100 largest come from the candidate buffer (`candidates._trunc_kernel`);
otherwise, and as that engine's fallback, `mirostat_v1_threshold` finds them over the whole row in one program (a
select and one gather pass, then the select of the ``k``-th largest): `_mirostat_v1_kernel`, launched only when some
row uses Mirostat v1 (host flag) and the batch does not take the candidate engine (a Mirostat v2 or typical-p row is
present). Mirostat v2's threshold needs no select (`stats._combine_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...layout import MIROSTAT_M
from .columns import F_TEMPERATURE, I_MIRO_MODE, NF, NI
from .penalties import NRF, NRI, RF_M, RF_ZLO, RI_NFIN, RI_VALID, block_z, row_scalars, slot_row
from .select import float_key, radix_select

BM = 1 << (MIROSTAT_M - 1).bit_length()  # power of two >= MIROSTAT_M: the gathered values in one block

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_NFIN: tl.constexpr = tl.constexpr(RI_NFIN)
_M: tl.constexpr = tl.constexpr(MIROSTAT_M)
_BM: tl.constexpr = tl.constexpr(BM)


@triton.jit
def _pow64(x, y):
    """``x ** y`` in float64 for ``x >= 0`` (NaN for ``x < 0``), with the limits of ``pow``: ``x ** 0 = 1 ** y = 1``,
    ``0 ** y`` and ``inf ** y`` by the sign of ``y``, ``x ** (+-inf)`` by ``x`` against 1."""
    r = tl.exp(y * tl.log(x))
    return tl.where((y == 0.0) | (x == 1.0), 1.0, r)


@triton.jit
def mirostat_k(sv, sv1, r, mu, V):
    """Mirostat v1's ``k`` (int32, docs/semantics.md §3 E) from the row's largest ``z`` sorted descending: ``sv[r]``
    is the ``r``-th (0-based) and ``sv1[r]`` the ``(r + 1)``-th for the lanes ``r`` (at least the first 100), ``-inf``
    past the finite ones; ``mu`` the row's state. ``s`` and ``k`` in float64, like the reference."""
    # s = sum t_i b_i / sum t_i^2 over the pairs i = 0 .. m - 2, t_i = ln((i + 2) / (i + 1)), b_i = ln(q_i / q_{i+1})
    pair = (r < _M - 1) & (sv1 > float("-inf"))
    rf = r.to(tl.float64)
    ti = tl.log((rf + 2.0) / (rf + 1.0))
    bi = tl.where(pair, sv.to(tl.float64) - tl.where(pair, sv1, 0.0).to(tl.float64), 0.0)
    num = tl.sum(tl.where(pair, ti * bi, 0.0), 0)
    den = tl.sum(tl.where(pair, ti * ti, 0.0), 0)
    s = num / den
    eps = s - 1.0
    nv = V.to(tl.float64)
    ln_n = tl.log(nv)
    two_mu = tl.exp(mu.to(tl.float64) * 0.6931471805599453)
    k_gen = _pow64((eps * two_mu) / (1.0 - tl.exp(-eps * ln_n)), 1.0 / s)
    k_lim = _pow64(two_mu / ln_n, 1.0 / s)  # the eps -> 0 limit (ln N = 0 for N = 1: k is clamped to 1 anyway)
    kf = tl.where(tl.abs(eps) < 1e-6, k_lim, k_gen)
    kf = tl.where(kf != kf, nv, kf)  # s undefined (fewer than two finite tokens): k = N
    kf = tl.minimum(tl.maximum(tl.floor(kf), 1.0), nv)
    return kf.to(tl.int32)


@triton.jit
def mirostat_v1_threshold(row, srow, act, nfin, m, mu,
                          logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                          bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, top_ptr,
                          stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                          t, rep, freq, pres, ban, blo, bhi,
                          HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                          HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr,
                          HAS_TBM: tl.constexpr, BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr,
                          DIGIT_BITS: tl.constexpr,
                          SBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """Mirostat v1's threshold of row ``row`` from the whole row: ``(zlo, on)``, keep ``z >= zlo`` where ``on``
    (``k`` below the finite count), else keep every finite ``z``. Reads nothing where ``act`` is false.

    The row's 100 largest ``z`` come from a select and one gather pass into the row's scratch ``top_ptr`` (``BM``
    floats), ``k`` from `mirostat_k`, the threshold from the ``k``-th select."""
    # the 100th largest z (the smallest finite z when fewer are finite)
    thr = radix_select(row, srow, 100.0, act, float("-inf"), m, 0.0, 0.0, 0,
                       logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                       dry_ids_ptr, dry_vals_ptr,
                       rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V,
                       VC, E,
                       t, rep, freq, pres, ban, blo, bhi,
                       HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                       False, 0,
                       False, DIGIT_BITS, SBLOCK)
    # gather the (fewer than 100) values strictly above it into this row's scratch, count the ties at it
    tk = float_key(thr)
    n = tl.where(act, VC, 0)
    ng = tl.sum(tl.zeros((2,), tl.int32), 0)
    ne = tl.sum(tl.zeros((2,), tl.int32), 0)
    ep = blo
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, start + BLOCK, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr,
                               tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l,
                               stride_c, stride_p, stride_a,
                               stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        key = float_key(z)
        fin = z > float("-inf")
        g = fin & (key > tk)
        pos = ng + tl.cumsum(g.to(tl.int32), 0) - 1
        tl.store(top_ptr + row * _BM + pos, z, mask=g & (pos < _BM))
        ng += tl.sum(g.to(tl.int32), 0)
        ne += tl.sum((fin & (key == tk)).to(tl.int32), 0)
    tl.debug_barrier()  # the gathered values were stored by other threads of this program
    i = tl.arange(0, _BM)
    gi = i < ng
    vi = tl.load(top_ptr + row * _BM + i, mask=tl.where(act, gi, False), other=float("-inf"))
    # rank of each gathered value in descending order (equal values in any order: they give the same sequence)
    before = (vi[None, :] > vi[:, None]) | ((vi[None, :] == vi[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum((before & gi[None, :]).to(tl.int32), 1)
    # the 100 largest values sorted descending: sv[r], and sv1[r] = sv[r + 1]; -inf past the finite ones
    r = tl.arange(0, _BM)
    top = tl.minimum(ng + ne, _M)
    at0 = tl.max(tl.where((rank[None, :] == r[:, None]) & gi[None, :], vi[None, :], float("-inf")), 1)
    at1 = tl.max(tl.where((rank[None, :] == r[:, None] + 1) & gi[None, :], vi[None, :], float("-inf")), 1)
    sv = tl.where(r < ng, at0, tl.where(r < top, thr, float("-inf")))
    sv1 = tl.where(r + 1 < ng, at1, tl.where(r + 1 < top, thr, float("-inf")))
    k = mirostat_k(sv, sv1, r, mu, V)
    act1 = act & (k < nfin)
    thr1 = radix_select(row, srow, k.to(tl.float32), act1, float("-inf"), m, 0.0, 0.0, 0,
                        logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                        bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                        rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V,
                        VC, E,
                        t, rep, freq, pres, ban, blo, bhi,
                        HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                        False, 0,
                        False, DIGIT_BITS, SBLOCK)
    return thr1, act1


@triton.jit
def _mirostat_v1_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr,
                        bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr,
                        slot_ptr, mu_ptr, rowf_ptr,
                        rowi_ptr, top_ptr,
                        stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                        V, VC, E,
                        HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                        HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                        SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                        HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                        BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                        HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                        HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                        DIGIT_BITS: tl.constexpr,  # key bits per select level
                        SBLOCK: tl.constexpr,  # ids per select step (the one-hot block is SBLOCK x 2^DIGIT_BITS)
                        BLOCK: tl.constexpr):  # ids per step of the gather pass
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    mode = tl.load(iparams_ptr + srow * NI + I_MIRO_MODE)
    act = (tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0) & (mode == 1)
    nfin = tl.load(rowi_ptr + row * _NRI + _RI_NFIN)
    m = tl.load(rowf_ptr + row * _NRF + _RF_M)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    thr1, act1 = mirostat_v1_threshold(row, srow, act, nfin, m, tl.load(mu_ptr + srow),
                                       logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
                                       bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr,
                                       top_ptr,
                                       stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                                       t, rep, freq, pres, ban, blo, bhi,
                                       HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM,
                                       BIAS_TABLE, HAS_DRY, DIGIT_BITS, SBLOCK, BLOCK)
    if act1:
        tl.store(rowf_ptr + row * _NRF + _RF_ZLO, thr1)


def mirostat_v1_pass(ctx) -> None:
    """Mirostat v1's ``zlo`` for the rows that use it."""
    _mirostat_v1_kernel[(ctx.B,)](*ctx.zargs(), ctx.mu, ctx.rowf, ctx.rowi, ctx.miro_top, *ctx.zstrides(),
                                  *ctx.zsizes_row(), **ctx.zflags(), DIGIT_BITS=ctx.DIGIT_BITS, SBLOCK=ctx.SBLOCK,
                                  BLOCK=ctx.BLOCK)
