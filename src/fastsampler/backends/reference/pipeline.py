"""The numpy reference sampler: docs/semantics.md §2–§6 row by row, float64 inside, written for clarity.

Every backend is tested against these functions. Each row goes through `_run_row`, which records what it kept and
how close each decision was to flipping (`diagnose`), so tests can tell a real mismatch from a near-tie.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..._batch import bitmask_to_bool, pack_batch, param_batch, stopped_rows
from ..._history import DRY_PAD
from ...layout import (
    F_DYN_EXP,
    F_DYN_RANGE,
    F_EPSILON,
    F_ETA,
    F_FREQ,
    F_MIN_P,
    F_MIRO_ETA,
    F_MIRO_TAU,
    F_NSIGMA,
    F_PRES,
    F_REP,
    F_TEMPERATURE,
    F_TOP_P,
    F_TYPICAL_P,
    F_XTC_P,
    F_XTC_T,
    I_IGNORE_EOS,
    I_LOGPROBS,
    I_LOGPROBS_MODE,
    I_MIN_KEEP,
    I_MIN_TOKENS,
    I_MIRO_MODE,
    I_TOP_K,
    I_TOP_LOGPROBS,
    LOGPROBS_MODES,
    MIROSTAT_M,
    TILE,
)
from ...output import SampleOutput
from ...params import SamplingParams
from .philox import tile_noise, token_noise, xtc_uniform

__all__ = ["process_logits", "sampling_probs", "sample", "diagnose", "dry_penalties", "RACE_TIE_TOL", "BOUNDARY_TOL"]

RACE_TIE_TOL = 1e-4  # race scores (either level) closer than this, relative to max(1, |score|): fp32 may differ
BOUNDARY_TOL = 1e-5  # truncation decisions this close to flipping (relative): fp32 backends may decide otherwise
MIROSTAT_K_TOL = 1e-5  # Mirostat v1's k this close (relative) to an integer: float32 may floor it differently
FLT_MAX = float(np.finfo(np.float32).max)
# float32 rounding sends |v| >= 2^128 - 2^103 (FLT_MAX plus half an ulp) to infinity: the overflow boundary of the
# kernels' float32 arithmetic (docs/semantics.md §8, "Overflow")
F32_OVERFLOW = 2.0**128 - 2.0**103
LN2 = math.log(2.0)
F32_TINY = 1.1754943508222875e-38  # the smallest normal float32: the floor of a dynamic temperature (§3 D)
DRY_FLOAT_MAX_LOG = 88.7228391  # DRY's exponent clamp, floor(this / ln base) for base > 1.000001 (§3 C)


# --------------------------------------------------------------------------------------------- row inputs / outputs
@dataclass
class _Row:
    x: np.ndarray  # (V,) float64 input logits, padding included
    vocab: int
    p: Any  # SamplingParams or a namespace with the same attribute names
    seed: int
    step: int
    seq: int
    mu: float
    bias: dict[int, float] = field(default_factory=dict)
    allowed: np.ndarray | None = None  # (vocab,) bool
    prompt: np.ndarray | None = None  # (vocab,) bool
    counts: np.ndarray | None = None  # (vocab,) int64
    eos: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    forced: int = -1  # >= 0: the row's token is this one, not drawn (PackedBatch.forced_tokens)
    dry: dict[int, float] = field(default_factory=dict)  # DRY penalties, subtracted after stage C (§3 C)


@dataclass
class _RowResult:
    token: int = -1
    valid: bool = False
    probs: np.ndarray | None = None  # (vocab,) distribution drawn from
    final_lp: np.ndarray | None = None  # (vocab,) its log, -inf outside the kept set
    keep: np.ndarray | None = None  # (vocab,) bool, the kept set S (greedy: the token)
    lp: np.ndarray | None = None  # (vocab,) logprobs in the row's mode (None when logprobs off)
    mu: float = math.nan
    processed: np.ndarray | None = None  # (vocab,) after A–D (greedy: A–C)
    reasons: list[str] = field(default_factory=list)  # near-tie reasons


def _log_softmax(v: np.ndarray) -> np.ndarray:
    """``(v - m) - ln Σ exp(v - m)`` with ``m`` the finite maximum: the shift comes first, so the log-sum is not lost
    against ``m`` when ``|v|`` is large (``v - (m + ln s)`` would give 0 for four equal logits of 1e30)."""
    fin = np.isfinite(v)
    if not fin.any():
        return np.full_like(v, -np.inf)
    m = v[fin].max()
    return (v - m) - math.log(np.exp(v[fin] - m).sum())


def _to_f32_range(v: np.ndarray) -> np.ndarray:
    """Values that float32 rounds to ``±inf`` become ``±inf`` (overflow as the kernels see it, §8)."""
    with np.errstate(invalid="ignore"):
        return np.where(v <= -F32_OVERFLOW, -np.inf, np.where(v >= F32_OVERFLOW, np.inf, v))


def _kth_largest(v: np.ndarray, k: int) -> float:
    """k-th largest value (1-based), counted with multiplicity."""
    return float(np.sort(v)[::-1][k - 1])


def _rel_close(a: float, b: float, tol: float = BOUNDARY_TOL) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _cut_position(cum: np.ndarray, target: float, min_keep: int) -> int:
    """First position whose cumulative mass reaches ``target``, raised to keep ``min_keep`` entries."""
    hit = np.nonzero(cum >= target)[0]
    c = int(hit[0]) if hit.size else len(cum) - 1
    c = max(c, min_keep - 1)
    return min(c, len(cum) - 1)


def _check_cum_boundary(cum: np.ndarray, c: int, target: float, name: str, reasons: list[str]) -> None:
    for j in (c - 1, c):
        if 0 <= j < len(cum) and abs(cum[j] - target) <= BOUNDARY_TOL:
            reasons.append(f"{name}: cumulative mass {cum[j]:.9g} at position {j} is within {BOUNDARY_TOL} of {target}")
            return


def _check_f32_collapse(v: np.ndarray, name: str, reasons: list[str]) -> None:
    """Flag distinct finite values that float32 rounds to one value (e.g. tiny logits divided by a large temperature
    underflow to 0): a float32 backend sees a tie where the reference sees an order, and any decision may differ."""
    fin = v[np.isfinite(v)]
    if fin.size < 2:
        return
    u = np.unique(fin)
    if u.size > 1 and np.unique(u.astype(np.float32)).size < u.size:
        reasons.append(f"{name}: distinct values round to one float32 value")


def _check_value_gap(sorted_desc: np.ndarray, c: int, name: str, reasons: list[str]) -> None:
    """Flag when the value at the cut and the next one differ by rounding only (fp32 may tie or reorder them)."""
    if c + 1 < len(sorted_desc) and sorted_desc[c] != sorted_desc[c + 1] and _rel_close(
        sorted_desc[c], sorted_desc[c + 1]
    ):
        reasons.append(f"{name}: boundary values {sorted_desc[c]:.9g} and {sorted_desc[c + 1]:.9g} differ by rounding")


# --------------------------------------------------------------------------------------------------- stages A – D
def _stage_a_to_c(row: _Row) -> np.ndarray:
    """Masks and bias (A), repetition (B), frequency / presence (C) over the real vocabulary."""
    p = row.p
    l = row.x[: row.vocab].copy()
    for t, b in row.bias.items():
        l[t] += b
    if row.allowed is not None:
        l[~row.allowed] = -np.inf
    if row.eos.size and (p.ignore_eos or row.step < p.min_tokens):
        l[row.eos] = -np.inf
    # a negative count (e.g. a wrapped counter) counts as 0: the token was not generated (§3 C)
    counts = np.maximum(row.counts, 0) if row.counts is not None else np.zeros(row.vocab, dtype=np.int64)
    seen = counts > 0
    if row.prompt is not None:
        seen = seen | row.prompt
    r = float(p.repetition_penalty)
    if r != 1.0:
        l = np.where(seen, np.where(l > 0, l / r, l * r), l)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        l = l - (counts * float(p.frequency_penalty) + (counts > 0) * float(p.presence_penalty))
    for t, pen in row.dry.items():  # DRY, after the frequency and presence penalties (-inf stays -inf)
        l[t] -= pen
    return _to_f32_range(l)


def dry_penalties(history: Sequence[int], p: Any) -> dict[int, float]:
    """DRY's penalties ``{token: μ b^e}`` for a history (prompt, then generated tokens), docs/semantics.md §3 C,
    written step by step as the definition reads (a quadratic scan, no Z-algorithm)."""
    mult, base, a, last_n = (float(p.dry_multiplier), float(p.dry_base), int(p.dry_allowed_length),
                             int(p.dry_penalty_last_n))
    if mult <= 0.0 or last_n == 0:
        return {}
    h = [int(t) for t in history]
    w = h if last_n < 0 else h[max(0, len(h) - last_n):]
    n = len(w)
    if n <= a:
        return {}
    breakers = [tuple(int(t) for t in b) for b in (p.dry_sequence_breakers or ())]
    rho = n  # 1. the breaker limit
    for i in range(n):
        longest = -1
        for br in breakers:
            m = len(br)
            if m - 1 <= i and all(w[n - 1 - i + j] == br[j] for j in range(m)):
                longest = max(longest, m - 1)
        if longest >= 0:
            rho = i - longest
            break
    if rho < a:
        return {}
    longest_after: dict[int, int] = {}  # 2-3. repeat lengths, the candidates and their longest repeat
    for pos in range(n - 1):
        k = 0
        while pos - k >= 0 and w[pos - k] == w[n - 1 - k]:
            k += 1
        length = min(rho, k)
        if length >= a:
            t = w[pos + 1]
            longest_after[t] = max(longest_after.get(t, length), length)
    singles = {br[0] for br in breakers if len(br) == 1}
    out = {}
    for t, length in longest_after.items():  # 4. the penalty
        if t in singles:
            continue
        e = length - a
        if base > 1.000001:
            e = min(e, math.floor(DRY_FLOAT_MAX_LOG / math.log(base)))
        out[t] = mult * base**e
    return out


def _dynamic_temperature(l: np.ndarray, keep: np.ndarray, p: Any, reasons: list[str] | None = None) -> float:
    """The dynamic temperature of §3 E (after the rules) from the entropy of ``softmax(l)`` over the kept set."""
    t = float(p.temperature)
    fin = l[keep & np.isfinite(l)]
    n = fin.size
    if n <= 1:
        return t
    lq = _log_softmax(fin)
    q = np.exp(lq)
    h = float(-(q * lq)[q > 0].sum())
    if reasons is not None and h < 1e-30:
        reasons.append(f"dynamic temperature: the entropy {h:.3g} may be 0 in float32")
    delta = float(p.dynatemp_range)
    t_min, t_max = max(0.0, t - delta), t + delta
    t_dyn = t_min + (t_max - t_min) * (max(h, 0.0) / math.log(n)) ** float(p.dynatemp_exponent)
    return max(t_dyn, F32_TINY)


# ------------------------------------------------------------------------------------------------------ stage E
def _truncate(z: np.ndarray, p: Any, mu: float, vocab: int, reasons: list[str], coin: float | None = None
              ) -> np.ndarray:
    """Kept set (bool mask) after top-k, top-p, min-p (epsilon, top-n-sigma), typical-p, eta, XTC (``coin``: its
    uniform) or mirostat, on finite ``z``."""
    keep = np.isfinite(z)
    mk = int(p.min_keep)
    # epsilon's and top-n-sigma's thresholds are on the whole distribution (before any rule): its log-normaliser and
    # standard deviation over every finite z
    whole = z[keep]
    ln_s = math.log(np.exp(whole - whole.max()).sum()) if p.epsilon_cutoff > 0.0 else 0.0
    if p.mirostat_mode == 2:
        lq = np.where(keep, _log_softmax(np.where(keep, z, -np.inf)), -np.inf)
        cut = -mu * LN2
        k2 = keep & (lq >= cut)
        if not k2.any():
            k2 = keep & (z == z[keep].max())
        if np.any(keep & (np.abs(lq - cut) <= BOUNDARY_TOL * max(1.0, abs(cut)))):
            reasons.append(f"mirostat v2: a log-probability is within {BOUNDARY_TOL} of -mu ln 2 = {cut:.9g}")
        return k2
    if p.mirostat_mode == 1:
        return _mirostat_v1_keep(z, keep, mu, vocab, reasons)

    # 1. top-k
    k = int(p.top_k)
    if k > 0:
        k = max(k, mk)
        n = int(keep.sum())
        if k < n:
            zs = np.sort(z[keep])[::-1]
            thr = zs[k - 1]
            _check_value_gap(zs, k - 1, "top_k", reasons)
            keep &= z >= thr
    # 2. top-p
    if p.top_p < 1.0:
        idx = np.nonzero(keep)[0]
        lq = _log_softmax(z[idx])
        order = np.lexsort((idx, -z[idx]))  # z desc, id asc
        cum = np.cumsum(np.exp(lq[order]))
        c = _cut_position(cum, float(p.top_p), mk)
        _check_cum_boundary(cum, c, float(p.top_p), "top_p", reasons)
        _check_value_gap(z[idx][order], c, "top_p", reasons)
        keep &= z >= z[idx][order][c]
    # 3. min-p, and epsilon: thresholds on the whole distribution (q >= min_p * max q, q >= epsilon_cutoff)
    if p.min_p > 0.0 or p.epsilon_cutoff > 0.0 or p.top_n_sigma > 0.0:
        zk = z[keep]
        thr = -math.inf
        if p.min_p > 0.0:
            thr = zk.max() + math.log(float(p.min_p))
        if p.epsilon_cutoff > 0.0:  # (the maximum always survives: it is the whole row's maximum)
            thr = max(thr, zk.max() + math.log(float(p.epsilon_cutoff)) + ln_s)
        if p.top_n_sigma > 0.0:  # z >= max - n sigma, sigma the population standard deviation of every finite z
            thr = max(thr, zk.max() - float(p.top_n_sigma) * float(whole.std()))
        thr = min(thr, zk.max())  # the maximum is always kept
        if int((zk >= thr).sum()) < mk:
            thr = min(thr, _kth_largest(zk, min(mk, zk.size)))
        near = np.abs(zk - thr) <= BOUNDARY_TOL * max(1.0, abs(thr))
        if near.any() and not np.all(zk[near] == thr):
            reasons.append(f"min-p stage: a value is within rounding of the threshold {thr:.9g}")
        keep &= z >= thr
    # 4. typical-p
    if p.typical_p < 1.0:
        idx = np.nonzero(keep)[0]
        lq = _log_softmax(z[idx])
        q = np.exp(lq)
        h = float(-(q * lq)[q > 0].sum())  # 0 · ln 0 = 0
        s = np.abs(-lq - h)
        order = np.lexsort((idx, s))  # s asc, id asc
        cum = np.cumsum(q[order])
        c = _cut_position(cum, float(p.typical_p), mk)
        _check_cum_boundary(cum, c, float(p.typical_p), "typical_p", reasons)
        so = s[order]
        zc = z[idx][order][c]
        # a survivor whose score is equal to the boundary score or within rounding of it, while its logit differs:
        # float32 may put it on either side of the cut
        near = (np.abs(s - so[c]) <= BOUNDARY_TOL * max(1.0, abs(so[c]))) & (z[idx] != zc)
        if near.any():
            reasons.append(f"typical_p: {int(near.sum())} score(s) within rounding of the boundary score {so[c]:.9g} "
                           f"for logits other than the boundary's {zc:.9g}")
        thr = so[c]
        kept_idx = idx[s <= thr]
        keep = np.zeros_like(keep)
        keep[kept_idx] = True
    # 5. eta, over the survivors
    if p.eta_cutoff > 0.0:
        keep = _eta(z, keep, float(p.eta_cutoff), mk, reasons)
    # 6. XTC
    if p.xtc_probability > 0.0 and coin is not None and coin < float(p.xtc_probability):
        keep = _xtc(z, keep, float(p.xtc_threshold), mk, reasons)
    return keep


def _eta(z: np.ndarray, keep: np.ndarray, eta: float, mk: int, reasons: list[str]) -> np.ndarray:
    """eta over the survivors (§3 E item 5): keep q >= min(eta, sqrt(eta) e^-H), q and H over the survivors."""
    zk = z[keep]
    lq = _log_softmax(zk)
    q = np.exp(lq)
    h = float(-(q * lq)[q > 0].sum())
    m = zk.max()
    thr = min(m, m + math.log(np.exp(zk - m).sum()) + min(math.log(eta), 0.5 * math.log(eta) - h))
    if int((zk >= thr).sum()) < mk:
        thr = min(thr, _kth_largest(zk, min(mk, zk.size)))
    near = np.abs(zk - thr) <= BOUNDARY_TOL * max(1.0, abs(thr))
    if near.any() and not np.all(zk[near] == thr):
        reasons.append(f"eta: a value is within rounding of the threshold {thr:.9g}")
    return keep & (z >= thr)


def _xtc(z: np.ndarray, keep: np.ndarray, theta: float, mk: int, reasons: list[str]) -> np.ndarray:
    """XTC once its coin fired (§3 E item 6): drop the survivors above the least likely token with ``q >= θ``."""
    zk = z[keep]
    m = zk.max()
    cut = m + math.log(np.exp(zk - m).sum()) + (math.log(theta) if theta > 0.0 else -math.inf)
    top = keep & (z >= cut)
    if math.isfinite(cut) and np.any(keep & (np.abs(z - cut) <= BOUNDARY_TOL * max(1.0, abs(cut)))):
        reasons.append(f"xtc: a value is within rounding of the threshold {cut:.9g}")
    if int(top.sum()) < 2:
        return keep
    a = z[top].min()
    rest = keep & (z <= a)
    return rest if int(rest.sum()) >= mk else keep


def mirostat_v1_k(sorted_lq: np.ndarray, mu: float, n_vocab: int) -> float:
    """Mirostat v1's real-valued k (before floor / clamp) from log-probabilities sorted descending."""
    m = min(MIROSTAT_M, sorted_lq.size)
    if m < 2:
        return math.nan  # no pair to estimate the exponent from
    i = np.arange(m - 1, dtype=np.float64)
    t = np.log((i + 2.0) / (i + 1.0))
    b = sorted_lq[: m - 1] - sorted_lq[1:m]
    s = float((t * b).sum() / (t * t).sum())
    eps = s - 1.0
    with np.errstate(all="ignore"):
        two_mu = np.float64(2.0) ** mu
        if abs(eps) < 1e-6:
            base = two_mu / np.log(np.float64(n_vocab))
        else:
            base = (eps * two_mu) / (1.0 - np.float64(n_vocab) ** (-eps))
        k = np.float64(base) ** (1.0 / np.float64(s)) if s != 0 else (
            np.inf if base > 1 else (np.float64(1.0) if base == 1 else np.float64(0.0)))
    return float(k)


def _mirostat_v1_keep(z: np.ndarray, keep: np.ndarray, mu: float, vocab: int, reasons: list[str]) -> np.ndarray:
    zk = np.sort(z[keep])[::-1]
    lq = _log_softmax(zk)
    kf = mirostat_v1_k(lq, mu, vocab)
    if math.isnan(kf):
        kf = float(vocab)
    elif math.isfinite(kf) and 1.0 < kf < zk.size + 1 and abs(kf - round(kf)) <= MIROSTAT_K_TOL * kf:
        # floor(k) may come out one lower or higher in float32; it matters only while k does not keep everything
        reasons.append(f"mirostat v1: k = {kf:.9g} is within rounding of an integer")
    k = int(min(max(math.floor(kf), 1), vocab)) if math.isfinite(kf) else vocab
    if k >= zk.size:
        return keep
    _check_value_gap(zk, k - 1, "mirostat v1", reasons)
    return keep & (z >= zk[k - 1])


# ------------------------------------------------------------------------------------------------------ stage F
def _race(z: np.ndarray, keep: np.ndarray, row: _Row, reasons: list[str]) -> int:
    """Two-level exponential race over the kept set; returns the token id."""
    ids = np.nonzero(keep)[0]
    c = z[ids].max()
    w = np.exp(z[ids] - c)
    tiles = ids // TILE
    uniq = np.unique(tiles)
    wt = np.array([w[tiles == t].sum() for t in uniq])
    pos = wt > 0
    uniq, wt = uniq[pos], wt[pos]
    et = tile_noise(row.seed, row.step, row.seq, uniq)
    score = np.log(wt) - np.log(et)
    best = int(np.argmax(score))
    if uniq.size > 1:
        top2 = np.sort(score)[-2:]
        if top2[1] - top2[0] < RACE_TIE_TOL * max(1.0, abs(top2[1])):
            reasons.append(f"race: top two tile scores differ by {top2[1] - top2[0]:.3g} < {RACE_TIE_TOL}")
    tile = uniq[best]
    cand = ids[tiles == tile]
    e = token_noise(row.seed, row.step, row.seq, cand)
    tscore = z[cand] - np.log(e)
    if cand.size > 1:
        top2 = np.sort(tscore)[-2:]
        if top2[1] - top2[0] < RACE_TIE_TOL * max(1.0, abs(top2[1])):
            reasons.append(f"race: top two token scores differ by {top2[1] - top2[0]:.3g} < {RACE_TIE_TOL}")
    return int(cand[int(np.argmax(tscore))])


# ----------------------------------------------------------------------------------------------------- one row
def _run_row(row: _Row) -> _RowResult:
    p = row.p
    res = _RowResult(mu=row.mu)
    x = row.x[: row.vocab]
    if np.any(np.isnan(x)) or np.any(x == np.inf):
        return res
    l = _stage_a_to_c(row)
    greedy = float(p.temperature) == 0.0
    fin = np.isfinite(l)
    if not fin.any() or np.any(np.isnan(l)) or np.any(l == np.inf):
        return res
    if greedy:
        z = l
    else:
        with np.errstate(over="ignore"):
            z = _to_f32_range(l / float(p.temperature))
        if np.any(np.isnan(z)) or np.any(z == np.inf) or not np.isfinite(z).any():
            return res
    res.processed = z
    vocab = row.vocab
    if not greedy:
        _check_f32_collapse(l, "logits after penalties", res.reasons)
        _check_f32_collapse(z, "logits after temperature", res.reasons)
    if greedy:
        token = int(np.argmax(z)) if row.forced < 0 else row.forced  # first maximum: lowest id
        zs = np.sort(z[np.isfinite(z)])[::-1]
        if zs.size > 1 and zs[0] != zs[1] and _rel_close(zs[0], zs[1]):
            res.reasons.append(f"greedy: top two values {zs[0]:.9g} and {zs[1]:.9g} differ by rounding")
        keep = np.zeros(vocab, dtype=bool)
        keep[int(np.argmax(z))] = True
        probs = keep.astype(np.float64)
        final_lp = np.where(keep, 0.0, -np.inf)
    else:
        coin = xtc_uniform(row.seed, row.step, row.seq) if p.xtc_probability > 0.0 else None
        keep = _truncate(z, p, row.mu, vocab, res.reasons, coin)
        zd = z
        if float(p.dynatemp_range) > 0.0:  # the kept set's own temperature (§3 E, dynamic temperature)
            t_dyn = _dynamic_temperature(l, keep, p, res.reasons)
            with np.errstate(over="ignore", invalid="ignore"):
                zd = np.where(keep, _to_f32_range(l / t_dyn), -np.inf)
            if np.any(zd[keep] == np.inf) or not np.isfinite(zd[keep]).any():
                return res  # (z' overflows: the row is invalid, as for a static temperature, §5)
            keep = keep & np.isfinite(zd)
            _check_f32_collapse(zd[keep], "logits after the dynamic temperature", res.reasons)
        token = _race(zd, keep, row, res.reasons) if row.forced < 0 else row.forced
        zk = np.where(keep, zd, -np.inf)
        final_lp = _log_softmax(zk)
        probs = np.exp(final_lp)
        if p.mirostat_mode:
            surprise = -final_lp[token] / LN2
            res.mu = row.mu - float(p.mirostat_lr) * (surprise - float(p.mirostat_target))
    res.token, res.valid, res.probs, res.final_lp, res.keep = token, True, probs, final_lp, keep
    if p.logprobs:
        mode = p.logprobs_mode
        if mode == "raw":
            lp = _log_softmax(x.astype(np.float64))
        elif mode == "processed":
            lp = _log_softmax(z)
        else:
            lp = final_lp
        res.lp = _to_f32_range(lp)  # logprobs are float32 outputs: below -FLT_MAX is -inf (§6)
        _check_logprob_ties(res.lp, token, int(p.top_logprobs), res.reasons)
    return res


def _check_logprob_ties(lp: np.ndarray, token: int, n_top: int, reasons: list[str]) -> None:
    """Flag a rank or a top-N order that float32 rounding may change: distinct logprobs within rounding of the
    token's (rank), or of each other among the first ``n_top + 1`` in ``(lp desc, id asc)`` order (top-N)."""
    tol = lambda v: BOUNDARY_TOL * max(1.0, abs(v))
    t = lp[token]
    if np.isfinite(t):
        near = (lp != t) & (np.abs(lp - t) <= tol(t))
        if near.any():
            reasons.append(f"logprobs: {int(near.sum())} logprob(s) within rounding of the token's {t:.9g} (rank)")
    if n_top:
        top = np.sort(lp[np.isfinite(lp)])[::-1][: n_top + 1]
        for a, b in zip(top[:-1], top[1:], strict=True):
            if a != b and a - b <= tol(a):
                reasons.append(f"logprobs: top logprobs {a:.9g} and {b:.9g} are within rounding (top-N order)")
                return


# ------------------------------------------------------------------------------------------------- batch inputs
def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor (bf16 is upcast to float32 first: numpy has no bfloat16)
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(a)


def _rows_from_args(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_mask: Any = None,
    output_counts: Any = None,
    **kwargs: Any,
) -> list[_Row]:
    """Rows of the public reference API: packed exactly as `fastsampler.sample` packs them (same validation, same
    float32 parameters), then read back by `rows_from_packed`."""
    x = logits if isinstance(logits, torch.Tensor) else np.asarray(logits)
    if x.dtype not in (np.float16, np.float32, np.float64, torch.float16, torch.bfloat16, torch.float32,
                       torch.float64):
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {x.dtype}")
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    as_t = lambda a: None if a is None else torch.as_tensor(a)  # numpy state arrays to tensors
    batch = pack_batch(t.detach().cpu(), params, prompt_token_ids=prompt_token_ids,
                       output_token_ids=output_token_ids, prompt_mask=as_t(prompt_mask),
                       output_counts=as_t(output_counts), **kwargs)
    rows = rows_from_packed(batch)
    if batch.flags.any_dry:  # DRY from the sequences themselves (the definition), not from the packed table
        plist = param_batch(params, len(rows)).plist()
        for r, row in enumerate(rows):
            hist = [*(prompt_token_ids[r] if prompt_token_ids is not None else ()),
                    *(output_token_ids[r] if output_token_ids is not None else ())]
            row.dry = dry_penalties(hist, plist[r])
    return rows


def _row_params(f: np.ndarray, i: np.ndarray) -> SimpleNamespace:
    """One row's parameters from its packed float32 / int32 columns, named as in `SamplingParams`.

    Both entry points read parameters this way, so the reference sees exactly the float32 values the kernels see.
    """
    f = np.asarray(f, dtype=np.float32).astype(np.float64)
    return SimpleNamespace(
        temperature=f[F_TEMPERATURE], top_p=f[F_TOP_P], min_p=f[F_MIN_P], typical_p=f[F_TYPICAL_P],
        frequency_penalty=f[F_FREQ], presence_penalty=f[F_PRES], repetition_penalty=f[F_REP],
        mirostat_target=f[F_MIRO_TAU], mirostat_lr=f[F_MIRO_ETA], epsilon_cutoff=f[F_EPSILON], eta_cutoff=f[F_ETA],
        top_n_sigma=f[F_NSIGMA], xtc_probability=f[F_XTC_P], xtc_threshold=f[F_XTC_T], dynatemp_range=f[F_DYN_RANGE],
        dynatemp_exponent=f[F_DYN_EXP], top_k=int(i[I_TOP_K]),
        min_keep=int(i[I_MIN_KEEP]), mirostat_mode=int(i[I_MIRO_MODE]),
        min_tokens=int(i[I_MIN_TOKENS]), ignore_eos=bool(i[I_IGNORE_EOS]),
        logprobs=bool(i[I_LOGPROBS]), top_logprobs=int(i[I_TOP_LOGPROBS]),
        logprobs_mode=LOGPROBS_MODES[int(i[I_LOGPROBS_MODE])],
    )


def rows_from_packed(batch: Any) -> list[_Row]:
    """Rows of a `PackedBatch` (used by the reference backend); parameters are the packed float32 values."""
    x = _to_numpy(batch.logits).astype(np.float64)
    b = x.shape[0]
    vocab = batch.vocab_size
    f = _to_numpy(batch.fparams)
    i = _to_numpy(batch.iparams).astype(np.int64)
    seeds = _to_numpy(batch.seeds).astype(np.int64)
    steps = _to_numpy(batch.steps).astype(np.int64)
    seqs = _to_numpy(batch.seqs).astype(np.int64)
    mus = _to_numpy(batch.mirostat_mu).astype(np.float32)
    allowed = None if batch.allowed_mask is None else bitmask_to_bool(_to_numpy(batch.allowed_mask), vocab)
    prompt = None if batch.prompt_mask is None else bitmask_to_bool(_to_numpy(batch.prompt_mask), vocab)
    counts = None if batch.output_counts is None else _to_numpy(batch.output_counts).astype(np.int64)[:, :vocab]
    eos = _to_numpy(batch.eos_ids).astype(np.int64).reshape(-1)
    indptr = None if batch.bias_indptr is None else _to_numpy(batch.bias_indptr)
    bids = None if batch.bias_ids is None else _to_numpy(batch.bias_ids)
    bvals = None if batch.bias_vals is None else _to_numpy(batch.bias_vals).astype(np.float64)
    dry_ids = None if getattr(batch, "dry_ids", None) is None else _to_numpy(batch.dry_ids)
    dry_vals = None if dry_ids is None else _to_numpy(batch.dry_vals).astype(np.float64)
    forced = getattr(batch, "forced_tokens", None)
    forced = np.full(b, -1, dtype=np.int64) if forced is None else _to_numpy(forced).astype(np.int64)
    rows = []
    for r in range(b):
        p = _row_params(f[r], i[r])
        bias = {}
        if indptr is not None:
            lo, hi = indptr[r], indptr[r + 1]
            bias = {int(t): float(v) for t, v in zip(bids[lo:hi], bvals[lo:hi], strict=True)}
        dry = {} if dry_ids is None else {int(t): float(v) for t, v in zip(dry_ids[r], dry_vals[r], strict=True)
                                          if t != DRY_PAD}
        rows.append(_Row(x=x[r], vocab=vocab, p=p, seed=int(seeds[r]) & 0xFFFFFFFFFFFFFFFF, step=int(steps[r]),
                         seq=int(seqs[r]), mu=float(mus[r]), bias=bias, dry=dry,
                         allowed=None if allowed is None else allowed[r],
                         prompt=None if prompt is None else prompt[r],
                         counts=None if counts is None else counts[r], eos=eos, forced=int(forced[r])))
    return rows


# ----------------------------------------------------------------------------------------------- batch outputs
def _collect(rows: list[_Row], results: list[_RowResult], width: int, n_top: int) -> SampleOutput:
    b = len(rows)
    tokens = np.full(b, -1, dtype=np.int64)
    valid = np.zeros(b, dtype=bool)
    logprobs = np.full(b, np.nan)
    top_ids = np.full((b, n_top), -1, dtype=np.int64)
    top_lps = np.full((b, n_top), np.nan)
    ranks = np.full(b, -1, dtype=np.int64)
    mus = np.array([res.mu for res in results], dtype=np.float64)
    for r, (row, res) in enumerate(zip(rows, results, strict=True)):
        if not res.valid:
            continue
        tokens[r], valid[r] = res.token, True
        if res.lp is not None:
            lp = res.lp
            logprobs[r] = lp[res.token]
            ranks[r] = 1 + int((lp > lp[res.token]).sum())
            n = int(row.p.top_logprobs)
            if n:
                order = np.lexsort((np.arange(lp.size), -lp))[:n]
                top_ids[r, : order.size] = order
                top_lps[r, : order.size] = lp[order]
    return SampleOutput(tokens, valid, logprobs, top_ids, top_lps, ranks, mus)


def sample_rows(rows: list[_Row], width: int) -> tuple[SampleOutput, list[_RowResult]]:
    results = [_run_row(row) for row in rows]
    n_top = max((int(row.p.top_logprobs) for row in rows), default=0)
    return _collect(rows, results, width, n_top), results


def probs_rows(rows: list[_Row], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), dtype=np.float64)
    for r, row in enumerate(rows):
        res = _run_row(row)
        if res.valid:
            out[r, : row.vocab] = res.probs
    return out


# ----------------------------------------------------------------------------------------------------- public API
def process_logits(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    **state: Any,
) -> np.ndarray:
    """Stages A–D of every row (greedy rows: A–C), ``(B, V)`` float64.

    Masked and padding columns are ``-inf``; an input row with NaN / ``+inf`` is returned as it comes out of the
    arithmetic (such rows are invalid for sampling). ``state`` takes the keyword arguments of `sample`.

    >>> import numpy as np
    >>> process_logits(np.array([[1.0, 2.0]]), SamplingParams(temperature=2.0)).tolist()
    [[0.5, 1.0]]
    """
    rows = _rows_from_args(logits, params, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
                           **state)
    width = rows[0].x.size if rows else 0
    out = np.full((len(rows), width), -np.inf)
    for r, row in enumerate(rows):
        l = _stage_a_to_c(row)
        t = float(row.p.temperature)
        with np.errstate(over="ignore", invalid="ignore"):
            out[r, : row.vocab] = l if t == 0.0 else l / t
    return out


def sampling_probs(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    mirostat_mu: Any = None,
    **state: Any,
) -> np.ndarray:
    """The distribution each row's token is drawn from, ``(B, V)`` float64.

    Zero outside the kept set, one-hot for greedy rows, all zero for invalid rows.

    >>> import numpy as np
    >>> sampling_probs(np.array([[0.0, 0.0, -50.0]]), SamplingParams(top_k=2)).round(3).tolist()
    [[0.5, 0.5, 0.0]]
    """
    rows = _rows_from_args(logits, params, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
                           mirostat_mu=mirostat_mu, **state)
    return probs_rows(rows, rows[0].x.size if rows else 0)


def sample(
    logits: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    steps: Any = None,
    seqs: Any = None,
    mirostat_mu: Any = None,
    vocab_size: int | None = None,
    **state: Any,
) -> SampleOutput:
    """Sample one token per row; the definition every backend reproduces.

    Parameters
    ----------
    logits : (B, V) float16 / float32 / float64 array (or torch tensor)
    params : SamplingParams or a sequence of B of them
    prompt_token_ids, output_token_ids : B token-id sequences, optional
    steps, seqs : (B,) ints, optional (default 0)
    mirostat_mu : (B,) floats, optional (default ``2 * mirostat_target``)
    vocab_size : int, optional (columns at and beyond it are padding)
    **state : seeds, prompt_mask, output_counts, token_bitmask, eos_token_ids as in `fastsampler.sample`

    Returns
    -------
    SampleOutput of numpy arrays (float64 logprobs and mu).

    >>> import numpy as np
    >>> sample(np.array([[0.0, 3.0, 1.0]]), SamplingParams(temperature=0.0)).tokens.tolist()
    [1]
    """
    if not isinstance(params, (SamplingParams, list, tuple)):
        params = list(params)  # an iterator: read twice below
    rows = _rows_from_args(logits, params, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
                           steps=steps, seqs=seqs, mirostat_mu=mirostat_mu, vocab_size=vocab_size, **state)
    out, _ = sample_rows(rows, rows[0].x.size if rows else 0)
    out.stopped = stopped_rows(out.tokens, params, state.get("eos_token_ids", ()))
    return out


def diagnose(logits: Any, params: SamplingParams | Sequence[SamplingParams], **kwargs: Any) -> dict[str, Any]:
    """Which rows sit at a near-tie, where an fp32 backend may legitimately pick another token or kept set.

    Takes the arguments of `sample`. Returns ``{"near_tie": (B,) bool, "reasons": list of B lists of str,
    "output": SampleOutput}``. A row is a near-tie when the top two race scores at either level differ by less than
    ``RACE_TIE_TOL``, or a truncation decision (top-k / top-p / min-p / typical / mirostat boundary, greedy argmax) is
    within rounding (``BOUNDARY_TOL``) of flipping.
    """
    rows = _rows_from_args(logits, params, **kwargs)
    out, results = sample_rows(rows, rows[0].x.size if rows else 0)
    reasons = [res.reasons for res in results]
    return {"near_tie": np.array([bool(r) for r in reasons], dtype=bool), "reasons": reasons, "output": out}
