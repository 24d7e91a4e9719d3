"""SamplingParams: validation messages, contradictions, generation-config loading, round trips, hashing."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import re

import numpy as np
import pytest

from fastsampler import SamplingParams
from fastsampler.params import LOGPROBS_MODES, MAX_TOP_LOGPROBS

NAN = float("nan")
INF = float("inf")


def _m(text: str) -> str:
    """A `pytest.raises(match=...)` pattern matching ``text`` literally."""
    return re.escape(text)


# --------------------------------------------------------------------------------------------------- defaults


def test_defaults():
    p = SamplingParams()
    assert p.temperature == 1.0 and p.top_k == -1 and p.top_p == 1.0 and p.min_p == 0.0 and p.typical_p == 1.0
    assert p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 and p.repetition_penalty == 1.0
    assert dict(p.logit_bias) == {}
    assert p.mirostat_mode == 0 and p.mirostat_target == 5.0 and p.mirostat_lr == 0.1
    assert p.logprobs is False and p.top_logprobs == 0 and p.logprobs_mode == "raw"
    assert p.seed is None and p.min_keep == 1 and p.min_tokens == 0 and p.ignore_eos is False
    assert p.allowed_token_ids is None and p.banned_token_ids is None and p.n == 1
    assert not p.greedy
    assert LOGPROBS_MODES == ("raw", "processed", "final") and MAX_TOP_LOGPROBS == 20


# ------------------------------------------------------------------------------------------ float fields: ranges

# (field, lowest valid, highest valid, below-range value, above-range value, range text in the message)
FLOAT_FIELDS = [
    ("temperature", 0.0, 1e6, -1e-9, INF, "[0, inf)"),
    ("top_p", 1e-12, 1.0, 0.0, 1.0000001, "(0, 1]"),
    ("min_p", 0.0, 1.0, -1e-9, 1.5, "[0, 1]"),
    ("typical_p", 1e-12, 1.0, 0.0, 2.0, "(0, 1]"),
    ("frequency_penalty", -2.0, 2.0, -2.5, 2.0001, "[-2, 2]"),
    ("presence_penalty", -2.0, 2.0, -3.0, 2.5, "[-2, 2]"),
    ("repetition_penalty", 1e-6, 1e6, 0.0, INF, "(0, inf)"),
    ("mirostat_target", 1e-6, 1e6, 0.0, INF, "(0, inf)"),
    ("mirostat_lr", 1e-9, 1.0, 0.0, 1.5, "(0, 1]"),
]


@pytest.mark.parametrize("name,lo,hi,below,above,rng", FLOAT_FIELDS, ids=[f[0] for f in FLOAT_FIELDS])
def test_float_field_range(name, lo, hi, below, above, rng):
    assert getattr(SamplingParams(**{name: lo}), name) == lo
    assert getattr(SamplingParams(**{name: hi}), name) == hi
    with pytest.raises(ValueError, match=_m(f"{name} must be in {rng}, got {below!r}")):
        SamplingParams(**{name: below})
    with pytest.raises(ValueError, match=_m(f"{name} must be in {rng}, got {above!r}")):
        SamplingParams(**{name: above})
    with pytest.raises(ValueError, match=_m(f"{name} must be in {rng}, got nan")):
        SamplingParams(**{name: NAN})
    with pytest.raises(ValueError, match=_m(f"{name} must be in {rng}, got nan")):
        SamplingParams(**{name: np.float32("nan")})
    with pytest.raises(ValueError, match=_m(f"{name} must be in {rng}")):
        SamplingParams(**{name: -INF})


@pytest.mark.parametrize("name", [f[0] for f in FLOAT_FIELDS])
@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5], 1j])
def test_float_field_type(name, bad):
    with pytest.raises(TypeError, match=rf"^{name} must be a real number in .*, got {re.escape(repr(bad))} of type "
                                        rf"{type(bad).__name__}$"):
        SamplingParams(**{name: bad})


@pytest.mark.parametrize("name", [f[0] for f in FLOAT_FIELDS])
def test_float_field_accepts_ints_and_numpy(name):
    # every float field's valid range contains 1 (top_p / typical_p / mirostat_lr: the upper end)
    for v in (1, np.float32(1.0), np.float64(1.0), np.int64(1)):
        got = getattr(SamplingParams(**{name: v}), name)
        assert type(got) is float and got == 1.0


def test_temperature_zero_is_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=-0.0).greedy
    assert not SamplingParams(temperature=1e-30).greedy


# -------------------------------------------------------------------------------------------- int fields: ranges

# (field, lowest valid, highest valid, range text)
INT_FIELDS = [
    ("top_k", -(1 << 31), (1 << 31) - 1, "[-2147483648, 2147483647]"),
    ("mirostat_mode", 0, 2, "[0, 2]"),
    ("top_logprobs", 0, 20, "[0, 20]"),
    ("min_keep", 1, (1 << 31) - 1, "[1, 2147483647]"),
    ("min_tokens", 0, (1 << 31) - 1, "[0, 2147483647]"),
    ("n", 1, 1 << 16, "[1, 65536]"),
]


def _int_kwargs(name, v):
    kw = {name: v}
    if name == "top_logprobs":
        kw["logprobs"] = True
    return kw


@pytest.mark.parametrize("name,lo,hi,rng", INT_FIELDS, ids=[f[0] for f in INT_FIELDS])
def test_int_field_range(name, lo, hi, rng):
    assert getattr(SamplingParams(**_int_kwargs(name, lo)), name) == lo
    assert getattr(SamplingParams(**_int_kwargs(name, hi)), name) == hi
    got = getattr(SamplingParams(**_int_kwargs(name, np.int32(lo))), name)
    assert type(got) is int and got == lo
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=_m(f"{name} must be an integer {rng}, got {bad}")):
            SamplingParams(**_int_kwargs(name, bad))


@pytest.mark.parametrize("name", [f[0] for f in INT_FIELDS])
@pytest.mark.parametrize("bad", [1.0, NAN, True, False, "1", None, np.float32(1.0)])
def test_int_field_type(name, bad):
    with pytest.raises(TypeError, match=rf"^{name} must be an integer \[.*\], got {re.escape(repr(bad))} of type "
                                        rf"{type(bad).__name__}$"):
        SamplingParams(**_int_kwargs(name, bad))


def test_top_k_disabled_values_are_accepted():
    # 0 and every negative value mean "off"; stored as given
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(top_k=-7).top_k == -7


# ------------------------------------------------------------------------------------------------- bool fields


@pytest.mark.parametrize("name", ["logprobs", "ignore_eos"])
@pytest.mark.parametrize("bad", [0, 1, "True", None, np.bool_(True)])
def test_bool_fields(name, bad):
    with pytest.raises(TypeError, match=_m(f"{name} must be a bool, got {bad!r}")):
        SamplingParams(**{name: bad})
    assert getattr(SamplingParams(**{name: True}), name) is True


# ------------------------------------------------------------------------------------------------ logprobs_mode


@pytest.mark.parametrize("mode", LOGPROBS_MODES)
def test_logprobs_mode_valid(mode):
    assert SamplingParams(logprobs_mode=mode).logprobs_mode == mode


@pytest.mark.parametrize("bad", ["RAW", "logits", "", None, 0])
def test_logprobs_mode_invalid(bad):
    msg = f"logprobs_mode must be one of ('raw', 'processed', 'final'), got {bad!r}"
    with pytest.raises(ValueError, match=_m(msg)):
        SamplingParams(logprobs_mode=bad)


def test_top_logprobs_needs_logprobs():
    with pytest.raises(ValueError, match=_m("top_logprobs=3 needs logprobs=True, got logprobs=False")):
        SamplingParams(top_logprobs=3)
    p = SamplingParams(logprobs=True, top_logprobs=3)
    assert p.top_logprobs == 3
    assert SamplingParams(logprobs=True, top_logprobs=0).top_logprobs == 0
    assert SamplingParams(logprobs=False, top_logprobs=0).logprobs is False


def test_top_logprobs_range_message():
    with pytest.raises(ValueError, match=_m("top_logprobs must be an integer [0, 20], got 21")):
        SamplingParams(logprobs=True, top_logprobs=21)


# ---------------------------------------------------------------------------------------------------------- seed


@pytest.mark.parametrize("seed", [0, 1, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
def test_seed_range_valid(seed):
    assert SamplingParams(seed=seed).seed == seed


def test_seed_numpy_types():
    p = SamplingParams(seed=np.uint64((1 << 64) - 1))
    assert type(p.seed) is int and p.seed == (1 << 64) - 1
    assert SamplingParams(seed=np.int64(5)).seed == 5


@pytest.mark.parametrize("seed", [-1, 1 << 64, (1 << 64) + 5, -(1 << 63)])
def test_seed_out_of_range(seed):
    with pytest.raises(ValueError, match=_m(f"seed must be None or an integer in [0, 2**64), got {seed}")):
        SamplingParams(seed=seed)


@pytest.mark.parametrize("seed", [1.0, "1", True, NAN])
def test_seed_type(seed):
    with pytest.raises(TypeError, match=_m(f"seed must be None or an integer in [0, 2**64), got {seed!r}")):
        SamplingParams(seed=seed)


# --------------------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_normalised():
    p = SamplingParams(logit_bias={7: 1, "3": -2.5, np.int64(5): np.float32(0.5), 9: -INF})
    assert dict(p.logit_bias) == {3: -2.5, 5: 0.5, 7: 1.0, 9: -INF}
    assert list(p.logit_bias) == [3, 5, 7, 9]  # sorted by id
    assert all(type(k) is int and type(v) is float for k, v in p.logit_bias.items())
    assert SamplingParams(logit_bias=None).logit_bias == {}
    assert SamplingParams(logit_bias={0: -100, 1: 100}).logit_bias == {0: -100.0, 1: 100.0}


def test_logit_bias_is_read_only():
    src = {1: 1.0}
    p = SamplingParams(logit_bias=src)
    src[2] = 2.0  # the caller's dict is copied
    assert dict(p.logit_bias) == {1: 1.0}
    with pytest.raises(TypeError, match="read-only"):
        p.logit_bias[3] = 1.0  # type: ignore[index]


@pytest.mark.parametrize("key", [-1, "-1", "x", 1.5, None, True])
def test_logit_bias_bad_key(key):
    with pytest.raises(ValueError, match=_m(f"logit_bias keys must be non-negative token ids, got {key!r}")):
        SamplingParams(logit_bias={key: 1.0})


@pytest.mark.parametrize("val", [100.5, -100.01, INF, NAN, "1", None, True])
def test_logit_bias_bad_value(val):
    with pytest.raises(ValueError, match=_m(f"logit_bias[4] must be a float in [-100, 100] or -inf, got {val!r}")):
        SamplingParams(logit_bias={4: val})


@pytest.mark.parametrize("bad", [[1, 2], "ab", 3, [(1, 2.0)]])
def test_logit_bias_not_a_mapping(bad):
    msg = f"logit_bias must be a mapping of token id to float, got {type(bad).__name__}"
    with pytest.raises(TypeError, match=_m(msg)):
        SamplingParams(logit_bias=bad)


# ----------------------------------------------------------------------------------------- allowed / banned ids


@pytest.mark.parametrize("name", ["allowed_token_ids", "banned_token_ids"])
def test_ids_normalised(name):
    p = SamplingParams(**{name: [5, 3, 3, np.int64(9), 0]})
    assert getattr(p, name) == (0, 3, 5, 9)
    assert SamplingParams(**{name: np.array([4, 2, 4])}).__getattribute__(name) == (2, 4)
    assert SamplingParams(**{name: range(3)}).__getattribute__(name) == (0, 1, 2)
    assert getattr(SamplingParams(**{name: None}), name) is None


@pytest.mark.parametrize("name", ["allowed_token_ids", "banned_token_ids"])
def test_ids_errors(name):
    with pytest.raises(ValueError, match=_m(f"{name}[1] must be a non-negative token id, got -4")):
        SamplingParams(**{name: [2, -4]})
    with pytest.raises(TypeError, match=_m(f"{name}[0] must be an integer token id, got 1.0")):
        SamplingParams(**{name: [1.0]})
    with pytest.raises(TypeError, match=_m(f"{name}[2] must be an integer token id, got True")):
        SamplingParams(**{name: [1, 2, True]})
    for bad in ("12", b"12", 7):
        with pytest.raises(TypeError, match=_m(f"{name} must be a sequence of non-negative token ids, got {bad!r}")):
            SamplingParams(**{name: bad})


def test_allowed_empty_is_an_error_banned_empty_is_not():
    with pytest.raises(ValueError, match=_m("allowed_token_ids must not be empty (no token could ever be sampled)")):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match=_m("allowed_token_ids must not be empty")):
        SamplingParams(allowed_token_ids=np.zeros(0, dtype=np.int64))
    assert SamplingParams(banned_token_ids=[]).banned_token_ids == ()


# ----------------------------------------------------------------------------------------------- contradictions


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize(
    "kw,clash",
    [
        ({"top_k": 40}, "top_k=40"),
        ({"top_p": 0.9}, "top_p=0.9"),
        ({"min_p": 0.05}, "min_p=0.05"),
        ({"typical_p": 0.5}, "typical_p=0.5"),
        ({"top_k": 3, "typical_p": 0.5}, "top_k=3, typical_p=0.5"),
        ({"top_k": 3, "top_p": 0.5, "min_p": 0.1, "typical_p": 0.2}, "top_k=3, top_p=0.5, min_p=0.1, typical_p=0.2"),
    ],
)
def test_mirostat_excludes_truncation(mode, kw, clash):
    msg = (f"mirostat_mode={mode} replaces truncation and cannot be combined with {clash}; leave top_k, top_p, min_p, "
           "typical_p, epsilon_cutoff, eta_cutoff, top_n_sigma and xtc_probability at their defaults")
    with pytest.raises(ValueError, match=_m(msg)):
        SamplingParams(mirostat_mode=mode, **kw)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_with_disabled_truncation_is_fine(mode):
    # top_k <= 0 is "off", so it does not clash; min_keep and penalties are independent of mirostat
    for k in (0, -1, -5):
        assert SamplingParams(mirostat_mode=mode, top_k=k).mirostat_mode == mode
    p = SamplingParams(mirostat_mode=mode, mirostat_target=3.0, mirostat_lr=0.2, min_keep=4, repetition_penalty=1.2,
                       temperature=0.7)
    assert (p.mirostat_target, p.mirostat_lr, p.min_keep) == (3.0, 0.2, 4)
    # without mirostat, all four rules combine freely
    SamplingParams(top_k=5, top_p=0.5, min_p=0.1, typical_p=0.9)


CLASH_TOP_P = "mirostat_mode=2 replaces truncation and cannot be combined with top_p=0.9"


def test_replace_revalidates():
    p = SamplingParams(top_p=0.9)
    assert p.replace(top_p=0.5).top_p == 0.5
    with pytest.raises(ValueError, match=_m(CLASH_TOP_P)):
        p.replace(mirostat_mode=2)
    with pytest.raises(ValueError, match=_m("top_p must be in (0, 1], got 2")):
        p.replace(top_p=2)
    assert p.top_p == 0.9  # unchanged


# ------------------------------------------------------------------------------------ frozen, equality, hashing


def test_frozen():
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.logit_bias = {}  # type: ignore[misc]


def test_equality_and_hash():
    a = SamplingParams(temperature=0.7, logit_bias={3: 1, 1: -INF}, allowed_token_ids=[4, 2, 2], seed=5)
    b = SamplingParams(temperature=0.7, logit_bias={"1": -INF, 3: 1.0}, allowed_token_ids=(2, 4), seed=np.uint64(5))
    assert a == b and hash(a) == hash(b)
    assert len({a, b, SamplingParams()}) == 2
    assert a != a.replace(seed=6)
    assert a != a.replace(logit_bias={3: 1.0})
    assert SamplingParams(temperature=0.0) == SamplingParams(temperature=-0.0)
    assert hash(SamplingParams(temperature=0.0)) == hash(SamplingParams(temperature=-0.0))
    assert SamplingParams(top_k=5) == SamplingParams(top_k=np.int64(5))
    d = {a: "x"}
    assert d[b] == "x"


# --------------------------------------------------------------------------------------------- to_dict round trip


ROUND_TRIP = [
    SamplingParams(),
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, typical_p=0.9, min_keep=3, seed=(1 << 64) - 1),
    SamplingParams(frequency_penalty=-1.5, presence_penalty=2.0, logit_bias={10: -INF, 2: 3.5}, logprobs=True,
                   top_logprobs=20, logprobs_mode="final", min_tokens=4, ignore_eos=True,
                   allowed_token_ids=[9, 1], banned_token_ids=[3], n=3),
    SamplingParams(mirostat_mode=1, mirostat_target=3.0, mirostat_lr=1.0),
    SamplingParams(mirostat_mode=2, logprobs=True, logprobs_mode="processed"),
]


@pytest.mark.parametrize("p", ROUND_TRIP)
def test_to_dict_round_trip(p):
    d = p.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(SamplingParams)}
    assert SamplingParams(**d) == p
    assert type(d["logit_bias"]) is dict and all(type(k) is int for k in d["logit_bias"])
    for name in ("allowed_token_ids", "banned_token_ids"):
        assert d[name] is None or type(d[name]) is list
    # JSON round trip (-inf bias values travel as Python's -Infinity)
    back = json.loads(json.dumps(d))
    assert SamplingParams(**back) == p


def test_to_dict_reports_effective_values():
    d = SamplingParams(temperature=1, top_k=np.int64(3), allowed_token_ids=[3, 1, 3]).to_dict()
    assert d["temperature"] == 1.0 and type(d["temperature"]) is float
    assert d["top_k"] == 3 and type(d["top_k"]) is int
    assert d["allowed_token_ids"] == [1, 3]


@pytest.mark.parametrize("p", ROUND_TRIP)
def test_pickle_and_deepcopy(p):
    # engines ship params across processes and copy them; both must work and preserve equality
    assert pickle.loads(pickle.dumps(p)) == p
    assert copy.deepcopy(p) == p
    assert copy.copy(p) == p


# ------------------------------------------------------------------------------------- from_generation_config


def test_generation_config_dict():
    cfg = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0, "typical_p": 0.9,
           "repetition_penalty": 1.05, "bos_token_id": 1, "eos_token_id": [2, 3], "max_new_tokens": 100}
    p = SamplingParams.from_generation_config(cfg)
    assert p == SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0, typical_p=0.9,
                               repetition_penalty=1.05)
    assert type(p.min_p) is float


def test_generation_config_defaults_and_nulls():
    assert SamplingParams.from_generation_config({}) == SamplingParams()
    cfg = {"temperature": None, "top_k": None, "top_p": None, "min_p": None, "typical_p": None,
           "repetition_penalty": None, "do_sample": None}
    assert SamplingParams.from_generation_config(cfg) == SamplingParams()


def test_generation_config_top_k_zero_disables():
    p = SamplingParams.from_generation_config({"do_sample": True, "top_k": 0})
    assert p.top_k <= 0  # off
    assert p.top_k == -1


def test_generation_config_greedy():
    cfg = {"do_sample": False, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.1, "typical_p": 0.5,
           "repetition_penalty": 1.2}
    p = SamplingParams.from_generation_config(cfg)
    # do_sample=false: greedy; the warpers are ignored, the repetition penalty still applies
    assert p == SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert p.greedy


def test_generation_config_overrides_win():
    cfg = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    p = SamplingParams.from_generation_config(cfg, temperature=1.0, seed=7, logprobs=True, top_logprobs=2)
    assert (p.temperature, p.top_p, p.seed, p.top_logprobs) == (1.0, 0.9, 7, 2)
    # overriding temperature back on top of do_sample=false samples again
    q = SamplingParams.from_generation_config({"do_sample": False, "top_p": 0.5}, temperature=0.8)
    assert (q.temperature, q.top_p) == (0.8, 1.0)
    # overrides are validated too
    with pytest.raises(ValueError, match=_m(CLASH_TOP_P)):
        SamplingParams.from_generation_config(cfg, mirostat_mode=2)


def test_generation_config_invalid_values_raise():
    with pytest.raises(ValueError, match=_m("top_p must be in (0, 1], got 1.5")):
        SamplingParams.from_generation_config({"top_p": 1.5})
    with pytest.raises(ValueError, match=_m("temperature must be in [0, inf), got -0.5")):
        SamplingParams.from_generation_config({"temperature": -0.5})


def test_generation_config_file_and_folder(tmp_path):
    cfg = {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
           "min_p": None, "transformers_version": "4.50.0"}
    expected = SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.1)
    f = tmp_path / "generation_config.json"
    f.write_text(json.dumps(cfg), encoding="utf-8")
    assert SamplingParams.from_generation_config(f) == expected  # os.PathLike
    assert SamplingParams.from_generation_config(str(f)) == expected  # str path
    assert SamplingParams.from_generation_config(tmp_path) == expected  # model folder
    assert SamplingParams.from_generation_config(str(tmp_path), top_k=4).top_k == 4


def test_generation_config_file_errors(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.json must hold a JSON object, got list"):
        SamplingParams.from_generation_config(bad)
    with pytest.raises(FileNotFoundError):
        SamplingParams.from_generation_config(tmp_path / "missing")  # a folder without generation_config.json


def test_generation_config_greedy_matches_math():
    # sanity: temperature 0 from a config is exactly the greedy flag, not a tiny positive number
    p = SamplingParams.from_generation_config({"do_sample": False})
    assert p.temperature == 0.0 and math.copysign(1.0, p.temperature) == 1.0


def test_temperature_below_float32_range_rejected():
    # kernels compute in float32: a temperature that would flush to 0 there must not silently become greedy
    with pytest.raises(ValueError, match=r"temperature must be 0 \(greedy\) or at least 1.17549435"):
        SamplingParams(temperature=1e-40)
    assert SamplingParams(temperature=1.2e-38).temperature == 1.2e-38

