"""The benchmark loop: for every case, build the inputs, check every provider against the reference, time it.

Between the timed providers of a case (before each, and after the last) a short slice of ``dst.copy_(logits)`` on
the case's own buffers is timed (`fastsampler.bench.timing.time_copy`); the case's ``%copy`` ratios are taken against
the 20th percentile of those copies (the copy's speed when nothing disturbs it: on a loaded machine a short copy
that waits for a busy core loses a whole scheduler time slice), and a ratio no sampler can reach (``%copy`` above
`report.PCT_COPY_MAX`) is flagged.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .providers import NotApplicable, Provider
from .report import ERROR, FAILED, NA, OK, SKIPPED, Result, set_bandwidth
from .scenarios import SCENARIOS, check_inputs, make_inputs
from .timing import TimingConfig, copy_slice_config, time_call, time_copy
from .validate import check_provider, reference_probs, step_dependent

__all__ = ["BenchConfig", "Progress", "run_benchmark"]


@dataclass
class BenchConfig:
    scenarios: list[str]
    batch_sizes: list[int]
    vocab_sizes: list[int]
    dtypes: list[str]
    device: torch.device
    timing: TimingConfig = field(default_factory=TimingConfig)
    check_rows: int = 4
    check_steps: int = 8
    budget_s: float | None = None  # whole run; cases not started by then are reported as skipped
    seed: int = 1234
    n_buffers: int | None = None

    def cases(self) -> list[tuple[str, str, int, int]]:
        """(dtype, scenario, vocab, batch) in run order: the first dtype's scenarios first, batch innermost."""
        return [(dt, s, v, b) for dt in self.dtypes for s in self.scenarios for v in self.vocab_sizes
                for b in self.batch_sizes]


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, a line per 10% otherwise)."""

    def __init__(self, total: int, enabled: bool = True, stream=None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.t0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"[{bar}] {self.done}/{self.total} {elapsed:5.0f}s {label}"
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
            if self.done == self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or self.done == self.total:
                self._last_decile = decile
                self.stream.write(line + "\n")
        self.stream.flush()


def _speedups(case_results: list[Result]) -> None:
    base = {r.provider: r.median_us for r in case_results if r.status == OK}
    for r in case_results:
        if r.status != OK:
            continue
        for name, t in base.items():
            if name != r.provider and name in ("torch-sort", "torch-warpers", "flashinfer", "numpy-ref"):
                r.speedups[name] = t / r.median_us


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) < 240 else msg[:237] + "..."


def run_benchmark(
    cfg: BenchConfig,
    providers: list[Provider],
    *,
    progress: Progress | None = None,
    on_case: Callable[[list[Result]], None] | None = None,
) -> list[Result]:
    """Run every case of ``cfg`` with every provider; ``on_case`` gets each case's results as soon as they exist."""
    results: list[Result] = []
    ref_cache: dict[tuple, np.ndarray | BaseException] = {}
    t_start = time.perf_counter()
    dev = cfg.device
    for dt, scen_name, vocab, batch in cfg.cases():
        scen = SCENARIOS[scen_name]
        case: list[Result] = []
        over = cfg.budget_s is not None and time.perf_counter() - t_start > cfg.budget_s
        if over:
            case = [Result(scen_name, dt, batch, vocab, p.name, SKIPPED, "time budget spent") for p in providers]
            for _ in providers:
                if progress:
                    progress.step(f"{scen_name} {dt} B={batch} V={vocab} skipped")
            results += case
            if on_case:
                on_case(case)
            continue
        try:
            inp = make_inputs(scen, dt, batch, vocab, dev, seed=cfg.seed, check_rows=cfg.check_rows,
                              n_buffers=cfg.n_buffers)
        except Exception as e:  # e.g. out of memory for the largest cases
            case = [Result(scen_name, dt, batch, vocab, p.name, ERROR, f"inputs: {_short(e)}") for p in providers]
            for _ in providers:
                if progress:
                    progress.step(f"{scen_name} {dt} B={batch} V={vocab} error")
            results += case
            if on_case:
                on_case(case)
            continue
        key = (scen_name, dt, vocab)
        if key not in ref_cache:  # once per (scenario, dtype, vocabulary): the checked rows do not depend on B
            ref_cache.clear()  # cases come grouped by key: an old one is never needed again
            try:
                chk_in = check_inputs(scen, dt, vocab, cfg.check_rows, seed=cfg.seed)
                ref_cache[key] = (reference_probs(chk_in), [reference_probs(chk_in, s) for s in range(
                    cfg.check_steps)] if step_dependent(chk_in.params) else None)
            except Exception as e:
                ref_cache[key] = e
        ref = ref_cache[key]
        copies: list[float] = []  # µs of every copy call timed between this case's providers
        copy_cfg = copy_slice_config(cfg.timing)
        dst = torch.empty_like(inp.buffers[0])
        step_refs = None
        if not isinstance(ref, BaseException):
            ref, step_refs = ref
            ref = ref[: inp.check_rows]
        for prov in providers:
            label = f"{scen_name} {dt} B={batch} V={vocab} {prov.name}"
            res = Result(scen_name, dt, batch, vocab, prov.name, OK, logit_bytes=inp.logit_bytes)
            try:
                prep = prov.prepare(inp)
                if isinstance(ref, BaseException):
                    raise RuntimeError(f"no reference distribution to check against ({_short(ref)})")
                chk = check_provider(prep, inp, ref, steps=cfg.check_steps, step_refs=step_refs)
                if not chk.ok:
                    res.status, res.note = FAILED, chk.note
                else:
                    copies += time_copy(inp.buffers, copy_cfg, dev, dst).samples_us
                    tm = time_call(prep.run, len(inp.buffers), cfg.timing, dev, host_only=prep.host_only)
                    res.median_us, res.p20_us, res.p80_us = tm.median_us, tm.p20_us, tm.p80_us
                    res.wall_us, res.reps = tm.wall_us, tm.reps
                    res.gbps = inp.logit_bytes / (tm.median_us * 1e-6) / 1e9
                    res.note = chk.note
            except NotApplicable as e:
                res.status, res.note = NA, str(e)
            except Exception as e:
                res.status, res.note = ERROR, _short(e)
            case.append(res)
            if progress:
                progress.step(label)
        if copies:  # the closing slice: the last provider's timing has a copy on either side
            with contextlib.suppress(Exception):  # the copies before the providers stand alone
                copies += time_copy(inp.buffers, copy_cfg, dev, dst).samples_us
            set_bandwidth(case, float(np.percentile(copies, 20)))
        _speedups(case)
        results += case
        if on_case:
            on_case(case)
        del inp, dst
        if dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return results

