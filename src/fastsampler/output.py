"""The one result type returned by every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SampleOutput"]


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
    """

    tokens: Any
    valid: Any
    logprobs: Any
    top_logprob_ids: Any
    top_logprobs: Any
    ranks: Any
    mirostat_mu: Any

    def __iter__(self):  # allows ``tokens, valid, *_ = out``
        yield from (self.tokens, self.valid, self.logprobs, self.top_logprob_ids, self.top_logprobs, self.ranks,
                    self.mirostat_mu)

    def numpy(self) -> SampleOutput:
        """A copy with every field as a numpy array (host copy for torch tensors)."""
        import numpy as np

        def conv(x: Any) -> Any:
            if hasattr(x, "detach"):
                return x.detach().cpu().numpy()
            return np.asarray(x)

        return SampleOutput(*(conv(x) for x in self))
