"""Named benchmark scenarios (docs/benchmarks.md) and the inputs of one benchmark case.

A *case* is one (scenario, dtype, batch size, vocabulary size). Its inputs are several logits buffers of the same
shape (timing rotates through them so caches do not flatter small cases) plus the per-row state a scenario needs:
the generated-token history behind the penalties and the logit-bias entries.

Logits are drawn as ``3 * N(0, 1)``: with that spread top-p 0.9 keeps a few percent of the vocabulary, min-p 0.05 a
few dozen tokens and Mirostat v2 (tau 5) a few hundred, so no rule is trivially off. The first ``check_rows`` rows of
buffer 0 and every row's history are generated from per-row seeds, so they are the same at every batch size: the
reference distribution of those rows is computed once per (scenario, dtype, vocabulary) and reused for every batch
size in the validity check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..params import SamplingParams
from .grids import DEFAULT_SCENARIOS, MODEL_SCENARIOS

__all__ = ["Scenario", "SCENARIOS", "DEFAULT_SCENARIOS", "MODEL_SCENARIOS", "CaseInputs", "CheckInputs", "make_inputs",
           "check_inputs", "DTYPES", "LOGIT_SCALE"]

LOGIT_SCALE = 3.0
HISTORY_TOKENS = 256  # prior generated tokens per row in the "full" scenario
EXTENDED_HISTORY = 1024  # prior generated tokens per row in the "extended" scenario
BIAS_ENTRIES = 8  # logit-bias entries per row in the "full" scenario
TOP_LOGPROBS = 5

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Scenario:
    """A named parameter set. ``params(bias)`` builds the `SamplingParams` shared by every row of a case."""

    name: str
    description: str
    make_params: Callable[[dict[int, float]], SamplingParams]
    history: int = 0  # generated tokens per row (penalty state)
    bias_entries: int = 0

    def params(self, bias: dict[int, float] | None = None) -> SamplingParams:
        return self.make_params(bias or {})

    @property
    def history_rules(self) -> bool:
        """The params read the history in order (n-gram, bad words, penalty window, DRY): the state is passed as
        token sequences (``output_token_ids``), and providers without these rules do not apply."""
        p = self.params()
        return p.no_repeat_ngram_size > 0 or bool(p.bad_words_ids) or p.penalty_last_n >= 0 or p.dry_active

    @property
    def greedy(self) -> bool:
        return self.params().greedy


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("plain", "temperature 1, no truncation", lambda b: SamplingParams()),
        Scenario(
            "topk_topp_minp", "top-k 50 + top-p 0.9 + min-p 0.05",
            lambda b: SamplingParams(top_k=50, top_p=0.9, min_p=0.05),
        ),
        Scenario(
            "full",
            f"repetition 1.1 + frequency 0.2 + presence 0.2 over {HISTORY_TOKENS} generated tokens, "
            f"{BIAS_ENTRIES} logit-bias entries, temperature 0.8, top-k 50 + top-p 0.9 + min-p 0.05, "
            f"top-{TOP_LOGPROBS} logprobs",
            lambda b: SamplingParams(
                temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.2,
                presence_penalty=0.2, logit_bias=b, logprobs=True, top_logprobs=TOP_LOGPROBS,
            ),
            history=HISTORY_TOKENS,
            bias_entries=BIAS_ENTRIES,
        ),
        Scenario(
            "extended",
            f"the full scenario over {EXTENDED_HISTORY} generated tokens, plus no-repeat 3-grams, 3 bad words (1 to 3 "
            f"tokens), a penalty window of the last 256 tokens, DRY (0.8, 1.75, 2, two breakers), top-n-sigma 2, "
            f"eta 1e-3, XTC (0.5, 0.1) and dynamic temperature (range 0.3)",
            lambda b: SamplingParams(
                temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.2,
                presence_penalty=0.2, logit_bias=b, logprobs=True, top_logprobs=TOP_LOGPROBS,
                no_repeat_ngram_size=3, bad_words_ids=[[5, 6, 7], [8, 9], [10]], penalty_last_n=256,
                dry_multiplier=0.8, dry_sequence_breakers=[[11], [12, 13]], top_n_sigma=2.0, eta_cutoff=1e-3,
                xtc_probability=0.5, xtc_threshold=0.1, dynatemp_range=0.3,
            ),
            history=EXTENDED_HISTORY,
            bias_entries=BIAS_ENTRIES,
        ),
        Scenario("typical", "typical-p 0.9", lambda b: SamplingParams(typical_p=0.9)),
        Scenario("mirostat_v2", "Mirostat v2, tau 5 bits, eta 0.1",
                 lambda b: SamplingParams(mirostat_mode=2, mirostat_target=5.0, mirostat_lr=0.1)),
        Scenario("greedy", "temperature 0 (argmax)", lambda b: SamplingParams(temperature=0.0)),
        Scenario("top_p", "top-p 0.9 over the full vocabulary", lambda b: SamplingParams(top_p=0.9)),
        Scenario("mirostat_v1", "Mirostat v1, tau 5 bits, eta 0.1",
                 lambda b: SamplingParams(mirostat_mode=1, mirostat_target=5.0, mirostat_lr=0.1)),
    )
}

# The names, the timing benchmark's default scenarios (`DEFAULT_SCENARIOS`) and the cost model's (`MODEL_SCENARIOS`)
# are written in `fastsampler.bench.grids` (``SCENARIO_NAMES`` lists `SCENARIOS` in order, ``DTYPE_NAMES`` `DTYPES`:
# tests/test_bench.py checks both), which the command line reads without importing torch.


@dataclass
class CaseInputs:
    """Everything a provider needs for one case; tensors live on ``device``."""

    scenario: Scenario
    dtype_name: str
    batch: int
    vocab: int
    device: torch.device
    params: SamplingParams
    buffers: list[torch.Tensor]  # rotating (batch, vocab) logits of ``dtype``
    seed: int
    check_rows: int
    history_ids: torch.Tensor | None = None  # (batch, H) int64 generated tokens
    output_counts: torch.Tensor | None = None  # (batch, vocab) int32 counts of history_ids
    bias_ids: torch.Tensor | None = None  # (batch, n) int64
    bias_vals: torch.Tensor | None = None  # (batch, n) float32
    history_lists: list[list[int]] | None = None  # history_ids as host lists (scenarios with history rules)
    extra: dict = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def logit_bytes(self) -> int:
        """Bytes of one logits buffer: the floor of what a sampler must read."""
        return self.batch * self.vocab * self.buffers[0].element_size()

    def state_kwargs(self) -> dict:
        """Penalty state in the form `fastsampler.sample` takes from an engine that keeps it on the device (the
        token sequences where the history rules read them in order)."""
        if self.history_lists is not None:
            return {"output_token_ids": self.history_lists}
        return {} if self.output_counts is None else {"output_counts": self.output_counts}


def _row_generator(seed: int, row: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + row * 7919 + salt) % (1 << 62))
    return g


def n_buffers_for(batch: int, vocab: int, elem: int, device: torch.device, max_buffers: int = 16) -> int:
    """How many logits buffers to rotate: enough to exceed the last-level cache twice, within a memory cap."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        cache = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
        mem_cap = 2 << 30
    else:
        cache = 64 << 20
        mem_cap = 512 << 20
    nbytes = max(1, batch * vocab * elem)
    want = -(-2 * cache // nbytes)
    return int(max(2, min(max_buffers, want, max(2, mem_cap // nbytes))))


def make_inputs(
    scenario: Scenario,
    dtype_name: str,
    batch: int,
    vocab: int,
    device: torch.device,
    *,
    seed: int = 1234,
    check_rows: int = 4,
    n_buffers: int | None = None,
) -> CaseInputs:
    """Build the rotating logits buffers and the per-row state of one case."""
    dtype = DTYPES[dtype_name]
    elem = torch.empty(0, dtype=dtype).element_size()
    nbuf = n_buffers or n_buffers_for(batch, vocab, elem, device)
    check_rows = min(check_rows, batch)
    g = torch.Generator(device=device)
    g.manual_seed(seed + batch * 131 + vocab)
    buffers = []
    for _ in range(nbuf):
        x = torch.randn(batch, vocab, device=device, generator=g, dtype=torch.float32).mul_(LOGIT_SCALE)
        buffers.append(x.to(dtype))
    # rows compared against the reference: the same at every batch size
    buffers[0][:check_rows] = _fixed_rows(seed, vocab, check_rows).to(device=device, dtype=dtype)

    params = scenario.params(_bias(scenario, vocab, seed))
    inp = CaseInputs(scenario=scenario, dtype_name=dtype_name, batch=batch, vocab=vocab, device=device,
                     params=params, buffers=buffers, seed=seed, check_rows=check_rows)
    if scenario.history:
        hist = _history(scenario, vocab, seed, batch)
        inp.history_ids = hist.to(device)
        inp.output_counts = _counts(hist, vocab).to(device)
        if scenario.history_rules:
            inp.history_lists = hist.tolist()
    if params.logit_bias:
        ids_t = torch.tensor(list(params.logit_bias), dtype=torch.int64)
        vals_t = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32)
        inp.bias_ids = ids_t.expand(batch, -1).contiguous().to(device)
        inp.bias_vals = vals_t.expand(batch, -1).contiguous().to(device)
    return inp


def _fixed_rows(seed: int, vocab: int, rows: int) -> torch.Tensor:
    """(rows, vocab) float32: the checked rows, independent of the batch size."""
    if rows == 0:
        return torch.zeros(0, vocab)
    return torch.stack([torch.randn(vocab, generator=_row_generator(seed, r, vocab)) * LOGIT_SCALE
                        for r in range(rows)])


def _bias(scenario: Scenario, vocab: int, seed: int) -> dict[int, float]:
    if not scenario.bias_entries:
        return {}
    rng = np.random.default_rng(seed + vocab)
    ids = rng.choice(vocab, size=min(scenario.bias_entries, vocab), replace=False)
    vals = rng.uniform(-5.0, 5.0, size=len(ids))
    return {int(i): float(round(v, 3)) for i, v in zip(ids, vals, strict=True)}


def _history(scenario: Scenario, vocab: int, seed: int, rows: int) -> torch.Tensor:
    """(rows, H) int64 generated tokens, Zipf-like (low ids repeat, as frequent tokens do in real text)."""
    return torch.stack([
        (torch.rand(scenario.history, generator=_row_generator(seed, r, 17)).pow(3.0) * vocab).long()
        for r in range(rows)
    ]).clamp_(max=vocab - 1)


def _counts(hist: torch.Tensor, vocab: int) -> torch.Tensor:
    counts = torch.zeros(hist.shape[0], vocab, dtype=torch.int32)
    counts.scatter_add_(1, hist, torch.ones_like(hist, dtype=torch.int32))
    return counts


@dataclass
class CheckInputs:
    """The checked rows of every case of one (scenario, dtype, vocabulary), on the CPU."""

    logits: torch.Tensor  # (rows, vocab) float32, values as representable in the case's dtype
    params: SamplingParams
    output_counts: torch.Tensor | None
    seed: int
    history: list[list[int]] | None = None  # the generated tokens in order (scenarios with history rules)

    def state_kwargs(self) -> dict:
        """The penalty state as `fastsampler.reference` takes it."""
        if self.history is not None:
            return {"output_token_ids": self.history}
        return {} if self.output_counts is None else {"output_counts": self.output_counts.numpy()}


def check_inputs(scenario: Scenario, dtype_name: str, vocab: int, rows: int, *, seed: int = 1234) -> CheckInputs:
    """The rows the validity check compares, exactly as `make_inputs` puts them in buffer 0 at any batch size."""
    logits = _fixed_rows(seed, vocab, rows).to(DTYPES[dtype_name]).float()
    hist = _history(scenario, vocab, seed, rows) if scenario.history else None
    counts = None if hist is None else _counts(hist, vocab)
    lists = hist.tolist() if hist is not None and scenario.history_rules else None
    return CheckInputs(logits, scenario.params(_bias(scenario, vocab, seed)), counts, seed, lists)
