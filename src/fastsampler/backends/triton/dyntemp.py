"""Dynamic temperature (docs/semantics.md §3 D): each row's temperature ``T'`` from the entropy of ``softmax(l)`` at
temperature 1 over its finite logits after stages A–C (DRY included), before any pass that needs ``z``.

Two launches, only when some row uses it (``BatchFlags.any_dynatemp``), before `stats._stats_kernel`:

- `_dyn_stats_kernel` (row pass, ``(B, NC)``): per chunk of a dynamic-temperature row the max ``m_c``, the sum
  ``s_c = sum e^(l - m_c)``, the entropy sum ``w_c = sum e^(l - m_c)(l - m_c)`` and the finite count, into the chunk
  partials ``part_f`` / ``part_i`` (the stats pass overwrites them next);
- `_dyn_temp_kernel` (one program per row): the partials merged in a fixed order in float64,
  ``H = ln s - w / s``, ``T' = T_min + (T_max - T_min) (H / ln n)^kappa`` (``n = 1``: ``T``), floored at the
  smallest normal float32, into the row-indexed ``(B,)`` scratch ``temps``; the other rows get their own ``T``
  (greedy rows 0). Every later pass reads its temperature there (`penalties.row_scalars` with ``HAS_DYN``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import F_DYN_EXP, F_DYN_RANGE, F_TEMPERATURE, NF
from .penalties import P_M, P_NFIN, P_S, P_W, PF, PI, bias_lower_bound, block_z, row_scalars, slot_row

_PF: tl.constexpr = tl.constexpr(PF)
_PI: tl.constexpr = tl.constexpr(PI)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_P_W: tl.constexpr = tl.constexpr(P_W)
_P_NFIN: tl.constexpr = tl.constexpr(P_NFIN)
_FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32 (docs/semantics.md §5)


@triton.jit
def _dyn_stats_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr,
                      bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr,
                      slot_ptr, temp_ptr, part_f_ptr, part_i_ptr,
                      stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                      V, VC, E, NC,
                      HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                      HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                      SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                      HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                      BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                      HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                      HAS_DYN: tl.constexpr,  # (always set here; this pass reads l at temperature 1)
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    act = (tl.load(fparams_ptr + srow * NF + F_DYN_RANGE) > 0.0) & (temp > 0.0)
    n = tl.where(act, tl.minimum(CHUNK, VC - base), 0)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE, temp_ptr, False)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
    m = float("-inf")
    s = 0.0
    w = 0.0
    nf = 0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        # temperature 1: l after stages A–C (DRY included)
        raw, z, b, ep = block_z(row, srow, offs, ep, base + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                               allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                               stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, 1.0, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        zf = tl.where(b, float("-inf"), z)
        nm = tl.maximum(m, tl.max(zf, 0))
        safe = tl.where(nm == float("-inf"), 0.0, nm)
        sc = tl.exp(m - safe)
        e = tl.exp(zf - safe)
        # sum e (l - nm), rescaled as the max grows (stats._entropy_kernel's recurrence; 0 · ln 0 = 0)
        w = tl.where(sc > 0.0, sc * (w + tl.where(m == float("-inf"), 0.0, m - safe) * s), 0.0) + tl.sum(
            tl.where(e > 0.0, e * (zf - safe), 0.0), 0)
        s = s * sc + tl.sum(e, 0)
        m = nm
        nf += tl.sum((zf > float("-inf")).to(tl.int32), 0)
    o = part_f_ptr + (row * NC + chunk) * _PF
    tl.store(o + _P_M, m)
    tl.store(o + _P_S, s)
    tl.store(o + _P_W, w)
    tl.store(part_i_ptr + (row * NC + chunk) * _PI + _P_NFIN, nf)


@triton.jit
def _dyn_temp_kernel(fparams_ptr, slot_ptr, part_f_ptr, part_i_ptr, temps_ptr, NC,
                     SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                     BT: tl.constexpr):  # power of two >= NC: all chunk partials in one block
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    dr = tl.load(fparams_ptr + srow * NF + F_DYN_RANGE)
    kappa = tl.load(fparams_ptr + srow * NF + F_DYN_EXP).to(tl.float64)
    act = (dr > 0.0) & (temp > 0.0)
    c = tl.arange(0, BT)
    cm = tl.where(act, c < NC, False)  # (a scalar & a block mask is not bool in the interpreter)
    o = part_f_ptr + (row * NC + c) * _PF
    mt = tl.load(o + _P_M, mask=cm, other=float("-inf"))
    st = tl.load(o + _P_S, mask=cm, other=0.0).to(tl.float64)
    wt = tl.load(o + _P_W, mask=cm, other=0.0).to(tl.float64)
    n = tl.sum(tl.load(part_i_ptr + (row * NC + c) * _PI + _P_NFIN, mask=cm, other=0), 0)
    mx = tl.max(mt, 0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    d = tl.where(mt == float("-inf"), 0.0, mt - safe).to(tl.float64)
    sc = tl.where(mt == float("-inf"), 0.0, tl.exp(d))
    s = tl.sum(st * sc, 0)
    w = tl.sum(tl.where(sc > 0.0, sc * (wt + d * st), 0.0), 0)
    # H = -sum q ln q = ln s - sum e^(l - m)(l - m) / s (float64; rounding may leave it a hair below 0)
    h = tl.maximum(tl.log(tl.where(s > 0.0, s, 1.0)) - w / tl.where(s > 0.0, s, 1.0), 0.0)
    nn = tl.maximum(n, 2).to(tl.float64)
    x = h / tl.log(nn)
    # x^kappa with x^0 = 1 (0^0 included) and 0^kappa = 0 for kappa > 0
    pw = tl.where(kappa == 0.0, 1.0, tl.where(x > 0.0, tl.exp(kappa * tl.log(tl.where(x > 0.0, x, 1.0))), 0.0))
    t64 = temp.to(tl.float64)
    d64 = dr.to(tl.float64)
    tmin = tl.maximum(t64 - d64, 0.0)
    tmax = t64 + d64
    tdyn = tl.maximum(tmin + (tmax - tmin) * pw, _FLT_MIN)
    tdyn = tl.where(n >= 2, tdyn, t64)  # n = 1 (or no finite logit, an invalid row): T' = T
    tl.store(temps_ptr + row, tl.where(act, tdyn.to(tl.float32), temp))


def dyn_pass(ctx) -> None:
    """Every row's temperature into ``ctx.temps`` (row-indexed): ``T'`` for the dynamic-temperature rows, ``T`` for
    the others. Two launches: the chunk partials of ``l`` at temperature 1, then one program per row."""
    _dyn_stats_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.part_f, ctx.part_i, *ctx.zstrides(), *ctx.zsizes(),
                                       **ctx.zflags(), BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)
    _dyn_temp_kernel[(ctx.B,)](ctx.fparams, ctx.slots, ctx.part_f, ctx.part_i, ctx.temps, ctx.NC,
                               SLOTS=ctx.slot_mode, BT=ctx.BT)
