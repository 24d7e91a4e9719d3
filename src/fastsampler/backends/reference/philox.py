"""Philox4x32-10 and the exponential noise of docs/semantics.md §7, vectorised over numpy arrays.

Every backend draws its noise from these definitions; this module is the one they are tested against.
"""

from __future__ import annotations

import numpy as np

from ...layout import STREAM_TILE, STREAM_TOKEN, STREAM_XTC, TILE

__all__ = ["philox4x32", "exp_noise", "token_noise", "tile_noise", "xtc_uniform", "TILE", "STREAM_TOKEN",
           "STREAM_TILE"]

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def philox4x32(key: np.ndarray, counter: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Random123 Philox4x32 with ``rounds`` rounds.

    Parameters
    ----------
    key : (..., 2) array of uint32
    counter : (..., 4) array of uint32
        Broadcast against each other.

    Returns
    -------
    (..., 4) uint32 array.

    Examples
    --------
    >>> [f"{w:08x}" for w in philox4x32([0, 0], [0, 0, 0, 0])]
    ['6627e8d5', 'e169c58d', 'bc57ac4c', '9b00dbd8']
    """
    key = np.asarray(key, dtype=np.uint64) & _MASK
    ctr = np.asarray(counter, dtype=np.uint64) & _MASK
    if key.shape[-1:] != (2,) or ctr.shape[-1:] != (4,):
        raise ValueError(f"key must be (..., 2) and counter (..., 4), got {key.shape} and {ctr.shape}")
    k0, k1 = key[..., 0], key[..., 1]
    c0, c1, c2, c3 = ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3]
    k0, k1, c0, c1, c2, c3 = np.broadcast_arrays(k0, k1, c0, c1, c2, c3)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = _M0 * c0  # 32 x 32 -> 64 bits, exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> _32) ^ c1 ^ k0, p1 & _MASK, (p0 >> _32) ^ c3 ^ k1, p0 & _MASK
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def exp_noise(words: np.ndarray) -> np.ndarray:
    """Exponential variates from uint32 words, full relative precision on both tails.

    ``E = -ln((r + 0.5) 2^-32)`` for ``r < 2^31``, else ``-log1p(-((~r) + 0.5) 2^-32)``.

    >>> float(exp_noise(np.uint32(2**31 - 1))) > float(exp_noise(np.uint32(2**31)))
    True
    """
    r = np.asarray(words, dtype=np.uint64) & _MASK
    scale = 2.0**-32
    low = r < np.uint64(1 << 31)
    with np.errstate(divide="ignore"):
        a = -np.log((r.astype(np.float64) + 0.5) * scale)
        b = -np.log1p(-(((~r) & _MASK).astype(np.float64) + 0.5) * scale)
    return np.where(low, a, b)


def _words(seed: int, step: int, seq: int, stream: int, j: np.ndarray) -> np.ndarray:
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    j = np.asarray(j, dtype=np.uint64)
    ctr = np.stack(
        [j >> np.uint64(2), np.full_like(j, int(step) & 0xFFFFFFFF), np.full_like(j, int(seq) & 0xFFFFFFFF),
         np.full_like(j, stream)],
        axis=-1,
    )
    out = philox4x32(key, ctr)
    return np.take_along_axis(out, (j & np.uint64(3)).astype(np.int64)[..., None], axis=-1)[..., 0]


def token_noise(seed: int, step: int, seq: int, ids: np.ndarray) -> np.ndarray:
    """``E_i`` for token ids ``ids`` (stream 0), float64."""
    return exp_noise(_words(seed, step, seq, STREAM_TOKEN, ids))


def tile_noise(seed: int, step: int, seq: int, tiles: np.ndarray) -> np.ndarray:
    """``E'_t`` for tile indices ``tiles`` (stream 1), float64."""
    return exp_noise(_words(seed, step, seq, STREAM_TILE, tiles))


def xtc_uniform(seed: int, step: int, seq: int) -> float:
    """XTC's coin ``u = (w0 + 0.5) 2^-32`` (docs/semantics.md §3 E item 6): word 0 of stream 3 at counter index 0."""
    w0 = int(_words(seed, step, seq, STREAM_XTC, np.zeros(1, dtype=np.uint64))[0])
    return (w0 + 0.5) * 2.0**-32
