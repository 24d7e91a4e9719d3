"""Speculative verification (`Sampler.verify`, `fastsampler.reference.verify`, docs/semantics.md §11): the match
method gives the tokens of non-speculative decoding, the rejection method equals the reference on every backend and
its tokens follow the target distribution (chi-square), and slots advance by the emitted tokens only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler import Sampler, SamplingParams, reference
from fastsampler._speculative import philox4x32 as torch_philox
from fastsampler.backends.reference.philox import philox4x32
from tests.backend_checks import ATOL, backend_device, backend_params, unavailable

V = 64
EOS = 3
REQUESTS = [
    SamplingParams(seed=21, temperature=0.9, top_k=12, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.4,
                   min_tokens=3, logprobs=True, top_logprobs=2),
    SamplingParams(seed=22, mirostat_mode=2, mirostat_target=3.0, mirostat_lr=0.3, presence_penalty=0.5),
    SamplingParams(seed=23, mirostat_mode=1, mirostat_target=4.0, banned_token_ids=[0, 1], logprobs=True),
    SamplingParams(seed=24, temperature=0.0, frequency_penalty=0.3),
    SamplingParams(seed=25, temperature=1.2, min_p=0.05, logit_bias={7: 3.0}, logprobs=True,
                   logprobs_mode="final"),
]
B = len(REQUESTS)
PROMPTS = [[5, 6, 7], [8], [], [9, 10, 11, 12], [13]]


def _logits_at(step: int) -> torch.Tensor:
    """The target's logits of every row at ``step`` (a function of the step alone, so that a step-by-step run and
    a speculative one see the same logits at the same step)."""
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(B, V, generator=g) * 2.0


def _sampler(backend: str) -> tuple[Sampler, list[int]]:
    s = Sampler(V, B, device=backend_device(backend), backend=backend, eos_token_ids=[EOS])
    slots = [s.add(p, prompt_token_ids=pr)[0] for p, pr in zip(REQUESTS, PROMPTS, strict=True)]
    return s, slots


def _stepwise(backend: str, n: int) -> tuple[np.ndarray, list[list]]:
    """``n`` ordinary steps: the tokens (B, n), and every slot's state after each number of steps (``n + 1``
    lists of B)."""
    s, slots = _sampler(backend)
    dev = backend_device(backend)
    states = [[s.export(x) for x in slots]]
    toks = []
    for t in range(n):
        toks.append(s.sample(_logits_at(t).to(dev), slots).tokens.cpu().numpy())
        states.append([s.export(x) for x in slots])
    return np.stack(toks, 1), states


@pytest.mark.parametrize("backend", backend_params())
def test_match_gives_the_tokens_of_stepwise_decoding(backend: str) -> None:
    n, k = 8, 3
    truth, states = _stepwise(backend, n + k)
    s, slots = _sampler(backend)
    dev = backend_device(backend)
    rng = np.random.default_rng(0)
    pos = [0] * B
    done = [False] * B  # the request ended (EOS)
    ended = 0
    while any(pos[b] < n and not done[b] for b in range(B)):
        rows = [b for b in range(B) if pos[b] < n and not done[b]]
        logits = torch.stack([torch.stack([_logits_at(pos[b] + j)[b] for j in range(k + 1)]) for b in rows])
        drafts = np.stack([truth[b, pos[b]:pos[b] + k] for b in rows]).copy()
        wrong = rng.integers(0, k + 1, len(rows))  # the first wrong draft per row (k: all right)
        for i in range(len(rows)):
            if wrong[i] < k:
                drafts[i, wrong[i]] = (drafts[i, wrong[i]] + 1) % V
        out = s.verify(logits.to(dev), drafts, [slots[b] for b in rows])
        nt, na = out.num_tokens.cpu().numpy(), out.num_accepted.cpu().numpy()
        stopped = out.stopped.cpu().numpy()
        for i, b in enumerate(rows):
            got = out.tokens[i, :nt[i]].cpu().tolist()
            assert got == truth[b, pos[b]:pos[b] + nt[i]].tolist(), (b, got)
            assert (out.tokens[i, nt[i]:] == -1).all()
            # the row ends at its first wrong draft (emitting the target's token there), or at an EOS
            eos_at = [j for j, tok in enumerate(truth[b, pos[b]:pos[b] + k + 1]) if tok == EOS]
            end = min([int(min(wrong[i], k))] + eos_at)
            assert nt[i] == end + 1 and stopped[i] == (end in eos_at), (b, nt[i], end, eos_at)
            assert na[i] == end + int(end < min(wrong[i], k))  # an EOS draft that was right is accepted
            pos[b] += int(nt[i])
            done[b] = bool(stopped[i])
            ended += int(stopped[i])
    assert ended  # (the case covers a request that ends on EOS inside a verification)
    # every slot holds exactly the state of the step-by-step run after as many tokens
    for b in range(B):
        st, want = s.export(slots[b]), states[pos[b]][b]
        assert st.step == want.step == pos[b]
        np.testing.assert_array_equal(st.output_counts, want.output_counts)
        np.testing.assert_allclose(st.mirostat_mu, want.mirostat_mu, atol=ATOL, equal_nan=True)


def _rejection_case(seed: int, k: int, with_q: bool) -> tuple[torch.Tensor, np.ndarray, torch.Tensor | None]:
    """Target logits, drafts and (``with_q``) draft distributions close to the target's, so that drafts are
    accepted often and rejected often."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, k + 1, V, generator=g) * 3.0
    q = None
    if with_q:
        q = torch.softmax(logits[:, :k] + torch.randn(B, k, V, generator=g), -1)
        drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, k).numpy()
    else:  # n-gram drafts: the target's argmax, or a random token
        drafts = logits[:, :k].argmax(-1).numpy()
        rand = torch.rand(B, k, generator=g).numpy() < 0.3
        drafts[rand] = torch.randint(0, V, (int(rand.sum()),), generator=g).numpy()
    return logits, drafts, q


@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("backend", backend_params())
def test_rejection_matches_the_reference(backend: str, with_q: bool) -> None:
    dev = backend_device(backend)
    s, slots = _sampler(backend)
    for rnd in range(3):
        logits, drafts, q = _rejection_case(100 * rnd + int(with_q), 3, with_q)
        before = [s.export(x) for x in slots]
        got = s.verify(logits.to(dev), drafts, slots, draft_probs=None if q is None else q.to(dev),
                       method="rejection").numpy()
        want = reference.verify(
            logits, drafts, REQUESTS, draft_probs=q, method="rejection", prompt_token_ids=PROMPTS,
            output_token_ids=[np.repeat(np.arange(V), st.output_counts).tolist() for st in before],
            steps=[st.step for st in before], mirostat_mu=[st.mirostat_mu for st in before],
            eos_token_ids=[EOS])
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.num_tokens, want.num_tokens)
        np.testing.assert_array_equal(got.num_accepted, want.num_accepted)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=ATOL, equal_nan=True)
        np.testing.assert_array_equal(got.ranks, want.ranks)
        np.testing.assert_array_equal(got.top_logprob_ids, want.top_logprob_ids)
        np.testing.assert_allclose(got.mirostat_mu, want.mirostat_mu, atol=ATOL, equal_nan=True)
        for b, x in enumerate(slots):
            assert s.step_of(x) == before[b].step + got.num_tokens[b]
            counts = s.output_counts_of(x).cpu().numpy().astype(np.int64) - before[b].output_counts
            np.testing.assert_array_equal(counts, np.bincount(got.tokens[b, :got.num_tokens[b]], minlength=V))


@pytest.mark.parametrize("backend", backend_params())
def test_match_equals_the_reference_and_k0_is_a_step(backend: str) -> None:
    dev = backend_device(backend)
    s, slots = _sampler(backend)
    t, _ = _sampler(backend)
    u, _ = _sampler(backend)
    logits, drafts, _ = _rejection_case(7, 2, False)
    got = s.verify(logits.to(dev), drafts, slots).numpy()
    want = reference.verify(logits, drafts, REQUESTS, prompt_token_ids=PROMPTS, eos_token_ids=[EOS])
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=ATOL, equal_nan=True)
    one = t.verify(logits[:, :1].to(dev), np.zeros((B, 0), dtype=np.int64), slots)
    ref = u.sample(logits[:, 0].to(dev), slots)
    np.testing.assert_array_equal(one.tokens[:, 0].cpu().numpy(), ref.tokens.cpu().numpy())
    assert one.num_tokens.tolist() == [1] * B and one.num_accepted.tolist() == [0] * B


@pytest.mark.parametrize("backend", backend_params())
def test_rejection_is_batch_invariant(backend: str) -> None:
    dev = backend_device(backend)
    logits, drafts, q = _rejection_case(3, 2, True)
    s, slots = _sampler(backend)
    full = s.verify(logits.to(dev), drafts, slots, draft_probs=q.to(dev)).numpy()
    for b in (0, 2, 4):
        t, tslots = _sampler(backend)
        one = t.verify(logits[b:b + 1].to(dev), drafts[b:b + 1], [tslots[b]], draft_probs=q[b:b + 1].to(dev)).numpy()
        np.testing.assert_array_equal(one.tokens[0], full.tokens[b])


def _chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.skipif(bool(unavailable("cpu")), reason="needs the C++ backend (many slots)")
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "one_hot"])
def test_rejection_follows_the_target_distribution(with_q: bool) -> None:
    """Whatever the draft, the first emitted token is distributed as the target ``p`` (chi-square, 5 degrees of
    freedom: below 20.5, the 0.1 % critical value, for these fixed seeds)."""
    n, v = 6000, 6
    s = Sampler(v, n, backend="cpu")
    slots = [s.add(SamplingParams(seed=1000 + i, temperature=1.0))[0] for i in range(n)]
    target = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -3.0])
    p = torch.softmax(target, 0).numpy()
    logits = target.expand(n, 2, v).contiguous()
    g = torch.Generator().manual_seed(5)
    if with_q:
        q = torch.softmax(torch.tensor([-1.0, 0.0, 1.0, 2.0, 0.5, 1.5]), 0).expand(n, 1, v).contiguous()
        drafts = torch.multinomial(q[:, 0], 1, generator=g)
    else:
        q, drafts = None, torch.full((n, 1), 3)
    out = s.verify(logits, drafts, slots, draft_probs=q, method="rejection")
    first = out.tokens[:, 0].numpy()
    assert (first >= 0).all()
    assert _chi_square(np.bincount(first, minlength=v), p) < 20.5
    # the acceptance rate is sum(min(p, q)) (one-hot q: p[3])
    rate = float(np.minimum(p, q[0, 0].numpy()).sum()) if q is not None else float(p[3])
    assert abs(out.num_accepted.float().mean().item() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)


def test_torch_uniforms_equal_the_reference() -> None:
    from fastsampler._speculative import verify_uniforms
    from fastsampler.backends.reference.speculative import verify_uniforms as ref_uniforms

    seeds = [0, 1, 2**63 - 1, 2**64 - 1, 12345678901234567]
    steps, seqs = [0, 7, 2**32 + 3, 5, 2**40], [0, 1, 2, 2**33, 9]
    got = verify_uniforms(torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds]), torch.tensor(steps),
                          torch.tensor(seqs))
    for i in range(len(seeds)):
        want = ref_uniforms(seeds[i], steps[i], seqs[i])
        assert (got[0][i].item(), got[1][i].item()) == want
        assert 0 < want[0] < 1 and 0 < want[1] < 1


def test_torch_philox_equals_the_reference() -> None:
    rng = np.random.default_rng(1)
    key = rng.integers(0, 2**32, (50, 2), dtype=np.uint64)
    ctr = rng.integers(0, 2**32, (50, 4), dtype=np.uint64)
    key[0], ctr[0] = 2**32 - 1, 2**32 - 1
    want = philox4x32(key, ctr)
    t = [torch.from_numpy(a.astype(np.int64)) for a in (*key.T, *ctr.T)]
    got = torch.stack(torch_philox((t[0], t[1]), (t[2], t[3], t[4], t[5])), 1).numpy()
    np.testing.assert_array_equal(got, want.astype(np.int64))


@pytest.mark.parametrize(("call", "err", "match"), [
    (lambda s, x: s.verify(x[:, 0], [[1]], [0]), ValueError, "shape"),
    (lambda s, x: s.verify(x, [[1, 2]], [0]), ValueError, "draft_tokens must have shape"),
    (lambda s, x: s.verify(x, [[V]], [0]), ValueError, "outside the vocabulary"),
    (lambda s, x: s.verify(x, [[1.5]], [0]), TypeError, "integer token ids"),
    (lambda s, x: s.verify(x, [[1]], [0], draft_probs=torch.ones(1, 1, V), method="match"), ValueError,
     "takes no draft_probs"),
    (lambda s, x: s.verify(x, [[1]], [0], method="typical"), ValueError, "method"),
    (lambda s, x: s.verify(x, [[1]], [0], draft_probs=torch.ones(1, 2, V)), ValueError, "draft_probs must have"),
    (lambda s, x: s.verify(x, [[1]], [0], draft_probs=-torch.ones(1, 1, V)), ValueError, "non-negative"),
    (lambda s, x: s.verify(x, [[1]], [1]), ValueError, "not in use"),
])
def test_bad_input_is_refused(call, err: type, match: str) -> None:
    s = Sampler(V, 2, backend="reference")
    s.add(SamplingParams(seed=1))
    with pytest.raises(err, match=match):
        call(s, torch.zeros(1, 2, V))
    assert s.step_of(0) == 0


def test_numpy_logits_give_numpy_outputs() -> None:
    s = Sampler(V, 1, backend="reference")
    s.add(SamplingParams(temperature=0.0))
    x = np.zeros((1, 3, V), dtype=np.float32)
    x[0, :, 4] = 5.0
    out = s.verify(x, np.array([[4, 5]]), [0])
    assert isinstance(out.tokens, np.ndarray)
    assert out.tokens.tolist() == [[4, 4, -1]] and out.num_tokens.tolist() == [2]
    assert isinstance(fastsampler.VerifyOutput, type)
