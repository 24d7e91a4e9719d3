"""torch integration: ``fastsampler::sample_packed`` as a custom op, torch.compile of a model step that samples, and
CUDA-graph capture of `Sampler.sample` (CUDA only).

Compiled steps run next to an eager twin (same requests, same seeds) and must give the same tokens and state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastsampler
from fastsampler import Sampler, SamplingParams
from fastsampler._api import available_backends
from fastsampler._batch import ids_to_bitmask, pack_batch
from fastsampler._custom_ops import sample_packed
from fastsampler.layout import flags_to_int, int_to_flags

BACKENDS = available_backends()
V = 50


def _op_args(batch, backend: str = "reference") -> tuple:
    return (*batch.op_args(), backend)


def _dev(backend: str) -> torch.device:
    """Triton runs on CUDA when present (else in the interpreter on the CPU); the others on the CPU."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _batch(b: int = 3, dev: torch.device | str = "cpu"):
    g = torch.Generator().manual_seed(0)
    params = [SamplingParams(seed=1, top_p=0.9, logit_bias={2: 1.0}, repetition_penalty=1.2),
              SamplingParams(seed=2, mirostat_mode=2, logprobs=True, top_logprobs=4),
              SamplingParams(seed=3, temperature=0.0, banned_token_ids=[0])][:b]
    return pack_batch(torch.randn(b, V, generator=g).to(dev), params, prompt_token_ids=[[1, 2]] * b,
                      output_token_ids=[[3]] * b, eos_token_ids=[0])


def test_op_is_registered_with_its_schema() -> None:
    schema = str(torch.ops.fastsampler.sample_packed.default._schema)
    assert schema.startswith("fastsampler::sample_packed(Tensor logits, Tensor fparams")
    assert "Tensor? allowed_mask" in schema and "str backend" in schema
    assert schema.endswith("-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def test_flags_round_trip() -> None:
    batch = _batch()
    assert int_to_flags(flags_to_int(batch.flags)) == batch.flags
    assert flags_to_int(int_to_flags(0)) == 0


def test_opcheck() -> None:
    """Schema, fake implementation and AOT dispatch agree with the real implementation.

    opcheck compares outputs with NaN != NaN, so every row here asks for logprobs and runs Mirostat (no NaN out).
    """
    params = [SamplingParams(seed=1, mirostat_mode=2, logit_bias={2: 1.0}, repetition_penalty=1.2, logprobs=True,
                             top_logprobs=2),
              SamplingParams(seed=2, mirostat_mode=1, banned_token_ids=[0], logprobs=True, top_logprobs=2)]
    batch = pack_batch(torch.randn(2, V, generator=torch.Generator().manual_seed(0)), params,
                       prompt_token_ids=[[1, 2]] * 2, output_token_ids=[[3]] * 2, eos_token_ids=[0])
    torch.library.opcheck(torch.ops.fastsampler.sample_packed.default, _op_args(batch))


def test_fake_impl_shapes() -> None:
    batch = _batch()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _op_args(batch)]
        out = torch.ops.fastsampler.sample_packed(*args)
    want = [((3,), torch.int64), ((3,), torch.bool), ((3,), torch.float32), ((3, 4), torch.int64),
            ((3, 4), torch.float32), ((3,), torch.int64), ((3,), torch.float32)]
    assert [(tuple(o.shape), o.dtype) for o in out] == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_output_matches_the_backend_and_never_aliases_inputs(backend: str) -> None:
    batch = _batch(1, _dev(backend))  # no mirostat row: mu passes through (NaN), and must come back as a fresh tensor
    out = sample_packed(backend, batch)
    direct = fastsampler.backends.load(backend).sample_packed(batch)
    assert torch.equal(out.tokens, direct.tokens)
    assert out.mirostat_mu.untyped_storage().data_ptr() != batch.mirostat_mu.untyped_storage().data_ptr()
    assert [t.dtype for t in out] == [torch.int64, torch.bool, torch.float32, torch.int64, torch.float32,
                                      torch.int64, torch.float32]


def _spy_op(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = torch.ops.fastsampler.sample_packed

    class Spy:
        def __call__(self, *a, **k):
            calls.append(a[-1])
            return real(*a, **k)

    monkeypatch.setattr(torch.ops.fastsampler, "sample_packed", Spy())
    return calls


@pytest.mark.parametrize("backend", ["reference", *(["cpu"] if "cpu" in BACKENDS else [])])
def test_eager_calls_skip_the_op(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Outside tracing both APIs call the backend directly (the op's dispatch costs tens of µs per step)."""
    calls = _spy_op(monkeypatch)
    out = fastsampler.sample(torch.tensor([[0.0, 3.0, 1.0]]), SamplingParams(temperature=0.0), backend=backend)
    assert out.tokens.tolist() == [1]
    s = Sampler(3, 2, backend=backend)
    slots = s.add(SamplingParams(temperature=0.0))
    assert s.sample(torch.tensor([[0.0, 3.0, 1.0]]), slots).tokens.tolist() == [1]
    assert s.sample(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor(slots)).tokens.tolist() == [1]
    assert calls == []


def test_use_op_only_while_tracing() -> None:
    from fastsampler._custom_ops import use_op

    x = torch.zeros(2, 3)
    assert not use_op(x)
    with FakeTensorMode() as mode:
        assert use_op(mode.from_tensor(x))
        assert use_op(torch.empty(2, 3))  # a dispatch mode is active

    seen = []

    def f(t):
        seen.append(use_op(t))
        return t + 1

    torch.compile(f, fullgraph=True, backend="eager")(x)
    assert seen == [True]


def test_functional_sample_goes_through_the_op_under_compile() -> None:
    """Traced by torch.compile, the step holds the custom op (what CUDA graphs and inductor need)."""
    targets: list[str] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    params = SamplingParams(temperature=0.0, seed=1)

    def step(x):
        return fastsampler.sample(x * 1.0, params, backend="reference").tokens

    x = torch.tensor([[0.0, 3.0, 1.0]])
    assert torch.compile(step, backend=record)(x).tolist() == [1]
    assert any("fastsampler.sample_packed" in t for t in targets), targets


def test_compile_op_fullgraph() -> None:
    """The op alone, traced by dynamo + AOT autograd (fake implementation) without a graph break."""
    batch = _batch()
    args = _op_args(batch)

    def f(logits, *rest):
        return torch.ops.fastsampler.sample_packed(logits * 2.0, *rest)

    eager = f(*args)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, equal_nan=True))


@pytest.mark.filterwarnings("ignore::fastsampler.SeedWithoutStepsWarning")  # one seeded draw at step 0, on purpose
def test_compile_functional_sample() -> None:
    """`fastsampler.sample` inside a compiled function (host packing graph-breaks; the result is unchanged)."""
    lin = torch.nn.Linear(8, V)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(seed=5, top_k=10), SamplingParams(seed=6, temperature=0.0, logprobs=True)]

    @torch.no_grad()
    def step(x):
        return fastsampler.sample(lin(x), params, output_token_ids=[[1], [2, 2]], backend="reference")

    eager = step(x)
    compiled = torch.compile(step, backend="aot_eager")(x)
    assert torch.equal(eager.tokens, compiled.tokens)
    assert torch.allclose(eager.logprobs, compiled.logprobs, equal_nan=True)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 16)
        self.head = torch.nn.Linear(16, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(tokens))) * 3.0


def _requests(sampler: Sampler) -> list[int]:
    slots = []
    slots += sampler.add(SamplingParams(seed=1, top_p=0.9, frequency_penalty=0.7, repetition_penalty=1.3), [4, 5])
    slots += sampler.add(SamplingParams(seed=2, temperature=0.0, logprobs=True, top_logprobs=3))
    slots += sampler.add(SamplingParams(seed=3, mirostat_mode=2, logit_bias={7: 2.0, 9: -1.0}))
    slots += sampler.add(SamplingParams(seed=4, typical_p=0.8, allowed_token_ids=range(10, 40), n=2))
    return slots


def _run_twins(compile_backend: str, backend: str, steps: int, *, bitmask: bool) -> None:
    dev = _dev(backend)
    model = _Model().to(dev)
    eager_s, comp_s = (Sampler(V, 8, dev, eos_token_ids=[0], backend=backend) for _ in range(2))
    slots = _requests(eager_s)
    assert _requests(comp_s) == slots
    tb = None
    if bitmask:
        tb = torch.from_numpy(ids_to_bitmask([range(0, 45)] * (len(slots) + 1), V))

    def step(sampler: Sampler, tokens: torch.Tensor, slots_t: torch.Tensor):
        logits = model(tokens)
        out = sampler.sample(logits, slots_t, token_bitmask=None if tb is None else tb[: slots_t.shape[0]])
        return out.tokens, out.logprobs, out.top_logprob_ids, out.mirostat_mu

    cstep = torch.compile(step, fullgraph=True, backend=compile_backend)
    slots_t = torch.tensor(slots, device=dev)
    te = tc = torch.tensor([1, 2, 3, 4, 5], device=dev)
    with torch.no_grad():
        for _ in range(steps):
            a = step(eager_s, te, slots_t)
            b = cstep(comp_s, tc, slots_t)
            assert torch.equal(a[0], b[0]), (a[0], b[0])
            assert torch.allclose(a[1], b[1], equal_nan=True) and torch.equal(a[2], b[2])
            assert torch.allclose(a[3], b[3], equal_nan=True)
            te, tc = a[0].clamp(min=0), b[0].clamp(min=0)
    # a request joins with new features (wider top logprobs): the guards on the host state recompile the step
    for s_ in (eager_s, comp_s):
        s_.add(SamplingParams(seed=9, logprobs=True, top_logprobs=5, presence_penalty=0.5))
    slots_t = torch.tensor([*slots, 5], device=dev)
    tok = torch.tensor([1, 2, 3, 4, 5, 6], device=dev)
    with torch.no_grad():
        a = step(eager_s, tok, slots_t)
        b = cstep(comp_s, tok, slots_t)
    assert b[2].shape == (6, 5) and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    for name in ("steps", "counts", "mu"):
        want, got = getattr(eager_s._tables, name), getattr(comp_s._tables, name)
        assert torch.equal(want, got) or torch.allclose(want, got, equal_nan=True), name
    assert int(comp_s._tables.steps[slots].min()) == steps + 1
    if bitmask:
        assert int(comp_s._tables.counts[:, 45:].sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_model_step_with_sampler_fullgraph(backend: str) -> None:
    """Model forward + `Sampler.sample` (device-tensor slots) in one graph, state updated in place."""
    steps = 1 if backend == "triton" and not torch.cuda.is_available() else 4
    _run_twins("aot_eager", backend, steps, bitmask=backend == "reference")


def test_compile_model_step_with_sampler_inductor() -> None:
    """The same with the default (inductor) compiler: one run, the costly compile happens once."""
    _run_twins("inductor", "reference", 2, bitmask=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.skipif("triton" not in BACKENDS, reason="graph capture needs a device backend (triton)")
def test_cuda_graph_capture_of_sampler_step() -> None:
    """Capture `Sampler.sample` (tensor slots) once, replay it, and follow an eager twin token for token."""
    dev = torch.device("cuda")
    eager_s, graph_s = (Sampler(V, 8, dev, eos_token_ids=[0], backend="triton") for _ in range(2))
    slots = _requests(eager_s)
    assert _requests(graph_s) == slots
    slots_t = torch.tensor(slots, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    static_logits = torch.randn(len(slots), V, device=dev, generator=g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (kernel compilation, allocator) on a twin so graph_s stays at step 0
        warm = Sampler(V, 8, dev, eos_token_ids=[0], backend="triton")
        _requests(warm)
        for _ in range(2):
            warm.sample(static_logits, slots_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graph_s.sample(static_logits, slots_t)
    graph_s._tables.steps.zero_()  # capture ran nothing; make sure nothing advanced either way
    graph_s._tables.counts.zero_()
    graph_s._tables.mu.copy_(eager_s._tables.mu)
    for _ in range(4):
        static_logits.copy_(torch.randn(len(slots), V, device=dev, generator=g))
        graph.replay()
        ref = eager_s.sample(static_logits, slots_t)
        assert torch.equal(static_out.tokens, ref.tokens)
        assert torch.allclose(static_out.mirostat_mu, ref.mirostat_mu, equal_nan=True)
    assert torch.equal(graph_s._tables.counts, eager_s._tables.counts)
    assert torch.equal(graph_s._tables.steps, eager_s._tables.steps)
    assert np.all(graph_s._tables.steps[slots].cpu().numpy() == 4)
