"""Per-request sampling parameters.

`SamplingParams` is frozen and validated on construction: every field that is out of range, of the wrong type, NaN
or contradicts another field raises ``ValueError`` / ``TypeError`` naming the field, the value and what is allowed.
Token ids are checked against the vocabulary later, when a batch is packed (the vocabulary size is not known here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .layout import COUNT_MAX, LOGPROBS_MODES, MAX_TOP_LOGPROBS

__all__ = ["SamplingParams", "LOGPROBS_MODES", "MAX_TOP_LOGPROBS"]

_U64 = 1 << 64


class FrozenDict(dict):
    """A read-only dict (hashable, picklable, copyable): the type of `SamplingParams.logit_bias`."""

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("SamplingParams.logit_bias is read-only; use params.replace(logit_bias=...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _readonly  # type: ignore

    @property
    def xtc_active(self) -> bool:
        """True when XTC can act: ``xtc_probability > 0`` and ``xtc_threshold <= 0.5``."""
        return self.xtc_probability > 0.0 and self.xtc_threshold <= 0.5

    @property
    def dry_active(self) -> bool:
        """True when DRY applies: ``dry_multiplier > 0`` and ``dry_penalty_last_n != 0``."""
        return self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


_F32_TINY = 1.1754943508222875e-38  # smallest normal float32: kernels compute in float32


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or _is_numpy_int(x)


def _is_numpy_int(x: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    return isinstance(x, np.integer)


def _is_real(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, (np.integer, np.floating))


def _check_float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    """Return ``float(value)`` after checking type, NaN and the range ``lo .. hi`` (open ends as flagged)."""
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    rng = f"{lb}{lo:g}, {hi:g}{rb}"
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number in {rng}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must be in {rng}, got nan")
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if below or above:
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    _check_float32(name, v, rng)
    return v


_F32_MAX = 3.4028234663852886e38
_F32_OVERFLOW = 2.0**128 - 2.0**103  # float32 rounds |v| >= this to inf
_F32_UNDERFLOW = 2.0**-150  # float32 rounds 0 < |v| <= this to 0 (half the smallest denormal, ties to even)


def _check_float32(name: str, v: float, rng: str) -> None:
    """Every backend reads float parameters as float32 (docs/semantics.md §8): refuse a value whose float32 rounding
    is 0 or infinite when the value itself is not, so that one request can never turn invalid inside a batch."""
    if math.isinf(v) or v == 0.0:
        return
    if abs(v) >= _F32_OVERFLOW:
        raise ValueError(f"{name} must be in {rng} and representable in float32 (every backend computes in float32; "
                         f"the largest float32 is {_F32_MAX:.9g}), got {v!r}, which overflows to inf")
    if abs(v) <= _F32_UNDERFLOW:
        raise ValueError(f"{name} must be in {rng} and representable in float32 (every backend computes in float32; "
                         f"the smallest positive float32 is 1.4e-45), got {v!r}, which rounds to 0")


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    if not _is_int(value):
        raise TypeError(f"{name} must be an integer {rng}, got {value!r} of type {type(value).__name__}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an integer {rng}, got {value!r}")
    return v


def _logprobs_hint(value: Any) -> str:
    """The error for a ``logprobs`` that is not a bool: an integer count (OpenAI completions / vLLM spell the top-N
    width ``logprobs=N``) gets the two fields it maps to."""
    got = f"logprobs must be a bool, got {value!r} of type {type(value).__name__}"
    if _is_int(value) and int(value) > 0:
        n = int(value)
        if n > MAX_TOP_LOGPROBS:
            return (f"{got} (logprobs is a bool; for the top N tokens pass logprobs=True, top_logprobs=N, N at most "
                    f"{MAX_TOP_LOGPROBS})")
        tokens = "token" if n == 1 else "tokens"
        return f"{got} (logprobs is a bool; for the top {n} {tokens} pass logprobs=True, top_logprobs={n})"
    return f"{got} (True returns the sampled token's logprob; for the top N tokens add top_logprobs=N)"


def _id_list(name: str, value: Any) -> list[int]:
    """``value`` as a list of non-negative int token ids, in order (errors name ``name`` and the position)."""
    if isinstance(value, (str, bytes, int)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of non-negative token ids, got {value!r}")
    out = []
    for i, t in enumerate(value):
        if not _is_int(t):
            raise TypeError(f"{name}[{i}] must be an integer token id, got {t!r}")
        if int(t) < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative token id, got {int(t)}")
        out.append(int(t))
    return out


def _check_ids(name: str, value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(sorted(set(_id_list(name, value))))


MAX_HISTORY_RULE = 1024  # the longest n-gram / bad word (a history rule reads at most this many tokens back)
MAX_BREAKER = 32  # the longest DRY sequence breaker, in tokens


def _check_sequences(name: str, value: Any, longest: int) -> tuple[tuple[int, ...], ...] | None:
    """A sequence of token-id sequences of 1 to ``longest`` ids each (bad words, DRY breakers), or None."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of token-id sequences, got {value!r}")
    out = []
    for i, seq in enumerate(value):
        ids = _id_list(f"{name}[{i}]", seq)
        if not 1 <= len(ids) <= longest:
            raise ValueError(f"{name}[{i}] must hold 1 to {longest} token ids, got {len(ids)}")
        out.append(tuple(ids))
    return tuple(out)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one request (OpenAI-style names).

    Parameters
    ----------
    temperature : float, default 1.0
        ``>= 0``; ``0`` means greedy (argmax after penalties, ties to the lowest id).
    top_k : int, default -1
        Keep the ``k`` largest logits (ties at the k-th value kept). ``<= 0`` disables it.
    top_p : float, default 1.0
        Nucleus mass in ``(0, 1]``; ``1`` disables it.
    min_p : float, default 0.0
        In ``[0, 1]``: keep tokens with probability ``>= min_p * p_max``; ``0`` disables it.
    epsilon_cutoff : float, default 0.0
        In ``[0, 1)``: keep tokens with probability ``>= epsilon_cutoff`` in the whole distribution (Hugging Face's
        epsilon sampling), at min-p's place in the rules; ``0`` disables it.
    typical_p : float, default 1.0
        Locally typical mass in ``(0, 1]``; ``1`` disables it.
    frequency_penalty, presence_penalty : float, default 0.0
        In ``[-2, 2]``; subtract ``count * frequency_penalty + (count > 0) * presence_penalty`` (generated tokens).
    repetition_penalty : float, default 1.0
        ``> 0``; divides positive / multiplies negative logits of tokens seen in the prompt or the output.
    logit_bias : mapping of token id to float, default empty
        Added to the logits before anything else; values in ``[-100, 100]`` (``-inf`` also allowed: a ban).
    mirostat_mode : int, default 0
        ``0`` off, ``1`` Mirostat v1, ``2`` Mirostat v2. Cannot be combined with top-k / top-p / min-p / typical-p.
    mirostat_target : float, default 5.0
        Target surprise ``tau`` in bits, ``> 0``.
    mirostat_lr : float, default 0.1
        Learning rate ``eta``, in ``(0, 1]``.
    logprobs : bool, default False
        Return the sampled token's logprob and rank.
    top_logprobs : int, default 0
        Also return the top ``n`` (id, logprob) pairs, ``0 <= n <= 20``; needs ``logprobs=True``.
    logprobs_mode : {'raw', 'processed', 'final'}, default 'raw'
        Which distribution the logprobs are taken from (see ``docs/semantics.md``).
    seed : int or None, default None
        ``0 <= seed < 2**64``. ``None``: a random seed is drawn (per call in the functional API, once per request
        in `Sampler`).
    min_keep : int, default 1
        Every truncation rule keeps at least this many tokens.
    min_tokens : int, default 0
        EOS ids and ``stop_token_ids`` are banned while fewer than this many tokens have been generated.
    ignore_eos : bool, default False
        EOS ids are always banned.
    allowed_token_ids, banned_token_ids : sequence of int or None
        Only the allowed ids may be sampled / the banned ids never are. Stored sorted and de-duplicated.
    n : int, default 1
        Number of samples of the request (used by `Sampler.add`).
    stop_token_ids : sequence of int or None
        Ids that end the request besides the EOS ids: banned while fewer than ``min_tokens`` tokens have been
        generated, and reported in `SampleOutput.stopped` when sampled (``ignore_eos`` does not ban them). Stored
        sorted and de-duplicated.
    no_repeat_ngram_size : int, default 0
        ``n >= 1``: ban every token that would complete an n-gram already in the history (prompt, then generated
        tokens), as Hugging Face's ``no_repeat_ngram_size``; ``0`` disables it. At most 1024.
    bad_words_ids : sequence of token-id sequences or None
        Ban the last token of each sequence when the history ends with the rest of it (a one-token sequence is
        always banned), as Hugging Face's ``bad_words_ids`` and vLLM's ``bad_words``. At most 1024 tokens each.
    penalty_last_n : int, default -1
        The generated tokens the frequency, presence and repetition penalties count: ``-1`` all of them, ``0``
        none, ``n >= 1`` the last ``n`` (llama.cpp's ``penalty_last_n``, over generated tokens only; the prompt
        still counts for the repetition penalty). At most 32767.
    eta_cutoff : float, default 0.0
        In ``[0, 1)``: keep tokens with probability ``>= min(eta, sqrt(eta) * exp(-H))`` in the whole distribution
        (``H`` its entropy; Hugging Face's eta sampling), at min-p's place in the rules; ``0`` disables it.
    top_n_sigma : float, default 0.0
        ``>= 0``: keep tokens whose logit is at least ``max - top_n_sigma * sigma`` (``sigma`` the standard deviation
        of the finite logits; llama.cpp's top-n-sigma), at min-p's place in the rules; ``0`` disables it.
    xtc_probability, xtc_threshold : float, default 0.0 and 0.1
        Exclude Top Choices (llama.cpp's XTC): with chance ``xtc_probability`` per step, drop every kept token with
        probability ``>= xtc_threshold`` except the least likely of them. Both in ``[0, 1]``; off when the probability
        is 0 or the threshold above 0.5.
    dynatemp_range, dynatemp_exponent : float, default 0.0 and 1.0
        Dynamic temperature (llama.cpp's ``temp_ext``): ``T = T_min + (T_max - T_min) (H / ln n)^exponent`` with
        ``T_min, T_max = max(0, temperature - range), temperature + range`` and ``H`` the entropy of the ``n``
        finite logits. Both ``>= 0``; a range of ``0`` disables it; needs ``temperature > 0``.
    dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n : default 0.0, 1.75, 2, -1
        DRY (llama.cpp's "don't repeat yourself"): a token that would extend a repeat of ``L >= allowed_length``
        tokens of the last ``dry_penalty_last_n`` history tokens (``-1``: all of them, ``0``: off) loses
        ``multiplier * base^(L - allowed_length)`` from its logit. ``multiplier >= 0`` (``0``: off), ``base >= 1``,
        ``allowed_length`` in ``[0, 1024]``.
    dry_sequence_breakers : sequence of token-id sequences or None
        A repeat never extends across one of them (1 to 32 tokens each); a one-token breaker is never penalised.
    """

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    mirostat_mode: int = 0
    mirostat_target: float = 5.0
    mirostat_lr: float = 0.1
    logprobs: bool = False
    top_logprobs: int = 0
    logprobs_mode: Literal["raw", "processed", "final"] = "raw"
    seed: int | None = None
    min_keep: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    allowed_token_ids: tuple[int, ...] | None = None
    banned_token_ids: tuple[int, ...] | None = None
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    penalty_last_n: int = -1
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        s = lambda name, v: object.__setattr__(self, name, v)  # frozen dataclass normalisation
        s("temperature", _check_float("temperature", self.temperature, 0.0, math.inf, hi_open=True))
        if 0.0 < self.temperature < _F32_TINY:
            raise ValueError(f"temperature must be 0 (greedy) or at least {_F32_TINY!r} (the smallest normal float32, "
                             f"kernels compute in float32), got {self.temperature!r}")
        s("top_k", _check_int("top_k", self.top_k, -(1 << 31), (1 << 31) - 1))
        s("top_p", _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        s("min_p", _check_float("min_p", self.min_p, 0.0, 1.0))
        s("epsilon_cutoff", _check_float("epsilon_cutoff", self.epsilon_cutoff, 0.0, 1.0, hi_open=True))
        s("typical_p", _check_float("typical_p", self.typical_p, 0.0, 1.0, lo_open=True))
        s("frequency_penalty", _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        s("presence_penalty", _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0))
        s("repetition_penalty", _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                                             lo_open=True, hi_open=True))
        s("mirostat_mode", _check_int("mirostat_mode", self.mirostat_mode, 0, 2))
        s("mirostat_target", _check_float("mirostat_target", self.mirostat_target, 0.0, math.inf,
                                          lo_open=True, hi_open=True))
        s("mirostat_lr", _check_float("mirostat_lr", self.mirostat_lr, 0.0, 1.0, lo_open=True))
        if not isinstance(self.logprobs, bool):
            raise TypeError(_logprobs_hint(self.logprobs))
        s("top_logprobs", _check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS))
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise TypeError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
            if not 0 <= int(self.seed) < _U64:
                raise ValueError(f"seed must be None or an integer in [0, 2**64), got {self.seed!r}")
            s("seed", int(self.seed))
        s("min_keep", _check_int("min_keep", self.min_keep, 1, (1 << 31) - 1))
        s("min_tokens", _check_int("min_tokens", self.min_tokens, 0, (1 << 31) - 1))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        s("allowed_token_ids", _check_ids("allowed_token_ids", self.allowed_token_ids))
        s("banned_token_ids", _check_ids("banned_token_ids", self.banned_token_ids))
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            raise ValueError("allowed_token_ids must not be empty (no token could ever be sampled), got []")
        s("n", _check_int("n", self.n, 1, 1 << 16))
        s("stop_token_ids", _check_ids("stop_token_ids", self.stop_token_ids))
        s("no_repeat_ngram_size", _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_HISTORY_RULE))
        s("bad_words_ids", _check_sequences("bad_words_ids", self.bad_words_ids, MAX_HISTORY_RULE))
        s("penalty_last_n", _check_int("penalty_last_n", self.penalty_last_n, -1, COUNT_MAX))
        s("logit_bias", self._checked_bias(self.logit_bias))
        s("eta_cutoff", _check_float("eta_cutoff", self.eta_cutoff, 0.0, 1.0, hi_open=True))
        s("top_n_sigma", _check_float("top_n_sigma", self.top_n_sigma, 0.0, math.inf, hi_open=True))
        s("xtc_probability", _check_float("xtc_probability", self.xtc_probability, 0.0, 1.0))
        s("xtc_threshold", _check_float("xtc_threshold", self.xtc_threshold, 0.0, 1.0))
        s("dynatemp_range", _check_float("dynatemp_range", self.dynatemp_range, 0.0, math.inf, hi_open=True))
        s("dynatemp_exponent", _check_float("dynatemp_exponent", self.dynatemp_exponent, 0.0, math.inf,
                                            hi_open=True))
        s("dry_multiplier", _check_float("dry_multiplier", self.dry_multiplier, 0.0, math.inf, hi_open=True))
        s("dry_base", _check_float("dry_base", self.dry_base, 1.0, math.inf, hi_open=True))
        s("dry_allowed_length", _check_int("dry_allowed_length", self.dry_allowed_length, 0, MAX_HISTORY_RULE))
        s("dry_penalty_last_n", _check_int("dry_penalty_last_n", self.dry_penalty_last_n, -1, (1 << 31) - 1))
        s("dry_sequence_breakers", _check_sequences("dry_sequence_breakers", self.dry_sequence_breakers, MAX_BREAKER))
        if self.dynatemp_range > 0.0 and self.temperature == 0.0:
            raise ValueError(f"dynatemp_range={self.dynatemp_range!r} needs a temperature > 0 (temperature=0 is "
                             f"greedy decoding), got temperature=0.0")
        if self.top_logprobs > 0 and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True, got logprobs=False")
        if self.mirostat_mode != 0:
            clash = [
                f"{name}={getattr(self, name)!r}"
                for name, off in (("top_k", None), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0),
                                  ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0), ("top_n_sigma", 0.0),
                                  ("xtc_probability", None))
                if (self.top_k > 0 if name == "top_k" else self.xtc_active if name == "xtc_probability"
                    else getattr(self, name) != off)
            ]
            if clash:
                raise ValueError(
                    f"mirostat_mode={self.mirostat_mode} replaces truncation and cannot be combined with "
                    f"{', '.join(clash)}; leave top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, "
                    f"top_n_sigma and xtc_probability at their defaults"
                )

    @staticmethod
    def _checked_bias(bias: Any) -> Mapping[int, float]:
        if bias is None:
            bias = {}
        if not isinstance(bias, Mapping):
            raise TypeError(f"logit_bias must be a mapping of token id to float, got {type(bias).__name__}")
        out: dict[int, float] = {}
        for k, v in bias.items():
            kk = int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k
            if not _is_int(kk) or int(kk) < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {k!r}")
            if not _is_real(v) or math.isnan(float(v)):
                raise ValueError(f"logit_bias[{int(kk)}] must be a float in [-100, 100] or -inf, got {v!r}")
            fv = float(v)
            if not (-100.0 <= fv <= 100.0 or fv == -math.inf):
                raise ValueError(f"logit_bias[{int(kk)}] must be a float in [-100, 100] or -inf, got {v!r}")
            _check_float32(f"logit_bias[{int(kk)}]", fv, "[-100, 100] or -inf")
            out[int(kk)] = fv
        return FrozenDict(sorted(out.items()))

    # ------------------------------------------------------------------ derived
    @property
    def greedy(self) -> bool:
        """True when the request samples the argmax (``temperature == 0``)."""
        return self.temperature == 0.0

    @property
    def xtc_active(self) -> bool:
        """True when XTC can act: ``xtc_probability > 0`` and ``xtc_threshold <= 0.5``."""
        return self.xtc_probability > 0.0 and self.xtc_threshold <= 0.5

    @property
    def dry_active(self) -> bool:
        """True when DRY applies: ``dry_multiplier > 0`` and ``dry_penalty_last_n != 0``."""
        return self.dry_multiplier > 0.0 and self.dry_penalty_last_n != 0

    def __hash__(self) -> int:
        return hash(tuple((f.name, _hashable(getattr(self, f.name))) for f in dataclasses.fields(self)))

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The effective values, JSON-serialisable (``logit_bias`` keys as ints, id lists as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "logit_bias":
                v = dict(v)
            elif isinstance(v, tuple):
                v = [list(x) if isinstance(x, tuple) else x for x in v]
            out[f.name] = v
        return out

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> SamplingParams:
        """Build params from a Hugging Face ``generation_config.json`` (a dict, a file, or a model folder).

        Fields read: ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``,
        ``eta_cutoff``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids`` and ``do_sample``
        (``False`` means greedy: ``temperature=0``; the repetition penalty and the two history rules still apply, as
        in Hugging Face). Missing or ``null`` entries keep the defaults; ``overrides`` win over the file.

        >>> SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9}).top_p
        0.9
        >>> SamplingParams.from_generation_config({"do_sample": False, "top_k": 20}).temperature
        0.0
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "generation_config.json")
            with open(path, encoding="utf-8") as fh:
                config = json.load(fh)
            if not isinstance(config, Mapping):
                raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                     "no_repeat_ngram_size", "bad_words_ids", "epsilon_cutoff", "eta_cutoff"):
            if config.get(name) is not None:
                kw[name] = config[name]
        if "top_k" in kw and int(kw["top_k"]) == 0:
            kw["top_k"] = -1  # HF: top_k=0 disables top-k
        if "min_p" in kw and kw["min_p"] is not None:
            kw["min_p"] = float(kw["min_p"])
        if config.get("do_sample") is False:
            # HF ignores the warpers when do_sample is false: greedy decoding.
            kw = {k: v for k, v in kw.items()
                  if k in ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids")}
            kw["temperature"] = 0.0
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_request(cls, body: Mapping[str, Any],
                     generation_config: Mapping[str, Any] | str | os.PathLike | None = None) -> SamplingParams:
        """Build params from an OpenAI-style chat-completions or completions request body (Fireworks extensions too).

        Sampling keys, each checked against the range the request APIs give (errors name the key, the value and the
        range); ``null`` is the same as an absent key:

        - ``temperature`` in ``[0, 2]``; ``top_p`` in ``[0, 1]`` (``0`` keeps only the most likely token and its
          ties: ``top_k=1``); ``top_k`` an integer ``>= -1`` (``0`` and ``-1`` off; the request APIs cap it at 100,
          fastsampler does not); ``min_p`` in ``[0, 1]``; ``typical_p`` in ``(0, 1]``.
        - ``frequency_penalty``, ``presence_penalty`` in ``[-2, 2]``; ``repetition_penalty`` in ``(0, 2]``;
          ``logit_bias``: token id (a string, as JSON writes it, or an int) to a bias in ``[-100, 100]`` (or ``-inf``,
          a ban).
        - ``logprobs``: a bool (chat: the sampled token's logprob, ``top_logprobs`` in ``[0, 20]`` adds the top N),
          or an integer ``N`` in ``[0, 5]`` (completions: the sampled token and the top ``N``; a ``top_logprobs`` in
          the same body wins over ``N``).
        - ``n`` in ``[1, 128]``; ``best_of`` in ``[n, 128]`` (completions: candidates drawn, of which the engine
          returns the ``n`` best; ``n`` here becomes ``best_of``, the number of samples drawn); ``seed`` an integer in
          ``[-2**63, 2**64)`` (a negative seed is taken modulo ``2**64``).
        - ``mirostat_target`` (``> 0``) turns Mirostat **v2** on with that target surprise ``tau``, and
          ``mirostat_lr`` in ``(0, 1]`` is its learning rate ``eta`` (default 0.1; without ``mirostat_target`` it
          is checked and dropped). The request APIs do not name a version; v2 is chosen because a target and a rate
          are all it takes (v1 also estimates the Zipf exponent over the top tokens and the vocabulary size). A body
          may pick v1 with the extension key ``mirostat_mode: 1`` (below). With Mirostat on, the generation config
          fills only the temperature (Mirostat replaces truncation).
        - ``min_tokens`` (``>= 0``) and ``ignore_eos`` (a bool), as in `SamplingParams`.

        Every other `SamplingParams` field may also be given under its own name (an engine extension:
        ``stop_token_ids``, ``dry_multiplier``, ``mirostat_mode``, ...), with `SamplingParams`' own checks.

        Keys that are part of a request but not of sampling are ignored: ``model``, ``messages``, ``prompt``,
        ``suffix``, ``max_tokens``, ``max_completion_tokens``, ``stop`` (stop strings are the engine's job), ``stream``,
        ``stream_options``, ``echo``, ``echo_last``, ``user``, ``metadata``, ``store``, ``tools``, ``tool_choice``,
        ``parallel_tool_calls``, ``functions``, ``function_call``, ``response_format``, ``prediction``,
        ``speculation``, ``reasoning_effort``, ``reasoning_history``, ``thinking``, ``modalities``, ``audio``,
        ``service_tier``, ``prompt_truncate_len``, ``context_length_exceeded_behavior``, ``raw_output``,
        ``perf_metrics_in_response``, ``return_token_ids``, ``prompt_cache_key``, ``prompt_cache_isolation_key``,
        ``safety_identifier``, ``verbosity``, ``web_search_options``, ``images``. Any other key raises ``ValueError``
        naming it.

        ``generation_config`` (a dict, a ``generation_config.json`` file or a model folder, read as
        `from_generation_config` reads it, ``do_sample: false`` meaning greedy) fills ``temperature``, ``top_k``,
        ``top_p``, ``min_p`` and ``typical_p`` where the body leaves them unset; nothing else is taken from it.

        >>> body = {"model": "m", "messages": [], "temperature": 0.7, "top_p": 0.9, "logit_bias": {"42": -100},
        ...         "logprobs": True, "top_logprobs": 2, "seed": 7}
        >>> p = SamplingParams.from_request(body)
        >>> p.top_p, dict(p.logit_bias), p.top_logprobs
        (0.9, {42: -100.0}, 2)
        >>> SamplingParams.from_request({"prompt": "x", "logprobs": 3}).top_logprobs
        3
        >>> SamplingParams.from_request({"mirostat_target": 4.0}).mirostat_mode
        2
        >>> SamplingParams.from_request({"top_p": 0.8}, {"temperature": 0.6, "top_k": 20}).sampling_options()
        {'temperature': 0.6, 'top_k': 20, 'top_p': 0.8}
        >>> SamplingParams.from_request({"temperature": 0.5, "top_n": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown request key 'top_n' (...)
        """
        if not isinstance(body, Mapping):
            raise TypeError(f"the request body must be a mapping (a JSON object), got {type(body).__name__}")
        unknown = [k for k in body if k not in _REQUEST_KEYS and k not in _IGNORED_REQUEST_KEYS
                   and k not in _EXTENSION_KEYS]
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            raise ValueError(f"unknown request key{'s' if len(unknown) > 1 else ''} {names} (not a sampling key of the "
                             f"chat / completions APIs, not a key they define that sampling ignores, and not a "
                             f"SamplingParams field)")
        get = {k: v for k, v in body.items() if v is not None and k not in _IGNORED_REQUEST_KEYS}.get
        kw: dict[str, Any] = {k: body[k] for k in _EXTENSION_KEYS if get(k) is not None}
        inf = math.inf
        for name, lo, hi, lo_open in (("temperature", 0.0, 2.0, False), ("min_p", 0.0, 1.0, False),
                                      ("typical_p", 0.0, 1.0, True), ("frequency_penalty", -2.0, 2.0, False),
                                      ("presence_penalty", -2.0, 2.0, False),
                                      ("repetition_penalty", 0.0, 2.0, True)):
            if get(name) is not None:
                kw[name] = _check_float(name, get(name), lo, hi, lo_open=lo_open)
        if get("top_k") is not None:
            k = _check_int("top_k", get("top_k"), -1, (1 << 31) - 1)
            kw["top_k"] = k if k > 0 else -1
        if get("top_p") is not None:
            top_p = _check_float("top_p", get("top_p"), 0.0, 1.0)
            if top_p == 0.0:  # the most likely token (ties kept): top-k 1, the same kept set as top-p -> 0
                kw["top_k"] = 1
            else:
                kw["top_p"] = top_p
        if get("logit_bias") is not None:
            kw["logit_bias"] = get("logit_bias")
        for name in ("min_tokens", "ignore_eos"):
            if get(name) is not None:
                kw[name] = get(name)
        # logprobs: a bool (chat), or the completions API's integer top count
        lp = get("logprobs")
        if lp is not None:
            if isinstance(lp, bool):
                kw["logprobs"] = lp
            elif _is_int(lp):
                kw["logprobs"] = True
                kw["top_logprobs"] = _check_int("logprobs", lp, 0, 5)
            else:
                raise TypeError(f"logprobs must be a bool or an integer in [0, 5], got {lp!r} of type "
                                f"{type(lp).__name__}")
        if get("top_logprobs") is not None:
            kw["top_logprobs"] = _check_int("top_logprobs", get("top_logprobs"), 0, MAX_TOP_LOGPROBS)
        n = _check_int("n", get("n"), 1, 128) if get("n") is not None else 1
        if get("best_of") is not None:
            n = _check_int("best_of", get("best_of"), n, 128)
        if n != 1:
            kw["n"] = n
        if get("seed") is not None:
            seed = get("seed")
            if not _is_int(seed) or not -(1 << 63) <= int(seed) < _U64:
                raise (ValueError if _is_int(seed) else TypeError)(
                    f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
            kw["seed"] = int(seed) % _U64
        # Mirostat: a target turns it on (v2 unless the body names the mode); the rate alone is checked and dropped
        if get("mirostat_target") is not None:
            kw["mirostat_target"] = _check_float("mirostat_target", get("mirostat_target"), 0.0, inf, lo_open=True,
                                                 hi_open=True)
            if kw.setdefault("mirostat_mode", 2) == 0:  # the body turned it off by name
                del kw["mirostat_target"]
        if get("mirostat_lr") is not None:
            lr = _check_float("mirostat_lr", get("mirostat_lr"), 0.0, 1.0, lo_open=True)
            if kw.get("mirostat_mode", 0) != 0:
                kw["mirostat_lr"] = lr
        if generation_config is not None:
            defaults = cls.from_generation_config(generation_config)
            filled = ("temperature",) if kw.get("mirostat_mode", 0) != 0 else _GENERATION_DEFAULTS
            for name in filled:
                if name not in kw:
                    kw[name] = getattr(defaults, name)
        return cls(**kw)

    def sampling_options(self) -> dict[str, Any]:
        """The effective sampling options under their request names (a response header's JSON, e.g.
        ``fireworks-sampling-options``).

        Keys, in this order, each only when it acts: ``temperature`` (always), ``top_k`` (``> 0``), ``top_p``
        (``< 1``), ``min_p`` (``> 0``), ``typical_p`` (``< 1``), ``frequency_penalty``, ``presence_penalty`` (``!=
        0``), ``repetition_penalty`` (``!= 1``), ``logit_bias`` (non-empty; string token-id keys, as JSON writes
        them), ``mirostat_target`` and ``mirostat_lr`` (Mirostat on; plus ``mirostat_mode: 1`` for v1), ``logprobs``
        and ``top_logprobs`` (when asked for), ``n`` (``> 1``), ``seed`` (when set), ``min_tokens`` (``> 0``),
        ``ignore_eos`` (true); then every other field that differs from its default, under its `SamplingParams`
        name (``stop_token_ids``, ``dry_multiplier``, ...). Values are plain JSON types (lists, not tuples; a ``-inf``
        bias is a float that ``json.dumps`` writes as ``-Infinity``).

        ``SamplingParams.from_request(params.sampling_options())`` gives back ``params`` whenever its values lie in
        the request ranges (``from_request`` documents them) and a disabled ``top_k`` is ``-1``.

        >>> SamplingParams(temperature=0.7, top_p=0.9).sampling_options()
        {'temperature': 0.7, 'top_p': 0.9}
        """
        out: dict[str, Any] = {"temperature": self.temperature}
        for name, on in (("top_k", self.top_k > 0), ("top_p", self.top_p < 1.0), ("min_p", self.min_p > 0.0),
                         ("typical_p", self.typical_p < 1.0), ("frequency_penalty", self.frequency_penalty != 0.0),
                         ("presence_penalty", self.presence_penalty != 0.0),
                         ("repetition_penalty", self.repetition_penalty != 1.0)):
            if on:
                out[name] = getattr(self, name)
        if self.logit_bias:
            out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        if self.mirostat_mode != 0:
            out["mirostat_target"] = self.mirostat_target
            out["mirostat_lr"] = self.mirostat_lr
            if self.mirostat_mode != 2:
                out["mirostat_mode"] = self.mirostat_mode
        if self.logprobs:
            out["logprobs"] = True
            if self.top_logprobs:
                out["top_logprobs"] = self.top_logprobs
        for name, on in (("n", self.n != 1), ("seed", self.seed is not None), ("min_tokens", self.min_tokens != 0),
                         ("ignore_eos", self.ignore_eos)):
            if on:
                out[name] = getattr(self, name)
        for f in dataclasses.fields(self):
            if f.name in _EXTENSION_KEYS and f.name != "mirostat_mode" and getattr(self, f.name) != f.default:
                v = getattr(self, f.name)
                out[f.name] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
        return out


# ------------------------------------------------------------------------------------------------- request bodies
# The sampling keys of an OpenAI chat-completions / completions body and the Fireworks extensions (from_request).
_REQUEST_KEYS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "typical_p", "frequency_penalty", "presence_penalty",
    "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "n", "best_of", "seed", "mirostat_target",
    "mirostat_lr", "min_tokens", "ignore_eos",
})
# Keys those APIs define that are not sampling: accepted and ignored (the engine reads them from the body).
_IGNORED_REQUEST_KEYS = frozenset({
    "model", "messages", "prompt", "suffix", "max_tokens", "max_completion_tokens", "stop", "stream",
    "stream_options", "echo", "echo_last", "user", "metadata", "store", "tools", "tool_choice", "parallel_tool_calls",
    "functions", "function_call", "response_format", "prediction", "speculation", "reasoning_effort",
    "reasoning_history", "thinking", "modalities", "audio", "service_tier", "prompt_truncate_len",
    "context_length_exceeded_behavior", "raw_output", "perf_metrics_in_response", "return_token_ids",
    "prompt_cache_key", "prompt_cache_isolation_key", "safety_identifier", "verbosity", "web_search_options", "images",
})
# The fields a generation config fills where a request leaves them unset.
_GENERATION_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "typical_p")


def _hashable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple(sorted(v.items()))
    return v


# SamplingParams fields without a request name: a body may give them under their own names (from_request).
_EXTENSION_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams)) - _REQUEST_KEYS
