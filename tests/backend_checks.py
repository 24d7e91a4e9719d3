"""Helpers shared by every backend's tests: which backends run here, and exact comparison against the numpy
reference (docs/semantics.md §8).

Tokens must be equal on every row that is not a near-tie; near-tie rows (reference.diagnose) are reported through a
warning and in the returned report, never silently dropped. Logprobs, top logprobs, ranks, mirostat mu and
sampling_probs must agree within 1e-5 where the token agrees. `check_exact` is the form tests call: near-ties are
printed (visible with ``-s`` and in a failure's captured output) instead of warned.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import reference
from fastsampler._batch import stopped_rows
from fastsampler.backends.reference import pipeline

ATOL = 1e-5
BACKENDS = ("reference", "cpu", "triton")
# backends whose logprobs do not depend on the batch to the last bit (docs/semantics.md §8 promises the same token on
# every backend; the Triton backend also combines its chunk partials in a fixed order, see its module docstring)
BITWISE_BATCH_INVARIANT = ("triton",)


def triton_available() -> bool:
    """Whether triton imports (without importing it: the interpreter flag must be set first, see conftest)."""
    return importlib.util.find_spec("triton") is not None


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs its kernels in the Triton interpreter here (triton on a machine without CUDA)."""
    return backend == "triton" and not torch.cuda.is_available()


# a Triton test too large for the interpreter in ``make test``: ``slow`` on a machine without CUDA, a no-op mark on CUDA
slow_in_interpreter = pytest.mark.slow if not torch.cuda.is_available() else pytest.mark.usefixtures()


def unavailable(backend: str) -> str:
    """Why ``backend`` cannot run here, or "" when it can."""
    if backend == "triton" and not triton_available():
        return "triton is not installed"
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device and TRITON_INTERPRET is not set"
    if backend not in fastsampler.available_backends():
        return f"the {backend} backend is not available here (see fastsampler.available_backends())"
    return ""


def backend_params(*, slow_interpreted: bool = False, skip_interpreted: str = "") -> list:
    """``pytest.param`` per backend of `BACKENDS`: skipped with the reason when it cannot run here; the Triton
    interpreter marked ``interpreter``, and ``slow`` with ``slow_interpreted`` (a case too large to run there in
    ``make test``) or skipped with ``skip_interpreted``, the reason (a case that takes minutes there: it runs natively
    on CUDA, and on the other backends everywhere)."""
    out = []
    for name in BACKENDS:
        marks = []
        reason = unavailable(name)
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        if name == "triton":
            marks.append(pytest.mark.interpreter)
            if slow_interpreted and interpreted(name):
                marks.append(pytest.mark.slow)
            if skip_interpreted and interpreted(name):
                marks.append(pytest.mark.skip(reason=f"Triton interpreter: {skip_interpreted}; runs natively on CUDA"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def backend_device(backend: str) -> torch.device:
    """Where ``backend`` takes its logits: CUDA for triton when present, else the CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


class NearTieWarning(UserWarning):
    """Rows skipped for token equality because the reference sits at a near-tie."""


@dataclass
class Report:
    rows: int = 0
    compared: int = 0
    near_ties: list[tuple[int, list[str]]] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.compared}/{self.rows} rows compared exactly, {len(self.near_ties)} near-tie(s): {self.near_ties}"


def random_logits(b: int, v: int, seed: int, scale: float = 2.0, ties: bool = False, dtype: torch.dtype = torch.float32,
                  device: Any = "cpu") -> torch.Tensor:
    """``(b, v)`` standard-normal logits times ``scale`` from ``seed`` (``ties``: rounded to halves, so many values
    repeat), in ``dtype`` on ``device``."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal((b, v)) * scale).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2
    return torch.from_numpy(x).to(dtype=dtype, device=device)


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
    """Elementwise |a - b| <= atol plus one float32 ulp of ``b`` (the outputs are float32: a logprob of -910 is only
    resolved to 6e-5, docs/semantics.md §8), with NaN == NaN and equal infinities; reduced over trailing axes."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    same = (np.isnan(a) & np.isnan(b)) | (a == b)
    with np.errstate(invalid="ignore"):
        ok = same | (np.abs(a - b) <= atol + np.abs(b) * 2.0**-23)
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

    ref_stopped = stopped_rows(ref.tokens, plist, kwargs.get("eos_token_ids", ()))
    if (out.stopped is None) != (ref_stopped is None):
        errors.append(f"stopped: got {out.stopped}, reference {ref_stopped} (None exactly when no row has stop ids)")
    elif ref_stopped is not None and (np.asarray(out.stopped) != ref_stopped)[same].any():
        errors.append(_mismatch("stopped", np.asarray(out.stopped), ref_stopped,
                                (np.asarray(out.stopped) != ref_stopped) & same, "same token"))
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


def check_exact(backend: str, logits: Any, params: Any, **kwargs: Any) -> Report:
    """`check_against_reference`, with the near-tie rows printed rather than warned; every row is either compared
    exactly or reported as a near-tie."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NearTieWarning)
        rep = check_against_reference(backend, logits, params, **kwargs)
    for w in caught:
        if issubclass(w.category, NearTieWarning):
            print(f"near-tie report: {w.message}")  # visible with -s / in the captured output of a failure
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    assert rep.compared + len(rep.near_ties) == rep.rows, rep
    return rep


def check_batch(backend: str, batch: dict, dtype: torch.dtype = torch.float32) -> Report:
    """`check_exact` of a batch drawn by `tests.strategies.batches` (numpy logits, cast to ``dtype`` on the backend's
    device)."""
    b = dict(batch)
    logits = torch.from_numpy(b.pop("logits")).to(dtype=dtype, device=backend_device(backend))
    return check_exact(backend, logits, b.pop("params"), **b)


def _invariance_requests() -> dict[str, tuple[Any, list]]:
    SP = fastsampler.SamplingParams
    return {  # target request, the other rows of its batches
        # the radix selects (typical-p: no candidate engine)
        "selects": (SP(seed=77, top_k=30, top_p=0.9, typical_p=0.95, logprobs=True, top_logprobs=4),
                    [SP(seed=1, mirostat_mode=1), SP(seed=2, temperature=0.0), SP(seed=3, min_p=0.2, min_keep=4)]),
        # the candidate engine (Triton), next to rows on its exact fallback (top-p alone) and greedy rows
        "candidates": (SP(seed=77, top_k=30, top_p=0.9, min_p=0.02, logprobs=True, top_logprobs=4),
                       [SP(seed=1, top_p=0.8), SP(seed=2, temperature=0.0), SP(seed=3, top_k=5, min_keep=4)]),
    }


# requests whose outputs must not depend on the batch around them (`assert_batch_invariant`)
INVARIANCE = _invariance_requests()


def assert_same_floats(backend: str, got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to the bit on `BITWISE_BATCH_INVARIANT` backends, else within `ATOL` (NaN equal to NaN)."""
    if backend in BITWISE_BATCH_INVARIANT:
        assert torch.equal(got, want), (got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, equal_nan=True)


def assert_batch_invariant(backend: str, target: Any, others: list, device: Any, vocab: int = 4097) -> None:
    """One request (``target``) alone and at several positions in batches of other requests of different sizes:
    token, top logprob ids and rank identical, logprobs and top logprobs as `assert_same_floats`."""
    row = torch.from_numpy((np.random.default_rng(13).standard_normal((1, vocab)) * 2.0).astype(np.float32))
    row = row.to(device)
    alone = fastsampler.sample(row, target, backend=backend, steps=[5])
    for size, pos in [(2, 0), (3, 2), (6, 3)]:
        fill = np.random.default_rng(100 + size).standard_normal((size, vocab)) * 2.0
        batch = torch.from_numpy(fill.astype(np.float32)).to(device)
        batch[pos] = row[0]
        params = [others[i % len(others)] for i in range(size)]
        params[pos] = target
        steps = [11] * size
        steps[pos] = 5
        out = fastsampler.sample(batch, params, backend=backend, steps=steps)
        assert int(out.tokens[pos]) == int(alone.tokens[0])
        assert_same_floats(backend, out.logprobs[pos:pos + 1], alone.logprobs)
        assert torch.equal(out.top_logprob_ids[pos:pos + 1], alone.top_logprob_ids)
        assert_same_floats(backend, out.top_logprobs[pos:pos + 1], alone.top_logprobs)
        assert int(out.ranks[pos]) == int(alone.ranks[0])


def mixed_params(vocab: int, seed: int) -> list[fastsampler.SamplingParams]:
    """Eight requests that together use every feature (truncation rules and epsilon, Mirostat, penalties, bias, bans,
    logprobs modes), seeded from ``seed``."""
    SP = fastsampler.SamplingParams
    return [
        SP(seed=seed, logprobs=True, top_logprobs=5),
        SP(seed=seed + 1, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=3, logprobs_mode="final"),
        SP(seed=seed + 2, top_p=0.9, epsilon_cutoff=0.002, logprobs=True, logprobs_mode="processed", top_logprobs=2),
        SP(seed=seed + 3, typical_p=0.9, min_keep=3, logprobs=True),
        SP(seed=seed + 4, mirostat_mode=1, mirostat_target=4.0, logprobs=True, logprobs_mode="final"),
        SP(seed=seed + 5, mirostat_mode=2, mirostat_target=6.0, mirostat_lr=0.3),
        SP(seed=seed + 6, temperature=0.0, repetition_penalty=1.3, logprobs=True, top_logprobs=4,
           logprobs_mode="final"),
        SP(seed=seed + 7, temperature=0.7, top_k=5000, top_p=0.97, repetition_penalty=1.1, frequency_penalty=0.2,
           presence_penalty=0.3, logit_bias={3: 5.0, vocab - 1: -math.inf}, banned_token_ids=[1, 2], min_tokens=4,
           logprobs=True, top_logprobs=20),
    ]
