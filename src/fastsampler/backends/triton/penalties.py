"""Stages A–D of docs/semantics.md §3 in registers: the processed logits ``z`` of a block of ids of one row.

Every pass of the pipeline recomputes ``z`` from the raw logits instead of materialising a ``(B, V)`` float32 copy:
the logits are read in their own dtype and upcast in registers; the sparse logit bias is read from the batch's CSR
(``bias_indptr`` / ``bias_ids`` / ``bias_vals``, ids ascending per row) and matched to the block in registers, so no
dense bias is ever built (nor a dense DRY penalty: the batch's ``(B, K)`` DRY table is matched the same way, after
the frequency and presence penalties); penalty state and bitmasks are read only when the batch uses them (constexpr
specialisation from the host-known `BatchFlags`), once per id and pass. The per-row scalars (temperature, penalties,
the EOS ban, the row's bias range) are loaded once per program (`row_scalars`).

Row state shared by the passes (the host allocates it, uninitialised; the first per-row kernel of a step writes every
column before any kernel reads it):

``rowf`` (B, NRF) float32 columns ``RF_*``; ``rowi`` (B, NRI) int32 columns ``RI_*``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .columns import (
    F_EPSILON,
    F_FREQ,
    F_MIN_P,
    F_NSIGMA,
    F_PRES,
    F_REP,
    F_TEMPERATURE,
    I_IGNORE_EOS,
    I_MIN_TOKENS,
    NF,
    NI,
)

# rowf columns. A log-normaliser is kept as a pair (max ``m``, ``ln s`` with ``s = sum exp(x - m)``) and a log-
# probability is formed as ``(x - m) - ln s``, never as ``x - (m + ln s)``: in float32, ``m + ln s`` drops ``ln s``
# once ``|m|`` is above ~1e8 (docs/semantics.md §6).
#   RF_M / RF_LS: the row's ``z`` (all finite tokens); RF_M_RAW / RF_LS_RAW: the raw logits (raw logprobs);
#   RF_M_KEPT / RF_LS_KEPT: ``z`` over the kept set (final logprobs, ``sampling_probs``, the Mirostat surprise);
#   RF_ZLO: keep ``z >= zlo``; RF_STHR: typical-p keeps ``s <= sthr``; RF_MS / RF_HC: the typical-p survivors' max
#   and mean distance ``sum q (m_s - z)`` (``s = |(m_s - z) - hc|``, see `typical_s`); RF_DOM_LO: the top-k
#   threshold (the domain of top-p, §3 E); RF_MK: the min_keep-th largest ``z`` (``m`` when min_keep is off);
#   RF_ZX / RF_RAWX: the drawn token's ``z`` and raw logit; RF_BOUND: the candidate bound of `candidates` (every
#   kept ``z`` is ``>= bound`` on a candidate row); RF_RHO: ``rho = T / T'`` of dynamic temperature (§3 E, after the
#   rules: the kept set's values are ``z' = z rho``; 1 on the other rows; written by `dyntemp` or
#   `candidates._trunc_kernel` and read only in a batch with dynamic temperature, ``HAS_DYN``); RF_SIGMA: the
#   population standard deviation of the finite ``z`` (top-n-sigma, written by `stats._combine_kernel` only when
#   some row uses it); RF_ZHI: XTC keeps ``z <= zhi`` (written by `xtc` only in a batch with XTC; read under the
#   ``KEPT`` bit 2).
(RF_M, RF_LS, RF_ZLO, RF_STHR, RF_MS, RF_HC, RF_M_RAW, RF_LS_RAW, RF_M_KEPT, RF_LS_KEPT, RF_DOM_LO, RF_ZX,
 RF_RAWX, RF_MK, RF_BOUND, RF_RHO, RF_SIGMA, RF_ZHI) = range(18)
NRF = 18
# rowi columns: validity (§5), the greedy token (-1 for sampled rows), the number of finite ``z``, the drawn token,
# the candidate count of `candidates` (-1 on a row that is not a candidate row), and the path of its logprobs
# (`logprobs`: 1 from the group maxima, 0 from the whole row)
RI_VALID, RI_GID, RI_NFIN, RI_TOKEN, RI_CCOUNT, RI_LP_GROUPS = range(6)
NRI = 6

# chunk partials of the row passes (stats.py): ``part_f`` (B, NC, PF) float32 slots (max, sum exp(x - max), raw max
# | entropy sum, raw sum | survivor count) and ``part_i`` (B, NC, PI) int32 slots (argmax, finite count, invalid
# count); with top-n-sigma on some row, ``part_x`` (B, NC, PX) float32 slots (mean and sum of squared deviations of
# the chunk's finite ``z``); with dynamic temperature, ``part_d`` (B, NC, PD) float32 slots over the chunk's kept
# ``z`` (`dyntemp.dyn_fold`: max ``m_c``, ``sum e^(T(z - m_c))``, ``sum e^(T(z - m_c)) T(z - m_c)``, count)
PF, PI, PX, PD = 4, 3, 2, 4
P_M, P_S, P_RM, P_RS = range(4)
P_W = P_RM
P_N = P_RS
P_AMAX, P_NFIN, P_BAD = range(3)
P_XMEAN, P_XM2 = range(2)
P_DM, P_DS, P_DW, P_DN = range(4)

EB = 8  # CSR logit-bias entries read at a time (independent loads, matched one by one)

_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_M: tl.constexpr = tl.constexpr(RF_M)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_STHR: tl.constexpr = tl.constexpr(RF_STHR)
_RF_MS: tl.constexpr = tl.constexpr(RF_MS)
_RF_HC: tl.constexpr = tl.constexpr(RF_HC)
_RF_RHO: tl.constexpr = tl.constexpr(RF_RHO)
_RF_SIGMA: tl.constexpr = tl.constexpr(RF_SIGMA)
_RF_ZHI: tl.constexpr = tl.constexpr(RF_ZHI)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_EB: tl.constexpr = tl.constexpr(EB)
_NO_ID: tl.constexpr = tl.constexpr(2147483647)


@triton.jit
def slot_row(row, slot_ptr, SLOTS: tl.constexpr):
    """The row of the per-slot tables (parameters, seeds, steps, seqs, ``mu``, masks, counts, bias tables) that
    batch row ``row`` reads: ``slot_index[row]`` in slot-indexed mode (``SLOTS``, `PackedBatch.slot_index`), else
    ``row``. Loaded once per program; row-indexed tensors (logits, token bitmask, outputs, scratch) keep ``row``."""
    if SLOTS:
        return tl.load(slot_ptr + row).to(tl.int64)
    else:
        return row


@triton.jit
def minp_threshold(fparams_ptr, srow, m, ls, sigma, NSIGMA: tl.constexpr):
    """The min-p stage of docs/semantics.md §3 E item 3 before min_keep: (active, threshold). min-p keeps
    ``z >= m + ln min_p``, epsilon ``z >= m + ln epsilon + ln s`` (``q >= epsilon`` in the whole distribution; ``m``,
    ``ln s``: the row's log-normaliser); with ``NSIGMA`` (some row uses top-n-sigma; ``sigma``: the row's standard
    deviation of ``z``, `nsigma_stat`) top-n-sigma ``z >= m - nu sigma``. Every active one applies: the largest
    threshold, at most ``m`` (the maximum is always kept: epsilon may exceed every probability)."""
    mp = tl.load(fparams_ptr + srow * NF + F_MIN_P)
    eps = tl.load(fparams_ptr + srow * NF + F_EPSILON)
    t_mp = tl.where(mp > 0.0, m + tl.log(tl.where(mp > 0.0, mp, 1.0)), float("-inf"))
    t_eps = tl.where(eps > 0.0, m + tl.log(tl.where(eps > 0.0, eps, 1.0)) + ls, float("-inf"))
    act = (mp > 0.0) | (eps > 0.0)
    thr = tl.maximum(t_mp, t_eps)
    if NSIGMA:
        nu = tl.load(fparams_ptr + srow * NF + F_NSIGMA)
        act = act | (nu > 0.0)
        thr = tl.maximum(thr, tl.where(nu > 0.0, m - nu * sigma, float("-inf")))
    return act, tl.minimum(thr, m)


@triton.jit
def nsigma_stat(rowf_ptr, row, NSIGMA: tl.constexpr):
    """The row's ``sigma`` for `minp_threshold`: from ``rowf`` with ``NSIGMA`` (`stats._combine_kernel` wrote it),
    else zero (unused)."""
    sigma = tl.load(rowf_ptr + row * _NRF + _RF_M) * 0.0
    if NSIGMA:
        sigma = tl.load(rowf_ptr + row * _NRF + _RF_SIGMA)
    return sigma


@triton.jit
def row_rho(rowf_ptr, row):
    """``rho = T / T'`` of the row (dynamic temperature, `dyntemp`; 1 on the other rows): read only with
    ``HAS_DYN``, after `dyntemp` or `candidates._trunc_kernel` wrote it."""
    return tl.load(rowf_ptr + row * _NRF + _RF_RHO)


@triton.jit
def row_scalars(row, srow, fparams_ptr, iparams_ptr, steps_ptr, bias_indptr_ptr, stride_bt,
                HAS_BIAS: tl.constexpr, HAS_EOS: tl.constexpr, BIAS_TABLE: tl.constexpr):
    """Per-row scalars of stages A–D, loaded once per program (``srow``: the row of the per-slot tables, see
    `slot_row`).

    Returns ``(t, rep, freq, pres, ban, blo, bhi)``: the temperature (1 for greedy rows, which stop after C; a
    dynamic temperature changes only the kept set's values, after the rules: `dyntemp`), the three penalties,
    whether the EOS ids are banned (``step mod 2^32 < min_tokens`` or ``ignore_eos``, §3 A) and the row's range
    ``[blo, bhi)`` of logit-bias entries: in the CSR (``bias_indptr_ptr`` row-indexed), or with ``BIAS_TABLE`` in
    the slot's row of the ``(S, K)`` tables (row stride ``stride_bt``; ``bias_indptr_ptr`` then holds the per-slot
    lengths).
    """
    t = tl.load(fparams_ptr + srow * NF + F_TEMPERATURE)
    t = tl.where(t > 0.0, t, 1.0)
    rep = tl.load(fparams_ptr + srow * NF + F_REP)
    freq = tl.load(fparams_ptr + srow * NF + F_FREQ)
    pres = tl.load(fparams_ptr + srow * NF + F_PRES)
    ban = row * 0
    if HAS_EOS:
        step = tl.load(steps_ptr + srow) & 0xFFFFFFFF
        mt = tl.load(iparams_ptr + srow * NI + I_MIN_TOKENS).to(tl.int64)
        ign = tl.load(iparams_ptr + srow * NI + I_IGNORE_EOS)
        ban = ((step < mt) | (ign != 0)).to(tl.int64)
    blo = row * 0
    bhi = row * 0
    if HAS_BIAS:
        if BIAS_TABLE:
            blo = srow * stride_bt
            bhi = blo + tl.load(bias_indptr_ptr + srow).to(tl.int64)
        else:
            blo = tl.load(bias_indptr_ptr + row).to(tl.int64)
            bhi = tl.load(bias_indptr_ptr + row + 1).to(tl.int64)
    return t, rep, freq, pres, ban, blo, bhi


@triton.jit
def update_slot_state(srow, tok, valid, steps_ptr, counts_ptr, stride_c):
    """A `Sampler` step's state update of one row, done by the step's last per-row kernel (``PackedBatch.update_state``,
    docs/sampler.md): a valid row's slot advances its step by one and counts its token, int16 saturating at 32767
    (docs/semantics.md §3 B, C: the counts behind the penalties); an invalid row (``tok = -1``) changes neither.
    Slots are distinct within a batch, so no two programs write the same slot."""
    st = tl.load(steps_ptr + srow)
    tl.store(steps_ptr + srow, st + valid.to(tl.int64))
    cp = counts_ptr + srow * stride_c + tl.maximum(tok, 0).to(tl.int64)
    c = tl.load(cp)
    tl.store(cp, tl.where(valid & (c < 32767), c + 1, c))


@triton.jit
def bias_lower_bound(bias_ids_ptr, blo, bhi, x):
    """First entry index in ``[blo, bhi)`` whose id is ``>= x`` (ids ascending): where a program starting at id
    ``x`` begins reading the row's bias."""
    lo = blo
    hi = bhi
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(bias_ids_ptr + mid) < x
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def block_bias(offs, bias_ids_ptr, bias_vals_ptr, ep, bhi, blk_end):
    """Logit bias of a block of ids ``offs`` (any shape, all ``< blk_end``) from the CSR entries ``[ep, bhi)``.

    ``ep`` must not be past the first entry with an id in the block, nor before the first entry at or past the
    block's lowest id. Returns ``(bias, hit, ep')``: the bias value where ``hit``, and the first entry at or past
    ``blk_end`` -- the next block of ascending ids starts there. Entries are read ``EB`` at a time (independent
    scalar loads) and matched to the block one by one; ids are unique within a row, so at most one matches an id.
    """
    bias = tl.zeros(offs.shape, tl.float32)
    hit = offs < 0
    go = ep < bhi
    while go:
        k = 0
        for i in tl.static_range(_EB):
            ok = ep + i < bhi
            bid = tl.load(bias_ids_ptr + ep + i, mask=ok, other=_NO_ID)
            val = tl.load(bias_vals_ptr + ep + i, mask=ok, other=0.0)
            match = offs == bid  # an id at or past blk_end matches nothing in the block
            bias = tl.where(match, val, bias)
            hit = hit | match
            k += (bid < blk_end).to(tl.int32)
        ep += k
        go = (k == _EB) & (ep < bhi)
    return bias, hit, ep


@triton.jit
def row_z(row, srow, offs, bias, hit, dry, dhit, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
          stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E,
          t, rep, freq, pres, ban,
          HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_ALLOWED: tl.constexpr,
          HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr, BIAS_TABLE: tl.constexpr,
          HAS_DRY: tl.constexpr):
    """Raw logits, processed ``z`` and the invalid-input flag of the ids ``offs`` (a block of any shape) of row
    ``row``; ``bias`` / ``hit`` from `block_bias` (ignored without ``HAS_BIAS``), the DRY penalties ``dry`` /
    ``dhit`` likewise from the row's DRY table (ignored without ``HAS_DRY``), the scalars from `row_scalars`.
    The logits and the token bitmask (``HAS_TBM``) are row-indexed; counts, prompt and allowed masks are read at
    ``srow`` (`slot_row`).

    Returns ``(raw, z, bad)``: ``raw`` float32 (``-inf`` at ids ``>= V``), ``z`` float32 after A–D (greedy rows:
    after A–C), ``bad`` true where ``raw`` is NaN / ``+inf`` (ids ``< V``) or ``z`` is NaN / ``+inf``.
    """
    in_vocab = offs < V
    raw = tl.load(logits_ptr + row * stride_l + offs, mask=offs < VC, other=float("-inf")).to(tl.float32)
    raw = tl.where(in_vocab, raw, float("-inf"))
    l = raw
    if HAS_BIAS:  # §3 A: the bias is added first, before every penalty
        l = tl.where(hit & in_vocab, l + bias, l)
    if HAS_ALLOWED:
        word = tl.load(allowed_ptr + srow * stride_a + (offs >> 5), mask=in_vocab, other=0)
        bit = (word >> (offs & 31).to(tl.int32)) & 1
        l = tl.where(bit != 0, l, float("-inf"))
    if HAS_TBM:  # the caller's per-step bitmask, AND-ed with the slot's allowed ids (docs/semantics.md §3 A)
        word = tl.load(tbm_ptr + row * stride_m + (offs >> 5), mask=in_vocab, other=0)
        bit = (word >> (offs & 31).to(tl.int32)) & 1
        l = tl.where(bit != 0, l, float("-inf"))
    if HAS_EOS:  # noqa: SIM102 - a constexpr branch around a runtime one
        if ban != 0:
            for e in range(E):
                eid = tl.load(eos_ptr + e)
                l = tl.where(offs == eid, float("-inf"), l)
    if HAS_COUNTS or HAS_PROMPT:
        seen = offs < 0
        if HAS_COUNTS:
            cnt = tl.load(counts_ptr + srow * stride_c + offs, mask=in_vocab, other=0).to(tl.int32)
            seen = cnt > 0
        if HAS_PROMPT:
            pw = tl.load(prompt_ptr + srow * stride_p + (offs >> 5), mask=in_vocab, other=0)
            seen = seen | (((pw >> (offs & 31).to(tl.int32)) & 1) != 0)
        if rep != 1.0:
            pen = tl.where(l > 0, tl.math.div_rn(l, tl.zeros_like(l) + rep), l * rep)
            l = tl.where(seen, pen, l)
        if HAS_COUNTS:
            # a negative count counts as 0, the token was not generated (docs/semantics.md §3 B and C)
            c = tl.maximum(cnt, 0).to(tl.float32)
            l = l - (c * freq + tl.where(cnt > 0, pres, 0.0))
    if HAS_DRY:  # §3 C: DRY after the frequency and presence penalties (-inf stays -inf)
        l = tl.where(dhit & in_vocab, l - dry, l)
    z = l
    if t != 1.0:  # §3 D; division by 1 is exact, so T = 1 rows skip it
        z = tl.math.div_rn(l, tl.zeros_like(l) + t)
    bad = in_vocab & ((raw != raw) | (raw == float("inf")) | (z != z) | (z == float("inf")))
    return raw, z, bad


@triton.jit
def block_z(row, srow, offs, ep, blk_end, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr, tbm_ptr, eos_ptr,
           bias_ids_ptr, bias_vals_ptr, dry_ids_ptr, dry_vals_ptr, stride_l, stride_c, stride_p, stride_a, stride_m,
           stride_bt, stride_d, V, VC, E,
           t, rep, freq, pres, ban, bhi,
           HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_ALLOWED: tl.constexpr,
           HAS_EOS: tl.constexpr, SLOTS: tl.constexpr, HAS_TBM: tl.constexpr, BIAS_TABLE: tl.constexpr,
           HAS_DRY: tl.constexpr):
    """`row_z` of a block ``offs`` (any shape, ids ``< blk_end``) with the bias read from the CSR entry ``ep`` on
    (`block_bias`); returns ``(raw, z, bad, ep')`` with ``ep'`` where the next block of ascending ids starts.

    With ``HAS_DRY`` the row's DRY penalties come from its row of the ``(B, KD)`` table ``dry_ids_ptr`` /
    ``dry_vals_ptr`` (row-indexed in every form, ids ascending, unused entries ``2^31 - 1``; ``stride_d = KD``),
    matched to the block as the bias is, from the first entry at or past the block's lowest id (a binary search)."""
    bias = tl.zeros(offs.shape, tl.float32)
    hit = offs < 0
    if HAS_BIAS:
        bias, hit, ep = block_bias(offs, bias_ids_ptr, bias_vals_ptr, ep, bhi, blk_end)
    dry = tl.zeros(offs.shape, tl.float32)
    dhit = offs < 0
    if HAS_DRY:
        dlo = row * stride_d
        dhi = dlo + stride_d
        dp = bias_lower_bound(dry_ids_ptr, dlo, dhi, tl.min(offs, axis=None))
        dry, dhit, dp = block_bias(offs, dry_ids_ptr, dry_vals_ptr, dp, dhi, blk_end)
    raw, z, bad = row_z(row, srow, offs, bias, hit, dry, dhit, logits_ptr, counts_ptr, prompt_ptr, allowed_ptr,
                        tbm_ptr, eos_ptr,
                        stride_l, stride_c, stride_p, stride_a, stride_m, stride_bt, stride_d, V, VC, E, t, rep, freq,
                        pres, ban,
                        HAS_BIAS, HAS_COUNTS, HAS_PROMPT, HAS_ALLOWED, HAS_EOS, SLOTS, HAS_TBM, BIAS_TABLE, HAS_DRY)
    return raw, z, bad, ep


@triton.jit
def online_lse(m, s, x):
    """Fold the block ``x`` into the running (max, sum of exp(x - max)); -inf safe."""
    nm = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(nm == float("-inf"), 0.0, nm)
    s = s * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)
    return nm, s


@triton.jit
def typical_s(z, ms, hc):
    """Typical-p distance ``s = |-ln q - H|`` of ``z`` (docs/semantics.md §3 E item 4).

    With the survivors' max ``m_s`` and ``s_s = sum exp(z - m_s)``: ``-ln q = (m_s - z) + ln s_s`` and
    ``H = ln s_s + sum q (m_s - z)``, so ``s = |(m_s - z) - hc|`` with ``hc = sum q (m_s - z)`` (``RF_HC``): no
    ``m_s + ln s_s`` is ever formed, which would lose ``ln s_s`` for large ``|z|``. ``s = +inf`` where ``m_s - z``
    overflows (``q = 0``).
    """
    return tl.abs((ms - z) - hc)


@triton.jit
def kept_mask(row, offs, z, rowf_ptr, rowi_ptr, KEPT: tl.constexpr):
    """True where id ``offs`` (value ``z``) is in the row's kept set after truncation (greedy rows: the argmax):
    ``z >= zlo``, and with the bits of ``KEPT`` typical-p's ``s <= s_thr`` (1), XTC's ``z <= zhi`` (2) and dynamic
    temperature's ``z rho > -inf`` (4: a kept value whose ``z' = z rho`` overflows to ``-inf`` leaves the set,
    §3 E; only after `dyntemp` / `candidates` wrote ``rho``)."""
    zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
    gid = tl.load(rowi_ptr + row * _NRI + _RI_GID)
    keep = (z > float("-inf")) & (z >= zlo) & ((gid < 0) | (offs == gid))
    if KEPT & 1:  # typical-p
        sthr = tl.load(rowf_ptr + row * _NRF + _RF_STHR)
        ms = tl.load(rowf_ptr + row * _NRF + _RF_MS)
        hc = tl.load(rowf_ptr + row * _NRF + _RF_HC)
        keep = keep & (typical_s(z, ms, hc) <= sthr)
    if KEPT & 2:  # XTC: the top choices above a are removed (docs/semantics.md §3 E item 6)
        keep = keep & (z <= tl.load(rowf_ptr + row * _NRF + _RF_ZHI))
    if KEPT & 4:  # dynamic temperature
        keep = keep & (z * tl.load(rowf_ptr + row * _NRF + _RF_RHO) > float("-inf"))
    return keep
