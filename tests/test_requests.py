"""SamplingParams.from_request and sampling_options: OpenAI / Fireworks request bodies, the effective options."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import fastsampler
from fastsampler import SamplingParams
from fastsampler.params import _EXTENSION_KEYS, _IGNORED_REQUEST_KEYS, _REQUEST_KEYS


def _m(text: str) -> str:
    return re.escape(text)


CHAT = {
    "model": "accounts/example/models/tiny",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 64,
    "stream": True,
    "stream_options": {"include_usage": True},
    "stop": ["\n\n"],
    "user": "u-1",
    "tools": [],
    "tool_choice": "auto",
    "response_format": {"type": "json_object"},
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "frequency_penalty": 0.5,
    "presence_penalty": -0.25,
    "repetition_penalty": 1.1,
    "logit_bias": {"50256": -100, "13": 2.5},
    "logprobs": True,
    "top_logprobs": 5,
    "n": 2,
    "seed": 1234,
    "min_tokens": 3,
    "ignore_eos": False,
}

COMPLETIONS = {
    "model": "m",
    "prompt": "The sky is",
    "suffix": None,
    "echo": True,
    "max_tokens": 16,
    "temperature": 0.0,
    "logprobs": 2,
    "best_of": 3,
    "n": 1,
    "stop": "\n",
    "typical_p": 0.95,
    "ignore_eos": True,
}


# ------------------------------------------------------------------------------------------------------ bodies


def test_chat_body():
    p = SamplingParams.from_request(CHAT)
    assert p == SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, frequency_penalty=0.5,
                               presence_penalty=-0.25, repetition_penalty=1.1, logit_bias={50256: -100.0, 13: 2.5},
                               logprobs=True, top_logprobs=5, n=2, seed=1234, min_tokens=3)


def test_completions_body():
    # logprobs=2: the sampled token and the top 2; best_of=3 with n=1: three samples drawn
    p = SamplingParams.from_request(COMPLETIONS)
    assert p == SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, n=3, typical_p=0.95, ignore_eos=True)
    assert p.greedy


def test_empty_body_and_nulls_are_defaults():
    assert SamplingParams.from_request({}) == SamplingParams()
    nulls = dict.fromkeys(sorted(_REQUEST_KEYS), None)
    assert SamplingParams.from_request(nulls) == SamplingParams()


def test_body_must_be_a_mapping():
    with pytest.raises(TypeError, match=_m("the request body must be a mapping (a JSON object), got list")):
        SamplingParams.from_request([("temperature", 1.0)])  # type: ignore[arg-type]


def test_params_drive_a_sample():
    p = SamplingParams.from_request({"temperature": 0.8, "top_k": 5, "seed": 3, "logprobs": 1})
    out = fastsampler.sample(np.linspace(-2, 2, 64, dtype=np.float32)[None], p, steps=[0])
    assert out.tokens[0] >= 59  # the top 5 of an increasing row
    assert out.top_logprob_ids[0].shape[-1] == 1


# ---------------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize(
    "value, logprobs, top",
    [
        (True, True, 0),  # chat: the sampled token's logprob
        (False, False, 0),
        (None, False, 0),
        (0, True, 0),  # completions: 0 is the sampled token alone
        (1, True, 1),
        (5, True, 5),
    ],
)
def test_logprobs_forms(value, logprobs, top):
    p = SamplingParams.from_request({"logprobs": value})
    assert (p.logprobs, p.top_logprobs) == (logprobs, top)


def test_top_logprobs_wins_over_an_integer_logprobs():
    assert SamplingParams.from_request({"logprobs": 2, "top_logprobs": 4}).top_logprobs == 4
    assert SamplingParams.from_request({"logprobs": True, "top_logprobs": 20}).top_logprobs == 20


def test_logprobs_errors():
    with pytest.raises(ValueError, match=_m("logprobs must be an integer [0, 5], got 6")):
        SamplingParams.from_request({"logprobs": 6})
    with pytest.raises(TypeError, match=_m("logprobs must be a bool or an integer in [0, 5], got 'yes' of type str")):
        SamplingParams.from_request({"logprobs": "yes"})
    with pytest.raises(ValueError, match=_m("top_logprobs must be an integer [0, 20], got 21")):
        SamplingParams.from_request({"logprobs": True, "top_logprobs": 21})
    with pytest.raises(ValueError, match=_m("top_logprobs=3 needs logprobs=True, got logprobs=False")):
        SamplingParams.from_request({"top_logprobs": 3})


# -------------------------------------------------------------------------------------------------- logit_bias


def test_logit_bias_string_keys():
    p = SamplingParams.from_request({"logit_bias": {"7": 1.5, "100": -100, "3": 100}})
    assert dict(p.logit_bias) == {3: 100.0, 7: 1.5, 100: -100.0}
    assert SamplingParams.from_request({"logit_bias": {7: 1.5}}) == SamplingParams(logit_bias={7: 1.5})
    assert SamplingParams.from_request({"logit_bias": {}}) == SamplingParams()


@pytest.mark.parametrize(
    "bias, message",
    [
        ({"5": 100.5}, "logit_bias[5] must be a float in [-100, 100] or -inf, got 100.5"),
        ({"5": "x"}, "logit_bias[5] must be a float in [-100, 100] or -inf, got 'x'"),
        ({"tok": 1}, "logit_bias keys must be non-negative token ids, got 'tok'"),
        ({"-1": 1}, "logit_bias keys must be non-negative token ids, got '-1'"),
    ],
)
def test_logit_bias_errors(bias, message):
    with pytest.raises(ValueError, match=_m(message)):
        SamplingParams.from_request({"logit_bias": bias})


# ------------------------------------------------------------------------------------------- generation config

GEN = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.01, "typical_p": 0.9,
       "repetition_penalty": 1.3, "no_repeat_ngram_size": 3}


def test_generation_config_fills_unset_fields():
    p = SamplingParams.from_request({"top_p": 0.8, "seed": 1}, GEN)
    # request wins for top_p; the other four come from the file; repetition_penalty and the n-gram rule do not
    assert p == SamplingParams(temperature=0.6, top_k=20, top_p=0.8, min_p=0.01, typical_p=0.9, seed=1)


def test_generation_config_null_request_values_are_unset():
    assert SamplingParams.from_request({"temperature": None}, GEN).temperature == 0.6


def test_generation_config_file_and_folder(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(GEN))
    want = SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.01, typical_p=0.9)
    assert SamplingParams.from_request({}, tmp_path) == want
    assert SamplingParams.from_request({}, str(tmp_path / "generation_config.json")) == want


def test_generation_config_greedy_and_top_k_zero():
    # do_sample false: greedy unless the request sets a temperature; top_k 0 is off
    assert SamplingParams.from_request({}, {"do_sample": False, "top_p": 0.5}) == SamplingParams(temperature=0.0)
    assert SamplingParams.from_request({"temperature": 0.9}, {"do_sample": False}).temperature == 0.9
    assert SamplingParams.from_request({}, {"top_k": 0}).top_k == -1


def test_generation_config_with_mirostat_fills_the_temperature_only():
    p = SamplingParams.from_request({"mirostat_target": 3.0}, GEN)
    assert p == SamplingParams(temperature=0.6, mirostat_mode=2, mirostat_target=3.0)


# ------------------------------------------------------------------------------------------- ignored / unknown


@pytest.mark.parametrize("key", sorted(_IGNORED_REQUEST_KEYS))
def test_ignored_keys(key):
    assert SamplingParams.from_request({key: {"anything": [1, 2]}, "temperature": 0.5}) == SamplingParams(
        temperature=0.5)


def test_ignored_keys_cover_the_common_request_fields():
    for key in ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream", "stream_options",
                "stop", "user", "tools", "tool_choice", "response_format", "echo", "suffix"):
        assert key in _IGNORED_REQUEST_KEYS
    assert not _IGNORED_REQUEST_KEYS & _REQUEST_KEYS
    assert not _IGNORED_REQUEST_KEYS & _EXTENSION_KEYS


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ValueError, match=_m("unknown request key 'top_n' (")):
        SamplingParams.from_request({"top_n": 3})
    with pytest.raises(ValueError, match=_m("unknown request keys 'temprature', 'mirostat' (")):
        SamplingParams.from_request({"model": "m", "temprature": 0.5, "mirostat": 2})


def test_extension_keys_are_samplingparams_fields():
    p = SamplingParams.from_request({"stop_token_ids": [7, 2], "dry_multiplier": 0.8, "min_keep": 2})
    assert p == SamplingParams(stop_token_ids=[2, 7], dry_multiplier=0.8, min_keep=2)
    with pytest.raises(ValueError, match=_m("dry_multiplier must be in [0, inf), got -1")):
        SamplingParams.from_request({"dry_multiplier": -1})


# ------------------------------------------------------------------------------------------------ range errors


@pytest.mark.parametrize(
    "body, exc, message",
    [
        ({"temperature": 2.5}, ValueError, "temperature must be in [0, 2], got 2.5"),
        ({"temperature": -0.1}, ValueError, "temperature must be in [0, 2], got -0.1"),
        ({"temperature": "hot"}, TypeError, "temperature must be a real number in [0, 2], got 'hot' of type str"),
        ({"top_p": 1.5}, ValueError, "top_p must be in [0, 1], got 1.5"),
        ({"top_k": -2}, ValueError, "top_k must be an integer [-1, 2147483647], got -2"),
        ({"top_k": 1.5}, TypeError, "top_k must be an integer [-1, 2147483647], got 1.5 of type float"),
        ({"min_p": 1.01}, ValueError, "min_p must be in [0, 1], got 1.01"),
        ({"typical_p": 0}, ValueError, "typical_p must be in (0, 1], got 0"),
        ({"frequency_penalty": 2.5}, ValueError, "frequency_penalty must be in [-2, 2], got 2.5"),
        ({"presence_penalty": -3}, ValueError, "presence_penalty must be in [-2, 2], got -3"),
        ({"repetition_penalty": 0}, ValueError, "repetition_penalty must be in (0, 2], got 0"),
        ({"repetition_penalty": 2.5}, ValueError, "repetition_penalty must be in (0, 2], got 2.5"),
        ({"n": 0}, ValueError, "n must be an integer [1, 128], got 0"),
        ({"n": 129}, ValueError, "n must be an integer [1, 128], got 129"),
        ({"n": 4, "best_of": 2}, ValueError, "best_of must be an integer [4, 128], got 2"),
        ({"seed": 2**64}, ValueError, "seed must be an integer in [-2**63, 2**64), got 18446744073709551616"),
        ({"seed": -(2**63) - 1}, ValueError, "seed must be an integer in [-2**63, 2**64), got -9223372036854775809"),
        ({"seed": "7"}, TypeError, "seed must be an integer in [-2**63, 2**64), got '7'"),
        ({"mirostat_target": 0}, ValueError, "mirostat_target must be in (0, inf), got 0"),
        ({"mirostat_target": 5, "mirostat_lr": 1.5}, ValueError, "mirostat_lr must be in (0, 1], got 1.5"),
        ({"mirostat_lr": 0}, ValueError, "mirostat_lr must be in (0, 1], got 0"),
        ({"min_tokens": -1}, ValueError, "min_tokens must be an integer [0, 2147483647], got -1"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos must be a bool, got 1"),
    ],
)
def test_range_errors_name_field_value_and_range(body, exc, message):
    with pytest.raises(exc, match=_m(message)):
        SamplingParams.from_request(body)


def test_edges_of_the_request_ranges():
    assert SamplingParams.from_request({"temperature": 2}).temperature == 2.0
    assert SamplingParams.from_request({"repetition_penalty": 2}).repetition_penalty == 2.0
    assert SamplingParams.from_request({"n": 128}).n == 128
    assert SamplingParams.from_request({"top_k": 0}).top_k == -1  # 0 and -1: off
    assert SamplingParams.from_request({"top_k": 500}).top_k == 500  # no cap at 100 here
    # top_p 0: the most likely token only, which is top-k 1 (ties kept by both rules)
    assert SamplingParams.from_request({"top_p": 0, "top_k": 50}) == SamplingParams(top_k=1)
    assert SamplingParams.from_request({"seed": -1}).seed == 2**64 - 1
    assert SamplingParams.from_request({"seed": 2**64 - 1}).seed == 2**64 - 1


# ---------------------------------------------------------------------------------------------------- Mirostat


def test_mirostat_target_turns_on_v2():
    p = SamplingParams.from_request({"mirostat_target": 4.0, "mirostat_lr": 0.2, "temperature": 0.9})
    assert p == SamplingParams(temperature=0.9, mirostat_mode=2, mirostat_target=4.0, mirostat_lr=0.2)
    assert SamplingParams.from_request({"mirostat_target": 6}).mirostat_lr == 0.1  # the default rate


def test_mirostat_lr_alone_is_checked_and_dropped():
    assert SamplingParams.from_request({"mirostat_lr": 0.5}) == SamplingParams()
    assert SamplingParams.from_request({"mirostat_target": None, "mirostat_lr": 0.5}) == SamplingParams()


def test_mirostat_mode_extension_picks_v1_or_off():
    p = SamplingParams.from_request({"mirostat_target": 3.0, "mirostat_mode": 1})
    assert (p.mirostat_mode, p.mirostat_target) == (1, 3.0)
    assert SamplingParams.from_request({"mirostat_target": 3.0, "mirostat_mode": 0}) == SamplingParams()


def test_mirostat_with_truncation_in_the_body_is_refused():
    with pytest.raises(ValueError, match=_m("mirostat_mode=2 replaces truncation and cannot be combined with "
                                            "top_p=0.9")):
        SamplingParams.from_request({"mirostat_target": 5.0, "top_p": 0.9})


# --------------------------------------------------------------------------------------------- sampling_options


def test_sampling_options_example():
    assert SamplingParams(temperature=0.7, top_p=0.9).sampling_options() == {"temperature": 0.7, "top_p": 0.9}
    assert SamplingParams().sampling_options() == {"temperature": 1.0}


def test_sampling_options_keys_and_types():
    opts = SamplingParams.from_request(CHAT).sampling_options()
    assert opts == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "frequency_penalty": 0.5,
                    "presence_penalty": -0.25, "repetition_penalty": 1.1, "logit_bias": {"13": 2.5, "50256": -100.0},
                    "logprobs": True, "top_logprobs": 5, "n": 2, "seed": 1234, "min_tokens": 3}
    assert json.loads(json.dumps(opts)) == opts
    m = SamplingParams(mirostat_mode=1, mirostat_target=3.0).sampling_options()
    assert m == {"temperature": 1.0, "mirostat_target": 3.0, "mirostat_lr": 0.1, "mirostat_mode": 1}
    e = SamplingParams(stop_token_ids=[9, 4], bad_words_ids=[[1, 2]], logprobs_mode="final").sampling_options()
    assert e == {"temperature": 1.0, "logprobs_mode": "final", "stop_token_ids": [4, 9], "bad_words_ids": [[1, 2]]}


ROUND_TRIP = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams.from_request(CHAT),
    SamplingParams.from_request(COMPLETIONS),
    SamplingParams.from_request({"top_p": 0.8}, GEN),
    SamplingParams.from_request({"mirostat_target": 3.5, "mirostat_lr": 0.05}, GEN),
    SamplingParams(mirostat_mode=1, mirostat_target=7.0, mirostat_lr=1.0),
    SamplingParams(logit_bias={0: float("-inf"), 5: 100.0}, seed=2**64 - 1, ignore_eos=True),
    SamplingParams(temperature=1.2, stop_token_ids=[3], no_repeat_ngram_size=2, bad_words_ids=[[4, 5], [6]],
                   dry_multiplier=0.8, dry_sequence_breakers=[[13]], xtc_probability=0.5, min_keep=3,
                   allowed_token_ids=[1, 2, 3, 4, 5, 6], penalty_last_n=64, top_n_sigma=1.5, dynatemp_range=0.3),
    SamplingParams(epsilon_cutoff=3e-4, eta_cutoff=1e-3, typical_p=0.5, logprobs=True, logprobs_mode="processed"),
]


@pytest.mark.parametrize("params", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_sampling_options_round_trip(params):
    opts = params.sampling_options()
    assert SamplingParams.from_request(opts) == params
    assert SamplingParams.from_request(json.loads(json.dumps(opts))) == params  # through the header's JSON
    # the options are the effective ones: a generation config cannot change them
    assert SamplingParams.from_request(opts, GEN).sampling_options().items() >= opts.items()
