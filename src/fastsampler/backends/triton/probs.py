"""The distribution each row's token is drawn from, ``exp((z - m) - ln s)`` over the kept set and zero elsewhere, and
the kept set itself as a boolean mask (docs/semantics.md §3 E).

The mask is not derived from the probabilities: a kept token far below the maximum (``z = -200`` next to ``0``) has
float32 probability 0 but is kept.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .penalties import (
    NRF,
    NRI,
    RF_LS_KEPT,
    RF_M_KEPT,
    RI_GID,
    RI_VALID,
    bias_lower_bound,
    block_z,
    kept_mask,
    row_rho,
    row_scalars,
    slot_row,
)

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M_KEPT: tl.constexpr = tl.constexpr(RF_M_KEPT)
_RF_LS_KEPT: tl.constexpr = tl.constexpr(RF_LS_KEPT)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)


@triton.jit
def _probs_row_chunk(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                     bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                     rowf_ptr, rowi_ptr, out_ptr,
                     stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, stride_o,
                     V, VC, E,
                     HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                     HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr,
                 BIAS_TABLE: tl.constexpr, HAS_DRY: tl.constexpr, HAS_DYN: tl.constexpr, KEPT: tl.constexpr,
                     MASK: tl.constexpr,  # True: store the kept mask (int8 0 / 1) instead of the probability
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    n = tl.minimum(CHUNK, VC - base)
    valid = tl.load(rowi_ptr + row * _NRI + _RI_VALID)
    gid = tl.load(rowi_ptr + row * _NRI + _RI_GID)
    m = tl.load(rowf_ptr + row * _NRF + _RF_M_KEPT)
    ls = tl.load(rowf_ptr + row * _NRF + _RF_LS_KEPT)
    t, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                    stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, base)
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
        keep = tl.where(gid >= 0, offs == gid, keep)  # greedy rows: the argmax only
        keep = keep & (valid != 0)  # invalid rows: nothing
        if MASK:
            tl.store(out_ptr + row * stride_o + offs, keep.to(tl.int8), mask=offs < VC)
        else:
            # (z - m) - ln s, not z - (m + ln s), which loses ln s for large |z| (docs/semantics.md §6)
            if HAS_DYN:  # the kept values z' = z rho (dyntemp)
                z = z * row_rho(rowf_ptr, row)
            p = tl.where(keep, tl.exp((z - m) - ls), 0.0)
            p = tl.where(gid >= 0, tl.where(offs == gid, 1.0, 0.0), p)
            p = tl.where(valid != 0, p, 0.0)
            tl.store(out_ptr + row * stride_o + offs, p, mask=offs < VC)


@triton.jit
def _probs_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                  bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                  rowf_ptr, rowi_ptr, out_ptr,
                  stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, stride_o,
                  V, VC, E,
                  HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                  HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                  SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                  HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                  BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                  HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                  HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                  KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    _probs_row_chunk(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                     bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                     rowf_ptr, rowi_ptr, out_ptr,
                     stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, stride_o, V, VC, E,
                     HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                     HAS_DYN, KEPT,
                     False, BLOCK, CHUNK)


@triton.jit
def _kept_mask_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                      bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                      rowf_ptr, rowi_ptr, out_ptr,
                      stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, stride_o,
                      V, VC, E,
                      HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                      HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                      SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                      HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                      BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                      HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                      HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                      KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC
                      BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    _probs_row_chunk(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                     bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                     rowf_ptr, rowi_ptr, out_ptr,
                     stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, stride_o, V, VC, E,
                     HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY,
                     HAS_DYN, KEPT,
                     True, BLOCK, CHUNK)


def probs_pass(ctx, out) -> None:
    """Write each row's drawing distribution into ``out`` (B, VC) float32."""
    _probs_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, out, *ctx.zstrides(), out.stride(0),
                                   *ctx.zsizes_row(), **ctx.zflags(), KEPT=ctx.kept, BLOCK=ctx.BLOCK,
                                   CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)


def kept_mask_pass(ctx, out) -> None:
    """Write each row's kept set into ``out`` (B, VC) int8 (1 kept, 0 not; greedy rows: the argmax; invalid rows and
    padding columns: 0)."""
    _kept_mask_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, ctx.rowi, out, *ctx.zstrides(), out.stride(0),
                                       *ctx.zsizes_row(), **ctx.zflags(), KEPT=ctx.kept, BLOCK=ctx.BLOCK,
                                       CHUNK=ctx.CHUNK, num_warps=ctx.ROW_WARPS)
