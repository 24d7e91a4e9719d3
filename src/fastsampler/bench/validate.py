"""The validity check run on every provider before it is timed.

Nothing fast-but-wrong may reach the table. For each case the reference distribution of the first ``check_rows`` rows
is computed once (`fastsampler.reference`, float64) and each provider must pass, on those rows:

1. *support*: over ``steps`` draws (fresh randomness each), every drawn token lies in ``[0, V)`` and has reference
   probability > 0, i.e. inside the reference's kept set (for greedy rows: it is the argmax);
2. *distribution*: the drawn tokens' summed reference log-probability is within ``Z_MAX`` standard deviations of its
   expectation (``-entropy`` per draw), and the number of draws that hit each row's most likely token is not
   implausibly high (exact Poisson-binomial tail below ``MODE_P_MIN``) — a sampler that always returns the mode, or
   draws at the wrong temperature, fails this even when it stays inside the support;
3. *kept set*, for providers that expose their distribution (``probs()``): it equals the reference's kept set up to
   fp32 rounding at a boundary (at most ``max(8, 1%)`` tokens and ``1e-2`` probability mass differ), and
   probabilities agree within ``PROB_ATOL``;
4. *inputs untouched*: the checked logits rows are unchanged afterwards (a sampler that edits the caller's logits in
   place would also corrupt the rotating buffers it is timed on).

Every batch row's token must also lie in ``[0, V)``. A provider that fails is reported ``FAILED`` with the reason and
is not timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .providers import Prepared
from .scenarios import CaseInputs, CheckInputs

__all__ = ["Check", "reference_probs", "step_dependent", "check_provider", "Z_MAX", "PROB_ATOL"]

Z_MAX = 6.0
MODE_P_MIN = 1e-9
PROB_ATOL = 2e-3


@dataclass
class Check:
    ok: bool
    note: str = ""


def reference_probs(chk: CheckInputs, step: int = 0) -> np.ndarray:
    """(rows, V) float64 reference distribution of the checked rows at ``step`` (zero outside the kept set)."""
    from ..backends import reference

    seeds = np.full(chk.logits.shape[0], chk.seed, dtype=np.int64)
    steps = np.full(chk.logits.shape[0], step, dtype=np.int64)
    return np.asarray(reference.sampling_probs(chk.logits.numpy(), chk.params, seeds=seeds, steps=steps,
                                               **chk.state_kwargs()), dtype=np.float64)


def step_dependent(params: object) -> bool:
    """Whether the kept set depends on the step (XTC's coin, docs/semantics.md §3 E item 6): the draws of
    `check_provider` are then checked against each step's own reference distribution."""
    return bool(getattr(params, "xtc_active", False)) and not getattr(params, "greedy", False)


def _poisson_binomial_tail(p: list[float], k: int) -> float:
    """P(X >= k) for X a sum of independent Bernoulli(p_i)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for i, q in enumerate(p):
        dist[1 : i + 2] = dist[1 : i + 2] * (1 - q) + dist[: i + 1] * q
        dist[0] *= 1 - q
    return float(dist[k:].sum())


def _tokens(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1).astype(np.int64)


def check_provider(prep: Prepared, inp: CaseInputs, ref: np.ndarray, *, steps: int = 8,
                   step_refs: list[np.ndarray] | None = None) -> Check:
    """Run the three checks of the module docstring; never raises for a wrong provider, returns ``ok=False``.
    ``ref`` is the reference at step 0 (what ``probs()`` is compared with); ``step_refs``, when the kept set depends
    on the step (`step_dependent`), the reference of each step the draws are checked against."""
    rows, vocab = ref.shape
    observed = 0.0
    expect, var_sum = 0.0, 0.0
    n_obs = 0
    mode_p: list[float] = []  # reference probability of the row's mode, one per draw
    mode_hits = 0
    before = inp.buffers[0][:rows].clone()
    for step in range(steps):
        ref_s = ref if step_refs is None else step_refs[step][:rows]
        support = ref_s > 0
        with np.errstate(divide="ignore"):
            logp = np.where(support, np.log(np.where(support, ref_s, 1.0)), -np.inf)
        mode = ref_s.argmax(axis=1)
        p_log_p = np.where(support, ref_s * np.where(support, logp, 0.0), 0.0)
        mean = p_log_p.sum(axis=1)  # E[log p] per row = -entropy
        second = np.where(support, ref_s * np.where(support, logp, 0.0) ** 2, 0.0).sum(axis=1)
        expect += float(mean.sum())
        var_sum += float(np.maximum(second - mean**2, 0.0).sum())
        tok = _tokens(prep.draw(step))
        if tok.shape != (inp.batch,):
            return Check(False, f"returned {tok.shape[0]} tokens for a batch of {inp.batch}")
        bad = np.flatnonzero((tok < 0) | (tok >= inp.vocab))
        if bad.size:
            return Check(False, f"step {step}: row {bad[0]} returned token {tok[bad[0]]} outside [0, {inp.vocab})")
        for r in range(rows):
            t = int(tok[r])
            if not support[r, t]:
                return Check(False, f"step {step}: row {r} drew token {t}, outside the reference kept set "
                                    f"({int(support[r].sum())} tokens)")
            observed += float(logp[r, t])
            n_obs += 1
            mode_p.append(float(ref_s[r, mode[r]]))
            mode_hits += int(t == mode[r])

    if not torch.equal(before, inp.buffers[0][:rows]):
        return Check(False, "modified its input logits")
    notes = [f"{steps} draws x {rows} rows in the kept set"]
    if not inp.params.greedy and n_obs:
        if var_sum > 1e-12:
            z = (observed - expect) / math.sqrt(var_sum)
            if abs(z) > Z_MAX:
                return Check(False, f"drawn tokens' mean reference log-probability is {z:+.1f} sd from its "
                                    f"expectation (not drawn from the reference distribution)")
            notes.append(f"z={z:+.1f}")
        tail = _poisson_binomial_tail(mode_p, mode_hits)
        if tail < MODE_P_MIN:
            return Check(False, f"drew the most likely token {mode_hits} times in {n_obs} draws "
                                f"(expected {sum(mode_p):.1f}; P = {tail:.1e}): not drawn from the reference "
                                f"distribution")

    probs = prep.probs()
    if probs is not None:
        p = np.asarray(probs[:rows].detach().float().cpu().numpy() if isinstance(probs, torch.Tensor) else
                       probs[:rows], dtype=np.float64)
        if p.shape != ref.shape:
            return Check(False, f"probs() has shape {p.shape}, expected {ref.shape}")
        if not np.isfinite(p).all():
            return Check(False, "probs() holds NaN or inf")
        support = ref > 0  # (probs() is the distribution at step 0)
        diff = support ^ (p > 0)
        n_diff = int(diff.sum())
        mass = float(ref[diff].sum() + p[diff].sum())
        allowed = max(8, int(0.01 * support.sum(axis=1).max()))
        if n_diff > allowed or mass > 1e-2:
            r = int(np.flatnonzero(diff.any(axis=1))[0])
            return Check(False, f"kept set differs from the reference's in {n_diff} tokens (mass {mass:.3g}); "
                                f"row {r}: {int((p[r] > 0).sum())} kept vs {int(support[r].sum())}")
        if not torch.equal(before, inp.buffers[0][:rows]):
            return Check(False, "modified its input logits")
        err = float(np.abs(p - ref).max())
        if err > PROB_ATOL:
            return Check(False, f"probabilities differ from the reference by up to {err:.3g}")
        notes.append(f"kept set = reference ({n_diff} boundary diffs), max|dp|={err:.1e}")
    return Check(True, "; ".join(notes))

