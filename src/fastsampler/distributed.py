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
    bitmask_to_bool,
    check_ids,
    check_int,
    ids_to_bitmask,
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
    token_noise_block,
    top_values,
    uniform_word0,
)
from ._shard_slots import ShardTables, local_bits, local_mask
from ._slots import SlotBook
from .backends.reference.pipeline import F32_OVERFLOW, F32_TINY, LN2, _row_params, dry_penalties
from .layout import I_MIN_TOKENS, MAX_COLUMNS, MIROSTAT_M, STREAM_XTC, TILE, int_to_flags
from .output import SampleOutput, VerifyOutput
from .params import SamplingParams
from .sampler import Sampler as _SingleSampler
from .sampler import SlotState

__all__ = ["sample", "Sampler", "ExchangeStats", "ShardSlotState", "whole_state"]

GATHER_CAP = 64  # k-th largest values up to this k come from gathered top-k lists; beyond, the radix select
# Whether a step may read device data back to the host: None (default) reads back only on the CPU, where it costs
# nothing and lets a step skip exchanges no row needs; True forces the path that never reads back (every device but
# the CPU takes it), False the other. The tokens are the same either way.
SYNC_FREE: bool | None = None


def _f32_range(v: torch.Tensor) -> torch.Tensor:
    """Values that float32 rounds to ``±inf`` become ``±inf`` (docs/semantics.md §5, overflow)."""
    return torch.where(v <= -F32_OVERFLOW, -torch.inf, torch.where(v >= F32_OVERFLOW, torch.inf, v))


def _shard_bits(mask: torch.Tensor, lo: int, hi: int, width: int, dev: torch.device) -> torch.Tensor:
    """(B, width) bool: the bits of ids ``[lo, hi)`` of a (B, W) int32 bitmask, False beyond ``hi`` (padding)."""
    ids = torch.arange(lo, hi, dtype=torch.int64, device=dev)
    words = mask.to(dev)[:, ids >> 5]
    bits = ((words >> (ids & 31).to(torch.int32)) & 1).to(torch.bool)
    return torch.nn.functional.pad(bits, (0, width - (hi - lo)), value=False)


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
    seeds_d = batch.seeds.to(dev, torch.int64)
    if seeds is None and pb.seeds is None and any(e.seed is None for e in pb.rows):
        seeds_d = ex.broadcast(seeds_d)  # fresh random seeds: rank 0's
    f, i = _host(batch.fparams), _host(batch.iparams)  # (packed on the host)
    rows = [_row_params(f[r], i[r]) for r in range(b)]

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
    eos = batch.eos_ids.cpu().to(torch.int64)
    eos = eos[(eos >= lo) & (eos < hi)] - lo
    eos_cols = None
    if eos.numel() and any(p.ignore_eos or p.min_tokens > 0 for p in rows):
        eos_cols = torch.zeros(width, dtype=torch.bool)
        eos_cols[eos] = True
        eos_cols = eos_cols.to(dev)[None, :].expand(b, width)
    shard = _Shard(rows=rows, seeds=seeds_d, steps=batch.steps.to(dev, torch.int64),
                   seqs=batch.seqs.to(dev, torch.int64),
                   mu=batch.mirostat_mu.to(torch.float32).to(dev, torch.float64), n_top=int(batch.n_top),
                   eos=eos_cols, allowed=allowed, prompt=prompt, counts=counts, bias=bias, dry=dry)
    out = _sample_shard(ex, local_logits, shard, lo, int(vocab_size), layout)
    out.stopped = stopped_rows(out.tokens, params, eos_token_ids)
    return out


@dataclass
class _Shard:
    """What one step needs besides the logits, for this rank's columns: the rows' parameters (`_row_params`, on the
    host: every host-side decision of the pipeline reads only these) and the small per-row state on the logits'
    device (replicated on every rank), and the vocabulary-sized inputs sliced to the shard.

    allowed, prompt : (B, V_local) bool or None (allowed ids after every ban; ids in the prompt)
    counts : (B, V_local) integer tensor or None (generated-token counts of the shard's ids)
    bias, dry : (row, local column, value) int64 / int64 / float64 tensors of the shard's logit-bias entries and DRY
        penalties, or None; an entry whose column is ``V_local`` (or beyond) is not the shard's and is dropped
    eos, stop : (B, V_local) bool or None: the shard's EOS ids, banned where the row's step is below its
        ``min_tokens`` or it ignores EOS, and a request's stop ids, banned where its step is below ``min_tokens``
        (decided on the device from ``steps``)
    """

    rows: list[Any]
    seeds: torch.Tensor  # (B,) int64
    steps: torch.Tensor  # (B,) int64
    seqs: torch.Tensor  # (B,) int64
    mu: torch.Tensor  # (B,) float64 (float32 values)
    n_top: int
    eos: torch.Tensor | None = None
    stop: torch.Tensor | None = None
    allowed: torch.Tensor | None = None
    prompt: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    dry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class _Params:
    """The rows' parameters as host arrays (``.h``) and, on first use, as float64 tensors on the device (``.d``)."""

    def __init__(self, rows: list[Any], dev: torch.device) -> None:
        self.rows, self.dev, self._d = rows, dev, {}

    def h(self, name: str) -> np.ndarray:
        return np.array([float(getattr(p, name)) for p in self.rows], dtype=np.float64)

    def d(self, name: str) -> torch.Tensor:
        if name not in self._d:
            self._d[name] = torch.from_numpy(self.h(name)).to(self.dev)
        return self._d[name]

    def up(self, a: Any) -> torch.Tensor:
        """A host array on the device (float64, or bool for a bool array)."""
        a = np.asarray(a)
        return torch.from_numpy(a if a.dtype == bool else a.astype(np.float64)).to(self.dev)


def _local_entries(rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, lo: int, hi: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The entries ``(row, id, value)`` whose id falls in ``[lo, hi)``, with local columns (None when none); host
    tensors."""
    sel = (ids >= lo) & (ids < hi)
    if not bool(sel.any()):
        return None
    return rows[sel].to(torch.int64), ids[sel].to(torch.int64) - lo, vals[sel].to(torch.float64)


def _entries_dense(ent: tuple[torch.Tensor, torch.Tensor, torch.Tensor], b: int, width: int, dev: torch.device
                   ) -> torch.Tensor:
    """(B, V_local) float64: the entries' values summed into their cells (0 elsewhere); columns ``>= V_local``
    dropped (into a spare column)."""
    rr, cc, vv = ent
    out = torch.zeros(b, width + 1, dtype=torch.float64, device=dev)
    out.index_put_((rr.to(dev), cc.to(dev).clamp(max=width)), vv.to(dev, torch.float64), accumulate=True)
    return out[:, :width]


def _sample_shard(ex: Exchange, local_logits: torch.Tensor, shard: _Shard, lo: int, vocab_size: int,
                  layout: list[list[int]], probs_only: bool = False, forced: torch.Tensor | None = None) -> Any:
    """The pipeline of docs/semantics.md on this rank's columns ``[lo, lo + V_local)`` of every row, with the
    exchanges of docs/distributed.md: `sample` and `Sampler.sample` both end here (``stopped`` is left to them).
    ``probs_only``: the shard's columns of the distribution the draw would use, ``(B, V_local)`` float32, instead
    (`Sampler.sampling_probs`). ``forced`` ((B,) int64 global ids, on the device): each valid row's token is that
    one instead of a draw (`Sampler.verify`'s recovered tokens); its logprobs and Mirostat update are computed as for
    a drawn token.

    Nothing here reads device data back to the host when ``ex.sync_free``: which exchanges run is decided from the
    rows' parameters (the same on every rank), and every per-row decision that depends on the logits (validity,
    thresholds, Mirostat's k and mu, the dynamic temperature, XTC's coin) is a device tensor."""
    dev = local_logits.device
    b, width = local_logits.shape
    ex.sync_free = dev.type != "cpu" if SYNC_FREE is None else bool(SYNC_FREE)
    rows = shard.rows
    P = _Params(rows, dev)
    seeds_d, steps_d, seqs_d = shard.seeds, shard.steps, shard.seqs
    gid = torch.arange(lo, lo + width, dtype=torch.int64, device=dev)
    real = (gid < vocab_size)[None, :].expand(b, width)
    x = local_logits.detach().to(torch.float64)

    # ------------------------------------------------------------------------------------- stages A to C
    l = torch.where(real, x, -torch.inf)
    if shard.bias is not None:
        l = l + _entries_dense(shard.bias, b, width, dev)
    if shard.allowed is not None:
        l = torch.where(shard.allowed.to(dev), l, -torch.inf)
    if shard.eos is not None:
        ban = (P.d("ignore_eos") > 0) | (steps_d < P.d("min_tokens"))
        l = torch.where(ban[:, None] & shard.eos.to(dev), -torch.inf, l)
    if shard.stop is not None:
        l = torch.where((steps_d < P.d("min_tokens"))[:, None] & shard.stop.to(dev), -torch.inf, l)
    counts = None if shard.counts is None else shard.counts.to(dev, torch.int64)
    if counts is not None:
        counts = counts.clamp(min=0)  # a negative count counts as 0 (§3 C)
        seen = counts > 0
    else:
        seen = torch.zeros(b, width, dtype=torch.bool, device=dev)
    if shard.prompt is not None:
        seen = seen | shard.prompt.to(dev)
    if (P.h("repetition_penalty") != 1.0).any():
        rep = P.d("repetition_penalty")[:, None]
        l = torch.where(seen, torch.where(l > 0, l / rep, l * rep), l)
    freq_h, pres_h = P.h("frequency_penalty"), P.h("presence_penalty")
    if counts is not None and ((freq_h != 0.0) | (pres_h != 0.0)).any():
        l = l - (counts.to(torch.float64) * P.d("frequency_penalty")[:, None]
                 + (counts > 0).to(torch.float64) * P.d("presence_penalty")[:, None])
    if shard.dry is not None:  # DRY, after the frequency and presence penalties (-inf stays -inf)
        l = l - _entries_dense(shard.dry, b, width, dev)
    l = _f32_range(l)

    # ------------------------------------------------------------------ whole-row statistics, temperature (D)
    temps_h = P.h("temperature")
    greedy = temps_h == 0.0
    dyn = (P.h("dynatemp_range") > 0.0) & ~greedy
    nsig = (P.h("top_n_sigma") > 0.0) & ~greedy
    greedy_d = P.up(greedy)
    fin_l = torch.isfinite(l)
    bad = lambda v: ((torch.isnan(v) | (v == torch.inf)) & real).any(1).to(torch.float64)
    lmax = torch.where(fin_l, l, -torch.inf)
    arg_v, arg_j = lmax.max(1)  # (the first maximum: the lowest id)
    x_at = x.gather(1, arg_j[:, None])[:, 0]
    fin_x = torch.isfinite(x) & real
    part1 = [torch.stack((bad(x), bad(l), (gid[arg_j]).to(torch.float64), x_at, arg_v), 1), row_stats(l, fin_l),
             row_stats(x, fin_x)]
    temps_d = P.up(np.where(greedy, 1.0, temps_h))
    z = torch.where(greedy_d[:, None], l, _f32_range(l / temps_d[:, None]))
    fz = torch.isfinite(z)
    part2 = [bad(z)[:, None], row_stats(z, fz)]
    if nsig.any():
        part2.append(moments(z, fz))
    g1 = ex.gather(torch.cat([*part1, *part2], 1))  # one exchange for l, x and z
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
    z = torch.where(valid[:, None], z, -torch.inf)
    samp = valid & ~greedy_d  # (device) the rows that draw
    keep = torch.isfinite(z) & samp[:, None]

    # ------------------------------------------------------------------------------------ truncation (E)
    keep = _truncate(ex, z, keep, P, ~greedy, samp, shard, int(vocab_size), n_z, m_z, lns_z, std_z)
    # the dynamic temperature of the kept set (§3 E): the entropy of softmax(l) over it, then z' = l / T' there
    zd = z
    if dyn.any():
        dd = P.up(dyn) & samp
        n_s, _, _, h_s = merge_stats(ex.gather(row_stats(l, keep)))
        t_min = P.up(np.maximum(0.0, temps_h - P.h("dynatemp_range")))
        t_max = P.up(temps_h + P.h("dynatemp_range"))
        frac = torch.clamp(h_s, min=0.0) / torch.log(torch.clamp(n_s, min=2.0))
        t_dyn = torch.clamp(t_min + (t_max - t_min) * frac ** P.d("dynatemp_exponent"), min=F32_TINY)
        t_row = torch.where(dd & (n_s > 1), t_dyn, temps_d)
        zd = torch.where(dd[:, None] & keep, _f32_range(l / t_row[:, None]), z)
        cnt = ex.sum(torch.stack((((zd == torch.inf) & keep).sum(1), (keep & (zd > -torch.inf)).sum(1)), 1)
                     .to(torch.float64))
        keep = keep & ~(dd[:, None] & (zd == -torch.inf))  # (a kept token whose z' underflows leaves the set)
        lost = dd & ((cnt[:, 0] > 0) | (cnt[:, 1] == 0))  # z' overflows (or nothing is left): invalid (§5)
        valid, samp = valid & ~lost, samp & ~lost
        keep = keep & ~lost[:, None]

    # --------------------------------------------------------------------------------------- the draw (F)
    gk = merge_stats(ex.gather(row_stats(zd, keep)))
    _, m_k, lns_k, _ = gk
    mk_safe = torch.where(torch.isfinite(m_k), m_k, 0.0)
    gr = greedy_d & valid
    if probs_only:  # zero outside the kept set, one-hot for greedy rows, zero for invalid rows
        probs = torch.where(keep, torch.exp((zd - mk_safe[:, None]) - lns_k[:, None]), 0.0)
        probs = torch.where(gr[:, None], (gid[None, :] == g_tok.to(torch.int64)[:, None]).to(torch.float64), probs)
        return probs.to(torch.float32)
    tokens = torch.where(gr, g_tok.to(torch.int64), -1)
    z_tok = torch.where(gr, pick(4), 0.0)
    x_tok = torch.where(gr, g_x, 0.0)
    zd_tok = z_tok
    if forced is not None:  # the owner rank's values of the forced token (z', x, z)
        loc = forced.to(dev) - lo
        mine = (loc >= 0) & (loc < width)
        c = torch.where(mine, loc, 0)[:, None]
        g = ex.gather(torch.stack((zd.gather(1, c)[:, 0], x.gather(1, c)[:, 0], z.gather(1, c)[:, 0],
                                   mine.to(torch.float64)), 1))
        own = g[:, :, 3].argmax(0)[None]
        fv = lambda col: g[:, :, col].gather(0, own)[0]
        tokens = torch.where(valid, forced.to(dev), -1)
        zd_tok, x_tok, z_tok = fv(0), fv(1), fv(2)
    elif (~greedy).any():
        st, zdt, xt, zt = _draw(ex, zd, x, z, keep, mk_safe, gid, lo, layout, seeds_d, steps_d, seqs_d)
        tokens, z_tok, x_tok = torch.where(samp, st, tokens), torch.where(samp, zt, z_tok), torch.where(samp, xt, x_tok)
        zd_tok = torch.where(samp, zdt, z_tok)

    # ---------------------------------------------------------------------------------------- Mirostat mu
    mu = shard.mu.to(dev, torch.float64)
    miro = P.h("mirostat_mode") > 0
    if miro.any():
        surprise = -((zd_tok - mk_safe) - lns_k) / LN2
        upd = mu - P.d("mirostat_lr") * (surprise - P.d("mirostat_target"))
        mu = torch.where(samp & P.up(miro), upd, mu)

    # ------------------------------------------------------------------------------------------- logprobs
    n_top = shard.n_top
    lp_out = torch.full((b,), math.nan, dtype=torch.float64, device=dev)
    ranks = torch.full((b,), -1, dtype=torch.int64, device=dev)
    top_ids = torch.full((b, n_top), -1, dtype=torch.int64, device=dev)
    top_lps = torch.full((b, n_top), math.nan, dtype=torch.float64, device=dev)
    want_h = np.array([bool(p.logprobs) for p in rows])
    if want_h.any():
        lp_out, ranks, top_ids, top_lps = _logprobs(ex, rows, valid & P.up(want_h), greedy_d, x, z, zd, keep, real,
                                                    gid, tokens, x_tok, z_tok, zd_tok, (m_x, lns_x), (m_z, lns_z),
                                                    (mk_safe, lns_k), n_top, int(vocab_size))
    return SampleOutput(tokens=tokens, valid=valid, logprobs=lp_out.to(torch.float32), top_logprob_ids=top_ids,
                        top_logprobs=top_lps.to(torch.float32), ranks=ranks, mirostat_mu=mu.to(torch.float32))


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


def _truncate(ex: Exchange, z: torch.Tensor, keep: torch.Tensor, P: _Params, cand: np.ndarray, samp: torch.Tensor,
              shard: _Shard, vocab: int, n_z: torch.Tensor, m_z: torch.Tensor, lns_z: torch.Tensor,
              std_z: torch.Tensor | None) -> torch.Tensor:
    """Stage E on the shard (docs/semantics.md §3 E): every threshold decided from exchanged statistics, exactly as
    the reference decides it. ``cand`` (host) are the rows that may draw (by their parameters), ``samp`` (device)
    those that do. Rows that do not use a rule are not changed by it; a rule's exchanges run only when some row's
    parameters use it (every rank knows the params, so every rank runs the same exchanges), and off
    ``ex.sync_free`` also only when some row's data needs them."""
    b, dev = z.shape[0], z.device
    mode = P.h("mirostat_mode").astype(np.int64)
    mk_h = P.h("min_keep").astype(np.int64)
    mk = P.d("min_keep")
    mz_safe = torch.where(torch.isfinite(m_z), m_z, 0.0)
    on = lambda m: P.up(m)[:, None] & samp[:, None]  # (B, 1): the rule's rows (host) that draw (device)

    def survivors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n, m, lns, h = merge_stats(ex.gather(row_stats(z, keep)))
        return n, torch.where(torch.isfinite(m), m, 0.0), lns, h

    def lowered(rule: np.ndarray, thr: torch.Tensor) -> torch.Tensor:
        """``thr`` lowered to the ``min_keep``-th largest survivor where fewer survivors reach it."""
        cnt = ex.sum(torch.stack(((keep & (z >= thr[:, None])).sum(1), keep.sum(1)), 1).to(torch.float64))
        need = torch.where(P.up(rule) & (cnt[:, 0] < mk), torch.minimum(mk, cnt[:, 1]), 0.0).to(torch.int64)
        kmax = int(mk_h[rule].max()) if rule.any() else 0
        if kmax > 0 and ex.may(need > 0):
            kth = ex.kth_largest(z, keep, need, kmax, GATHER_CAP)
            thr = torch.where(need > 0, torch.minimum(thr, kth), thr)
        return thr

    # Mirostat v2: keep ln q >= -mu ln 2, or the tokens tied at the maximum when none qualifies
    v2 = cand & (mode == 2)
    if v2.any():
        lq = (z - mz_safe[:, None]) - lns_z[:, None]
        k2 = keep & (lq >= (-shard.mu.to(dev, torch.float64) * LN2)[:, None])
        none = ex.sum(k2.sum(1, keepdim=True).to(torch.float64))[:, 0] == 0
        k2 = torch.where(none[:, None], keep & (z == mz_safe[:, None]), k2)
        keep = torch.where(on(v2), k2, keep)
    # Mirostat v1: k from the 100 most probable tokens (every rank's top 100, merged), then the top k with ties
    v1 = cand & (mode == 1)
    if v1.any():
        top = ex.gather(top_values(z, keep, MIROSTAT_M))
        top = torch.sort(top.permute(1, 0, 2).reshape(b, -1), dim=1, descending=True).values[:, :MIROSTAT_M]
        kk = _mirostat_v1_k(top, n_z, mz_safe, lns_z, shard.mu.to(dev, torch.float64), vocab)
        kk = torch.where(P.up(v1) & samp, kk, 0)
        near = top.gather(1, (kk.clamp(min=1, max=MIROSTAT_M) - 1)[:, None])[:, 0]
        thr = torch.where(kk <= MIROSTAT_M, near, -torch.inf)
        far = torch.where(kk > MIROSTAT_M, kk, 0)
        if ex.may(far > 0):
            thr = torch.where(far > 0, ex.kth_largest(z, keep, far, vocab, 0), thr)
        keep = torch.where((kk > 0)[:, None], keep & (z >= thr[:, None]), keep)
    rules = cand & (mode == 0)
    # 1. top-k: the k'-th largest survivor, k' = max(k, min_keep)
    kp_h = np.where(rules & (P.h("top_k") > 0), np.maximum(P.h("top_k"), mk_h), 0).astype(np.int64)
    if kp_h.any():
        kp = torch.from_numpy(kp_h).to(dev)
        kp = torch.where(kp < n_z, kp, 0)
        thr = ex.kth_largest(z, keep, kp, int(kp_h.max()), GATHER_CAP)
        keep = torch.where(on(kp_h > 0) & (kp > 0)[:, None], keep & (z >= thr[:, None]), keep)
    # 2. top-p: the largest value whose mass at or above reaches p (and keeps min_keep), q over the survivors
    tp = rules & (P.h("top_p") < 1.0)
    if tp.any():
        _, m_s, lns_s, _ = survivors()
        w = torch.exp((z - m_s[:, None]) - lns_s[:, None])
        v = ex.select(z, w, keep & on(tp), P.up(np.where(tp, mk_h, 0)), P.up(np.where(tp, P.h("top_p"), -math.inf)))
        keep = torch.where(on(tp), keep & (z >= v[:, None]), keep)
    # 3. min-p, epsilon, top-n-sigma: thresholds of the whole distribution, lowered to keep min_keep
    min_p, eps, ns = P.h("min_p"), P.h("epsilon_cutoff"), P.h("top_n_sigma")
    mp = rules & ((min_p > 0) | (eps > 0) | (ns > 0))
    if mp.any():
        ln_minp, ln_eps = _hlog(min_p), _hlog(eps)
        t = torch.where(P.up(min_p > 0), mz_safe + P.up(ln_minp), -torch.inf)
        t = torch.where(P.up(eps > 0), torch.maximum(t, mz_safe + P.up(np.where(eps > 0, ln_eps, 0.0)) + lns_z), t)
        if std_z is not None:
            t = torch.where(P.up(ns > 0), torch.maximum(t, mz_safe - P.up(ns) * std_z), t)
        thr = lowered(mp, torch.minimum(t, mz_safe))
        keep = torch.where(on(mp), keep & (z >= thr[:, None]), keep)
    # 4. typical-p: scores |-ln q - H| over the survivors, the smallest first until the mass reaches tau
    ty = rules & (P.h("typical_p") < 1.0)
    if ty.any():
        _, m_s, lns_s, h_s = survivors()
        lq = (z - m_s[:, None]) - lns_s[:, None]
        neg_s = -torch.abs(-lq - h_s[:, None])
        v = ex.select(neg_s, torch.exp(lq), keep & on(ty), P.up(np.where(ty, mk_h, 0)),
                      P.up(np.where(ty, P.h("typical_p"), -math.inf)))
        keep = torch.where(on(ty), keep & (neg_s >= v[:, None]), keep)
    # 5. eta: q >= min(eta, sqrt(eta) e^-H), q and H over the survivors, lowered to keep min_keep
    eta = P.h("eta_cutoff")
    et = rules & (eta > 0.0)
    if et.any():
        _, m_s, lns_s, h_s = survivors()
        ln_eta = _hlog(np.where(et, eta, 1.0))
        thr = torch.minimum(m_s, m_s + lns_s + torch.minimum(P.up(ln_eta), P.up(0.5 * ln_eta) - h_s))
        thr = lowered(et, torch.where(P.up(et), thr, -torch.inf))
        keep = torch.where(on(et), keep & (z >= thr[:, None]), keep)
    # 6. XTC: its coin (Philox stream 3), then the survivors above the least likely top choice removed
    xp = rules & (P.h("xtc_probability") > 0.0)
    if xp.any():
        coin = uniform_word0(shard.seeds.to(dev), shard.steps.to(dev), shard.seqs.to(dev), STREAM_XTC)
        xp_d = P.up(xp) & samp & (coin < P.d("xtc_probability"))
        _, m_s, lns_s, _ = survivors()
        theta = P.h("xtc_threshold")
        ln_theta = _hlog(theta)
        cut = torch.where(xp_d, m_s + lns_s + P.up(ln_theta), torch.inf)
        top = keep & (z >= cut[:, None])
        g = ex.gather(torch.stack((top.sum(1).to(torch.float64), torch.where(top, -z, -torch.inf).max(1).values), 1))
        n_top, a = g[:, :, 0].sum(0), -g[:, :, 1].max(0).values
        act = xp_d & (n_top >= 2)
        rest = keep & (z <= torch.where(act, a, torch.inf)[:, None])
        n_rest = ex.sum(rest.sum(1, keepdim=True).to(torch.float64))[:, 0]
        act = act & (n_rest >= mk)
        keep = torch.where(act[:, None], rest, keep)
    return keep


def _hlog(a: np.ndarray) -> np.ndarray:
    """``math.log`` of each parameter (``-inf`` at 0): the host logs the reference takes."""
    return np.array([math.log(v) if v > 0.0 else -math.inf for v in np.asarray(a, dtype=np.float64)])


def _mirostat_v1_k(top: torch.Tensor, n: torch.Tensor, m: torch.Tensor, lns: torch.Tensor, mu: torch.Tensor,
                   vocab: int) -> torch.Tensor:
    """(B,) int64 Mirostat v1's k of each row (0: the row keeps every candidate) from its ``MIROSTAT_M`` largest
    ``z`` (descending), its count of candidates and its (max, ln Σ): `reference.mirostat_v1_k`, then the floor and
    clamp of docs/semantics.md §3 E, on the device."""
    mm = torch.clamp(n, max=float(MIROSTAT_M))
    lq = (top - m[:, None]) - lns[:, None]
    i = torch.arange(MIROSTAT_M - 1, dtype=torch.float64, device=top.device)
    t = torch.log((i + 2.0) / (i + 1.0))
    pair = (i[None, :] + 1.0) < mm[:, None]  # pairs (i, i + 1) among the m largest
    bb = torch.where(pair, lq[:, :-1] - lq[:, 1:], 0.0)
    s = (t * bb).sum(1) / torch.where(pair, t * t, 0.0).sum(1).clamp(min=1e-300)
    eps = s - 1.0
    two_mu = torch.pow(2.0, mu)
    v = float(vocab)
    base = torch.where(eps.abs() < 1e-6, two_mu / math.log(v), (eps * two_mu) / (1.0 - torch.pow(v, -eps)))
    k = torch.where(s != 0, torch.pow(base, 1.0 / torch.where(s != 0, s, 1.0)),
                    torch.where(base > 1, torch.inf, torch.where(base == 1, 1.0, 0.0)))
    k = torch.where((mm < 2) | torch.isnan(k), v, k)
    kk = torch.where(torch.isfinite(k), torch.clamp(torch.floor(torch.nan_to_num(k, posinf=v)), 1.0, v), v)
    return torch.where(kk < n, kk, 0.0).to(torch.int64)


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
    noise = token_noise_block(seeds, steps, seqs, first + lo, TILE)  # (the ids first + lo + i, unclamped)
    ts = torch.where(cand, zc - torch.log(noise), -torch.inf)
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


def _logprobs(ex: Exchange, rows: list[Any], want: torch.Tensor, greedy: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
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
    used = [m for m in ("final", "processed", "raw") if (modes == m).any()]
    safe = lambda m: torch.where(torch.isfinite(m), m, 0.0)
    gr = greedy[:, None]
    lp = lp_tok = None
    for m in used:  # only the modes some row asks for are computed over the shard
        if m == "raw":
            full, tok = _f32_range((x - safe(raw[0])[:, None]) - raw[1][:, None]), _f32_range((x_tok - safe(raw[0]))
                                                                                              - raw[1])
        elif m == "processed":
            full, tok = _f32_range((z - safe(proc[0])[:, None]) - proc[1][:, None]), _f32_range((z_tok - safe(
                proc[0])) - proc[1])
        else:
            full = torch.where(keep, _f32_range((zd - fin[0][:, None]) - fin[1][:, None]), -torch.inf)
            full = torch.where(gr, torch.where(gid[None, :] == tokens[:, None], 0.0, -torch.inf), full)
            tok = torch.where(gr[:, 0], 0.0, _f32_range((zd_tok - fin[0]) - fin[1]))
        if lp is None:
            lp, lp_tok = full, tok
        else:
            rm = torch.from_numpy(modes == m).to(dev)
            lp, lp_tok = torch.where(rm[:, None], full, lp), torch.where(rm, tok, lp_tok)
    assert lp is not None and lp_tok is not None
    wd = want
    lp = torch.where(real & wd[:, None] & ~torch.isnan(lp), lp, -torch.inf)
    greater = ((lp > lp_tok[:, None]) & real).sum(1).to(torch.float64)
    parts = [greater[:, None]]
    if n_top:
        vals, ids = _top_n(lp, gid, n_top, vocab)
        parts += [vals, ids.to(torch.float64)]
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


def _accept_or_recover(ex: Exchange, p: torch.Tensor, draft: torch.Tensor, q: torch.Tensor | None,
                       uniforms: tuple[torch.Tensor, torch.Tensor], lo: int, vocab: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fastsampler._speculative.accept_or_recover` on this rank's slice ``p`` / ``q`` ``(B, V_local)`` (zero in the
    padding): ``p[d]`` and ``q[d]`` from the rank holding the draft ``d``, the residual masses ``max(0, p - q)``
    (``p`` where that is all zero) added in rank order, and the recovered token found on the rank whose share of
    the cumulative mass holds ``v`` times the total, by inversion of its float64 cumulative sum. Two gathers of
    ``(B, 4)`` and ``(B,)`` per rank. Returns (token, accepted), the same on every rank."""
    b, width = p.shape
    dev = p.device
    loc = draft - lo
    mine = (loc >= 0) & (loc < width)
    c = torch.where(mine, loc, 0)[:, None]
    p_d = torch.where(mine, p.gather(1, c)[:, 0].to(torch.float64), 0.0)
    qv = None if q is None else q.to(p.dtype)
    q_d = torch.ones_like(p_d) if qv is None else torch.where(mine, qv.gather(1, c)[:, 0].to(torch.float64), 0.0)
    if qv is None:
        resid = torch.where(mine[:, None] & (torch.arange(width, device=dev)[None, :] == c), 0.0, p)
    else:
        resid = (p - qv).clamp(min=0.0)
    cum_r = torch.cumsum(resid, 1, dtype=torch.float64)
    cum_p = torch.cumsum(p, 1, dtype=torch.float64)
    last = lambda cum: cum[:, -1] if width else torch.zeros(b, dtype=torch.float64, device=dev)
    g = ex.gather(torch.stack((p_d, q_d if qv is not None else torch.zeros_like(p_d), last(cum_r), last(cum_p)), 1))
    u, v = uniforms
    pd_all = g[:, :, 0].sum(0)  # (one rank holds d: the others add zeros)
    qd_all = torch.ones_like(pd_all) if qv is None else g[:, :, 1].sum(0)
    accepted = u * qd_all < pd_all
    tot_r = g[:, :, 2]
    acc_r = torch.zeros(b, dtype=torch.float64, device=dev)
    for r in range(tot_r.shape[0]):
        acc_r = acc_r + tot_r[r]
    empty = ~(acc_r > 0)  # nothing left of p beyond q: draw from p itself
    tots = torch.where(empty[None, :], g[:, :, 3], tot_r)  # (world, B)
    prefix = torch.zeros_like(tots)
    run = torch.zeros(b, dtype=torch.float64, device=dev)
    for r in range(tots.shape[0]):  # rank order
        prefix[r] = run
        run = run + tots[r]
    target = v * run
    has = tots > 0
    holds = has & (prefix + tots > target[None, :])
    # the first rank whose share holds the target; by rounding none may: the last rank with mass
    n_world = tots.shape[0]
    ranks_ix = torch.arange(n_world, device=dev)[:, None].expand_as(tots)
    first = torch.where(holds, ranks_ix, n_world).min(0).values
    last_has = torch.where(has, ranks_ix, -1).max(0).values
    owner = torch.where(first < n_world, first, last_has)
    cum = torch.where(empty[:, None], cum_p, cum_r)
    me = ex.rank
    t_loc = (target - prefix[me]).clamp(min=0.0)
    hi = max(min(lo + width, vocab), lo)
    if width:
        j = torch.searchsorted(cum.contiguous(), t_loc[:, None].contiguous(), right=True)[:, 0]
        j = j.clamp(max=max(hi - lo - 1, 0))
        cand = torch.where(owner == me, (j + lo).to(torch.float64), 0.0)
    else:
        cand = torch.zeros(b, dtype=torch.float64, device=dev)
    rec = ex.gather(cand[:, None])[:, :, 0].gather(0, owner.clamp(min=0)[None])[0].to(torch.int64)
    rec = torch.where(run > 0, rec, -1)
    return torch.where(accepted, draft, rec), accepted


def _top_n(lp: torch.Tensor, gid: torch.Tensor, n: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, n) float64 and int64: each row's ``n`` largest ``lp`` with their ids, ordered by (lp descending, id
    ascending), padded with ``(-inf, vocab)``: a stable descending sort's first ``n``, without sorting the shard.

    The ``n``-th largest value ``t`` (`torch.topk`) bounds the set: every entry above ``t``, then the entries equal to
    ``t`` in id order until ``n`` are taken; the ``n`` taken are put in id order by a second `torch.topk` on a
    position key and then stably sorted by value."""
    b, width = lp.shape
    k = min(n, width)
    if k == 0:
        return (torch.full((b, n), -torch.inf, dtype=torch.float64, device=lp.device),
                torch.full((b, n), vocab, dtype=torch.int64, device=lp.device))
    t = torch.topk(lp, k, dim=1).values[:, k - 1:k]
    above = lp > t
    tied = lp == t
    take = above | (tied & (torch.cumsum(tied, 1) <= (k - above.sum(1, keepdim=True))))
    pos = torch.arange(width, 0, -1, device=lp.device)  # (larger for lower columns)
    cols = torch.topk(torch.where(take, pos, 0), k, dim=1).indices  # the k taken, in column order
    vals = lp.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, ids = vals.gather(1, order), gid[cols.gather(1, order)]
    if k < n:
        vals = torch.nn.functional.pad(vals, (0, n - k), value=-torch.inf)
        ids = torch.nn.functional.pad(ids, (0, n - k), value=vocab)
    return vals, ids


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
        lo, width = self._lo, self._width
        mine = [e - lo for e in self._eos_host if lo <= e < lo + width]
        self._eos_cols = None  # (V_local,) bool: the EOS ids among the slice's columns
        if mine:
            self._eos_cols = torch.zeros(width, dtype=torch.bool)
            self._eos_cols[mine] = True
            self._eos_cols = self._eos_cols.to(self._device)
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
        ex, idx, rows, shard = self._step(local_logits, slots, token_bitmask, stats)
        out = _sample_shard(ex, local_logits, shard, self._lo, self._vocab, self._layout)
        self._tables.advance(idx, out.tokens, out.valid, out.mirostat_mu)
        out.stopped = stopped_rows(out.tokens, [self._book.params[s] for s in rows], self._eos)
        return out

    def sampling_probs(self, local_logits: torch.Tensor, slots: Sequence[int], *,
                       token_bitmask: torch.Tensor | None = None, stats: ExchangeStats | None = None) -> torch.Tensor:
        """This rank's columns of the distribution `sample` would draw row ``r``'s token from, for slot
        ``slots[r]``, ``(batch_size, local_size)`` float32 (column ``j``: id ``vocab_start + j``); nothing advances.
        Zero outside the kept set and in padding columns, one-hot for greedy rows, all zero for invalid rows, as
        `fastsampler.Sampler.sampling_probs`; the ranks' slices, in rank order, are the whole distribution. Every
        rank calls it with the same slots (it exchanges what a step exchanges up to the draw).

        >>> import tempfile, torch, torch.distributed as dist
        >>> from fastsampler import SamplingParams, distributed
        >>> dist.init_process_group("gloo", store=dist.FileStore(tempfile.mktemp(), 1), rank=0, world_size=1)
        >>> s = distributed.Sampler(vocab_size=3, max_slots=1, vocab_start=0, local_size=3)
        >>> slot = s.add(SamplingParams(top_k=2, seed=0))
        >>> [round(p, 3) for p in s.sampling_probs(torch.tensor([[0.0, 0.0, -1.0]]), slot)[0].tolist()]
        [0.5, 0.5, 0.0]
        >>> dist.destroy_process_group()
        """
        ex, _, _, shard = self._step(local_logits, slots, token_bitmask, stats)
        return _sample_shard(ex, local_logits, shard, self._lo, self._vocab, self._layout, probs_only=True)

    def verify(self, local_logits: torch.Tensor, draft_tokens: Any, slots: Sequence[int], *,
               draft_probs: torch.Tensor | None = None, method: str | None = None,
               stats: ExchangeStats | None = None) -> VerifyOutput:
        """Verify ``K`` draft tokens per slot against the target's logits sharded by vocabulary, and advance each slot
        by the tokens it emits: `fastsampler.Sampler.verify` (docs/semantics.md §11) on this rank's slice, with the
        same result on every rank.

        Parameters
        ----------
        local_logits : (batch_size, K + 1, local_size) torch.Tensor
            This rank's logits at each position, on the sampler's device.
        draft_tokens : (batch_size, K) ints
            Global ids, the same on every rank.
        slots : sequence of batch_size ints
            Distinct slots in use.
        draft_probs : (batch_size, K, local_size) float tensor, optional
            This rank's slice of the draft model's distribution at each position (column ``j``: id
            ``vocab_start + j``; non-negative, rows need not be normalised).
        method : {'match', 'rejection'}, optional
            As in `fastsampler.Sampler.verify` (default: 'match' without ``draft_probs``, else 'rejection').
        stats : ExchangeStats, optional
            Accumulates this rank's collectives and bytes.

        Returns
        -------
        VerifyOutput
            As `fastsampler.Sampler.verify`, identical on every rank.

        ``rejection`` accepts the draft ``d`` when ``u q[d] < p[d]`` (``p[d]``, ``q[d]`` from the rank holding
        ``d``), else draws the token from ``max(0, p - q)`` by inversion with the ranks' residual masses added in
        rank order, so a recovered token can differ from the single-device one only at a near-tie of that
        inversion. Each position is one step's exchanges (two with ``rejection``: the distribution, then the
        token's logprobs) plus two small gathers for the acceptance.
        """
        from ._speculative import VerifyRecord, verify_method, verify_uniforms
        from .sampler import _draft_tensor

        if not isinstance(local_logits, torch.Tensor) or local_logits.dim() != 3:
            raise ValueError(f"local_logits must be a 3-D torch tensor (batch_size, K + 1, local_size), got "
                             f"{getattr(local_logits, 'shape', type(local_logits).__name__)}")
        method = verify_method(method, draft_probs)
        b, k1 = local_logits.shape[0], local_logits.shape[1]
        k = k1 - 1
        if k < 0:
            raise ValueError("local_logits must have K + 1 >= 1 positions per row")
        dev, t = self._device, self._tables
        # (host drafts are checked on the host; a device tensor is read back once for the check)
        on = dev if isinstance(draft_tokens, torch.Tensor) else torch.device("cpu")
        drafts = _draft_tensor(draft_tokens, b, k, self._vocab, on).to(dev)
        q_all = None
        if draft_probs is not None:
            if draft_probs.dim() != 3 or tuple(draft_probs.shape) != (b, k, self._width):
                raise ValueError(f"draft_probs must be this rank's slice, shape ({b}, {k}, {self._width}), got "
                                 f"{tuple(draft_probs.shape)}")
            q_all = draft_probs.to(dev)
            if dev.type == "cpu" and q_all.numel() and not bool(q_all.min() >= 0):  # (NaN too)
                raise ValueError("draft_probs must be non-negative probabilities")
        rows = [self._check_slot(s) for s in (slots.tolist() if isinstance(slots, torch.Tensor) else slots)]
        if len(set(rows)) != b:
            raise ValueError(f"slots must be {b} distinct slots in use (one per row), got {rows}")
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        rec = VerifyRecord(b, k1, self._book.aggregate(rows)[1], dev)
        ends_table = self._end_ids(rows)
        if method == "rejection" and b and k:  # every position's uniforms at once (a row at position j is at step + j)
            pos = torch.arange(k, dtype=torch.int64, device=dev)[None, :]
            u_all, v_all = verify_uniforms(t.seeds_d.index_select(0, idx)[:, None],
                                           t.steps.index_select(0, idx)[:, None] + pos,
                                           t.seqs_d.index_select(0, idx)[:, None])
        for j in range(k1 if b else 0):
            x = local_logits[:, j]
            ex, _, _, shard = self._step(x, rows, None, stats)
            if j < k and method == "rejection":
                p = _sample_shard(ex, x, shard, self._lo, self._vocab, self._layout, probs_only=True)
                q = None if q_all is None else q_all[:, j]
                tok, acc = _accept_or_recover(ex, p, drafts[:, j], q, (u_all[:, j], v_all[:, j]), self._lo,
                                              self._vocab)
                # (a row without mass is invalid: its forced token is never used)
                out = _sample_shard(ex, x, shard, self._lo, self._vocab, self._layout, forced=tok.clamp(min=0))
            else:
                out = _sample_shard(ex, x, shard, self._lo, self._vocab, self._layout)
                acc = out.tokens == drafts[:, j] if j < k else torch.zeros_like(rec.active)
            emit = rec.emit(j, out, acc, (out.tokens[:, None] == ends_table).any(1))
            t.advance(idx, out.tokens, emit, torch.where(emit, out.mirostat_mu.to(torch.float32),
                                                         shard.mu.to(torch.float32)))
            if not ex.sync_free and not bool(rec.active.any()):  # (every rank holds the same flags: all stop here)
                break
        return rec.output(t.mu.index_select(0, idx))

    def _end_ids(self, rows: list[int]) -> torch.Tensor:
        """(B, E) int64 on the device: the ids that end each row's request (its stop ids; the EOS ids unless it
        ignores EOS), padded with -1."""
        ids = []
        for s in rows:
            p = self._book.params[s]
            assert p is not None
            ids.append([*(p.stop_token_ids or ()), *(() if p.ignore_eos else self._eos_host)])
        width = max([len(e) for e in ids], default=0)
        table = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
        for r, e in enumerate(ids):
            table[r, :len(e)] = e
        return torch.from_numpy(table).to(self._device)

    # ------------------------------------------------------------------------------------------ export / restore
    def export(self, slot: int) -> ShardSlotState:
        """Everything ``slot`` holds on this rank, copied to the host (reads the device; nothing is exchanged): the
        replicated state and this rank's slice of the counts and prompt bits. `restore` puts it back into a free
        slot of a `distributed.Sampler` with the same vocabulary and slice (each rank restores its own), and
        `whole_state` joins every rank's into a single-device `fastsampler.SlotState`."""
        i = self._check_slot(slot)
        params = self._book.params[i]
        assert params is not None
        seq, step, mu, counts, prompt_bits, history, total, start = self._tables.read(i)
        return ShardSlotState(params=params, seed=self._book.seeds[i], seq=seq, step=step, mirostat_mu=mu,
                              vocab_size=self._vocab, vocab_start=self._lo, local_size=self._width,
                              output_counts=counts, prompt_mask=prompt_bits, history=history, history_total=total,
                              history_start=start)

    def restore(self, state: ShardSlotState | SlotState) -> int:
        """Put a slot back into the lowest free slot (every rank, in the same order of calls); returns it.

        ``state`` is this rank's `ShardSlotState` (from `export` on a `distributed.Sampler` with the same
        vocabulary size and slice), or a single-device `fastsampler.SlotState` (from `fastsampler.Sampler.export`:
        each rank takes its slice of it), so a request moves between a single-device engine and a tensor-parallel
        one and continues as if it had never left.

        Raises
        ------
        TypeError
            When ``state`` is neither.
        ValueError
            When no slot is free, the state's vocabulary or slice differs from this Sampler's, or its params do not
            fit this one (as in `add`).
        """
        lo, width, v = self._lo, self._width, self._vocab
        if isinstance(state, ShardSlotState):
            if (state.vocab_size, state.vocab_start, state.local_size) != (v, lo, width):
                raise ValueError(f"state holds the slice [{state.vocab_start}, {state.vocab_start + state.local_size})"
                                 f" of a vocabulary of {state.vocab_size}; this rank's Sampler holds [{lo}, "
                                 f"{lo + width}) of {v}")
            counts, bits = state.output_counts, state.prompt_mask
        elif isinstance(state, SlotState):
            if state.output_counts.shape != (v,) or state.prompt_mask.shape != (mask_words(v),):
                raise ValueError(f"state holds counts for a vocabulary of {state.output_counts.shape[0]} tokens; this "
                                 f"Sampler has vocab_size={v}")
            hi = max(min(lo + width, v), lo)
            counts = np.zeros(width, dtype=np.int16)
            counts[:hi - lo] = state.output_counts[lo:hi]
            prompt = np.nonzero(bitmask_to_bool(state.prompt_mask[None], v)[0])[0]
            bits = local_mask(prompt, lo, width)
        else:
            raise TypeError(f"state must be a distributed.ShardSlotState (distributed.Sampler.export) or a "
                            f"SlotState (Sampler.export), got {type(state).__name__}")
        if not self._book.num_free:
            raise ValueError(f"Sampler is full: all max_slots={self._slots} slots are in use; remove finished "
                             f"requests first")
        p = state.params
        _SingleSampler._check_request(self, p)
        req = pack_request(p)
        slots = self._book.take(1)
        self._tables.write(slots, req, seed_to_int64(state.seed), np.zeros(0, dtype=np.int64), None,
                           step=state.step, mu=state.mirostat_mu, first_seq=state.seq,
                           restored=(counts, bits, state.history, state.history_total, state.history_start))
        self._book.fill(slots, p, state.seed, req)
        self._rows[slots[0]] = _row_params(req.f, req.i)
        return slots[0]

    def _step(self, local_logits: torch.Tensor, slots: Sequence[int], token_bitmask: torch.Tensor | None,
              stats: ExchangeStats | None) -> tuple[Exchange, torch.Tensor, list[int], _Shard]:
        """A step's inputs, checked: the exchange, the slots (device index and list) and the shard's state."""
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
        hi = max(min(lo + width, self._vocab), lo)

        # the allowed ids of the slice: the slots' allowed bits, the history rules, the step's bitmask; the stop ids
        # (banned before min_tokens) are decided in the pipeline from the slots' steps on the device
        allowed = local_bits(t.allowed.index_select(0, idx), width) if restricted and t.allowed is not None else None
        parts = [allowed, t.history_bans(idx, info)]
        stop = None
        if info.stop_ban:
            stop_h = torch.zeros(b, width, dtype=torch.bool)
            for r, s in enumerate(rows):
                ids = t.stop_ids[s]
                ids = ids[(ids >= lo) & (ids < hi)] - lo
                if ids.size and t.i[s, I_MIN_TOKENS] > 0:
                    stop_h[r, torch.from_numpy(ids)] = True
            stop = stop_h.to(dev)
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
        eos = None
        if self._eos_cols is not None and any(r.ignore_eos or r.min_tokens > 0 for r in (self._rows[s] for s in rows)):
            eos = self._eos_cols[None, :].expand(b, width)
        shard = _Shard(rows=[self._rows[s] for s in rows], seeds=t.seeds_d.index_select(0, idx),
                       steps=t.steps.index_select(0, idx), seqs=t.seqs_d.index_select(0, idx),
                       mu=t.mu.index_select(0, idx).to(torch.float64), n_top=n_top, eos=eos, stop=stop,
                       allowed=allowed, prompt=local_bits(t.prompt.index_select(0, idx), width) if penal else None,
                       counts=t.counts.index_select(0, idx) if penal else None, bias=bias,
                       dry=t.dry_entries(idx, info))
        return ex, idx, rows, shard


@dataclass
class ShardSlotState:
    """One slot's state on one rank (`distributed.Sampler.export` / `restore`): picklable, device-free.

    The fields of `fastsampler.SlotState`, with ``output_counts`` ``(local_size,)`` int16 and ``prompt_mask``
    ``(ceil(local_size / 32),)`` int32 holding the rank's slice only (bit ``j``: id ``vocab_start + j``), and the
    slice itself (``vocab_size``, ``vocab_start``, ``local_size``). `whole_state` joins every rank's."""

    params: SamplingParams
    seed: int
    seq: int
    step: int
    mirostat_mu: float
    vocab_size: int
    vocab_start: int
    local_size: int
    output_counts: np.ndarray
    prompt_mask: np.ndarray
    history: np.ndarray
    history_total: int
    history_start: int


def whole_state(states: Sequence[ShardSlotState]) -> SlotState:
    """The single-device `fastsampler.SlotState` of a slot from every rank's `ShardSlotState`, in rank order (for
    example from ``torch.distributed.all_gather_object``): `fastsampler.Sampler.restore` continues the request on one
    device. The slices must be the ranks' layout (contiguous from id 0, covering the vocabulary) of one slot."""
    if not states or not all(isinstance(st, ShardSlotState) for st in states):
        raise TypeError("states must be a non-empty sequence of distributed.ShardSlotState, one per rank in rank "
                        "order")
    first = states[0]
    v, pos = first.vocab_size, 0
    for r, st in enumerate(states):
        if st.vocab_size != v or st.vocab_start != pos:
            raise ValueError(f"states must be every rank's slice in rank order, contiguous from id 0: state {r} "
                             f"starts at {st.vocab_start} of a vocabulary of {st.vocab_size}, expected {pos} of {v}")
        if (st.seed, st.seq, st.step) != (first.seed, first.seq, first.step):
            raise ValueError(f"states must be one slot's: state {r} has (seed, seq, step) = "
                             f"{(st.seed, st.seq, st.step)}, state 0 {(first.seed, first.seq, first.step)}")
        pos += st.local_size
    if pos < v:
        raise ValueError(f"the states' slices end at id {pos}, short of vocab_size={v}")
    counts = np.concatenate([st.output_counts for st in states])[:v].astype(np.int16)
    prompt = np.concatenate([st.vocab_start + np.nonzero(bitmask_to_bool(st.prompt_mask[None], st.local_size)[0])[0]
                             for st in states])
    return SlotState(params=first.params, seed=first.seed, seq=first.seq, step=first.step,
                     mirostat_mu=first.mirostat_mu, output_counts=counts,
                     prompt_mask=ids_to_bitmask([prompt[prompt < v]], v)[0].astype(np.int32),
                     history=first.history.copy(), history_total=first.history_total,
                     history_start=first.history_start)
