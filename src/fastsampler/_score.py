"""`score`: the logprobs of given tokens at ``T`` positions (echo, prompt logprobs, caller-chosen ids), on every
backend, without a ``(T, V)`` log-softmax.

The backends run their sampling pipeline with the tokens given (`PackedBatch.forced_tokens`: no draw), which yields
each token's logprob and rank and the top-N exactly as a sampled token's (docs/semantics.md §6). The logprobs of the
extra ids then need only each row's log-normaliser, which the first top entry carries (its logprob is ``-ln s``, its
value the row's maximum ``m``): ``lp[e] = (v[e] - m) - ln s`` for ``T * K`` gathered values ``v[e]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ._api import _LOGIT_DTYPES, _as_torch, _backend_of
from ._batch import PackedBatch, id_tensor, pack_batch, token_array
from ._custom_ops import run_backend
from .layout import (
    F_FREQ,
    F_PRES,
    F_REP,
    F_TEMPERATURE,
    I_IGNORE_EOS,
    I_MIN_TOKENS,
    MAX_TOP_LOGPROBS,
)
from .output import ScoreOutput
from .params import SamplingParams

__all__ = ["score"]

# the stage E settings a processed score strips (its logprobs do not depend on them, docs/semantics.md §6)
_NO_TRUNCATION = dict(top_k=-1, top_p=1.0, min_p=0.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_n_sigma=0.0,
                      xtc_probability=0.0, typical_p=1.0, min_keep=1, mirostat_mode=0, seed=0, n=1)
# the state keywords a processed score reads (the rest of `fastsampler.sample`'s concern the draw)
_PROCESSED_STATE = ("prompt_token_ids", "output_token_ids", "steps", "prompt_mask", "output_counts",
                    "token_bitmask", "eos_token_ids")


def _token_tensor(ids: Any, t: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The ``T`` token ids as an int64 tensor on ``device``, every one checked in ``[0, vocab)`` (a device tensor is
    read back once for the check)."""
    if isinstance(ids, torch.Tensor):
        out = id_tensor(ids, "token_ids", vocab, device).reshape(-1)
    else:
        out = torch.from_numpy(token_array(ids, "token_ids", vocab)).to(device)
    if out.numel() != t:
        raise ValueError(f"token_ids must hold one id per row of logits ({t}), got {out.numel()}")
    return out


def _extra_tensor(extra: Any, t: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Extra ids as a ``(T, K)`` int64 tensor, ``-1`` padding the shorter rows of a ragged list."""
    if isinstance(extra, torch.Tensor):
        if extra.dim() != 2 or extra.shape[0] != t:
            raise ValueError(f"extra_token_ids as a tensor must have shape ({t}, K), got {tuple(extra.shape)}")
        return id_tensor(extra, "extra_token_ids", vocab, device)
    if isinstance(extra, (str, bytes)) or not isinstance(extra, Iterable):
        raise TypeError(f"extra_token_ids must be T sequences of ints or a (T, K) integer tensor, got {extra!r}")
    rows = [token_array(r, f"extra_token_ids of row {i}", vocab) for i, r in enumerate(extra)]
    if len(rows) != t:
        raise ValueError(f"extra_token_ids must hold one sequence per row of logits ({t}), got {len(rows)}")
    arr = np.full((t, max((r.size for r in rows), default=0)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        arr[i, :r.size] = r
    return torch.from_numpy(arr).to(device)


def processed_values(batch: PackedBatch, ids: torch.Tensor) -> torch.Tensor:
    """``z`` after stages A–D (greedy rows: ``l`` after A–C) at ``ids`` ``(B, K)`` (``>= 0``) of each row of a
    row-indexed batch, float32: the values docs/semantics.md §3 A–D gives those ids, computed for them alone."""
    v = batch.vocab_size
    x = batch.logits.gather(1, ids).to(torch.float32)
    fp, ip = batch.fparams, batch.iparams
    if batch.bias_indptr is not None and batch.bias_ids is not None and batch.bias_ids.numel():
        indptr = batch.bias_indptr.to(torch.int64)
        lens = indptr[1:] - indptr[:-1]
        width = int(lens.max())  # one read-back: the widest row's bias
        pos = torch.arange(width, device=x.device)[None, :]
        real = pos < lens[:, None]
        flat = (indptr[:-1, None] + pos).clamp(max=max(batch.bias_ids.numel() - 1, 0))
        table = torch.where(real, batch.bias_ids.to(torch.int64)[flat], v)  # sorted ids, padded with vocab
        vals = torch.where(real, batch.bias_vals[flat], 0.0)
        at = torch.searchsorted(table, ids).clamp(max=max(width - 1, 0))
        hit = table.gather(1, at) == ids
        x = x + torch.where(hit, vals.gather(1, at), 0.0)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    if batch.allowed_mask is not None:
        words = batch.allowed_mask.to(torch.int64).gather(1, ids >> 5)
        x = torch.where(((words >> (ids & 31)) & 1) != 0, x, neg_inf)
    eos = batch.eos_ids.to(device=x.device, dtype=torch.int64)
    if eos.numel():
        ban = (ip[:, I_IGNORE_EOS] != 0) | (batch.steps < ip[:, I_MIN_TOKENS].to(torch.int64))
        is_eos = (ids[:, :, None] == eos[None, None, :]).any(-1)
        x = torch.where(ban[:, None] & is_eos, neg_inf, x)
    if batch.flags.any_penalty:
        c = torch.zeros_like(x)
        if batch.output_counts is not None:
            c = batch.output_counts.gather(1, ids).clamp(min=0).to(torch.float32)
        seen = c > 0
        if batch.prompt_mask is not None:
            words = batch.prompt_mask.to(torch.int64).gather(1, ids >> 5)
            seen = seen | (((words >> (ids & 31)) & 1) != 0)
        r = fp[:, F_REP, None]
        x = torch.where(seen & (r != 1.0), torch.where(x > 0, x / r, x * r), x)
        x = x - (c * fp[:, F_FREQ, None] + (c > 0).to(torch.float32) * fp[:, F_PRES, None])
    if batch.dry_ids is not None and batch.dry_vals is not None and batch.dry_ids.shape[1]:
        table = batch.dry_ids.to(torch.int64)  # ascending per row, padded with DRY_PAD (above every id)
        at = torch.searchsorted(table, ids).clamp(max=table.shape[1] - 1)
        hit = table.gather(1, at) == ids
        x = x - torch.where(hit, batch.dry_vals.gather(1, at), 0.0)
    temp = fp[:, F_TEMPERATURE, None]
    return torch.where(temp == 0.0, x, x / torch.where(temp == 0.0, 1.0, temp))


def score(
    logits: Any,
    token_ids: Any,
    *,
    top_n: int = 0,
    extra_token_ids: Any = None,
    logprobs_mode: Literal["raw", "processed"] = "raw",
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    vocab_size: int | None = None,
    backend: str = "auto",
    **state: Any,
) -> ScoreOutput:
    """Logprobs of given tokens at ``T`` positions: echo / prompt logprobs, and the logprobs of caller-chosen ids.

    Row ``t`` of ``logits`` is the model's output at position ``t`` and ``token_ids[t]`` the token that follows it
    (for a prompt ``p`` with prefill logits ``L``: ``score(L[:-1], p[1:])``). Each row is scored as a sampled row
    would be (docs/semantics.md §6): the token's logprob and rank, the top-``top_n``, and optionally the logprobs of
    extra ids. Nothing of size ``(T, V)`` is built besides the caller's logits; ``T`` may be a whole prompt.

    Parameters
    ----------
    logits : (T, V') torch.Tensor or numpy array
        float32, float16 or bfloat16 (float64: reference backend), ``V' >= vocab_size``.
    token_ids : T ints (sequence, array or integer tensor)
        The token at each position, in ``[0, vocab_size)`` (a device tensor is read back once to check them).
    top_n : int, default 0
        Top entries per row, at most 20.
    extra_token_ids : T sequences of ints, or (T, K) integer tensor, optional
        More ids whose logprobs to return (e.g. up to 128 per request); a ragged list is padded with NaN.
    logprobs_mode : {'raw', 'processed'}, default 'raw'
        ``raw``: the model's distribution (``params`` and state must not be given). ``processed``: after logit
        bias, masks, penalties and temperature (§3 A–D) of ``params`` (one, or one per row) and the state keywords
        ``prompt_token_ids``, ``output_token_ids``, ``steps``, ``prompt_mask``, ``output_counts``,
        ``token_bitmask``, ``eos_token_ids`` (as in `fastsampler.sample`); truncation does not change these
        logprobs and is not run. The state is packed as `fastsampler.sample` packs it (``output_token_ids`` become
        a ``(T, V)`` count table: for penalties over a long prompt, pass ``output_counts`` / ``prompt_mask``).
    vocab_size : int, optional
        Real vocabulary size (default ``V'``).
    backend : {'auto', 'triton', 'cpu', 'reference'}
        As in `fastsampler.sample`.

    Returns
    -------
    ScoreOutput
        Torch tensors on the logits' device (numpy arrays for numpy input). Logprobs agree with the reference
        within the logprob tolerance of docs/semantics.md §8.

    Examples
    --------
    >>> import torch, fastsampler
    >>> out = fastsampler.score(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]), [2, 1], top_n=1,
    ...                         extra_token_ids=[[0], [0, 2]])
    >>> out.ranks.tolist(), out.top_logprob_ids.tolist()
    ([1, 2], [[2], [0]])
    >>> [round(v, 4) for v in out.extra_logprobs[1].tolist()]
    [-0.0949, -3.0949]
    """
    t, was_numpy = _as_torch(logits)
    if t.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"logits must be 2-D (T, vocab_size), got shape {tuple(t.shape)}")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_n must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_n!r}")
    if logprobs_mode not in ("raw", "processed"):
        raise ValueError(f"logprobs_mode must be 'raw' or 'processed' for scoring, got {logprobs_mode!r} (final "
                         f"logprobs depend on the draw's truncation: use fastsampler.sample)")
    unknown = sorted(set(state) - set(_PROCESSED_STATE))
    if unknown:
        raise TypeError(f"score() got an unexpected keyword argument {unknown[0]!r}")
    n_rows, width = t.shape
    vocab = width if vocab_size is None else int(vocab_size)
    if isinstance(vocab_size, bool) or not 1 <= vocab <= width:
        raise ValueError(f"vocab_size must be an integer in [1, {width}], got {vocab_size!r}")
    name, mod = _backend_of(backend, t.device, t.dtype)
    if not mod.supports(t.device, t.dtype):
        raise ValueError(f"backend={name!r} does not support logits of dtype {t.dtype} on device {t.device}")
    ids = _token_tensor(token_ids, n_rows, vocab, t.device)
    extra = None if extra_token_ids is None else _extra_tensor(extra_token_ids, n_rows, vocab, t.device)
    width_n = max(top_n, 1)  # the first top entry carries the log-normaliser (extra ids)
    if logprobs_mode == "raw":
        if params is not None or state:
            raise ValueError("raw logprobs depend on the logits alone: pass params and state only with "
                             "logprobs_mode='processed'")
        rows: Any = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=width_n)
        kw: dict[str, Any] = {}
    else:
        if params is None:
            raise ValueError("logprobs_mode='processed' needs params (the logit bias, masks, penalties and "
                             "temperature to apply)")
        cache: dict[int, SamplingParams] = {}

        def strip(p: SamplingParams) -> SamplingParams:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
            q = cache.get(id(p))
            if q is None:
                q = cache[id(p)] = p.replace(**_NO_TRUNCATION, logprobs=True, top_logprobs=width_n,
                                             logprobs_mode="processed")
            return q

        rows = strip(params) if isinstance(params, SamplingParams) else [strip(p) for p in params]
        dyn = [p for p in ([params] if isinstance(params, SamplingParams) else params) if p.dynatemp_range > 0.0]
        if dyn and extra is not None:
            raise ValueError("extra_token_ids with logprobs_mode='processed' need each row's temperature, and "
                             f"dynatemp_range={dyn[0].dynatemp_range} makes it a whole-row statistic: score the "
                             "extra ids as tokens, or leave dynatemp_range at 0")
        kw = state
    batch = pack_batch(t, rows, vocab_size=vocab, **kw)
    batch.forced_tokens = ids
    out = run_backend(name, batch) if n_rows else None
    dev = t.device
    if out is None:  # no rows: empty outputs
        e = torch.empty
        res = ScoreOutput(e(0, dtype=torch.float32, device=dev), e(0, dtype=torch.int64, device=dev),
                          e(0, dtype=torch.bool, device=dev), e((0, top_n), dtype=torch.int64, device=dev),
                          e((0, top_n), dtype=torch.float32, device=dev),
                          e((0, 0 if extra is None else extra.shape[1]), dtype=torch.float32, device=dev))
        return res.numpy() if was_numpy else res
    valid = out.valid
    if extra is None:
        extra_lp = torch.empty((n_rows, 0), dtype=torch.float32, device=dev)
    else:
        e_ids = extra.clamp(min=0)
        top0 = out.top_logprob_ids[:, :1].clamp(min=0)
        if logprobs_mode == "raw":
            ve, m = t.gather(1, e_ids).to(torch.float64), t.gather(1, top0).to(torch.float64)
        else:
            ve, m = processed_values(batch, e_ids).double(), processed_values(batch, top0).double()
        ls = -out.top_logprobs[:, :1].to(torch.float64)
        extra_lp = ((ve - m) - ls).to(torch.float32)
        extra_lp = torch.where((extra >= 0) & valid[:, None], extra_lp, float("nan"))
    res = ScoreOutput(logprobs=out.logprobs, ranks=out.ranks, valid=valid,
                      top_logprob_ids=out.top_logprob_ids[:, :top_n], top_logprobs=out.top_logprobs[:, :top_n],
                      extra_logprobs=extra_lp)
    return res.numpy() if was_numpy else res
