"""The benchmark command: a quick CPU smoke run of the CLI, its CSV, and the validity check that keeps wrong samplers
out of the table (a deliberately wrong provider must be reported FAILED, never timed)."""

from __future__ import annotations

import csv

import pytest
import torch

from fastsampler.bench.__main__ import main
from fastsampler.bench.providers import (
    NotApplicable,
    Prepared,
    Provider,
    TorchSortProvider,
    TorchWarpersProvider,
)
from fastsampler.bench.report import CSV_COLUMNS, FAILED, NA, OK, SKIPPED, format_summary, format_table, run_info
from fastsampler.bench.runner import BenchConfig, run_benchmark
from fastsampler.bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, check_inputs, make_inputs
from fastsampler.bench.timing import TimingConfig

CPU = torch.device("cpu")
FAST = TimingConfig(warmup=1, min_reps=2, max_reps=3, budget_s=0.005)


def _config(scenarios, *, batch=(3,), vocab=(3000,), dtypes=("fp32",), budget_s=None) -> BenchConfig:
    return BenchConfig(scenarios=list(scenarios), batch_sizes=list(batch), vocab_sizes=list(vocab),
                       dtypes=list(dtypes), device=CPU, timing=FAST, check_rows=3, check_steps=6,
                       budget_s=budget_s)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_cli_quick_smoke(tmp_path):
    # every scenario, both dtypes, one tiny size: the path CI runs (python -m fastsampler.bench --quick, smaller)
    out = tmp_path / "res"
    rc = main(["--quick", "--batch-sizes", "2", "--vocab-sizes", "3000", "--dtypes", "fp32,bf16", "--reps", "3",
               "--time-per-measurement", "0.005", "--threads", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    header, rows = _read_csv(out / "results.csv")
    assert header == CSV_COLUMNS
    providers = {r["provider"] for r in rows}
    assert {"torch-sort", "torch-warpers", "numpy-ref"} <= providers
    assert len(rows) == len(DEFAULT_SCENARIOS) * 2 * len(providers)
    for r in rows:
        assert r["device_type"] == "cpu" and r["torch_version"] == torch.__version__ and r["timestamp"]
        if r["provider"] in ("torch-sort", "torch-warpers", "numpy-ref"):
            # the baselines are written here: they must match the reference's distribution on every scenario
            assert r["status"] in (OK, NA), (r["provider"], r["scenario"], r["dtype"], r["note"])
        if r["status"] == OK:
            assert float(r["median_us"]) > 0 and float(r["gbps"]) > 0 and float(r["copy_gbps"]) > 0
            assert float(r["p20_us"]) <= float(r["median_us"]) <= float(r["p80_us"])
    na = {(r["provider"], r["scenario"]) for r in rows if r["status"] == NA}
    assert ("torch-sort", "mirostat_v2") in na and ("torch-sort", "typical") in na
    assert (out / "table.txt").read_text().count("\n") >= len(rows)
    assert "SUMMARY" in (out / "summary.txt").read_text()
    pytest.importorskip("matplotlib")
    assert (out / "latency_vs_batch.png").stat().st_size > 0


def test_csv_appends_across_runs(tmp_path):
    args = ["--scenarios", "greedy", "--batch-sizes", "1", "--vocab-sizes", "500", "--dtypes", "fp32",
            "--providers", "torch-sort", "--reps", "2", "--time-per-measurement", "0.001", "--out", str(tmp_path),
            "--no-progress", "--no-plot"]
    assert main(args) == 0
    assert main(args) == 0
    header, rows = _read_csv(tmp_path / "results.csv")
    assert header == CSV_COLUMNS and len(rows) == 2 and all(r["status"] == OK for r in rows)


def test_cli_rejects_unknown_names(tmp_path, capsys):
    assert main(["--scenarios", "nope", "--out", str(tmp_path)]) == 2
    assert main(["--providers", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown provider 'nope'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- wrong providers
class IgnoresTruncation(TorchWarpersProvider):
    """Samples from the untruncated softmax: fast, and wrong whenever top-k / top-p / min-p is on."""

    name = "wrong-untruncated"
    is_baseline = False

    def warp(self, scores, inp, rp):
        return scores / rp.temperature


class WrongTemperature(TorchWarpersProvider):
    """Draws at twice the temperature: inside the support of an untruncated row, but from another distribution."""

    name = "wrong-temperature"
    is_baseline = False

    def prepare(self, inp):
        prep = super().prepare(inp)
        return Prepared(prep.run, prep.draw)  # hide probs(): only the drawn tokens can give it away

    def warp(self, scores, inp, rp):
        return super().warp(scores, inp, rp) / 2.0


class AlwaysArgmax(Provider):
    """Returns the mode: inside the kept set, but not a sample of the distribution."""

    name = "wrong-argmax"

    def prepare(self, inp):
        if inp.params.greedy:
            raise NotApplicable("greedy is the argmax")
        return Prepared(lambda i: inp.buffers[i].float().argmax(-1), lambda step: inp.buffers[0].float().argmax(-1))


class OutOfRange(Provider):
    name = "wrong-range"

    def prepare(self, inp):
        return Prepared(lambda i: torch.full((inp.batch,), inp.vocab), lambda step: torch.full((inp.batch,), inp.vocab))


class EditsInput(TorchSortProvider):
    """Correct tokens, but writes into the caller's logits."""

    name = "wrong-inplace"
    is_baseline = False

    def prepare(self, inp):
        prep = super().prepare(inp)

        def draw(step):
            out = prep.draw(step)
            inp.buffers[0][:, 0] += 1.0
            return out

        return Prepared(prep.run, draw, prep.probs)


def test_wrong_providers_are_failed_not_timed():
    provs = [TorchSortProvider(), IgnoresTruncation(), WrongTemperature(), AlwaysArgmax(), OutOfRange(), EditsInput()]
    results = run_benchmark(_config(["topk_topp_minp", "plain"]), provs)
    by = {(r.scenario, r.provider): r for r in results}
    assert by[("topk_topp_minp", "torch-sort")].status == OK
    assert by[("plain", "torch-sort")].status == OK
    bad = by[("topk_topp_minp", "wrong-untruncated")]
    assert bad.status == FAILED and "outside the reference kept set" in bad.note
    assert bad.reps == 0 and bad.median_us != bad.median_us  # not timed (NaN)
    assert by[("plain", "wrong-argmax")].status == FAILED
    assert "most likely token" in by[("plain", "wrong-argmax")].note
    assert by[("plain", "wrong-temperature")].status == FAILED
    assert "sd from its expectation" in by[("plain", "wrong-temperature")].note
    rng, inplace = by[("plain", "wrong-range")], by[("plain", "wrong-inplace")]
    assert rng.status == FAILED and "outside [0, 3000)" in rng.note
    assert inplace.status == FAILED and "modified its input" in inplace.note
    # FAILED rows show up in the summary with their reason, and carry no speedup
    info = run_info(CPU)
    text = format_summary(results, info) + format_table(results, info)
    assert "FAILED" in text and "wrong-untruncated" in text
    assert not bad.speedups and "wrong-untruncated" not in by[("plain", "torch-sort")].speedups


def test_wrong_kept_set_fails_probs_check():
    # the tokens of a top-k 50 + top-p 0.9 + min-p 0.05 row nearly always fall inside a slightly smaller kept set;
    # the exposed distribution must still match the reference's
    class DropsBoundary(TorchWarpersProvider):
        name = "wrong-kept-set"
        is_baseline = False

        def warp(self, scores, inp, rp):
            w = super().warp(scores, inp, rp)
            keep = torch.isfinite(w)
            kept = keep.sum(-1, keepdim=True)
            order = w.argsort(dim=-1, descending=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(w.shape[1]).expand_as(order))
            return w.masked_fill((ranks >= kept // 2) & (kept > 1), float("-inf"))

    results = run_benchmark(_config(["topk_topp_minp"]), [DropsBoundary()])
    assert results[0].status == FAILED


def test_budget_skips_and_provider_errors():
    class Raises(Provider):
        name = "raises"

        def prepare(self, inp):
            raise RuntimeError("boom")

    res = run_benchmark(_config(["greedy"]), [Raises()])
    assert res[0].status == "error" and "boom" in res[0].note
    res = run_benchmark(_config(["greedy", "plain"], budget_s=0.0), [TorchSortProvider()])
    assert [r.status for r in res] == [SKIPPED, SKIPPED]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checked_rows_do_not_depend_on_batch_size(dtype):
    scen = SCENARIOS["full"]
    chk = check_inputs(scen, dtype, 700, 3)
    for b in (1, 3, 5):
        inp = make_inputs(scen, dtype, b, 700, CPU, check_rows=3, n_buffers=2)
        r = inp.check_rows
        assert torch.equal(inp.buffers[0][:r].float(), chk.logits[:r])
        assert torch.equal(inp.output_counts[:r], chk.output_counts[:r])
        assert inp.params == chk.params and len(inp.params.logit_bias) == 8
        assert int(inp.output_counts.sum()) == 256 * b


def test_progress_bar_and_markdown_summary():
    import io

    from fastsampler.bench.report import format_markdown
    from fastsampler.bench.runner import Progress

    stream = io.StringIO()  # not a terminal: a line per 10 %
    bar = Progress(20, stream=stream)
    for i in range(20):
        bar.step(f"case {i}")
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and lines[-1].startswith("[" + "#" * 30 + "] 20/20")

    results = run_benchmark(_config(["greedy"], vocab=(500,)), [TorchSortProvider(), TorchWarpersProvider()])
    results[1].provider = "fastsampler-fake"  # the markdown lists fastsampler providers against the baselines
    md = format_markdown(results, run_info(CPU))
    assert "| greedy | fp32 | 3 × 500 | fastsampler-fake |" in md and "× torch-sort" in md


def test_gpu_check_script_parses():
    import pathlib
    import shutil
    import subprocess

    script = pathlib.Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_cli_overhead_scenario(capsys):
    """``--scenarios overhead``: the host cost of a step against torch.argmax, one row per (scenario, API)."""
    assert main(["--scenarios", "overhead", "--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "x argmax" in out and "argmax" in out
    for scenario in ("greedy", "plain", "full"):
        assert any(line.startswith(scenario) and "Sampler.sample" in line for line in out.splitlines())


# ------------------------------------------------------------------------------------------- grids
def test_grid_names_are_the_scenarios_names():
    # the command line reads the names from bench/grids.py without importing torch: they must be the scenarios'
    from fastsampler.bench import grids
    from fastsampler.bench.scenarios import DTYPES, MODEL_SCENARIOS

    assert tuple(SCENARIOS) == grids.SCENARIO_NAMES and tuple(DTYPES) == grids.DTYPE_NAMES
    assert grids.DEFAULT_SCENARIOS == DEFAULT_SCENARIOS and set(MODEL_SCENARIOS) <= set(SCENARIOS)


def test_default_grid_depends_on_the_device():
    from fastsampler.bench.grids import grid_for

    gpu, cpu, cpu_full = grid_for("cuda"), grid_for("cpu"), grid_for("cpu", "full")
    # the GPU default is the full grid, every baseline at every size
    assert gpu.batch_sizes == (1, 8, 64, 256) and gpu.vocab_sizes == (32000, 128256, 151936, 262144)
    assert gpu.dtypes == ("fp32", "bf16") and gpu.baseline_max_elements == 0 and gpu.time_per_measurement == 0.25
    assert grid_for("cuda", "full") == gpu
    assert (cpu_full.batch_sizes, cpu_full.vocab_sizes, cpu_full.dtypes) == (gpu.batch_sizes, gpu.vocab_sizes,
                                                                             gpu.dtypes)

    def cases(g):
        return len(g.batch_sizes) * len(g.vocab_sizes) * len(g.dtypes) * len(g.scenarios)

    # the CPU default fits a laptop: a fraction of the full grid, the baselines capped below the full grid's cap
    assert cases(cpu) * 4 <= cases(cpu_full)
    assert 0 < cpu.baseline_max_elements < cpu_full.baseline_max_elements
    assert max(cpu.batch_sizes) * max(cpu.vocab_sizes) > cpu.baseline_max_elements  # fastsampler alone at the top


def test_cli_picks_the_cpu_grid_and_full_on_request(tmp_path, monkeypatch, capsys):
    from fastsampler.bench import grids

    tiny = dict(vocab_sizes=(300,), dtypes=("fp32",), baseline_max_elements=600, ref_max_elements=600,
                time_per_measurement=0.002, warmup=1, min_reps=2, max_reps=3, scenarios=("greedy",))
    monkeypatch.setitem(grids.GRIDS, ("cpu", "default"), grids.Grid("cpu", (1, 2), **tiny))
    monkeypatch.setitem(grids.GRIDS, ("cpu", "full"), grids.Grid("full", (1, 4), **tiny))
    args = ["--device", "cpu", "--providers", "torch-sort", "--threads", "1", "--no-progress", "--no-plot"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert main([*args, "--full", "--out", str(tmp_path / "full")]) == 0
    _, rows = _read_csv(tmp_path / "default" / "results.csv")
    assert sorted(int(r["batch"]) for r in rows) == [1, 2]
    _, rows = _read_csv(tmp_path / "full" / "results.csv")
    assert [(int(r["batch"]), r["status"]) for r in rows] == [(1, OK), (4, NA)]  # 4 x 300 > the cap
    assert rows[1]["note"].startswith("capped")
    assert "cpu grid (B 1,2 x V 300 x fp32, 1 scenarios" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--full", "--quick"])


# ------------------------------------------------------------------------------------------- --help without torch
_HELP = """
import sys, runpy
sys.argv = ["fastsampler-bench", "--help"]
try:
    {call}
except SystemExit as e:
    assert e.code == 0, e.code
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("call", [
    "runpy.run_module('fastsampler.bench', run_name='__main__')",  # python -m fastsampler.bench --help
    "from fastsampler.bench.__main__ import main; main()",  # the fastsampler-bench script
])
def test_help_does_not_import_torch(call):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _HELP.format(call=call)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--full" in r.stdout and "Default grid on a GPU" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "torch imported: False", r.stdout[-500:]


def test_help_answers_quickly():
    # under 2 s on the 2-core machine (it imports no torch); 5 s leaves room for a loaded CI runner
    import subprocess
    import sys
    import time

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fastsampler.bench", "--help"], capture_output=True, text=True,
                       timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0 and "usage: fastsampler-bench" in r.stdout, r.stderr
    assert elapsed < 5.0, f"--help took {elapsed:.1f}s"


# ------------------------------------------------------------------------------------------- bandwidth
def test_copy_is_timed_between_the_providers(monkeypatch):
    import fastsampler.bench.runner as runner

    calls = []
    real_copy, real_call = runner.time_copy, runner.time_call

    def copy(*a, **k):
        calls.append("copy")
        return real_copy(*a, **k)

    def call(*a, **k):
        calls.append("provider")
        return real_call(*a, **k)

    monkeypatch.setattr(runner, "time_copy", copy)
    monkeypatch.setattr(runner, "time_call", call)
    res = run_benchmark(_config(["greedy", "plain"]), [TorchSortProvider(), TorchWarpersProvider()])
    # per case: a copy before each provider and one after the last, so every provider has a copy on either side
    assert calls == ["copy", "provider", "copy", "provider", "copy"] * 2
    for r in res:
        assert r.status == OK and r.copy_us > 0 and not r.bw_flag
        assert r.copy_gbps == pytest.approx(2 * r.logit_bytes / (r.copy_us * 1e-6) / 1e9)
        assert r.pct_copy == pytest.approx(100 * r.gbps / r.copy_gbps)
    by_case = {}
    for r in res:
        by_case.setdefault(r.scenario, set()).add(r.copy_us)
    assert all(len(v) == 1 for v in by_case.values())  # one copy per case, shared by its providers


def _result(scen, batch, vocab, provider, status=OK, us=100.0, note="", **kw):
    from fastsampler.bench.report import Result

    return Result(scen, "fp32", batch, vocab, provider, status, note, median_us=us, logit_bytes=batch * vocab * 4,
                  gbps=batch * vocab * 4 / (us * 1e-6) / 1e9 if status == OK else float("nan"), **kw)


def test_implausible_copy_ratio_is_flagged():
    from fastsampler.bench.report import FLAG, format_markdown, set_bandwidth

    ok = [_result("plain", 8, 1000, "fastsampler-cpu", us=100.0), _result("plain", 8, 1000, "torch-sort", us=1e4)]
    set_bandwidth(ok, copy_us=150.0)  # the copy moves twice the bytes: 75 % of its rate, plausible
    assert ok[0].pct_copy == pytest.approx(75.0) and not ok[0].bw_flag
    noisy = [_result("plain", 8, 4000, "fastsampler-cpu", us=100.0), _result("plain", 8, 4000, "torch-sort", us=1e4)]
    set_bandwidth(noisy, copy_us=682.0)  # a disturbed copy: %copy 341
    assert noisy[0].pct_copy == pytest.approx(341.0) and "341 > 100" in noisy[0].bw_flag
    assert not noisy[1].bw_flag  # the slow baseline's ratio stays plausible
    results = ok + noisy
    for r in (ok, noisy):
        _speedups_of(r)
    info = run_info(CPU)
    table = format_table(results, info)
    line = next(ln for ln in table.splitlines() if "fastsampler-cpu" in ln and " 4000 " in ln)
    assert f"341.0{FLAG}" in line and "implausible" in table
    summary = format_summary(results, info)
    assert "1 %copy ratios above 100 flagged implausible" in summary
    row = next(ln for ln in summary.splitlines() if ln.startswith("plain") and "fastsampler-cpu" in ln)
    assert "75.0" in row and "341" not in row  # best %copy leaves the flagged ratio out
    assert f"341{FLAG}" in format_markdown(results, info)


def _speedups_of(case):
    from fastsampler.bench.runner import _speedups

    _speedups(case)


def test_markdown_shows_cases_where_every_baseline_ran():
    from fastsampler.bench.report import format_markdown, set_bandwidth

    capped = "capped: B*V > 8000 on cpu"
    cases = [
        # plain: every baseline at B = 2; torch-sort capped at B = 64 (larger, but no speedup against it)
        [_result("plain", 2, 4000, "fastsampler-cpu", us=50.0), _result("plain", 2, 4000, "torch-sort", us=500.0),
         _result("plain", 2, 4000, "torch-warpers", us=400.0), _result("plain", 2, 4000, "numpy-ref", NA, note=capped)],
        [_result("plain", 64, 4000, "fastsampler-cpu", us=900.0),
         _result("plain", 64, 4000, "torch-sort", NA, note=capped),
         _result("plain", 64, 4000, "torch-warpers", us=9e4)],
        # typical: torch-sort cannot express it (n/a, no cap): the warpers alone make the case
        [_result("typical", 8, 4000, "fastsampler-cpu", us=80.0),
         _result("typical", 8, 4000, "torch-sort", NA, note="no typical-p in the sort-based path"),
         _result("typical", 8, 4000, "torch-warpers", us=8000.0)],
        # full: every baseline capped at its only size
        [_result("full", 64, 4000, "fastsampler-cpu", us=900.0),
         _result("full", 64, 4000, "torch-sort", NA, note=capped),
         _result("full", 64, 4000, "torch-warpers", NA, note=capped)],
    ]
    for c in cases:
        set_bandwidth(c, copy_us=1000.0)
        _speedups_of(c)
    md = format_markdown([r for c in cases for r in c], run_info(CPU))
    assert "| plain | fp32 | 2 × 4000 | fastsampler-cpu | 50.0 |" in md and "| 10.00 | 8.00 |" in md
    assert "64 × 4000" not in md
    assert "| typical | fp32 | 8 × 4000 | fastsampler-cpu | 80.0 |" in md and "| - | 100.00 |" in md
    assert "| full |" not in md and "No case where every baseline ran" in md and "full fp32 fastsampler-cpu" in md
    assert "numpy-ref" not in md  # the reference is the definition, not a peer

    # no case anywhere: said so, no table without speedups
    md = format_markdown(cases[3], run_info(CPU))
    assert "| full |" not in md and "no speedups to show" in md
    md = format_markdown([r for r in cases[0] if r.provider == "fastsampler-cpu"], run_info(CPU))
    assert "No baseline was measured" in md
