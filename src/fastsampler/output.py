"""The result types: `SampleOutput` (a step, every backend), `ScoreOutput` (`fastsampler.score`) and `VerifyOutput`
(`fastsampler.Sampler.verify`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SampleOutput", "ScoreOutput", "VerifyOutput"]


def _to_numpy(x: Any) -> Any:
    """A numpy array of ``x`` (a host copy for a torch tensor)."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass
class SampleOutput:
    """Result of one sampling step for a batch of ``B`` rows.

    Arrays are numpy arrays for `fastsampler.reference` and numpy input, torch tensors on the logits' device otherwise.

    Attributes
    ----------
    tokens : (B,) int64
        Sampled token id per row, ``-1`` for an invalid row (NaN / ``+inf`` logit, or no finite logit left after masks).
    valid : (B,) bool
        ``False`` exactly where ``tokens == -1``.
    logprobs : (B,) float
        Log-probability of the sampled token in the row's ``logprobs_mode``; NaN where the row did not ask for
        logprobs or is invalid.
    top_logprob_ids : (B, N) int64
        The row's ``top_logprobs`` best ids ordered by (logprob desc, id asc); ``N`` is the largest ``top_logprobs``
        in the batch, shorter rows and invalid rows are padded with ``-1``.
    top_logprobs : (B, N) float
        Their logprobs, padded with NaN.
    ranks : (B,) int64
        ``1 +`` the number of tokens with a strictly greater logprob than the sampled one; ``-1`` where not asked
        for or invalid.
    mirostat_mu : (B,) float
        Mirostat ``mu`` after this step's update for mirostat rows; other rows (and invalid or greedy rows) pass the
        input value through (NaN when none was given).
    stopped : (B,) bool or None
        Only when some row of the batch has ``stop_token_ids`` (else None): True where the token ends its request,
        i.e. is one of the row's ``stop_token_ids`` or, unless ``ignore_eos``, an EOS id.
    """

    tokens: Any
    valid: Any
    logprobs: Any
    top_logprob_ids: Any
    top_logprobs: Any
    ranks: Any
    mirostat_mu: Any
    stopped: Any = None

    def __iter__(self):  # allows ``tokens, valid, *_ = out`` (the seven per-row results; not ``stopped``)
        yield from (self.tokens, self.valid, self.logprobs, self.top_logprob_ids, self.top_logprobs, self.ranks,
                    self.mirostat_mu)

    def numpy(self) -> SampleOutput:
        """A copy with every field as a numpy array (host copy for torch tensors)."""
        return SampleOutput(*(_to_numpy(x) for x in self), stopped=None if self.stopped is None else
                            _to_numpy(self.stopped))


@dataclass
class ScoreOutput:
    """Result of `fastsampler.score` for ``T`` positions (torch tensors on the logits' device, numpy arrays for numpy
    input).

    Attributes
    ----------
    logprobs : (T,) float32
        Logprob of the given token in the chosen mode (docs/semantics.md §6); NaN for an invalid row (§5).
    ranks : (T,) int64
        ``1 +`` the number of ids with a strictly greater logprob; ``-1`` for an invalid row.
    valid : (T,) bool
        False for an invalid row.
    top_logprob_ids : (T, N) int64
        The ``top_n`` best ids, ordered by (logprob desc, id asc); ``-1`` for an invalid row.
    top_logprobs : (T, N) float32
        Their logprobs (NaN padding).
    extra_logprobs : (T, K) float32
        Logprobs of the extra ids, in the order given; NaN where a row had fewer than ``K`` ids and for invalid rows.
    """

    logprobs: Any
    ranks: Any
    valid: Any
    top_logprob_ids: Any
    top_logprobs: Any
    extra_logprobs: Any

    def numpy(self) -> ScoreOutput:
        """A copy with every field as a numpy array (host copies of tensors)."""
        return ScoreOutput(*(_to_numpy(getattr(self, f)) for f in self.__dataclass_fields__))


@dataclass
class VerifyOutput:
    """Result of `fastsampler.Sampler.verify` for ``B`` requests with ``K`` draft tokens each (torch tensors on the
    sampler's device, numpy arrays for numpy logits).

    Row ``b`` emitted ``tokens[b, :num_tokens[b]]``: its ``num_accepted[b]`` accepted drafts, then (unless the row
    turned invalid, or an accepted draft ended the request) one more token -- the sample at the first rejected
    position, or the bonus token after ``K`` accepted drafts. The slot advanced by exactly the emitted tokens.

    Attributes
    ----------
    tokens : (B, K + 1) int64
        The emitted tokens, ``-1`` after the last.
    num_tokens : (B,) int64
        How many were emitted (``0 .. K + 1``; ``num_accepted + 1`` unless the row turned invalid or stopped on an
        accepted draft).
    num_accepted : (B,) int64
        How many drafts were accepted (``0 .. K``).
    logprobs : (B, K + 1) float32
        Each emitted token's logprob in the request's ``logprobs_mode`` (NaN where not asked for or not emitted).
    ranks : (B, K + 1) int64
        Their ranks (``-1`` where not asked for or not emitted).
    top_logprob_ids : (B, K + 1, N) int64
        The top-N ids at each emitted position (``-1`` padding).
    top_logprobs : (B, K + 1, N) float32
        Their logprobs (NaN padding).
    mirostat_mu : (B,) float32
        Each slot's Mirostat ``mu`` after the emitted tokens (NaN without Mirostat).
    stopped : (B,) bool
        The row's last emitted token ends its request (one of its ``stop_token_ids``, or an EOS id unless
        ``ignore_eos``); its later drafts were not verified.
    """

    tokens: Any
    num_tokens: Any
    num_accepted: Any
    logprobs: Any
    ranks: Any
    top_logprob_ids: Any
    top_logprobs: Any
    mirostat_mu: Any
    stopped: Any = None

    def numpy(self) -> VerifyOutput:
        """A copy with every field as a numpy array."""
        return VerifyOutput(*(None if getattr(self, f) is None else _to_numpy(getattr(self, f))
                              for f in self.__dataclass_fields__))
