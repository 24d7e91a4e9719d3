"""The backend layer: one protocol, capabilities that agree with what each backend runs, and a registry."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import SamplingParams, backends
from fastsampler._batch import pack_request


@pytest.mark.parametrize("name", backends.available())
def test_every_available_backend_implements_the_protocol(name: str) -> None:
    mod = backends.load(name)
    assert isinstance(mod, backends.Backend)
    caps = mod.CAPABILITIES
    assert isinstance(caps, backends.Capabilities) and caps.devices and caps.dtypes
    assert caps.features <= {"slot_index", "host_batch"}
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        if mod.supports(torch.device("cpu"), dt):  # what it runs, it declares
            assert dt in caps.dtypes and "cpu" in caps.devices
    assert backends.loaded(name) is mod


def test_every_backend_module_declares_its_capabilities_even_when_it_cannot_run() -> None:
    import importlib

    for name, module in backends._MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        assert isinstance(mod.CAPABILITIES, backends.Capabilities), name
    assert tuple(backends._MODULES) == backends.BACKENDS


def test_registry_resolves_auto_by_device_and_dtype() -> None:
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, torch.float64) == "reference"
    want = "cpu" if "cpu" in backends.available() else "reference"
    assert backends.resolve("auto", cpu, torch.float32) == want
    assert backends.resolve("reference", cpu, torch.float32) == "reference"
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpu', 'reference'\)"):
        backends.resolve("numpy", cpu, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.load("auto")
    assert fastsampler.available_backends() == backends.available()


def test_a_backend_that_does_not_import_is_reported_with_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastsampler.backends.cpu", None)
    with pytest.raises(ImportError, match=r"backend='cpu' is unavailable .*pip install"):
        backends.load("cpu")
    assert "cpu" not in backends.available()
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "reference"


def test_the_public_modules_do_not_import_each_other_in_a_circle() -> None:
    import subprocess

    code = "import fastsampler._custom_ops, fastsampler.backends, fastsampler._api; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.filterwarnings("ignore::fastsampler.SeedWithoutStepsWarning")  # one seeded draw at step 0, on purpose
def test_pack_batch_of_the_layer_is_the_one_the_api_uses() -> None:
    x = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    b = backends.pack_batch(x, [SamplingParams(temperature=0.0), SamplingParams(top_k=2, seed=3)])
    assert b.fparams.shape == (2, fastsampler.layout.NF) and b.flags.any_greedy and b.flags.any_top_k
    out = backends.load("reference").sample_packed(b)
    plist = [SamplingParams(temperature=0.0), SamplingParams(top_k=2, seed=3)]
    assert out.tokens[0].item() == 1
    assert out.tokens.tolist() == fastsampler.sample(x, plist, backend="reference").tokens.tolist()


def test_sampler_add_writes_the_packed_request() -> None:
    p = SamplingParams(temperature=0.5, mirostat_mode=2, mirostat_target=2.5, logit_bias={4: 1.0},
                       banned_token_ids=[7], seed=11, n=2)
    s = fastsampler.Sampler(vocab_size=40, max_slots=3, backend="reference")
    slots = s.add(p)
    req = pack_request(p)
    for slot in slots:
        assert (s._tables.fparams[slot].numpy() == req.f).all() and (s._tables.iparams[slot].numpy() == req.i).all()
        assert s.mirostat_mu_of(slot) == float(req.mu)
        assert s._tables.allowed is not None and (s._tables.allowed[slot].numpy() == req.allowed_row(40)).all()
    assert s.capture_key[0] == req.bits and s.capture_key[2] == 1
    assert np.isclose(s.mirostat_mu_of(slots[0]), 5.0)


def test_packed_batch_positional_form_round_trips() -> None:
    from fastsampler._batch import ARRAY_FIELDS, PackedBatch

    x = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    p = SamplingParams(top_k=2, logit_bias={1: 0.5}, logprobs=True, top_logprobs=2, seed=5)
    b = backends.pack_batch(x, p, prompt_token_ids=[[0]], output_token_ids=[[3, 3]])
    args = b.op_args()
    assert len(args) == 1 + len(ARRAY_FIELDS) + 3 and args[0] is x
    back = PackedBatch.from_op_args(*args)
    assert back.flags == b.flags and back.n_top == b.n_top == 2 and back.vocab_size == b.vocab_size
    for name, got, want in zip(ARRAY_FIELDS, back.arrays(), b.arrays(), strict=True):
        assert got is want, name
    host = backends.pack_host(x, p, prompt_token_ids=[[0]], output_token_ids=[[3, 3]])
    for name, h, t in zip(ARRAY_FIELDS, host.arrays(), b.arrays(), strict=True):
        assert (h is None) == (t is None), name
        if h is not None:
            assert np.array_equal(h, t.numpy(), equal_nan=h.dtype.kind == "f"), name


def test_pack_batch_refuses_unknown_keywords() -> None:
    x = torch.zeros(1, 4)
    with pytest.raises(TypeError, match="pack_batch\\(\\) got an unexpected keyword argument 'step'"):
        backends.pack_batch(x, SamplingParams(), step=[1])  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="pack_host\\(\\) got an unexpected keyword argument 'seed'"):
        backends.pack_host(x, SamplingParams(), seed=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'step'"):
        fastsampler.sample(x, SamplingParams(), step=[1])  # type: ignore[call-arg]


def test_cpu_build_info_names_the_simd_path() -> None:
    from fastsampler.backends import cpu

    info = cpu.build_info()
    assert set(info) == {"simd", "openmp"}
    if cpu.is_available()[0]:
        assert info["simd"] in ("avx512", "avx2", "portable")
    else:
        assert info["simd"] == "unavailable"
