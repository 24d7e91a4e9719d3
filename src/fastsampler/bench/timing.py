"""Timing: CUDA events on the GPU, ``time.perf_counter_ns`` on the CPU, always rotating the input buffers.

GPU (`time_cuda`): after warm-up, each timed call is bracketed by two CUDA events on the current stream; before each
call a scratch buffer of twice the L2 size is zeroed (outside the events), as ``triton.testing.do_bench`` does, and the
logits buffer rotates, so neither the logits nor the sampler's own workspace are served from a warm L2. The result is
the device time per call; host work that is shorter than the flush overlaps with it. ``wall_us`` adds the
back-to-back throughput time (host clock around a burst of calls, then one synchronisation), which includes the
host-side work (Python, launches, packing) whenever it is the bottleneck.

CPU (`time_cpu`): the host clock around each call, after warm-up, rotating buffers; ``wall_us`` is the mean.

Both stop at ``max_reps`` or when ``budget_s`` is spent (after at least ``min_reps``), and report the median and
the 20th / 80th percentiles in microseconds.

Copy (`time_copy`): ``dst.copy_(src)`` of a case's own logits buffers, timed as the providers are (same clock, same
rotation, the same L2 flush on the GPU; on the CPU on the run's threads and on one), in short slices between the
providers of the case; the case's ``%copy`` ratios are taken against the 20th percentile of those copies, so a copy
and the samplers it is compared with see the same bytes, the same cache state and the same load on the machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Timing", "TimingConfig", "time_cpu", "time_cuda", "time_call", "time_copy", "copy_slice_config"]


@dataclass
class TimingConfig:
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 100
    budget_s: float = 0.25  # per provider and case
    flush: bool = True  # GPU: zero a 2x-L2 scratch buffer before each timed call


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    wall_us: float
    reps: int
    samples_us: list[float] = field(default_factory=list, repr=False)  # every timed call, in order

    @classmethod
    def from_samples(cls, samples_us: list[float], wall_us: float) -> Timing:
        a = np.asarray(samples_us, dtype=np.float64)
        p20, med, p80 = np.percentile(a, [20, 50, 80])
        return cls(float(med), float(p20), float(p80), float(wall_us), len(a), [float(x) for x in a])


def time_cpu(fn: Callable[[int], object], n_buffers: int, cfg: TimingConfig) -> Timing:
    for w in range(cfg.warmup):
        fn(w % n_buffers)
    samples: list[float] = []
    deadline = time.perf_counter() + cfg.budget_s
    for r in range(cfg.max_reps):
        t0 = time.perf_counter_ns()
        fn(r % n_buffers)
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        if r + 1 >= cfg.min_reps and time.perf_counter() > deadline:
            break
    return Timing.from_samples(samples, float(np.mean(samples)))


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def _scratch(device: torch.device) -> torch.Tensor:
    if device not in _SCRATCH:
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
        _SCRATCH[device] = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)
    return _SCRATCH[device]


def time_cuda(fn: Callable[[int], object], n_buffers: int, cfg: TimingConfig, device: torch.device) -> Timing:
    scratch = _scratch(device) if cfg.flush else None
    for w in range(cfg.warmup):
        fn(w % n_buffers)
    torch.cuda.synchronize(device)
    # one timed call to size the repetitions to the budget
    t0 = time.perf_counter()
    fn(0)
    torch.cuda.synchronize(device)
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.budget_s / 2 / one)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for r in range(reps):
        if scratch is not None:
            scratch.zero_()
        starts[r].record()
        fn(r % n_buffers)
        ends[r].record()
    torch.cuda.synchronize(device)
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    # back-to-back throughput, host work included
    t0 = time.perf_counter()
    for r in range(reps):
        fn(r % n_buffers)
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / reps * 1e6
    return Timing.from_samples(samples, wall)


def time_call(fn: Callable[[int], object], n_buffers: int, cfg: TimingConfig, device: torch.device,
              *, host_only: bool = False) -> Timing:
    if device.type == "cuda" and not host_only:
        return time_cuda(fn, n_buffers, cfg, device)
    return time_cpu(fn, n_buffers, cfg)


def copy_slice_config(cfg: TimingConfig) -> TimingConfig:
    """The timing of one copy slice (`time_copy`) in a run timed with ``cfg``: a few calls, a fifth of the budget."""
    return TimingConfig(warmup=1, min_reps=3, max_reps=max(3, min(cfg.max_reps, 20)), budget_s=cfg.budget_s / 5,
                        flush=cfg.flush)


def time_copy(buffers: list[torch.Tensor], cfg: TimingConfig, device: torch.device,
              dst: torch.Tensor | None = None) -> Timing:
    """One slice of copy timings: ``dst.copy_(buffers[i])`` rotating through ``buffers``, as `time_call` times a
    provider (``2 * nbytes`` moved per call: read + write). ``dst`` (same shape and dtype) is reused across slices.

    On the CPU with several threads the copy is timed on one thread too, and the samples of both are returned: on a
    loaded machine a multi-threaded copy of a few MB waits for a busy core a whole scheduler time slice (8 ms against
    0.15 ms for 4 MB on the 2-core machine), where one thread is not held up; the low percentile the caller takes
    then comes from whichever copy ran undisturbed."""
    if dst is None:
        dst = torch.empty_like(buffers[0])

    def fn(i: int) -> object:
        return dst.copy_(buffers[i])

    t = time_call(fn, len(buffers), cfg, device)
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return t
    torch.set_num_threads(1)
    try:
        one = time_call(fn, len(buffers), cfg, device)
    finally:
        torch.set_num_threads(threads)
    samples = t.samples_us + one.samples_us
    return Timing.from_samples(samples, float(np.mean(samples)))
