"""Ranks and top-N logprobs (docs/semantics.md §6) without a ``(B, V)`` logprob tensor, one program per row.

Every logprob mode is a monotone function of a per-id value (`select.select_value` with ``KIND_LP``: the raw logit,
``z``, or ``z`` on the kept set and ``-inf`` elsewhere for ``final``), so for a row

- the top-N is a radix select of the N-th largest value, then one pass that compacts the ids strictly above it
  (fewer than N, in id order) and the ids tied at it (lowest ids first) into the row's small scratch, and an
  ordering of those few by (value desc, id asc) in registers;
- the rank is ``1 +`` the number of values strictly above the drawn token's, counted in the same pass.

In a batch of the candidate engine (`candidates`), the row passes left the maximum of every group of ids (of ``z``,
and of the raw logits when some row wants raw logprobs), and a row reads only the groups that can matter
(`_from_groups`): those whose maximum is above the token's value (the rank) or at least the N-th largest group
maximum (a lower bound on the N-th largest value: the top-N). The few values gathered there are sorted by (value
desc, id asc). A row falls back to the whole-row path (`_from_row`) when its bound is ``-inf`` (fewer groups with a
finite value than N), too many groups qualify, too many values reach the bound, or fewer than N do (a final kept set
smaller than N: ``-inf`` entries follow, lowest ids first). ``rowi[:, RI_LP_GROUPS]`` records the path taken.

The token's own logprob is written by `draw._finish_kernel`; this kernel runs after it, only when some row of the
batch wants logprobs (host flag), and writes ranks and the top-N outputs of every row (padding where off).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .candidates import kth_largest
from .columns import F_TEMPERATURE, I_LOGPROBS, I_LOGPROBS_MODE, I_TOP_LOGPROBS, MODE_FINAL, MODE_RAW, NF, NI
from .penalties import (
    NRF,
    NRI,
    RF_LS,
    RF_LS_KEPT,
    RF_LS_RAW,
    RF_M,
    RF_M_KEPT,
    RF_M_RAW,
    RF_RAWX,
    RF_ZX,
    RI_LP_GROUPS,
    RI_TOKEN,
    RI_VALID,
    bias_lower_bound,
    block_z,
    row_rho,
    row_scalars,
    slot_row,
    update_slot_state,
)
from .select import float_key, key_float, radix_select, select_value

LP_GROUPS = 256  # groups a row may read on the candidate path (else the whole row is read)
LP_CAP = 256  # values a row may gather for its top-N on the candidate path

_LP_GROUPS: tl.constexpr = tl.constexpr(LP_GROUPS)
_LP_CAP: tl.constexpr = tl.constexpr(LP_CAP)
_ID_MASK: tl.constexpr = tl.constexpr(0xFFFFFF)  # ids < 2^24 (docs/semantics.md §8): id ^ mask, the low key bits
_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_LS: tl.constexpr = tl.constexpr(RF_LS)
_RF_M_RAW: tl.constexpr = tl.constexpr(RF_M_RAW)
_RF_LS_RAW: tl.constexpr = tl.constexpr(RF_LS_RAW)
_RF_M_KEPT: tl.constexpr = tl.constexpr(RF_M_KEPT)
_RF_LS_KEPT: tl.constexpr = tl.constexpr(RF_LS_KEPT)
_RF_ZX: tl.constexpr = tl.constexpr(RF_ZX)
_RF_RAWX: tl.constexpr = tl.constexpr(RF_RAWX)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_RI_TOKEN: tl.constexpr = tl.constexpr(RI_TOKEN)
_RI_LP_GROUPS: tl.constexpr = tl.constexpr(RI_LP_GROUPS)


@triton.jit
def _logprobs_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                     bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                     rowf_ptr, rowi_ptr, gt_val_ptr,
                     gt_id_ptr, gmax_ptr, lps_ptr, lpsf_ptr,
                     ranks_ptr, top_ids_ptr, top_lps_ptr,
                     stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                     V, VC, E, N, NG,
                     HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                     HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                     SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                     HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                     BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                     HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                     HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                     KEPT: tl.constexpr,  # kept-set tests of the final mode (penalties.kept_mask)
                     DIGIT_BITS: tl.constexpr,  # key bits per select level
                     SBLOCK: tl.constexpr,  # ids per select step (the one-hot block is SBLOCK x 2^DIGIT_BITS)
                     BLOCK: tl.constexpr,  # ids per step of the rank / gather pass
                     UPDATE: tl.constexpr,  # the step's last kernel: update the slot's steps / counts
                     CAND: tl.constexpr,  # group maxima exist (candidate batch): read only the groups needed
                     RAW_GROUP: tl.constexpr,  # the raw logits' group maxima follow z's in gmax_ptr
                     GROUP: tl.constexpr,  # ids per group maximum
                     GB: tl.constexpr,  # groups read per step
                     GBLOCK: tl.constexpr,  # group maxima per step of the scans
                     K: tl.constexpr):  # power of two >= N: the row's scratch width
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    valid = tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0
    lp_on = (tl.load(iparams_ptr + srow * NI + I_LOGPROBS) != 0) & valid
    mode = tl.load(iparams_ptr + srow * NI + I_LOGPROBS_MODE)
    ntop = tl.where(lp_on, tl.load(iparams_ptr + srow * NI + I_TOP_LOGPROBS), 0)
    rf = rowf_ptr + row * _NRF
    vx = tl.where(mode == MODE_RAW, tl.load(rf + _RF_RAWX), tl.load(rf + _RF_ZX))
    kx = float_key(vx)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    m_mode = tl.where(mode == MODE_RAW, tl.load(rf + _RF_M_RAW),
                      tl.where(mode == MODE_FINAL, tl.load(rf + _RF_M_KEPT), tl.load(rf + _RF_M)))
    ls_mode = tl.where(mode == MODE_RAW, tl.load(rf + _RF_LS_RAW),
                       tl.where(mode == MODE_FINAL, tl.load(rf + _RF_LS_KEPT), tl.load(rf + _RF_LS)))
    final_greedy = (mode == MODE_FINAL) & (tl.load(fparams_ptr + srow * NF + F_TEMPERATURE) == 0.0)
    # the final mode's values are ordered by z on the kept set and reported at z' = z rho (dynamic temperature)
    vscale = 1.0
    if HAS_DYN:
        vscale = tl.where(mode == MODE_FINAL, row_rho(rowf_ptr, row), 1.0)
    done = lp_on & (ntop < 0)  # false, typed like lp_on: set where the group maxima finish the row
    if CAND:
        done = _from_groups(row, srow, lp_on, mode, ntop, vx, kx, m_mode, ls_mode, final_greedy,
                            logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr,
                            bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, rowf_ptr, rowi_ptr, gmax_ptr, lps_ptr, lpsf_ptr,
                            ranks_ptr, top_ids_ptr,
                            top_lps_ptr,
                            stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, N, NG,
                            t, rep, freq, pres, ban, blo, bhi,
                            HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                            KEPT, RAW_GROUP, GROUP, GB, GBLOCK, K, vscale, HAS_DYN)
    tl.store(rowi_ptr + row * _NRI + _RI_LP_GROUPS, done.to(tl.int32))
    if done == 0:
        _from_row(row, srow, lp_on, mode, ntop, kx, m_mode, ls_mode, final_greedy,
                  logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                  dry_ids_ptr, dry_vals_ptr,
                  rowf_ptr, rowi_ptr, gt_val_ptr, gt_id_ptr, ranks_ptr, top_ids_ptr, top_lps_ptr,
                  stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, N,
                  t, rep, freq, pres, ban, blo, bhi,
                  HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY, KEPT,
                  DIGIT_BITS, SBLOCK, BLOCK, K, vscale, HAS_DYN)
    if UPDATE:  # after this program's last read of the counts and the step (PackedBatch.update_state)
        tok = tl.load(rowi_ptr + row * _NRI + _RI_TOKEN)
        update_slot_state(srow, tok, valid, steps_ptr, counts_ptr, stride_c)


@triton.jit
def _from_row(row, srow, lp_on, mode, ntop, kx, m_mode, ls_mode, final_greedy,
              logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
              dry_ids_ptr, dry_vals_ptr,
              rowf_ptr, rowi_ptr, gt_val_ptr, gt_id_ptr, ranks_ptr, top_ids_ptr, top_lps_ptr,
              stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, N,
              t, rep, freq, pres, ban, blo, bhi,
              HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_ALLOWED: tl.constexpr,
              HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr, BIAS_TABLE: tl.constexpr,
              HAS_DRY: tl.constexpr,
              KEPT: tl.constexpr, DIGIT_BITS: tl.constexpr, SBLOCK: tl.constexpr, BLOCK: tl.constexpr,
              K: tl.constexpr, vscale, HAS_DYN: tl.constexpr):
    """Rank and top-N of one row from the whole row: a select of the ``ntop``-th largest value, then one pass."""
    # the ntop-th largest value of the row's logprob order
    sel = ntop > 0
    thr = radix_select(row, srow, ntop.to(tl.float32), sel, float("-inf"), 0.0, 0.0, 0.0, mode,
                       logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                       dry_ids_ptr, dry_vals_ptr,
                       rowf_ptr, rowi_ptr, stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V,
                       VC, E,
                       t, rep, freq, pres, ban, blo, bhi,
                       HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                       KEPT, 2,
                       False, DIGIT_BITS, SBLOCK)
    tk = float_key(thr)
    # one pass: the rank count, and the ids above / at the threshold compacted into the scratch
    n = tl.where(lp_on, VC, 0)
    above = tl.sum(tl.zeros((2,), tl.int32), 0)
    pg = tl.sum(tl.zeros((2,), tl.int32), 0)
    pe = tl.sum(tl.zeros((2,), tl.int32), 0)
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
        v, dom, w = select_value(row, offs, raw, z, V, float("-inf"), 0.0, 0.0, 0.0, mode, rowf_ptr, rowi_ptr, 2,
                                 KEPT)
        key = float_key(v)
        above += tl.sum((dom & (key > kx)).to(tl.int32), 0)
        g = tl.where(sel, dom & (key > tk), False)  # (scalar & block masks are not bool in the interpreter)
        e = tl.where(sel, dom & (key == tk), False)
        posg = pg + tl.cumsum(g.to(tl.int32), 0) - 1
        pose = pe + tl.cumsum(e.to(tl.int32), 0) - 1
        tl.store(gt_id_ptr + row * (2 * K) + posg, offs, mask=g & (posg < K))
        tl.store(gt_val_ptr + row * K + posg, v, mask=g & (posg < K))
        tl.store(gt_id_ptr + row * (2 * K) + K + pose, offs, mask=e & (pose < K))
        pg += tl.sum(g.to(tl.int32), 0)
        pe += tl.sum(e.to(tl.int32), 0)
    tl.store(ranks_ptr + row, tl.where(lp_on, above + 1, -1).to(tl.int64))
    tl.debug_barrier()  # the compacted ids were stored by other threads of this program
    # order the (fewer than ntop) ids above the threshold by (value desc, id asc); then the ties, lowest ids first
    i = tl.arange(0, K)
    gi = i < pg
    ids = tl.load(gt_id_ptr + row * (2 * K) + i, mask=gi, other=-1)
    vals = tl.load(gt_val_ptr + row * K + i, mask=gi, other=float("-inf"))
    before = (vals[None, :] > vals[:, None]) | ((vals[None, :] == vals[:, None]) & (ids[None, :] < ids[:, None]))
    rank = tl.sum((before & gi[None, :]).to(tl.int32), 1)
    hot = (rank[None, :] == i[:, None]) & gi[None, :]  # [position, element]
    id_p = tl.max(tl.where(hot, ids[None, :], -1), 1)
    v_p = tl.max(tl.where(hot, vals[None, :], float("-inf")), 1)
    q = i - pg
    eid = tl.load(gt_id_ptr + row * (2 * K) + K + q, mask=(i >= pg) & (q < pe) & (q < K), other=-1)
    take = i < tl.minimum(pg + pe, ntop)
    out_id = tl.where(take, tl.where(i < pg, id_p, eid), -1)
    out_v = tl.where(i < pg, v_p, thr)
    _store_top(row, i, out_id, out_v, m_mode, ls_mode, final_greedy, top_ids_ptr, top_lps_ptr, N, vscale, HAS_DYN)


@triton.jit
def _store_top(row, i, out_id, out_v, m_mode, ls_mode, final_greedy, top_ids_ptr, top_lps_ptr, N, vscale,
               HAS_DYN: tl.constexpr):
    """The row's top-N outputs: lp = (v - m) - ln s with the mode's log-normaliser (docs/semantics.md §6; with
    ``HAS_DYN`` ``v`` scaled by ``vscale``, ``rho`` in the final mode); final greedy rows 0 / -inf; padding (id -1)
    NaN."""
    if HAS_DYN:
        out_v = out_v * vscale
    lp = tl.where(final_greedy, tl.where(out_v > float("-inf"), 0.0, float("-inf")), (out_v - m_mode) - ls_mode)
    lp = tl.where(out_id >= 0, lp, float("nan"))
    tl.store(top_ids_ptr + row * N + i, out_id.to(tl.int64), mask=i < N)
    tl.store(top_lps_ptr + row * N + i, lp, mask=i < N)


@triton.jit
def _from_groups(row, srow, lp_on, mode, ntop, vx, kx, m_mode, ls_mode, final_greedy,
                 logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr,
                 dry_ids_ptr, dry_vals_ptr,
                 rowf_ptr, rowi_ptr, gmax_ptr, lps_ptr, lpsf_ptr, ranks_ptr, top_ids_ptr, top_lps_ptr,
                 stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, N, NG,
                 t, rep, freq, pres, ban, blo, bhi,
                 HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                 HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr,
                 BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr, KEPT: tl.constexpr, RAW_GROUP: tl.constexpr,
                 GROUP: tl.constexpr,
                 GB: tl.constexpr, GBLOCK: tl.constexpr, K: tl.constexpr, vscale, HAS_DYN: tl.constexpr):
    """Rank and top-N of one row from the groups that can hold them; returns whether it did (else nothing is
    written and the caller reads the whole row).

    The group maxima of the mode's value (the raw logits for ``raw``; ``z`` otherwise, which bounds ``final``'s value
    from above) say which groups to read: the rank counts the values above the token's, all in groups whose maximum
    is above it; the top-N are the values at or above the ``ntop``-th largest group maximum (a lower bound on the
    ``ntop``-th largest value, by the argument of `candidates`). A row finishes here when its bound is finite, at
    most ``LP_GROUPS`` groups qualify and at most ``LP_CAP`` values reach the bound."""
    gp = gmax_ptr + row * NG
    if RAW_GROUP:
        gp = gp + tl.where(mode == MODE_RAW, tl.num_programs(0) * NG, 0)
    bound = kth_largest(gp, NG, ntop, lp_on & (ntop > 0), GBLOCK)
    # the groups to read, listed in the row's scratch (ascending)
    glist = lps_ptr + row * (_LP_GROUPS + 2 * _LP_CAP)
    nl = ntop * 0
    for start in range(0, tl.where(lp_on, NG, 0), GBLOCK):
        o = start + tl.arange(0, GBLOCK)
        g = tl.load(gp + o, mask=o < NG, other=float("-inf"))
        # (a scalar & a block mask is not bool in the interpreter: tl.where)
        live = (o < NG) & ((float_key(g) > kx) | tl.where(ntop > 0, g >= bound, False))
        pos = nl + tl.cumsum(live.to(tl.int32), 0) - 1
        tl.store(glist + pos, o, mask=live & (pos < _LP_GROUPS))
        nl += tl.sum(live.to(tl.int32), 0)
    ok = lp_on & ((ntop == 0) | (bound > float("-inf"))) & (nl <= _LP_GROUPS)
    tl.debug_barrier()  # the list was stored by other threads of this program
    gid_ptr = glist + _LP_GROUPS
    gval_ptr = lpsf_ptr + row * (_LP_GROUPS + 2 * _LP_CAP) + _LP_GROUPS + _LP_CAP
    above = ntop * 0
    ng = ntop * 0
    lane = tl.arange(0, GROUP)
    for i in range(0, tl.where(ok, nl, 0), GB):
        q = i + tl.arange(0, GB)
        grp = tl.load(glist + q, mask=q < nl, other=0)
        offs = tl.where((q < nl)[:, None], grp[:, None] * GROUP + lane[None, :], VC)  # past VC: not read
        lo_id = tl.min(tl.where(q < nl, grp, NG), 0) * GROUP
        hi_id = tl.max(tl.where(q < nl, grp, 0), 0) * GROUP + GROUP
        ep = blo
        if HAS_BIAS:
            ep = bias_lower_bound(bias_ids_ptr, blo, bhi, lo_id)
        raw, z, b, ep = block_z(row, srow, offs, ep, hi_id, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr,
                               eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l, stride_c,
                               stride_p, stride_a, stride_m,
                               stride_bt, stride_d, V, VC, E, t, rep, freq, pres, ban, bhi,
                               HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                               HAS_DRY)
        v, dom, w = select_value(row, offs, raw, z, V, float("-inf"), 0.0, 0.0, 0.0, mode, rowf_ptr, rowi_ptr, 2,
                                 KEPT)
        dom = dom & (offs < VC)
        above += tl.sum(tl.sum((dom & (float_key(v) > kx)).to(tl.int32), 1), 0)
        gat = tl.reshape(dom & tl.where(ntop > 0, v >= bound, False), (GB * GROUP,))
        pos = ng + tl.cumsum(gat.to(tl.int32), 0) - 1
        tl.store(gid_ptr + pos, tl.reshape(offs, (GB * GROUP,)), mask=gat & (pos < _LP_CAP))
        tl.store(gval_ptr + pos, tl.reshape(v, (GB * GROUP,)), mask=gat & (pos < _LP_CAP))
        ng += tl.sum(gat.to(tl.int32), 0)
    # fewer than ntop gathered (final mode, a kept set smaller than ntop): -inf entries follow, lowest ids first,
    # which the whole-row path finds
    ok = ok & (ng <= _LP_CAP) & (ng >= ntop)
    if ok:
        tl.debug_barrier()  # the gathered pairs were stored by other threads of this program
        tl.store(ranks_ptr + row, (above + 1).to(tl.int64))
        # the gathered values by (value desc, id asc): one int64 key each, the top ntop first
        j = tl.arange(0, _LP_CAP)
        gj = j < ng
        ids = tl.load(gid_ptr + j, mask=gj, other=0)
        key = tl.where(gj, (float_key(tl.load(gval_ptr + j, mask=gj, other=0.0)) << 24) | (ids ^ _ID_MASK).to(tl.int64),
                       -1)
        key = tl.sort(key, descending=True)
        r = tl.arange(0, K)
        hot = r[:, None] == j[None, :]
        kr = tl.max(tl.where(hot, key[None, :], -1), 1)
        take = (r < ntop) & (kr >= 0)
        out_id = tl.where(take, (kr & _ID_MASK) ^ _ID_MASK, -1)
        out_v = key_float(tl.maximum(kr, 0) >> 24)
        _store_top(row, r, out_id, out_v, m_mode, ls_mode, final_greedy, top_ids_ptr, top_lps_ptr, N, vscale,
                   HAS_DYN)
    return ok


def logprobs_pass(ctx, ranks, top_ids, top_lps) -> None:
    """Ranks (B,) int64 and the top-N ids (B, N) int64 / logprobs (B, N) float32 of every row."""
    n = int(top_ids.shape[1])
    _logprobs_kernel[(ctx.B,)](*ctx.zargs(), ctx.rowf, ctx.rowi, ctx.lp_val, ctx.lp_id, ctx.gmax, ctx.lp_scratch,
                               ctx.lp_scratch.view(torch.float32),
                               ranks, top_ids, top_lps, *ctx.zstrides(), *ctx.zsizes_row(), n, ctx.NG, **ctx.zflags(),
                               KEPT=ctx.kept, DIGIT_BITS=ctx.DIGIT_BITS, SBLOCK=ctx.SBLOCK, BLOCK=ctx.BLOCK,
                               K=ctx.K, UPDATE=ctx.update, CAND=ctx.lp_cand, RAW_GROUP=ctx.lp_cand and ctx.need_raw,
                               GROUP=ctx.GROUP, GB=max(1, 1024 // ctx.GROUP), GBLOCK=ctx.GBLOCK)
