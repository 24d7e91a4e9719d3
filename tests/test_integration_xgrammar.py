"""A `fastsampler.Sampler` driven by xgrammar's token bitmasks (a `GrammarMatcher` over a small vocabulary list, no
download): every sampled token is accepted by the matcher, generation ends at the grammar's end, and the output
parses as JSON. xgrammar's bitmask (int32 words, bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed) is
fastsampler's ``token_bitmask`` layout (docs/semantics.md §3 A), so it is passed as it is."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

import fastsampler  # noqa: E402
from fastsampler import Sampler, SamplingParams  # noqa: E402

# single characters for JSON syntax, digits, letters and whitespace, a few multi-character tokens, then EOS
VOCAB = (list('{}[],:"0123456789-.eE +abcdefghijklmnopqrstuvwxyz\n')
         + ['{"', '":', '",', '"}', '":"', 'true', 'false', 'null', 'name', 'age', '12', '</s>'])
EOS = len(VOCAB) - 1
# tokens that close a value, raised so that random logits finish a document in a few dozen steps
CLOSING = [VOCAB.index(t) for t in ('}', ']', '"', '"}', ',')] + [EOS]

SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
                   "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}},
    "required": ["name", "age", "ok"],
})


@pytest.fixture(scope="module")
def compiler():
    info = xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    return xgr.GrammarCompiler(info, max_threads=1)


def grammars(compiler):
    return {"builtin-json": compiler.compile_builtin_json_grammar(), "schema": compiler.compile_json_schema(SCHEMA)}


def test_bitmask_layout_is_fastsamplers(compiler) -> None:
    """The tokens xgrammar's own masking keeps are the tokens fastsampler's token_bitmask allows."""
    matcher = xgr.GrammarMatcher(compiler.compile_builtin_json_grammar())
    for prefix in ([], ['{"'], ['{"', "name", '":'], ["[", "1", ","], ['{"', "a", '":', "[", "t", "r"]):
        matcher.reset()
        assert all(matcher.accept_token(VOCAB.index(t)) for t in prefix)
        bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
        matcher.fill_next_token_bitmask(bitmask)
        assert bitmask.dtype == torch.int32 and bitmask.shape == (1, (len(VOCAB) + 31) // 32)
        kept = torch.zeros(1, len(VOCAB))
        xgr.apply_token_bitmask_inplace(kept, bitmask)
        probs = fastsampler.sampling_probs(torch.zeros(1, len(VOCAB)), SamplingParams(), token_bitmask=bitmask,
                                           backend="reference")
        assert torch.equal(torch.isfinite(kept[0]), torch.as_tensor(probs[0]) > 0), prefix


def generate_json(compiled, seeds, backend, *, max_tokens=200, bias=3.0):
    """One document per seed, all rows in one batch: fill each unfinished row's bitmask, sample, accept."""
    b = len(seeds)
    sampler = Sampler(vocab_size=len(VOCAB), max_slots=b, eos_token_ids=[EOS], backend=backend)
    slots = [sampler.add(SamplingParams(temperature=1.0, seed=s, logit_bias={t: bias for t in CLOSING}))[0]
             for s in seeds]
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(b)]
    bitmask = xgr.allocate_token_bitmask(b, len(VOCAB))
    gen = torch.Generator().manual_seed(1234)
    tokens: list[list[int]] = [[] for _ in range(b)]
    for _ in range(max_tokens):
        rows = [r for r in range(b) if not matchers[r].is_terminated()]
        if not rows:
            break
        for r in rows:
            matchers[r].fill_next_token_bitmask(bitmask, r)
        logits = torch.randn(b, len(VOCAB), generator=gen)[rows]
        out = sampler.sample(logits, [slots[r] for r in rows], token_bitmask=bitmask[rows])
        assert bool(out.valid.all())
        for r, t in zip(rows, out.tokens.tolist(), strict=True):
            assert matchers[r].accept_token(t), (r, tokens[r], VOCAB[t])
            tokens[r].append(t)
    assert all(m.is_terminated() for m in matchers), "a document did not finish within max_tokens"
    for toks in tokens:
        assert toks[-1] == EOS and EOS not in toks[:-1]
    return ["".join(VOCAB[t] for t in toks[:-1]) for toks in tokens]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("grammar", ["builtin-json", "schema"])
def test_sampled_documents_are_accepted_and_parse(compiler, grammar, backend) -> None:
    seeds = [0, 1, 2, 3, 2**63 + 5]
    texts = generate_json(grammars(compiler)[grammar], seeds, backend)
    docs = [json.loads(text) for text in texts]
    if grammar == "schema":
        for d in docs:
            assert {"name", "age", "ok"} <= set(d) and isinstance(d["age"], int) and isinstance(d["ok"], bool)
    assert len(set(texts)) > 1  # different seeds, different documents


def test_rows_alone_equal_rows_batched(compiler) -> None:
    compiled = compiler.compile_json_schema(SCHEMA)
    seeds = [7, 8, 9]

    # the logits of each row must not depend on the batch: draw them per row from a per-row generator
    def run(rows_seeds):
        b = len(rows_seeds)
        sampler = Sampler(vocab_size=len(VOCAB), max_slots=b, eos_token_ids=[EOS], backend="cpu")
        slots = [sampler.add(SamplingParams(seed=s, logit_bias={t: 3.0 for t in CLOSING}))[0] for s in rows_seeds]
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(b)]
        gens = [torch.Generator().manual_seed(s) for s in rows_seeds]
        bitmask = xgr.allocate_token_bitmask(b, len(VOCAB))
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        for _ in range(200):
            rows = [r for r in range(b) if not matchers[r].is_terminated()]
            if not rows:
                break
            for r in rows:
                matchers[r].fill_next_token_bitmask(bitmask, r)
            logits = torch.stack([torch.randn(len(VOCAB), generator=gens[r]) for r in rows])
            out = sampler.sample(logits, [slots[r] for r in rows], token_bitmask=bitmask[rows])
            for r, t in zip(rows, out.tokens.tolist(), strict=True):
                assert matchers[r].accept_token(t)
                out_tokens[r].append(t)
        return out_tokens

    together = run(seeds)
    assert [run([s])[0] for s in seeds] == together


def test_docs_example_runs() -> None:
    """docs/sampler.md § Grammar-constrained decoding with xgrammar runs as written."""
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "sampler.md").read_text()
    title = "## Grammar-constrained decoding with xgrammar"
    section = doc[doc.index(title):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    ns: dict = {}
    exec(compile(blocks[0], title, "exec"), ns)
    assert isinstance(json.loads(ns["text"]), dict)
