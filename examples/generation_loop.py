"""A continuous-batching generation loop with `fastsampler.Sampler`.

A small randomly initialised decoder (defined here, nothing is downloaded) serves requests that join and leave the
running batch, each with its own sampling parameters: greedy, top-p, typical-p, Mirostat v2, penalties, logprobs and
a request with ``n = 3`` samples. Each step the model produces one row of logits per running sequence, the sampler
draws every row's token on the device (penalty state, step counters and Mirostat ``mu`` stay there), finished
sequences free their slots and waiting requests take them.

    python examples/generation_loop.py                       # CPU, or CUDA when present
    python examples/generation_loop.py --steps 20 --requests 4 --backend reference   # a short run

Prints every finished request's output as token ids and the decoding throughput in tokens per second.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch

import fastsampler
from fastsampler import Sampler, SamplingParams

EOS = 0


class TinyDecoder(torch.nn.Module):
    """Pre-norm transformer decoder over one new token per row, with a per-slot key/value cache.

    ``forward(tokens, slots, positions)`` takes ``(B,)`` token ids, the ``(B,)`` cache slots of the rows and their
    ``(B,)`` positions, writes the new keys / values at ``(slot, position)`` and returns ``(B, vocab)`` logits.
    """

    def __init__(self, vocab: int, *, dim: int = 64, layers: int = 2, heads: int = 4, max_slots: int = 16,
                 max_len: int = 128, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.heads, self.head_dim, self.max_len = heads, dim // heads, max_len
        self.embed = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(max_len, dim)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(torch.nn.ModuleDict({
                "ln1": torch.nn.LayerNorm(dim), "qkv": torch.nn.Linear(dim, 3 * dim), "out": torch.nn.Linear(dim, dim),
                "ln2": torch.nn.LayerNorm(dim), "mlp": torch.nn.Sequential(
                    torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)),
            }))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)
        torch.nn.init.normal_(self.head.weight, std=2.0 / math.sqrt(dim))  # peakier than default: varied outputs
        shape = (layers, max_slots, heads, max_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.to(device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, h, d = tokens.shape[0], self.heads, self.head_dim
        x = self.embed(tokens) + self.pos(positions)
        # keys at positions > the row's own position belong to no one yet (or to a freed slot's old sequence)
        future = torch.arange(self.max_len, device=tokens.device)[None, None, :] > positions[:, None, None]
        for i, blk in enumerate(self.blocks):
            q, k, v = blk["qkv"](blk["ln1"](x)).view(b, 3, h, d).unbind(1)
            self.k_cache[i, slots, :, positions] = k
            self.v_cache[i, slots, :, positions] = v
            keys, vals = self.k_cache[i, slots], self.v_cache[i, slots]  # (B, H, T, D)
            att = torch.einsum("bhd,bhtd->bht", q, keys) / math.sqrt(d)
            att = att.masked_fill(future, -math.inf).softmax(-1)
            x = x + blk["out"](torch.einsum("bht,bhtd->bhd", att, vals).reshape(b, h * d))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.head(self.norm(x))


@dataclass
class Request:
    rid: int
    name: str
    params: SamplingParams
    prompt: list[int]
    max_tokens: int
    slots: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    seed: int = 0  # as reported by the sampler (drawn at random when params.seed is None)


def request_mix(count: int, vocab: int, max_tokens: int, seed: int | None) -> list[Request]:
    """``count`` requests cycling through the kinds of parameters an engine meets."""
    kinds = [
        ("greedy", SamplingParams(temperature=0.0)),
        ("top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9)),
        ("typical 0.8", SamplingParams(typical_p=0.8)),
        ("mirostat v2", SamplingParams(mirostat_mode=2, mirostat_target=4.0)),
        ("penalties", SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.5,
                                     presence_penalty=0.3, min_tokens=4)),
        ("logprobs", SamplingParams(top_k=40, logprobs=True, top_logprobs=3)),
        ("n=3 top-k 20", SamplingParams(temperature=0.9, top_k=20, n=3)),
        ("min-p + bias", SamplingParams(min_p=0.05, logit_bias={5: 5.0, 6: -100.0}, ignore_eos=True)),
    ]
    g = torch.Generator().manual_seed(seed or 0)
    out = []
    for i in range(count):
        name, p = kinds[i % len(kinds)]
        prompt = torch.randint(1, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append(Request(i, name, p.replace(seed=None if seed is None else seed * 1000 + i), prompt, max_tokens))
    return out


def run(args: argparse.Namespace) -> dict[int, list[list[int]]]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = TinyDecoder(args.vocab, max_slots=args.max_slots, max_len=args.max_tokens + 16, device=device)
    sampler = Sampler(args.vocab, args.max_slots, device, eos_token_ids=[EOS], backend=args.backend)
    waiting = request_mix(args.requests, args.vocab, args.max_tokens, None if args.random_seeds else args.seed)
    running: dict[int, tuple[Request, int]] = {}  # slot -> (request, sample index)
    pending: dict[int, int] = {}  # slot -> next input token
    position: dict[int, int] = {}  # slot -> its position
    finished: dict[int, list[list[int]]] = {}
    generated, step, t_decode = 0, 0, 0.0

    def decode_step(tokens: torch.Tensor, slots_t: torch.Tensor, positions: torch.Tensor) -> fastsampler.SampleOutput:
        # slots as a device tensor: the sampler reads nothing back, so the model and the sampling compile together
        return sampler.sample(model(tokens, slots_t, positions), slots_t)

    step_fn = torch.compile(decode_step, dynamic=True) if args.compile else decode_step

    while (waiting or running) and step < args.steps:
        # admit waiting requests while slots are free (each sample of a request takes a slot)
        while waiting and waiting[0].params.n <= sampler.num_free:
            req = waiting.pop(0)
            req.slots = sampler.add(req.params, req.prompt)
            req.seed = sampler.seed_of(req.slots[0])
            req.outputs = [[] for _ in req.slots]
            req.logprobs = [[] for _ in req.slots]
            req.done = [False] * len(req.slots)
            slots_t = torch.tensor(req.slots, device=device)
            for pos, tok in enumerate(req.prompt[:-1]):  # prefill, one prompt token at a time
                model(torch.full_like(slots_t, tok), slots_t, torch.full_like(slots_t, pos))
            for i, s in enumerate(req.slots):
                running[s] = (req, i)
                pending[s] = req.prompt[-1]
                position[s] = len(req.prompt) - 1
        if not running:
            break

        # one decoding step for every running sequence
        slots = sorted(running)
        t0 = time.perf_counter()
        out = step_fn(torch.tensor([pending[s] for s in slots], device=device), torch.tensor(slots, device=device),
                      torch.tensor([position[s] for s in slots], device=device))
        tokens = out.tokens.tolist()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_decode += time.perf_counter() - t0
        lps = out.logprobs.tolist()
        step += 1
        generated += len(slots)

        for s, tok, lp in zip(slots, tokens, lps, strict=True):
            req, i = running[s]
            req.outputs[i].append(tok)
            if req.params.logprobs:
                req.logprobs[i].append(lp)
            pending[s], position[s] = tok, position[s] + 1
            if tok == EOS or tok < 0 or len(req.outputs[i]) >= req.max_tokens:
                req.done[i] = True
                del running[s]
            if all(req.done):  # the request leaves: free its slots, report it
                sampler.remove(req.slots)
                finished[req.rid] = req.outputs
                report(req, step=step)

    rate = generated / t_decode if t_decode > 0 else float("nan")
    print(f"{generated} tokens in {step} steps, {t_decode:.3f} s decoding: {rate:.1f} tokens/s "
          f"(device {device}, backend {sampler.backend_for()}, vocab {args.vocab}); "
          f"{len(finished)} of {args.requests} requests finished")
    return finished


def report(req: Request, *, step: int) -> None:
    print(f"request {req.rid} [{req.name}] finished at step {step}, seed {req.seed}, prompt {req.prompt}")
    for i, toks in enumerate(req.outputs):
        extra = ""
        if req.logprobs[i]:
            extra = f"  (mean logprob {sum(req.logprobs[i]) / len(req.logprobs[i]):.3f})"
        print(f"  sample {i}: {toks}{extra}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="stop after this many decoding steps")
    ap.add_argument("--requests", type=int, default=24, help="number of requests to serve")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per sample at most")
    ap.add_argument("--max-slots", type=int, default=8, help="concurrent sequences")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", *fastsampler.backends.BACKENDS])
    ap.add_argument("--seed", type=int, default=0, help="model weights, prompts and request seeds")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model step with the sampling in it")
    ap.add_argument("--random-seeds", action="store_true", help="requests without a seed (the sampler draws them)")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
