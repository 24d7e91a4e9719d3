"""The randomness definition (docs/semantics.md §7): Philox4x32-10 known answers, counter layout, exponential noise.

Expected values are computed here independently: a scalar pure-Python Philox written from the Random123 round
function, and the noise from `decimal` at 50 digits.
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest

from fastsampler.backends.reference import exp_noise, philox4x32, tile_noise, token_noise
from fastsampler.backends.reference.philox import STREAM_TILE, STREAM_TOKEN, TILE

M32 = 0xFFFFFFFF


def philox_scalar(key: tuple[int, int], ctr: tuple[int, int, int, int], rounds: int = 10) -> list[int]:
    """Random123 Philox4x32: (c0..c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))."""
    k0, k1 = key
    c0, c1, c2, c3 = ctr
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
    return [c0, c1, c2, c3]


def hexwords(a) -> list[str]:
    return [f"{int(w):08x}" for w in np.asarray(a).reshape(-1)]


# Random123 known-answer vectors: (rounds, key, counter, expected). The first and third are quoted in
# docs/semantics.md §7.
KAT = [
    (10, (0, 0), (0, 0, 0, 0), "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    (10, (M32, M32), (M32, M32, M32, M32), "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    (10, (0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
    (7, (0, 0), (0, 0, 0, 0), "5f6fb709 0d893f64 4f121f81 4f730a48"),
]


@pytest.mark.parametrize("rounds,key,ctr,expected", KAT)
def test_philox_known_answers(rounds, key, ctr, expected):
    got = philox4x32(np.array(key, dtype=np.uint32), np.array(ctr, dtype=np.uint32), rounds=rounds)
    assert got.dtype == np.uint32 and got.shape == (4,)
    assert hexwords(got) == expected.split()
    assert hexwords(philox_scalar(key, ctr, rounds)) == expected.split()  # the scalar oracle agrees too


def test_philox_default_rounds_is_10():
    assert hexwords(philox4x32(np.zeros(2, np.uint32), np.zeros(4, np.uint32))) == KAT[0][3].split()


def test_philox_vectorised_matches_scalar():
    rng = np.random.default_rng(1234)
    keys = rng.integers(0, 1 << 32, size=(3, 5, 2), dtype=np.uint64).astype(np.uint32)
    ctrs = rng.integers(0, 1 << 32, size=(3, 5, 4), dtype=np.uint64).astype(np.uint32)
    got = philox4x32(keys, ctrs)
    assert got.shape == (3, 5, 4) and got.dtype == np.uint32
    for i in range(3):
        for j in range(5):
            want = philox_scalar(tuple(int(x) for x in keys[i, j]), tuple(int(x) for x in ctrs[i, j]))
            assert [int(w) for w in got[i, j]] == want


def test_philox_broadcasts_key_against_counters():
    key = np.array([0xA4093822, 0x299F31D0], dtype=np.uint32)
    ctrs = np.array([[j, 7, 3, 0] for j in range(6)], dtype=np.uint32)
    got = philox4x32(key, ctrs)
    assert got.shape == (6, 4)
    for j in range(6):
        assert [int(w) for w in got[j]] == philox_scalar((0xA4093822, 0x299F31D0), (j, 7, 3, 0))


def test_philox_bad_shapes():
    with pytest.raises(ValueError, match=r"key must be \(\.\.\., 2\) and counter \(\.\.\., 4\)"):
        philox4x32(np.zeros(3, np.uint32), np.zeros(4, np.uint32))
    with pytest.raises(ValueError, match=r"key must be \(\.\.\., 2\) and counter \(\.\.\., 4\)"):
        philox4x32(np.zeros(2, np.uint32), np.zeros(2, np.uint32))


# ------------------------------------------------------------------------------------------------ noise formula


def noise_exact(r: int) -> float:
    """E = -ln(u), u = (r + 0.5) 2^-32, to 50 digits (both branches of docs/semantics.md §7 are this function)."""
    getcontext().prec = 50
    u = (Decimal(r) + Decimal("0.5")) / Decimal(2**32)
    return float(-u.ln())


def noise_math(r: int) -> float:
    """The two branches of docs/semantics.md §7, with math.log / math.log1p."""
    if r < 2**31:
        return -math.log((r + 0.5) * 2.0**-32)
    return -math.log1p(-((~r & M32) + 0.5) * 2.0**-32)


BRANCH_POINTS = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]


@pytest.mark.parametrize("r", BRANCH_POINTS)
def test_exp_noise_branch_points(r):
    got = float(exp_noise(np.uint32(r)))
    assert got == pytest.approx(noise_math(r), rel=5e-16)
    assert got == pytest.approx(noise_exact(r), rel=4e-16)


def test_exp_noise_closed_forms():
    # r = 0: u = 2^-33, E = 33 ln 2 (the largest value, the noise never reaches +inf)
    assert float(exp_noise(np.uint32(0))) == pytest.approx(33 * math.log(2), rel=1e-15)
    # r = 2^32 - 1: u = 1 - 2^-33, E = -log1p(-2^-33) ~= 2^-33 (full relative precision, not 0)
    e_top = float(exp_noise(np.uint32(2**32 - 1)))
    assert e_top > 0.0
    assert e_top == pytest.approx(2.0**-33 + 2.0**-67, rel=1e-15)
    # on each side of the branch point: u = 1/2 -+ 2^-33
    assert float(exp_noise(np.uint32(2**31 - 1))) == pytest.approx(-math.log(0.5 - 2.0**-33), rel=1e-15)
    assert float(exp_noise(np.uint32(2**31))) == pytest.approx(-math.log1p(-(0.5 - 2.0**-33)), rel=1e-15)
    assert float(exp_noise(np.uint32(2**31))) == pytest.approx(-math.log(0.5 + 2.0**-33), rel=1e-15)


def test_exp_noise_monotone_across_the_branch():
    r = np.array([0, 1, 2, 2**30, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1], dtype=np.uint32)
    e = exp_noise(r)
    assert e.dtype == np.float64 and e.shape == r.shape
    assert np.all(np.diff(e) < 0)  # strictly decreasing in r: E = -ln u, u increasing
    assert np.all(np.isfinite(e)) and np.all(e > 0)


def test_exp_noise_vectorised_random_words():
    rng = np.random.default_rng(7)
    r = rng.integers(0, 1 << 32, size=200, dtype=np.uint64).astype(np.uint32)
    e = exp_noise(r)
    for ri, ei in zip(r.tolist(), e.tolist(), strict=True):
        assert ei == pytest.approx(noise_exact(ri), rel=4e-16)


# ----------------------------------------------------------------------------------------------- counter layout


def expected_noise(seed: int, step: int, seq: int, stream: int, j: int) -> float:
    """Word j & 3 of Philox(key = (seed lo32, seed hi32), counter = (j >> 2, step, seq, stream))."""
    key = (seed & M32, (seed >> 32) & M32)
    words = philox_scalar(key, (j >> 2, step & M32, seq & M32, stream))
    return noise_math(words[j & 3])


def test_stream_and_tile_constants():
    assert (STREAM_TOKEN, STREAM_TILE, TILE) == (0, 1, 4096)


def test_token_noise_known_answer():
    # seed 0, step 0, seq 0: ids 0..3 are the four words of the first known answer
    words = [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    got = token_noise(0, 0, 0, np.arange(4))
    assert got.tolist() == pytest.approx([noise_math(w) for w in words], rel=5e-16)
    # id 4 starts the next counter (j >> 2 = 1)
    assert float(token_noise(0, 0, 0, np.array([4]))[0]) == pytest.approx(expected_noise(0, 0, 0, 0, 4), rel=5e-16)


@pytest.mark.parametrize("seed", [0, 1, 0x299F31D0A4093822, (1 << 64) - 1, 1 << 32, (1 << 63) + 5])
def test_token_and_tile_noise_layout(seed):
    ids = np.array([0, 1, 2, 3, 4, 5, 4095, 4096, 131071, 262143])
    for step, seq in ((0, 0), (17, 3), (2**32 - 1, 2**31)):
        tok = token_noise(seed, step, seq, ids)
        til = tile_noise(seed, step, seq, ids)
        # within 2 ulp: numpy's vectorised log may round differently from libm; adjacent words differ by > 1e-11
        assert tok.tolist() == pytest.approx([expected_noise(seed, step, seq, 0, int(j)) for j in ids], rel=5e-16)
        assert til.tolist() == pytest.approx([expected_noise(seed, step, seq, 1, int(j)) for j in ids], rel=5e-16)
        assert not np.array_equal(tok, til)  # separate streams


def test_seed_key_layout_against_known_answer():
    # seed whose (lo32, hi32) is the third known answer's key; id 4*0x243f6a88 + w picks word w of the counter
    # (0x243f6a88, step, seq, 0). Stream 0 differs from the KAT's 4th word, so compare with the scalar oracle.
    seed = 0x299F31D0A4093822
    key = np.array([0xA4093822, 0x299F31D0], dtype=np.uint32)
    ids = np.array([4 * 7 + w for w in range(4)])
    words = philox4x32(key, np.array([7, 11, 13, 0], dtype=np.uint32))
    assert token_noise(seed, 11, 13, ids).tolist() == exp_noise(words).tolist()
    words1 = philox4x32(key, np.array([7, 11, 13, 1], dtype=np.uint32))
    assert tile_noise(seed, 11, 13, ids).tolist() == exp_noise(words1).tolist()


def test_step_and_seq_are_taken_modulo_2_32():
    ids = np.arange(9)
    base = token_noise(5, 3, 2, ids)
    assert np.array_equal(token_noise(5, 3 + 2**32, 2, ids), base)
    assert np.array_equal(token_noise(5, 3, 2 + 5 * 2**32, ids), base)
    assert np.array_equal(token_noise(5, -1, 2, ids), token_noise(5, 2**32 - 1, 2, ids))
    assert not np.array_equal(token_noise(5, 4, 2, ids), base)
    assert not np.array_equal(token_noise(5, 3, 3, ids), base)
    assert not np.array_equal(token_noise(6, 3, 2, ids), base)
    assert not np.array_equal(token_noise(5 + 2**32, 3, 2, ids), base)  # the seed's high word is part of the key
