"""The roofline half of the GPU cost model: device constants, the per-launch estimate and the project's latency goals.

Every constant of the model lives in `GPUS` (one table, sources in ``docs/benchmarks.md`` § Cost model); nothing
else in the model holds a device figure.

A launch is estimated as::

    t = max(bytes / bandwidth(programs), thread_instructions / issue_rate(programs)) + launch_latency

with ``issue_rate(p) = SMs * schedulers * 32 * clock * min(1, p / SMs)`` (thread-instructions per second; a grid of
``p < SMs`` programs keeps only ``p`` SMs busy) and ``bandwidth(p) = min(HBM, min(p, SMs) * per_sm_bandwidth)`` with
``per_sm_bandwidth = HBM / SMs * per_sm_bw_factor`` (one SM cannot pull the whole HBM bandwidth). A step is the sum of
its launches (kernels run one after another on one stream).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GPUS", "GpuSpec", "Estimate", "estimate", "goal_us", "PLAIN_GOALS_US", "GOAL_FACTORS", "gpu"]


@dataclass(frozen=True)
class GpuSpec:
    """Device constants of the roofline (see `GPUS`)."""

    name: str
    hbm_bytes_per_s: float  # peak HBM bandwidth
    sms: int  # streaming multiprocessors
    schedulers_per_sm: int  # warp schedulers per SM, each issuing one warp-instruction per clock
    warp_size: int
    clock_hz: float  # boost clock
    launch_us_graph: float  # per kernel, replayed inside a CUDA graph
    launch_us_stream: float  # per kernel, launched from the host on a stream (no graph)
    per_sm_bw_factor: float  # one SM pulls at most factor x its fair share (HBM / SMs) of the bandwidth

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second of the whole GPU: SMs x schedulers x 32 x clock."""
        return self.sms * self.schedulers_per_sm * self.warp_size * self.clock_hz

    @property
    def per_sm_bytes_per_s(self) -> float:
        """The bandwidth one SM can pull on its own (an assumption, see ``docs/benchmarks.md``)."""
        return self.hbm_bytes_per_s / self.sms * self.per_sm_bw_factor


# THE constants table of the cost model. Sources (docs/benchmarks.md § Cost model): HBM bandwidth from the NVIDIA
# H100 and H200 product datasheets (SXM form factor); SMs, schedulers per SM and the boost clock from the NVIDIA
# Hopper architecture whitepaper / Hopper tuning guide (GH100 SXM5: 132 SMs, 4 warp schedulers per SM, one warp
# instruction per scheduler per clock; 1.98 GHz max boost); launch latencies and the per-SM bandwidth factor are the
# project's assumptions (order of magnitude of published launch-overhead measurements), to be calibrated against
# ``measured_us``.
GPUS: dict[str, GpuSpec] = {
    "h100": GpuSpec(name="H100-SXM", hbm_bytes_per_s=3.35e12, sms=132, schedulers_per_sm=4, warp_size=32,
                    clock_hz=1.98e9, launch_us_graph=1.0, launch_us_stream=2.0, per_sm_bw_factor=4.0),
    "h200": GpuSpec(name="H200-SXM", hbm_bytes_per_s=4.8e12, sms=132, schedulers_per_sm=4, warp_size=32,
                    clock_hz=1.98e9, launch_us_graph=1.0, launch_us_stream=2.0, per_sm_bw_factor=4.0),
}


def gpu(name: str) -> GpuSpec:
    """The `GpuSpec` of ``name`` (a key of `GPUS`, case-insensitive); ValueError for an unknown name."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; choose from {', '.join(GPUS)}") from None


@dataclass(frozen=True)
class Estimate:
    """One launch on one GPU, microseconds."""

    memory_us: float
    compute_us: float
    launch_us: float

    @property
    def total_us(self) -> float:
        return max(self.memory_us, self.compute_us) + self.launch_us

    @property
    def bound(self) -> str:
        """What dominates: ``memory``, ``compute`` or ``latency`` (the launch latency exceeds both)."""
        work = max(self.memory_us, self.compute_us)
        if work < self.launch_us:
            return "latency"
        return "memory" if self.memory_us >= self.compute_us else "compute"


def estimate(nbytes: float, thread_instructions: float, programs: int, spec: GpuSpec, *,
             graph: bool = True) -> Estimate:
    """Roofline estimate of one kernel launch.

    Parameters
    ----------
    nbytes : float
        Global-memory bytes read plus written by the launch.
    thread_instructions : float
        Instructions executed, counted per thread (warp-instructions x 32).
    programs : int
        Thread blocks (Triton programs) of the grid; fewer than the SMs leave SMs idle.
    spec : GpuSpec
    graph : bool
        Launch latency inside a CUDA graph (default) or from the host on a stream.
    """
    p = max(1, int(programs))
    busy = min(p, spec.sms)
    bandwidth = min(spec.hbm_bytes_per_s, busy * spec.per_sm_bytes_per_s)
    issue = spec.issue_rate * min(1.0, p / spec.sms)
    return Estimate(memory_us=nbytes / bandwidth * 1e6, compute_us=thread_instructions / issue * 1e6,
                    launch_us=spec.launch_us_graph if graph else spec.launch_us_stream)


# The project's latency targets for one sampling step on an H200 at V = 128256 (docs/benchmarks.md § Cost model).
PLAIN_GOALS_US: dict[int, float] = {1: 15.0, 64: 9.7, 256: 39.0}
GOAL_FACTORS: dict[str, float] = {  # at B >= 64, x the plain scenario's goal at the same B
    "plain": 1.0,
    "greedy": 1.0,
    "topk_topp_minp": 1.5,
    "full": 2.0,
    "top_p": 2.0,
    "typical": 2.0,
    "mirostat_v1": 2.0,
    "mirostat_v2": 2.0,
}
B1_GOAL_US = 15.0  # every scenario at B = 1


def goal_us(scenario: str, batch: int) -> float:
    """The goal of a case in µs (H200, inside a CUDA graph), NaN where the project states none.

    B = 1: 15 µs for every scenario. B >= 64: plain 9.7 µs at B = 64 and 39 µs at B = 256; greedy the same;
    top-k + top-p + min-p 1.5x plain; full, top-p, typical and Mirostat 2x plain. Other batch sizes (and unknown
    scenarios) have no goal.
    """
    if batch == 1:
        return B1_GOAL_US
    plain = PLAIN_GOALS_US.get(batch)
    factor = GOAL_FACTORS.get(scenario)
    if plain is None or factor is None:
        return math.nan
    return plain * factor
