"""The history rules of docs/semantics.md §3 A: ``no_repeat_ngram_size`` and ``bad_words_ids``.

They are checked against an independent implementation written the way Hugging Face's ``NoRepeatNGramLogitsProcessor``
and ``NoBadWordsLogitsProcessor`` state the rules (a dictionary of n-gram prefixes; a suffix comparison per bad word),
on hand-computed cases and random histories, in the functional API and in a `Sampler` (its history ring, restored
slots, verification), on every backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsampler
from fastsampler import Sampler, SamplingParams, reference
from tests.backend_checks import backend_device, backend_params, unavailable

V = 16


def hf_ngram_bans(h: list[int], n: int) -> set[int]:
    """The tokens that would complete an n-gram already in ``h`` (Hugging Face's rule, written independently)."""
    if n <= 0 or len(h) + 1 < n:
        return set()
    followers: dict[tuple[int, ...], set[int]] = {}
    for i in range(len(h) - n + 1):
        followers.setdefault(tuple(h[i:i + n - 1]), set()).add(h[i + n - 1])
    return followers.get(tuple(h[len(h) - n + 1:]), set())


def hf_bad_word_bans(h: list[int], words: tuple[tuple[int, ...], ...] | None) -> set[int]:
    out = set()
    for w in words or ():
        if len(w) == 1 or (len(h) >= len(w) - 1 and tuple(h[len(h) - len(w) + 1:]) == w[:-1]):
            out.add(w[-1])
    return out


def banned(p: SamplingParams, h: list[int]) -> set[int]:
    return hf_ngram_bans(h, p.no_repeat_ngram_size) | hf_bad_word_bans(h, p.bad_words_ids)


def _kept(probs: np.ndarray) -> list[set[int]]:
    return [{t for t in range(probs.shape[1]) if probs[r, t] > 0} for r in range(probs.shape[0])]


@pytest.mark.parametrize(("h", "n", "words", "want"), [
    ([1, 2, 3, 1, 2], 3, None, {3}),  # (1, 2) was followed by 3
    ([1, 2, 3, 1, 2], 2, None, {3}),  # 2 was followed by 3 (the last 2 has no follower yet)
    ([1, 2, 3, 1, 2], 1, None, {1, 2, 3}),  # every token of the history
    ([1, 2, 1, 2, 1], 2, None, {2}),
    ([4, 4, 4], 3, None, {4}),
    ([1, 2], 3, None, set()),  # too short for an n-gram
    ([], 1, None, set()),
    ([5, 1, 2], 0, ((2, 5), (7,), (1, 2, 9), (3, 2, 8)), {5, 7, 9}),  # (3, 2, 8): the history ends (1, 2), not (3, 2)
    ([2], 0, ((1, 2, 9),), set()),  # a prefix longer than the history
])
def test_hand_computed_bans(h: list[int], n: int, words, want: set[int]) -> None:
    p = SamplingParams(no_repeat_ngram_size=n, bad_words_ids=words)
    assert banned(p, h) == want  # the independent rule agrees with the hand computation
    probs = reference.sampling_probs(np.zeros((1, V)), p, prompt_token_ids=[h[:1]], output_token_ids=[h[1:]])
    assert _kept(probs)[0] == set(range(V)) - want


@st.composite
def _case(draw):
    b = draw(st.integers(1, 4))
    rows = []
    for _ in range(b):
        prompt = draw(st.lists(st.integers(0, 5), max_size=8))  # a small alphabet: many repeats
        out = draw(st.lists(st.integers(0, 5), max_size=8))
        words = draw(st.one_of(st.none(), st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=3), max_size=3)))
        p = SamplingParams(temperature=draw(st.sampled_from([0.0, 1.0])), seed=draw(st.integers(0, 1000)),
                           no_repeat_ngram_size=draw(st.integers(0, 4)), bad_words_ids=words,
                           top_k=draw(st.sampled_from([-1, 3])))
        rows.append((p, prompt, out))
    return rows


@settings(max_examples=60, deadline=None)
@given(_case())
def test_random_histories_match_the_independent_rule(rows) -> None:
    params = [r[0] for r in rows]
    prompts, outs = [r[1] for r in rows], [r[2] for r in rows]
    x = np.random.default_rng(len(rows)).standard_normal((len(rows), V))
    probs = fastsampler.sampling_probs(torch.from_numpy(x).float(), [p.replace(temperature=1.0, top_k=-1)
                                                                    for p in params],
                                       prompt_token_ids=prompts, output_token_ids=outs, backend="reference")
    for r, (p, prompt, out) in enumerate(rows):
        want = set(range(V)) - banned(p, prompt + out)
        assert _kept(probs.numpy())[r] == want
    tokens = fastsampler.sample(torch.from_numpy(x).float(), params, prompt_token_ids=prompts,
                                output_token_ids=outs, steps=[len(o) for o in outs], backend="reference").tokens
    for r, (p, prompt, out) in enumerate(rows):
        assert int(tokens[r]) not in banned(p, prompt + out) or int(tokens[r]) == -1


MIXED = [
    SamplingParams(seed=1, no_repeat_ngram_size=2),
    SamplingParams(seed=2, temperature=0.0, bad_words_ids=[[3], [4, 5], [6, 7, 8]]),
    SamplingParams(seed=3, no_repeat_ngram_size=3, bad_words_ids=[[9, 9]], top_p=0.9, frequency_penalty=0.3),
    SamplingParams(seed=4),  # no rule: unaffected
]
PROMPTS = [[1, 2, 1], [6, 7], [9, 9, 9], [5]]


def _logits(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(300 + step)
    x = torch.randn(len(MIXED), V, generator=g)
    x[:, :3] += 2.0  # the first ids are likely: repeats happen
    return x


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("how", ["list", "tensor", "numpy"])
def test_sampler_equals_the_functional_api(backend: str, how: str) -> None:
    """A Sampler with a ring long enough for the whole history draws the tokens of the functional API given the
    histories as sequences, step after step; every token respects the independent rule."""
    dev = backend_device(backend)
    if how == "numpy" and dev.type != "cpu":
        pytest.skip("numpy logits: a CPU sampler")
    s = Sampler(V, len(MIXED), device=dev, backend=backend, history_len=32)
    slots = [s.add(p, prompt_token_ids=pr)[0] for p, pr in zip(MIXED, PROMPTS, strict=True)]
    outs: list[list[int]] = [[] for _ in MIXED]
    for step in range(10):
        x = _logits(step)
        want = fastsampler.sample(x.to(dev), MIXED, prompt_token_ids=PROMPTS, output_token_ids=outs,
                                  steps=[step] * len(MIXED), backend=backend).tokens.cpu().tolist()
        if how == "numpy":
            got = s.sample(x.numpy(), slots).tokens.tolist()
        else:
            got = s.sample(x.to(dev), torch.tensor(slots, device=dev) if how == "tensor" else slots)
            got = got.tokens.cpu().tolist()
        assert got == want, step
        for r, t in enumerate(got):
            assert t not in banned(MIXED[r], PROMPTS[r] + outs[r])
            outs[r].append(t)


@pytest.mark.parametrize("backend", backend_params())
def test_a_short_ring_looks_at_the_last_tokens_only(backend: str) -> None:
    """With history_len = 4 the rules see the last 4 tokens of prompt + output (the ring wraps many times)."""
    dev = backend_device(backend)
    p = SamplingParams(seed=5, no_repeat_ngram_size=2, bad_words_ids=[[1, 2, 0]])
    s = Sampler(V, 1, device=dev, backend=backend, history_len=4)
    slot = s.add(p, prompt_token_ids=[0, 1, 2, 0, 1])[0]
    hist = [0, 1, 2, 0, 1]
    for step in range(12):
        x = _logits(step)[:1]
        want = fastsampler.sample(x.to(dev), p, output_token_ids=[hist[-4:]], steps=[step],
                                  backend=backend).tokens.item()
        got = s.sample(x.to(dev), [slot]).tokens.item()
        assert got == want, step
        hist.append(got)
    assert s.export(slot).history.tolist() == hist[-4:] and s.export(slot).history_total == len(hist)


@pytest.mark.parametrize("backend", backend_params())
def test_restore_and_verify_keep_the_history(backend: str) -> None:
    dev = backend_device(backend)
    s = Sampler(V, 2, device=dev, backend=backend, history_len=16)
    slots = [s.add(p, prompt_token_ids=pr)[0] for p, pr in zip(MIXED[:2], PROMPTS[:2], strict=True)]
    for step in range(3):
        s.sample(_logits(step)[:2].to(dev), slots)
    states = [s.export(x) for x in slots]
    t = Sampler(V, 2, device=dev, backend=backend, history_len=16)
    restored = [t.restore(st) for st in states]
    k = 4
    logits = torch.stack([torch.stack([_logits(3 + j)[r] for j in range(k + 1)]) for r in range(2)])
    # drafts: what s draws step by step (so the match method accepts them all)
    truth = [s.sample(_logits(3 + j)[:2].to(dev), slots).tokens.cpu().tolist() for j in range(k + 1)]
    drafts = [[truth[j][r] for j in range(k)] for r in range(2)]
    out = t.verify(logits.to(dev), drafts, restored)
    assert out.num_accepted.cpu().tolist() == [k, k]
    assert out.tokens.cpu().tolist() == [[truth[j][r] for j in range(k + 1)] for r in range(2)]
    assert [t.export(x).history.tolist() for x in restored] == [s.export(x).history.tolist() for x in slots]


def test_errors_name_the_rule_and_the_fix() -> None:
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        SamplingParams(no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match=r"bad_words_ids\[0\] must hold 1 to"):
        SamplingParams(bad_words_ids=[[]])
    with pytest.raises(TypeError, match=r"bad_words_ids\[1\]"):
        SamplingParams(bad_words_ids=[[1], 2])
    with pytest.raises(ValueError, match=r"bad_words_ids\[0\]\[1\] must be a non-negative"):
        SamplingParams(bad_words_ids=[[1, -2]])
    s = Sampler(V, 2)
    with pytest.raises(ValueError, match="history_len >= 2"):
        s.add(SamplingParams(no_repeat_ngram_size=2))
    t = Sampler(V, 2, history_len=2)
    with pytest.raises(ValueError, match="a bad word of 4 tokens reads 3 tokens"):
        t.add(SamplingParams(bad_words_ids=[[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="bad_words_ids holds token id 99"):
        t.add(SamplingParams(bad_words_ids=[[99]]))
    with pytest.raises(ValueError, match="pass output_token_ids"):
        fastsampler.sample(torch.zeros(1, V), SamplingParams(no_repeat_ngram_size=2), steps=[0],
                           output_counts=torch.zeros(1, V, dtype=torch.int32))
    with pytest.raises(ValueError, match="bad_words_ids of row 0 holds token id 20"):
        fastsampler.sample(torch.zeros(1, V), SamplingParams(bad_words_ids=[[20]]), steps=[0])
    with pytest.raises(ValueError, match="history_len"):
        Sampler(V, 1, history_len=-1)


def test_generation_config_names() -> None:
    p = SamplingParams.from_generation_config({"no_repeat_ngram_size": 3, "bad_words_ids": [[5, 6], [7]],
                                               "do_sample": False})
    assert p.no_repeat_ngram_size == 3 and p.bad_words_ids == ((5, 6), (7,)) and p.temperature == 0.0
    assert p.to_dict()["bad_words_ids"] == [[5, 6], [7]]


@pytest.mark.skipif(bool(unavailable("cpu")), reason="needs the C++ extension")
@pytest.mark.parametrize("seed", range(4))
def test_torch_and_cpp_bans_agree(seed: int) -> None:
    """The torch implementation (the device path) and the C++ one (CPU) give the same masks on random rings that
    wrapped, with mixed n-gram sizes and bad words."""
    from fastsampler._history import bad_words_table, history_keep, ordered_history
    from fastsampler.backends import cpu

    rng = np.random.default_rng(seed)
    s, length, v = 9, 12, 70
    ring = rng.integers(0, 6, (s, length)).astype(np.int32)  # a small alphabet: many matches
    total = rng.integers(0, 40, s).astype(np.int64)
    ngram = rng.integers(0, 5, s).astype(np.int64)
    words = [[rng.integers(0, 6, rng.integers(1, 5)).tolist() for _ in range(rng.integers(0, 4))] for _ in range(s)]
    bad = np.stack([bad_words_table(w, 3, 4) for w in words])
    rows = rng.permutation(s)[:7].astype(np.int64)
    w = (v + 31) // 32
    want = cpu.history_keep(ring, total, ngram, bad, rows, w)
    t = torch.from_numpy
    seq = ordered_history(t(ring)[t(rows)], t(total)[t(rows)])
    sizes = sorted({int(n) for n in ngram[rows] if n > 0})
    got = history_keep(seq, t(ngram)[t(rows)], sizes, t(bad)[t(rows)], w).numpy()
    np.testing.assert_array_equal(got, want)
    # and both against the independent rule, on the ring's last tokens
    for r, slot in enumerate(rows):
        n_tok = min(int(total[slot]), length)
        h = [int(ring[slot, (int(total[slot]) - n_tok + k) % length]) for k in range(n_tok)]
        p = SamplingParams(no_repeat_ngram_size=int(ngram[slot]), bad_words_ids=words[slot] or None)
        allowed = {i for i in range(v) if (int(want[r, i >> 5]) >> (i & 31)) & 1}
        assert allowed == set(range(v)) - banned(p, h)


WINDOWED = [
    SamplingParams(seed=7, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3, penalty_last_n=3),
    SamplingParams(seed=8, temperature=0.0, frequency_penalty=2.0, penalty_last_n=0),
    SamplingParams(seed=9, frequency_penalty=1.0, penalty_last_n=5, no_repeat_ngram_size=3),
    SamplingParams(seed=10, frequency_penalty=1.0),  # the whole output
]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("how", ["list", "tensor"])
def test_penalty_window(backend: str, how: str) -> None:
    """penalty_last_n: the penalties count the last n generated tokens; a Sampler (its counts updated as tokens
    leave the window) draws the tokens of the functional API given the whole output, and an exported slot
    continues on another Sampler."""
    dev = backend_device(backend)
    s = Sampler(V, len(WINDOWED), device=dev, backend=backend, history_len=8)
    prompts = [[0, 1], [2], [], [0]]
    slots = [s.add(p, prompt_token_ids=pr, output_token_ids=[0, 0, 1])[0] for p, pr in zip(WINDOWED, prompts,
                                                                                          strict=True)]
    outs = [[0, 0, 1] for _ in WINDOWED]
    for step in range(12):
        if step == 6:  # move every slot to a new Sampler
            t = Sampler(V, len(WINDOWED), device=dev, backend=backend, history_len=8)
            slots = [t.restore(s.export(x)) for x in slots]
            s = t
        x = _logits(step)
        want = fastsampler.sample(x.to(dev), WINDOWED, prompt_token_ids=prompts, output_token_ids=outs,
                                  steps=[len(o) for o in outs], backend=backend).tokens.cpu().tolist()
        got = s.sample(x.to(dev), torch.tensor(slots, device=dev) if how == "tensor" else slots)
        assert got.tokens.cpu().tolist() == want, step
        for r, tok in enumerate(want):
            outs[r].append(tok)
        for r, slot in enumerate(slots):  # the counts are those of the window
            n = WINDOWED[r].penalty_last_n
            window = outs[r] if n < 0 else outs[r][max(0, len(outs[r]) - n):] if n else []
            assert s.output_counts_of(slot).cpu().tolist() == np.bincount(window, minlength=V).tolist()


def test_penalty_window_errors() -> None:
    with pytest.raises(ValueError, match="penalty_last_n"):
        SamplingParams(penalty_last_n=-2)
    with pytest.raises(ValueError, match="history_len > 4"):
        Sampler(V, 1, history_len=4).add(SamplingParams(frequency_penalty=1.0, penalty_last_n=4))
    Sampler(V, 1).add(SamplingParams(penalty_last_n=4))  # no penalty: the window changes nothing, needs no history
    with pytest.raises(ValueError, match="pass output_token_ids"):
        fastsampler.sample(torch.zeros(1, V), SamplingParams(presence_penalty=1.0, penalty_last_n=2), steps=[0],
                           output_counts=torch.zeros(1, V, dtype=torch.int32))
    # the reference counts the window too
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0, penalty_last_n=1)
    x = np.zeros((1, V))
    x[0, 3], x[0, 4] = 1.0, 0.5
    assert reference.sample(x, p, output_token_ids=[[3, 4]]).tokens.tolist() == [3]  # only the last 4 counts
    assert reference.sample(x, p.replace(penalty_last_n=-1), output_token_ids=[[3, 4]]).tokens.tolist() == [0]


@pytest.mark.parametrize("backend", backend_params())
def test_history_rules_are_batch_invariant(backend: str) -> None:
    """A row with history rules gives the same outputs alone, and at any position of a batch of other rows."""
    dev = backend_device(backend)
    rng = np.random.default_rng(9)
    x = torch.from_numpy((rng.standard_normal((5, V)) * 2).astype(np.float32)).to(dev)
    target = SamplingParams(seed=3, no_repeat_ngram_size=2, bad_words_ids=[[1, 2], [4]], frequency_penalty=0.7,
                            penalty_last_n=3, logprobs=True, top_logprobs=3)
    hist = [0, 1, 2, 0, 1, 3, 3]
    alone = fastsampler.sample(x[:1], target, output_token_ids=[hist], steps=[7], backend=backend).numpy()
    for pos in (0, 2, 4):
        params = MIXED + [target] if pos == 4 else MIXED[:pos] + [target] + MIXED[pos:]
        outs = [[5, 5, 6]] * 5
        outs = outs[:pos] + [hist] + outs[pos + 1:]
        xs = torch.cat([x[1:pos + 1], x[:1], x[pos + 1:]]) if pos else x
        got = fastsampler.sample(xs, params[:5], output_token_ids=outs, steps=[7] * 5, backend=backend).numpy()
        assert got.tokens[pos] == alone.tokens[0]
        np.testing.assert_allclose(got.logprobs[pos], alone.logprobs[0], atol=1e-6)
        np.testing.assert_array_equal(got.top_logprob_ids[pos], alone.top_logprob_ids[0])
