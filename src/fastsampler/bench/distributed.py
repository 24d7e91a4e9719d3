"""``python -m fastsampler.bench.distributed``: vocabulary-parallel sampling (`fastsampler.distributed.sample`) against
the all-gather of the logits followed by `fastsampler.sample`, per step, for world sizes 2 and 4.

Besides times and bytes, it counts the work of one step on the path off the CPU (`distributed.SYNC_FREE`), as a
GPU would run it: the tensor operations (each at least one kernel launch on a device), how many of them touch a
shard-sized tensor, and the bytes those move per id of the shard (inputs and outputs). Times on a CPU say little
about a GPU; these counts do.

Each world size starts its own processes: gloo on the CPU, or NCCL on CUDA when ``torch.cuda.device_count()`` is at
least the world size (one device per rank). Every rank holds float32 logits of its slice of the vocabulary (an
engine's layout: ``ceil(V / world)`` columns, the last slice padded). Reported per step, for rank 0:

- the bytes rank 0 sent / received in `distributed.sample`'s collectives (`fastsampler.distributed.ExchangeStats`)
  and their number, and the median time of the call;
- the baseline: the bytes of the all-gather of the logits (sent / received), its median time, and the median time of
  the all-gather followed by `fastsampler.sample` on the gathered ``(B, V)`` logits (backend ``auto``).

Examples
--------
The default grid (world sizes 2 and 4, ``B`` in {8, 64}, ``V = 128256``, three scenarios)::

    python -m fastsampler.bench.distributed

A smoke run::

    python -m fastsampler.bench.distributed --vocab 4096 --batch 2 --reps 1
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import platform
import statistics
import tempfile
import time
from typing import Any

import torch

SCENARIOS = ("plain", "topk-topp", "full")


def _ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastsampler.bench.distributed",
                                description="fastsampler.distributed.sample against all-gather then sample: bytes "
                                            "exchanged per rank and median time per step.")
    p.add_argument("--worlds", type=_ints, default=[2, 4], help="world sizes (default 2,4)")
    p.add_argument("--batch", type=_ints, default=[8, 64], help="batch sizes (default 8,64)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default 128256)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--reps", type=int, default=3, help="timed steps per case, after one warm-up step (default 3)")
    return p


def _params(scenario: str, b: int) -> list[Any]:
    from fastsampler import SamplingParams

    if scenario == "plain":
        return [SamplingParams(temperature=1.0, seed=r) for r in range(b)]
    if scenario == "topk-topp":
        return [SamplingParams(top_k=50, top_p=0.9, logprobs=True, top_logprobs=5, seed=r) for r in range(b)]
    if scenario == "full":  # penalties on counts, logit bias, top-k + top-p + min-p, top-5 logprobs
        return [SamplingParams(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.2, top_k=50,
                               top_p=0.9, min_p=0.05, logit_bias={7: 2.0, 1000: -1.0}, logprobs=True,
                               top_logprobs=5, seed=r) for r in range(b)]
    raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")


class _OpCounter:
    """Counts the tensor operations run under it (a `TorchDispatchMode`): all of them, those that read or write a
    tensor of at least half the shard's ``B x V_local`` elements, and the bytes of such tensors."""

    def __init__(self, shard_elements: int) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                counter.record(args, kwargs or {}, out)
                return out

        self.mode = Mode()
        self.big_at = max(1, shard_elements // 2)
        self.ops = self.big_ops = self.big_bytes = 0

    def record(self, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        outs = out if isinstance(out, (tuple, list)) else [out]
        big = [t for t in (*args, *kwargs.values(), *outs) if isinstance(t, torch.Tensor) and t.numel() >= self.big_at]
        self.ops += 1
        if big:
            self.big_ops += 1
            self.big_bytes += sum(t.numel() * t.element_size() for t in big)

    def __enter__(self) -> _OpCounter:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def _median_ms(fn: Any, reps: int, sync: Any) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _worker(rank: int, world: int, init: str, args: dict[str, Any], out_dir: str) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    v = args["vocab"]
    per = -(-v // world)
    start = rank * per
    rows = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for b in args["batch"]:
        g = torch.Generator().manual_seed(1000 + rank)
        local = (torch.randn(b, per, generator=g) * 3.0).to(dev)
        counts = torch.randint(0, 3, (b, per), generator=g, dtype=torch.int32).to(dev)
        for scenario in args["scenarios"]:
            rows.append(_case(local, counts, scenario, start, v, world, args["reps"], sync))
            rows[-1].update(backend="nccl" if cuda else "gloo", threads=torch.get_num_threads())
    if rank == 0:
        with open(pathlib.Path(out_dir) / "rows.pkl", "wb") as fh:
            pickle.dump(rows, fh)
    dist.destroy_process_group()


def _case(local: torch.Tensor, counts: torch.Tensor, scenario: str, start: int, v: int, world: int, reps: int,
          sync: Any) -> dict[str, Any]:
    """One case on this rank: `distributed.sample` (its exchanges counted once), the all-gather alone, and the
    all-gather then `fastsampler.sample`."""
    import torch.distributed as dist

    import fastsampler
    from fastsampler import distributed

    b = local.shape[0]
    params = _params(scenario, b)
    kw = {"output_counts": counts} if scenario == "full" else {}
    stats = distributed.ExchangeStats()
    distributed.sample(local, params, vocab_start=start, vocab_size=v, stats=stats, **kw)

    def gather(t: torch.Tensor = local) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, 1)

    # the counts a single device would hold for the baseline (gathered once: not part of a step)
    full = {"output_counts": gather(counts)[:, :v].contiguous()} if scenario == "full" else {}
    t_dist = _median_ms(lambda: distributed.sample(local, params, vocab_start=start, vocab_size=v, **kw), reps, sync)
    t_gather = _median_ms(gather, reps, sync)
    steps = [0] * b
    t_base = _median_ms(lambda: fastsampler.sample(gather(), params, vocab_size=v, steps=steps, **full), reps, sync)
    n = local.numel() * local.element_size()
    return {"world": world, "batch": b, "scenario": scenario, "sent": stats.bytes_sent,
            "received": stats.bytes_received, "collectives": stats.collectives, "dist_ms": t_dist,
            "gather_sent": n,
            "gather_received": world * n, "gather_ms": t_gather, "base_ms": t_base}


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _count_ops(world: int, b: int, vocab: int, scenario: str) -> dict[str, Any]:
    """The work of one step on the path a device takes (no read-backs), counted in this process: rank 0's shard of
    ``ceil(vocab / world)`` ids sampled by a group of one (a tensor-parallel rank runs the same operations on its
    shard, plus one per rank where it merges gathered partials). Counting in the ranks themselves is avoided: a
    dispatch mode around gloo's collectives can abort a process."""
    import torch.distributed as dist

    from fastsampler import distributed

    per = -(-vocab // world)
    g = torch.Generator().manual_seed(1000)
    local = torch.randn(b, per, generator=g) * 3.0
    kw = {"output_counts": torch.randint(0, 3, (b, per), generator=g, dtype=torch.int32)} if scenario == "full" else {}
    params = _params(scenario, b)
    saved, distributed.SYNC_FREE = distributed.SYNC_FREE, True
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{pathlib.Path(d) / 'count'}", rank=0, world_size=1)
        try:
            with _OpCounter(local.numel()) as ops:
                distributed.sample(local, params, vocab_start=0, vocab_size=per, **kw)
        finally:
            distributed.SYNC_FREE = saved
            dist.destroy_process_group()
    return {"ops": ops.ops, "shard_ops": ops.big_ops, "bytes_per_id": ops.big_bytes / max(1, local.numel())}


def run(worlds: list[int], batch: list[int], vocab: int, scenarios: list[str], reps: int) -> list[dict[str, Any]]:
    """Every case, rank 0's figures (one dict per world size × batch × scenario), with `_count_ops`."""
    import torch.multiprocessing as mp

    rows: list[dict[str, Any]] = []
    args = {"batch": batch, "vocab": vocab, "scenarios": scenarios, "reps": reps}
    for world in worlds:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(world, str(pathlib.Path(d) / "init"), args, d), nprocs=world, join=True)
            with open(pathlib.Path(d) / "rows.pkl", "rb") as fh:
                rows += pickle.load(fh)
    for r in rows:
        r.update(_count_ops(r["world"], r["batch"], vocab, r["scenario"]))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("world", "B", "scenario", "sent B", "recv B", "colls", "ops", "shard ops", "B/id", "dist.sample ms",
            "gather sent B", "gather recv B", "gather ms", "gather+sample ms")
    body = [(str(r["world"]), str(r["batch"]), r["scenario"], f"{r['sent']:,}", f"{r['received']:,}",
             str(r["collectives"]), str(r["ops"]), str(r["shard_ops"]), f"{r['bytes_per_id']:.0f}",
             f"{r['dist_ms']:.1f}", f"{r['gather_sent']:,}", f"{r['gather_received']:,}", f"{r['gather_ms']:.1f}",
             f"{r['base_ms']:.1f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"--scenarios: expected names from {SCENARIOS}, got {s!r}")
    t0 = time.perf_counter()
    rows = run(a.worlds, a.batch, a.vocab, scenarios, a.reps)
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = f", {ngpu} x {torch.cuda.get_device_name(0)}" if ngpu else ""
    print(f"fastsampler.distributed vs all-gather + fastsampler.sample; V = {a.vocab:,} float32 logits, per step, "
          f"rank 0; median of {a.reps} steps after one warm-up")
    print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}; collectives "
          f"{', '.join(sorted({r['backend'] for r in rows}))}; torch threads per process "
          f"{', '.join(sorted({str(r['threads']) for r in rows}))}")
    print(format_table(rows))
    print("ops: tensor operations of one distributed.sample on the path off the CPU (each at least one kernel launch "
          "on a device), counted on rank 0's shard in one process; shard ops: those touching a tensor of at least "
          "half the shard; B/id: the bytes those read and write per id of the shard")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
