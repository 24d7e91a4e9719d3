"""Preemption: a request that leaves a `Sampler` and comes back (`Sampler.add` with its tokens, step and mu, or
`Sampler.export` / `Sampler.restore`) draws exactly the tokens of an uninterrupted run, on every backend."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from fastsampler import Sampler, SamplingParams
from fastsampler.sampler import COUNT_MAX, SlotState
from tests.backend_checks import backend_params

V = 96
STEPS = 6
EOS = 3

REQUESTS = [
    SamplingParams(seed=11, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4,
                   presence_penalty=0.2, min_tokens=4, logit_bias={5: 2.0}),
    SamplingParams(seed=12, mirostat_mode=2, mirostat_target=3.0, mirostat_lr=0.3, frequency_penalty=0.5),
    SamplingParams(seed=13, mirostat_mode=1, mirostat_target=4.0, banned_token_ids=[0, 1]),
    SamplingParams(temperature=0.8, min_p=0.05, n=2, seed=14),
]


def _logits(step: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(b, V, generator=g) * 2.5


def _sampler(backend: str, slots: int = 8) -> Sampler:
    return Sampler(V, slots, backend=backend, eos_token_ids=[EOS])


def _run(s: Sampler, slots: list[int], first: int, last: int, tensor: bool = False) -> list[list[int]]:
    """Steps ``first .. last - 1`` of ``slots`` (the logits of a step depend only on the step); ``tensor``: the
    slots as a tensor (the path without host synchronisation)."""
    arg = torch.tensor(slots) if tensor else slots
    return [s.sample(_logits(k, len(slots)), arg).tokens.tolist() for k in range(first, last)]


def _uninterrupted(backend: str) -> tuple[list[list[int]], list[int]]:
    s = _sampler(backend)
    slots = [x for p in REQUESTS for x in s.add(p, prompt_token_ids=[7, 8, 9])]
    return _run(s, slots, 0, STEPS), slots


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cut", [2, 4])
def test_export_restore_continues_exactly(backend: str, cut: int) -> None:
    want, _ = _uninterrupted(backend)
    s = _sampler(backend)
    slots = [x for p in REQUESTS for x in s.add(p, prompt_token_ids=[7, 8, 9])]
    got = _run(s, slots, 0, cut)
    states = [s.export(x) for x in slots]
    s.remove(slots)
    # back into another Sampler, through pickle (a move between workers), into different slot numbers
    t = _sampler(backend, slots=12)
    t.add(SamplingParams(seed=99))  # slot 0 taken: the restored slots land elsewhere
    states = pickle.loads(pickle.dumps(states))
    new = [t.restore(st) for st in states]
    assert new != slots
    got += _run(t, new, cut, STEPS, tensor=cut == 4)
    assert got == want
    for st, x in zip(states, new, strict=True):
        assert t.step_of(x) == STEPS and t.seed_of(x) == st.seed and t.seq_of(x) == st.seq


@pytest.mark.parametrize("backend", backend_params())
def test_add_with_the_tokens_so_far_continues_exactly(backend: str) -> None:
    """Recompute-style preemption: the engine keeps only the generated tokens (and the seed, step and mu it read
    from the Sampler), and adds the request again."""
    want, _ = _uninterrupted(backend)
    cut = 3
    s = _sampler(backend)
    slots = [x for p in REQUESTS for x in s.add(p, prompt_token_ids=[7, 8, 9])]
    got = _run(s, slots, 0, cut)
    history = [[row[i] for row in got] for i in range(len(slots))]
    mus = [s.mirostat_mu_of(x) for x in slots]
    s.reset()
    i = 0
    new: list[int] = []
    for p in REQUESTS:
        if p.n == 1:
            mu = None if math.isnan(mus[i]) else mus[i]
            new += s.add(p, prompt_token_ids=[7, 8, 9], output_token_ids=history[i], mirostat_mu=mu)
            i += 1
        else:  # samples of one request with different histories come back one by one (export / restore)
            for j in range(p.n):
                st = SlotState(params=p, seed=p.seed, seq=j, step=cut, mirostat_mu=mus[i],
                               output_counts=np.bincount(history[i], minlength=V).astype(np.int16),
                               prompt_mask=s.prompt_mask_of(new[0]).numpy())
                new.append(s.restore(st))
                i += 1
    got += _run(s, new, cut, STEPS)
    assert got == want


def test_add_state_arguments_are_checked() -> None:
    s = _sampler("reference")
    with pytest.raises(ValueError, match=r"output_token_ids holds token id 96, outside the vocabulary \[0, 96\)"):
        s.add(SamplingParams(), output_token_ids=[1, 96])
    with pytest.raises(TypeError, match="output_token_ids must hold integer token ids"):
        s.add(SamplingParams(), output_token_ids=[1.5])
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, "):
        s.add(SamplingParams(), step=-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        s.add(SamplingParams(), step=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mirostat_mu is the state of a Mirostat request"):
        s.add(SamplingParams(), mirostat_mu=3.0)
    with pytest.raises(ValueError, match="mirostat_mu must not be NaN"):
        s.add(SamplingParams(mirostat_mode=2), mirostat_mu=float("nan"))
    with pytest.raises(TypeError, match="mirostat_mu must be a float"):
        s.add(SamplingParams(mirostat_mode=2), mirostat_mu="3")  # type: ignore[arg-type]
    assert s.num_active == 0  # nothing was taken by a refused add


def test_add_state_defaults_and_saturation() -> None:
    s = _sampler("reference")
    a = s.add(SamplingParams(mirostat_mode=2, mirostat_target=2.0), output_token_ids=[4] * 40000 + [5, 5])[0]
    assert s.step_of(a) == 40002 and s.mirostat_mu_of(a) == 4.0
    counts = s.output_counts_of(a)
    assert counts[4].item() == COUNT_MAX and counts[5].item() == 2 and counts.sum().item() == COUNT_MAX + 2
    b = s.add(SamplingParams(mirostat_mode=2), output_token_ids=torch.tensor([1, 2]), step=10, mirostat_mu=1.5)[0]
    assert s.step_of(b) == 10 and s.mirostat_mu_of(b) == 1.5 and s.output_counts_of(b).sum().item() == 2
    c = s.add(SamplingParams())[0]
    assert s.step_of(c) == 0 and s.output_counts_of(c).sum().item() == 0


def test_restore_is_checked() -> None:
    s = _sampler("reference", slots=1)
    slot = s.add(SamplingParams(seed=1))[0]
    st = s.export(slot)
    with pytest.raises(ValueError, match="Sampler is full"):
        s.restore(st)
    with pytest.raises(TypeError, match="state must be a SlotState"):
        s.restore({"seed": 1})  # type: ignore[arg-type]
    other = Sampler(V + 1, 2, backend="reference")
    with pytest.raises(ValueError, match="this Sampler has vocab_size=97"):
        other.restore(st)
    small = Sampler(8, 2, backend="reference")
    with pytest.raises(ValueError, match="this Sampler has vocab_size=8"):
        small.restore(st)
    s.remove(slot)
    with pytest.raises(ValueError, match="not in use"):
        s.export(slot)
    st2 = SlotState(params=SamplingParams(banned_token_ids=[90]), seed=1, seq=0, step=0, mirostat_mu=math.nan,
                    output_counts=np.zeros(64, np.int16), prompt_mask=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="banned_token_ids"):
        Sampler(64, 1, backend="reference").restore(st2)


def test_an_eos_rule_without_eos_ids_is_refused() -> None:
    s = Sampler(V, 2, backend="reference")
    with pytest.raises(ValueError, match=r"params.min_tokens=2 bans the EOS ids, but this Sampler has none"):
        s.add(SamplingParams(min_tokens=2))
    with pytest.raises(ValueError, match=r"params.ignore_eos=True bans the EOS ids"):
        s.add(SamplingParams(ignore_eos=True))
    assert s.num_active == 0
    ok = _sampler("reference")
    slot = ok.add(SamplingParams(min_tokens=2))[0]
    state = ok.export(slot)
    with pytest.raises(ValueError, match="bans the EOS ids"):
        s.restore(state)
