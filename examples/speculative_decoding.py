"""Speculative decoding with `fastsampler.Sampler.verify`: a toy draft model proposes ``K`` tokens, the target
model scores them in one pass, and the sampler accepts a prefix plus one token of the target's own.

The models are Markov chains over a small vocabulary (defined here, nothing is downloaded): the target's logits for
the next token depend on the last token only, and the draft model is the target with noise added, so its guesses
are often but not always right. Each round, for every running request:

1. the draft model samples ``K`` tokens one after another and records its distributions ``q``;
2. the target produces logits at the ``K + 1`` positions (after the prefix, after each draft token);
3. ``Sampler.verify`` accepts drafts with the rejection rule (``method="rejection"``: the tokens follow the target's
   distribution exactly, whatever the draft) or the match rule (``method="match"``: the tokens are those ordinary
   decoding would draw, token for token), and advances each request by the tokens it emitted.

    python examples/speculative_decoding.py                  # CPU, or CUDA when present
    python examples/speculative_decoding.py --method match --check   # also decode step by step and compare

Prints each request's tokens, the acceptance rate and the tokens emitted per target pass.
"""

from __future__ import annotations

import argparse

import torch

import fastsampler
from fastsampler import Sampler, SamplingParams

EOS = 0


class MarkovModel:
    """Next-token logits from the previous token: ``logits(prev) = table[prev]``."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def logits(self, prev: torch.Tensor) -> torch.Tensor:
        """``(...)`` previous tokens -> ``(..., V)`` logits."""
        return self.table[prev]


def make_models(vocab: int, device: torch.device, seed: int) -> tuple[MarkovModel, MarkovModel]:
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, vocab, generator=g) * 3.0
    table[:, EOS] -= 4.0  # requests end now and then, not at once
    draft = table + torch.randn(vocab, vocab, generator=g) * 0.5  # a cheaper, less accurate model
    return MarkovModel(table.to(device)), MarkovModel(draft.to(device))


REQUESTS = [
    SamplingParams(temperature=0.0, seed=1),
    SamplingParams(temperature=0.8, top_p=0.9, seed=2),
    SamplingParams(temperature=1.0, min_p=0.05, frequency_penalty=0.3, seed=3, logprobs=True),
    SamplingParams(mirostat_mode=2, mirostat_target=4.0, seed=4),
    SamplingParams(temperature=0.7, top_k=20, stop_token_ids=[5], min_tokens=4, seed=5),
]


def draft_tokens(draft: MarkovModel, last: torch.Tensor, k: int, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` tokens per row sampled from the draft model, and its ``(B, k, V)`` distributions."""
    toks, probs = [], []
    prev = last
    for _ in range(k):
        q = torch.softmax(draft.logits(prev), -1)
        nxt = torch.multinomial(q.cpu(), 1, generator=g)[:, 0].to(q.device)
        toks.append(nxt)
        probs.append(q)
        prev = nxt
    return torch.stack(toks, 1), torch.stack(probs, 1)


def setup(args: argparse.Namespace) -> tuple[torch.device, MarkovModel, MarkovModel, Sampler, list[int],
                                              dict[int, int]]:
    """The device, the target and draft models, a Sampler holding every request (prompt: one token), their slots
    and each slot's last token."""
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target, draft = make_models(args.vocab, dev, args.seed)
    sampler = Sampler(args.vocab, len(REQUESTS), device=dev, backend=args.backend, eos_token_ids=[EOS])
    prompts = [[1 + i] for i in range(len(REQUESTS))]
    slots = [sampler.add(p, prompt_token_ids=pr)[0] for p, pr in zip(REQUESTS, prompts, strict=True)]
    return dev, target, draft, sampler, slots, {s: pr[-1] for s, pr in zip(slots, prompts, strict=True)}


def run(args: argparse.Namespace) -> dict[int, list[int]]:
    dev, target, draft, sampler, slots, last = setup(args)
    out_tokens: dict[int, list[int]] = {s: [] for s in slots}
    running = list(slots)
    g = torch.Generator().manual_seed(args.seed + 1)
    passes = row_passes = accepted = drafted = 0
    while running:
        lasts = torch.tensor([last[s] for s in running], device=dev)
        drafts, q = draft_tokens(draft, lasts, args.k, g)
        # the target's "forward pass": logits after the prefix and after each draft token
        prevs = torch.cat([lasts[:, None], drafts], 1)
        logits = target.logits(prevs)  # (B, K + 1, V)
        out = sampler.verify(logits, drafts, running, draft_probs=q if args.method == "rejection" else None,
                             method=args.method)
        passes += 1
        row_passes += len(running)
        drafted += args.k * len(running)
        accepted += int(out.num_accepted.sum())
        for i, s in enumerate(list(running)):
            new = out.tokens[i, :int(out.num_tokens[i])].tolist()
            out_tokens[s] += new
            if new:
                last[s] = new[-1]
            if bool(out.stopped[i]) or len(out_tokens[s]) >= args.tokens or not new:
                running.remove(s)
                sampler.remove(s)
    emitted = sum(len(v) for v in out_tokens.values())
    for s, toks in out_tokens.items():
        print(f"request {s}: {len(toks)} tokens: {toks}")
    print(f"{args.method}: {accepted} of {drafted} drafts accepted ({accepted / max(drafted, 1):.0%}); {emitted} "
          f"tokens in {passes} target passes, {emitted / max(row_passes, 1):.2f} tokens per request per pass "
          f"(ordinary decoding: 1)")
    return out_tokens


def stepwise(args: argparse.Namespace, lengths: dict[int, int]) -> dict[int, list[int]]:
    """Ordinary decoding, one token per step, as many tokens per request as the speculative run emitted."""
    dev, target, _, sampler, slots, last = setup(args)
    toks: dict[int, list[int]] = {s: [] for s in slots}
    running = [s for s in slots if lengths[s]]
    while running:
        out = sampler.sample(target.logits(torch.tensor([last[s] for s in running], device=dev)), running)
        for i, s in enumerate(list(running)):
            t = int(out.tokens[i])
            toks[s].append(t)
            last[s] = t
            if len(toks[s]) >= lengths[s]:
                running.remove(s)
    return toks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=("rejection", "match"), default="rejection")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per round")
    ap.add_argument("--tokens", type=int, default=40,
                    help="tokens per request (a request stops at the first round that reaches it)")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true",
                    help="(match method) decode step by step too and check that the tokens are the same")
    args = ap.parse_args()
    spec = run(args)
    if args.check:
        if args.method != "match":
            raise SystemExit("--check compares with step-by-step decoding: use --method match")
        ref = stepwise(args, {s: len(t) for s, t in spec.items()})
        if ref != spec:
            raise SystemExit(f"speculative and step-by-step tokens differ: {spec} vs {ref}")
        print("match: identical to step-by-step decoding")
    print(f"fastsampler {fastsampler.__version__}, backend {args.backend}")


if __name__ == "__main__":
    main()
