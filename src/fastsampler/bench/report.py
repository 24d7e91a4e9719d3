"""Results: the printed table and summary, the CSV (appended across runs), the latency plot, the run's metadata."""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .providers import BASELINES, CAPPED

__all__ = ["Result", "RunInfo", "run_info", "format_table", "format_summary", "format_markdown", "write_csv",
           "write_plot", "set_bandwidth", "run_copy_gbps", "CSV_COLUMNS", "PCT_COPY_MAX", "SUMMARY_BASELINES"]

OK, FAILED, NA, ERROR, SKIPPED = "ok", "FAILED", "n/a", "error", "skipped"

# %copy compares a sampler's read rate (logit bytes / its median) with the copy's read + write rate on the same
# buffers, timed beside it. A sampler must read every logit, so above this the ratio is no fraction of the memory
# system's limit: the copy's timing was disturbed (load on a shared machine), or the bytes sat in a cache for the
# sampler and not for the copy. Such a ratio is shown flagged and left out of the summaries' best %copy.
PCT_COPY_MAX = 100.0
FLAG = "?"  # the mark of a flagged %copy in the table and summary.md

# the peers summary.md compares with: every one of them that can express a scenario must have run beside fastsampler
# on the case it shows (the numpy reference is the definition, written for clarity: it is in the table only)
SUMMARY_BASELINES = ("torch-sort", "torch-warpers", "flashinfer")


@dataclass
class RunInfo:
    timestamp: str
    device: str
    device_type: str
    torch_version: str
    triton_version: str
    fastsampler_version: str
    git_commit: str
    copy_gbps: float = float("nan")
    threads: int = 0


@dataclass
class Result:
    scenario: str
    dtype: str
    batch: int
    vocab: int
    provider: str
    status: str
    note: str = ""
    median_us: float = float("nan")
    p20_us: float = float("nan")
    p80_us: float = float("nan")
    wall_us: float = float("nan")
    reps: int = 0
    logit_bytes: int = 0
    gbps: float = float("nan")
    copy_us: float = float("nan")  # 20th percentile of the copies of this case's logits timed beside its providers
    copy_gbps: float = float("nan")  # 2 * logit_bytes / copy_us (read + write)
    pct_copy: float = float("nan")  # 100 * gbps / copy_gbps
    bw_flag: str = ""  # why pct_copy is implausible ('' when it is not)
    speedups: dict[str, float] = field(default_factory=dict)  # baseline -> baseline time / this time


CSV_COLUMNS = [
    "timestamp", "git_commit", "device", "device_type", "torch_version", "triton_version", "fastsampler_version",
    "threads", "scenario", "dtype", "batch", "vocab", "provider", "status", "median_us", "p20_us", "p80_us",
    "wall_us", "reps", "logit_bytes", "gbps", "copy_us", "copy_gbps", "pct_copy", "bw_flag",
    *[f"speedup_vs_{b.replace('-', '_')}" for b in BASELINES], "note",
]


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere) and the logical CPU count.

    >>> isinstance(cpu_model(), str)
    True
    """
    return f"{cpu_name()} ({os.cpu_count()} cpus)"


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def _git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(device: torch.device) -> RunInfo:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    from .. import __version__

    return RunInfo(
        timestamp=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device=_device_name(device),
        device_type=device.type,
        torch_version=torch.__version__,
        triton_version=triton_version,
        fastsampler_version=__version__,
        git_commit=_git_commit(),
        threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------------------------------- bandwidth
def set_bandwidth(case: list[Result], copy_us: float) -> None:
    """Give the measured results of one case their copy (``copy_us``: the 20th percentile of the copies of the case's
    logits timed beside them), ``%copy``, and a flag where that ratio is implausible."""
    for r in case:
        if r.status != OK or not r.logit_bytes or not copy_us > 0:
            continue
        r.copy_us = copy_us
        r.copy_gbps = 2 * r.logit_bytes / (copy_us * 1e-6) / 1e9
        r.pct_copy = 100.0 * r.gbps / r.copy_gbps
        if not r.pct_copy <= PCT_COPY_MAX:
            r.bw_flag = (f"%copy {r.pct_copy:.0f} > {PCT_COPY_MAX:.0f}: read faster than a copy of the same bytes "
                         f"beside it ({_us(r.median_us)} us against {_us(copy_us)} us for the copy)")


def run_copy_gbps(results: list[Result]) -> float:
    """The run's copy bandwidth, for the headers: the median copy GB/s of the largest cases measured (the
    memory-bound end; small cases are served from cache)."""
    ok = [r for r in results if r.status == OK and r.copy_gbps > 0]
    if not ok:
        return float("nan")
    top = max(r.logit_bytes for r in ok)
    return statistics.median(r.copy_gbps for r in ok if r.logit_bytes == top)


def _pct(r: Result, fmt: str) -> str:
    return _f(r.pct_copy, fmt) + (FLAG if r.bw_flag else "")


# --------------------------------------------------------------------------------------------------- table
def _f(x: float, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _us(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _x(ratio: float) -> str:
    """A speedup: two decimals, or two significant digits below 0.1 (so 0.0004 does not print as 0.00)."""
    if ratio is None or math.isnan(ratio):
        return "-"
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}"


def format_table(results: list[Result], info: RunInfo) -> str:
    """One line per (case, provider): µs median and p20–p80, GB/s, % of copy bandwidth, speedup vs baselines."""
    base_cols = [b for b in BASELINES if any(r.provider == b for r in results)]
    head = ["scenario", "dtype", "B", "V", "provider", "median us", "p20-p80 us", "GB/s", "copy GB/s", "%copy",
            *[f"x {b}" for b in base_cols], "status"]
    rows = []
    for r in results:
        ok = r.status == OK
        rows.append([
            r.scenario, r.dtype, str(r.batch), str(r.vocab), r.provider,
            _us(r.median_us) if ok else "-",
            f"{_us(r.p20_us)}-{_us(r.p80_us)}" if ok else "-",
            _f(r.gbps, ".1f") if ok else "-",
            _f(r.copy_gbps, ".1f") if ok else "-",
            _pct(r, ".1f") if ok else "-",
            *[_x(r.speedups.get(b, float("nan"))) if ok else "-" for b in base_cols],
            r.status if ok else f"{r.status}: {r.note}",
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    num = set(range(2, len(head) - 1)) - {4}
    fmt_row = lambda row: "  ".join(
        c.rjust(w) if i in num else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
    lines = [_header(info), fmt_row(head), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(row) for row in rows]
    if any(r.bw_flag for r in results):
        lines.append(_FLAG_NOTE)
    return "\n".join(lines) + "\n"


_FLAG_NOTE = (f"{FLAG} implausible: %copy above {PCT_COPY_MAX:.0f} (the sampler read the logits faster than the copy "
              f"timed beside it moved them): no fraction of the memory system's limit; a disturbed copy timing, or a "
              f"case the cache holds for the sampler")


def _header(info: RunInfo) -> str:
    threads = f", {info.threads} thread{'s' if info.threads != 1 else ''}" if info.device_type == "cpu" else ""
    return (f"device: {info.device}{threads} | copy {_f(info.copy_gbps, '.1f')} GB/s (largest case) | torch "
            f"{info.torch_version}, "
            f"triton {info.triton_version}, fastsampler {info.fastsampler_version} ({info.git_commit}) | "
            f"{info.timestamp}")


def _geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


MAX_FAILURE_LINES = 20


def _generic(note: str) -> str:
    """A failure reason with its numbers blanked, so the same failure at other sizes groups with it."""
    import re

    return re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "#", note)[:200]


def format_summary(results: list[Result], info: RunInfo, notes: list[str] = ()) -> str:
    """Per scenario, dtype and fastsampler provider: geometric-mean speedup vs each baseline, best bandwidth."""
    base_cols = [b for b in BASELINES if any(r.provider == b for r in results)]
    groups: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
    for r in results:
        if r.provider.startswith("fastsampler"):
            groups[(r.scenario, r.dtype, r.provider)].append(r)
    head = ["scenario", "dtype", "provider", "cases", "median us (smallest..largest)", "best GB/s", "best %copy",
            *[f"x {b} (geomean)" for b in base_cols]]
    rows = []
    for (scen, dt, prov), rs in groups.items():
        ok = [r for r in rs if r.status == OK]
        bad = [r for r in rs if r.status in (FAILED, ERROR)]
        if ok:
            small = min(ok, key=lambda r: (r.batch * r.vocab, r.batch))
            large = max(ok, key=lambda r: (r.batch * r.vocab, r.batch))
            span = f"{_us(small.median_us)} (B{small.batch},V{small.vocab})..{_us(large.median_us)} " \
                   f"(B{large.batch},V{large.vocab})"
        else:
            span = "-"
        cases = f"{len(ok)}/{len(rs)}" + (f" ({len(bad)} FAILED/error)" if bad else "")
        rows.append([
            scen, dt, prov, cases, span,
            _f(max((r.gbps for r in ok), default=float("nan")), ".1f"),
            _f(max((r.pct_copy for r in ok if not r.bw_flag), default=float("nan")), ".1f"),
            *[_x(_geomean([r.speedups.get(b, float("nan")) for r in ok])) for b in base_cols],
        ])
    lines = ["SUMMARY  " + _header(info)]
    if rows:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
        fmt_row = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        lines += [fmt_row(head), "  ".join("-" * w for w in widths), *(fmt_row(r) for r in rows)]
    else:
        lines.append("(no fastsampler provider was measured)")
    # failures, grouped by (status, provider, scenario, dtype, reason) so a systematic one takes one line
    bad: dict[tuple[str, str, str, str, str], list[str]] = defaultdict(list)
    first_note: dict[tuple[str, str, str, str, str], str] = {}
    for r in results:
        if r.status in (FAILED, ERROR):
            key = (r.status, r.provider, r.scenario, r.dtype, _generic(r.note))
            bad[key].append(f"B{r.batch}xV{r.vocab}")
            first_note.setdefault(key, r.note)
    for i, (key, sizes) in enumerate(bad.items()):
        status, prov, scen, dt, _ = key
        note = first_note[key]
        if i == MAX_FAILURE_LINES:
            lines.append(f"... and {len(bad) - i} more groups of FAILED / error rows (see table.txt)")
            break
        where = ", ".join(sizes[:4]) + (f" and {len(sizes) - 4} more" if len(sizes) > 4 else "")
        lines.append(f"{status}: {prov} on {scen} {dt} ({where}): {note}")
    skipped = sum(r.status == SKIPPED for r in results)
    if skipped:
        lines.append(f"{skipped} measurements skipped (time budget)")
    flagged = sum(bool(r.bw_flag) for r in results)
    if flagged:
        lines.append(f"{flagged} %copy ratios above {PCT_COPY_MAX:.0f} flagged implausible ({FLAG} in table.txt) and "
                     f"left out of best %copy")
    lines += [f"note: {n}" for n in notes]
    lines.append("x = baseline median / provider median (> 1: faster than the baseline); "
                 "GB/s = logit bytes read once / median time; %copy = GB/s against a copy of the case's logits "
                 "(read + write) timed between its providers")
    return "\n".join(lines) + "\n"


def _capped(r: Result) -> bool:
    return r.status == NA and r.note.startswith(CAPPED)


def _baselines_ran(case: list[Result], peers: set[str]) -> bool:
    """Whether every peer of the run that can express this case's scenario ran on it (at least one did): none
    capped, FAILED, raised, skipped or missing; an ``n/a`` that is no cap (the scenario is not expressible) is
    left out."""
    by = {r.provider: r for r in case}
    ran = False
    for p in peers:
        r = by.get(p)
        if r is not None and r.status == OK:
            ran = True
        elif r is None or r.status != NA or _capped(r):
            return False
    return ran


def format_markdown(results: list[Result], info: RunInfo) -> str:
    """A short Markdown table for the README: per scenario, dtype and fastsampler provider, the largest measured case
    at which every baseline ran beside it (`SUMMARY_BASELINES` that can express the scenario: none capped, n/a,
    failed or skipped), with the speedups against them. A scenario without such a case is named under the table,
    not shown without speedups."""
    peers = {r.provider for r in results if r.provider in SUMMARY_BASELINES}
    cases: dict[tuple[str, str, int, int], list[Result]] = defaultdict(list)
    for r in results:
        cases[(r.scenario, r.dtype, r.batch, r.vocab)].append(r)
    pick: dict[tuple[str, str, str], Result] = {}
    missing: dict[tuple[str, str, str], None] = {}  # in run order
    for (scen, dt, b, v), case in cases.items():
        eligible = bool(peers) and _baselines_ran(case, peers)
        for r in case:
            if not r.provider.startswith("fastsampler"):
                continue
            key = (scen, dt, r.provider)
            missing.setdefault(key)
            if eligible and r.status == OK and (key not in pick or (b * v, b) > (pick[key].batch * pick[key].vocab,
                                                                                 pick[key].batch)):
                pick[key] = r
    base_cols = [b for b in SUMMARY_BASELINES if any(b in r.speedups for r in pick.values())]
    threads = f", {info.threads} thread{'s' if info.threads != 1 else ''}" if info.device_type == "cpu" else ""
    lines = [f"Measured {info.timestamp[:10]} on {info.device}{threads} (torch {info.torch_version}, triton "
             f"{info.triton_version}, fastsampler {info.fastsampler_version} {info.git_commit}). Per scenario, the "
             f"largest case at which every baseline ran beside fastsampler; median µs per call; % copy: GB/s against "
             f"a copy of the same logits timed beside it (read + write); ×: speedup against the baseline (its median "
             f"/ ours).", ""]
    if pick:
        head = ["scenario", "dtype", "B × V", "provider", "µs", "GB/s", "% copy", *[f"× {b}" for b in base_cols]]
        lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for r in pick.values():
            cells = [r.scenario, r.dtype, f"{r.batch} × {r.vocab}", r.provider, _us(r.median_us), _f(r.gbps, ".1f"),
                     _pct(r, ".0f"), *[_x(r.speedups.get(b, float("nan"))) for b in base_cols]]
            lines.append("| " + " | ".join(cells) + " |")
        if any(r.bw_flag for r in pick.values()):
            lines += ["", _FLAG_NOTE + "."]
    if not peers:
        lines.append("No baseline was measured in this run (see `--providers`): no speedups to show.")
    elif not pick:
        lines.append("No case of this run has every baseline measured beside fastsampler (each was capped, n/a, "
                     "failed or skipped): no speedups to show; the measurements are in table.txt.")
    rest = [k for k in missing if k not in pick]
    if pick and rest:
        lines += ["", "No case where every baseline ran (capped, n/a, failed or skipped; see table.txt): " +
                  ", ".join(f"{s} {d} {p}" for s, d, p in rest) + "."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- csv, plot
def csv_rows(results: list[Result], info: RunInfo) -> list[dict]:
    meta = {k: v for k, v in asdict(info).items() if k in CSV_COLUMNS}
    out = []
    for r in results:
        row = dict(meta)
        row.update({k: v for k, v in asdict(r).items() if k in CSV_COLUMNS})
        for b in BASELINES:
            row[f"speedup_vs_{b.replace('-', '_')}"] = r.speedups.get(b, float("nan"))
        out.append({k: _csv_value(row.get(k, "")) for k in CSV_COLUMNS})
    return out


def _csv_value(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else format(v, ".6g")
    return v


def write_csv(path: Path, results: list[Result], info: RunInfo) -> Path:
    """Append rows to ``path``; a file with another header is left alone and a dated file is written beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
        if header != CSV_COLUMNS:
            path = path.with_name(f"{path.stem}-{info.timestamp.replace(':', '')}{path.suffix}")
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(csv_rows(results, info))
    return path


def write_plot(path: Path, results: list[Result], info: RunInfo) -> str:
    """Latency (median µs, log scale) against batch size: one panel per (scenario, dtype), one line per provider and
    vocabulary size. Returns a note ('' when written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'fastsampler[bench]')"
    ok = [r for r in results if r.status == OK]
    if not ok:
        return "plot skipped: nothing was measured"
    scenarios = list(dict.fromkeys(r.scenario for r in ok))
    dtypes = list(dict.fromkeys(r.dtype for r in ok))
    providers = list(dict.fromkeys(r.provider for r in ok))
    vocabs = sorted({r.vocab for r in ok})
    styles = ["-", "--", "-.", ":"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    batches = sorted({r.batch for r in ok})
    fig, axes = plt.subplots(len(scenarios), len(dtypes), figsize=(max(11.0, 5.5 * len(dtypes)),
                                                                    3.6 * len(scenarios)), squeeze=False)
    for i, scen in enumerate(scenarios):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            for pi, prov in enumerate(providers):
                for vi, v in enumerate(vocabs):
                    pts = sorted((r.batch, r.median_us) for r in ok
                                 if r.scenario == scen and r.dtype == dt and r.provider == prov and r.vocab == v)
                    if not pts:
                        continue
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[vi % len(styles)], marker="o",
                            markersize=3, color=colors[pi % len(colors)], label=f"{prov} V={v}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_yscale("log")
            ax.set_title(f"{scen} ({dt})", fontsize=10)
            ax.set_xlabel("batch size")
            ax.set_ylabel("median µs")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"fastsampler latency vs batch size — {info.device}\n{info.timestamp}, {info.git_commit}",
                 fontsize=11)
    height = fig.get_figheight()
    legend_in = 0.25 * math.ceil(len(labels) / 4) + 0.2  # inches taken by the legend at the bottom
    fig.tight_layout(rect=(0, legend_in / height, 1, 1 - 0.6 / height))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""
