"""`fastsampler.integrations.transformers.generate` on a tiny random-weight Llama built from a config (no download):
greedy equals transformers' greedy, sampled tokens and logprobs equal a step-by-step loop over the reference backend
on the model's own logits, rows are batch-invariant, and fields the integration cannot honour raise."""

from __future__ import annotations

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import fastsampler  # noqa: E402
from fastsampler.integrations.transformers import generate, sampling_params_from_generation_config  # noqa: E402

PAD, BOS, EOS = 0, 1, 2
V = 320  # not a multiple of 32 words' worth of rows: the last bitmask word is partial


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper logits than the random init's near-uniform ones, so truncation rules bite
        m.lm_head.weight.mul_(40.0)
    return m


# three prompts of different lengths, left-padded
PROMPTS = [[BOS, 17, 29, 44, 5, 6], [BOS, 99, 7], [BOS, 250, 251, 252, 13]]


def batch(prompts=PROMPTS):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference_loop(res, prompts, n=1, *, eos=(EOS,)):
    """Each row's tokens and logprobs drawn again by the reference backend, one step at a time, from the raw logits
    transformers recorded (output_logits=True), with the row's params, seed, seq and history."""
    logits = res.output.logits
    rows = []
    for r, params in enumerate(res.params):
        prompt, toks, lps, ranks, tops = prompts[r // n], [], [], [], []
        for t in range(len(res.tokens[r])):
            out = fastsampler.sample(logits[t][r:r + 1].numpy(), params, prompt_token_ids=[prompt],
                                     output_token_ids=[toks], steps=[t], seqs=[res.seqs[r]], eos_token_ids=list(eos),
                                     backend="reference")
            toks.append(int(out.tokens[0]))
            lps.append(float(out.logprobs[0]))
            ranks.append(int(out.ranks[0]))
            tops.append(out.top_logprob_ids[0, :params.top_logprobs].tolist())
        rows.append((toks, lps, ranks, tops))
    return rows


def test_greedy_equals_transformers_greedy(model) -> None:
    ids, mask = batch()
    for kw in ({}, {"repetition_penalty": 1.5}, {"min_new_tokens": 4, "suppress_tokens": [7, 8, 9]},
               {"bad_words_ids": [[44], [5, 6, 7]]}):
        hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, **kw)
        ours = generate(model, ids, attention_mask=mask, do_sample=False, max_new_tokens=12, **kw)
        assert torch.equal(hf, ours.sequences), kw
        assert all(p.temperature == 0.0 for p in ours.params)
    # no_repeat_ngram_size reads the whole input in transformers, left padding included: compare unpadded prompts
    ids1 = torch.tensor([PROMPTS[0], [BOS, 250, 251, 252, 13, 14]])
    hf = model.generate(ids1, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=2)
    assert torch.equal(hf, generate(model, ids1, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=2).sequences)


SAMPLING = [
    dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2),
    dict(do_sample=True, top_k=0, min_p=0.05, typical_p=0.9, no_repeat_ngram_size=2),
    dict(do_sample=True, top_k=0, epsilon_cutoff=3e-4, bad_words_ids=[[17, 29], [250]], num_return_sequences=2),
    dict(do_sample=True, top_k=0, eta_cutoff=1e-3, params={"frequency_penalty": 0.5, "presence_penalty": 0.5}),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kw", SAMPLING, ids=["topk-topp-rep", "minp-typical-ngram", "eps-badwords-n2", "eta-freq"])
def test_sampling_equals_reference_loop(model, kw, backend) -> None:
    ids, mask = batch()
    n = kw.get("num_return_sequences", 1)
    res = generate(model, ids, attention_mask=mask, max_new_tokens=10, seeds=[11, 22, 2**64 - 1], logprobs=True,
                   top_logprobs=3, backend=backend, return_dict_in_generate=True, output_logits=True, **kw)
    assert res.seeds == [s for s in (11, 22, 2**64 - 1) for _ in range(n)]
    assert res.seqs == [j for _ in PROMPTS for j in range(n)]
    ref = reference_loop(res, PROMPTS, n)
    tol = 0.0 if backend == "reference" else 1e-4
    for r, (toks, lps, ranks, tops) in enumerate(ref):
        assert res.tokens[r] == toks, (r, res.tokens[r], toks)
        np.testing.assert_allclose(res.logprobs[r], lps, rtol=tol, atol=tol)
        assert res.ranks[r] == ranks and res.top_logprob_ids[r] == tops
        gen = res.sequences[r, ids.shape[1]:].tolist()
        assert gen[:len(toks)] == toks  # transformers appended fastsampler's tokens
    if n > 1:  # the samples of one request differ (seq), however alike their prompt and seed
        assert res.tokens[0] != res.tokens[1]


def test_tokens_equal_a_loop_over_the_model_forward(model) -> None:
    """Independent of transformers' generate loop: recompute the logits from the whole sequence each step and draw
    with the reference backend."""
    prompt = PROMPTS[0]
    kw = dict(do_sample=True, temperature=0.7, top_p=0.95, repetition_penalty=1.3)
    res = generate(model, torch.tensor([prompt]), max_new_tokens=8, seeds=5, **kw)
    params = sampling_params_from_generation_config(dict(kw, top_k=50), seed=5)
    toks: list[int] = []
    with torch.no_grad():
        for t in range(8):
            logits = model(torch.tensor([prompt + toks])).logits[:, -1].float()
            out = fastsampler.sample(logits, params, prompt_token_ids=[prompt], output_token_ids=[toks], steps=[t],
                                     eos_token_ids=[EOS], backend="reference")
            toks.append(int(out.tokens[0]))
            if toks[-1] == EOS:
                break
    assert res.tokens[0] == toks
    assert res.params[0] == params


def test_rows_are_batch_invariant(model) -> None:
    kw = dict(do_sample=True, top_k=40, top_p=0.9, max_new_tokens=10, repetition_penalty=1.1)
    ids, mask = batch()
    together = generate(model, ids, attention_mask=mask, seeds=[3, 4, 5], **kw)
    for r, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), seeds=[3 + r], **kw)
        assert alone.tokens[0] == together.tokens[r]
    shuffled = [2, 0, 1]
    ids2, mask2 = batch([PROMPTS[i] for i in shuffled])
    other = generate(model, ids2, attention_mask=mask2, seeds=[3 + i for i in shuffled], **kw)
    assert [other.tokens[shuffled.index(r)] for r in range(3)] == together.tokens


def test_seeds_replay_and_finished_rows(model) -> None:
    ids, mask = batch()
    # min_length counts each row's own prompt: the rows may stop at different steps, and a finished row is padded
    kw = dict(do_sample=True, max_new_tokens=12, min_length=9, params={"logit_bias": {EOS: 100.0}},
              begin_suppress_tokens=[int(t) for t in range(3, 200)])
    res = generate(model, ids, attention_mask=mask, **kw)
    again = generate(model, ids, attention_mask=mask, seeds=res.seeds, **kw)
    assert again.tokens == res.tokens
    lengths = [len(t) for t in res.tokens]
    assert lengths == [max(9 - len(p), 0) + 1 for p in PROMPTS]  # EOS as soon as allowed (bias 100)
    for r, toks in enumerate(res.tokens):
        assert toks[-1] == EOS and EOS not in toks[:-1]
        assert not 3 <= toks[0] < 200  # begin_suppress_tokens: the first generated token only
        tail = res.sequences[r, ids.shape[1] + len(toks):]
        assert (tail == PAD).all()
    assert [p.min_tokens for p in res.params] == [max(9 - len(p), 0) for p in PROMPTS]


def test_generation_config_and_model_defaults_are_mapped(model) -> None:
    ids, mask = batch()
    gc = transformers.GenerationConfig(do_sample=True, temperature=0.6, top_k=0, top_p=0.8, max_new_tokens=6,
                                       sequence_bias={(5,): -3.0})
    res = generate(model, ids, attention_mask=mask, generation_config=gc, seeds=1)
    p = res.params[0]
    assert (p.temperature, p.top_k, p.top_p, dict(p.logit_bias), p.seed) == (0.6, -1, 0.8, {5: -3.0}, 1)
    # transformers fills the unset fields from model.generation_config, then its global defaults (top_k 50)
    saved = model.generation_config
    try:
        model.generation_config = transformers.GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                                                                do_sample=True, repetition_penalty=1.3, top_p=0.7)
        res = generate(model, ids, attention_mask=mask, max_new_tokens=6, seeds=[1, 2, 3],
                       return_dict_in_generate=True, output_logits=True)
    finally:
        model.generation_config = saved
    p = res.params[0]
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (1.0, 50, 0.7, 1.3)
    for r, (toks, *_rest) in enumerate(reference_loop(res, PROMPTS)):  # the penalty applied once, not twice
        assert res.tokens[r] == toks


def test_unsupported_fields_raise(model) -> None:
    ids, mask = batch()
    base = dict(attention_mask=mask, max_new_tokens=3)
    cases = [
        (dict(num_beams=2), "num_beams=2"),
        (dict(forced_eos_token_id=EOS), "forced_eos_token_id"),
        (dict(do_sample=True, top_h=0.5), "top_h"),
        (dict(exponential_decay_length_penalty=(2, 1.5)), "exponential_decay_length_penalty"),
        (dict(sequence_bias={(5, 6): 1.0}), "one-token sequences"),
        (dict(logits_processor=transformers.LogitsProcessorList()), "logits_processor"),
        (dict(streamer=object()), "streamer"),
        (dict(seeds=[1, 2]), r"one seed per prompt \(3\) or per returned sequence \(3\), got 2"),
        (dict(params={"seed": 3}), "pass seeds= instead"),
        (dict(params={"n": 2}), "pass num_return_sequences= instead"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(model, ids, **base, **kw)


def test_a_row_with_nothing_left_to_draw_raises(model) -> None:
    ids, mask = batch()
    with pytest.raises(RuntimeError, match=r"no token to draw for row\(s\) \[0, 1, 2\]"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2, suppress_tokens=list(range(V)))
