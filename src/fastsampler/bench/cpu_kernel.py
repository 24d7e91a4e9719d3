"""Time the C++ CPU backend per scenario against a torch sort-based sampler measured in the same run.

Usage::

    python -m fastsampler.bench.cpu_kernel                      # V = 128256, fp32, B = 1 and 64, one thread
    taskset -c 1 python -m fastsampler.bench.cpu_kernel --threads 1
    python -m fastsampler.bench.cpu_kernel --threads 1,2 --batch 64 --scenarios plain   # thread scaling

Reports the median over many repetitions (after a warm-up) of ``fastsampler.backends.cpu.sample_packed`` on a pre-packed
batch ("kernel": the C++ call and its argument checks) and of ``fastsampler.sample(backend="cpu")`` ("api": packing
included), per row in µs, with effective GB/s (logit bytes read once / time) and the ratio against the torch
sort-based sampler (temperature, sort, top-k / top-p masks, softmax, exponential race) on the same inputs and thread
count. Logits are ``randn * 3`` (``fastsampler.bench.scenarios.LOGIT_SCALE``). Rows are appended to a CSV when
``--csv`` is given.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch

import fastsampler
from fastsampler import SamplingParams
from fastsampler.backends import cpu as fcpu
from fastsampler.backends import pack_batch
from fastsampler.bench import report

LOGIT_SCALE = 3.0
HISTORY = 256
BIAS_ENTRIES = 8


def scenarios() -> dict[str, dict]:
    """name -> dict(params=callable(bias) -> SamplingParams, history=int, bias=int, k=, p=, T=) for the baseline."""
    return {
        "plain": dict(params=lambda b: SamplingParams(), k=0, p=1.0, T=1.0),
        "topk_topp_minp": dict(params=lambda b: SamplingParams(top_k=50, top_p=0.9, min_p=0.05), k=50, p=0.9, T=1.0),
        "full": dict(
            params=lambda b: SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                                            frequency_penalty=0.2, presence_penalty=0.2, logit_bias=b, logprobs=True,
                                            top_logprobs=5),
            history=HISTORY, bias=BIAS_ENTRIES, k=50, p=0.9, T=0.8),
        "top_p_full": dict(params=lambda b: SamplingParams(top_p=0.9), k=0, p=0.9, T=1.0),
        "typical": dict(params=lambda b: SamplingParams(typical_p=0.9), k=0, p=1.0, T=1.0),
        "mirostat_v1": dict(params=lambda b: SamplingParams(mirostat_mode=1, mirostat_target=5.0), k=0, p=1.0, T=1.0),
        "mirostat_v2": dict(params=lambda b: SamplingParams(mirostat_mode=2, mirostat_target=5.0), k=0, p=1.0, T=1.0),
        "greedy": dict(params=lambda b: SamplingParams(temperature=0.0), k=0, p=1.0, T=1.0),
    }


def torch_sort_sampler(logits: torch.Tensor, k: int, p: float, temperature: float,
                       gen: torch.Generator) -> torch.Tensor:
    """The classic sort-based sampler: temperature, sort, top-k / top-p masks, softmax, exponential race."""
    x = logits.float() / temperature
    if k > 0 or p < 1.0:
        srt, idx = x.sort(dim=-1, descending=False)
        if k > 0:
            kth = srt[:, -k].unsqueeze(1)
            srt = srt.masked_fill(srt < kth, float("-inf"))
        if p < 1.0:
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            mask = cum <= 1.0 - p
            mask[:, -1] = False
            srt = srt.masked_fill(mask, float("-inf"))
        x = srt.scatter(-1, idx, srt)
    probs = x.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(generator=gen)
    return probs.div_(q).argmax(dim=-1)


def median_ns(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return statistics.median(ts)


def make_case(name: str, spec: dict, batch: int, vocab: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=g) * LOGIT_SCALE).to(dtype)
    rng = np.random.default_rng(seed)
    bias = {}
    if spec.get("bias"):
        ids = rng.choice(vocab, size=spec["bias"], replace=False)
        bias = {int(i): float(v) for i, v in zip(ids, rng.uniform(-3, 3, size=len(ids)), strict=True)}
    params = spec["params"](bias)
    # seeds with the steps an engine passes (without steps a seeded row repeats its noise every call)
    kw: dict = {"seeds": torch.arange(batch, dtype=torch.int64) + 12345, "steps": torch.zeros(batch, dtype=torch.int64)}
    if spec.get("history"):
        hist = rng.integers(0, vocab, size=(batch, spec["history"]))
        counts = np.zeros((batch, vocab), dtype=np.int32)
        for r in range(batch):
            np.add.at(counts[r], hist[r], 1)
        kw["output_counts"] = torch.from_numpy(counts)
    return logits, params, kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=str, default="1,64")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=str, default="1")
    ap.add_argument("--scenarios", type=str, default=",".join(scenarios()))
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default: ~0.5 s of work per case)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the torch sort-based baseline")
    ap.add_argument("--csv", type=str, default="", help="append rows to this CSV file")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    specs = scenarios()
    names = [s for s in args.scenarios.split(",") if s]
    for s in names:
        if s not in specs:
            raise SystemExit(f"unknown scenario {s!r}; choose from {','.join(specs)}")
    batches = [int(b) for b in args.batch.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    ok, why = fcpu.is_available()
    if not ok:
        raise SystemExit(why)
    cpu_name = report.cpu_name()
    build = fcpu.build_info()
    print(f"# device: {cpu_name} ({os.cpu_count()} cpus, simd={build['simd']}, openmp={build['openmp']}), "
          f"V={args.vocab}, dtype={args.dtype}, logits randn*{LOGIT_SCALE}")
    hdr = (f"{'scenario':<15} {'B':>3} {'thr':>3} {'kernel us/row':>14} {'api us/row':>11} {'GB/s':>7} "
           f"{'torch-sort us/row':>18} {'speedup':>8}")
    print(hdr)
    rows_out = []
    for name in names:
        spec = specs[name]
        for b in batches:
            logits, params, kw = make_case(name, spec, b, args.vocab, dtype)
            batch = pack_batch(logits, params, **kw)
            for nt in threads:
                fcpu.set_num_threads(nt)
                torch.set_num_threads(nt)
                est = median_ns(lambda batch=batch: fcpu.sample_packed(batch), 3, 2)
                reps = args.reps or max(5, min(2000, int(5e8 / max(est, 1))))
                k_ns = median_ns(lambda batch=batch: fcpu.sample_packed(batch), reps, max(3, reps // 10))
                a_ns = median_ns(lambda lg=logits, p=params, kw=kw: fastsampler.sample(lg, p, backend="cpu", **kw),
                                 max(5, reps // 2), 3)
                t_ns = float("nan")
                if not args.no_baseline:
                    g = torch.Generator().manual_seed(0)
                    def f(lg=logits, sp=spec, g=g):
                        return torch_sort_sampler(lg, sp["k"], sp["p"], sp["T"] or 1.0, g)

                    tr = max(3, min(200, int(2e8 / max(median_ns(f, 2, 1), 1))))
                    t_ns = median_ns(f, tr, 2)
                per_k, per_a, per_t = k_ns / b / 1e3, a_ns / b / 1e3, t_ns / b / 1e3
                gbs = b * args.vocab * logits.element_size() / k_ns
                print(f"{name:<15} {b:>3} {nt:>3} {per_k:>14.1f} {per_a:>11.1f} {gbs:>7.2f} {per_t:>18.1f} "
                      f"{per_t / per_k:>7.1f}x", flush=True)
                rows_out.append(dict(time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     version=fastsampler.__version__, device=cpu_name, scenario=name, batch=b,
                                     vocab=args.vocab, dtype=args.dtype, threads=nt, kernel_us_per_row=per_k,
                                     api_us_per_row=per_a, gbps=gbs, torch_sort_us_per_row=per_t))
    fcpu.set_num_threads(0)
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows_out[0]))
            if new:
                w.writeheader()
            w.writerows(rows_out)


if __name__ == "__main__":
    main()
