"""The batch layout is written once (`fastsampler.layout`) and every backend agrees with it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fastsampler import SamplingParams, layout
from fastsampler._batch import PackedRequest, batch_flags, initial_mu, pack_param_rows, pack_request, request_flags
from fastsampler.backends import cpu as fcpu


def test_columns_are_distinct_and_dense() -> None:
    f = [getattr(layout, k) for k in layout.EXTENSION_KEYS if k.startswith("F_")]
    i = [getattr(layout, k) for k in layout.EXTENSION_KEYS if k.startswith("I_")]
    assert sorted(f) == list(range(layout.NF)) and sorted(i) == list(range(layout.NI))
    assert layout.LOGPROBS_MODES[layout.MODE_RAW] == "raw" and layout.LOGPROBS_MODES[layout.MODE_FINAL] == "final"


def test_every_module_takes_the_constants_from_the_layout() -> None:
    from fastsampler import _batch, params
    from fastsampler.backends.reference import philox, pipeline

    assert params.MAX_TOP_LOGPROBS is layout.MAX_TOP_LOGPROBS and params.LOGPROBS_MODES is layout.LOGPROBS_MODES
    assert philox.TILE is layout.TILE and pipeline.MIROSTAT_M is layout.MIROSTAT_M
    assert _batch.COUNT_MAX is layout.COUNT_MAX and _batch.BatchFlags is layout.BatchFlags


def test_triton_kernels_take_the_constants_from_the_layout() -> None:
    pytest.importorskip("triton")
    from fastsampler.backends.triton import backend, candidates, draw, logprobs, mirostat, penalties, select, stats

    assert backend.TILE == layout.TILE and mirostat.BM >= layout.MIROSTAT_M and backend.MIROSTAT_TOP == mirostat.BM
    for mod in (candidates, draw, logprobs, mirostat, penalties, select, stats):
        for name in ("NF", "NI", "F_TEMPERATURE"):
            assert getattr(mod, name) == getattr(layout, name), (mod.__name__, name)


@pytest.mark.skipif(not fcpu.is_available()[0], reason=f"the C++ extension is unavailable: {fcpu.is_available()[1]}")
def test_the_extension_exports_the_same_layout() -> None:
    exported = dict(fcpu._C.LAYOUT)
    assert set(layout.EXTENSION_KEYS) <= set(exported)
    assert {k: exported[k] for k in layout.EXTENSION_KEYS} == {k: getattr(layout, k) for k in layout.EXTENSION_KEYS}
    layout.check_extension_layout(exported)  # and the import-time check accepts it


def test_a_mismatched_extension_layout_refuses_to_load() -> None:
    good = {k: getattr(layout, k) for k in layout.EXTENSION_KEYS}
    with pytest.raises(ImportError, match=r"F_TOP_P: extension 7, Python 1.*rebuild"):
        layout.check_extension_layout({**good, "F_TOP_P": 7})
    with pytest.raises(ImportError, match=r"TILE: extension missing"):
        layout.check_extension_layout({k: v for k, v in good.items() if k != "TILE"})


def test_flag_bits_round_trip_and_combine() -> None:
    every = layout.BatchFlags(**{n: True for n in layout.FLAG_NAMES})
    assert layout.int_to_flags(layout.flags_to_int(every)) == every
    assert layout.flags_to_int(layout.BatchFlags()) == 0
    greedy = layout.flags_to_int(layout.BatchFlags(any_greedy=True, all_greedy=True))
    top_k = layout.flags_to_int(layout.BatchFlags(any_top_k=True))
    both = layout.int_to_flags(layout.combine_bits([greedy, top_k]))
    assert both.any_greedy and both.any_top_k and not both.all_greedy  # all_greedy is an AND
    assert layout.int_to_flags(layout.combine_bits([greedy, greedy])).all_greedy
    assert layout.combine_bits([]) == 0


def _fields() -> list[SamplingParams]:
    return [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, min_keep=2, logprobs=True, top_logprobs=3,
                       logprobs_mode="final", seed=2**64 - 1),
        SamplingParams(typical_p=0.5, repetition_penalty=1.2, frequency_penalty=0.1, presence_penalty=-0.3,
                       min_tokens=2, ignore_eos=True, logit_bias={3: 1.5, 1: -2.0}, banned_token_ids=[0]),
        SamplingParams(mirostat_mode=1, mirostat_target=4.0, mirostat_lr=0.2, allowed_token_ids=[1, 2, 40]),
        SamplingParams(mirostat_mode=2, mirostat_target=3.0e38),
    ]


@pytest.mark.parametrize("p", _fields(), ids=range(len(_fields())))
def test_pack_request_is_the_one_definition_of_a_request_row(p: SamplingParams) -> None:
    req = pack_request(p)
    assert isinstance(req, PackedRequest) and pack_request(p) is req  # cached per params object
    f, i = req.f, req.i
    assert f[layout.F_TEMPERATURE] == np.float32(p.temperature) and f[layout.F_TOP_P] == np.float32(p.top_p)
    assert f[layout.F_MIRO_TAU] == np.float32(p.mirostat_target) and f[layout.F_REP] == np.float32(p.repetition_penalty)
    assert i[layout.I_TOP_K] == p.top_k and i[layout.I_MIRO_MODE] == p.mirostat_mode
    assert i[layout.I_LOGPROBS_MODE] == layout.LOGPROBS_MODES.index(p.logprobs_mode)
    assert i[layout.I_IGNORE_EOS] == int(p.ignore_eos) and i[layout.I_TOP_LOGPROBS] == p.top_logprobs
    assert layout.int_to_flags(req.bits) == request_flags(p)
    mu = initial_mu(p)
    with np.errstate(over="ignore"):
        assert (np.isnan(mu) and not p.mirostat_mode) or mu == np.float32(2.0 * p.mirostat_target)
    assert (np.isnan(req.mu) and np.isnan(mu)) or req.mu == mu
    assert sorted(req.bias_ids.tolist()) == sorted(p.logit_bias) and req.bias_vals.dtype == np.float32
    row = req.allowed_row(64)
    allowed = {t for t in range(64) if (int(row[t // 32]) >> (t % 32)) & 1}
    want = set(p.allowed_token_ids if p.allowed_token_ids is not None else range(64)) - set(p.banned_token_ids or ())
    assert allowed == want and req.restricted == (p.allowed_token_ids is not None or p.banned_token_ids is not None)


def test_initial_mu_overflows_to_inf_as_in_float32() -> None:
    assert initial_mu(SamplingParams(mirostat_mode=2, mirostat_target=3.0e38)) == np.inf


def test_batch_flags_and_param_rows_are_built_from_the_requests() -> None:
    plist = _fields()
    want = layout.int_to_flags(layout.combine_bits([layout.flags_to_int(request_flags(p)) for p in plist]))
    assert batch_flags(plist) == want and want.any_mirostat_v1 and want.any_mirostat_v2 and not want.all_greedy
    f, i = pack_param_rows(plist)
    assert f.shape == (len(plist), layout.NF) and i.shape == (len(plist), layout.NI)
    assert all((f[r] == pack_request(p).f).all() and (i[r] == pack_request(p).i).all() for r, p in enumerate(plist))
    f0, i0 = pack_param_rows([])
    assert f0.shape == (0, layout.NF) and i0.shape == (0, layout.NI)
    assert batch_flags([]) == layout.BatchFlags()


def test_batch_flags_fields_match_the_layout_names() -> None:
    assert tuple(f.name for f in dataclasses.fields(layout.BatchFlags)) == layout.FLAG_NAMES
