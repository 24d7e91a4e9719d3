"""Op-level functions that engines can mix into their own sampling code.

Each takes per-row parameters as a scalar or a ``(batch_size,)`` tensor and never synchronises with the device.
The truncation ops run the same kernels as `fastsampler.sample` (stages A–E of ``docs/semantics.md``), so a mask or
a renormalised distribution from here is exactly the kept set `sample` draws from.

>>> import torch
>>> from fastsampler import ops
>>> ops.top_k_mask_logits(torch.tensor([[1.0, 3.0, 2.0]]), 2).tolist()
[[-inf, 3.0, 2.0]]
"""

from __future__ import annotations

from typing import Any

import torch

from . import backends
from ._batch import PackedBatch, pack_param_rows
from .layout import F_MIN_P, F_TEMPERATURE, F_TOP_P, F_TYPICAL_P, I_MIN_KEEP, I_TOP_K, NF, NI, BatchFlags
from .params import SamplingParams

__all__ = [
    "apply_logit_bias_",
    "apply_penalties_",
    "compute_logprobs",
    "min_p_mask_logits",
    "min_p_renorm_probs",
    "top_k_mask_logits",
    "top_k_renorm_probs",
    "top_p_mask_logits",
    "top_p_renorm_probs",
    "truncation_logprobs",
    "typical_mask_logits",
    "typical_renorm_probs",
]

PerRow = float | int | torch.Tensor


def _column(value: PerRow, b: int, device: torch.device, dtype: torch.dtype, name: str) -> torch.Tensor:
    integer = not dtype.is_floating_point
    if isinstance(value, torch.Tensor):
        if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an int or an integer (batch_size,) tensor, got a {value.dtype} tensor")
        if not integer and (value.dtype.is_complex or value.dtype == torch.bool):
            raise TypeError(f"{name} must be a real scalar or a real (batch_size,) tensor, got a {value.dtype} tensor")
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(b)
        if value.shape != (b,):
            raise ValueError(f"{name} must be a scalar or a ({b},) tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or an integer (batch_size,) tensor, got {value!r} of type "
                        f"{type(value).__name__}")
    if integer and not -(1 << 31) <= value < (1 << 31):
        raise ValueError(f"{name} must fit in int32, got {value}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{name} must be a real scalar or a (batch_size,) tensor, got {value!r} of type "
                        f"{type(value).__name__}")
    return torch.full((b,), value, device=device, dtype=dtype)


def _check_scalar(name: str, value: PerRow, lo: float, hi: float, lo_open: bool) -> None:
    """Range-check host scalars (tensors are not read: that would synchronise)."""
    if isinstance(value, torch.Tensor):
        return
    v = float(value)
    ok = (lo < v if lo_open else lo <= v) and v <= hi
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")


def _truncation_kept(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = -1,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    typical_p: PerRow = 1.0,
    min_keep: PerRow = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """(B, V) bool: the kept set of each row after temperature and top-k -> top-p -> min-p -> typical-p, from the
    backend's thresholds (not from probabilities, which underflow in float32 for kept tokens far below the max)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch_size, vocab_size), got shape {tuple(logits.shape)}")
    _check_scalar("temperature", temperature, 0.0, float("inf"), True)
    _check_scalar("top_p", top_p, 0.0, 1.0, True)
    _check_scalar("min_p", min_p, 0.0, 1.0, False)
    _check_scalar("typical_p", typical_p, 0.0, 1.0, True)
    b, _ = logits.shape
    dev = logits.device
    f0, i0 = pack_param_rows([SamplingParams()])  # defaults: every feature off
    f = torch.from_numpy(f0).to(dev).expand(b, NF).clone()
    i = torch.from_numpy(i0).to(dev).expand(b, NI).clone()
    f[:, F_TEMPERATURE] = _column(temperature, b, dev, torch.float32, "temperature")
    f[:, F_TOP_P] = _column(top_p, b, dev, torch.float32, "top_p")
    f[:, F_MIN_P] = _column(min_p, b, dev, torch.float32, "min_p")
    f[:, F_TYPICAL_P] = _column(typical_p, b, dev, torch.float32, "typical_p")
    i[:, I_TOP_K] = _column(top_k, b, dev, torch.int32, "top_k")
    i[:, I_MIN_KEEP] = _column(min_keep, b, dev, torch.int32, "min_keep").clamp_min(1)
    flags = BatchFlags(
        # a temperature tensor may hold zeros: greedy rows possible (the kernels then also find the argmax)
        any_greedy=not (isinstance(temperature, (int, float)) and temperature > 0),
        any_top_k=not (isinstance(top_k, int) and top_k <= 0),
        any_top_p=not (isinstance(top_p, (int, float)) and top_p >= 1.0),
        any_min_p=not (isinstance(min_p, (int, float)) and min_p <= 0.0),
        any_typical=not (isinstance(typical_p, (int, float)) and typical_p >= 1.0),
        any_min_keep=not (isinstance(min_keep, int) and min_keep <= 1),
    )
    batch = PackedBatch(
        logits=logits, vocab_size=logits.shape[1], fparams=f, iparams=i,
        seeds=torch.zeros(b, dtype=torch.int64, device=dev), steps=torch.zeros(b, dtype=torch.int64, device=dev),
        seqs=torch.zeros(b, dtype=torch.int64, device=dev),
        mirostat_mu=torch.full((b,), float("nan"), dtype=torch.float32, device=dev), flags=flags,
        eos_ids=torch.zeros(0, dtype=torch.int32, device=dev),
    )
    mod = backends.load(backends.resolve(backend, dev, logits.dtype))
    return mod.kept_mask_packed(batch), f[:, F_TEMPERATURE]


def truncation_logprobs(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = -1,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    typical_p: PerRow = 1.0,
    min_keep: PerRow = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Log of the renormalised distribution after temperature and top-k -> top-p -> min-p -> typical-p.

    Parameters
    ----------
    logits : (batch_size, vocab_size) tensor, float32 / float16 / bfloat16
    temperature, top_k, top_p, min_p, typical_p, min_keep : scalar or (batch_size,) tensor
        As in `SamplingParams` (``temperature`` must be > 0 here).

    Returns
    -------
    (batch_size, vocab_size) float32: ``(z - m) - ln Σ_kept exp(z - m)`` on the kept set (``z = logits / T``, ``m``
    the kept maximum), ``-inf`` elsewhere; all ``-inf`` for invalid rows. The kept set is exactly the one `sample`
    draws from, so a kept token far below the maximum has a finite (very negative) logprob.

    >>> truncation_logprobs(torch.tensor([[0.0, 0.0, -9.0]]), top_k=2).exp().tolist()
    [[0.5, 0.5, 0.0]]
    """
    kept, t = _truncation_kept(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               typical_p=typical_p, min_keep=min_keep, backend=backend)
    z = torch.where(kept, logits.float() / t[:, None], float("-inf"))
    m = z.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # rows with nothing kept stay -inf
    zs = z - m
    return zs - torch.log(torch.exp(zs).sum(dim=-1, keepdim=True))


def _mask(logits: torch.Tensor, **kw: Any) -> torch.Tensor:
    kept, _ = _truncation_kept(logits, **kw)
    return logits.masked_fill(~kept, float("-inf"))


def _renorm(probs: torch.Tensor, **kw: Any) -> torch.Tensor:
    if probs.dim() != 2:
        raise ValueError(f"probs must be (batch_size, vocab_size), got shape {tuple(probs.shape)}")
    p = probs.float()
    kept, _ = _truncation_kept(torch.log(p), **kw)
    p = torch.where(kept, p, 0.0)
    total = p.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, p / total, 0.0)  # a row with nothing kept (invalid) stays all zero


def top_k_mask_logits(logits: torch.Tensor, top_k: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """``logits`` with every token outside the top ``k`` (ties at the k-th value kept) set to ``-inf``.

    logits: (batch_size, vocab_size); top_k: scalar or (batch_size,) int, ``<= 0`` keeps everything.

    >>> top_k_mask_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2).tolist()
    [[-inf, 2.0, 2.0, -inf]]
    """
    return _mask(logits, top_k=top_k, min_keep=min_keep, backend=backend)


def top_p_mask_logits(logits: torch.Tensor, top_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """``logits`` with every token outside the top-p nucleus set to ``-inf`` (shapes as `top_k_mask_logits`).

    >>> top_p_mask_logits(torch.tensor([[0.0, 0.0, -9.0]]), 0.9).tolist()
    [[0.0, 0.0, -inf]]
    """
    return _mask(logits, top_p=top_p, min_keep=min_keep, backend=backend)


def min_p_mask_logits(logits: torch.Tensor, min_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """``logits`` with tokens below ``min_p * p_max`` set to ``-inf``.

    >>> min_p_mask_logits(torch.tensor([[0.0, -1.0, -5.0]]), 0.1).tolist()
    [[0.0, -1.0, -inf]]
    """
    return _mask(logits, min_p=min_p, min_keep=min_keep, backend=backend)


def typical_mask_logits(logits: torch.Tensor, typical_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """``logits`` with tokens outside the locally typical set of mass ``typical_p`` set to ``-inf``.

    >>> typical_mask_logits(torch.tensor([[0.0, 0.0, -9.0]]), 0.5).tolist()  # the two tied tokens stay together
    [[0.0, 0.0, -inf]]
    """
    return _mask(logits, typical_p=typical_p, min_keep=min_keep, backend=backend)


def top_k_renorm_probs(probs: torch.Tensor, top_k: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """Probabilities ``(batch_size, vocab_size)`` restricted to the top ``k`` and renormalised (float32).

    >>> top_k_renorm_probs(torch.tensor([[0.5, 0.3, 0.2]]), 2).tolist()
    [[0.625, 0.375, 0.0]]
    """
    return _renorm(probs, top_k=top_k, min_keep=min_keep, backend=backend)


def top_p_renorm_probs(probs: torch.Tensor, top_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """Probabilities restricted to the top-p nucleus and renormalised (float32).

    >>> top_p_renorm_probs(torch.tensor([[0.5, 0.25, 0.25]]), 0.5).tolist()
    [[1.0, 0.0, 0.0]]
    """
    return _renorm(probs, top_p=top_p, min_keep=min_keep, backend=backend)


def min_p_renorm_probs(probs: torch.Tensor, min_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """Probabilities restricted to ``p >= min_p * p_max`` and renormalised (float32).

    >>> [round(p, 4) for p in min_p_renorm_probs(torch.tensor([[0.5, 0.4, 0.1]]), 0.5)[0].tolist()]
    [0.5556, 0.4444, 0.0]
    """
    return _renorm(probs, min_p=min_p, min_keep=min_keep, backend=backend)


def typical_renorm_probs(probs: torch.Tensor, typical_p: PerRow, *, min_keep: PerRow = 1, backend: str = "auto"):
    """Probabilities restricted to the locally typical set and renormalised (float32).

    >>> typical_renorm_probs(torch.tensor([[0.1, 0.2, 0.7]]), 0.5).tolist()
    [[0.0, 0.0, 1.0]]
    """
    return _renorm(probs, typical_p=typical_p, min_keep=min_keep, backend=backend)


# ------------------------------------------------------------------------------------------------- penalties, bias
def apply_penalties_(
    logits: torch.Tensor,
    *,
    output_counts: torch.Tensor | None = None,
    prompt_mask: torch.Tensor | None = None,
    repetition_penalty: PerRow = 1.0,
    frequency_penalty: PerRow = 0.0,
    presence_penalty: PerRow = 0.0,
) -> torch.Tensor:
    """Apply repetition, frequency and presence penalties to ``logits`` in place (stages B and C) and return it.

    Parameters
    ----------
    logits : (batch_size, vocab_size) tensor
    output_counts : (batch_size, vocab_size) int tensor, optional
        How often each token was generated (frequency / presence, and repetition).
    prompt_mask : (batch_size, ceil(vocab_size / 32)) int32 tensor, optional
        Prompt-token bitmask (bit ``t % 32`` of word ``t // 32``), for the repetition penalty.
    repetition_penalty, frequency_penalty, presence_penalty : scalar or (batch_size,) tensor

    >>> x = torch.tensor([[2.0, -2.0, 1.0]])
    >>> apply_penalties_(x, output_counts=torch.tensor([[1, 1, 0]]), repetition_penalty=2.0).tolist()
    [[1.0, -4.0, 1.0]]
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch_size, vocab_size), got shape {tuple(logits.shape)}")
    b, v = logits.shape
    dev = logits.device
    seen = torch.zeros((b, v), dtype=torch.bool, device=dev)
    counts = None
    if output_counts is not None:
        if output_counts.shape[0] != b or output_counts.shape[1] < v:
            raise ValueError(f"output_counts must be ({b}, >= {v}), got {tuple(output_counts.shape)}")
        counts = output_counts[:, :v].to(device=dev).clamp_min(0)  # a negative count counts as 0 (§3 C)
        seen |= counts > 0
    if prompt_mask is not None:
        words = (v + 31) // 32
        if prompt_mask.dtype != torch.int32 or tuple(prompt_mask.shape) != (b, words):
            raise ValueError(f"prompt_mask must be int32 ({b}, {words}), got {prompt_mask.dtype} "
                             f"{tuple(prompt_mask.shape)}")
        bits = (prompt_mask.to(dev).unsqueeze(-1) >> torch.arange(32, device=dev, dtype=torch.int32)) & 1
        seen |= bits.reshape(b, -1)[:, :v].bool()
    x = logits.float()
    r = _column(repetition_penalty, b, dev, torch.float32, "repetition_penalty")[:, None]
    x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if counts is not None:
        c = counts.float()
        fp = _column(frequency_penalty, b, dev, torch.float32, "frequency_penalty")[:, None]
        pp = _column(presence_penalty, b, dev, torch.float32, "presence_penalty")[:, None]
        x = x - (c * fp + (c > 0).float() * pp)
    logits.copy_(x)
    return logits


def apply_logit_bias_(logits: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add ``bias[b, j]`` to ``logits[b, token_ids[b, j]]`` in place (stage A); ids ``< 0`` are padding.

    An id that appears several times in a row gets the sum of its biases (summed in float32, then added once), as a
    single `SamplingParams.logit_bias` entry holding that sum would.

    logits: (batch_size, vocab_size); token_ids: (batch_size, n) int; bias: (batch_size, n) float.

    >>> apply_logit_bias_(torch.zeros(1, 3), torch.tensor([[2, -1]]), torch.tensor([[1.5, 9.0]])).tolist()
    [[0.0, 0.0, 1.5]]
    """
    if token_ids.shape != bias.shape or token_ids.dim() != 2 or token_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"token_ids and bias must both be ({logits.shape[0]}, n), got {tuple(token_ids.shape)} "
                         f"and {tuple(bias.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    ids = token_ids.to(logits.device).long()
    valid = ids >= 0
    add = torch.where(valid, bias.to(device=logits.device, dtype=torch.float32), 0.0)
    # duplicate ids in a row add up, as one logit_bias entry of their sum would (sum in float32, then one add)
    delta = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    delta.scatter_add_(1, ids.clamp_min(0), add)
    hit = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    hit.scatter_(1, ids.clamp_min(0), valid)
    logits.copy_(torch.where(hit, logits.float() + delta, logits.float()).to(logits.dtype))
    return logits


# ------------------------------------------------------------------------------------------------------ logprobs
def compute_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob of ``tokens`` under ``log_softmax(logits)``, the top ``top_n`` (id, logprob) pairs and the rank.

    Parameters
    ----------
    logits : (batch_size, vocab_size) tensor (pass raw or processed logits, whichever distribution you report)
    tokens : (batch_size,) int tensor
        A token outside ``[0, vocab_size)`` (such as the ``-1`` that `sample` returns for an invalid row) gives
        logprob NaN and rank -1 for its row; the row's top entries are still computed from its logits.
    top_n : int, keyword-only, ``0 <= top_n <= 20``

    Returns
    -------
    logprobs (batch_size,) float32, top_ids (batch_size, top_n) int64 ordered by (logprob desc, id asc),
    top_logprobs (batch_size, top_n) float32, ranks (batch_size,) int64 (1 + count of strictly greater logprobs).

    >>> lp, ids, top, rank = compute_logprobs(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([0]), top_n=2)
    >>> ids.tolist(), rank.tolist()
    ([[1, 2]], [3])
    """
    if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= 20:
        raise ValueError(f"top_n must be an int in [0, 20], got {top_n!r}")
    if logits.dim() != 2 or tokens.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (B, V) and tokens (B,), got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    x = logits.float()
    # (x - m) - ln Σ exp(x - m): the shift first, so the log-sum survives large |x| (docs/semantics.md §6)
    m = x.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    lse = torch.log(torch.exp(x - m).sum(dim=-1, keepdim=True))
    b, v = x.shape
    tok = tokens.to(x.device).long().unsqueeze(-1)
    # a token outside [0, V), such as the -1 of an invalid row, gives logprob NaN and rank -1 (no device sync)
    ok = (tok >= 0) & (tok < v)
    xt = x.gather(1, tok.clamp(0, max(v - 1, 0)))
    logprobs = torch.where(ok, (xt - m) - lse, float("nan")).squeeze(-1)
    ranks = torch.where(ok.squeeze(-1), 1 + (x > xt).sum(dim=-1), -1)
    n = min(top_n, v)
    if n == 0:
        empty = torch.zeros((b, top_n), device=x.device)
        return logprobs, torch.full((b, top_n), -1, dtype=torch.int64, device=x.device), empty.fill_(float("nan")), \
            ranks
    # order by (value desc, id asc): the n-th value is the boundary; strictly greater values all qualify, then the
    # lowest ids tied at the boundary fill the rest
    thr = torch.topk(x, n, dim=-1).values[:, -1:]
    ids = torch.arange(v, device=x.device, dtype=torch.float32).expand(b, v)
    above = x > thr
    key_tie = torch.where(x == thr, -ids, float("-inf"))
    tie_ids = torch.topk(key_tie, n, dim=-1).indices
    above_ids = torch.topk(torch.where(above, x, float("-inf")), n, dim=-1).indices
    n_above = above.sum(dim=-1, keepdim=True)
    j = torch.arange(n, device=x.device).expand(b, n)
    cand = torch.where(j < n_above, above_ids, tie_ids.gather(1, (j - n_above).clamp_min(0)))
    vals = x.gather(1, cand)
    # sort the n candidates by (value desc, id asc): stable sort by value after sorting by id
    cand_sorted, perm = torch.sort(cand, dim=-1)
    vals = vals.gather(1, perm)
    vals, perm2 = torch.sort(vals, dim=-1, descending=True, stable=True)
    cand = cand_sorted.gather(1, perm2)
    top_ids = torch.full((b, top_n), -1, dtype=torch.int64, device=x.device)
    top_lps = torch.full((b, top_n), float("nan"), device=x.device)
    top_ids[:, :n] = cand
    top_lps[:, :n] = (vals - m) - lse
    return logprobs, top_ids, top_lps, ranks
