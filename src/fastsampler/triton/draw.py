"""Stage F: the two-level exponential race of docs/semantics.md §3 F with the Philox noise of §7.

One program per row: the tile race over the per-tile weights ``W_t`` of the kept set (stream-1 noise, ``j`` = tile
index), then the token race ``z_i - ln E_i`` (stream-0 noise, ``j`` = id) over the kept ids of the winning tile only.
Ties go to the lowest tile / id. Greedy rows take the argmax, invalid rows ``-1``. The kernel also writes the
row's kept-set log-normaliser (as the max and the ``ln`` of the sum) and the drawn token's ``z`` and raw logit (for
logprobs and the mirostat update).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .penalties import NRF, NRI, RF_LS_KEPT, RF_M_KEPT, RF_RAWX, RF_ZX, RI_GID, RI_TOKEN, RI_VALID, kept_mask, row_z
from .philox import neg_log_exp_noise, philox_word, seed_key

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M_KEPT: tl.constexpr = tl.constexpr(RF_M_KEPT)
_RF_LS_KEPT: tl.constexpr = tl.constexpr(RF_LS_KEPT)
_RF_ZX: tl.constexpr = tl.constexpr(RF_ZX)
_RF_RAWX: tl.constexpr = tl.constexpr(RF_RAWX)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_TOKEN: tl.constexpr = tl.constexpr(RI_TOKEN)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _draw_kernel(logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
                 rowf_ptr, tile_w_ptr, seeds_ptr, steps_ptr, seqs_ptr,
                 stride_l, stride_b, stride_c, stride_p, stride_a,
                 V, VC, E, NC, NT,
                 HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                 HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                 HAS_TYP: tl.constexpr,  # some row uses typical-p: the kept test includes s <= s_thr
                 SPLIT: tl.constexpr,  # chunks per tile in tile_w (TILE / CHUNK)
                 BT: tl.constexpr,  # power of two >= NT: all tile weights in one block
                 BLOCK: tl.constexpr, TILE: tl.constexpr):  # ids per loop step; ids per tile (4096)
    row = tl.program_id(0).to(tl.int64)
    valid = tl.load(rowi_ptr + row * _NRI + _RI_VALID)
    gid = tl.load(rowi_ptr + row * _NRI + _RI_GID)
    # per-tile weights (max, sum) from the per-chunk ones, then the kept-set log-normaliser as (max m, ln s): a
    # log-probability is (z - m) - ln s, never z - (m + ln s) (docs/semantics.md §6)
    t = tl.arange(0, BT)
    tm = t < NT
    c = t[:, None] * SPLIT + tl.arange(0, SPLIT)[None, :]
    cm = c < NC
    m_ch = tl.load(tile_w_ptr + (row * NC + c) * 3 + 0, mask=cm, other=float("-inf"))
    s_ch = tl.load(tile_w_ptr + (row * NC + c) * 3 + 1, mask=cm, other=0.0)
    mt = tl.max(m_ch, 1)
    mts = tl.where(mt == float("-inf"), 0.0, mt)
    st = tl.sum(tl.where(m_ch == float("-inf"), 0.0, s_ch * tl.exp(m_ch - mts[:, None])), 1)
    m = tl.max(mt, 0)
    safe = tl.where(m == float("-inf"), 0.0, m)
    ls_kept = tl.log(tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - safe)), 0))
    tl.store(rowf_ptr + row * _NRF + _RF_M_KEPT, m)
    tl.store(rowf_ptr + row * _NRF + _RF_LS_KEPT, ls_kept)
    # tile race: argmax over tiles with W_t > 0 of ln W_t - ln E'_t
    k0, k1 = seed_key(tl.load(seeds_ptr + row))
    step = (tl.load(steps_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    seq = (tl.load(seqs_ptr + row) & 0xFFFFFFFF).to(tl.uint32)
    r = philox_word(t.to(tl.uint32), step, seq, 1, k0, k1)
    live = tm & (st > 0.0) & (mt > float("-inf"))
    score = tl.where(live, mt + tl.log(tl.where(live, st, 1.0)) + neg_log_exp_noise(r), float("-inf"))
    best = tl.max(score, 0)
    tstar = tl.min(tl.where(live & (score == best), t, _BIG), 0)
    # token race inside the winning tile
    sample = (valid != 0) & (gid < 0) & (tstar < NT)
    base = tl.where(sample, tstar, 0) * TILE
    n = tl.where(sample, tl.minimum(TILE, VC - base), 0)
    tok = -1
    tbest = float("-inf")
    for start in range(0, n, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        raw, z, b = row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                          rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                          HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
        keep = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, HAS_TYP) & (offs < V)
        rr = philox_word(offs.to(tl.uint32), step, seq, 0, k0, k1)
        sc = tl.where(keep, z + neg_log_exp_noise(rr), float("-inf"))
        bm = tl.max(sc, 0)
        bidx = tl.min(tl.where(keep & (sc == bm), offs, _BIG), 0)
        better = bm > tbest
        tok = tl.where(better, bidx, tok)
        tbest = tl.where(better, bm, tbest)
    tok = tl.where(valid == 0, -1, tl.where(gid >= 0, gid, tok))
    tl.store(rowi_ptr + row * _NRI + _RI_TOKEN, tok)
    # the drawn token's z and raw logit
    lane = tl.arange(0, 2)
    xo = tl.where(tok >= 0, tok, 0) + lane
    raw, z, b = row_z(row, xo, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr,
                      rowi_ptr, stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
                      HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS)
    tl.store(rowf_ptr + row * _NRF + _RF_ZX, tl.max(tl.where(lane == 0, z, float("-inf")), 0))
    tl.store(rowf_ptr + row * _NRF + _RF_RAWX, tl.max(tl.where(lane == 0, raw, float("-inf")), 0))


def draw(ctx) -> None:
    """Draw one token per row into ``rowi[:, RI_TOKEN]`` from the kept set and the tile weights ``ctx.tile_w``."""
    _draw_kernel[(ctx.B,)](*ctx.zargs(), ctx.rowf, ctx.tile_w, ctx.seeds, ctx.steps, ctx.seqs, *ctx.zstrides(),
                           *ctx.zsizes(), ctx.NT, **ctx.zflags(), HAS_TYP=ctx.has_typ, SPLIT=ctx.TILE // ctx.CHUNK,
                           BT=ctx.BT_TILES, BLOCK=ctx.BLOCK, TILE=ctx.TILE)
