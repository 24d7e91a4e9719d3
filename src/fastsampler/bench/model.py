"""The GPU cost model of the Triton backend: ``python -m fastsampler.bench --model`` (no GPU needed).

For each case (scenario x B x dtype x V) the model

1. records one ``Sampler.sample`` step of the Triton backend in record-only mode (`fastsampler.bench.record`):
   every Triton launch and every kernel-launching torch op, under the CUDA launch settings;
2. compiles every launched Triton specialisation for sm_90 and reads registers, spills and thread-instructions per
   id from the SASS (`fastsampler.bench.sass`, cached on disk);
3. states the global-memory bytes of every launch from its arguments and access rule (`fastsampler.bench.access`).
   Data-dependent kernels (a select reads the row once per radix level until the row's threshold is resolved) take
   their traffic from a probe: the same case executed at B = 1 under the interpreter, whose loads and stores are
   counted (``activity="probe"``, cached), scaled to the case; without it (``activity="all"``) the worst case of
   the rule. The probe's bytes of every kernel are also shown beside the rules' as a cross-check: a kernel whose
   rule is off by more than 2x is named in the table's notes;
4. estimates each launch with the roofline of `fastsampler.bench.roofline` and sums them per step.

It writes ``model.csv`` (one row per case), ``model_launches.csv`` (one row per launch) and ``model_table.txt``
to the output folder. On a machine with CUDA it also times each case natively (a subprocess without the
interpreter: CUDA events around the replay of a CUDA graph of one step, L2 flushed before each replay, median) and
adds ``measured_us``. See ``docs/benchmarks.md`` § Cost model.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .access import launch_bytes, rule_for
from .record import CUDA_KNOBS, StepRecord, TorchOp, TritonLaunch, ensure_interpreter, record_step
from .roofline import GPUS, Estimate, estimate, goal_us, gpu
from .sass import compile_launches, spec_id, spec_of

__all__ = ["ModelConfig", "CaseResult", "LaunchRow", "run_model", "MODEL_COLUMNS", "LAUNCH_COLUMNS",
           "format_model_table", "DEFAULT_BATCH_SIZES", "DEFAULT_VOCAB_SIZES"]

MODEL_COLUMNS = ["scenario", "batch", "dtype", "vocab", "launches", "hbm_bytes_per_row", "full_row_reads",
                 "max_instr_per_id", "model_us", "goal_us"]
LAUNCH_COLUMNS = ["scenario", "batch", "dtype", "vocab", "index", "kind", "kernel", "grid", "programs", "bytes",
                  "bytes_per_row", "probe_bytes_per_row", "ids", "instr_per_id", "thread_instr", "regs", "spills",
                  "num_warps", "measured", "full_row_reads", "bound", "est_us", "est_us_h100", "rule", "id_loop",
                  "sass", "note"]
DEFAULT_BATCH_SIZES = (1, 64, 256)
DEFAULT_VOCAB_SIZES = (128256,)
TORCH_ELEMENTS_PER_BLOCK = 512  # PyTorch's elementwise CUDA kernels: 128 threads x 4 elements per block


@dataclass
class ModelConfig:
    """What to model (see ``python -m fastsampler.bench --help``)."""

    scenarios: Sequence[str]
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES
    dtypes: Sequence[str] = ("fp32", "bf16")
    vocab_sizes: Sequence[int] = DEFAULT_VOCAB_SIZES
    gpu: str = "h200"  # the GPU of the model_us column
    activity: str = "probe"  # data-dependent traffic: "probe" (executed B = 1 step) or "all" (rules' worst case)
    seed: int = 1234
    cache_dir: Path | None = None  # default: <out>/model_cache
    measure: bool | None = None  # CUDA timing; None: when CUDA is available
    measure_reps: int = 50
    progress: bool = True

    def cases(self) -> list[tuple[str, str, int, int]]:
        return [(s, d, v, b) for s in self.scenarios for d in self.dtypes for v in self.vocab_sizes
                for b in self.batch_sizes]


@dataclass
class LaunchRow:
    """One launch of a modelled step."""

    index: int
    kind: str  # "triton" or "torch"
    kernel: str
    grid: tuple[int, ...]
    programs: int
    nbytes: float
    ids: float
    instr_per_id: float | None
    thread_instr: float
    regs: int | None
    spills: int | None
    num_warps: int | None
    measured: bool  # per-id traffic from the probe (data-dependent rule)
    full_row_reads: int  # full passes over the logits row
    rule: str
    estimates: dict[str, Estimate]  # per GPU key, inside a CUDA graph
    stream_estimates: dict[str, Estimate]  # per GPU key, launched on a stream
    touched: float | None = None  # bytes from the probe's touched fractions (None: no probe)
    id_loop: str = ""  # "loop@0xADDR" (header address in the SASS), "straight-line" or "none"
    sass: str = ""  # the cached SASS file
    note: str = ""


@dataclass
class CaseResult:
    """One modelled case."""

    scenario: str
    batch: int
    dtype: str
    vocab: int
    rows: list[LaunchRow]
    triton_launches: int
    torch_launches: int
    host_syncs: int
    hbm_bytes_per_row: float
    touched_bytes_per_row: float | None  # the same from the probe's touched bytes (None: no probe)
    full_row_reads: int
    max_instr_per_id: float | None
    model_us: dict[str, float]  # per GPU key, inside a CUDA graph
    stream_us: dict[str, float]  # per GPU key, launched on a stream
    goal_us: float
    record_s: float
    cuda_settings: str
    activity: str  # where the traffic of data-dependent kernels comes from
    measured_us: float | None = None
    measured_note: str = ""
    notes: list[str] = field(default_factory=list)
    mismatches: list[tuple[str, float, float]] = field(default_factory=list)  # (kernel, rule, probe) bytes per row

    @property
    def launches(self) -> int:
        return self.triton_launches + self.torch_launches


# ------------------------------------------------------------------------------------------------ activity
def _source_hash() -> str:
    """Hash of the library's sources (not the bench): the host path and the kernels behind a probe."""
    import triton

    root = Path(importlib.import_module("fastsampler").__file__).parent
    h = hashlib.sha256(triton.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        if "bench" in p.relative_to(root).parts:
            continue
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _probe(scenario: str, dtype: str, vocab: int, seed: int, cache_dir: Path) -> list[dict]:
    """Per Triton launch of an executed B = 1 step: ``kernel``, ``touched`` (per argument: distinct bytes read,
    distinct bytes written, bytes loaded, bytes stored) and ``nbytes`` (each argument's size). Cached on disk, keyed
    by the library's sources."""
    key = hashlib.sha256(json.dumps([_source_hash(), scenario, dtype, vocab, seed, CUDA_KNOBS]).encode()).hexdigest()
    path = cache_dir / f"probe-{scenario}-{dtype}-{vocab}-{key[:16]}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    rec = record_step(scenario, 1, dtype, vocab, execute=True, warmup=False, seed=seed)
    out = [{"kernel": x.kernel, "touched": x.touched,
            "nbytes": {a.name: a.nbytes for a in x.args if a.kind == "tensor"}} for x in rec.triton]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out), encoding="utf-8")
    return out


def _probe_matches(rec: StepRecord, probe: list[dict] | None) -> bool:
    return probe is not None and [p["kernel"] for p in probe] == [x.kernel for x in rec.triton]


def _touched_bytes(x: TritonLaunch, p: dict) -> float:
    """Bytes of launch ``x`` from what its probe touched, scaled to ``x``'s argument sizes: the distinct bytes of
    every argument (a re-read inside a program is served by the caches), except the per-id tensors of a kernel with
    a data-dependent rule, whose every byte loaded counts (a row read once per select level counts per level)."""
    total = 0.0
    rule = rule_for(x.kernel)
    for a in x.args:
        if a.kind != "tensor":
            continue
        t = p["touched"].get(a.name, [0, 0, 0, 0])
        n = p["nbytes"].get(a.name) or 0
        if n:
            total += ((t[2] + t[3]) if rule.measured and a.name in rule.vocab_args else (t[0] + t[1])) / n * a.nbytes
    return total


# ------------------------------------------------------------------------------------------------ assembly
def _torch_row(i: int, op: TorchOp, batch: int) -> LaunchRow:
    programs = max(1, math.ceil(op.elements / TORCH_ELEMENTS_PER_BLOCK))
    nbytes = float(op.read_bytes + op.write_bytes)
    est = {k: estimate(nbytes, 0.0, programs, g) for k, g in GPUS.items()}
    st = {k: estimate(nbytes, 0.0, programs, g, graph=False) for k, g in GPUS.items()}
    if op.kernels == 0:  # a host synchronisation: no kernel, no estimate (it breaks CUDA graphs)
        est = {k: Estimate(0.0, 0.0, 0.0) for k in GPUS}
        st = dict(est)
    return LaunchRow(index=i, kind="torch", kernel=f"torch:{op.op}", grid=(programs,), programs=programs,
                     nbytes=nbytes, ids=0.0, instr_per_id=None, thread_instr=0.0, regs=None, spills=None,
                     num_warps=None, measured=False, full_row_reads=int(op.logits_read), rule="torch op",
                     estimates=est, stream_estimates=st, note="host sync" if op.sync else "")


def _triton_row(i: int, x: TritonLaunch, probe: dict | None, stats: dict | None) -> LaunchRow:
    lb = launch_bytes(x, probe)
    nbytes = lb.read + lb.write
    note = "" if lb.analysed else "loads/stores not found in the source: every tensor counted as read"
    regs = spills = warps = None
    ipi = None
    instr = 0.0
    id_loop = sass = ""
    if stats and stats.get("ok"):
        id_loop = str(stats.get("id_loop", ""))
        if id_loop == "loop" and stats.get("id_loops"):
            id_loop = f"loop@{stats['id_loops'][0][0]:#x}"
        sass = Path(stats.get("sass", "")).name
        regs, spills, warps = stats.get("n_regs"), stats.get("n_spills"), stats.get("num_warps")
        threads = int(warps or 4) * 32
        ipi = stats.get("instr_per_id")
        if ipi is not None and lb.ids_read > 0:
            outside = stats["main_instr"] - stats["loop_body"] if stats.get("id_loop") == "loop" else 0
            instr = ipi * lb.ids_read + max(0, outside) * threads * x.programs
        else:
            instr = float(stats["main_instr"]) * threads * x.programs
    else:
        note = "; ".join(filter(None, [note, "no SASS: " + str((stats or {}).get("error", "not compiled"))[:200]]))
    est = {k: estimate(nbytes, instr, x.programs, g) for k, g in GPUS.items()}
    st = {k: estimate(nbytes, instr, x.programs, g, graph=False) for k, g in GPUS.items()}
    return LaunchRow(index=i, kind="triton", kernel=x.kernel, grid=x.grid, programs=x.programs, nbytes=nbytes,
                     ids=lb.ids_read, instr_per_id=ipi, thread_instr=instr, regs=regs, spills=spills,
                     num_warps=warps, measured=lb.measured, full_row_reads=lb.full_row_reads, rule=lb.rule,
                     estimates=est, stream_estimates=st,
                     touched=_touched_bytes(x, probe) if probe is not None else None, id_loop=id_loop, sass=sass,
                     note=note)


MISMATCH_RATIO = 2.0  # rule bytes vs the probe's touched bytes: flagged beyond this factor ...
MISMATCH_BYTES_PER_ROW = 4096  # ... and this many bytes per row


def _assemble(rec: StepRecord, probe: list[dict] | None, stats: dict[str, dict]) -> CaseResult:
    rows: list[LaunchRow] = []
    matched = _probe_matches(rec, probe)
    ti = 0
    for i, x in enumerate(rec.launches):
        if isinstance(x, TritonLaunch):
            p = probe[ti] if matched and probe is not None else None
            rows.append(_triton_row(i, x, p, stats.get(spec_id(spec_of(x)))))
            ti += 1
        else:
            rows.append(_torch_row(i, x, rec.batch))
    b = rec.batch
    tri = [r for r in rows if r.kind == "triton"]
    ipis = [r.instr_per_id for r in tri if r.instr_per_id is not None]
    notes = sorted({r.note for r in rows if r.note and r.note != "host sync"})
    syncs = sum(1 for x in rec.torch_ops if x.sync)
    if syncs:
        notes.append(f"{syncs} host synchronisation(s) (.item()): not CUDA-graph capturable")
    if rec.cuda_settings != "cuda":
        notes.append(f"launch settings: {rec.cuda_settings}")
    has_measured = any(rule_for(r.kernel).measured for r in tri)
    mismatches: list[tuple[str, float, float]] = []
    if probe is None:
        act_src = "worst case (no probe)" if has_measured else "no data-dependent kernels"
    elif not matched:
        act_src = "worst case (the B = 1 probe launched a different kernel sequence)"
        notes.append(f"{rec.scenario} {rec.dtype}: the probe's kernel sequence differs; probe columns left empty")
    else:
        act_src = "probe (executed B = 1 step)" if has_measured else "no data-dependent kernels"
        for r in tri:
            if r.touched is None:
                continue
            lo, hi = sorted((r.nbytes, r.touched))
            if hi - lo > MISMATCH_BYTES_PER_ROW * b and hi > MISMATCH_RATIO * lo:
                mismatches.append((r.kernel, r.nbytes / b, r.touched / b))
    touched = None
    if matched:
        touched = (sum(r.touched or 0.0 for r in tri) + sum(r.nbytes for r in rows if r.kind == "torch")) / b
    return CaseResult(
        scenario=rec.scenario, batch=b, dtype=rec.dtype, vocab=rec.vocab, rows=rows, triton_launches=len(tri),
        torch_launches=sum(x.kernels for x in rec.torch_ops), host_syncs=syncs,
        hbm_bytes_per_row=sum(r.nbytes for r in rows) / b, touched_bytes_per_row=touched,
        full_row_reads=sum(r.full_row_reads for r in rows), max_instr_per_id=max(ipis) if ipis else None,
        model_us={k: sum(r.estimates[k].total_us for r in rows) for k in GPUS},
        stream_us={k: sum(r.stream_estimates[k].total_us for r in rows) for k in GPUS},
        goal_us=goal_us(rec.scenario, b), record_s=rec.seconds, cuda_settings=rec.cuda_settings, activity=act_src,
        notes=notes, mismatches=mismatches)


# ------------------------------------------------------------------------------------------------ CUDA timing
def _measure_worker(inp: str, outp: str) -> int:
    """Subprocess entry: time each case natively on CUDA (graph replay, L2 flushed, median of reps)."""
    import statistics

    import torch

    from ..sampler import Sampler
    from .record import _case_rows, _env

    cases = json.loads(Path(inp).read_text(encoding="utf-8"))
    dev = torch.device("cuda", torch.cuda.current_device())
    l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20))
    scratch = torch.empty(2 * l2 // 4, dtype=torch.float32, device=dev)
    out = []
    for c in cases:
        try:
            with _env(CUDA_KNOBS):
                inp_, params, prompts = _case_rows(c["scenario"], c["batch"], c["dtype"], c["vocab"], c["seed"])
                logits = inp_.buffers[0].to(dev)
                s = Sampler(vocab_size=c["vocab"], max_slots=c["batch"], device=dev, backend="triton")
                slots = [s.add(p, prompt_token_ids=pr)[0] for p, pr in zip(params, prompts, strict=True)]
                slots_t = torch.tensor(slots, dtype=torch.int64, device=dev)
                for _ in range(3):
                    s.sample(logits, slots_t)
                torch.cuda.synchronize()
                mode = "cuda graph"
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            s.sample(logits, slots_t)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        s.sample(logits, slots_t)
                    run: Callable[[], Any] = graph.replay
                except Exception as e:  # fall back to eager launches
                    mode = f"eager (graph capture failed: {type(e).__name__})"
                    run = functools.partial(s.sample, logits, slots_t)
                times = []
                for _ in range(c["reps"]):
                    scratch.zero_()
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    run()
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) * 1000.0)
            out.append({"us": statistics.median(times), "note": mode})
        except Exception as e:  # reported per case
            out.append({"us": None, "note": f"error: {type(e).__name__}: {str(e)[:300]}"})
    Path(outp).write_text(json.dumps(out), encoding="utf-8")
    return 0


def _measure(cases: list[CaseResult], cfg: ModelConfig) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src_root = str(Path(importlib.import_module("fastsampler").__file__).parent.parent)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec = [{"scenario": c.scenario, "batch": c.batch, "dtype": c.dtype, "vocab": c.vocab, "seed": cfg.seed,
             "reps": cfg.measure_reps} for c in cases]
    with tempfile.TemporaryDirectory() as td:
        inp, outp = Path(td) / "in.json", Path(td) / "out.json"
        inp.write_text(json.dumps(spec), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "fastsampler.bench.model", "--measure", str(inp), str(outp)],
                              env=env, capture_output=True, text=True, timeout=3600)
        if not outp.exists():
            err = (proc.stderr or "").strip().splitlines()
            for c in cases:
                c.measured_note = "timing worker failed: " + (err[-1] if err else f"exit {proc.returncode}")
            return
        for c, m in zip(cases, json.loads(outp.read_text(encoding="utf-8")), strict=True):
            c.measured_us, c.measured_note = m["us"], m["note"]


# ------------------------------------------------------------------------------------------------ output
def _fmt(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{nd}f}"


def write_model_csv(path: Path, results: list[CaseResult], gpu_key: str) -> None:
    measured = any(r.measured_us is not None or r.measured_note for r in results)
    cols = MODEL_COLUMNS + (["measured_us"] if measured else [])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in results:
            row = [r.scenario, r.batch, r.dtype, r.vocab, r.launches, round(r.hbm_bytes_per_row),
                   r.full_row_reads, _fmt(r.max_instr_per_id), _fmt(r.model_us[gpu_key], 2), _fmt(r.goal_us, 1)]
            if measured:
                row.append(_fmt(r.measured_us, 2))
            w.writerow(row)


def write_launches_csv(path: Path, results: list[CaseResult], gpu_key: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(LAUNCH_COLUMNS)
        for r in results:
            for x in r.rows:
                e = x.estimates[gpu_key]
                probe = x.nbytes if x.kind == "torch" else x.touched
                w.writerow([r.scenario, r.batch, r.dtype, r.vocab, x.index, x.kind, x.kernel,
                            "x".join(map(str, x.grid)), x.programs, round(x.nbytes), round(x.nbytes / r.batch),
                            "" if probe is None or r.touched_bytes_per_row is None else round(probe / r.batch),
                            round(x.ids), _fmt(x.instr_per_id), round(x.thread_instr),
                            "" if x.regs is None else x.regs, "" if x.spills is None else x.spills,
                            "" if x.num_warps is None else x.num_warps, int(x.measured),
                            x.full_row_reads, e.bound, _fmt(e.total_us, 3),
                            _fmt(x.estimates["h100"].total_us, 3), x.rule, x.id_loop, x.sass, x.note])


def format_model_table(results: list[CaseResult], gpu_key: str) -> str:
    """The per-case table printed to stdout."""
    measured = any(r.measured_us is not None for r in results)
    head = ["scenario", "B", "dtype", "V", "launches", "triton", "torch", "KB/row", "probe KB/row", "row reads",
            "max instr/id", "H100 us", "H200 us", f"{GPUS[gpu_key].name} no-graph us", "goal us", "model/goal"]
    if measured:
        head.append("measured us")
    lines = []
    for r in results:
        ratio = r.model_us["h200"] / r.goal_us if r.goal_us and not math.isnan(r.goal_us) else None
        row = [r.scenario, str(r.batch), r.dtype, str(r.vocab), str(r.launches), str(r.triton_launches),
               str(r.torch_launches), f"{r.hbm_bytes_per_row / 1024:.0f}",
               "" if r.touched_bytes_per_row is None else f"{r.touched_bytes_per_row / 1024:.0f}",
               str(r.full_row_reads),
               _fmt(r.max_instr_per_id), _fmt(r.model_us["h100"]), _fmt(r.model_us["h200"]),
               _fmt(r.stream_us[gpu_key]), _fmt(r.goal_us), _fmt(ratio, 2)]
        if measured:
            row.append(_fmt(r.measured_us))
        lines.append(row)
    widths = [max(len(h), *(len(row[i]) for row in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) if i > 2 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths, strict=True)))]
    out.append("  ".join("-" * w for w in widths))
    for row in lines:
        out.append("  ".join(c.rjust(w) if i > 2 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    return "\n".join(out)


def _header(results: list[CaseResult], cfg: ModelConfig, compile_note: str) -> str:
    g = gpu(cfg.gpu)
    acts = sorted({r.activity for r in results})
    settings = sorted({r.cuda_settings for r in results})
    lines = [
        "GPU cost model of the Triton backend: one Sampler.sample step (slots as a device tensor), recorded under the "
        "Triton interpreter with " + ", ".join(f"{k}={v}" for k, v in CUDA_KNOBS.items()) +
        f" (block policy: {', '.join(settings)}); SASS for sm_90 ({compile_note}).",
        "Per launch: max(bytes / bandwidth, thread-instructions / issue rate) + launch latency, summed; 'H100 us' / "
        "'H200 us' inside a CUDA graph, the no-graph column with the stream launch latency. model_us in model.csv: "
        f"{g.name}, CUDA graph. KB/row: access rules; probe KB/row: bytes the kernels touched in an executed B = 1 "
        f"step, scaled. Data-dependent traffic (select levels): {'; '.join(acts)}.",
    ]
    notes = sorted({n for r in results for n in r.notes})
    lines += [f"note: {n}" for n in notes]
    worst: dict[str, tuple[float, float, str]] = {}
    for r in results:
        for k, rule_b, probe_b in r.mismatches:
            ratio = max(rule_b, probe_b) / max(1.0, min(rule_b, probe_b))
            if k not in worst or ratio > max(worst[k][0], worst[k][1]) / max(1.0, min(worst[k][0], worst[k][1])):
                worst[k] = (rule_b, probe_b, f"{r.scenario} {r.dtype} B={r.batch}")
    for k, (rule_b, probe_b, where) in sorted(worst.items()):
        lines.append(f"note: the access rule of {k} ({rule_for(k).summary}) counts {rule_b / 1024:.1f} KB/row where "
                     f"the probe touched {probe_b / 1024:.1f} KB/row ({where}): check its entry in "
                     "fastsampler.bench.access.ACCESS_RULES")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ driver
def run_model(cfg: ModelConfig, out_dir: Path, *, log: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Model every case of ``cfg``; writes ``model.csv``, ``model_launches.csv`` and ``model_table.txt`` to
    ``out_dir`` and returns the results (the table is returned by `format_model_table`)."""
    from .scenarios import DTYPES, SCENARIOS

    gpu(cfg.gpu)  # validate early
    bad = [s for s in cfg.scenarios if s not in SCENARIOS] + [d for d in cfg.dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"unknown scenario(s) / dtype(s) {bad}")
    if cfg.activity not in ("probe", "all"):
        raise ValueError(f"activity must be 'probe' or 'all', got {cfg.activity!r}")
    ensure_interpreter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir is not None else out_dir / "model_cache"
    cache.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        if cfg.progress:
            (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)

    t0 = time.perf_counter()
    records: list[StepRecord] = []
    for scen, dt, v, b in cfg.cases():
        rec = record_step(scen, b, dt, v, seed=cfg.seed)
        records.append(rec)
        say(f"model: recorded {scen} B={b} {dt} V={v}: {len(rec.triton)} Triton launches, "
            f"{sum(x.kernels for x in rec.torch_ops)} torch kernels ({rec.seconds:.2f}s step, "
            f"{time.perf_counter() - t0:.0f}s)")
    probes: dict[tuple[str, str, int], list] = {}
    if cfg.activity == "probe":
        for rec in records:
            k = (rec.scenario, rec.dtype, rec.vocab)
            if k in probes:
                continue
            t1 = time.perf_counter()
            probes[k] = _probe(rec.scenario, rec.dtype, rec.vocab, cfg.seed, cache)
            say(f"model: probe (executed B = 1 step) {rec.scenario} {rec.dtype} V={rec.vocab} "
                f"({time.perf_counter() - t1:.1f}s)")
    specs = [spec_of(x) for rec in records for x in rec.triton]
    t1 = time.perf_counter()
    stats = compile_launches(specs, cache)
    ok = [s for s in stats.values() if s.get("ok")]
    fresh = sum(1 for s in ok if not s.get("cached"))
    if len(ok) == len(stats):
        compile_note = f"{len(stats)} specialisations, {fresh} compiled now, {len(stats) - fresh} from the cache"
    else:
        err = next((s.get("error", "") for s in stats.values() if not s.get("ok")), "")
        compile_note = f"{len(stats) - len(ok)} of {len(stats)} specialisations failed: {err[:200]}"
    say(f"model: compiled for sm_90: {compile_note} ({time.perf_counter() - t1:.1f}s)")
    results = [_assemble(rec, probes.get((rec.scenario, rec.dtype, rec.vocab)), stats) for rec in records]
    measure = cfg.measure
    if measure is None:
        import torch

        measure = torch.cuda.is_available()
    if measure:
        say("model: timing every case on CUDA (native Triton, CUDA graph replay)")
        _measure(results, cfg)
    write_model_csv(out_dir / "model.csv", results, cfg.gpu)
    write_launches_csv(out_dir / "model_launches.csv", results, cfg.gpu)
    table = _header(results, cfg, compile_note) + "\n\n" + format_model_table(results, cfg.gpu)
    (out_dir / "model_table.txt").write_text(table + "\n", encoding="utf-8")
    return results


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--measure":
        return _measure_worker(argv[1], argv[2])
    print("usage: python -m fastsampler.bench --model [options]  (this module's own entry is the CUDA timing "
          "worker: --measure IN.json OUT.json)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
