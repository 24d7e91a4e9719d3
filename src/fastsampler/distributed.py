"""Vocabulary-parallel sampling: sample from logits sharded by vocabulary across a ``torch.distributed`` group,
without gathering them (docs/distributed.md).

With tensor parallelism the LM head is split by vocabulary: rank ``r`` holds the logits of ids
``[vocab_start_r, vocab_start_r + V_local)``. `sample` runs the pipeline of docs/semantics.md on each rank's shard
and exchanges only per-row partial statistics, histograms of candidate values, per-tile weights and short top lists,
so every rank returns the same tokens, logprobs, top-N, ranks and Mirostat ``mu`` as single-device sampling of the
gathered logits (`fastsampler.reference.sample`), except at the near-ties of docs/semantics.md §8. The shard is
processed in float64 (the reference's arithmetic), on the logits' device. `Sampler` is the generation-loop form: each
rank keeps the counts and masks of its slice only, and its steps run the same per-shard pipeline (`_sample_shard`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ._batch import (
    check_ids,
    check_int,
    mask_words,
    pack_batch,
    pack_request,
    param_batch,
    random_seed,
    seed_to_int64,
    stopped_rows,
    token_array,
)
from ._shard import (
    Exchange,
    ExchangeStats,
    merge_moments,
    merge_stats,
    moments,
    row_stats,
    tile_noise,
    token_noise,
    top_values,
)
from ._shard_slots import ShardTables, local_bits
from ._slots import SlotBook
from .backends.reference.philox import xtc_uniform
from .backends.reference.pipeline import F32_OVERFLOW, F32_TINY, LN2, _row_params, dry_penalties, mirostat_v1_k
from .layout import I_MIN_TOKENS, MAX_COLUMNS, MIROSTAT_M, TILE, int_to_flags
from .output import SampleOutput
from .params import SamplingParams
from .sampler import Sampler as _SingleSampler

__all__ = ["sample", "Sampler", "ExchangeStats"]

GATHER_CAP = 64  # k-th largest values up to this k come from gathered top-k lists; beyond, the radix select


def _f32_range(v: torch.Tensor) -> torch.Tensor:
    """Values that float32 rounds to ``±inf`` become ``±inf`` (docs/semantics.md §5, overflow)."""
    return torch.where(v <= -F32_OVERFLOW, -torch.inf, torch.where(v >= F32_OVERFLOW, torch.inf, v))


def _shard_bits(mask: torch.Tensor, lo: int, hi: int, width: int, dev: torch.device) -> torch.Tensor:
    """(B, width) bool: the bits of ids ``[lo, hi)`` of a (B, W) int32 bitmask, False beyond ``hi`` (padding)."""
    ids = torch.arange(lo, hi, dtype=torch.int64)
    words = mask.cpu()[:, ids >> 5]
    bits = ((words >> (ids & 31).to(torch.int32)) & 1).to(torch.bool)
    return torch.nn.functional.pad(bits, (0, width - (hi - lo)), value=False).to(dev)


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def sample(
    local_logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    steps: Any = None,
    seqs: Any = None,
    mirostat_mu: Any = None,
    seeds: Any = None,
    prompt_mask: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
    token_bitmask: torch.Tensor | None = None,
    eos_token_ids: Sequence[int] | torch.Tensor = (),
    stats: ExchangeStats | None = None,
) -> SampleOutput:
    """Sample one token per row from logits sharded by vocabulary; every rank of ``group`` calls it and gets the
    same result.

    Parameters
    ----------
    local_logits : (batch_size, V_local) torch.Tensor
        This rank's logits, float16 / bfloat16 / float32 / float64: column ``j`` is token ``vocab_start + j``.
        Columns at ids ``>= vocab_size`` are padding (an engine's last shard is usually padded). The ranks' slices,
        in rank order, must be contiguous from id 0 and cover the vocabulary.
    params : SamplingParams or sequence of batch_size SamplingParams
        The same on every rank.
    vocab_start : int
        The first token id of this rank's slice.
    vocab_size : int
        The real vocabulary size (of the whole model, not of the shard).
    group : torch.distributed.ProcessGroup, optional
        The tensor-parallel group (default: the world). Collectives run on the logits' device (gloo: CPU tensors,
        NCCL: CUDA tensors).
    prompt_token_ids, output_token_ids, steps, seqs, mirostat_mu, seeds, eos_token_ids
        As in `fastsampler.sample`, the same on every rank (token ids are global ids). A row without a seed
        (neither ``params.seed`` nor ``seeds``) gets rank 0's random seed, broadcast.
    prompt_mask, token_bitmask : (batch_size, ceil(vocab_size / 32)) int32 tensor, optional
        Bitmasks over the **whole** vocabulary, as in `fastsampler.sample` (they are small; a grammar engine makes
        one for the whole vocabulary).
    output_counts : (batch_size, V_local) int16 or int32 tensor, optional
        Generated-token counts of **this rank's slice** (column ``j``: token ``vocab_start + j``).
    stats : ExchangeStats, optional
        Accumulates the collectives and bytes this rank exchanged.

    Returns
    -------
    SampleOutput
        Tensors on the logits' device (logprobs and mu float32), identical on every rank.

    Examples
    --------
    A group of one process (a tensor-parallel group holds several, see examples/tensor_parallel.py):

    >>> import os, tempfile, torch, torch.distributed as dist
    >>> from fastsampler import SamplingParams, distributed
    >>> store = dist.FileStore(tempfile.mktemp(), 1)
    >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    >>> out = distributed.sample(torch.tensor([[0.0, 5.0, 1.0]]), SamplingParams(temperature=0.0), vocab_start=0,
    ...                          vocab_size=3)
    >>> out.tokens.tolist()
    [1]
    >>> dist.destroy_process_group()
    """
    if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 2:
        raise ValueError(f"local_logits must be a 2-D torch tensor (batch_size, V_local), got "
                         f"{getattr(local_logits, 'shape', type(local_logits).__name__)}")
    if local_logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"local_logits must be float16, bfloat16, float32 or float64, got {local_logits.dtype}")
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if name == "vocab_start" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'vocab_start' else 1}, got {v!r}")
    if not isinstance(params, (SamplingParams, list, tuple)):
        params = list(params)
    ex = Exchange(group, stats)
    dev = local_logits.device
    b, width = local_logits.shape
    layout = _check_layout(ex, int(vocab_start), width, b, int(vocab_size), dev)

    # ---------------------------------------------------------------------------------------------- packing
    # the whole vocabulary's packing (validation, params, masks as bitmasks, bias, EOS, stop and history bans) on a
    # zero-stride stand-in for the logits: nothing of size B x V is allocated for the logits
    virtual = torch.zeros((), dtype=torch.float32).expand(b, vocab_size)
    counts_arg = None
    if output_counts is not None:
        if not isinstance(output_counts, torch.Tensor) or output_counts.dtype not in (torch.int16, torch.int32) or \
                tuple(output_counts.shape) != (b, width):
            raise ValueError(f"output_counts must be an int16 or int32 tensor of this rank's slice, shape "
                             f"({b}, {width}), got {getattr(output_counts, 'dtype', None)} "
                             f"{tuple(getattr(output_counts, 'shape', ()))}")
        counts_arg = torch.zeros((), dtype=torch.int32).expand(b, vocab_size)  # (checks only)
    batch = pack_batch(virtual, params, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
                       steps=steps, seqs=seqs, mirostat_mu=mirostat_mu, seeds=seeds, prompt_mask=prompt_mask,
                       output_counts=counts_arg, token_bitmask=token_bitmask, eos_token_ids=eos_token_ids)
    pb = param_batch(params, b)
    seeds_t = batch.seeds.cpu()
    if seeds is None and pb.seeds is None and any(e.seed is None for e in pb.rows):
        seeds_t = ex.broadcast(seeds_t.to(dev)).cpu()  # fresh random seeds: rank 0's
    f, i = _host(batch.fparams), _host(batch.iparams)
    rows = [_row_params(f[r], i[r]) for r in range(b)]
    steps_h = _host(batch.steps).astype(np.int64)
    seqs_h = _host(batch.seqs).astype(np.int64)
    mu_h = _host(batch.mirostat_mu).astype(np.float32).astype(np.float64)

    lo, hi = int(vocab_start), max(min(int(vocab_start) + width, int(vocab_size)), int(vocab_start))
    bias = None
    if batch.bias_indptr is not None:
        indptr = batch.bias_indptr.cpu().to(torch.int64)
        rr = torch.repeat_interleave(torch.arange(b), indptr[1:] - indptr[:-1])
        bias = _local_entries(rr, batch.bias_ids.cpu().to(torch.int64), batch.bias_vals.cpu(), lo, hi)
    allowed = None if batch.allowed_mask is None else _shard_bits(batch.allowed_mask, lo, hi, width, dev)
    if output_counts is not None:
        counts = output_counts
    elif batch.output_counts is not None:
        c = batch.output_counts[:, lo:hi].to(dev, torch.int64)
        counts = torch.nn.functional.pad(c, (0, width - c.shape[1]))
    else:
        counts = None
    prompt = None if batch.prompt_mask is None else _shard_bits(batch.prompt_mask, lo, hi, width, dev)
    dry = None
    if batch.flags.any_dry:  # DRY from the histories themselves, as the reference computes it (float64)
        plist = pb.plist()
        ents: list[tuple[int, int, float]] = []
        for r in range(b):
            hist = [*(prompt_token_ids[r] if prompt_token_ids is not None else ()),
                    *(output_token_ids[r] if output_token_ids is not None else ())]
            ents += [(r, t, v) for t, v in dry_penalties(hist, plist[r]).items()]
        if ents:
            dry = _local_entries(torch.tensor([e[0] for e in ents]), torch.tensor([e[1] for e in ents]),
                                 torch.tensor([e[2] for e in ents], dtype=torch.float64), lo, hi)
    shard = _Shard(rows=rows, seeds=seeds_t, steps=steps_h, seqs=seqs_h, mu=mu_h, n_top=int(batch.n_top),
                   eos=batch.eos_ids.cpu().to(torch.int64), allowed=allowed, prompt=prompt, counts=counts, bias=bias,
                   dry=dry)
    out = _sample_shard(ex, local_logits, shard, lo, int(vocab_size), layout)
    out.stopped = stopped_rows(out.tokens, params, eos_token_ids)
    return out


@dataclass
class _Shard:
    """What one step needs besides the logits, for this rank's columns: the rows' parameters (`_row_params`) and
    small state, replicated on every rank, and the vocabulary-sized inputs sliced to the shard.

    allowed, prompt : (B, V_local) bool or None (allowed ids after every ban; ids in the prompt)
    counts : (B, V_local) integer tensor or None (generated-token counts of the shard's ids)
    bias, dry : (row, local column, value) int64 / int64 / float64 tensors of the shard's logit-bias entries and DRY
        penalties, or None
    """

    rows: list[Any]
    seeds: torch.Tensor  # (B,) int64, CPU
    steps: np.ndarray  # (B,) int64
    seqs: np.ndarray  # (B,) int64
    mu: np.ndarray  # (B,) float64 (float32 values)
    n_top: int
    eos: torch.Tensor  # (E,) int64 global ids, CPU
    allowed: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    dry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _local_entries(rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, lo: int, hi: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries ``(row, id, value)`` whose id falls in ``[lo, hi)``, with local columns (None when none)."""
    sel = (ids >= lo) & (ids < hi)
    if not bool(sel.any()):
        return None
    return rows[sel].to(torch.int64), ids[sel].to(torch.int64) - lo, vals[sel].to(torch.float64)


def _sample_shard(ex: Exchange, local_logits: torch.Tensor, shard: _Shard, lo: int, vocab_size: int,
                  layout: list[list[int]]) -> SampleOutput:
    """The pipeline of docs/semantics.md on this rank's columns ``[lo, lo + V_local)`` of every row, with the
    exchanges of docs/distributed.md: `sample` and `Sampler.sample` both end here (``stopped`` is left to them)."""
    dev = local_logits.device
    b, width = local_logits.shape
    rows, seeds_t, steps_h, seqs_h, mu_h = shard.rows, shard.seeds, shard.steps, shard.seqs, shard.mu
    seeds_d, steps_d, seqs_d = seeds_t.to(dev), torch.from_numpy(steps_h).to(dev), torch.from_numpy(seqs_h).to(dev)
    hi = max(min(lo + width, vocab_size), lo)
    gid = torch.arange(lo, lo + width, dtype=torch.int64, device=dev)
    real = (gid < vocab_size)[None, :].expand(b, width)
    x = local_logits.detach().to(torch.float64)

    # ------------------------------------------------------------------------------------- stages A to C
    l = torch.where(real, x, -torch.inf)
    if shard.bias is not None:
        rr, cc, vv = shard.bias
        l.index_put_((rr.to(dev), cc.to(dev)), vv.to(dev), accumulate=True)
    if shard.allowed is not None:
        l = torch.where(shard.allowed.to(dev), l, -torch.inf)
    eos = shard.eos
    eos = eos[(eos >= lo) & (eos < hi)] - lo
    if eos.numel():
        ban = torch.tensor([bool(p.ignore_eos) or int(steps_h[r]) < p.min_tokens for r, p in enumerate(rows)])
        if bool(ban.any()):
            cols = torch.zeros(width, dtype=torch.bool)
            cols[eos] = True
            l = torch.where((ban[:, None] & cols[None, :]).to(dev), -torch.inf, l)
    counts = None if shard.counts is None else shard.counts.to(dev, torch.int64)
    if counts is not None:
        counts = counts.clamp(min=0)  # a negative count counts as 0 (§3 C)
        seen = counts > 0
    else:
        seen = torch.zeros(b, width, dtype=torch.bool, device=dev)
    if shard.prompt is not None:
        seen = seen | shard.prompt.to(dev)
    rep = torch.tensor([p.repetition_penalty for p in rows], dtype=torch.float64, device=dev)[:, None]
    if bool((rep != 1.0).any()):
        l = torch.where(seen, torch.where(l > 0, l / rep, l * rep), l)
    freq = torch.tensor([p.frequency_penalty for p in rows], dtype=torch.float64, device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in rows], dtype=torch.float64, device=dev)[:, None]
    if counts is not None and bool(((freq != 0.0) | (pres != 0.0)).any()):
        l = l - (counts.to(torch.float64) * freq + (counts > 0).to(torch.float64) * pres)
    if shard.dry is not None:  # DRY, after the frequency and presence penalties (-inf stays -inf)
        rr, cc, vv = shard.dry
        l.index_put_((rr.to(dev), cc.to(dev)), -vv.to(dev), accumulate=True)
    l = _f32_range(l)

    # ------------------------------------------------------------------ whole-row statistics, temperature (D)
    greedy = np.array([float(p.temperature) == 0.0 for p in rows])
    dyn = np.array([float(p.dynatemp_range) > 0.0 and not g for p, g in zip(rows, greedy, strict=True)])
    nsig = np.array([float(p.top_n_sigma) > 0.0 for p in rows]) & ~greedy
    fin_l = torch.isfinite(l)
    bad = lambda v: ((torch.isnan(v) | (v == torch.inf)) & real).any(1).to(torch.float64)
    lmax = torch.where(fin_l, l, -torch.inf)
    arg_v, arg_j = lmax.max(1)  # (the first maximum: the lowest id)
    x_at = x.gather(1, arg_j[:, None])[:, 0]
    fin_x = torch.isfinite(x) & real
    part1 = [torch.stack((bad(x), bad(l), (gid[arg_j]).to(torch.float64), x_at, arg_v), 1), row_stats(l, fin_l),
             row_stats(x, fin_x)]

    def z_of(temps: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.where(greedy, 1.0, temps)).to(dev)[:, None]
        return torch.where(torch.from_numpy(greedy).to(dev)[:, None], l, _f32_range(l / t))

    def z_part(z: torch.Tensor) -> list[torch.Tensor]:
        fz = torch.isfinite(z)
        out = [bad(z)[:, None], row_stats(z, fz)]
        if nsig.any():
            out.append(moments(z, fz))
        return out

    temps = np.array([float(p.temperature) for p in rows])
    z = z_of(temps)
    g1 = ex.gather(torch.cat([*part1, *z_part(z)], 1))  # one exchange for l, x and z
    # greedy token: the largest l, ties to the lowest id (ranks hold ascending ids: the first rank wins a tie)
    best = g1[:, :, 4].argmax(0)  # (the first rank with the maximum)
    pick = lambda col: g1[:, :, col].gather(0, best[None])[0]
    g_tok, g_x = pick(2), pick(3)
    bad1 = (g1[:, :, 0].max(0).values > 0) | (g1[:, :, 1].max(0).values > 0)
    n_l, m_l, lns_l, _ = merge_stats(g1[:, :, 5:9])
    n_x, m_x, lns_x, _ = merge_stats(g1[:, :, 9:13])
    valid = ~bad1 & (n_l > 0)
    g2 = g1[:, :, 13:]
    bad_z = g2[:, :, 0].max(0).values > 0
    n_z, m_z, lns_z, _ = merge_stats(g2[:, :, 1:5])
    std_z = merge_moments(g2[:, :, 5:8]) if nsig.any() else None
    valid = valid & ~bad_z & (n_z > 0)
    valid_h = _host(valid)
    z = torch.where(valid[:, None], z, -torch.inf)
    samp_h = valid_h & ~greedy
    keep = torch.isfinite(z) & torch.from_numpy(samp_h).to(dev)[:, None]

    # ------------------------------------------------------------------------------------ truncation (E)
    keep = _truncate(ex, z, keep, rows, samp_h, mu_h, int(vocab_size), n_z, m_z, lns_z, std_z,
                     seeds_t, steps_h, seqs_h)
    # the dynamic temperature of the kept set (§3 E): the entropy of softmax(l) over it, then z' = l / T' there
    zd = z
    dyn_h = samp_h & dyn
    if dyn_h.any():
        n_s, _, _, h_s = merge_stats(ex.gather(row_stats(l, keep)))
        n_h, h_h = _host(n_s), _host(h_s)
        for r in np.nonzero(dyn_h)[0]:
            p = rows[r]
            if n_h[r] > 1:
                t, delta = float(p.temperature), float(p.dynatemp_range)
                t_min, t_max = max(0.0, t - delta), t + delta
                t_dyn = t_min + (t_max - t_min) * (max(float(h_h[r]), 0.0) / math.log(n_h[r])) ** float(
                    p.dynatemp_exponent)
                temps[r] = max(t_dyn, F32_TINY)
        dd = torch.from_numpy(dyn_h).to(dev)[:, None]
        zd = torch.where(dd & keep, _f32_range(l / torch.from_numpy(temps).to(dev)[:, None]), z)
        over = _host(ex.sum(((zd == torch.inf) & keep).sum(1, keepdim=True).to(torch.float64))[:, 0]) > 0
        keep = keep & ~(dd & (zd == -torch.inf))  # (a kept token whose z' underflows leaves the set)
        left = _host(ex.sum(keep.sum(1, keepdim=True).to(torch.float64))[:, 0]) > 0
        lost = dyn_h & (over | ~left)  # z' overflows (or nothing is left): the row is invalid (§5)
        if lost.any():
            valid_h = valid_h & ~lost
            samp_h = samp_h & ~lost
            keep = keep & torch.from_numpy(~lost).to(dev)[:, None]

    # --------------------------------------------------------------------------------------- the draw (F)
    gk = merge_stats(ex.gather(row_stats(zd, keep)))
    _, m_k, lns_k, _ = gk
    mk_safe = torch.where(torch.isfinite(m_k), m_k, 0.0)
    tokens = torch.full((b,), -1, dtype=torch.int64, device=dev)
    z_tok = torch.zeros(b, dtype=torch.float64, device=dev)
    x_tok = torch.zeros(b, dtype=torch.float64, device=dev)
    gr_d = torch.from_numpy(greedy & valid_h).to(dev)
    tokens = torch.where(gr_d, g_tok.to(torch.int64), tokens)
    z_tok = torch.where(gr_d, pick(4), z_tok)
    x_tok = torch.where(gr_d, g_x, x_tok)
    zd_tok = z_tok
    if samp_h.any():
        st, zdt, xt, zt = _draw(ex, zd, x, z, keep, mk_safe, gid, lo, layout, seeds_d, steps_d, seqs_d)
        sd = torch.from_numpy(samp_h).to(dev)
        tokens, z_tok, x_tok = torch.where(sd, st, tokens), torch.where(sd, zt, z_tok), torch.where(sd, xt, x_tok)
        zd_tok = torch.where(sd, zdt, z_tok)

    # ---------------------------------------------------------------------------------------- Mirostat mu
    mu_out = mu_h.copy()
    fl_tok = _host((zd_tok - mk_safe) - lns_k)
    for r, p in enumerate(rows):
        if samp_h[r] and p.mirostat_mode:
            surprise = -float(fl_tok[r]) / LN2
            mu_out[r] = mu_h[r] - float(p.mirostat_lr) * (surprise - float(p.mirostat_target))

    # ------------------------------------------------------------------------------------------- logprobs
    n_top = shard.n_top
    lp_out = torch.full((b,), math.nan, dtype=torch.float64, device=dev)
    ranks = torch.full((b,), -1, dtype=torch.int64, device=dev)
    top_ids = torch.full((b, n_top), -1, dtype=torch.int64, device=dev)
    top_lps = torch.full((b, n_top), math.nan, dtype=torch.float64, device=dev)
    want = valid_h & np.array([bool(p.logprobs) for p in rows])
    if want.any():
        lp_out, ranks, top_ids, top_lps = _logprobs(ex, rows, want, greedy, x, z, zd, keep, real, gid, tokens, x_tok,
                                                    z_tok, zd_tok, (m_x, lns_x), (m_z, lns_z), (mk_safe, lns_k),
                                                    n_top, int(vocab_size))
    out = SampleOutput(tokens=tokens, valid=torch.from_numpy(valid_h).to(dev), logprobs=lp_out.to(torch.float32),
                       top_logprob_ids=top_ids, top_logprobs=top_lps.to(torch.float32), ranks=ranks,
                       mirostat_mu=torch.from_numpy(mu_out.astype(np.float32)).to(dev))
    return out


def _check_layout(ex: Exchange, start: int, width: int, b: int, vocab: int, dev: torch.device) -> list[list[int]]:
    """Every rank's ``[vocab_start, V_local, batch_size]``, checked: the same batch, slices contiguous from 0 in
    rank order and covering ``[0, vocab_size)``."""
    lay = ex.gather(torch.tensor([start, width, b], dtype=torch.int64, device=dev)).cpu().tolist()
    pos = 0
    for r, (s, w, bb) in enumerate(lay):
        if bb != b:
            raise ValueError(f"every rank must pass the same batch: rank {r} has {bb} rows, this rank {b}")
        if s != pos:
            raise ValueError(f"the ranks' vocabulary slices must be contiguous from id 0 in rank order: rank {r} "
                             f"starts at {s}, expected {pos} (slices {[(a, a + c) for a, c, _ in lay]})")
        pos = s + w
    if pos < vocab:
        raise ValueError(f"the ranks' vocabulary slices end at id {pos}, short of vocab_size={vocab}")
    return lay


def _truncate(ex: Exchange, z: torch.Tensor, keep: torch.Tensor, rows: list[Any], samp: np.ndarray, mu: np.ndarray,
              vocab: int, n_z: torch.Tensor, m_z: torch.Tensor, lns_z: torch.Tensor, std_z: torch.Tensor | None,
              seeds: torch.Tensor, steps: np.ndarray, seqs: np.ndarray) -> torch.Tensor:
    """Stage E on the shard (docs/semantics.md §3 E): every threshold decided from exchanged statistics, exactly as
    the reference decides it. Rows that do not use a rule are not changed by it; a rule's exchanges run only when
    some row uses it (every rank knows the params, so every rank runs the same exchanges)."""
    b, dev = z.shape[0], z.device
    mode = np.array([int(p.mirostat_mode) for p in rows])
    mk = np.array([int(p.min_keep) for p in rows])
    nz, mz, lnsz = _host(n_z), _host(m_z), _host(lns_z)
    on = lambda m: torch.from_numpy(np.asarray(m, dtype=bool)).to(dev)[:, None]
    tens = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(dev)
    mz_safe = torch.where(torch.isfinite(m_z), m_z, 0.0)

    def survivors() -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        n, m, lns, h = merge_stats(ex.gather(row_stats(z, keep)))
        return _host(n), torch.where(torch.isfinite(m), m, 0.0), lns, h

    # Mirostat v2: keep ln q >= -mu ln 2, or the tokens tied at the maximum when none qualifies
    v2 = samp & (mode == 2)
    if v2.any():
        lq = (z - mz_safe[:, None]) - lns_z[:, None]
        cut = tens(np.where(v2, -mu * LN2, 0.0))[:, None]
        k2 = keep & (lq >= cut)
        none = ex.sum(k2.sum(1, keepdim=True).to(torch.float64))[:, 0] == 0
        k2 = torch.where(none[:, None], keep & (z == mz_safe[:, None]), k2)
        keep = torch.where(on(v2), k2, keep)
    # Mirostat v1: k from the 100 most probable tokens (every rank's top 100, merged), then the top k with ties
    v1 = samp & (mode == 1)
    if v1.any():
        top = ex.gather(top_values(z, keep, MIROSTAT_M))
        top = torch.sort(top.permute(1, 0, 2).reshape(b, -1), dim=1, descending=True).values[:, :MIROSTAT_M]
        top_h = _host(top)
        kk = np.zeros(b, dtype=np.int64)
        for r in np.nonzero(v1)[0]:
            n = int(nz[r])
            m = min(MIROSTAT_M, n)
            lq = (top_h[r, :m] - mz[r]) - lnsz[r]
            kf = mirostat_v1_k(lq, float(mu[r]), vocab)
            if math.isnan(kf):
                kf = float(vocab)
            k = int(min(max(math.floor(kf), 1), vocab)) if math.isfinite(kf) else vocab
            kk[r] = k if k < n else 0
        if kk.any():
            thr = torch.where(tens(kk <= MIROSTAT_M) > 0, top.gather(1, torch.from_numpy(
                np.clip(kk - 1, 0, MIROSTAT_M - 1)).to(dev)[:, None])[:, 0], -torch.inf)
            far = np.where(kk > MIROSTAT_M, kk, 0)
            if far.any():
                thr = torch.where(tens(far > 0) > 0, ex.kth_largest(z, keep, torch.from_numpy(far).to(dev), 0), thr)
            keep = torch.where(on(kk > 0), keep & (z >= thr[:, None]), keep)
    rules = samp & (mode == 0)
    # 1. top-k: the k'-th largest survivor, k' = max(k, min_keep)
    kp = np.array([max(int(p.top_k), m) if int(p.top_k) > 0 else 0 for p, m in zip(rows, mk, strict=True)])
    kp = np.where(rules & (kp > 0) & (kp < nz), kp, 0)
    if kp.any():
        thr = ex.kth_largest(z, keep, torch.from_numpy(kp).to(dev), GATHER_CAP)
        keep = torch.where(on(kp > 0), keep & (z >= thr[:, None]), keep)
    # 2. top-p: the largest value whose mass at or above reaches p (and keeps min_keep), q over the survivors
    tp = rules & np.array([float(p.top_p) < 1.0 for p in rows])
    if tp.any():
        _, m_s, lns_s, _ = survivors()
        w = torch.exp((z - m_s[:, None]) - lns_s[:, None])
        v = ex.select(z, w, keep, tens(np.where(tp, mk, 0)), tens([float(p.top_p) if t else -math.inf
                                                                  for p, t in zip(rows, tp, strict=True)]))
        keep = torch.where(on(tp), keep & (z >= v[:, None]), keep)
    # 3. min-p, epsilon, top-n-sigma: thresholds of the whole distribution, lowered to keep min_keep
    mp = rules & np.array([float(p.min_p) > 0 or float(p.epsilon_cutoff) > 0 or float(p.top_n_sigma) > 0
                           for p in rows])
    if mp.any():
        sz = _host(std_z) if std_z is not None else None
        thr = np.full(b, -math.inf)
        for r in np.nonzero(mp)[0]:
            p, top_z, t = rows[r], float(mz[r]), -math.inf
            if p.min_p > 0.0:
                t = top_z + math.log(float(p.min_p))
            if p.epsilon_cutoff > 0.0:
                t = max(t, top_z + math.log(float(p.epsilon_cutoff)) + float(lnsz[r]))
            if p.top_n_sigma > 0.0:
                t = max(t, top_z - float(p.top_n_sigma) * float(sz[r]))
            thr[r] = min(t, top_z)
        thr_d = tens(thr)
        cnt = ex.sum(torch.stack(((keep & (z >= thr_d[:, None])).sum(1), keep.sum(1)), 1).to(torch.float64))
        cnt_h = _host(cnt)
        need = np.where(mp & (cnt_h[:, 0] < mk), np.minimum(mk, cnt_h[:, 1]).astype(np.int64), 0)
        if need.any():
            kth = ex.kth_largest(z, keep, torch.from_numpy(need).to(dev), GATHER_CAP)
            thr_d = torch.where(tens(need > 0) > 0, torch.minimum(thr_d, kth), thr_d)
        keep = torch.where(on(mp), keep & (z >= thr_d[:, None]), keep)
    # 4. typical-p: scores |-ln q - H| over the survivors, the smallest first until the mass reaches tau
    ty = rules & np.array([float(p.typical_p) < 1.0 for p in rows])
    if ty.any():
        _, m_s, lns_s, h_s = survivors()
        lq = (z - m_s[:, None]) - lns_s[:, None]
        neg_s = -torch.abs(-lq - h_s[:, None])
        v = ex.select(neg_s, torch.exp(lq), keep, tens(np.where(ty, mk, 0)),
                      tens([float(p.typical_p) if t else -math.inf for p, t in zip(rows, ty, strict=True)]))
        keep = torch.where(on(ty), keep & (neg_s >= v[:, None]), keep)
    # 5. eta: q >= min(eta, sqrt(eta) e^-H), q and H over the survivors, lowered to keep min_keep
    et = rules & np.array([float(p.eta_cutoff) > 0.0 for p in rows])
    if et.any():
        _, m_s, lns_s, h_s = survivors()
        ms_h, lns_h, hs_h = _host(m_s), _host(lns_s), _host(h_s)
        thr = np.full(b, -math.inf)
        for r in np.nonzero(et)[0]:
            eta = float(rows[r].eta_cutoff)
            thr[r] = min(float(ms_h[r]), float(ms_h[r]) + float(lns_h[r]) + min(math.log(eta),
                                                                               0.5 * math.log(eta) - float(hs_h[r])))
        thr_d = tens(thr)
        cnt = _host(ex.sum(torch.stack(((keep & (z >= thr_d[:, None])).sum(1), keep.sum(1)), 1).to(torch.float64)))
        need = np.where(et & (cnt[:, 0] < mk), np.minimum(mk, cnt[:, 1]).astype(np.int64), 0)
        if need.any():
            kth = ex.kth_largest(z, keep, torch.from_numpy(need).to(dev), GATHER_CAP)
            thr_d = torch.where(tens(need > 0) > 0, torch.minimum(thr_d, kth), thr_d)
        keep = torch.where(on(et), keep & (z >= thr_d[:, None]), keep)
    # 6. XTC: its coin (Philox stream 3), then the survivors above the least likely top choice removed
    xp = rules & np.array([float(p.xtc_probability) > 0.0 for p in rows])
    if xp.any():
        for r in np.nonzero(xp)[0]:
            seed = int(seeds[r]) & 0xFFFFFFFFFFFFFFFF
            xp[r] = xtc_uniform(seed, int(steps[r]), int(seqs[r])) < float(rows[r].xtc_probability)
    if xp.any():
        _, m_s, lns_s, _ = survivors()
        ms_h, lns_h = _host(m_s), _host(lns_s)
        cut = np.full(b, math.inf)
        for r in np.nonzero(xp)[0]:
            theta = float(rows[r].xtc_threshold)
            cut[r] = float(ms_h[r]) + float(lns_h[r]) + (math.log(theta) if theta > 0.0 else -math.inf)
        top = keep & (z >= tens(cut)[:, None])
        part = torch.stack((top.sum(1).to(torch.float64), torch.where(top, -z, -torch.inf).max(1).values), 1)
        g = ex.gather(part)
        n_top, a = g[:, :, 0].sum(0), -g[:, :, 1].max(0).values
        act = xp & (_host(n_top) >= 2)
        if act.any():
            a_d = torch.where(tens(act) > 0, a, torch.inf)
            rest = keep & (z <= a_d[:, None])
            n_rest = _host(ex.sum(rest.sum(1, keepdim=True).to(torch.float64))[:, 0])
            act = act & (n_rest >= mk)
            keep = torch.where(on(act), rest, keep)
    return keep


def _draw(ex: Exchange, z: torch.Tensor, x: torch.Tensor, z_proc: torch.Tensor, keep: torch.Tensor, m_k: torch.Tensor,
          gid: torch.Tensor, lo: int, layout: list[list[int]], seeds: torch.Tensor, steps: torch.Tensor,
          seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-level race of docs/semantics.md §3 F on global tiles: per-rank partial tile weights summed in rank
    order, the tile from Philox stream 1, then every rank's best token of that tile (stream 0) and the best of
    those. ``z`` are the values drawn from (with a dynamic temperature, ``z'``), ``z_proc`` the processed ones.
    Returns the token and its ``z``, ``x`` and ``z_proc`` values, per row."""
    b, width = z.shape
    dev = z.device
    t_lo = lo // TILE
    n_loc = [(s + w - 1) // TILE - s // TILE + 1 if w else 0 for s, w, _ in layout]
    t_max = max(n_loc)
    w = torch.where(keep, torch.exp(z - m_k[:, None]), 0.0)
    part = torch.zeros(b, t_max, dtype=torch.float64, device=dev)
    part.scatter_add_(1, (gid // TILE - t_lo)[None, :].expand(b, width), w)
    g = ex.gather(part)
    n_tiles = max(s // TILE + n for (s, _, _), n in zip(layout, n_loc, strict=True))
    wt = torch.zeros(b, n_tiles, dtype=torch.float64, device=dev)
    for r, ((s, _, _), n) in enumerate(zip(layout, n_loc, strict=True)):
        wt[:, s // TILE: s // TILE + n] += g[r, :, :n]
    tiles = torch.arange(n_tiles, device=dev)[None, :].expand(b, n_tiles)
    score = torch.where(wt > 0, torch.log(wt) - torch.log(tile_noise(seeds, steps, seqs, tiles)), -torch.inf)
    tile = score.argmax(1)  # (the first maximum: the lowest tile)
    # this rank's columns of the winning tile
    first = (tile * TILE - lo).clamp(min=0, max=width)
    cols = first[:, None] + torch.arange(TILE, device=dev)[None, :]
    inside = (cols < width) & (cols < (tile * TILE + TILE - lo)[:, None])
    cols = cols.clamp(max=max(width - 1, 0))
    if width == 0:
        cand = torch.zeros(b, TILE, dtype=torch.bool, device=dev)
        zc = torch.full((b, TILE), -torch.inf, dtype=torch.float64, device=dev)
        xc = pc = zc
    else:
        cand = inside & keep.gather(1, cols)
        zc, xc, pc = z.gather(1, cols), x.gather(1, cols), z_proc.gather(1, cols)
    ids = cols + lo
    ts = torch.where(cand, zc - torch.log(token_noise(seeds, steps, seqs, ids)), -torch.inf)
    best_s, j = ts.max(1)  # (the first maximum: the lowest id)
    mine = torch.stack((best_s, ids.gather(1, j[:, None])[:, 0].to(torch.float64), zc.gather(1, j[:, None])[:, 0],
                        xc.gather(1, j[:, None])[:, 0], cand.any(1).to(torch.float64),
                        pc.gather(1, j[:, None])[:, 0]), 1)
    g = ex.gather(mine)
    # the best score; among equal scores the lowest id (ranks hold ascending ids: the first rank with it)
    sc = torch.where(g[:, :, 4] > 0, g[:, :, 0], -torch.inf)
    r = sc.argmax(0)
    pick = lambda c: g[:, :, c].gather(0, r[None])[0]
    return pick(1).to(torch.int64), pick(2), pick(3), pick(5)


def _logprobs(ex: Exchange, rows: list[Any], want: np.ndarray, greedy: np.ndarray, x: torch.Tensor, z: torch.Tensor,
              zd: torch.Tensor, keep: torch.Tensor, real: torch.Tensor, gid: torch.Tensor, tokens: torch.Tensor,
              x_tok: torch.Tensor, z_tok: torch.Tensor, zd_tok: torch.Tensor, raw: tuple[torch.Tensor, torch.Tensor],
              proc: tuple[torch.Tensor, torch.Tensor], fin: tuple[torch.Tensor, torch.Tensor], n_top: int, vocab: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token's logprob and rank and the top-N (docs/semantics.md §6) from the global (max, ln Σ) of the row's
    mode: the rank's count of strictly greater logprobs summed, the top-N merged from every rank's top-N. Final
    logprobs come from ``zd`` (``z'`` on rows with a dynamic temperature), processed ones from ``z``."""
    b, width = z.shape
    dev = z.device
    modes = np.array([p.logprobs_mode for p in rows])
    safe = lambda m: torch.where(torch.isfinite(m), m, 0.0)
    lp_raw = _f32_range((x - safe(raw[0])[:, None]) - raw[1][:, None])
    lp_proc = _f32_range((z - safe(proc[0])[:, None]) - proc[1][:, None])
    lp_fin = torch.where(keep, _f32_range((zd - fin[0][:, None]) - fin[1][:, None]), -torch.inf)
    gr = torch.from_numpy(greedy).to(dev)[:, None]
    lp_fin = torch.where(gr, torch.where(gid[None, :] == tokens[:, None], 0.0, -torch.inf), lp_fin)
    t_raw = _f32_range((x_tok - safe(raw[0])) - raw[1])
    t_proc = _f32_range((z_tok - safe(proc[0])) - proc[1])
    t_fin = torch.where(gr[:, 0], 0.0, _f32_range((zd_tok - fin[0]) - fin[1]))
    sel = lambda a, bb, c: torch.where(torch.from_numpy(modes == "raw").to(dev).reshape(
        (-1,) + (1,) * (a.dim() - 1)), a, torch.where(torch.from_numpy(modes == "processed").to(dev).reshape(
            (-1,) + (1,) * (a.dim() - 1)), bb, c))
    wd = torch.from_numpy(want).to(dev)
    lp = torch.where(real & wd[:, None], sel(lp_raw, lp_proc, lp_fin), -torch.inf)
    lp = torch.where(torch.isnan(lp), -torch.inf, lp)
    lp_tok = sel(t_raw, t_proc, t_fin)
    greater = ((lp > lp_tok[:, None]) & real).sum(1).to(torch.float64)
    parts = [greater[:, None]]
    if n_top:
        vals, order = torch.sort(lp, dim=1, descending=True, stable=True)  # (lp desc, id asc)
        ids = gid[order]
        if width < n_top:
            vals = torch.nn.functional.pad(vals, (0, n_top - width), value=-torch.inf)
            ids = torch.nn.functional.pad(ids, (0, n_top - width), value=vocab)
        parts += [vals[:, :n_top], ids[:, :n_top].to(torch.float64)]
    g = ex.gather(torch.cat(parts, 1))
    rank = 1 + g[:, :, 0].sum(0).to(torch.int64)
    ranks = torch.where(wd, rank, -1)
    lp_out = torch.where(wd, lp_tok, math.nan)
    top_ids = torch.full((b, n_top), -1, dtype=torch.int64, device=dev)
    top_lps = torch.full((b, n_top), math.nan, dtype=torch.float64, device=dev)
    if n_top:
        v = g[:, :, 1:1 + n_top].permute(1, 0, 2).reshape(b, -1)
        i = g[:, :, 1 + n_top:].permute(1, 0, 2).reshape(b, -1)
        o = torch.sort(i, dim=1, stable=True).indices  # id asc, then lp desc (stable): (lp desc, id asc)
        v, i = v.gather(1, o), i.gather(1, o)
        o = torch.sort(v, dim=1, descending=True, stable=True).indices
        v, i = v.gather(1, o)[:, :n_top], i.gather(1, o)[:, :n_top].to(torch.int64)
        n_row = torch.tensor([int(p.top_logprobs) for p in rows], device=dev)
        ok = wd[:, None] & (torch.arange(n_top, device=dev)[None, :] < n_row[:, None]) & (i < vocab)
        top_ids = torch.where(ok, i, -1)
        top_lps = torch.where(ok, v, math.nan)
    return lp_out, ranks, top_ids, top_lps


# ------------------------------------------------------------------------------------------------------- Sampler
class Sampler:
    """The generation-loop `fastsampler.Sampler` for logits sharded by vocabulary: each rank of ``group`` keeps the
    vocabulary-sized state of its own slice of ids only, and every rank returns the same result.

    Every rank constructs it with the same ``vocab_size``, ``max_slots``, ``eos_token_ids`` and ``history_len`` and
    its own ``vocab_start`` / ``local_size``, and makes the same calls in the same order (`add`, `remove`, `sample`
    with the same arguments, except each rank's own logits): the slots, and every decision, are then the same on
    every rank. A step is `fastsampler.distributed.sample` on the slots' state (docs/distributed.md, "Sampler").

    Per slot and rank: the output counts of the slice's ids (int16 ``(V_local,)``, saturating at 32767, as
    `fastsampler.Sampler`) and its prompt and allowed bitmasks (``ceil(V_local / 32)`` int32 words each, bit ``j``
    for id ``vocab_start + j``) on ``device``; replicated on every rank: the packed parameters, seed, step, seq and
    Mirostat ``mu`` (on the host) and the history ring of ``history_len`` tokens with the history rules (on
    ``device``).

    Parameters
    ----------
    vocab_size : int
        The whole vocabulary's size ``V``.
    max_slots : int
        Number of slots.
    device : torch.device or str, default "cpu"
        Where the sharded state lives; the local logits must be on it (gloo: CPU, NCCL: CUDA).
    vocab_start : int
        The first id of this rank's slice.
    local_size : int
        The local logits' columns (``V_local``; padding past ``vocab_size`` included). The slices, in rank order, must
        be contiguous from id 0 and cover the vocabulary (checked here, with one exchange).
    group : torch.distributed.ProcessGroup, optional
        The tensor-parallel group (default: the world).
    eos_token_ids : sequence of int, default ()
        EOS ids (global), banned while a slot's step is below its ``min_tokens``.
    history_len : int, default 0
        Tokens of history kept per slot for the history rules and DRY, as in `fastsampler.Sampler`.

    Examples
    --------
    A group of one process (a tensor-parallel group holds several; docs/distributed.md has a runnable one):

    >>> import tempfile, torch, torch.distributed as dist
    >>> from fastsampler import SamplingParams, distributed
    >>> dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
    >>> s = distributed.Sampler(vocab_size=4, max_slots=2, vocab_start=0, local_size=4)
    >>> slots = s.add(SamplingParams(temperature=0.0, frequency_penalty=2.0))
    >>> [s.sample(torch.tensor([[0.0, 2.0, 1.5, 0.0]]), slots).tokens.item() for _ in range(2)]
    [1, 2]
    >>> s.output_counts_of(slots[0]).tolist(), s.step_of(slots[0])
    ([0, 1, 1, 0], 2)
    >>> dist.destroy_process_group()
    """

    def __init__(self, vocab_size: int, max_slots: int, device: torch.device | str = "cpu", *, vocab_start: int,
                 local_size: int, group: dist.ProcessGroup | None = None, eos_token_ids: Sequence[int] = (),
                 history_len: int = 0) -> None:
        self._vocab = check_int("vocab_size", vocab_size, 1, MAX_COLUMNS)
        self._slots = check_int("max_slots", max_slots, 1)
        self._lo = check_int("vocab_start", vocab_start, 0)
        self._width = check_int("local_size", local_size, 0)
        history_len = check_int("history_len", history_len, 0, 1 << 20)
        eos = eos_token_ids.tolist() if isinstance(eos_token_ids, (torch.Tensor, np.ndarray)) else list(eos_token_ids)
        check_ids("eos_token_ids", None, eos, self._vocab)
        self._eos_host = tuple(int(t) for t in eos)
        self._eos = torch.tensor(self._eos_host, dtype=torch.int64)
        self._device = torch.device(device)
        self._group = group
        # every rank's [vocab_start, local_size, max_slots], checked once
        self._layout = _check_layout(Exchange(group, None), self._lo, self._width, self._slots, self._vocab,
                                     self._device)
        self._book = SlotBook(self._slots)
        self._tables = ShardTables(self._slots, self._vocab, self._lo, self._width, self._device, history_len)
        self._rows: list[Any] = [None] * self._slots  # each slot's parameters as the pipeline reads them

    # -------------------------------------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def vocab_start(self) -> int:
        """The first id of this rank's slice."""
        return self._lo

    @property
    def local_size(self) -> int:
        """The columns of this rank's slice (``V_local``)."""
        return self._width

    @property
    def max_slots(self) -> int:
        return self._slots

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_active(self) -> int:
        return self._slots - self._book.num_free

    @property
    def num_free(self) -> int:
        return self._book.num_free

    @property
    def active_slots(self) -> list[int]:
        return [i for i, p in enumerate(self._book.params) if p is not None]

    @property
    def state_bytes_per_slot(self) -> int:
        """This rank's bytes per slot of vocabulary-sized state (counts, prompt mask, allowed mask once allocated)."""
        return self._tables.nbytes_per_slot

    def _check_slot(self, slot: Any) -> int:
        return _SingleSampler._check_slot(self, slot)  # (reads _slots and _book)

    def seed_of(self, slot: int) -> int:
        return self._book.seeds[self._check_slot(slot)]

    def params_of(self, slot: int) -> SamplingParams:
        p = self._book.params[self._check_slot(slot)]
        assert p is not None
        return p

    def step_of(self, slot: int) -> int:
        return int(self._tables.steps[self._check_slot(slot)])

    def mirostat_mu_of(self, slot: int) -> float:
        return float(self._tables.mu[self._check_slot(slot)])

    def output_counts_of(self, slot: int) -> torch.Tensor:
        """A copy of ``slot``'s counts of this rank's ids, ``(V_local,)`` int16 (column ``j``: id ``vocab_start +
        j``)."""
        return self._tables.counts[self._check_slot(slot)].clone()

    def __repr__(self) -> str:
        return (f"distributed.Sampler(vocab_size={self._vocab}, max_slots={self._slots}, device={str(self._device)!r}, "
                f"vocab_start={self._lo}, local_size={self._width}, active={self.num_active}, "
                f"eos_token_ids={self._eos_host})")

    # ---------------------------------------------------------------------------------------- add / remove
    def add(self, params: SamplingParams, prompt_token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = (), *,
            output_token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None, step: int | None = None,
            mirostat_mu: float | None = None) -> list[int]:
        """Add a request on every rank (the same arguments everywhere); returns its ``params.n`` slots, the same on
        every rank. Arguments as in `fastsampler.Sampler.add` (global token ids). A request without a seed gets
        rank 0's random seed (one broadcast: then every rank must be in this call)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.n > self._book.num_free:
            raise ValueError(f"Sampler is full: the request needs n={params.n} slots, {self._book.num_free} of "
                             f"max_slots={self._slots} are free; remove finished requests first")
        v = self._vocab
        prompt = token_array(prompt_token_ids, "prompt_token_ids", v)
        _SingleSampler._check_request(self, params)  # (reads _vocab, _eos_host and _tables.history_len)
        out = None if output_token_ids is None else token_array(output_token_ids, "output_token_ids", v)
        step = (0 if out is None else int(out.size)) if step is None else check_int("step", step, 0, (1 << 63) - 1)
        if mirostat_mu is not None:
            if not params.mirostat_mode:
                raise ValueError("mirostat_mu is the state of a Mirostat request; this request has mirostat_mode=0")
            if math.isnan(float(mirostat_mu)):
                raise ValueError("mirostat_mu must not be NaN")
        if params.seed is not None:
            seed = params.seed
        else:  # rank 0's random seed on every rank
            mine = torch.tensor([seed_to_int64(random_seed())], dtype=torch.int64, device=self._device)
            seed = int(Exchange(self._group, None).broadcast(mine).item()) & 0xFFFFFFFFFFFFFFFF
        req = pack_request(params)
        slots = self._book.take(params.n)
        self._tables.write(slots, req, seed_to_int64(seed), prompt, out, step=step,
                           mu=None if mirostat_mu is None else float(mirostat_mu))
        self._book.fill(slots, params, seed, req)
        for s in slots:
            self._rows[s] = _row_params(req.f, req.i)
        return slots

    def remove(self, slots: int | Sequence[int]) -> None:
        """Free slots (on every rank). Raises ``ValueError`` for a slot not in use."""
        items = [slots] if isinstance(slots, (int, np.integer)) and not isinstance(slots, bool) else list(slots)
        checked = [self._check_slot(s) for s in items]
        if len(set(checked)) != len(checked):
            raise ValueError(f"slots to remove must be distinct, got {checked}")
        self._book.release(checked)

    def reset(self) -> None:
        """Free every slot."""
        self._book.reset()

    # -------------------------------------------------------------------------------------------------- sample
    def sample(self, local_logits: torch.Tensor, slots: Sequence[int], *, token_bitmask: torch.Tensor | None = None,
               stats: ExchangeStats | None = None) -> SampleOutput:
        """Sample one token per row, row ``r`` for slot ``slots[r]``, from this rank's logits, and advance those
        slots; every rank calls it with the same slots and gets the same result.

        Parameters
        ----------
        local_logits : (batch_size, local_size) torch.Tensor
            This rank's logits (column ``j``: id ``vocab_start + j``) on the sampler's device.
        slots : sequence of batch_size ints
            Distinct slots in use.
        token_bitmask : (batch_size, ceil(vocab_size / 32)) int32 tensor, optional
            Allowed ids over the **whole** vocabulary (as `fastsampler.distributed.sample`), AND-ed with the slots'.
        stats : ExchangeStats, optional
            Accumulates this rank's collectives and bytes.

        Returns
        -------
        SampleOutput
            As `fastsampler.Sampler.sample`, on the logits' device, identical on every rank; ``stopped`` when some
            slot of the batch has stop ids.

        After the draw each valid row's slot advances its step and counts its token (on the rank that holds the
        id), appends it to its history; every row's slot stores the returned ``mu``, as in `fastsampler.Sampler`.
        """
        if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 2:
            raise ValueError(f"local_logits must be a 2-D torch tensor (batch_size, local_size), got "
                             f"{getattr(local_logits, 'shape', type(local_logits).__name__)}")
        if local_logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"local_logits must be float16, bfloat16, float32 or float64, got {local_logits.dtype}")
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        rows = [self._check_slot(s) for s in slots]
        b = len(rows)
        if len(set(rows)) != b:
            raise ValueError(f"slots must be distinct within a batch, got {rows}")
        if tuple(local_logits.shape) != (b, self._width):
            raise ValueError(f"local_logits must have shape ({b}, {self._width}) (one row per slot, local_size "
                             f"columns), got {tuple(local_logits.shape)}")
        dev, t, lo, width = self._device, self._tables, self._lo, self._width
        ex = Exchange(self._group, stats)
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        bits, n_top, n_bias, restricted = self._book.aggregate(rows)
        info = self._book.rule_info(rows)
        penal = int_to_flags(bits).any_penalty
        steps = t.steps[rows].copy()
        hi = max(min(lo + width, self._vocab), lo)

        # the allowed ids of the slice: the slots' allowed bits, the stop ids before min_tokens, the history rules,
        # the step's bitmask
        allowed = local_bits(t.allowed.index_select(0, idx), width) if restricted and t.allowed is not None else None
        parts = [allowed, t.history_bans(idx, info)]
        if info.stop_ban:
            ban = torch.zeros(b, width, dtype=torch.bool)
            for r, s in enumerate(rows):
                ids = t.stop_ids[s]
                ids = ids[(ids >= lo) & (ids < hi)] - lo
                if ids.size and steps[r] < t.i[s, I_MIN_TOKENS]:
                    ban[r, torch.from_numpy(ids)] = True
            parts.append(~ban.to(dev))
        if token_bitmask is not None:
            words = mask_words(self._vocab)
            if not isinstance(token_bitmask, torch.Tensor) or token_bitmask.dtype != torch.int32 or \
                    token_bitmask.dim() != 2 or token_bitmask.shape[0] != b or token_bitmask.shape[1] < words:
                raise ValueError(f"token_bitmask must be an int32 tensor of shape ({b}, {words}) (the whole "
                                 f"vocabulary's bits), got {getattr(token_bitmask, 'dtype', None)} "
                                 f"{tuple(getattr(token_bitmask, 'shape', ()))}")
            parts.append(_shard_bits(token_bitmask, lo, hi, width, dev))
        allowed = None
        for m in parts:
            if m is not None:
                allowed = m if allowed is None else allowed & m
        bias = None
        if n_bias:
            rr = torch.cat([torch.full((self._book.n_bias[s],), r, dtype=torch.int64) for r, s in enumerate(rows)])
            ids = torch.cat([torch.from_numpy(self._book.bias[s][0].astype(np.int64)) for s in rows])
            vals = torch.cat([torch.from_numpy(self._book.bias[s][1]) for s in rows])
            bias = _local_entries(rr, ids, vals, lo, hi)
        shard = _Shard(rows=[self._rows[s] for s in rows],
                       seeds=torch.from_numpy(t.seeds[rows].copy()), steps=steps, seqs=t.seqs[rows].copy(),
                       mu=t.mu[rows].astype(np.float64), n_top=n_top, eos=self._eos, allowed=allowed,
                       prompt=local_bits(t.prompt.index_select(0, idx), width) if penal else None,
                       counts=t.counts.index_select(0, idx) if penal else None, bias=bias,
                       dry=t.dry_entries(idx, info))
        out = _sample_shard(ex, local_logits, shard, lo, self._vocab, self._layout)
        t.advance(rows, idx, out.tokens, out.valid, out.mirostat_mu.cpu().numpy())
        out.stopped = stopped_rows(out.tokens, [self._book.params[s] for s in rows], self._eos)
        return out
