"""Hugging Face transformers: ``model.generate`` with every token drawn by fastsampler.

`generate` runs ``model.generate`` with its usual arguments (a `GenerationConfig`, ``max_new_tokens``,
``do_sample``, ``top_p``, an ``attention_mask`` for left-padded batches, ``num_return_sequences``, ...) and replaces
the token selection: the generation config is mapped to one `fastsampler.SamplingParams` per row, a
`fastsampler.Sampler` holds each row's state (seed, step, penalty counts, history), and each step's token is
fastsampler's draw from the model's raw logits. Hugging Face still runs the model, the cache, the stopping criteria
(EOS, ``max_length``, stop strings) and the padding of finished rows.

So a row's tokens depend only on its prompt, its parameters and its seed (docs/semantics.md §7: the draw at step
``s`` of a row is a function of ``(seed, s, seq)`` and the row's logits), not on the batch it was generated in, and
they equal a loop calling `fastsampler.sample` on the same logits.

The hook is ``model.generate(custom_generate=...)`` (a callable decoding method, transformers >= 4.56): transformers
prepares the inputs and the generation config, then hands over the decoding loop, which here runs transformers' own
sampling loop in greedy mode with one logits processor that returns ``0`` for fastsampler's token and ``-inf``
elsewhere. Every logits processor transformers built from the config is checked against the fields this module maps;
a field it cannot honour raises ``ValueError`` naming it.

Importing this module imports transformers; importing `fastsampler` does not.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("fastsampler.integrations.transformers needs transformers: pip install "
                      "'fastsampler[integrations]' (or pip install 'transformers>=4.56')") from e

from ..params import SamplingParams
from ..sampler import _MAX_HISTORY, Sampler

__all__ = ["GenerationResult", "generate", "sampling_params_from_generation_config"]

# The logits processors transformers builds from a generation config whose fields this module maps (they are dropped
# and their fields read from the config instead), by class name.
_MAPPED_PROCESSORS = frozenset({
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor",
    "NoBadWordsLogitsProcessor", "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor",
    "SuppressTokensLogitsProcessor", "SuppressTokensAtBeginLogitsProcessor", "SequenceBiasLogitsProcessor",
    "LogitNormalization",  # renormalize_logits: changes only the returned scores, never the token
})
# What the other processors come from, for the error message.
_UNSUPPORTED_PROCESSORS = {
    "ForcedBOSTokenLogitsProcessor": "forced_bos_token_id",
    "ForcedEOSTokenLogitsProcessor": "forced_eos_token_id",
    "InfNanRemoveLogitsProcessor": "remove_invalid_values",
    "ExponentialDecayLengthPenalty": "exponential_decay_length_penalty",
    "EncoderRepetitionPenaltyLogitsProcessor": "encoder_repetition_penalty",
    "EncoderNoRepeatNGramLogitsProcessor": "encoder_no_repeat_ngram_size",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance_scale",
    "TopHLogitsWarper": "top_h",
    "PrefixConstrainedLogitsProcessor": "prefix_allowed_tokens_fn",
    "SynthIDTextWatermarkLogitsProcessor": "watermarking_config",
    "WatermarkLogitsProcessor": "watermarking_config",
}
# generate() arguments this integration cannot take (the decoding loop is fastsampler's)
_REFUSED_ARGUMENTS = {
    "logits_processor": "fastsampler draws from the model's raw logits; express the rule as a GenerationConfig field "
                        "or a SamplingParams field in params=",
    "prefix_allowed_tokens_fn": "not supported by this integration",
    "assistant_model": "assisted (speculative) generation is not supported by this integration",
    "custom_generate": "this integration is itself the decoding method",
    "streamer": "transformers does not pass a streamer to a custom decoding method",
}


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes
    ----------
    sequences : (batch_size * num_return_sequences, L) int64 tensor
        As ``model.generate`` returns them: the (left-padded) prompts, then the generated tokens, padded with the pad
        id after a row finished.
    tokens : list of lists of int
        Each row's generated tokens, up to and including the one that ended it (EOS, a stop string).
    logprobs : list of lists of float, or None
        The logprob of each generated token in the requested ``logprobs_mode`` (None when ``logprobs=False``).
    ranks : list of lists of int, or None
        Each token's rank (1 = the most likely; docs/semantics.md §6).
    top_logprob_ids, top_logprobs : lists (row) of lists (step) of lists of N, or None
        The ``top_logprobs`` best ids and their logprobs at each step (None when ``top_logprobs=0``).
    seeds : list of int
        Each row's seed (drawn at random where none was given): passing them back reproduces the rows.
    seqs : list of int
        Each row's sample index within its request (``0 .. num_return_sequences - 1``; docs/semantics.md §7).
    params : list of SamplingParams
        The parameters each row was sampled with (the generation config mapped, plus ``params``).
    output : Any
        What ``model.generate`` returned: the sequences tensor, or a ``GenerateDecoderOnlyOutput`` when
        ``return_dict_in_generate=True`` (with ``logits`` when ``output_logits=True``: the raw logits fastsampler
        sampled from).
    """

    sequences: torch.Tensor
    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    ranks: list[list[int]] | None
    top_logprob_ids: list[list[list[int]]] | None
    top_logprobs: list[list[list[float]]] | None
    seeds: list[int]
    seqs: list[int]
    params: list[SamplingParams]
    output: Any = field(repr=False)


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(t) for t in value.reshape(-1).tolist()]
    if isinstance(value, int):
        return [value]
    return [int(t) for t in value]


def sampling_params_from_generation_config(config: Any, *, eos_token_ids: Sequence[int] = (),
                                           **overrides: Any) -> SamplingParams:
    """The `SamplingParams` of a transformers ``GenerationConfig`` (or its ``to_dict()``), as `generate` maps it.

    Fields read: ``do_sample`` (false or unset: greedy, ``temperature=0``), ``temperature``, ``top_k`` (0: off),
    ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff`` (the warpers, only when sampling, as in
    transformers), ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids`` (a one-token bad word that
    is an EOS id is dropped, as transformers drops it), ``suppress_tokens`` (``banned_token_ids``),
    ``sequence_bias`` (one-token sequences: ``logit_bias``; longer ones raise ``ValueError``) and
    ``min_new_tokens`` (``min_tokens``, when there are EOS ids). ``min_length`` and ``begin_suppress_tokens``
    depend on the row and the step: `generate` applies them. ``overrides`` are `SamplingParams` fields set last.

    >>> from transformers import GenerationConfig
    >>> p = sampling_params_from_generation_config(GenerationConfig(do_sample=True, top_p=0.9, top_k=0))
    >>> p.temperature, p.top_k, p.top_p
    (1.0, -1, 0.9)
    >>> sampling_params_from_generation_config(GenerationConfig(top_k=20, repetition_penalty=1.2)).temperature
    0.0
    """
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    get = cfg.get
    eos = set(_id_list(eos_token_ids))
    gc: dict[str, Any] = {name: get(name) for name in (
        "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
        "no_repeat_ngram_size")}
    gc["do_sample"] = bool(get("do_sample"))
    if get("bad_words_ids") is not None:
        gc["bad_words_ids"] = [list(w) for w in get("bad_words_ids") if not (len(w) == 1 and int(w[0]) in eos)]
        if not gc["bad_words_ids"]:
            del gc["bad_words_ids"]
    kw: dict[str, Any] = {}
    if get("suppress_tokens"):
        kw["banned_token_ids"] = _id_list(get("suppress_tokens"))
    if get("sequence_bias"):
        sb = get("sequence_bias")
        items = sb.items() if isinstance(sb, Mapping) else [(tuple(k), v) for k, v in sb]
        bias = {}
        for seq, value in items:
            seq = tuple(seq)
            if len(seq) != 1:
                raise ValueError(f"sequence_bias: only one-token sequences map to fastsampler's logit_bias, got "
                                 f"{list(seq)} ({len(seq)} tokens)")
            bias[int(seq[0])] = float(value)
        kw["logit_bias"] = bias
    if eos and (get("min_new_tokens") or 0) > 0:
        kw["min_tokens"] = int(get("min_new_tokens"))
    kw.update(overrides)
    return SamplingParams.from_generation_config(gc, **kw)


class _RecordingCriteria(StoppingCriteriaList):
    """transformers' stopping criteria, unchanged, recording which rows they finished (the rows fastsampler then
    stops drawing for)."""

    def __init__(self, criteria: StoppingCriteriaList) -> None:
        super().__init__(criteria)
        self.finished: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = super().__call__(input_ids, scores, **kwargs)
        self.finished = done.clone() if self.finished is None else self.finished | done
        return done


class _FastSamplerProcessor(LogitsProcessor):
    """Draws each unfinished row's token with a `Sampler`; returns scores that are ``0`` at that token and ``-inf``
    elsewhere, so the greedy loop around it takes fastsampler's token."""

    def __init__(self, run: _Run, criteria: _RecordingCriteria) -> None:
        self.run = run
        self.criteria = criteria
        self.sampler: Sampler | None = None
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        run = self.run
        if self.sampler is None:
            self.sampler = run.start(scores)
        fin = self.criteria.finished
        rows = list(range(scores.shape[0])) if fin is None else torch.nonzero(~fin.cpu()).flatten().tolist()
        new = torch.full_like(scores, -math.inf)
        new[:, run.pad_token_id] = 0.0  # finished rows: transformers writes its pad token there anyway
        if not rows:
            return new
        x = scores if len(rows) == scores.shape[0] else scores[rows]
        bitmask = run.begin_bitmask(len(rows), scores.device) if self.calls == 0 else None
        self.calls += 1
        out = self.sampler.sample(x, [run.slots[r] for r in rows], token_bitmask=bitmask)
        tokens = out.tokens.cpu()
        if not bool(out.valid.all()):
            bad = [rows[i] for i in torch.nonzero(~out.valid.cpu()).flatten().tolist()]
            raise RuntimeError(f"fastsampler found no token to draw for row(s) {bad} at generated position "
                               f"{[run.lengths[r] for r in bad]}: every token is masked (bans, bad words, "
                               f"n-grams, suppress_tokens) or the logits hold NaN / +inf")
        rows_t = torch.tensor(rows, device=scores.device)
        new[rows_t] = -math.inf
        new[rows_t, tokens.to(scores.device)] = 0.0
        run.record(rows, tokens, out)
        return new


class _Run:
    """One `generate` call: the mapped parameters, the Sampler's slots and what each step drew."""

    def __init__(self, seeds: Any, overrides: Mapping[str, Any], backend: str) -> None:
        self.seeds_arg = seeds
        self.overrides = dict(overrides)
        self.backend = backend

    # ------------------------------------------------------------------ the decoding method transformers calls
    def decode(self, model: Any, input_ids: torch.Tensor, logits_processor: LogitsProcessorList,
               stopping_criteria: StoppingCriteriaList, generation_config: Any, synced_gpus: bool = False,
               streamer: Any = None, **model_kwargs: Any) -> Any:
        cfg = generation_config
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("fastsampler.integrations.transformers supports decoder-only models; "
                             f"{type(model).__name__} is an encoder-decoder model")
        mode = cfg.get_generation_mode()
        mode = getattr(mode, "value", mode)
        if mode not in ("greedy_search", "sample"):
            raise ValueError(f"fastsampler draws one token per row (greedy or sampling); this generation config asks "
                             f"for {mode!r} (num_beams={cfg.num_beams}); set num_beams=1 and leave "
                             f"penalty_alpha, dola_layers, constraints, force_words_ids and assistants unset")
        for p in logits_processor:
            name = type(p).__name__
            if name not in _MAPPED_PROCESSORS:
                what = _UNSUPPORTED_PROCESSORS.get(name)
                what = f"generation config field {what!r}" if what else f"logits processor {name}"
                raise ValueError(f"fastsampler.integrations.transformers cannot honour the {what} (it builds "
                                 f"{name}); leave it unset")
        self.prepare(input_ids, cfg, model_kwargs.get("attention_mask"))
        criteria = _RecordingCriteria(stopping_criteria)
        greedy = copy.deepcopy(cfg)
        greedy.do_sample = False  # fastsampler chooses; transformers takes the argmax of its one-hot scores
        processor = _FastSamplerProcessor(self, criteria)
        return model._sample(input_ids, logits_processor=LogitsProcessorList([processor]),
                             stopping_criteria=criteria, generation_config=greedy, synced_gpus=synced_gpus,
                             streamer=None, **model_kwargs)

    # ------------------------------------------------------------------ per-row parameters
    def prepare(self, input_ids: torch.Tensor, cfg: Any, attention_mask: torch.Tensor | None) -> None:
        b = input_ids.shape[0]
        n = int(cfg.num_return_sequences or 1)
        requests = b // n
        ids = input_ids.cpu()
        if attention_mask is not None:
            keep = attention_mask.cpu().bool()
            self.prompts = [ids[r][keep[r]].tolist() for r in range(b)]
        else:
            self.prompts = [ids[r].tolist() for r in range(b)]
        eos = _id_list(cfg.eos_token_id)
        self.eos = eos
        pad = getattr(cfg, "_pad_token_tensor", None)
        pad = cfg.pad_token_id if pad is None else int(pad.reshape(-1)[0])
        self.pad_token_id = int(pad) if pad is not None else (eos[0] if eos else 0)
        base = sampling_params_from_generation_config(cfg, eos_token_ids=eos, **self.overrides)
        self.begin_suppress = _id_list(cfg.begin_suppress_tokens)
        # seeds: one per request (its num_return_sequences rows share it and differ in seq) or one per row
        seeds = self.seeds_arg
        if seeds is None or isinstance(seeds, numbers.Integral):
            per_row = [None if seeds is None else int(seeds)] * b
            seqs = [r % n for r in range(b)]
        else:
            seeds = [int(s) for s in seeds]
            if len(seeds) == requests:
                per_row = [seeds[r // n] for r in range(b)]
                seqs = [r % n for r in range(b)]
            elif len(seeds) == b:
                per_row, seqs = seeds, [0] * b
            else:
                raise ValueError(f"seeds must be an int, None, or a list of one seed per prompt ({requests}) or per "
                                 f"returned sequence ({b}), got {len(seeds)} seeds")
        self.seqs = seqs
        self.row_params: list[SamplingParams] = []
        for r in range(b):
            p = base
            if eos and cfg.min_new_tokens is None and (cfg.min_length or 0) > 0 and "min_tokens" not in self.overrides:
                # min_length counts the row's own prompt (transformers counts the padded one: batch-dependent)
                p = p.replace(min_tokens=max(0, int(cfg.min_length) - len(self.prompts[r])))
            self.row_params.append(p if per_row[r] is None else p.replace(seed=per_row[r]))
        self.input_len = input_ids.shape[1]
        self.max_new = max(1, int(cfg.max_length) - input_ids.shape[1]) if cfg.max_length is not None else 1
        self.lengths = [0] * b
        self.tokens: list[list[int]] = [[] for _ in range(b)]
        want_lp = any(p.logprobs for p in self.row_params)
        want_top = any(p.top_logprobs for p in self.row_params)
        self.logprobs = [[] for _ in range(b)] if want_lp else None
        self.ranks = [[] for _ in range(b)] if want_lp else None
        self.top_ids = [[] for _ in range(b)] if want_top else None
        self.top_lps = [[] for _ in range(b)] if want_top else None

    def history_len(self) -> int:
        """Enough history for every rule of every row to see the whole prompt and output, as transformers does."""
        need = 0
        for p in self.row_params:
            uses = (p.no_repeat_ngram_size > 0 or p.bad_words_ids or p.penalty_last_n >= 0 or p.dry_active)
            if uses:
                need = max(need, max(len(q) for q in self.prompts) + self.max_new + 1, p.penalty_last_n + 1,
                           p.dry_penalty_last_n)
        return min(need, _MAX_HISTORY)

    def start(self, scores: torch.Tensor) -> Sampler:
        """The Sampler, on the logits' device and of their width, with one slot per row."""
        b = scores.shape[0]
        s = Sampler(vocab_size=scores.shape[-1], max_slots=b, device=scores.device, eos_token_ids=self.eos,
                    backend=self.backend, history_len=self.history_len())
        self.sampler_vocab = scores.shape[-1]
        self.slots: list[int] = [-1] * b
        self.seeds: list[int] = [0] * b
        r = 0
        while r < b:
            # a request's num_return_sequences rows share its seed: one add with n = their count (seq 0 .. n-1)
            k = 1
            while (r + k < b and self.seqs[r + k] == self.seqs[r] + k and self.prompts[r + k] == self.prompts[r]
                   and self.row_params[r + k] == self.row_params[r]):
                k += 1
            p = self.row_params[r]
            if self.seqs[r] != 0:  # cannot happen: a request's rows are consecutive and start at seq 0
                raise AssertionError("rows of a request must start at seq 0")
            got = s.add(p.replace(n=k), prompt_token_ids=self.prompts[r])
            for j, slot in enumerate(got):
                self.slots[r + j] = slot
                self.seeds[r + j] = s.seed_of(slot)
            r += k
        self.params = [s.params_of(self.slots[r]).replace(n=1) for r in range(b)]
        return s

    def begin_bitmask(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """begin_suppress_tokens: banned at the first generated token only (a token bitmask for that step)."""
        if not self.begin_suppress:
            return None
        v = self.sampler_vocab
        words = (v + 31) // 32
        mask = torch.full((words * 32,), True)
        mask[[t for t in self.begin_suppress if t < v]] = False
        mask[v:] = False
        bits = mask.view(words, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
        packed = bits.sum(-1)
        packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
        return packed.expand(rows, words).contiguous().to(device)

    def record(self, rows: list[int], tokens: torch.Tensor, out: Any) -> None:
        lp = out.logprobs.cpu().tolist() if self.logprobs is not None else None
        rk = out.ranks.cpu().tolist() if self.ranks is not None else None
        tid = out.top_logprob_ids.cpu().tolist() if self.top_ids is not None else None
        tlp = out.top_logprobs.cpu().tolist() if self.top_ids is not None else None
        for i, r in enumerate(rows):
            self.tokens[r].append(int(tokens[i]))
            self.lengths[r] += 1
            if lp is not None:
                self.logprobs[r].append(lp[i])
                self.ranks[r].append(rk[i])
            if tid is not None:
                n = self.params[r].top_logprobs
                self.top_ids[r].append(tid[i][:n])
                self.top_lps[r].append(tlp[i][:n])


def generate(model: Any, inputs: torch.Tensor | None = None, *, seeds: int | Sequence[int] | None = None,
             logprobs: bool = False, top_logprobs: int = 0, logprobs_mode: str = "raw",
             params: Mapping[str, Any] | None = None, backend: str = "auto", **kwargs: Any) -> GenerationResult:
    """``model.generate(inputs, **kwargs)`` with every token drawn by fastsampler.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A decoder-only model with a language-modelling head.
    inputs : (batch_size, prompt_len) int64 tensor, optional
        The prompts, left-padded when their lengths differ (pass their ``attention_mask``), as ``model.generate``
        takes them.
    seeds : int, sequence of int, or None
        One seed per prompt (its ``num_return_sequences`` rows share it and differ in ``seq``, docs/semantics.md
        §7), one per returned sequence (``seq = 0`` each), one int for every prompt, or None (a random seed per
        prompt, reported in `GenerationResult.seeds`).
    logprobs, top_logprobs, logprobs_mode
        As in `SamplingParams`: the sampled token's logprob and rank, the top ``N`` (at most 20), and which
        distribution they are taken from (``raw``: the model's, the default).
    params : mapping, optional
        Further `SamplingParams` fields (``frequency_penalty``, ``dry_multiplier``, ``stop_token_ids``, ...), set
        after the generation config's.
    backend : {'auto', 'triton', 'cpu', 'reference'}
        The `Sampler`'s backend.
    **kwargs
        What ``model.generate`` takes: ``generation_config``, ``attention_mask``, ``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``,
        ``eta_cutoff``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ``suppress_tokens``,
        ``begin_suppress_tokens``, ``sequence_bias`` (one-token sequences), ``min_new_tokens``, ``min_length``
        (counted from each row's own prompt, without padding), ``num_return_sequences``, ``eos_token_id``,
        ``pad_token_id``, ``stop_strings`` with ``tokenizer``, ``return_dict_in_generate``, ``output_logits``, ...
        Unset fields come from ``model.generation_config``, as in transformers (whose global default
        ``top_k=50`` applies when sampling). Fields that would need another decoding method or a logits processor
        fastsampler cannot reproduce (beams, ``forced_bos_token_id``, ``guidance_scale``, ``top_h``, a
        ``logits_processor``, ...) raise ``ValueError``.

    Returns
    -------
    GenerationResult
        The sequences, each row's tokens, logprobs, seeds and parameters, and ``model.generate``'s own output.

    Notes
    -----
    The history rules and the repetition penalty read each row's prompt without its padding, then its generated
    tokens (docs/semantics.md §3 A–C); frequency and presence penalties (``params``) count the generated tokens.
    """
    for name, why in _REFUSED_ARGUMENTS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"generate(..., {name}=...) is not supported: {why}")
    over = dict(params or {})
    for name, use in (("n", "num_return_sequences="), ("seed", "seeds=")):
        if name in over:
            raise ValueError(f"params={{{name!r}: ...}} is set per row by generate: pass {use} instead")
    if logprobs or top_logprobs:
        over.setdefault("logprobs", True)
        over.setdefault("top_logprobs", int(top_logprobs))
        over.setdefault("logprobs_mode", logprobs_mode)
    run = _Run(seeds, over, backend)
    out = model.generate(inputs, custom_generate=run.decode, **kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    if not hasattr(run, "slots"):
        raise RuntimeError("model.generate returned without drawing a token")
    generated = sequences.shape[1] - run.input_len  # (a deferred stop check may have drawn one step more)
    trim = lambda rows: None if rows is None else [x[:generated] for x in rows]
    return GenerationResult(sequences=sequences, tokens=trim(run.tokens), logprobs=trim(run.logprobs),
                            ranks=trim(run.ranks), top_logprob_ids=trim(run.top_ids),
                            top_logprobs=trim(run.top_lps), seeds=run.seeds, seqs=run.seqs, params=run.params,
                            output=out)

