"""`fastsampler.Sampler`: device-side state, agreement with the reference, reproducibility, errors.

Every test that samples runs on each available backend (``available_backends()``; Triton under
``TRITON_INTERPRET=1`` on the CPU, so the shapes stay tiny). The reference comparison feeds
`fastsampler.reference` the equivalent explicit state (prompt / output histories, steps, seqs, Mirostat ``mu``).
"""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastsampler
from fastsampler import Sampler, SamplingParams, reference
from fastsampler._api import available_backends
from fastsampler._batch import ids_to_bitmask
from fastsampler.sampler import COUNT_MAX
from tests.strategies import logits_rows, sampling_params

BACKENDS = available_backends()
HOST_BACKENDS = [b for b in BACKENDS if b != "triton"]  # state on the CPU
V = 70  # three mask words, the last one partial (bit layout across a word boundary)
EOS = 1


def _dev(backend: str) -> torch.device:
    """Where a backend's sampler lives: Triton on CUDA when present (else the interpreter on the CPU)."""
    return torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")


def _steps(backend: str, n: int) -> int:
    return min(n, 3) if backend == "triton" and not torch.cuda.is_available() else n


def _mix() -> list[SamplingParams]:
    """One request of each kind; n = 2 on one of them (two slots sharing a seed)."""
    return [
        SamplingParams(seed=11, temperature=0.0, logprobs=True, top_logprobs=2),
        SamplingParams(seed=12, top_p=0.8, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3,
                       logprobs=True, logprobs_mode="processed"),
        SamplingParams(seed=13, typical_p=0.7, logit_bias={3: 4.0, 9: -2.0, 40: -math.inf}, min_tokens=2),
        SamplingParams(seed=14, mirostat_mode=2, mirostat_target=3.0, logprobs=True, top_logprobs=3,
                       logprobs_mode="final"),
        SamplingParams(seed=2**64 - 15, top_k=5, min_p=0.05, allowed_token_ids=range(0, 40), banned_token_ids=[2],
                       n=2, frequency_penalty=1.0),
        SamplingParams(seed=16, mirostat_mode=1, ignore_eos=True, logit_bias={1: 10.0}),
    ]


def _prompts(count: int) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(V) for _ in range(rng.randrange(0, 6))] for _ in range(count)]


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "mirostat_target", "mirostat_lr")


def _f32(p: SamplingParams) -> SamplingParams:
    """``p`` with its float parameters rounded to float32, as a `Sampler` stores them (packed ``fparams``).

    The functional reference computes with the float64 values; a parameter such as ``presence_penalty = 1e-164``
    (0 in float32) can move a tied truncation boundary, so the reference is given the values the sampler holds.
    """
    return p.replace(**{f: float(np.float32(getattr(p, f))) for f in _FLOAT_FIELDS})


def _close(a: np.ndarray, b: np.ndarray, atol: float = 1e-5) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((np.isnan(a) & np.isnan(b)) | (a == b) | (np.abs(a - b) <= atol)))


# --------------------------------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("use_bitmask", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_with_equivalent_histories(backend: str, use_bitmask: bool) -> None:
    s = Sampler(V, 12, _dev(backend), eos_token_ids=[EOS], backend=backend)
    reqs = _mix()
    prompts = _prompts(len(reqs))
    slots: list[int] = []
    row_params: list[SamplingParams] = []
    row_prompts: list[list[int]] = []
    for p, pr in zip(reqs, prompts, strict=True):
        got = s.add(p, pr)
        slots += got
        row_params += [p] * len(got)
        row_prompts += [pr] * len(got)
    b = len(slots)
    hist: list[list[int]] = [[] for _ in range(b)]
    seqs = [s.seq_of(x) for x in slots]
    assert seqs == [0, 0, 0, 0, 0, 1, 0]
    mu = np.array([s.mirostat_mu_of(x) for x in slots], dtype=np.float32)
    g = torch.Generator().manual_seed(3)
    near_ties = 0
    for step in range(_steps(backend, 6)):
        logits = torch.randn(b, V, generator=g) * 3.0
        tb = None
        if use_bitmask:  # each row: a random half of the vocabulary, always including id 0 and the EOS id
            keep = torch.rand(b, V, generator=g) < 0.5
            keep[:, :2] = True
            tb = torch.from_numpy(ids_to_bitmask([np.nonzero(k)[0].tolist() for k in keep.numpy()], V))
        out = s.sample(logits.to(s.device), slots, token_bitmask=tb)
        d = reference.diagnose(
            logits.numpy(), [_f32(p) for p in row_params], prompt_token_ids=row_prompts, output_token_ids=hist,
            steps=[len(h) for h in hist], seqs=seqs, mirostat_mu=mu, eos_token_ids=[EOS],
            token_bitmask=None if tb is None else tb.numpy(),
        )
        ref, near = d["output"], d["near_tie"]
        o = out.numpy()
        near_ties += int(near.sum())
        same = o.tokens == ref.tokens
        assert np.all(same | near), f"step {step}: tokens {o.tokens} vs reference {ref.tokens} (near {near})"
        assert np.array_equal(o.valid, ref.valid)
        for r in np.nonzero(same)[0]:
            assert _close(o.logprobs[r], ref.logprobs[r]), (step, r, o.logprobs[r], ref.logprobs[r])
            assert _close(o.top_logprobs[r], ref.top_logprobs[r]), (step, r)
            assert _close(o.mirostat_mu[r], ref.mirostat_mu[r]), (step, r)
            if not near[r]:
                assert o.ranks[r] == ref.ranks[r]
        assert o.top_logprob_ids.shape == (b, 3)
        if tb is not None:
            assert all(keep[r, t] for r, t in enumerate(o.tokens.tolist()) if t >= 0)
        for r, t in enumerate(o.tokens.tolist()):
            if t >= 0:
                hist[r].append(t)
        mu = o.mirostat_mu.astype(np.float32)
        # the device state follows the histories
        for r, x in enumerate(slots):
            assert s.step_of(x) == len(hist[r])
            want = np.bincount(np.asarray(hist[r], dtype=np.int64), minlength=V)
            assert np.array_equal(s.output_counts_of(x).cpu().numpy(), want)
        assert np.isnan(mu[0]) and not np.isnan(mu[3])
    if near_ties:
        warnings.warn(f"{backend}: {near_ties} near-tie row(s) not compared for token equality", stacklevel=1)
    # allowed / banned ids held on every step
    for r in (4, 5):
        assert all(t < 40 and t != 2 for t in hist[r])
    # min_tokens: request 2 never drew EOS on its first two steps; ignore_eos: request 5 never drew it at all
    assert EOS not in hist[2][:2]
    assert EOS not in hist[6]


# ----------------------------------------------------------------------------------------- reproducibility
def _model_logits(rid: int, seq: int, history: list[int], vocab: int) -> torch.Tensor:
    """A stand-in model: logits that depend only on the sequence (request, sample index, recent tokens)."""
    key = hash((rid, seq, len(history), tuple(history[-3:]))) % (2**31)
    return torch.randn(vocab, generator=torch.Generator().manual_seed(key)) * 2.5


def _replay(backend: str, reqs: list[SamplingParams], prompts: list[list[int]], steps: int, *, order: str,
            use_tensor: bool = False, rid0: int = 0) -> dict[tuple[int, int], list[int]]:
    """Generate ``steps`` tokens for every sample of every request; return token streams by (request, seq)."""
    streams: dict[tuple[int, int], list[int]] = {}
    rng = random.Random(42)
    if order == "alone":  # every request on its own, in its own sampler
        for rid, (p, pr) in enumerate(zip(reqs, prompts, strict=True)):
            streams.update(_replay(backend, [p], [pr], steps, order="together", rid0=rid))
        return streams
    s = Sampler(V, 24, _dev(backend), eos_token_ids=[EOS], backend=backend)
    owner: dict[int, tuple[int, int]] = {}
    if order == "shuffled":  # occupy some slots first so the requests land elsewhere, and add them in reverse
        s.add(SamplingParams(seed=1, n=5))
        idx = list(reversed(range(len(reqs))))
    else:
        idx = list(range(len(reqs)))
    joined = 0
    for step in range(steps + (len(reqs) if order == "shuffled" else 0)):
        # staggered joins in the shuffled replay: one request per step
        while joined < len(idx) and (order != "shuffled" or joined <= step):
            rid = idx[joined]
            for seq, x in enumerate(s.add(reqs[rid], prompts[rid])):
                owner[x] = (rid0 + rid, seq)
                streams[(rid0 + rid, seq)] = []
            joined += 1
        live = [x for x in owner if len(streams[owner[x]]) < steps]
        if not live:
            break
        if order == "shuffled":
            rng.shuffle(live)
        logits = torch.stack([_model_logits(*owner[x], streams[owner[x]], V) for x in live])
        out = s.sample(logits.to(s.device), torch.tensor(live, device=s.device) if use_tensor else live)
        for x, t in zip(live, out.tokens.tolist(), strict=True):
            streams[owner[x]].append(t)
    return streams


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_whatever_batch_composition_and_slots(backend: str) -> None:
    reqs = _mix()
    prompts = _prompts(len(reqs))
    steps = _steps(backend, 5)
    together = _replay(backend, reqs, prompts, steps, order="together")
    alone = _replay(backend, reqs, prompts, steps, order="alone")
    shuffled = _replay(backend, reqs, prompts, steps, order="shuffled", use_tensor=True)
    assert len(together) == 7 and all(len(v) == steps for v in together.values())
    assert alone == together
    assert shuffled == together
    assert together[(4, 0)] != together[(4, 1)]  # the two samples of one request differ (seq in the counter)


def test_random_seed_is_drawn_once_per_request_and_reported() -> None:
    s = Sampler(V, 8, backend="reference")
    a = s.add(SamplingParams(n=3))
    b = s.add(SamplingParams())
    seeds = [s.seed_of(x) for x in a]
    assert len(set(seeds)) == 1 and 0 <= seeds[0] < 2**64
    assert s.seed_of(b[0]) != seeds[0]
    assert s.seed_of(s.add(SamplingParams(seed=2**64 - 1))[0]) == 2**64 - 1
    # replaying with the reported seed reproduces the tokens
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    t1 = s.sample(logits, b).tokens.item()
    s2 = Sampler(V, 1, backend="reference")
    c = s2.add(SamplingParams(seed=s.seed_of(b[0])))
    assert s2.sample(logits, c).tokens.item() == t1


# --------------------------------------------------------------------------------------------- device state
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_slots_match_list_slots(backend: str) -> None:
    """Device-tensor slots (no host reads; flags and N over all live slots) give the same tokens as a list."""
    samplers = [Sampler(V, 10, _dev(backend), eos_token_ids=[EOS], backend=backend) for _ in range(2)]
    for s in samplers:
        for p, pr in zip(_mix(), _prompts(6), strict=True):
            s.add(p, pr)
    g = torch.Generator().manual_seed(1)
    rows = [6, 2, 5, 0]  # top_logprobs 0, 0, 0, 2 (slot 3, not in the batch, has 3)
    for _ in range(_steps(backend, 3)):
        logits = torch.randn(len(rows), V, generator=g).to(_dev(backend))
        a = samplers[0].sample(logits, rows)
        b = samplers[1].sample(logits, torch.tensor(rows, dtype=torch.int32))
        assert torch.equal(a.tokens, b.tokens)
        assert a.top_logprob_ids.shape[1] == 2 and b.top_logprob_ids.shape[1] == 3  # batch max vs live max
        assert torch.equal(a.top_logprob_ids, b.top_logprob_ids[:, :2])
    assert torch.equal(samplers[0]._tables.counts, samplers[1]._tables.counts)
    assert torch.equal(samplers[0]._tables.steps, samplers[1]._tables.steps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_row_leaves_its_slot_unchanged(backend: str) -> None:
    s = Sampler(V, 2, _dev(backend), backend=backend)
    a = s.add(SamplingParams(seed=1, mirostat_mode=2, frequency_penalty=0.5))
    b = s.add(SamplingParams(seed=2, temperature=0.0))
    logits = torch.zeros(2, V)
    logits[0, 5] = math.nan
    logits[1, 7] = 1.0
    mu0 = s.mirostat_mu_of(a[0])
    out = s.sample(logits.to(s.device), a + b)
    assert out.tokens.tolist() == [-1, 7] and out.valid.tolist() == [False, True]
    assert s.step_of(a[0]) == 0 and s.step_of(b[0]) == 1
    assert int(s.output_counts_of(a[0]).sum()) == 0 and int(s.output_counts_of(b[0])[7]) == 1
    assert s.mirostat_mu_of(a[0]) == mu0


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_counts_saturate_at_int16_max(backend: str) -> None:
    s = Sampler(V, 1, backend=backend)
    x = s.add(SamplingParams(temperature=0.0))[0]
    assert s._tables.counts.dtype == torch.int16
    s._tables.counts[x, 4] = COUNT_MAX - 1
    logits = torch.zeros(1, V)
    logits[0, 4] = 5.0
    for want in (COUNT_MAX, COUNT_MAX, COUNT_MAX):
        s.sample(logits, [x])
        assert int(s.output_counts_of(x)[4]) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_logits_and_min_tokens(backend: str) -> None:
    """Logits wider than the vocabulary (padding never sampled); EOS banned for the first min_tokens steps."""
    s = Sampler(V, 2, _dev(backend), eos_token_ids=[EOS, 3], backend=backend)
    x = s.add(SamplingParams(temperature=0.0, min_tokens=2))
    logits = torch.zeros(1, V + 40)
    logits[0, V:] = 100.0  # padding columns, larger than anything real
    logits[0, EOS] = 9.0
    logits[0, 3] = 8.0
    logits[0, 10] = 7.0
    toks = [s.sample(logits.to(s.device), x).tokens.item() for _ in range(3)]
    assert toks == [10, 10, EOS]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_inference_mode_either_way(backend: str) -> None:
    """State built inside torch.inference_mode is still updated in place outside it, and the reverse."""
    with torch.inference_mode():
        s = Sampler(V, 2, backend=backend)
        x = s.add(SamplingParams(seed=1, frequency_penalty=0.5, logit_bias={3: 1.0}))
        s.sample(torch.zeros(1, V), x)
    s.sample(torch.zeros(1, V), x)
    s.add(SamplingParams(allowed_token_ids=[1], logit_bias={1: 1.0, 2: 2.0}))
    with torch.inference_mode():
        s.sample(torch.zeros(2, V), [0, 1])
    assert s.step_of(x[0]) == 3


def test_empty_batch() -> None:
    s = Sampler(V, 2, backend="reference")
    s.add(SamplingParams(logprobs=True, top_logprobs=2))
    out = s.sample(torch.zeros(0, V), [])
    assert out.tokens.shape == (0,) and out.top_logprob_ids.shape == (0, 0)
    assert s.sample(torch.zeros(0, V), torch.zeros(0, dtype=torch.int64)).top_logprobs.shape == (0, 2)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_remove_and_re_add_resets_the_slot(backend: str) -> None:
    s = Sampler(V, 1, backend=backend)
    x = s.add(SamplingParams(temperature=0.0, repetition_penalty=2.0, allowed_token_ids=[4, 5]), [4])
    logits = torch.zeros(1, V)
    logits[0, 4] = 1.0
    logits[0, 6] = 3.0
    assert s.sample(logits, x).tokens.item() == 4  # 6 not allowed; 4 (in the prompt) penalised to 0.5 > 0.0 of 5
    s.remove(x)
    assert s.num_free == 1
    y = s.add(SamplingParams(temperature=0.0))
    assert y == x and s.step_of(y[0]) == 0
    assert int(s.output_counts_of(y[0]).sum()) == 0 and int(s.prompt_mask_of(y[0]).abs().sum()) == 0
    assert s.sample(logits, y).tokens.item() == 6  # the old request's allowed ids are gone


def test_state_layout_and_lazy_allocation() -> None:
    s = Sampler(100, 3, backend="reference")
    assert s._tables.prompt.shape == (3, 4) and s._tables.prompt.dtype == torch.int32
    assert s._tables.counts.shape == (3, 100) and s._tables.counts.dtype == torch.int16
    assert s._tables.allowed is None and s._tables.bias_ids is None
    x = s.add(SamplingParams(logit_bias={7: 1.0}), [0, 33, 99])
    assert s._tables.allowed is None and s._tables.bias_ids is not None
    assert s.prompt_mask_of(x[0]).tolist() == [1, 2, 0, 1 << 3]
    s.add(SamplingParams(banned_token_ids=[0]))
    assert s._tables.allowed is not None and s._tables.allowed.shape == (3, 4)
    # memory per slot, as documented: 2 V (counts) + V / 8 (prompt bitmask) + 156 bytes of scalars and parameters,
    # plus V / 8 for the allowed mask and 8 bytes per logit-bias entry once used
    t = s._tables
    core = [t.fparams, t.iparams, t.seeds, t.steps, t.seqs, t.mu, t.prompt, t.counts, t.hist_total, t.ngram, t.window,
            t.hist_start]
    assert sum(t.numel() * t.element_size() for t in core) / 3 == 2 * 100 + 4 * 4 + 156


# ------------------------------------------------------------------------------------------------------ errors
def test_errors() -> None:
    s = Sampler(V, 3, backend="reference")
    a = s.add(SamplingParams(n=2))
    with pytest.raises(ValueError, match=r"Sampler is full: the request needs n=2 slots, 1 of max_slots=3"):
        s.add(SamplingParams(n=2))
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        s.add({"temperature": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompt_token_ids holds token id 70, outside the vocabulary \[0, 70\)"):
        s.add(SamplingParams(), [1, 70])
    with pytest.raises(ValueError, match=r"^params.logit_bias holds token id 99, outside the vocabulary \[0, 70\)$"):
        s.add(SamplingParams(logit_bias={99: 1.0}))
    logits = torch.zeros(2, V)
    with pytest.raises(ValueError, match="slot 2 is not in use"):
        s.sample(logits, [a[0], 2])
    with pytest.raises(ValueError, match=r"slot 5 is outside \[0, 3\)"):
        s.sample(logits, [a[0], 5])
    with pytest.raises(ValueError, match="slots must be distinct"):
        s.sample(logits, [a[0], a[0]])
    with pytest.raises(ValueError, match=r"logits must have shape \(2, >= 70\).*got \(2, 69\)"):
        s.sample(torch.zeros(2, V - 1), a)
    with pytest.raises(ValueError, match=r"logits must have shape \(2, >= 70\).*got \(3, 70\)"):
        s.sample(torch.zeros(3, V), a)
    with pytest.raises(ValueError, match=r"logits must have shape .*got \(140,\)"):
        s.sample(torch.zeros(2 * V), a)
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64, got torch.int64"):
        s.sample(torch.zeros(2, V, dtype=torch.int64), a)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        s.sample(np.zeros((2, V), np.float32).tolist(), a)  # type: ignore[arg-type]  (numpy arrays are taken)
    with pytest.raises(ValueError, match="logits must be on the sampler's device cpu, got meta"):
        s.sample(torch.zeros(2, V, device="meta"), a)
    with pytest.raises(TypeError, match="token_bitmask must be int32"):
        s.sample(logits, a, token_bitmask=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"token_bitmask must have shape \(2, 3\).*got \(2, 2\)"):
        s.sample(logits, a, token_bitmask=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="slots must be a 1-D integer tensor"):
        s.sample(logits, torch.zeros(2))
    s.remove(a[1])
    with pytest.raises(ValueError, match=f"slot {a[1]} is not in use"):
        s.remove(a[1])
    with pytest.raises(ValueError, match=f"slot {a[1]} is not in use"):
        s.seed_of(a[1])
    s.reset()
    assert s.num_free == 3 and s.active_slots == []
    with pytest.raises(ValueError, match=f"slot {a[0]} is not in use"):
        s.sample(torch.zeros(1, V), [a[0]])
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 1"):
        Sampler(0, 1)
    with pytest.raises(ValueError, match="max_slots must be an integer >= 1"):
        Sampler(8, 0)
    with pytest.raises(TypeError, match="vocab_size must be an integer >= 1, got 8.0 of type float"):
        Sampler(8.0, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        Sampler(8, 1, backend="gpu")
    with pytest.raises(ValueError, match=r"eos_token_ids holds token id 8, outside the vocabulary \[0, 8\)"):
        Sampler(8, 1, eos_token_ids=[8])


def test_exported() -> None:
    assert fastsampler.Sampler is Sampler and "Sampler" in fastsampler.__all__


@pytest.mark.parametrize("vocab", [7, 70])  # 7: fewer filler candidates than 2k (c = vocab)
def test_device_bias_csr_pads_rows_with_zero_entries(vocab: int) -> None:
    """The device-built CSR (tensor slots): k sorted unique entries per row, the row's own bias plus zeros."""
    s = Sampler(vocab, 4, backend="reference")
    biases = [{0: 1.5, 3: -2.0, 6: 0.5}, {}, {5: -math.inf}, {1: 2.0, 2: 3.0}]
    for bias in biases:
        s.add(SamplingParams(logit_bias=bias))
    order = [2, 0, 3, 1]
    indptr, ids, vals = s._tables.bias_csr(torch.tensor(order), 3)
    assert indptr.tolist() == [0, 3, 6, 9, 12] and ids.dtype == torch.int32 and vals.dtype == torch.float32
    for r, slot in enumerate(order):
        row_ids = ids[3 * r: 3 * r + 3].tolist()
        row_vals = vals[3 * r: 3 * r + 3].tolist()
        assert row_ids == sorted(set(row_ids)) and all(0 <= t < vocab for t in row_ids)
        got = {t: v for t, v in zip(row_ids, row_vals, strict=True) if v != 0.0}
        assert got == {t: v for t, v in biases[slot].items() if v != 0.0}
    host = s._book.bias_csr(order, s.device)
    assert host[0].tolist() == [0, 1, 4, 6, 6] and host[1].tolist() == [5, 0, 3, 6, 1, 2]


@pytest.mark.parametrize("name", ["fastsampler.sampler", "fastsampler._custom_ops", "fastsampler._batch",
                                  *(["fastsampler.backends.cpu"] if "cpu" in BACKENDS else [])])
def test_docstring_examples(name: str) -> None:
    import doctest
    import importlib

    res = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------------------------------------------------- property (hypothesis)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or torch.cuda.is_available()])
def test_random_request_mixes_match_reference(backend: str) -> None:
    """Random mixes of every feature (tests/strategies.py), a few steps each, against the reference."""
    vocab = 37

    @given(st.data())
    def run(data: st.DataObject) -> None:
        reqs = data.draw(st.lists(sampling_params(vocab, history_rules=True), min_size=1, max_size=4),
                         label="requests")
        prompts = [data.draw(st.lists(st.integers(0, vocab - 1), max_size=6)) for _ in reqs]
        eos_rule = any(p.min_tokens > 0 or p.ignore_eos for p in reqs)  # needs EOS ids in a Sampler
        eos = data.draw(st.lists(st.integers(0, vocab - 1), min_size=int(eos_rule), max_size=2, unique=True),
                        label="eos")
        s = Sampler(vocab, 4, _dev(backend), eos_token_ids=eos, backend=backend, history_len=16)
        slots = [s.add(p.replace(n=1), pr)[0] for p, pr in zip(reqs, prompts, strict=True)]
        order = data.draw(st.permutations(slots), label="row order")
        plist = [_f32(reqs[slots.index(x)]) for x in order]
        pr_rows = [prompts[slots.index(x)] for x in order]
        hist: list[list[int]] = [[] for _ in order]
        mu = np.array([s.mirostat_mu_of(x) for x in order], dtype=np.float32)
        for _ in range(3):
            logits = data.draw(logits_rows(len(order), vocab), label="logits")
            out = s.sample(torch.from_numpy(logits).to(s.device), order).numpy()
            d = reference.diagnose(logits, plist, prompt_token_ids=pr_rows, output_token_ids=hist,
                                   steps=[len(h) for h in hist], mirostat_mu=mu, eos_token_ids=eos)
            ref, near = d["output"], d["near_tie"]
            assert np.array_equal(out.valid, ref.valid)
            assert np.all((out.tokens == ref.tokens) | near), (out.tokens, ref.tokens, d["reasons"])
            same = (out.tokens == ref.tokens) & ~near
            assert _close(out.logprobs[same], ref.logprobs[same])
            assert _close(out.mirostat_mu[same], ref.mirostat_mu[same])
            for r, t in enumerate(out.tokens.tolist()):
                if t >= 0:
                    hist[r].append(t)
            mu = out.mirostat_mu.astype(np.float32)

    run()


# ------------------------------------------------------------------------------------------- the per-step fast path
def _twins(backend: str, n: int = 8) -> tuple[Sampler, Sampler, list[int]]:
    twins = [Sampler(V, n, _dev(backend), eos_token_ids=[EOS], backend=backend) for _ in range(2)]
    for s in twins:
        slots = []
        for p, pr in zip(_mix(), _prompts(6), strict=True):
            slots += s.add(p, pr)
    return twins[0], twins[1], slots


def _state(s: Sampler) -> list[torch.Tensor]:
    return [s._tables.steps.cpu(), s._tables.counts.cpu(), s._tables.mu.cpu()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", [[0, 1, 2, 3], (2, 3, 4, 5, 6), [6, 2, 5, 0], [1, 3, 5]])
def test_slot_list_fast_path_matches_the_general_path(backend: str, order: list[int]) -> None:
    """A list / tuple of slots (cached rows, views of the state for consecutive slots, the backend called directly)
    gives the outputs and state updates of the general path, with padded logits and a token bitmask too."""
    fast, slow, _ = _twins(backend)
    g = torch.Generator().manual_seed(3)
    tb = torch.from_numpy(ids_to_bitmask([range(0, 60)] * len(order), V + 10)).to(_dev(backend))
    for k in range(_steps(backend, 4)):
        logits = torch.randn(len(order), V + (10 if k % 2 else 0), generator=g).to(_dev(backend))
        bm = tb[:, : (V + 31) // 32 + (1 if k % 2 else 0)] if k >= 2 else None
        a = fast.sample(logits, order, token_bitmask=bm)
        b = slow._sample_general(logits, list(order), bm)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and x.dtype == y.dtype
            assert torch.equal(x, y) or (x.is_floating_point() and torch.allclose(x, y, equal_nan=True))
        for x, y in zip(_state(fast), _state(slow), strict=True):
            assert torch.equal(x, y) or torch.allclose(x, y, equal_nan=True)
    assert fast.step_of(order[0]) == _steps(backend, 4)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_slot_list_cache_follows_add_remove_and_reserve(backend: str) -> None:
    s = Sampler(V, 3, backend=backend)
    a = s.add(SamplingParams(temperature=0.0))
    b = s.add(SamplingParams(temperature=0.0, banned_token_ids=[7]))
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0
    logits[:, 9] = 4.0
    assert s.sample(logits, a + b).tokens.tolist() == [7, 9]
    s.remove(b)
    c = s.add(SamplingParams(temperature=0.0, logit_bias={9: 2.0}))
    assert c == b and s.sample(logits, a + c).tokens.tolist() == [7, 9]  # the new request's rows, not the old
    s.remove(c)
    with pytest.raises(ValueError, match=r"slot 1 is not in use"):
        s.sample(logits, a + c)
    s.add(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2))
    s.reserve(allowed_mask=True, logit_bias_entries=4)
    out = s.sample(logits, a + c)
    assert out.tokens.tolist() == [7, 7] and out.top_logprob_ids.shape == (2, 2)
    with pytest.raises(TypeError, match="slot must be an int, got True"):
        s.sample(logits[:1], [True])  # equal to 1 and hashed alike: never served from the cache
    with pytest.raises(ValueError, match="slots must be distinct within a batch"):
        s.sample(logits, [0, 0])
    assert s.sample(logits[:1], [np.int64(1)]).tokens.tolist() == [7]


def test_cpu_sampler_updates_its_state_through_views() -> None:
    """On the CPU the fast path reads and writes the state tensors' own memory (no copies of the state)."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ backend is unavailable")
    s = Sampler(V, 4, backend="cpu")
    steps, mu, counts = s._host_state
    assert steps.ctypes.data == s._tables.steps.data_ptr() and mu.ctypes.data == s._tables.mu.data_ptr()
    assert counts.ctypes.data == s._tables.counts.data_ptr()
    slots = s.add(SamplingParams(temperature=0.0, n=2)) + s.add(SamplingParams(seed=1, mirostat_mode=2))
    logits = torch.zeros(3, V)
    logits[:, 11] = 9.0
    for _ in range(3):
        out = s.sample(logits[:2], [slots[2], slots[0]])  # not consecutive: gathered, written back
    assert out.tokens[1].item() == 11 and s.step_of(slots[0]) == 3 and s.step_of(slots[1]) == 0
    assert int(s.output_counts_of(slots[0])[11]) == 3 and not math.isnan(s.mirostat_mu_of(slots[2]))
    out = s.sample(logits[:2], slots[:2])  # consecutive: views
    assert s.step_of(slots[0]) == 4 and s.step_of(slots[1]) == 1 and int(s._tables.counts[slots[1], 11]) == 1


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_threads_sharing_a_sampler_lose_no_update(backend: str) -> None:
    """The lock makes concurrent steps on one Sampler run one after another: every step and count is kept."""
    import threading

    s = Sampler(V, 4, backend=backend)
    slots = s.add(SamplingParams(temperature=0.0, n=4))
    logits = torch.zeros(4, V)
    logits[:, 3] = 1.0
    n_threads, n_steps = 4, 25 if backend == "cpu" else 5
    errors: list[BaseException] = []

    def work(order: list[int]) -> None:
        try:
            for _ in range(n_steps):
                s.sample(logits, order)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(slots if k % 2 else slots[::-1],)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s.step_of(x) for x in slots] == [n_threads * n_steps] * 4
    assert [int(s.output_counts_of(x)[3]) for x in slots] == [n_threads * n_steps] * 4
