"""The engine author's frictions (issue 13, items 4 and 5): the warning for a seeded functional call without ``steps``,
numpy logits in `Sampler.sample`, backend / device checks at `Sampler` construction, the hint for
``logprobs=<int>``, and `Sampler`'s repr."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams, SeedWithoutStepsWarning
from tests.backend_checks import triton_available

V = 64
CPU_BACKENDS = [b for b in ("reference", "cpu") if b in fastsampler.available_backends()]


def _logits(b: int, seed: int = 0, v: int = V) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed))


def _seed_warnings(rec: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in rec if issubclass(w.category, SeedWithoutStepsWarning)]


# ------------------------------------------------------------------ seeded calls without steps


def test_seed_warning_is_an_exported_user_warning() -> None:
    assert issubclass(SeedWithoutStepsWarning, UserWarning)
    assert "SeedWithoutStepsWarning" in fastsampler.__all__
    assert fastsampler.SeedWithoutStepsWarning is fastsampler._api.SeedWithoutStepsWarning


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["one_params", "one_seeded_row", "seeds_tensor", "numpy", "iterator"])
def test_seeded_call_without_steps_warns(backend: str, case: str) -> None:
    x = _logits(3)
    kw: dict = {"backend": backend}
    params: object = SamplingParams(seed=42)
    if case == "one_seeded_row":
        params = [SamplingParams(), SamplingParams(seed=1), SamplingParams(temperature=0.5)]
    elif case == "seeds_tensor":
        params = SamplingParams()
        kw["seeds"] = torch.tensor([1, 2, 3])
    elif case == "numpy":
        x = x.numpy()
    elif case == "iterator":
        params = iter([SamplingParams(seed=1)] * 3)
    with pytest.warns(SeedWithoutStepsWarning, match=r"no steps.*Pass steps .*fastsampler\.Sampler") as rec:
        out = fastsampler.sample(x, params, **kw)
    assert len(out.tokens) == 3
    assert rec[0].filename == __file__  # stacklevel: the caller's line, so the default filter shows it once there


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_warning_with_steps_unseeded_or_sampling_probs(backend: str) -> None:
    x = _logits(2)
    seeded = SamplingParams(seed=42)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SeedWithoutStepsWarning)
        fastsampler.sample(x, seeded, steps=[0, 0], backend=backend)
        fastsampler.sample(x, seeded, steps=torch.tensor([3, 4]), backend=backend)
        fastsampler.sample(x, SamplingParams(), seeds=torch.tensor([1, 2]), steps=[1, 1], backend=backend)
        fastsampler.sample(x, SamplingParams(), backend=backend)  # a fresh random seed per call: no repeat
        fastsampler.sample(x, [SamplingParams(), SamplingParams(temperature=0.0)], backend=backend)
        fastsampler.sample(x[:0], seeded, backend=backend)  # no rows
        fastsampler.sample(x[:0], [], backend=backend)
        fastsampler.sampling_probs(x, seeded, backend=backend)  # no noise drawn
        fastsampler.reference.sample(x.numpy(), [seeded, seeded])  # the reference is left as it is


def test_warning_once_per_call_site_under_the_default_filter() -> None:
    """The footgun of the issue: five seeded calls without steps repeat their noise; the default filter reports it
    once for the loop's call site."""
    x = _logits(1, v=50000)  # flat-ish logits: the noise decides the token
    p = SamplingParams(seed=42)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        tokens = [int(fastsampler.sample(x, p).tokens[0]) for _ in range(5)]
    assert len(set(tokens)) == 1  # the documented behaviour without steps: step 0 every call
    assert len(_seed_warnings(rec)) == 1
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("default")
        tokens = [int(fastsampler.sample(x, p, steps=[i]).tokens[0]) for i in range(5)]
    assert len(set(tokens)) > 1 and not _seed_warnings(rec)


def test_mixed_list_is_remembered_per_param_batch() -> None:
    """A list with some seeded rows is scanned once (the result is kept with its cached `ParamBatch`)."""
    from fastsampler import _api

    x = _logits(2)
    plist = [SamplingParams(), SamplingParams(seed=3)]
    unseeded = [SamplingParams(), SamplingParams(temperature=0.3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            fastsampler.sample(x, plist)
            fastsampler.sample(x, unseeded)
    assert len(_seed_warnings(rec)) == 3
    assert _api._has_seeded_row(plist, 2) and not _api._has_seeded_row(unseeded, 2)


def test_no_warning_while_torch_compile_traces() -> None:
    x = _logits(2)
    p = SamplingParams(seed=42)

    def step(logits: torch.Tensor) -> torch.Tensor:
        return fastsampler.sample(logits, p).tokens

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        compiled = torch.compile(step, backend="eager")
        a, b = compiled(x), compiled(x)
    assert torch.equal(a, b)
    assert not _seed_warnings(rec)


# ------------------------------------------------------------------ numpy logits in Sampler.sample


def _twins(backend: str = "auto") -> tuple[Sampler, Sampler, list[int]]:
    a, b = (Sampler(V, 4, backend=backend, eos_token_ids=[0]) for _ in range(2))
    slots = []
    for p in (SamplingParams(seed=1, logprobs=True, top_logprobs=3, frequency_penalty=0.5),
              SamplingParams(seed=2, top_k=5), SamplingParams(temperature=0.0)):
        assert a.add(p, [1, 2, 3]) == b.add(p, [1, 2, 3])
        slots.append(a.active_slots[-1])
    return a, b, slots


@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
@pytest.mark.parametrize("slot_form", ["list", "tensor", "gapped"])
def test_sampler_takes_numpy_logits(backend: str, slot_form: str) -> None:
    a, b, slots = _twins(backend)
    if slot_form == "gapped":
        a.remove(slots[1])
        b.remove(slots[1])
        slots = [slots[2], slots[0]]
    for step in range(4):
        x = _logits(len(slots), seed=step)
        arg = torch.tensor(slots) if slot_form == "tensor" else slots
        got = a.sample(x.numpy(), arg)
        want = b.sample(x, arg)
        for name in (f.name for f in dataclasses.fields(want)):
            g, w = getattr(got, name), getattr(want, name)
            if w is None:  # (stopped: no stop ids here)
                assert g is None, name
                continue
            assert isinstance(g, np.ndarray), name
            np.testing.assert_array_equal(g, w.numpy(), err_msg=name)
    for s in slots:
        assert a.step_of(s) == b.step_of(s) == 4
        assert torch.equal(a.output_counts_of(s), b.output_counts_of(s))


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64])
def test_sampler_numpy_dtypes_and_no_copy(np_dtype: type) -> None:
    s = Sampler(V, 2)
    slots = s.add(SamplingParams(seed=5))
    x = _logits(1).numpy().astype(np_dtype)
    before = x.copy()
    seen = []
    listed = s._sample_listed

    def spy(logits: torch.Tensor, *args: object) -> object:
        seen.append(logits)
        return listed(logits, *args)

    s._sample_listed = spy  # type: ignore[method-assign]
    out = s.sample(x, slots)
    assert isinstance(out.tokens, np.ndarray) and out.tokens.shape == (1,)
    (t,) = seen
    assert t.dtype == torch.from_numpy(x).dtype and t.data_ptr() == x.ctypes.data  # shares the array's memory
    np.testing.assert_array_equal(x, before)  # never modified
    want = fastsampler.sample(torch.from_numpy(x), SamplingParams(seed=5), steps=[0], backend=s.backend_for(t.dtype))
    assert out.tokens.tolist() == want.tokens.tolist()


def test_sampler_refuses_other_logits() -> None:
    s = Sampler(V, 2)
    slots = s.add(SamplingParams())
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64, got int64"):
        s.sample(np.zeros((1, V), dtype=np.int64), slots)
    with pytest.raises(TypeError, match=r"logits must be a torch\.Tensor \(or a numpy array on a CPU sampler\), got "
                                        r"list"):
        s.sample([[0.0] * V], slots)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"logits must have shape \(1, >= 64\)"):
        s.sample(np.zeros((1, V - 1), dtype=np.float32), slots)


def test_non_cpu_sampler_refuses_numpy_logits() -> None:
    dev = "cuda" if torch.cuda.is_available() else "meta"  # meta: a non-CPU device that needs no GPU
    s = Sampler(V, 2, device=dev, backend="reference")
    slots = s.add(SamplingParams())
    with pytest.raises(TypeError, match=r"torch\.Tensor on the sampler's device .*got a numpy array"):
        s.sample(np.zeros((1, V), dtype=np.float32), slots)


# ------------------------------------------------------------------ backend / device checks at construction


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU without the Triton interpreter")
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_triton_sampler_on_cpu_without_interpreter_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' does not support device cpu .*TRITON_INTERPRET=1"):
        Sampler(V, 2, backend="triton")
    with pytest.raises(ValueError, match="does not support"):  # the functional API: the same error type
        fastsampler.sample(_logits(1), SamplingParams(), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_cuda_device_without_cuda_is_a_value_error(device: str, backend: str) -> None:
    with pytest.raises(ValueError, match=f"device={device.split(':')[0]!r}.*needs CUDA, which is not available here"
                       if device == "cuda" else f"device={device!r} needs CUDA"):
        Sampler(V, 2, device=device, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_checks() -> None:
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"device='cuda:{n}' does not exist"):
        Sampler(V, 2, device=f"cuda:{n}")
    with pytest.raises(ValueError, match=r"backend='cpu' does not support device cuda:0"):
        Sampler(V, 2, device="cuda", backend="cpu")


def test_unsupported_dtype_is_a_value_error_as_in_the_functional_api() -> None:
    if "cpu" not in fastsampler.available_backends():
        pytest.skip("the C++ backend is not available here")
    s = Sampler(V, 2, backend="cpu")
    slots = s.add(SamplingParams())
    x = _logits(1).double()
    with pytest.raises(ValueError, match="backend='cpu' does not support logits of dtype torch.float64") as got:
        s.sample(x, slots)
    with pytest.raises(ValueError, match="does not support") as want:
        fastsampler.sample(x, SamplingParams(), backend="cpu")
    assert type(got.value) is type(want.value)
    with pytest.raises(ValueError, match="does not support logits of dtype torch.float64"):
        s.backend_for(torch.float64)
    with pytest.raises(ValueError, match="does not support"):
        s.sample(x.numpy(), slots)


# ------------------------------------------------------------------ logprobs=<int>


@pytest.mark.parametrize("n", [2, 5, 20])
def test_logprobs_int_points_to_top_logprobs(n: int) -> None:
    msg = f"logprobs is a bool; for the top {n} tokens pass logprobs=True, top_logprobs={n}"
    with pytest.raises(TypeError, match=re.escape(msg)):
        SamplingParams(logprobs=n)
    p = SamplingParams(logprobs=True, top_logprobs=n)  # what the hint says works
    assert p.logprobs is True and p.top_logprobs == n


@pytest.mark.parametrize("value, match", [
    (1, "for the top 1 token pass logprobs=True, top_logprobs=1"),
    (np.int64(5), "for the top 5 tokens pass logprobs=True, top_logprobs=5"),
    (50, "top_logprobs=N, N at most 20"),
    (0, r"logprobs must be a bool, got 0 of type int \(True returns the sampled token.s logprob"),
    ("yes", "logprobs must be a bool, got .yes. of type str"),
    (1.0, "logprobs must be a bool, got 1.0 of type float"),
    (None, "logprobs must be a bool, got None"),
])
def test_logprobs_non_bool_errors(value: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        SamplingParams(logprobs=value)  # type: ignore[arg-type]


# ------------------------------------------------------------------ repr


def test_sampler_repr() -> None:
    s = Sampler(V, 4, eos_token_ids=[0, 7], backend="reference")
    assert repr(s) == ("Sampler(vocab_size=64, max_slots=4, device='cpu', backend='reference', active=0, "
                       "eos_token_ids=(0, 7))")
    s.add(SamplingParams(n=3))
    assert "active=3" in repr(s)
    auto = Sampler(V, 1)
    assert re.fullmatch(r"Sampler\(vocab_size=64, max_slots=1, device='cpu', backend='auto' \((cpu|reference) for "
                        r"float32\), active=0, eos_token_ids=\(\)\)", repr(auto)), repr(auto)
    many = Sampler(V, 1, eos_token_ids=list(range(20)), backend="reference")
    assert "eos_token_ids=(0, 1, 2, 3, 4, 5, 6, 7, ... 20 ids)" in repr(many)
