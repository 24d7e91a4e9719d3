"""Time the engine operations around the step -- scoring and speculative verification -- against baselines measured
in the same run.

Usage::

    python -m fastsampler.bench.engine_ops                        # CPU (or CUDA when present), V = 32000
    python -m fastsampler.bench.engine_ops --vocab 128256 --tokens 1024 --backend cpu

``score``: `fastsampler.score` of ``T`` prompt positions (raw mode, top-5 and 8 extra ids per position) next to the
plain torch way, which builds the ``(T, V)`` log-softmax (``torch.log_softmax``, then gather, rank by comparison,
``topk``). ``verify``: one `Sampler.verify` of ``K`` drafts for ``B`` requests (match and rejection methods, top-p
0.9) next to what it replaces, ``K + 1`` ordinary `Sampler.sample` steps. ``history``: a step of requests with a
long history (top-k 50, top-p 0.9, frequency penalty) with and without the history rules (n-gram 3, three bad words,
a penalty window of 256) and the extended samplers (DRY with two breakers, XTC 0.5 / 0.1, top-nσ 2, eta 1e-3,
dynamic temperature 0.3), through a `Sampler` and through `fastsampler.sample`. Medians of ``--reps`` calls after a
warm-up, in ms; logits are ``randn * 3``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import fastsampler
from fastsampler import Sampler, SamplingParams
from fastsampler.bench import report

# the extended samplers of docs/semantics.md §3 C-E
EXTENDED_FIELDS = ("dry_multiplier", "dry_sequence_breakers", "top_n_sigma", "eta_cutoff", "xtc_probability",
                   "xtc_threshold", "dynatemp_range")


def _median_ms(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def torch_score(logits: torch.Tensor, tokens: torch.Tensor, extra: torch.Tensor, top_n: int) -> tuple:
    """The plain torch way: a (T, V) float32 log-softmax, then gathers, a rank by comparison and topk."""
    lp = torch.log_softmax(logits.float(), -1)
    tok = lp.gather(1, tokens[:, None])
    ranks = 1 + (lp > tok).sum(1)
    return tok[:, 0], ranks, lp.topk(top_n, -1), lp.gather(1, extra)


def run(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    v, t = args.vocab, args.tokens
    rows: list[tuple[str, str, float]] = []
    # scoring
    x = (torch.randn(t, v, generator=g) * 3).to(dev)
    tokens = torch.randint(0, v, (t,), generator=g).to(dev)
    extra = torch.randint(0, v, (t, 8), generator=g).to(dev)
    rows.append((f"score T={t}", "fastsampler.score", _median_ms(
        lambda: fastsampler.score(x, tokens, top_n=5, extra_token_ids=extra, backend=args.backend), args.reps, sync)))
    rows.append((f"score T={t}", "torch log_softmax (T, V)", _median_ms(
        lambda: torch_score(x, tokens, extra, 5), args.reps, sync)))
    # speculative verification
    b, k = args.batch, args.k
    y = (torch.randn(b, k + 1, v, generator=g) * 3).to(dev)
    drafts = y[:, :k].argmax(-1)
    q = torch.softmax(y[:, :k] + torch.randn(b, k, v, generator=g).to(dev), -1)
    params = SamplingParams(top_p=0.9, seed=1)

    def fresh() -> tuple[Sampler, list[int]]:
        s = Sampler(v, b, device=dev, backend=args.backend)
        return s, [s.add(params)[0] for _ in range(b)]

    s, slots = fresh()
    rows.append((f"verify B={b} K={k}", "Sampler.verify match", _median_ms(
        lambda: s.verify(y, drafts, slots), args.reps, sync)))
    rows.append((f"verify B={b} K={k}", "Sampler.verify rejection", _median_ms(
        lambda: s.verify(y, drafts, slots, draft_probs=q), args.reps, sync)))
    steps = [y[:, j].contiguous() for j in range(k + 1)]
    rows.append((f"verify B={b} K={k}", f"{k + 1} x Sampler.sample", _median_ms(
        lambda: [s.sample(z, slots) for z in steps], args.reps, sync)))
    # history rules: a step of B = --history-batch requests with --history tokens each, with and without the rules
    hb, hn = args.history_batch, args.history
    xh = (torch.randn(hb, v, generator=g) * 3).to(dev)
    hist = [torch.randint(0, v, (hn,), generator=g).tolist() for _ in range(hb)]
    plain = SamplingParams(top_k=50, top_p=0.9, frequency_penalty=0.2, seed=1)
    rules = plain.replace(no_repeat_ngram_size=3, bad_words_ids=[[5, 6, 7], [8, 9], [10]], penalty_last_n=256)
    samplers = plain.replace(dry_multiplier=0.8, dry_sequence_breakers=[[11], [12, 13]], top_n_sigma=2.0,
                             eta_cutoff=1e-3, xtc_probability=0.5, xtc_threshold=0.1, dynatemp_range=0.3)
    every = rules.replace(**{k: getattr(samplers, k) for k in EXTENDED_FIELDS})
    case = f"history B={hb} H={hn}"
    for name, p in (("without rules", plain), ("n-gram 3 + 3 bad words + window 256", rules),
                    ("DRY + XTC + top-nσ + eta + dynatemp", samplers), ("all of the above", every)):
        hs = Sampler(v, hb, device=dev, backend=args.backend, history_len=hn)
        hslots = [hs.add(p, output_token_ids=h)[0] for h in hist]
        rows.append((case, f"Sampler.sample {name}", _median_ms(
            lambda hs=hs, hslots=hslots: hs.sample(xh, hslots), args.reps, sync)))
        rows.append((case, f"sample() {name}", _median_ms(
            lambda p=p: fastsampler.sample(xh, p, output_token_ids=hist, steps=[hn] * hb, backend=args.backend),
            args.reps, sync)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=512, help="prompt positions to score")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per request")
    ap.add_argument("--history", type=int, default=1024, help="tokens of history per request (history rules)")
    ap.add_argument("--history-batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from fastsampler.backends import cpu

    simd = cpu.build_info()["simd"] if dev.type == "cpu" else "-"
    name = report.cpu_name() if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    print(f"device={dev} ({name}) simd={simd} threads={torch.get_num_threads()} V={args.vocab} float32 "
          f"backend={args.backend} torch={torch.__version__}")
    print(f"{'case':<22} {'call':<52} {'median ms':>10}")
    for case, call, ms in run(args):
        print(f"{case:<22} {call:<52} {ms:>10.2f}")


if __name__ == "__main__":
    main()
