"""Speculative verification (docs/semantics.md §11): the rejection rule of one draft position, on torch tensors of
any device, with the random numbers of §7's reserved stream 2.

`fastsampler.Sampler.verify` runs the positions one after another; at a position a backend gives the target
distribution ``p`` (`sampling_probs_packed`) and this module decides, per row, the draft's acceptance and otherwise the
recovered token. The numpy twin is `fastsampler.reference.verify`.
"""

from __future__ import annotations

import torch

from .layout import STREAM_VERIFY
from .output import SampleOutput, VerifyOutput

__all__ = ["philox4x32", "verify_uniforms", "accept_or_recover"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox4x32(key: tuple[torch.Tensor, torch.Tensor], ctr: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (docs/semantics.md §7) on int64 tensors holding uint32 values (broadcast together).

    A 32 x 32-bit product needs 64 bits: it wraps in int64, and its high and low words are taken with masks, which
    the wrap does not change.

    >>> z = torch.zeros(1, dtype=torch.int64)
    >>> [f"{int(w):08x}" for w in philox4x32((z, z), (z, z, z, z))]
    ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
    """
    k0, k1 = key
    c0, c1, c2, c3 = ctr
    for r in range(10):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = c0 * _M0
        p1 = c2 * _M1
        c0, c1, c2, c3 = ((p1 >> 32) & _MASK) ^ c1 ^ k0, p1 & _MASK, ((p0 >> 32) & _MASK) ^ c3 ^ k1, p0 & _MASK
    return c0, c1, c2, c3


def verify_uniforms(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two uniforms of a verification position, float64 in ``(0, 1)``: ``(r + 0.5) 2^-32`` for words 0
    (acceptance) and 1 (residual draw) of Philox4x32-10 at counter ``(0, step, seq, 2)`` (docs/semantics.md §11);
    the arguments broadcast (e.g. ``(B, 1)`` seeds and ``(B, K)`` steps: every position of every row at once)."""
    key = (seeds & _MASK, (seeds >> 32) & _MASK)
    zero = torch.zeros_like(steps)
    w0, w1, _, _ = philox4x32(key, (zero, steps & _MASK, seqs & _MASK, torch.full_like(steps, STREAM_VERIFY)))
    return (w0.to(torch.float64) + 0.5) * 2.0 ** -32, (w1.to(torch.float64) + 0.5) * 2.0 ** -32


def accept_or_recover(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None,
                      uniforms: tuple[torch.Tensor, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft position of the rejection rule (docs/semantics.md §11) for every row.

    Parameters
    ----------
    p : (B, >= vocab) float
        The target distribution (zero beyond ``vocab``; all zero for an invalid row).
    draft : (B,) int64
        The drafted tokens.
    q : (B, >= vocab) float or None
        The draft distribution; None: one-hot at the draft (a draft without probabilities).
    uniforms : ((B,), (B,)) float64
        The position's two uniforms per row (`verify_uniforms` at the step of this position).

    Returns
    -------
    (token, accepted) : (B,) int64 and (B,) bool
        ``accepted``: ``u * q[d] < p[d]``; the token is then the draft, else the residual draw from
        ``max(0, p - q)`` (``p`` itself when that is all zero) by inversion of its cumulative sum (float64) with
        the second uniform; -1 when ``p`` has no mass. The difference ``p - q`` is taken in ``p``'s dtype.
    """
    pv = p[:, :vocab]
    d = draft[:, None]
    p_d = pv.gather(1, d)[:, 0].to(torch.float64)
    qv = None if q is None else q[:, :vocab].to(pv.dtype)
    q_d = torch.ones_like(p_d) if qv is None else qv.gather(1, d)[:, 0].to(torch.float64)
    u, v = uniforms
    accepted = u * q_d < p_d
    on_cpu = p.device.type == "cpu"  # (reading a flag back costs nothing there: skip the work no row needs)
    if on_cpu and bool(accepted.all()):
        return draft.clone(), accepted
    resid = pv.scatter(1, d, 0.0) if qv is None else (pv - qv).clamp_(min=0.0)
    cum = torch.cumsum(resid, 1, dtype=torch.float64)
    empty = ~(cum[:, -1] > 0)  # nothing left of p beyond q: draw from p itself
    if not on_cpu or bool(empty.any()):
        cum = torch.where(empty[:, None], torch.cumsum(pv, 1, dtype=torch.float64), cum)
    total = cum[:, -1]
    # the first id whose cumulative mass exceeds v * total: an id of positive residual mass
    rec = torch.searchsorted(cum, (v * total)[:, None].contiguous(), right=True)[:, 0].clamp(max=vocab - 1)
    rec = torch.where(total > 0, rec, -1)
    return torch.where(accepted, draft, rec), accepted


def verify_method(method: str | None, draft_probs: object) -> str:
    """The verification method of `Sampler.verify` and `distributed.Sampler.verify`, checked: ``'match'`` without
    ``draft_probs``, ``'rejection'`` with them, unless given."""
    method = method or ("match" if draft_probs is None else "rejection")
    if method not in ("match", "rejection"):
        raise ValueError(f"method must be 'match' or 'rejection', got {method!r}")
    if method == "match" and draft_probs is not None:
        raise ValueError("method='match' accepts drafts equal to the target's own draw and takes no draft_probs; "
                         "use method='rejection' with draft_probs")
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor)
                                    or not draft_probs.dtype.is_floating_point):
        raise TypeError("draft_probs must be a floating-point torch.Tensor")
    return method


class VerifyRecord:
    """What a verification emits, position by position (`Sampler.verify`, `distributed.Sampler.verify`): a row emits
    a position's token while it is active and the position is valid, stays active while its drafts are accepted, and
    stops at a token that ends its request. Everything stays on the device."""

    def __init__(self, b: int, k1: int, n_top: int, dev: torch.device) -> None:
        i64, f32 = torch.int64, torch.float32
        self.tokens = torch.full((b, k1), -1, dtype=i64, device=dev)
        self.lps = torch.full((b, k1), float("nan"), dtype=f32, device=dev)
        self.ranks = torch.full((b, k1), -1, dtype=i64, device=dev)
        self.top_ids = torch.full((b, k1, n_top), -1, dtype=i64, device=dev)
        self.top_lps = torch.full((b, k1, n_top), float("nan"), dtype=f32, device=dev)
        self.n_tok = torch.zeros(b, dtype=i64, device=dev)
        self.n_acc = torch.zeros(b, dtype=i64, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)
        self.stopped = torch.zeros(b, dtype=torch.bool, device=dev)

    def emit(self, j: int, out: SampleOutput, accepted: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Record position ``j``'s output (``accepted``: its draft was; ``ends``: its token ends the request);
        returns the rows that emitted it."""
        emit = self.active & out.valid
        self.tokens[:, j] = torch.where(emit, out.tokens, -1)
        self.lps[:, j] = torch.where(emit, out.logprobs, float("nan"))
        self.ranks[:, j] = torch.where(emit, out.ranks, -1)
        self.top_ids[:, j] = torch.where(emit[:, None], out.top_logprob_ids, -1)
        self.top_lps[:, j] = torch.where(emit[:, None], out.top_logprobs, float("nan"))
        self.n_tok += emit.to(torch.int64)
        self.active = emit & accepted
        self.n_acc += self.active.to(torch.int64)
        ends = emit & ends  # a token that ends the request ends its drafts too
        self.stopped |= ends
        self.active &= ~ends
        return emit

    def output(self, mirostat_mu: torch.Tensor) -> VerifyOutput:
        return VerifyOutput(tokens=self.tokens, num_tokens=self.n_tok, num_accepted=self.n_acc, logprobs=self.lps,
                            ranks=self.ranks, top_logprob_ids=self.top_ids, top_logprobs=self.top_lps,
                            mirostat_mu=mirostat_mu, stopped=self.stopped)
