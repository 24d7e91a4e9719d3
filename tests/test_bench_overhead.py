"""`fastsampler.bench.overhead`: the host-overhead benchmark runs and reports what it promises (not its timings:
timing on a shared machine is not a test)."""

from __future__ import annotations

import doctest

import pytest

from fastsampler.backends import cpu
from fastsampler.bench import overhead

BACKEND = "cpu" if cpu.is_available()[0] else "reference"


def test_run_overhead_rows() -> None:
    rows = overhead.run_overhead(batch=3, vocab=64, reps=3, backend=BACKEND, warmup=1)
    apis = overhead.APIS[1:] if BACKEND == "cpu" else overhead.APIS[1:4]  # "kernel": the C++ backend only
    assert [(r["scenario"], r["api"]) for r in rows] == [("-", "argmax")] + [
        (sc, api) for sc in overhead.SCENARIOS for api in apis]
    keys = {"scenario", "api", "median_us", "p20_us", "p80_us", "ratio_vs_argmax", "argmax_us", "reps", "batch",
            "vocab", "backend", "device", "cpu", "simd", "threads", "torch"}
    base = rows[0]["median_us"]
    for r in rows:
        assert set(r) == keys
        assert r["reps"] == 3 and r["batch"] == 3 and r["vocab"] == 64 and r["backend"] == BACKEND
        assert 0 < r["p20_us"] <= r["median_us"] <= r["p80_us"]
        assert r["argmax_us"] == base and r["ratio_vs_argmax"] == pytest.approx(r["median_us"] / base)
        assert isinstance(r["cpu"], str) and r["cpu"] and isinstance(r["simd"], str)
    assert rows[0]["ratio_vs_argmax"] == 1.0
    if BACKEND == "cpu":
        assert rows[0]["simd"] == cpu._C.simd() and rows[0]["threads"] == cpu.threads_for(3, 64) == 1
    table = overhead.format_table(rows)
    assert "Sampler.sample" in table and "x argmax" in table and rows[0]["cpu"] in table


def test_main_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert overhead.main(["--batch", "2", "--vocab", "32", "--reps", "2", "--warmup", "1", "--scenarios", "greedy",
                          "--backend", BACKEND]) == 0
    out = capsys.readouterr().out
    assert "greedy" in out and "argmax" in out and "plain" not in out


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="reps must be an integer >= 1, got 0"):
        overhead.run_overhead(reps=0)
    with pytest.raises(ValueError, match=r"scenarios must be a non-empty subset of \('greedy', 'plain', 'full'\)"):
        overhead.run_overhead(scenarios=("fast",))
    with pytest.raises(ValueError, match="backend must be one of"):
        overhead.run_overhead(backend="gpu")


def test_docstring_examples() -> None:
    res = doctest.testmod(overhead, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


def test_reference_backend_has_no_kernel_rows() -> None:
    rows = overhead.run_overhead(batch=2, vocab=32, reps=2, backend="reference", warmup=0, scenarios=("plain",))
    assert [r["api"] for r in rows] == ["argmax", "Sampler.sample", "sample(params)", "sample(list)"]
    assert all(r["threads"] == 0 and r["backend"] == "reference" for r in rows)
