"""Exact comparison of a backend against the numpy reference (docs/semantics.md §8), shared by every backend's tests.

Tokens must be equal on every row that is not a near-tie; near-tie rows (reference.diagnose) are reported through a
warning and in the returned report, never silently dropped. Logprobs, top logprobs, ranks, mirostat mu and
sampling_probs must agree within 1e-5 where the token agrees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fastsampler
from fastsampler import reference
from fastsampler.backends.reference import pipeline

ATOL = 1e-5


class NearTieWarning(UserWarning):
    """Rows skipped for token equality because the reference sits at a near-tie."""


@dataclass
class Report:
    rows: int = 0
    compared: int = 0
    near_ties: list[tuple[int, list[str]]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.compared}/{self.rows} rows compared exactly, {len(self.near_ties)} near-tie(s): {self.near_ties}"


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy() if x.dtype == torch.bfloat16 else x.detach().cpu().numpy()
    return np.asarray(x)


def _mismatch(name: str, got: np.ndarray, want: np.ndarray, rows: np.ndarray, ctx: str) -> str:
    idx = np.nonzero(rows)[0]
    lines = [f"{name}: {idx.size} row(s) differ ({ctx}); first rows {idx[:8].tolist()}"]
    for r in idx[:4]:
        lines.append(f"  row {r}: got {got[r]!r} want {want[r]!r}")
    return "\n".join(lines)


def _close(a: np.ndarray, b: np.ndarray, atol: float) -> np.ndarray:
    """Elementwise |a - b| <= atol with NaN == NaN and equal infinities; reduced over trailing axes."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    same = (np.isnan(a) & np.isnan(b)) | (a == b)
    with np.errstate(invalid="ignore"):
        ok = same | (np.abs(a - b) <= atol)
    return ok.reshape(ok.shape[0], -1).all(axis=1) if ok.ndim > 1 else ok


def check_against_reference(
    backend: str,
    logits: Any,
    params: Any,
    *,
    check_probs: bool = True,
    atol: float = ATOL,
    **kwargs: Any,
) -> Report:
    """Run ``fastsampler.sample(..., backend=backend)`` and the reference on the same inputs and compare.

    ``logits`` is a torch tensor (any float dtype the backend takes) or numpy array; the reference sees the same
    values upcast. Every row must carry a seed (``params.seed`` or ``seeds=``) so both sides draw the same noise.
    """
    plist = [params] * len(logits) if isinstance(params, fastsampler.SamplingParams) else list(params)
    if kwargs.get("seeds") is None and any(p.seed is None for p in plist):
        raise ValueError("check_against_reference needs a seed on every row")
    t = logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))
    ref_logits = _np(t)
    out = fastsampler.sample(t, plist, backend=backend, **kwargs).numpy()
    rows = pipeline._rows_from_args(ref_logits, plist, **kwargs)
    results = [pipeline._run_row(r) for r in rows]
    ref, _ = pipeline.sample_rows(rows, ref_logits.shape[1])
    near = np.array([bool(res.reasons) for res in results], dtype=bool)
    report = Report(rows=len(plist))
    report.near_ties = [(r, results[r].reasons) for r in np.nonzero(near)[0].tolist()]
    errors = []

    bad = out.valid != ref.valid
    if bad.any():
        errors.append(_mismatch("valid", out.valid, ref.valid, bad, "validity never depends on ties"))
    tok_bad = (out.tokens != ref.tokens) & ~near
    if tok_bad.any():
        errors.append(_mismatch("tokens", out.tokens, ref.tokens, tok_bad, "not near-ties"))
    same = (out.tokens == ref.tokens) & ~near
    report.compared = int(same.sum())

    if same.any():
        lp_bad = ~_close(out.logprobs, ref.logprobs, atol) & same
        if lp_bad.any():
            errors.append(_mismatch("logprobs", out.logprobs, ref.logprobs, lp_bad, f"atol {atol}"))
        mu_bad = ~_close(out.mirostat_mu, ref.mirostat_mu, atol) & same
        if mu_bad.any():
            errors.append(_mismatch("mirostat_mu", out.mirostat_mu, ref.mirostat_mu, mu_bad, f"atol {atol}"))
        if ref.top_logprobs.shape[1]:
            tl_bad = ~_close(out.top_logprobs, ref.top_logprobs, atol) & same
            if tl_bad.any():
                errors.append(_mismatch("top_logprobs", out.top_logprobs, ref.top_logprobs, tl_bad, f"atol {atol}"))
        for r in np.nonzero(same)[0]:
            res = results[r]
            if res.lp is None:
                if out.ranks[r] != -1:
                    errors.append(f"ranks: row {r} did not ask for logprobs but got rank {out.ranks[r]}")
                continue
            lp = res.lp
            x = ref.tokens[r]
            # ids and ranks may only differ where reference logprobs are within atol of each other
            lo = 1 + int((lp > lp[x] + atol).sum())
            hi = 1 + int((lp > lp[x] - atol).sum()) - (1 if np.isfinite(lp[x]) else 0)
            hi = max(hi, lo, int(ref.ranks[r]))
            if not lo <= out.ranks[r] <= hi:
                errors.append(f"ranks: row {r} got {out.ranks[r]}, reference {ref.ranks[r]} (allowed {lo}..{hi})")
            for j, (gid, rid) in enumerate(zip(out.top_logprob_ids[r], ref.top_logprob_ids[r], strict=True)):
                if gid == rid:
                    continue
                if gid < 0 or rid < 0 or not (abs(lp[gid] - lp[rid]) <= atol or lp[gid] == lp[rid]):
                    errors.append(f"top_logprob_ids: row {r} position {j} got {gid}, reference {rid}")
                    break

    if check_probs:
        got_p = _np(fastsampler.sampling_probs(t, plist, backend=backend, **kwargs)).astype(np.float64)
        want_p = reference.sampling_probs(ref_logits, plist, **kwargs)
        pb = ~_close(got_p, want_p, atol) & ~near
        if pb.any():
            r = int(np.nonzero(pb)[0][0])
            d = np.abs(got_p[r] - want_p[r])
            errors.append(f"sampling_probs: {int(pb.sum())} row(s) differ beyond {atol}; row {r}: max |diff| "
                          f"{d.max():.3g} at id {int(d.argmax())} (got {got_p[r, d.argmax()]:.9g}, want "
                          f"{want_p[r, d.argmax()]:.9g})")

    if report.near_ties:
        warnings.warn(f"{backend}: {len(report.near_ties)} near-tie row(s) not compared for token equality: "
                      f"{report.near_ties}", NearTieWarning, stacklevel=2)
    if errors:
        raise AssertionError(f"backend {backend!r} disagrees with the reference:\n" + "\n".join(errors)
                             + f"\n{report}")
    return report
