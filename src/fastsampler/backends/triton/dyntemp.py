"""Dynamic temperature (docs/semantics.md §3 E, after the rules): the kept set ``S``'s own temperature ``T'`` from
the entropy of ``softmax(l)`` over ``S`` (``l = z T``, temperature 1), and the kept values ``z' = z rho`` with
``rho = T / T'`` that the draw, the final logprobs, ``sampling_probs`` and the Mirostat update use.

Truncation and processed logprobs keep the base temperature ``T``: every pass before the kept set is known computes
``z = l / T`` as in a batch without it. ``rho`` is stored per row (``rowf[:, RF_RHO]``, 1 on the other rows) and
applied where kept values become weights, race scores, final logprobs, probabilities or the Mirostat surprise
(``HAS_DYN``, a constexpr: a batch without dynamic temperature compiles none of it).

The entropy's chunk partials (`dyn_fold`: per chunk the max ``m_c`` of the kept ``z``, ``s_c = sum e^(T(z - m_c))``,
``w_c = sum e^(T(z - m_c)) T(z - m_c)``, the count; ``part_d``) come from the pass that last read the kept set:
`stats._kept_kernel` on the select path (re-run after `xtc` when some row may use XTC), `stats._stats_kernel` for a
batch without truncation (the kept set is every finite ``z``). Then `_dyn_weights_kernel` (row pass, ``(B, NC)``):
each program merges its row's partials in a fixed order in float64 (`dyn_combine`, so every program of a row gets
the same ``rho``; the chunk-0 program stores it), ``H = ln s - w / s``,
``T' = T_min + (T_max - T_min) (H / ln n)^kappa`` (``n = 1``: ``T``) floored at the smallest normal float32
(`dyn_rho`), and the chunk's kept weights at ``z'``, which replace the chunk partials `draw._finish_kernel` draws
from. One launch beyond the kept pass (two with XTC in the batch, three on the plain path: the combine of the row
statistics, which the finishing kernel otherwise does itself). The candidate engine (`candidates._trunc_kernel`)
computes ``H`` and the weights at ``z'`` on its sorted buffer, or on its exact fallback with `row_entropy` and
`xtc.kept_tile_weights`: no launch.

A kept ``z'`` that overflows to ``-inf`` leaves the kept set (`penalties.kept_mask` bit 4); one that overflows to
``+inf`` (the kept maximum) makes the row invalid, which `draw._finish_kernel` decides from the kept maximum.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import F_DYN_EXP, F_DYN_RANGE, F_TEMPERATURE, NF
from .penalties import (
    NRF,
    NRI,
    P_DM,
    P_DN,
    P_DS,
    P_DW,
    P_M,
    P_S,
    PD,
    PF,
    RF_RHO,
    RI_VALID,
    bias_lower_bound,
    block_z,
    kept_mask,
    online_lse,
    row_scalars,
    slot_row,
)

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_RHO: tl.constexpr = tl.constexpr(RF_RHO)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_PF: tl.constexpr = tl.constexpr(PF)
_PD: tl.constexpr = tl.constexpr(PD)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_P_DM: tl.constexpr = tl.constexpr(P_DM)
_P_DS: tl.constexpr = tl.constexpr(P_DS)
_P_DW: tl.constexpr = tl.constexpr(P_DW)
_P_DN: tl.constexpr = tl.constexpr(P_DN)
_FLT_MIN: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32 (docs/semantics.md §5)
_FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def dyn_fold(m, s, w, n, zk, t):
    """Fold the block ``zk`` (the kept ``z``, ``-inf`` elsewhere) into the running ``(m, s, w, n)``: the max of
    ``z``, ``s = sum e^(t (z - m))``, ``w = sum e^(t (z - m)) t (z - m)`` (rescaled as the max grows; a term whose
    weight underflows to 0 adds 0: ``0 ln 0 = 0``) and the count. With ``t = T`` these are the sums of
    ``softmax(l)``, ``l = z T``; with ``t = 1`` those of ``softmax(z)``."""
    nm = tl.maximum(m, tl.max(zk, 0))
    safe = tl.where(nm == float("-inf"), 0.0, nm)
    dm = t * (m - safe)  # -inf while nothing was folded
    sc = tl.exp(dm)
    d = t * (zk - safe)
    e = tl.exp(d)
    w = tl.where(sc > 0.0, sc * (w + tl.where(m == float("-inf"), 0.0, dm) * s), 0.0) + tl.sum(
        tl.where(e > 0.0, e * d, 0.0), 0)
    s = s * sc + tl.sum(e, 0)
    n += tl.sum((zk > float("-inf")).to(tl.int32), 0)
    return nm, s, w, n


@triton.jit
def dyn_combine(mt, st, wt, t):
    """The entropy ``H = ln s - w / s`` (float64, at least 0) of the per-chunk (or per-block) ``dyn_fold`` partials
    ``mt`` / ``st`` / ``wt`` (blocks; empty entries ``-inf`` / 0 / 0) merged in a fixed order at ``t``."""
    mx = tl.max(mt, 0)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    d = tl.where(mt == float("-inf"), 0.0, (mt.to(tl.float64) - safe.to(tl.float64)) * t.to(tl.float64))
    sc = tl.where(mt == float("-inf"), 0.0, tl.exp(d))
    st64 = st.to(tl.float64)
    s = tl.sum(st64 * sc, 0)
    w = tl.sum(tl.where(sc > 0.0, sc * (wt.to(tl.float64) + d * st64), 0.0), 0)
    ok = s > 0.0
    return tl.maximum(tl.log(tl.where(ok, s, 1.0)) - w / tl.where(ok, s, 1.0), 0.0)


@triton.jit
def dyn_rho(fparams_ptr, srow, act, h, n):
    """``rho = T / T'`` (float32) of a row whose kept set has ``n`` tokens and entropy ``h`` (float64) at temperature
    1; 1 where ``act`` is false or ``n <= 1`` (``T' = T``). ``T'`` in float64, floored at the smallest normal float32;
    ``rho`` capped at the largest finite float32 (so that ``0 rho = 0``)."""
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    dr = tl.load(fparams_ptr + srow * NF + F_DYN_RANGE)
    kappa = tl.load(fparams_ptr + srow * NF + F_DYN_EXP).to(tl.float64)
    nn = tl.maximum(n, 2).to(tl.float64)
    x = h / tl.log(nn)
    # x^kappa with x^0 = 1 (0^0 included) and 0^kappa = 0 for kappa > 0
    pw = tl.where(kappa == 0.0, 1.0, tl.where(x > 0.0, tl.exp(kappa * tl.log(tl.where(x > 0.0, x, 1.0))), 0.0))
    t64 = temp.to(tl.float64)
    d64 = dr.to(tl.float64)
    tmin = tl.maximum(t64 - d64, 0.0)
    tmax = t64 + d64
    tdyn = tl.maximum(tmin + (tmax - tmin) * pw, _FLT_MIN)
    rho = tl.minimum(t64 / tdyn, _FLT_MAX).to(tl.float32)
    return tl.where(act & (n >= 2), rho, 1.0)


@triton.jit
def row_entropy(row, srow, act, zlo, zhi, tt,
                logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                dry_ids_ptr, dry_vals_ptr,
                stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                t, rep, freq, pres, ban, blo, bhi,
                HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr,
                BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr, BLOCK: tl.constexpr):
    """`dyn_fold` at ``tt`` over the finite ``zlo <= z <= zhi`` of row ``row``, one pass in one program (reads
    nothing where ``act`` is false): ``(m, s, w, n)``, blocks merged in id order (the candidate engine's exact
    fallback: eta's survivors at ``tt = 1``, the dynamic temperature's kept set at ``tt = T``)."""
    m = float("-inf")
    s = 0.0
    w = 0.0
    cnt = tl.sum(tl.zeros((2,), tl.int32), 0)
    ep = blo
    for start in range(0, tl.where(act, VC, 0), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, start + BLOCK, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr,
                               tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l,
                               stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        keep = (z > float("-inf")) & (z >= zlo) & (z <= zhi)  # ids >= V have z = -inf
        m, s, w, cnt = dyn_fold(m, s, w, cnt, tl.where(keep, z, float("-inf")), tt)
    return m, s, w, cnt


@triton.jit
def _dyn_weights_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr,
                        bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr,
                        slot_ptr, rowf_ptr, rowi_ptr, part_f_ptr, part_d_ptr,
                        stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                        V, VC, E, NC,
                        HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                        HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                        SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                        HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                        BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                        HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                        HAS_DYN: tl.constexpr,  # (always set here)
                        KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC
                        BT: tl.constexpr,  # power of two >= NC: all chunk partials of the row in one block
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    act = ((tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0) & (temp > 0.0)
           & (tl.load(fparams_ptr + srow * NF + F_DYN_RANGE) > 0.0))
    # the row's kept-set entropy from its chunk partials, in a fixed order (every program of the row alike)
    c = tl.arange(0, BT)
    cm = tl.where(act, c < NC, False)  # (a scalar & a block mask is not bool in the interpreter)
    o = part_d_ptr + (row * NC + c) * _PD
    mt = tl.load(o + _P_DM, mask=cm, other=float("-inf"))
    st = tl.load(o + _P_DS, mask=cm, other=0.0)
    wt = tl.load(o + _P_DW, mask=cm, other=0.0)
    n = tl.sum(tl.load(o + _P_DN, mask=cm, other=0.0), 0).to(tl.int32)
    h = dyn_combine(mt, st, wt, temp)
    rho = dyn_rho(fparams_ptr, srow, act, h, n)
    if chunk == 0:
        tl.store(rowf_ptr + row * _NRF + _RF_RHO, rho)
    # the chunk's kept weights at z' = z rho (other rows keep the partials of the pass before)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
    m = float("-inf")
    s = 0.0
    for start in range(0, tl.where(act, tl.minimum(CHUNK, VC - base), 0), BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b, ep = block_z(row, srow, offs, ep, base + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                               allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr,
                               stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC,
                               E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT) & (offs < V)
        m, s = online_lse(m, s, tl.where(keep, z * rho, float("-inf")))
    if act:
        op = part_f_ptr + (row * NC + chunk) * _PF
        tl.store(op + _P_M, m)
        tl.store(op + _P_S, s)


def dyn_pass(ctx) -> None:
    """``rho`` of every row into ``ctx.rowf`` and the kept weights at ``z'`` of the dynamic-temperature rows into
    ``ctx.part_f``, from the ``part_d`` partials the last kept-set pass left (one row pass)."""
    _dyn_weights_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.part_f, ctx.part_d, *ctx.zstrides(),
                                         *ctx.zsizes(), **ctx.zflags(), KEPT=ctx.kept & 3, BT=ctx.BT,
                                         BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)


@triton.jit
def store_dyn_partials(part_d_ptr, row, chunk, NC, m, s, w, n):
    """A chunk's `dyn_fold` partials into ``part_d``."""
    o = part_d_ptr + (row * NC + chunk) * _PD
    tl.store(o + _P_DM, m)
    tl.store(o + _P_DS, s)
    tl.store(o + _P_DW, w)
    tl.store(o + _P_DN, n.to(tl.float32))
