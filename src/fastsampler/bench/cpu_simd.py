"""Time the C++ CPU backend's SIMD variants against each other (and a ``-march=native`` build) in one interleaved run.

Usage::

    python -m fastsampler.bench.cpu_simd                                  # every built variant this CPU runs
    FASTSAMPLER_NATIVE=1 python setup.py build_ext --build-lib /tmp/native --build-temp /tmp/native-tmp
    taskset -c 1 python -m fastsampler.bench.cpu_simd --native /tmp/native/fastsampler/backends/cpu/_C*.so

Each case (scenario x batch) times ``fastsampler.backends.cpu.sample_packed`` on one pre-packed batch with each
module in turn as ``_C``, for ``--rounds`` rounds in a rotating order (so that a noisy neighbour hits every module
alike), and reports per row in µs the median over the rounds of each round's median, with the ratio to the first
module (``native`` when given, else the variant the package picked). The outputs of every module are checked equal to
the first's (tokens; logprobs within 1e-5) before timing. Same scenarios and inputs as `fastsampler.bench.cpu_kernel`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
from types import ModuleType

import numpy as np
import torch

from fastsampler.backends import cpu as fcpu
from fastsampler.backends import pack_batch
from fastsampler.bench import report
from fastsampler.bench.cpu_kernel import make_case, median_ns, scenarios


def load_native(path: str) -> ModuleType:
    """An extension module file (``_C*.so``, e.g. a ``FASTSAMPLER_NATIVE=1`` build) loaded from ``path`` under its own
    name, without replacing the package's ``_C``."""
    name = os.path.basename(path).split(".")[0]
    spec = importlib.util.spec_from_file_location(f"fastsampler.backends.cpu.{name}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def modules(native: str, extra: list[str]) -> dict[str, ModuleType]:
    out = {}
    if native:
        out["native"] = load_native(native)
    for item in extra:
        name, _, path = item.partition("=")
        out[name] = load_native(path)
    runs = fcpu.cpu_simd_paths()
    for p in fcpu.built_simd_paths():
        if p in runs:
            out[p] = importlib.import_module(f"fastsampler.backends.cpu._C_{p}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--native", default="", help="a -march=native build of the extension (.so) to compare with")
    ap.add_argument("--module", action="append", default=[], metavar="NAME=PATH",
                    help="another single-module build to compare (e.g. other compiler flags); repeatable")
    ap.add_argument("--only", default="", help="comma-separated module names to time (default: all)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=str, default="8,64")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scenarios", type=str, default=",".join(scenarios()))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=0, help="calls per round (default: ~0.1 s of work)")
    args = ap.parse_args()
    ok, why = fcpu.is_available()
    if not ok:
        raise SystemExit(why)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    mods = modules(args.native, args.module)
    if args.only:
        mods = {n: mods[n] for n in args.only.split(",")}
    names = list(mods)
    specs = scenarios()
    chosen = fcpu._C
    print(f"# device: {report.cpu_name()} ({os.cpu_count()} cpus), V={args.vocab}, dtype={args.dtype}, "
          f"threads={args.threads}, modules: " + ", ".join(f"{n}={m.simd()}" for n, m in mods.items())
          + f"; package picks {chosen.simd()}")
    print(f"{'scenario':<15} {'B':>3} " + " ".join(f"{n + ' us/row':>16}" for n in names)
          + " " + " ".join(f"{n + '/' + names[0]:>16}" for n in names[1:]))
    try:
        for sc in [s for s in args.scenarios.split(",") if s]:
            for b in [int(x) for x in args.batch.split(",")]:
                logits, params, kw = make_case(sc, specs[sc], b, args.vocab, dtype)
                batch = pack_batch(logits, params, **kw)
                first = None
                for n in names:
                    fcpu._C = mods[n]
                    fcpu.set_num_threads(args.threads)
                    out = fcpu.sample_packed(batch).numpy()
                    if first is None:
                        first = out
                    elif not np.array_equal(out.tokens, first.tokens) or not np.allclose(
                            out.logprobs, first.logprobs, atol=1e-5, equal_nan=True):
                        raise SystemExit(f"{sc} B={b}: {n} differs from {names[0]}")
                fcpu._C = mods[names[0]]
                est = median_ns(lambda batch=batch: fcpu.sample_packed(batch), 3, 2)
                reps = args.reps or max(5, min(1000, int(1e8 / max(est, 1))))
                times: dict[str, list[float]] = {n: [] for n in names}
                for r in range(args.rounds):
                    for n in names[r % len(names):] + names[:r % len(names)]:
                        fcpu._C = mods[n]
                        times[n].append(median_ns(lambda batch=batch: fcpu.sample_packed(batch), reps, 3))
                per = {n: statistics.median(t) / b / 1e3 for n, t in times.items()}
                print(f"{sc:<15} {b:>3} " + " ".join(f"{per[n]:>16.1f}" for n in names) + " "
                      + " ".join(f"{per[n] / per[names[0]]:>16.3f}" for n in names[1:]), flush=True)
    finally:
        fcpu._C = chosen
        fcpu.set_num_threads(0)


if __name__ == "__main__":
    main()
