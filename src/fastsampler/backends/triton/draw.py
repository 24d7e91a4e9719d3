"""Stage F and the step's outputs: the two-level exponential race of docs/semantics.md §3 F with the Philox noise
of §7, in one program per row (`_finish_kernel`).

The pass that last read the whole row (`stats._stats_kernel` for a batch without truncation, `stats._kept_kernel`
otherwise) left each chunk's kept-set weight ``(max, sum)``. Here the chunk weights are combined per 4096-id tile
into ``W_t``, the tile race ``argmax ln W_t - ln E'_t`` (stream-1 noise, ``j`` = tile index, ties to the lowest
tile) picks ``t*``, and the token race ``argmax z_i - ln E_i`` (stream-0 noise, ties to the lowest id) runs over the
kept ids of tile ``t*`` only: the program reads those 4096 ids again and recomputes their ``z`` and kept test as the
row passes did. Per-token noise is drawn for one tile of the row, never for the whole row. Greedy rows take the
argmax, invalid rows ``-1``.

The same program writes the outputs that need no other pass: tokens, validity, the token's logprob, the updated
Mirostat ``mu`` (docs/semantics.md §3 E, update), and the padding of ranks / top logprobs when the batch asks for
no logprobs; it also keeps the kept-set log-normaliser and the token's ``z`` / raw logit in ``rowf``. For a batch
without truncation (``STATS``) it first turns the stats partials into the row statistics, so such a batch runs two
kernels per step.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import (
    F_DYN_RANGE,
    F_MIRO_ETA,
    F_MIRO_TAU,
    F_TEMPERATURE,
    I_LOGPROBS,
    I_LOGPROBS_MODE,
    I_MIRO_MODE,
    MODE_FINAL,
    MODE_RAW,
    NF,
    NI,
)
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
    RI_GID,
    RI_TOKEN,
    RI_VALID,
    bias_lower_bound,
    block_z,
    kept_mask,
    row_rho,
    row_scalars,
    slot_row,
    update_slot_state,
)
from .philox import neg_log_exp_noise, philox_quads, philox_word, seed_key
from .stats import LN2, P_M, P_S, PF, stats_combine

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
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_TOKEN: tl.constexpr = tl.constexpr(RI_TOKEN)
_RI_VALID: tl.constexpr = tl.constexpr(RI_VALID)
_PF: tl.constexpr = tl.constexpr(PF)
_P_M: tl.constexpr = tl.constexpr(P_M)
_P_S: tl.constexpr = tl.constexpr(P_S)
_LN2: tl.constexpr = tl.constexpr(LN2)
_BIG: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def _finish_kernel(logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr, bias_indptr_ptr, bias_ids_ptr,
                   bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, fparams_ptr, iparams_ptr, steps_ptr, slot_ptr,
                   seeds_ptr, seqs_ptr, mu_ptr, rowf_ptr,
                   rowi_ptr, part_f_ptr, part_i_ptr, tokens_ptr, valid_ptr, logprobs_ptr, ranks_ptr, top_ids_ptr,
                   top_lps_ptr, mu_out_ptr, forced_ptr,
                   stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d,
                   V, VC, E, NC, NT, N,
                   HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr,
                   HAS_ALLOWED: tl.constexpr, HAS_EOS: tl.constexpr,  # which of stages A–C the batch uses
                   SLOTS: tl.constexpr,  # per-slot tables read through slot_ptr (PackedBatch.slot_index)
                   HAS_TBM: tl.constexpr,  # a per-row token bitmask, AND-ed with the allowed mask
                   BIAS_TABLE: tl.constexpr,  # logit bias from per-slot tables, not a CSR
                   HAS_DRY: tl.constexpr,  # some row has DRY penalties (dry_ids_ptr / dry_vals_ptr)
                   HAS_DYN: tl.constexpr,  # some row uses dynamic temperature (its kept values scaled by RF_RHO)
                   STATS: tl.constexpr,  # no truncation: the partials are the stats pass's, combine them here too
                   LOGPROBS: tl.constexpr,  # some row wants logprobs (ranks / top-N follow in logprobs.py)
                   MIRO: tl.constexpr,  # some row uses Mirostat: update mu
                   UPDATE: tl.constexpr,  # write mu (and steps / counts when LAST) back to the slot tables
                   LAST: tl.constexpr,  # no logprobs kernel follows: this is the step's last read of the state
                   KEPT: tl.constexpr,  # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC
                   RACE: tl.constexpr,  # some row samples: run the token race over the winning tile
                   FORCED: tl.constexpr,  # the rows' tokens are given (forced_ptr): no race, no argmax
                   SPLIT: tl.constexpr,  # chunks per tile (TILE / CHUNK)
                   TILE: tl.constexpr,  # ids per tile of the draw (docs/semantics.md §3 F)
                   BLOCK: tl.constexpr,  # ids per step of the token race, as (BLOCK / 4, 4) Philox quads
                   BT: tl.constexpr,  # power of two >= NC: every chunk in one block (STATS)
                   BT_TILES: tl.constexpr,  # power of two >= NT: every tile in one block
                   BN: tl.constexpr):  # power of two >= N: the top-logprob padding in one block
    row = tl.program_id(0).to(tl.int64)
    srow = slot_row(row, slot_ptr, SLOTS)
    if STATS:
        m, ls, valid, gid, nf, samp = stats_combine(row, srow, part_f_ptr, part_i_ptr, fparams_ptr, rowf_ptr, rowi_ptr,
                                                    NC, BT)
    else:
        valid = tl.load(rowi_ptr + row * _NRI + _RI_VALID) != 0
        gid = tl.load(rowi_ptr + row * _NRI + _RI_GID)
        m = tl.load(rowf_ptr + row * _NRF + _RF_M)
        ls = tl.load(rowf_ptr + row * _NRF + _RF_LS)
    # per-tile weights (max, sum) from the per-chunk ones, then the kept-set log-normaliser as (max m, ln s): a
    # log-probability is (z - m) - ln s, never z - (m + ln s) (docs/semantics.md §6)
    t = tl.arange(0, BT_TILES)
    c = t[:, None] * SPLIT + tl.arange(0, SPLIT)[None, :]
    cm = c < NC
    pc = part_f_ptr + (row * NC + c) * _PF
    m_ch = tl.load(pc + _P_M, mask=cm, other=float("-inf"))
    s_ch = tl.load(pc + _P_S, mask=cm, other=0.0)
    mt = tl.max(m_ch, 1)
    mts = tl.where(mt == float("-inf"), 0.0, mt)
    st = tl.sum(tl.where(m_ch == float("-inf"), 0.0, s_ch * tl.exp(m_ch - mts[:, None])), 1)
    mk = tl.max(mt, 0)
    safe = tl.where(mk == float("-inf"), 0.0, mk)
    ls_kept = tl.log(tl.sum(tl.where(mt == float("-inf"), 0.0, st * tl.exp(mt - safe)), 0))
    tl.store(rowf_ptr + row * _NRF + _RF_M_KEPT, mk)
    tl.store(rowf_ptr + row * _NRF + _RF_LS_KEPT, ls_kept)
    rho = 1.0
    if HAS_DYN:
        # the kept weights are at z' = z rho (dyntemp); a kept maximum z' that overflows (or a kept set whose every
        # z' overflows to -inf) makes the row invalid (docs/semantics.md §3 E, dynamic temperature)
        rho = row_rho(rowf_ptr, row)
        dyn_row = valid & (gid < 0) & (tl.load(fparams_ptr + srow * NF + F_DYN_RANGE) > 0.0)
        valid = valid & ((dyn_row == 0) | ((mk > float("-inf")) & (mk < float("inf"))))
        tl.store(rowi_ptr + row * _NRI + _RI_VALID, valid.to(tl.int32))
    # tile race: argmax over tiles with W_t > 0 of ln W_t - ln E'_t
    k0, k1 = seed_key(tl.load(seeds_ptr + srow))
    step = (tl.load(steps_ptr + srow) & 0xFFFFFFFF).to(tl.uint32)
    seq = (tl.load(seqs_ptr + srow) & 0xFFFFFFFF).to(tl.uint32)
    r = philox_word(t.to(tl.uint32), step, seq, 1, k0, k1)
    live = (t < NT) & (st > 0.0) & (mt > float("-inf"))
    score = tl.where(live, mt + tl.log(tl.where(live, st, 1.0)) + neg_log_exp_noise(r), float("-inf"))
    best = tl.max(score, 0)
    tstar = tl.min(tl.where(live & (score == best), t, _BIG), 0)
    # the token race over the kept ids of tile t* alone (the only tile that needs per-token noise): argmax of
    # z_i - ln E_i, ties to the lowest id; z is recomputed from the logits exactly as the row passes computed it
    t_, rep, freq, pres, ban, blo, bhi = row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr,
                                                     stride_bt, HAS_BIAS, HAS_EOS, BIAS_TABLE)
    sample = valid & (gid < 0) & (tstar < NT)
    tbase = tl.where(sample, tstar, 0) * TILE
    tn = tl.where(sample, tl.minimum(TILE, V - tbase), 0)  # ids >= V are never kept
    tok = _BIG
    if RACE:  # some row samples (an all-greedy batch compiles the token race out)
        ep = blo
        if HAS_BIAS:
            ep = bias_lower_bound(bias_ids_ptr, blo, bhi, tbase)
        R: tl.constexpr = BLOCK // 4
        quad = tl.arange(0, R)[:, None] * 4 + tl.arange(0, 4)[None, :]  # row i: the four ids of one Philox counter
        rbest = float("-inf")
        for start in range(0, tn, BLOCK):
            offs = tbase + start + quad
            raw, z, b, ep = block_z(row, srow, offs, ep, tbase + start + BLOCK, logits_ptr, counts_ptr, prompt_ptr,
                                   allowed_ptr, tbm_ptr, eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr,
                                   dry_vals_ptr, stride_l, stride_c,
                                   stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
                                   t_, rep, freq, pres, ban, bhi,
                                   HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE,
                                   HAS_DRY)
            if STATS:
                kl = (z > float("-inf")) & (offs < V)
            else:
                kl = kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT) & (offs < V)
            words = philox_quads((tbase + start) // 4, step, seq, 0, k0, k1, R)
            if HAS_DYN:
                z = z * rho
            ksc = tl.where(kl, z + neg_log_exp_noise(words), float("-inf"))
            bs = tl.max(tl.max(ksc, 1), 0)
            bi = tl.min(tl.min(tl.where(kl & (ksc == bs), offs, _BIG), 1), 0)
            better = bs > rbest  # ties keep the earlier block: the lowest id
            tok = tl.where(better, bi, tok)
            rbest = tl.where(better, bs, rbest)
    tok = tl.where(tok == _BIG, -1, tok)
    if FORCED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        tok = tl.load(forced_ptr + row)
    else:
        tok = tl.where(gid >= 0, gid, tok)
    tok = tl.where(valid, tok, -1)
    tl.store(rowi_ptr + row * _NRI + _RI_TOKEN, tok)
    # the drawn token's z and raw logit
    x0 = tl.where(tok >= 0, tok, 0)
    xo = x0 + tl.arange(0, 2)[None, :]  # a (1, 2) block: the token and its neighbour
    ep = blo
    if HAS_BIAS:
        ep = bias_lower_bound(bias_ids_ptr, blo, bhi, x0)
    raw, z, b, ep = block_z(row, srow, xo, ep, x0 + 2, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr,
                           eos_ptr, bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l, stride_c,
                           stride_p, stride_a, stride_m,
                           stride_bt, stride_d, V, VC, E,
                           t_, rep, freq, pres, ban, bhi,
                           HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY)
    lane0 = xo == x0
    zx = tl.max(tl.max(tl.where(lane0, z, float("-inf")), 1), 0)
    rawx = tl.max(tl.max(tl.where(lane0, raw, float("-inf")), 1), 0)
    tl.store(rowf_ptr + row * _NRF + _RF_ZX, zx)
    tl.store(rowf_ptr + row * _NRF + _RF_RAWX, rawx)
    # outputs
    tl.store(tokens_ptr + row, tok.to(tl.int64))
    tl.store(valid_ptr + row, valid.to(tl.int8))
    temp = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    greedy = temp == 0.0
    lp = float("nan")
    if LOGPROBS:
        lp_on = (tl.load(iparams_ptr + srow * NI + I_LOGPROBS) != 0) & valid
        mode = tl.load(iparams_ptr + srow * NI + I_LOGPROBS_MODE)
        m_raw = tl.load(rowf_ptr + row * _NRF + _RF_M_RAW)
        ls_raw = tl.load(rowf_ptr + row * _NRF + _RF_LS_RAW)
        # lp = (x - m) - ln s with (m, ln s) the mode's log-normaliser; x - (m + ln s) would lose ln s once |x| is
        # above ~1e8 in float32 (docs/semantics.md §6)
        m_mode = tl.where(mode == MODE_RAW, m_raw, tl.where(mode == MODE_FINAL, mk, m))
        ls_mode = tl.where(mode == MODE_RAW, ls_raw, tl.where(mode == MODE_FINAL, ls_kept, ls))
        vx = tl.where(mode == MODE_RAW, rawx, zx)
        if HAS_DYN:  # final logprobs at z' (processed ones at z)
            vx = tl.where(mode == MODE_FINAL, zx * rho, vx)
        lpv = tl.where((mode == MODE_FINAL) & greedy, 0.0, (vx - m_mode) - ls_mode)
        lp = tl.where(lp_on, lpv, float("nan"))
    else:
        tl.store(ranks_ptr + row, -1)
        j = tl.arange(0, BN)
        tl.store(top_ids_ptr + row * N + j, -1, mask=j < N)
        tl.store(top_lps_ptr + row * N + j, float("nan"), mask=j < N)
    tl.store(logprobs_ptr + row, lp)
    mu_in = tl.load(mu_ptr + srow)
    mu_out = mu_in
    if MIRO:
        mode_m = tl.load(iparams_ptr + srow * NI + I_MIRO_MODE)
        upd = valid & (temp > 0.0) & (mode_m != 0)
        eta = tl.load(fparams_ptr + srow * NF + F_MIRO_ETA)
        tau = tl.load(fparams_ptr + srow * NF + F_MIRO_TAU)
        # -log2 q'[x] with ln q'[x] = (z_x - m) - ln s over the kept set (docs/semantics.md §3 E, update)
        zxk = zx
        if HAS_DYN:
            zxk = zx * rho
        surprise = -((zxk - mk) - ls_kept) / _LN2
        mu_out = tl.where(upd, mu_in - eta * (surprise - tau), mu_in)
    tl.store(mu_out_ptr + row, mu_out)
    if UPDATE:  # the Sampler's state update (PackedBatch.update_state): every row's slot stores the returned mu
        tl.store(mu_ptr + srow, mu_out)
        if LAST:  # steps / counts are read again by the logprobs kernel, which then updates them itself
            update_slot_state(srow, tok, valid, steps_ptr, counts_ptr, stride_c)


def finish(ctx, out) -> None:
    """Draw one token per row and write the outputs ``out`` (tokens, valid int8, logprobs, ranks, top ids, top
    logprobs, mu), from the chunk partials the last row pass left."""
    tokens, valid, logprobs, ranks, top_ids, top_lps, mu_out = out
    n = int(top_ids.shape[1])
    forced = ctx.forced is not None
    _finish_kernel[(ctx.B,)](*ctx.zargs(), ctx.seeds, ctx.seqs, ctx.mu, ctx.rowf, ctx.rowi, ctx.part_f, ctx.part_i,
                             tokens, valid, logprobs, ranks, top_ids, top_lps, mu_out,
                             ctx.forced if forced else ctx.rowi, *ctx.zstrides(),
                             *ctx.zsizes(), ctx.NT, n, **ctx.zflags(), STATS=not (ctx.truncation or ctx.dyn),
                             LOGPROBS=ctx.flags.any_logprobs, MIRO=ctx.flags.any_mirostat,
                             UPDATE=ctx.update, LAST=not ctx.flags.any_logprobs,
                             KEPT=ctx.kept, RACE=not ctx.flags.all_greedy and not forced, FORCED=forced,
                             SPLIT=ctx.TILE // ctx.CHUNK,
                             TILE=ctx.TILE, BLOCK=ctx.BLOCK2, BT=ctx.BT, BT_TILES=ctx.BT_TILES,
                             BN=max(2, 1 << max(n - 1, 0).bit_length()))
