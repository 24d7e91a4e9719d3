"""Speculative verification, the definition (docs/semantics.md §11): `verify`, position after position, on the
reference pipeline (float64 inside). `fastsampler.Sampler.verify` reproduces it on every backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..._batch import normalize_params, random_seed, seed_to_int64
from ...layout import STREAM_VERIFY
from ...output import VerifyOutput
from ...params import SamplingParams
from .philox import philox4x32
from .pipeline import _collect, _rows_from_args, _run_row

__all__ = ["verify", "accept_or_recover", "verify_uniforms"]


def verify_uniforms(seed: int, step: int, seq: int) -> tuple[float, float]:
    """The acceptance and residual uniforms of a verification position: ``(r + 0.5) 2^-32`` for words 0 and 1 of
    Philox4x32-10 at counter ``(0, step, seq, 2)`` (docs/semantics.md §11)."""
    seed &= 0xFFFFFFFFFFFFFFFF
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    ctr = np.array([0, step & 0xFFFFFFFF, seq & 0xFFFFFFFF, STREAM_VERIFY], dtype=np.uint64)
    w = philox4x32(key, ctr)
    return (float(w[0]) + 0.5) * 2.0**-32, (float(w[1]) + 0.5) * 2.0**-32


def accept_or_recover(p: np.ndarray, draft: int, q: np.ndarray | None, seed: int, step: int, seq: int
                      ) -> tuple[int, bool]:
    """One draft position of the rejection rule for one row: ``(token, accepted)`` (docs/semantics.md §11).

    ``p``: the target distribution over the vocabulary; ``q``: the draft's (None: one-hot at ``draft``). Accept when
    ``u * q[d] < p[d]``; else the first id whose cumulative mass in ``max(0, p - q)`` (``p`` when that is all zero)
    exceeds ``v`` times the total; ``-1`` when there is no mass at all.
    """
    q_d = 1.0 if q is None else float(q[draft])
    u, v = verify_uniforms(seed, step, seq)
    if u * q_d < p[draft]:
        return draft, True
    if q is None:
        resid = p.copy()
        resid[draft] = 0.0
    else:
        resid = np.maximum(p - q, 0.0)
    cum = np.cumsum(resid)
    if not cum[-1] > 0:
        cum = np.cumsum(p)
    if not cum[-1] > 0:
        return -1, False
    return int(min(np.searchsorted(cum, v * cum[-1], side="right"), p.size - 1)), False


def _per_row(value: Any, b: int, name: str) -> list[Any]:
    if value is None:
        return [None] * b
    out = list(value.tolist() if isinstance(value, (np.ndarray, torch.Tensor)) else value)
    if len(out) != b:
        raise ValueError(f"{name} must hold one entry per row ({b}), got {len(out)}")
    return out


def verify(
    logits: Any,
    draft_tokens: Any,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    draft_probs: Any = None,
    method: str | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    steps: Any = None,
    seqs: Any = None,
    mirostat_mu: Any = None,
    seeds: Any = None,
    eos_token_ids: Sequence[int] = (),
    vocab_size: int | None = None,
) -> VerifyOutput:
    """Verify ``K`` draft tokens per row against the target's logits at ``K + 1`` positions (docs/semantics.md §11).
    A row also stops after a token that ends it (one of its ``stop_token_ids``, or an EOS id unless ``ignore_eos``).

    Parameters
    ----------
    logits : (B, K + 1, V) array or tensor
        Row ``b``'s target logits after its prefix and after each of its drafts.
    draft_tokens : (B, K) ints
    params : SamplingParams or B of them
    draft_probs : (B, K, V) floats, optional
        The draft model's distributions; with it the method defaults to ``"rejection"``, without to ``"match"``.
    method : {'match', 'rejection'}, optional
        ``match``: every position is a normal step and drafts are accepted while they equal its token.
        ``rejection``: Leviathan et al.'s rule with the streams of §7 (one-hot ``q`` without ``draft_probs``).
    prompt_token_ids, output_token_ids, steps, seqs, mirostat_mu, seeds, eos_token_ids, vocab_size
        The rows' state before the first position, as in `sample` (a row without a seed gets one random seed).

    Returns
    -------
    VerifyOutput of numpy arrays.
    """
    x = logits.detach().cpu().double().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits, np.float64)
    if x.ndim != 3:
        raise ValueError(f"logits must be (B, K + 1, V), got shape {x.shape}")
    b, k1, width = x.shape
    k = k1 - 1
    drafts = np.asarray(draft_tokens.cpu() if isinstance(draft_tokens, torch.Tensor) else draft_tokens,
                        dtype=np.int64).reshape(b, k)
    method = method or ("match" if draft_probs is None else "rejection")
    if method not in ("match", "rejection"):
        raise ValueError(f"method must be 'match' or 'rejection', got {method!r}")
    if method == "match" and draft_probs is not None:
        raise ValueError("method='match' takes no draft_probs")
    q_all = None
    if draft_probs is not None:
        q_all = (draft_probs.detach().cpu().double().numpy() if isinstance(draft_probs, torch.Tensor)
                 else np.asarray(draft_probs, np.float64))
    vocab = width if vocab_size is None else int(vocab_size)
    plist = normalize_params(params, b)
    n_top = max((p.top_logprobs for p in plist), default=0)
    prompts = _per_row(prompt_token_ids, b, "prompt_token_ids")
    outs = _per_row(output_token_ids, b, "output_token_ids")
    steps_l, seqs_l = _per_row(steps, b, "steps"), _per_row(seqs, b, "seqs")
    mus, seeds_l = _per_row(mirostat_mu, b, "mirostat_mu"), _per_row(seeds, b, "seeds")
    tokens = np.full((b, k1), -1, dtype=np.int64)
    lps = np.full((b, k1), np.nan, dtype=np.float32)
    ranks = np.full((b, k1), -1, dtype=np.int64)
    top_ids = np.full((b, k1, n_top), -1, dtype=np.int64)
    top_lps = np.full((b, k1, n_top), np.nan, dtype=np.float32)
    n_tok = np.zeros(b, dtype=np.int64)
    n_acc = np.zeros(b, dtype=np.int64)
    mu_out = np.full(b, np.nan, dtype=np.float32)
    stopped = np.zeros(b, dtype=bool)
    eos = [int(e) for e in eos_token_ids]
    for r in range(b):
        p = plist[r]
        ending = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(eos))
        seed = seeds_l[r] if seeds_l[r] is not None else (p.seed if p.seed is not None else random_seed())
        seed &= 0xFFFFFFFFFFFFFFFF
        hist = list(outs[r] or [])
        step, seq, mu = int(steps_l[r] or 0), int(seqs_l[r] or 0), mus[r]
        for j in range(k1):
            kw: dict[str, Any] = dict(prompt_token_ids=[list(prompts[r] or [])], output_token_ids=[hist],
                                      steps=[step], seqs=[seq], seeds=torch.tensor([seed_to_int64(seed)]),
                                      eos_token_ids=eos_token_ids, vocab_size=vocab)
            if mu is not None:
                kw["mirostat_mu"] = [mu]
            row = _rows_from_args(x[r, j][None], [p], **kw)[0]
            res = _run_row(row)
            if j == 0:
                mu_out[r] = np.float32(row.mu)
            if not res.valid:
                break
            if j < k and method == "rejection":
                q = None if q_all is None else q_all[r, j, :vocab]
                tok, acc = accept_or_recover(res.probs, int(drafts[r, j]), q, seed, step, seq)
                row.forced = tok
                res = _run_row(row)
            else:
                tok = res.token
                acc = j < k and tok == int(drafts[r, j])
            out = _collect([row], [res], width, n_top)
            tokens[r, j], lps[r, j], ranks[r, j] = tok, out.logprobs[0], out.ranks[0]
            top_ids[r, j], top_lps[r, j] = out.top_logprob_ids[0], out.top_logprobs[0]
            n_tok[r] += 1
            hist.append(tok)
            step += 1
            mu = float(np.float32(res.mu)) if not math.isnan(res.mu) else None
            mu_out[r] = np.float32(res.mu)
            if acc:
                n_acc[r] += 1
            if tok in ending:  # the request ends here: its later drafts are not verified
                stopped[r] = True
                break
            if not acc:
                break
    return VerifyOutput(tokens=tokens, num_tokens=n_tok, num_accepted=n_acc, logprobs=lps, ranks=ranks,
                        top_logprob_ids=top_ids, top_logprobs=top_lps, mirostat_mu=mu_out, stopped=stopped)
