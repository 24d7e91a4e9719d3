"""``python -m fastsampler.bench`` / ``fastsampler-bench``: measure fastsampler against its peers on this device.

The default grid is the device's (`fastsampler.bench.grids`): the full grid on a GPU, a smaller one on the CPU
(1-2 minutes on two cores); ``--full`` runs the full grid anywhere. Parsing the arguments imports no torch, so
``--help`` answers at once.

Examples
--------
Quick smoke run (CPU, well under a minute)::

    python -m fastsampler.bench --quick

The full grid on the CPU (over half an hour on two cores)::

    python -m fastsampler.bench --full

The default grid on a GPU, bf16 only, two scenarios::

    python -m fastsampler.bench --dtypes bf16 --scenarios plain,full

The GPU cost model of the Triton backend, without a GPU (docs/benchmarks.md § Cost model)::

    python -m fastsampler.bench --model
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .grids import DEFAULT_SCENARIOS, DTYPE_NAMES, SCENARIO_NAMES, describe, grid_for


def _ints(s: str) -> list[int]:
    try:
        out = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return out


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


MODEL_BATCH_SIZES = (1, 64, 256)
MODEL_VOCAB_SIZES = (128256,)


def _csv(xs) -> str:
    return ",".join(map(str, xs))


def build_parser() -> argparse.ArgumentParser:
    """The command line (no torch import: ``--help`` answers at once)."""
    cpu, gpu, cpu_full = grid_for("cpu"), grid_for("cuda"), grid_for("cpu", "full")
    cpu_quick, gpu_quick = grid_for("cpu", "quick"), grid_for("cuda", "quick")
    p = argparse.ArgumentParser(
        prog="fastsampler-bench",
        description="Benchmark fastsampler's backends against a torch sort-based sampler, torch Hugging Face-style "
                    "warpers, FlashInfer (when importable) and the numpy reference, on the scenarios of "
                    "docs/benchmarks.md. Every provider is checked against the reference distribution before it is "
                    "timed.",
        epilog=f"Default grid on a GPU: {describe(gpu)}. On the CPU: {describe(cpu)} (1-2 minutes on two cores); "
               f"--full: {describe(cpu_full)} (over half an hour on two cores). --batch-sizes, "
               f"--vocab-sizes, --dtypes, --scenarios and the caps replace the grid's own.",
    )
    p.add_argument("--scenarios", type=_names, default=None,  # 'overhead' also accepted: see main()
                   help=f"comma-separated, from {_csv(SCENARIO_NAMES)}, overhead (host cost of one step at B = 8, "
                        f"V = 1024 against torch.argmax) (default: {_csv(DEFAULT_SCENARIOS)}; with --model: all)")
    p.add_argument("--batch-sizes", type=_ints, default=None,
                   help=f"comma-separated (default: the grid's, GPU {_csv(gpu.batch_sizes)}, CPU "
                        f"{_csv(cpu.batch_sizes)}; with --model: {_csv(MODEL_BATCH_SIZES)})")
    p.add_argument("--vocab-sizes", type=_ints, default=None,
                   help=f"comma-separated (default: the grid's, GPU {_csv(gpu.vocab_sizes)}, CPU "
                        f"{_csv(cpu.vocab_sizes)}; with --model: {_csv(MODEL_VOCAB_SIZES)})")
    p.add_argument("--dtypes", type=_names, default=None,
                   help=f"from {_csv(DTYPE_NAMES)} (default: the grid's, GPU {_csv(gpu.dtypes)}, CPU "
                        f"{_csv(cpu.dtypes)}; with --model: fp32,bf16)")
    p.add_argument("--providers", "--backends", dest="providers", type=_names, default=None,
                   help="comma-separated providers: fastsampler-<backend>[-api], torch-sort, torch-warpers, "
                        "flashinfer, numpy-ref; backend names (triton, cpu); groups 'fastsampler', 'baselines' "
                        "(default: fastsampler,baselines; Triton is left out on CPU unless named)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="default: CUDA when available, else CPU")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true",
                      help=f"the full grid on the CPU too ({describe(cpu_full)}); on a GPU the default already is")
    size.add_argument("--quick", action="store_true",
                      help=f"tiny sizes and few repetitions (CPU: B {_csv(cpu_quick.batch_sizes)} x V "
                           f"{_csv(cpu_quick.vocab_sizes)}, one thread; GPU: B {_csv(gpu_quick.batch_sizes)} x V "
                           f"{_csv(gpu_quick.vocab_sizes)})")
    p.add_argument("--out", type=Path, default=Path("bench_results"),
                   help="output folder for results.csv (appended), table.txt, summary.txt, summary.md and the plot "
                        "(default: bench_results/)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the C++ backend (torch.set_num_threads, OMP_NUM_THREADS, "
                        "FASTSAMPLER_NUM_THREADS); default: all cores, 1 with --quick on the CPU")
    p.add_argument("--reps", type=int, default=None, help="maximum timed repetitions per measurement")
    p.add_argument("--time-per-measurement", type=float, default=None, metavar="SECONDS",
                   help=f"time budget of one provider on one case (default: the grid's, GPU "
                        f"{gpu.time_per_measurement}, CPU {cpu.time_per_measurement}, --full "
                        f"{cpu_full.time_per_measurement}, --quick {cpu_quick.time_per_measurement})")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="stop starting new cases after this long; the rest are reported as skipped")
    p.add_argument("--check-rows", type=int, default=4, help="rows compared with the reference (default 4)")
    p.add_argument("--check-steps", type=int, default=8, help="draws per provider in the validity check (default 8)")
    p.add_argument("--ref-max-elements", type=int, default=None,
                   help=f"numpy-ref is timed only where B*V <= this (default {cpu.ref_max_elements}, --quick "
                        f"{cpu_quick.ref_max_elements})")
    p.add_argument("--baseline-max-elements", type=int, default=None,
                   help=f"torch-sort / torch-warpers are timed only where B*V <= this (default: the grid's, CPU "
                        f"{cpu.baseline_max_elements}, CPU --full {cpu_full.baseline_max_elements}: a full sort of "
                        f"larger batches takes seconds there; GPU no cap; 0: no cap)")
    p.add_argument("--no-flush", action="store_true", help="GPU: do not flush the L2 cache between timed calls")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when a fastsampler provider FAILED its check or raised")
    m = p.add_argument_group("GPU cost model (--model; docs/benchmarks.md § Cost model)")
    m.add_argument("--model", action="store_true",
                   help="model the Triton backend on a GPU without one: record one Sampler step per case under the "
                        "Triton interpreter (record-only), compile its kernels for sm_90, read the SASS, and write "
                        "a roofline estimate to OUT/model.csv and OUT/model_launches.csv (on a CUDA machine also "
                        "the measured time)")
    m.add_argument("--gpu", choices=("h100", "h200"), default="h200",
                   help="the GPU of model.csv's model_us column (the table shows both; default h200)")
    m.add_argument("--model-activity", choices=("probe", "all"), default="probe",
                   help="traffic of data-dependent kernels (a select reads a row once per radix level until it is "
                        "resolved): measured in an executed B = 1 probe step of each case, cached (default), or the "
                        "access rules' worst case (all: no probe)")
    m.add_argument("--model-cache", type=Path, default=None,
                   help="cache of compiled kernels (SASS) and probes (default: OUT/model_cache)")
    m.add_argument("--no-measure", action="store_true", help="--model on a CUDA machine: do not time the cases")
    return p


def _run_model(args: argparse.Namespace) -> int:
    """``--model``: the GPU cost model (runs the kernels' host path under the Triton interpreter)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton builds the kernels
    from .model import ModelConfig, run_model
    from .scenarios import DTYPES, MODEL_SCENARIOS, SCENARIOS

    scenarios = args.scenarios or list(MODEL_SCENARIOS)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        print(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    dtypes = args.dtypes or ["fp32", "bf16"]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    cfg = ModelConfig(scenarios=scenarios, batch_sizes=args.batch_sizes or list(MODEL_BATCH_SIZES),
                      dtypes=dtypes, vocab_sizes=args.vocab_sizes or list(MODEL_VOCAB_SIZES), gpu=args.gpu,
                      activity=args.model_activity, seed=args.seed, cache_dir=args.model_cache,
                      measure=False if args.no_measure else None, progress=not args.no_progress)
    t0 = time.perf_counter()
    try:
        run_model(cfg, args.out)
    except (RuntimeError, ValueError) as e:
        print(f"fastsampler-bench --model: {e}", file=sys.stderr)
        return 2
    print((args.out / "model_table.txt").read_text(encoding="utf-8"), end="")
    files = ", ".join(str(args.out / f) for f in ("model.csv", "model_launches.csv", "model_table.txt"))
    print(f"({time.perf_counter() - t0:.1f}s; wrote {files})")
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model:
        return _run_model(args)
    if args.scenarios is not None and "overhead" in args.scenarios:
        # host overhead of one step at B = 8, V = 1024 against torch.argmax (bench/overhead.py), then the rest
        from .overhead import format_table as overhead_table
        from .overhead import run_overhead

        dev = args.device if args.device != "auto" else ("cuda" if _cuda_available() else "cpu")
        print(overhead_table(run_overhead(reps=200 if args.quick else 2000,
                                          backend="triton" if dev == "cuda" else "cpu")))
        args.scenarios = [x for x in args.scenarios if x != "overhead"]
        if not args.scenarios:
            return 0
    kind = "full" if args.full else "quick" if args.quick else "default"
    if args.threads is None and args.device != "cuda":
        # the CPU grid's thread count (quick: one), set before any backend (OpenMP runtime) is loaded
        args.threads = grid_for("cpu", kind).threads
    if args.threads is not None:  # before any backend (OpenMP runtime) is loaded
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["FASTSAMPLER_NUM_THREADS"] = str(args.threads)

    import torch

    from .providers import build_providers
    from .report import (
        ERROR,
        FAILED,
        format_markdown,
        format_summary,
        format_table,
        run_copy_gbps,
        run_info,
        write_csv,
        write_plot,
    )
    from .runner import BenchConfig, Progress, run_benchmark
    from .scenarios import DTYPES, SCENARIOS
    from .timing import TimingConfig

    if args.threads is not None:
        torch.set_num_threads(args.threads)
        try:  # the C++ backend may already be loaded (main() called in-process)
            from ..backends import cpu as _cpu_backend

            _cpu_backend.set_num_threads(args.threads)
        except (ImportError, AttributeError):
            pass
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    grid = grid_for(device.type, kind)
    scenarios = args.scenarios if args.scenarios is not None else list(grid.scenarios)
    dtypes = args.dtypes or list(grid.dtypes)
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad:
        print(f"unknown scenario(s) {bad}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        print(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.providers and any("triton" in p for p in args.providers):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU runs only in the interpreter

    timing = TimingConfig(warmup=grid.warmup, min_reps=grid.min_reps, max_reps=args.reps or grid.max_reps,
                          budget_s=args.time_per_measurement or grid.time_per_measurement, flush=not args.no_flush)
    ref_cap = args.ref_max_elements or grid.ref_max_elements
    base_cap = grid.baseline_max_elements if args.baseline_max_elements is None else args.baseline_max_elements
    try:
        providers, notes = build_providers(device, args.providers, ref_max_elements=ref_cap,
                                           baseline_max_elements=base_cap or None)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not providers:
        print("no provider can run here: " + "; ".join(notes), file=sys.stderr)
        return 2
    cfg = BenchConfig(scenarios=scenarios, batch_sizes=args.batch_sizes or list(grid.batch_sizes),
                      vocab_sizes=args.vocab_sizes or list(grid.vocab_sizes), dtypes=dtypes, device=device,
                      timing=timing, check_rows=args.check_rows, check_steps=args.check_steps, budget_s=args.budget_s,
                      seed=args.seed)

    info = run_info(device)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    n_cases = len(cfg.cases())
    grid_note = "" if (args.batch_sizes or args.vocab_sizes or args.dtypes) else f" ({describe(grid)})"
    print(f"fastsampler-bench: {info.device}; {grid.name} grid{grid_note}; {n_cases} cases; providers: "
          f"{', '.join(p.name for p in providers)}", file=sys.stderr)
    if kind == "default" and device.type == "cpu":
        notes.append("the CPU's default grid; --full runs B " + _csv(grid_for("cpu", "full").batch_sizes) + " x V "
                     + _csv(grid_for("cpu", "full").vocab_sizes) + " x fp32,bf16")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)

    results: list = []
    written: list[Path] = []

    def on_case(case: list) -> None:  # results land on disk as they come, so a killed run keeps them
        results.extend(case)
        info.copy_gbps = run_copy_gbps(results)
        written.append(write_csv(csv_path, case, info))
        (out / "table.txt").write_text(format_table(results, info), encoding="utf-8")
        (out / "summary.txt").write_text(format_summary(results, info, notes), encoding="utf-8")

    t0 = time.perf_counter()
    progress = Progress(n_cases * len(providers), enabled=not args.no_progress)
    run_benchmark(cfg, providers, progress=progress, on_case=on_case)
    elapsed = time.perf_counter() - t0

    if not args.no_plot:
        note = write_plot(out / "latency_vs_batch.png", results, info)
        if note:
            notes.append(note)
    summary = format_summary(results, info, notes)
    (out / "summary.txt").write_text(summary, encoding="utf-8")
    (out / "summary.md").write_text(format_markdown(results, info), encoding="utf-8")
    print(format_table(results, info))
    print(summary, end="")
    files = sorted({str(p) for p in written} | {str(out / f) for f in ("table.txt", "summary.txt", "summary.md")})
    if (out / "latency_vs_batch.png").exists() and not args.no_plot:
        files.append(str(out / "latency_vs_batch.png"))
    print(f"({elapsed:.1f}s; wrote {', '.join(files)})")
    if args.strict and any(r.status in (FAILED, ERROR) and r.provider.startswith("fastsampler") for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
