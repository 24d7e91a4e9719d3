"""Per-request ``stop_token_ids``: banned while fewer than ``min_tokens`` tokens have been generated (as EOS ids are),
and reported in ``SampleOutput.stopped`` when sampled, in the functional API and in a `Sampler`, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams, reference
from tests.backend_checks import backend_device, backend_params

V = 40
EOS = 3
STOP = (7, 11)


def _logits(b: int) -> torch.Tensor:
    """Rows that prefer stop id 7, then 11, then EOS, then 20."""
    x = torch.zeros(b, V)
    x[:, 7], x[:, 11], x[:, EOS], x[:, 20] = 9.0, 8.0, 7.0, 6.0
    return x


def test_params_validate_and_normalise_stop_ids() -> None:
    p = SamplingParams(stop_token_ids=[11, 7, 11])
    assert p.stop_token_ids == (7, 11) and p.to_dict()["stop_token_ids"] == [7, 11]
    assert SamplingParams().stop_token_ids is None
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(TypeError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[1.5])
    with pytest.raises(ValueError, match="stop_token_ids of row 0 holds token id 50"):
        fastsampler.sample(torch.zeros(1, V), SamplingParams(stop_token_ids=[50]), steps=[0])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("device_steps", [False, True], ids=["host_steps", "tensor_steps"])
def test_stop_ids_are_banned_before_min_tokens(backend: str, device_steps: bool) -> None:
    dev = backend_device(backend)
    rows = [SamplingParams(temperature=0.0, stop_token_ids=STOP, min_tokens=3),
            SamplingParams(temperature=0.0, stop_token_ids=STOP, min_tokens=3, ignore_eos=True),
            SamplingParams(temperature=0.0, stop_token_ids=[11], min_tokens=0),
            SamplingParams(temperature=0.0)]
    for step in (0, 2, 3):
        steps = [step] * 4
        kw = dict(steps=torch.tensor(steps, device=dev) if device_steps else steps, eos_token_ids=[EOS],
                  backend=backend)
        out = fastsampler.sample(_logits(4).to(dev), rows, **kw)
        want = reference.sample(_logits(4).numpy(), rows, steps=steps, eos_token_ids=[EOS])
        got = out.tokens.cpu().tolist()
        assert got == want.tokens.tolist()
        if step < 3:  # stop ids and EOS banned (row 1: EOS always), row 2 bans nothing (min_tokens 0)
            assert got == [20, 20, 7, 7]
        else:
            assert got == [7, 7, 7, 7]
        # 7 ends rows 0 and 1 (their stop ids) and not rows 2 and 3; 20 ends nothing
        assert out.stopped.cpu().tolist() == ([False, False, False, False] if step < 3 else [True, True, False, False])
        np.testing.assert_array_equal(out.stopped.cpu().numpy(), want.stopped)


def test_stopped_reports_eos_unless_ignored_and_is_none_without_stop_ids() -> None:
    x = torch.full((3, V), -5.0)
    x[:, EOS] = 5.0
    rows = [SamplingParams(temperature=0.0, stop_token_ids=[7]), SamplingParams(temperature=0.0),
            SamplingParams(temperature=0.0, stop_token_ids=[7], ignore_eos=True)]
    out = fastsampler.sample(x, rows, eos_token_ids=[EOS])
    assert out.tokens.tolist() == [EOS, EOS, 0] and out.stopped.tolist() == [True, True, False]
    plain = fastsampler.sample(x, SamplingParams(temperature=0.0), eos_token_ids=[EOS])
    assert plain.stopped is None
    assert fastsampler.sample(x.numpy(), rows, eos_token_ids=[EOS]).stopped.tolist() == [True, True, False]


def test_sampling_probs_respects_the_ban() -> None:
    p = fastsampler.sampling_probs(_logits(2), SamplingParams(stop_token_ids=STOP, min_tokens=2), steps=[1, 2],
                                   eos_token_ids=[EOS])
    assert p[0, 7] == 0 and p[0, 11] == 0 and p[0, EOS] == 0 and p[1, 7] > 0


def _run(s: Sampler, slots, steps: int, how: str, dev: torch.device) -> tuple[list, list]:
    toks, stops = [], []
    for _ in range(steps):
        x = _logits(len(slots))
        if how == "numpy":
            out = s.sample(x.numpy(), list(slots))
        else:
            out = s.sample(x.to(dev), torch.tensor(slots, device=dev) if how == "tensor" else list(slots))
        toks.append(np.asarray(out.tokens.tolist()))
        stops.append(np.asarray(out.stopped.tolist()))
    return np.stack(toks, 1).tolist(), np.stack(stops, 1).tolist()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("how", ["list", "tensor", "numpy"])
def test_sampler_bans_then_reports_stop_ids(backend: str, how: str) -> None:
    dev = backend_device(backend)
    if how == "numpy" and dev.type != "cpu":
        pytest.skip("numpy logits: a CPU sampler")
    s = Sampler(V, 4, device=dev, backend=backend, eos_token_ids=[EOS])
    plain = s.add(SamplingParams(temperature=0.0))[0]  # before the stop tables exist
    a = s.add(SamplingParams(temperature=0.0, stop_token_ids=STOP, min_tokens=2))[0]
    b = s.add(SamplingParams(temperature=0.0, stop_token_ids=[11], min_tokens=1, ignore_eos=True,
                             banned_token_ids=[7]))[0]
    toks, stops = _run(s, [plain, a, b], 3, how, dev)
    assert toks == [[7, 7, 7], [20, 20, 7], [20, 11, 11]]
    assert stops == [[False, False, False], [False, False, True], [False, True, True]]
    assert [s.step_of(x) for x in (plain, a, b)] == [3, 3, 3]


@pytest.mark.parametrize("backend", backend_params())
def test_sampler_sampling_probs_and_restore_keep_the_ban(backend: str) -> None:
    dev = backend_device(backend)
    s = Sampler(V, 2, device=dev, backend=backend, eos_token_ids=[EOS])
    a = s.add(SamplingParams(temperature=0.0, stop_token_ids=STOP, min_tokens=2), output_token_ids=[20])[0]
    p = s.sampling_probs(_logits(1).to(dev), [a]).cpu()
    assert p[0, 20] == 1
    state = s.export(a)
    s.remove(a)
    t = Sampler(V, 2, device=dev, backend=backend, eos_token_ids=[EOS])
    b = t.restore(state)
    assert t.sampling_probs(_logits(1).to(dev), [b]).cpu()[0, 7] == 0  # still at step 1 < min_tokens
    assert t.sample(_logits(1).to(dev), [b]).tokens.item() == 20
    assert t.sampling_probs(_logits(1).to(dev), [b]).cpu()[0, 7] == 1  # step 2: allowed
    with pytest.raises(ValueError, match="stop_token_ids holds token id 99"):
        t.add(SamplingParams(stop_token_ids=[99]))


@pytest.mark.parametrize("backend", backend_params())
def test_verify_ends_a_row_at_a_stop_token(backend: str) -> None:
    dev = backend_device(backend)
    s = Sampler(V, 2, device=dev, backend=backend, eos_token_ids=[EOS])
    a = s.add(SamplingParams(temperature=0.0, stop_token_ids=[11]))[0]
    c = s.add(SamplingParams(temperature=0.0))[0]
    x = torch.zeros(2, 4, V)
    x[:, :, 20] = 5.0
    x[:, 1, 11] = 9.0  # position 1 prefers the stop id
    out = s.verify(x.to(dev), [[20, 11, 20], [20, 11, 20]], [a, c])
    assert out.tokens.cpu().tolist() == [[20, 11, -1, -1], [20, 11, 20, 20]]
    assert out.num_accepted.cpu().tolist() == [2, 3] and out.stopped.cpu().tolist() == [True, False]
    assert s.step_of(a) == 2 and s.step_of(c) == 4
    want = reference.verify(x, [[20, 11, 20], [20, 11, 20]], [s.params_of(a), s.params_of(c)], eos_token_ids=[EOS])
    np.testing.assert_array_equal(out.tokens.cpu().numpy(), want.tokens)
    np.testing.assert_array_equal(out.stopped.cpu().numpy(), want.stopped)
