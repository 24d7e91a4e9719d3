"""Host overhead of one sampling step: `Sampler.sample` and `fastsampler.sample` next to ``torch.argmax``.

At small shapes (``B = 8``, ``V = 1024``) the kernels take a few microseconds, so what a step costs is the host work
around them: argument checks, packing, dispatch, the state updates. This benchmark times, interleaved in one run
(so that a shared machine's load hits every candidate alike), for three scenarios:

``greedy``
    ``temperature = 0``.
``plain``
    temperature 1 sampling, nothing else.
``full``
    repetition / frequency / presence penalties (with a prompt and some generated tokens), 8 logit-bias entries,
    top-k 50 + top-p 0.9 + min-p 0.05, and the top-5 logprobs.

the calls

``argmax``
    ``torch.argmax(logits, -1)``: the floor a step of the same logits can cost on this host.
``Sampler.sample``
    one step of a `fastsampler.Sampler` holding ``B`` requests (a list of slots).
``sample(params)``, ``sample(list)``
    ``fastsampler.sample`` with one `SamplingParams` for the batch, or a list of ``B`` (one per row); the ``full``
    scenario passes its penalty state as tensors (``prompt_mask``, ``output_counts``, ``steps``), the form of a
    caller that keeps state between steps.
``kernel`` (C++ backend only)
    ``_C.sample`` alone on the packed arrays of ``sample(list)`` (packed once per logits buffer): the
    kernels plus the extension's argument parsing; what a step costs beyond it is Python-side host work.

and reports the median (and 20th / 80th percentiles) in microseconds and the ratio of each median to argmax's.

Run it with ``python -m fastsampler.bench.overhead`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .report import cpu_model

__all__ = ["run_overhead", "format_table", "cpu_model", "simd_path", "main", "SCENARIOS", "APIS"]

SCENARIOS = ("greedy", "plain", "full")
APIS = ("argmax", "Sampler.sample", "sample(params)", "sample(list)", "kernel")
_BLOCK = 16  # calls of one candidate in a row before the next candidate's turn


def simd_path() -> str:
    """The SIMD path the C++ extension was built with (`fastsampler.backends.cpu.build_info`), or
    ``'unavailable'``."""
    try:
        from ..backends import cpu
    except ImportError:
        return "unavailable"
    return cpu.build_info()["simd"]


def _threads(backend: str, batch: int, vocab: int) -> int:
    """The ``num_threads`` the C++ kernels get for this shape (0: not the C++ backend)."""
    if backend != "cpu":
        return 0
    from ..backends import cpu

    return cpu.threads_for(batch, vocab)


def _params(scenario: str, seed: int, vocab: int) -> Any:
    from ..params import SamplingParams

    if scenario == "greedy":
        return SamplingParams(temperature=0.0, seed=seed)
    if scenario == "plain":
        return SamplingParams(temperature=1.0, seed=seed)
    if scenario == "full":
        step = max(1, vocab // 8)
        bias = {(seed * 7 + j * step) % vocab: (-1.0) ** j * 0.5 for j in range(8)}
        return SamplingParams(seed=seed, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1,
                              logit_bias=bias, top_k=50, top_p=0.9, min_p=0.05, logprobs=True, top_logprobs=5)
    raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")


def _candidates(scenario: str, batch: int, vocab: int, backend: str, device: torch.device,
                logits: Sequence[torch.Tensor]) -> dict[str, Callable[[int], object]]:
    """The three fastsampler calls of ``scenario``, each a function of the logits buffer index."""
    import fastsampler

    from ..backends import ids_to_bitmask

    rng = np.random.default_rng(1234)
    plist = [_params(scenario, 100 + r, vocab) for r in range(batch)]
    prompts = [rng.integers(0, vocab, 24).tolist() for _ in range(batch)]
    sampler = fastsampler.Sampler(vocab, batch, device, backend=backend)
    slots: list[int] = []
    for p, pr in zip(plist, prompts, strict=True):
        slots += sampler.add(p, prompt_token_ids=pr if scenario == "full" else ())
    for k in range(16):  # some generated tokens (penalties), Mirostat-free warm state
        sampler.sample(logits[k % len(logits)], slots)

    # an engine passes the step of every row (a seeded row without it would repeat its noise every call)
    kw: dict[str, Any] = {"backend": backend, "steps": torch.full((batch,), 16, dtype=torch.int64, device=device)}
    if scenario == "full":
        outputs = [rng.integers(0, vocab, 16).tolist() for _ in range(batch)]
        counts = np.zeros((batch, vocab), dtype=np.int16)
        for r, ids in enumerate(outputs):
            np.add.at(counts[r], ids, 1)
        kw.update(prompt_mask=torch.from_numpy(ids_to_bitmask(prompts, vocab)).to(device),
                  output_counts=torch.from_numpy(counts).to(device))
    one = plist[0]

    def sampler_step(i: int) -> object:
        return sampler.sample(logits[i], slots)

    def functional_one(i: int) -> object:
        return fastsampler.sample(logits[i], one, **kw)

    def functional_list(i: int) -> object:
        return fastsampler.sample(logits[i], plist, **kw)

    fns = {"Sampler.sample": sampler_step, "sample(params)": functional_one, "sample(list)": functional_list}
    if sampler.backend_for(torch.float32) == "cpu" and device.type == "cpu":
        from ..backends import cpu, pack_host

        packed = [pack_host(x, plist, **{k: v for k, v in kw.items() if k != "backend"}) for x in logits]
        args = [(*cpu.logits_array(h.logits), h.vocab_size, *h.arrays()) for h in packed]
        n_top = packed[0].n_top

        def kernel(i: int) -> object:
            return cpu.sample_arrays(args[i], n_top)

        fns["kernel"] = kernel
    return fns


def _time_interleaved(fns: dict[str, Callable[[int], object]], reps: int, warmup: int, n_buffers: int,
                      sync: Callable[[], None]) -> dict[str, np.ndarray]:
    """Per-call host times in µs, taking turns in blocks of `_BLOCK` calls so that load drift hits all alike."""
    for fn in fns.values():
        for w in range(warmup):
            fn(w % n_buffers)
        sync()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    clock = time.perf_counter_ns
    for start in range(0, reps, _BLOCK):
        for name, fn in fns.items():
            out = samples[name]
            for r in range(start, min(reps, start + _BLOCK)):
                t0 = clock()
                fn(r % n_buffers)
                sync()
                out.append((clock() - t0) / 1e3)
    return {name: np.asarray(v, dtype=np.float64) for name, v in samples.items()}


def run_overhead(batch: int = 8, vocab: int = 1024, reps: int = 2000, backend: str = "cpu", *,
                 warmup: int = 50, scenarios: Sequence[str] = SCENARIOS) -> list[dict[str, Any]]:
    """Time ``torch.argmax``, `Sampler.sample` and `fastsampler.sample` on the same ``(batch, vocab)`` logits.

    Parameters
    ----------
    batch, vocab : int
        Logits shape (float32).
    reps : int
        Timed calls per candidate (after ``warmup`` untimed ones), interleaved in blocks of 16.
    backend : {'cpu', 'reference', 'triton', 'auto'}
        fastsampler backend; ``triton`` runs on CUDA (each timed call then ends with a synchronisation).
    warmup : int
        Untimed calls per candidate first.
    scenarios : sequence of {'greedy', 'plain', 'full'}
        Which scenarios to run.

    Returns
    -------
    list of dict
        One row per (scenario, API), the argmax baseline first (scenario ``'-'``), ``kernel`` rows only for the C++
        backend. Keys: ``scenario``, ``api``, ``median_us``, ``p20_us``, ``p80_us``, ``ratio_vs_argmax`` (this
        median / argmax's median), ``argmax_us``, ``reps``, ``batch``, ``vocab``, ``backend`` (resolved),
        ``device``, ``cpu``, ``simd``, ``threads`` (what the C++ kernels get for this shape; 0 for other backends),
        ``torch``.

    Examples
    --------
    >>> rows = run_overhead(batch=2, vocab=64, reps=4, warmup=1, backend="reference", scenarios=("greedy",))
    >>> [r["api"] for r in rows]
    ['argmax', 'Sampler.sample', 'sample(params)', 'sample(list)']
    """
    for name, val, lo in (("batch", batch, 1), ("vocab", vocab, 2), ("reps", reps, 1), ("warmup", warmup, 0)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {val!r}")
    bad = [s for s in scenarios if s not in SCENARIOS]
    if bad or not scenarios:
        raise ValueError(f"scenarios must be a non-empty subset of {SCENARIOS}, got {tuple(scenarios)!r}")
    if backend not in ("auto", "triton", "cpu", "reference"):
        raise ValueError(f"backend must be one of ('auto', 'triton', 'cpu', 'reference'), got {backend!r}")
    device = torch.device("cuda" if backend == "triton" else "cpu")
    from .. import backends

    backend = backends.resolve(backend, device, torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_buffers = 4
    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(batch, vocab, generator=g) * 3.0).to(device) for _ in range(n_buffers)]

    fns: dict[tuple[str, str], Callable[[int], object]] = {("-", "argmax"): lambda i: torch.argmax(logits[i], -1)}
    for sc in scenarios:
        for api, fn in _candidates(sc, batch, vocab, backend, device, logits).items():
            fns[(sc, api)] = fn
    keyed = {f"{sc}/{api}": fn for (sc, api), fn in fns.items()}
    times = _time_interleaved(keyed, reps, warmup, n_buffers, sync)

    common = {"batch": batch, "vocab": vocab, "backend": backend, "device": str(device), "cpu": cpu_model(),
              "simd": simd_path(), "threads": _threads(backend, batch, vocab), "torch": torch.__version__}
    base = float(np.median(times["-/argmax"]))
    rows = []
    for sc, api in fns:
        t = times[f"{sc}/{api}"]
        p20, med, p80 = (float(x) for x in np.percentile(t, [20, 50, 80]))
        rows.append({"scenario": sc, "api": api, "median_us": med, "p20_us": p20, "p80_us": p80,
                     "ratio_vs_argmax": med / base, "argmax_us": base, "reps": int(t.size), **common})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of `run_overhead` rows, with a header line naming the machine."""
    if not rows:
        return "(no rows)"
    r0 = rows[0]
    head = (f"B={r0['batch']} V={r0['vocab']} backend={r0['backend']} device={r0['device']} cpu={r0['cpu']} "
            f"simd={r0['simd']} threads={r0['threads']} torch={r0['torch']} reps={r0['reps']}")
    lines = [head, f"{'scenario':<9} {'api':<15} {'median us':>10} {'p20 us':>9} {'p80 us':>9} {'x argmax':>9}"]
    for r in rows:
        lines.append(f"{r['scenario']:<9} {r['api']:<15} {r['median_us']:>10.1f} {r['p20_us']:>9.1f} "
                     f"{r['p80_us']:>9.1f} {r['ratio_vs_argmax']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the `run_overhead` table."""
    ap = argparse.ArgumentParser(prog="python -m fastsampler.bench.overhead", description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=2000, help="timed calls per candidate (default 2000)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--backend", default="cpu", choices=("auto", "triton", "cpu", "reference"))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of greedy,plain,full")
    args = ap.parse_args(argv)
    scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    try:
        rows = run_overhead(args.batch, args.vocab, args.reps, args.backend, warmup=args.warmup, scenarios=scenarios)
    except (ValueError, ImportError) as e:
        ap.error(str(e))
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
