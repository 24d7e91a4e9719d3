"""Stages A–D of docs/semantics.md §3 in registers: the processed logits ``z`` of a block of ids of one row.

Every pass of the pipeline recomputes ``z`` from the raw logits instead of materialising a ``(B, V)`` float32 copy:
the logits are read in their own dtype and upcast in registers, the sparse logit bias comes from a per-row float32
buffer that only rows with a bias own (``rowi[:, RI_BIAS_SLOT] >= 0``; other rows issue no load), penalty state and
bitmasks are read only when the batch uses them (constexpr specialisation from the host-known `BatchFlags`).

Row state shared by the passes (the host allocates it, kernels fill it):

``rowf`` (B, NRF) float32 columns ``RF_*``; ``rowi`` (B, NRI) int32 columns ``RI_*``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._batch import F_FREQ, F_MIRO_TAU, F_PRES, F_REP, F_TEMPERATURE, NF, NI  # noqa: F401

# rowf columns. A log-normaliser is kept as a pair (max ``m``, ``ln s`` with ``s = sum exp(x - m)``) and a log-
# probability is formed as ``(x - m) - ln s``, never as ``x - (m + ln s)``: in float32, ``m + ln s`` drops ``ln s``
# once ``|m|`` is above ~1e8 (docs/semantics.md §6).
#   RF_M / RF_LS: the row's ``z`` (all finite tokens); RF_M_RAW / RF_LS_RAW: the raw logits (raw logprobs);
#   RF_M_KEPT / RF_LS_KEPT: ``z`` over the kept set (final logprobs, ``sampling_probs``, the Mirostat surprise);
#   RF_ZLO: keep ``z >= zlo``; RF_STHR: typical-p keeps ``s <= sthr``; RF_MS / RF_HC: the typical-p survivors' max
#   and mean distance ``sum q (m_s - z)`` (``s = |(m_s - z) - hc|``, see `typical_s`); RF_DOM_LO: lower bound of a
#   select's domain; RF_ZX / RF_RAWX: the drawn token's ``z`` and raw logit.
(RF_M, RF_LS, RF_ZLO, RF_STHR, RF_MS, RF_HC, RF_M_RAW, RF_LS_RAW, RF_M_KEPT, RF_LS_KEPT, RF_DOM_LO, RF_ZX,
 RF_RAWX) = range(13)
NRF = 13
# rowi columns
RI_VALID, RI_ARGMAX, RI_GID, RI_BIAS_SLOT, RI_BAN_EOS, RI_NFIN, RI_TOKEN, RI_LP_MODE = range(8)
NRI = 8

_NF: tl.constexpr = tl.constexpr(NF)
_NI: tl.constexpr = tl.constexpr(NI)
_F_TEMPERATURE: tl.constexpr = tl.constexpr(F_TEMPERATURE)
_F_FREQ: tl.constexpr = tl.constexpr(F_FREQ)
_F_PRES: tl.constexpr = tl.constexpr(F_PRES)
_F_REP: tl.constexpr = tl.constexpr(F_REP)
_NRF: tl.constexpr = tl.constexpr(NRF)
_NRI: tl.constexpr = tl.constexpr(NRI)
_RF_ZLO: tl.constexpr = tl.constexpr(RF_ZLO)
_RF_STHR: tl.constexpr = tl.constexpr(RF_STHR)
_RF_MS: tl.constexpr = tl.constexpr(RF_MS)
_RF_HC: tl.constexpr = tl.constexpr(RF_HC)
_RI_GID: tl.constexpr = tl.constexpr(RI_GID)
_RI_BIAS_SLOT: tl.constexpr = tl.constexpr(RI_BIAS_SLOT)
_RI_BAN_EOS: tl.constexpr = tl.constexpr(RI_BAN_EOS)


@triton.jit
def row_z(row, offs, logits_ptr, bias_ptr, counts_ptr, prompt_ptr, allowed_ptr, eos_ptr, fparams_ptr, rowi_ptr,
          stride_l, stride_b, stride_c, stride_p, stride_a, V, VC, E,
          HAS_BIAS: tl.constexpr, HAS_COUNTS: tl.constexpr, HAS_PROMPT: tl.constexpr, HAS_ALLOWED: tl.constexpr,
          HAS_EOS: tl.constexpr):
    """Raw logits, processed ``z`` and the invalid-input flag of the ids ``offs`` (a block) of row ``row``.

    Returns ``(raw, z, bad)``: ``raw`` float32 (``-inf`` at ids ``>= V``), ``z`` float32 after A–D (greedy rows:
    after A–C), ``bad`` true where ``raw`` is NaN / ``+inf`` (ids ``< V``) or ``z`` is NaN / ``+inf``.
    """
    in_vocab = offs < V
    raw = tl.load(logits_ptr + row * stride_l + offs, mask=offs < VC, other=float("-inf")).to(tl.float32)
    raw = tl.where(in_vocab, raw, float("-inf"))
    l = raw
    if HAS_BIAS:
        slot = tl.load(rowi_ptr + row * _NRI + _RI_BIAS_SLOT).to(tl.int64)
        bias = tl.load(bias_ptr + slot * stride_b + offs, mask=in_vocab & ((offs * 0 + slot) >= 0), other=0.0)
        l = l + bias
    if HAS_ALLOWED:
        word = tl.load(allowed_ptr + row * stride_a + (offs >> 5), mask=in_vocab, other=0)
        bit = (word >> (offs & 31).to(tl.int32)) & 1
        l = tl.where(bit != 0, l, float("-inf"))
    if HAS_EOS:
        ban = tl.load(rowi_ptr + row * _NRI + _RI_BAN_EOS)
        if ban != 0:
            for e in range(E):
                eid = tl.load(eos_ptr + e)
                l = tl.where(offs == eid, float("-inf"), l)
    if HAS_COUNTS or HAS_PROMPT:
        rep = tl.load(fparams_ptr + row * _NF + _F_REP)
        freq = tl.load(fparams_ptr + row * _NF + _F_FREQ)
        pres = tl.load(fparams_ptr + row * _NF + _F_PRES)
        seen = offs < 0
        if HAS_COUNTS:
            cnt = tl.load(counts_ptr + row * stride_c + offs, mask=in_vocab, other=0).to(tl.int32)
            seen = cnt > 0
        if HAS_PROMPT:
            pw = tl.load(prompt_ptr + row * stride_p + (offs >> 5), mask=in_vocab, other=0)
            seen = seen | (((pw >> (offs & 31).to(tl.int32)) & 1) != 0)
        pen = tl.where(l > 0, tl.math.div_rn(l, tl.zeros_like(l) + rep), l * rep)
        l = tl.where(seen & ((tl.zeros_like(l) + rep) != 1.0), pen, l)
        if HAS_COUNTS:
            # a negative count counts as 0, the token was not generated (docs/semantics.md §3 B and C)
            c = tl.maximum(cnt, 0).to(tl.float32)
            l = l - (c * freq + tl.where(cnt > 0, pres, 0.0))
    t = tl.load(fparams_ptr + row * _NF + _F_TEMPERATURE)
    t = tl.where(t > 0.0, t, 1.0)
    z = tl.math.div_rn(l, tl.zeros_like(l) + t)
    bad = in_vocab & ((raw != raw) | (raw == float("inf")) | (z != z) | (z == float("inf")))
    return raw, z, bad


@triton.jit
def typical_s(row, z, rowf_ptr):
    """Typical-p distance ``s = |-ln q - H|`` of ``z`` (docs/semantics.md §3 E item 4).

    With the survivors' max ``m_s`` and ``s_s = sum exp(z - m_s)``: ``-ln q = (m_s - z) + ln s_s`` and
    ``H = ln s_s + sum q (m_s - z)``, so ``s = |(m_s - z) - hc|`` with ``hc = sum q (m_s - z)`` (``RF_HC``): no
    ``m_s + ln s_s`` is ever formed, which would lose ``ln s_s`` for large ``|z|``. ``s = +inf`` where ``m_s - z``
    overflows (``q = 0``).
    """
    ms = tl.load(rowf_ptr + row * _NRF + _RF_MS)
    hc = tl.load(rowf_ptr + row * _NRF + _RF_HC)
    return tl.abs((ms - z) - hc)


@triton.jit
def kept_mask(row, offs, z, rowf_ptr, rowi_ptr, HAS_TYP: tl.constexpr):
    """True where id ``offs`` (value ``z``) is in the row's kept set after truncation (greedy rows: the argmax)."""
    zlo = tl.load(rowf_ptr + row * _NRF + _RF_ZLO)
    gid = tl.load(rowi_ptr + row * _NRI + _RI_GID)
    keep = (z > float("-inf")) & (z >= zlo) & ((gid < 0) | (offs == gid))
    if HAS_TYP:
        sthr = tl.load(rowf_ptr + row * _NRF + _RF_STHR)
        keep = keep & (typical_s(row, z, rowf_ptr) <= sthr)
    return keep
