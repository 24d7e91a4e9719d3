"""Speculative verification (docs/semantics.md §11): the rejection rule of one draft position, on torch tensors of
any device, with the random numbers of §7's reserved streams.

`fastsampler.Sampler.verify` runs the positions one after another; at a position a backend gives the target
distribution ``p`` (`sampling_probs_packed`) and this module decides, per row, the draft's acceptance and otherwise the
recovered token. The numpy twin is `fastsampler.reference.verify`.
"""

from __future__ import annotations

import torch

from .layout import STREAM_ACCEPT, STREAM_RESIDUAL

__all__ = ["philox4x32", "stream_words", "exp_noise", "accept_or_recover"]

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


def stream_words(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``(B, n)`` int64: word ``j`` of each row's stream ``stream`` at its ``(seed, step, seq)``, ``j = 0 .. n-1``
    (counter ``(j >> 2, step, seq, stream)``, word ``j & 3``)."""
    dev = seeds.device
    k0 = (seeds & _MASK)[:, None]
    k1 = ((seeds >> 32) & _MASK)[:, None]
    c1 = (steps & _MASK)[:, None]
    c2 = (seqs & _MASK)[:, None]
    quads = (n + 3) // 4
    c0 = torch.arange(quads, device=dev, dtype=torch.int64)[None, :]
    c3 = torch.full_like(c0, stream)
    words = torch.stack(philox4x32((k0, k1), (c0, c1, c2, c3)), dim=-1)  # (B, quads, 4)
    return words.reshape(seeds.shape[0], quads * 4)[:, :n]


def exp_noise(words: torch.Tensor) -> torch.Tensor:
    """The exponential variate of docs/semantics.md §7 for uint32 words (int64 tensor), float64."""
    scale = 2.0 ** -32
    low = words < (1 << 31)
    a = -torch.log((words.to(torch.float64) + 0.5) * scale)
    b = -torch.log1p(-((_MASK - words).to(torch.float64) + 0.5) * scale)
    return torch.where(low, a, b)


def accept_or_recover(p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None, seeds: torch.Tensor,
                      steps: torch.Tensor, seqs: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One draft position of the rejection rule (docs/semantics.md §11) for every row.

    Parameters
    ----------
    p : (B, >= vocab) float
        The target distribution (zero beyond ``vocab``; all zero for an invalid row).
    draft : (B,) int64
        The drafted tokens.
    q : (B, >= vocab) float or None
        The draft distribution; None: one-hot at the draft (a draft without probabilities).
    seeds, steps, seqs : (B,) int64
        Each row's seed bit pattern, the step of this position, and its seq.

    Returns
    -------
    (token, accepted) : (B,) int64 and (B,) bool
        ``accepted``: ``u * q[d] < p[d]`` with ``u`` from stream 2; the token is then the draft, else the residual
        draw from ``max(0, p - q)`` (``p`` itself when that is all zero) by an exponential race with stream-3 noise
        (ties to the lowest id); -1 when ``p`` has no mass.
    """
    pv = p[:, :vocab].to(torch.float64)
    d = draft[:, None]
    p_d = pv.gather(1, d)[:, 0]
    if q is None:
        q_d = torch.ones_like(p_d)
        resid = pv.scatter(1, d, 0.0)
    else:
        qv = q[:, :vocab].to(torch.float64)
        q_d = qv.gather(1, d)[:, 0]
        resid = (pv - qv).clamp(min=0.0)
    u = (stream_words(seeds, steps, seqs, STREAM_ACCEPT, 1)[:, 0].to(torch.float64) + 0.5) * 2.0 ** -32
    accepted = u * q_d < p_d
    empty = ~(resid.sum(1, keepdim=True) > 0)
    resid = torch.where(empty, pv, resid)
    noise = exp_noise(stream_words(seeds, steps, seqs, STREAM_RESIDUAL, vocab))
    live = resid > 0
    score = torch.where(live, torch.log(torch.where(live, resid, 1.0)) - torch.log(noise), float("-inf"))
    rec = torch.where(live.any(1), score.argmax(1), -1)  # argmax: the first maximum, the lowest id
    return torch.where(accepted, draft, rec), accepted
