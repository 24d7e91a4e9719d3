"""The benchmark's grids and scenario names, without torch: the command line's help and defaults come from here.

A grid is the set of cases a run covers (scenarios × dtypes × vocabulary sizes × batch sizes) and how hard each case
is timed. ``python -m fastsampler.bench`` picks the default grid of the device it runs on:

- on a GPU, the full grid: B ∈ {1, 8, 64, 256} × V ∈ {32000, 128256, 151936, 262144} × fp32 / bf16 (a few minutes);
- on a CPU, a smaller one that fits a laptop (1-2 minutes on two cores): B ∈ {1, 8, 64} × V ∈ {32000, 128256} ×
  fp32, the torch baselines timed where B·V ≤ 8 × 128256;

``--full`` runs the full grid on the CPU too (over half an hour on two cores), ``--quick`` a smoke run. The
scenarios themselves (their parameters and inputs) live in `fastsampler.bench.scenarios`; tests/test_bench.py checks
that its names are the ones below.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Grid", "SCENARIO_NAMES", "DEFAULT_SCENARIOS", "MODEL_SCENARIOS", "DTYPE_NAMES", "GRIDS", "grid_for",
           "describe"]

# every scenario of `fastsampler.bench.scenarios.SCENARIOS`, in its order
SCENARIO_NAMES: tuple[str, ...] = ("plain", "topk_topp_minp", "full", "extended", "typical", "mirostat_v2", "greedy",
                                   "top_p", "mirostat_v1")
# the timing benchmark's scenarios (docs/benchmarks.md); the GPU cost model (``--model``) covers these by default
DEFAULT_SCENARIOS: tuple[str, ...] = ("plain", "topk_topp_minp", "full", "typical", "mirostat_v2", "greedy")
MODEL_SCENARIOS: tuple[str, ...] = ("plain", "greedy", "topk_topp_minp", "top_p", "typical", "mirostat_v1",
                                    "mirostat_v2", "full")
DTYPE_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")

FULL_BATCH_SIZES = (1, 8, 64, 256)
FULL_VOCAB_SIZES = (32000, 128256, 151936, 262144)


@dataclass(frozen=True)
class Grid:
    """The cases of a run and how each is timed.

    ``baseline_max_elements`` caps the torch samplers and ``ref_max_elements`` the numpy reference (B·V; 0: no
    cap): larger cases are ``n/a: capped``. ``time_per_measurement`` is one provider's timing budget on one case,
    after ``warmup`` calls; ``threads`` None means every core.
    """

    name: str
    batch_sizes: tuple[int, ...]
    vocab_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    baseline_max_elements: int
    ref_max_elements: int
    time_per_measurement: float
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 100
    threads: int | None = None
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS


GRIDS: dict[tuple[str, str], Grid] = {
    # the GPU default is the full grid, every baseline at every size
    ("cuda", "default"): Grid("full", FULL_BATCH_SIZES, FULL_VOCAB_SIZES, ("fp32", "bf16"), 0, 256_000, 0.25),
    ("cuda", "full"): Grid("full", FULL_BATCH_SIZES, FULL_VOCAB_SIZES, ("fp32", "bf16"), 0, 256_000, 0.25),
    ("cuda", "quick"): Grid("quick", (1, 64), (32000, 128256), ("fp32", "bf16"), 0, 128_000, 0.03, warmup=1,
                            min_reps=3, max_reps=10),
    # the CPU default fits a laptop: the sizes that show both ends (B = 1, in cache; B = 64 × V = 128256, 32 MB of
    # logits), fp32 only, and the torch baselines up to B·V = 8 × 128256 (one call of the HF-style warpers there
    # takes a quarter of a second on two cores). The validity check's draws warm each provider up, so one more
    # warm-up call is enough.
    ("cpu", "default"): Grid("cpu", (1, 8, 64), (32000, 128256), ("fp32",), 8 * 128256, 256_000, 0.1, warmup=1),
    # the full grid on the CPU: a full sort of a batch above 8 × 262144 takes seconds there, so the torch samplers
    # stop at that size
    ("cpu", "full"): Grid("full", FULL_BATCH_SIZES, FULL_VOCAB_SIZES, ("fp32", "bf16"), 8 * 262144, 256_000, 0.25),
    # a smoke run on one thread: steady on a shared machine, where a second thread waiting for a busy core costs
    # whole scheduler time slices
    ("cpu", "quick"): Grid("quick", (1, 4), (5000, 32000), ("fp32", "bf16"), 8 * 262144, 128_000, 0.03, warmup=1,
                           min_reps=3, max_reps=10, threads=1),
}


def grid_for(device_type: str, kind: str = "default") -> Grid:
    """The grid of ``kind`` (``default``, ``full``, ``quick``) on a device type (``cpu``, ``cuda``).

    >>> grid_for("cpu").batch_sizes, grid_for("cuda").batch_sizes
    ((1, 8, 64), (1, 8, 64, 256))
    """
    return GRIDS[("cuda" if device_type == "cuda" else "cpu", kind)]


def describe(grid: Grid) -> str:
    """One line: the grid's cases and caps.

    >>> describe(grid_for("cpu"))
    'B 1,8,64 x V 32000,128256 x fp32, 6 scenarios; torch baselines where B*V <= 1026048, numpy-ref <= 256000'
    """
    base = f"torch baselines where B*V <= {grid.baseline_max_elements}" if grid.baseline_max_elements else \
        "torch baselines at every size"
    return (f"B {','.join(map(str, grid.batch_sizes))} x V {','.join(map(str, grid.vocab_sizes))} x "
            f"{','.join(grid.dtypes)}, {len(grid.scenarios)} scenarios; {base}, numpy-ref <= {grid.ref_max_elements}")
