"""Vocabulary-parallel sampling in a tensor-parallel decoding loop: each process holds a slice of the LM head, computes
the logits of its slice, and samples with `fastsampler.distributed.sample`, without gathering the logits.

The "model" is a toy (defined here, nothing is downloaded): a hidden state per request that depends on the last token,
and an LM head ``(V, H)`` split by vocabulary across the processes the way a tensor-parallel engine splits it: equal
slices of ``ceil(V / world)`` rows, the last one padded. The example starts its own processes (gloo on the CPU):

    python examples/tensor_parallel.py                   # 2 processes
    python examples/tensor_parallel.py --world 4 --check # 4, and compare every step with single-device sampling

Every process gets the same tokens; rank 0 prints them with the bytes it exchanged per step, next to what gathering
the logits would have cost. With ``--check`` each step also gathers the logits (for the comparison only) and checks
the tokens against `fastsampler.reference.sample` on the whole vocabulary.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsampler
from fastsampler import SamplingParams, distributed

REQUESTS = [
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, seed=2),
    SamplingParams(temperature=1.0, min_p=0.05, frequency_penalty=0.3, seed=3, logprobs=True),
    SamplingParams(mirostat_mode=2, mirostat_target=4.0, seed=4),
    SamplingParams(temperature=0.7, top_k=20, repetition_penalty=1.2, seed=5, logprobs=True, top_logprobs=5),
]


def run(rank: int, world: int, init: str, vocab: int, hidden: int, steps: int, check: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)  # the same weights on every rank; each keeps its own slice
    embed = torch.randn(vocab, hidden, generator=g)
    head = torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 4.0
    per_rank = -(-vocab // world)  # the engine's layout: equal slices, the last one padded
    start = rank * per_rank
    local_head = torch.zeros(per_rank, hidden)
    rows = head[start:start + per_rank]
    local_head[: rows.shape[0]] = rows  # (padding rows: ids >= vocab, never sampled)

    b = len(REQUESTS)
    last = torch.arange(b) * 7 % vocab
    history: list[list[int]] = [[] for _ in range(b)]
    mu = None
    for step in range(steps):
        h = torch.tanh(embed[last])  # (B, H): the "model"'s hidden states, replicated as in tensor parallelism
        local_logits = h @ local_head.T  # (B, V_local): this rank's slice of the LM head's output
        stats = distributed.ExchangeStats()
        out = distributed.sample(local_logits, REQUESTS, vocab_start=start, vocab_size=vocab,
                                 output_token_ids=history, steps=[step] * b, mirostat_mu=mu, stats=stats)
        if check:  # the gather a tensor-parallel engine would otherwise make (here only to compare)
            parts = [torch.empty_like(local_logits) for _ in range(world)]
            dist.all_gather(parts, local_logits)
            full = torch.cat(parts, 1)[:, :vocab]
            ref = fastsampler.reference.sample(full, REQUESTS, output_token_ids=history, steps=[step] * b,
                                               mirostat_mu=mu)
            diag = fastsampler.reference.diagnose(full, REQUESTS, output_token_ids=history, steps=[step] * b,
                                                  mirostat_mu=mu)
            same = (out.tokens.numpy() == ref.tokens) | diag["near_tie"]
            assert same.all(), f"step {step}: {out.tokens.tolist()} vs single-device {ref.tokens.tolist()}"
        mu = out.mirostat_mu
        for r, t in enumerate(out.tokens.tolist()):
            history[r].append(t)
        last = out.tokens.clamp(min=0)
        if rank == 0 and step == 0:
            gather_bytes = b * per_rank * world * local_logits.element_size()
            print(f"world {world}, B = {b}, V = {vocab}: {stats.bytes_sent} bytes sent and {stats.bytes_received} "
                  f"received per step in {stats.collectives} collectives; an all-gather of the logits receives "
                  f"{gather_bytes}")
    if rank == 0:
        for r, p in enumerate(REQUESTS):
            print(f"request {r} ({'greedy' if p.temperature == 0 else 'sampled'}): {history[r]}")
        if check:
            print(f"{steps} steps identical to single-device sampling of the gathered logits")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2, help="processes (tensor-parallel ranks)")
    ap.add_argument("--vocab", type=int, default=10_007, help="vocabulary size (not a multiple of the world size)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="compare every step with single-device sampling")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(args.world, os.path.join(d, "init"), args.vocab, args.hidden, args.steps, args.check),
                 nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
