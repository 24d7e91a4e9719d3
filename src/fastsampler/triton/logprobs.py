"""Logprobs without a ``(B, V)`` logprob tensor: the drawn token's rank and the top-N (id, logprob) pairs.

Every logprob mode is a monotone function of a per-id value (`select.select_value` with ``KIND_LP``: the raw logit,
``z``, or ``z`` on the kept set and ``-inf`` elsewhere), so

- the rank is ``1 +`` a count of values strictly above the drawn token's value (one ``(B, NC)`` pass);
- the top-N is a radix select of the N-th largest value, then a compaction of the ids strictly above it (fewer than
  N, in id order) and of the ids tied at it (lowest ids first) into small ``(B, N)`` buffers, then a stable sort of
  those few by value. The same gather serves Mirostat v1 (the 100 largest ``z``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .penalties import NRF, NRI, RF_RAWX, RF_ZX, RI_LP_MODE, RI_TOKEN, row_z
from .select import KIND_LP, float_key, radix_select, select_value

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_ZX: tl.constexpr = tl.constexpr(RF_ZX)
_RF_RAWX: tl.constexpr = tl.constexpr(RF_RAWX)
_RI_LP_MODE: tl.constexpr = tl.constexpr(RI_LP_MODE)
_RI_TOKEN: tl.constexpr = tl.constexpr(RI_TOKEN)


@triton.jit
def _rank_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                 rowf_ptr, active_ptr, out_ptr,
                 stride_l, stride_b, stride_c, stride_p, stride_a,
                 V, VC, E, NC,
                 HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                 HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                 HAS_TYP: tl.constexpr,  # some row uses typical-p (kept test of the final mode)
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    active = tl.load(active_ptr + row)
    n = tl.where(active != 0, tl.minimum(CHUNK, VC - base), 0)
    mode = tl.load(rowi_ptr + row * _NRI + _RI_LP_MODE)
    vx = tl.where(mode == 0, tl.load(rowf_ptr + row * _NRF + _RF_RAWX), tl.load(rowf_ptr + row * _NRF + _RF_ZX))
    kx = float_key(vx)
    c = 0
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        v, dom, w = select_value(row, offs, raw, z, V, rowf_ptr, rowi_ptr, 2, HAS_TYP)
        c += tl.sum((dom & (float_key(v) > kx)).to(tl.int32), 0)
    tl.store(out_ptr + row * NC + chunk, c)


@triton.jit
def _gather_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                   rowf_ptr, active_ptr, thr_ptr, gt_off_ptr, eq_off_ptr, gt_id_ptr, gt_val_ptr, eq_id_ptr,
                   stride_l, stride_b, stride_c, stride_p, stride_a,
                   V, VC, E, NC, K,
                   HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                   HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                   HAS_TYP: tl.constexpr,  # some row uses typical-p
                   KIND: tl.constexpr,  # what was selected (select.KIND_*)
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # ids per loop step; ids per program
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    base = chunk * CHUNK
    active = tl.load(active_ptr + row)
    n = tl.where(active != 0, tl.minimum(CHUNK, VC - base), 0)
    tk = float_key(tl.load(thr_ptr + row))
    pg = tl.load(gt_off_ptr + row * NC + chunk)
    pe = tl.load(eq_off_ptr + row * NC + chunk)
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        v, dom, w = select_value(row, offs, raw, z, V, rowf_ptr, rowi_ptr, KIND, HAS_TYP)
        key = float_key(v)
        g = dom & (key > tk)
        e = dom & (key == tk)
        posg = pg + tl.cumsum(g.to(tl.int32), 0) - 1
        pose = pe + tl.cumsum(e.to(tl.int32), 0) - 1
        tl.store(gt_id_ptr + row * K + posg, offs.to(tl.int64), mask=g & (posg < K))
        tl.store(gt_val_ptr + row * K + posg, v, mask=g & (posg < K))
        tl.store(eq_id_ptr + row * K + pose, offs.to(tl.int64), mask=e & (pose < K))
        pg += tl.sum(g.to(tl.int32), 0)
        pe += tl.sum(e.to(tl.int32), 0)


def rank_pass(ctx, active: torch.Tensor) -> torch.Tensor:
    """(B,) int64: 1 + the number of ids whose logprob is strictly above the drawn token's."""
    cnt = torch.empty((ctx.B, ctx.NC), dtype=torch.int32, device=ctx.device)
    _rank_kernel[(ctx.B, ctx.NC)](*ctx.zargs(), ctx.rowf, active, cnt, *ctx.zstrides(), *ctx.zsizes(),
                                  **ctx.zflags(), HAS_TYP=ctx.has_typ, BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK)
    return cnt.sum(1, dtype=torch.int64) + 1


def top_values(ctx, kind: int, k: torch.Tensor, active: torch.Tensor, width: int):
    """The ``k`` largest values per row of a select kind, ordered by (value desc, id asc).

    Parameters
    ----------
    kind : select.KIND_Z or select.KIND_LP
    k : (B,) int32 per-row count (<= width)
    active : (B,) int32 rows to compute
    width : output width K

    Returns
    -------
    ids (B, K) int64 (``-1`` past the row's count or the domain's size), values (B, K) float32 (``-inf`` there),
    and the per-row threshold value (B,) float32.
    """
    b, nt, dev = ctx.B, ctx.NC, ctx.device
    thr, tile_gt, tile_eq = radix_select(ctx, kind, k.to(torch.float32), active, gather=True)
    gt_off = torch.cumsum(tile_gt, 1, dtype=torch.int32) - tile_gt
    eq_off = torch.cumsum(tile_eq, 1, dtype=torch.int32) - tile_eq
    gt_id = torch.full((b, width), -1, dtype=torch.int64, device=dev)
    gt_val = torch.full((b, width), float("-inf"), dtype=torch.float32, device=dev)
    eq_id = torch.full((b, width), -1, dtype=torch.int64, device=dev)
    _gather_kernel[(b, nt)](*ctx.zargs(), ctx.rowf, active, thr, gt_off, eq_off, gt_id, gt_val, eq_id,
                            *ctx.zstrides(), *ctx.zsizes(), width, **ctx.zflags(), HAS_TYP=ctx.has_typ, KIND=kind,
                            BLOCK=ctx.BLOCK, CHUNK=ctx.CHUNK)
    n_gt = tile_gt.sum(1, dtype=torch.int64)
    n_eq = tile_eq.sum(1, dtype=torch.int64)
    sv, perm = torch.sort(gt_val, dim=1, descending=True, stable=True)
    sid = torch.gather(gt_id, 1, perm)
    pos = torch.arange(width, device=dev)[None, :]
    from_eq = pos >= n_gt[:, None]
    eq_idx = (pos - n_gt[:, None]).clamp(0, width - 1)
    ids = torch.where(from_eq, torch.gather(eq_id, 1, eq_idx), sid)
    vals = torch.where(from_eq, thr[:, None].expand(b, width), sv)
    take = (pos < torch.minimum(n_gt + n_eq, k.to(torch.int64))[:, None]) & (active[:, None] != 0)
    ids = torch.where(take, ids, -1)
    vals = torch.where(take, vals, float("-inf"))
    return ids, vals, thr


__all__ = ["rank_pass", "top_values", "KIND_LP"]
