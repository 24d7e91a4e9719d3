"""The collectives of vocabulary-parallel sampling (`fastsampler.distributed`): gathers in rank order with their
bytes counted, whole-row statistics merged from per-rank partials, and the distributed selection of a threshold.

Every function here is called by every rank of the group with tensors of the same shapes, and every rank derives
the same values from the same gathered data in the same order: the ranks never disagree, and the result depends on
the world size only through the order of float64 sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._speculative import philox4x32
from .layout import STREAM_TILE, STREAM_TOKEN

__all__ = ["ExchangeStats", "Exchange", "row_stats", "merge_stats", "noise"]

_MASK = 0xFFFFFFFF
_SIGN = -(1 << 63)
_LOW63 = (1 << 63) - 1
DIGIT_BITS = 8  # radix of the distributed selection: 8 rounds of 256-bin histograms for a float64 key
_BINS = 1 << DIGIT_BITS
_ROUNDS = 64 // DIGIT_BITS
FINISH = 32  # candidates per row left to the radix select's last exchange (their values are sent)


@dataclass
class ExchangeStats:
    """What one rank exchanged during `fastsampler.distributed.sample` calls (accumulated over the calls it is
    passed to).

    Attributes
    ----------
    collectives : int
        Collective calls (all-gathers and broadcasts).
    bytes_sent : int
        Bytes this rank contributed (each all-gather counts its own tensor once).
    bytes_received : int
        Bytes this rank received (an all-gather delivers every rank's tensor, its own included).
    largest : int
        The most elements this rank contributed to one collective: a bound on any exchanged tensor's size.
    """

    collectives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    largest: int = 0


class Exchange:
    """All-gathers over a process group, in rank order, counted in an `ExchangeStats`."""

    def __init__(self, group: dist.ProcessGroup | None, stats: ExchangeStats | None, *,
                 sync_free: bool = False) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("fastsampler.distributed needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group)")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = stats if stats is not None else ExchangeStats()
        # True: no decision reads device data back to the host (`may`, `select`'s rounds); False (the CPU, where a
        # read-back costs nothing): a rule's exchanges are skipped when no row needs them, and `select` ends early
        self.sync_free = sync_free

    def may(self, cond: torch.Tensor) -> bool:
        """Whether some row may need a step gated by the (B,) bool ``cond``: always, when `sync_free` (the step then
        runs and leaves the rows without ``cond`` unchanged), else ``cond.any()`` read back."""
        return True if self.sync_free else bool(cond.any())

    def _count(self, t: torch.Tensor, world: int) -> None:
        n = t.numel() * t.element_size()
        self.stats.collectives += 1
        self.stats.bytes_sent += n
        self.stats.bytes_received += world * n
        self.stats.largest = max(self.stats.largest, t.numel())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``(world, *t.shape)``: every rank's ``t``, in rank order."""
        t = t.contiguous()
        self._count(t, self.world)
        if self.world == 1:
            return t[None]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``t`` on every rank."""
        t = t.contiguous().clone()
        self._count(t, 1)
        if self.world > 1:
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            dist.broadcast(t, src=src, group=self.group)
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` added in rank order (the same float64 result on every rank)."""
        g = self.gather(t)
        acc = g[0].clone()
        for r in range(1, g.shape[0]):
            acc += g[r]
        return acc

    # ------------------------------------------------------------------------------------------- order statistics
    def kth_largest(self, key: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, kmax: int, cap: int
                    ) -> torch.Tensor:
        """(B,) float64: each row's ``k``-th largest ``key`` among ``mask`` (with multiplicity; ``1 <= k`` and at
        most the row's candidates; the result of a row with ``k = 0`` is meaningless). ``kmax`` is a bound on ``k``
        known on the host (from the rows' parameters): one gather of ``(B, kmax)`` per rank when ``kmax <= cap``,
        else `select`."""
        if kmax <= 0:
            return torch.full(k.shape, -torch.inf, dtype=torch.float64, device=key.device)
        if kmax > cap:
            return self.select(key, None, mask, k.to(torch.float64), torch.full_like(k, -torch.inf,
                                                                                       dtype=torch.float64))
        top = self.gather(top_values(key, mask, kmax))  # (world, B, K)
        merged = torch.sort(top.permute(1, 0, 2).reshape(key.shape[0], -1), dim=1, descending=True).values
        return merged.gather(1, (k.clamp(min=1, max=kmax) - 1)[:, None])[:, 0]

    def select(self, key: torch.Tensor, weight: torch.Tensor | None, mask: torch.Tensor, count_target: torch.Tensor,
               mass_target: torch.Tensor) -> torch.Tensor:
        """The largest value ``v`` of ``key`` among ``mask`` with ``#{key >= v} >= count_target`` and
        ``Σ_{key >= v} weight >= mass_target``, per row; the smallest candidate where no value qualifies. Rows with
        ``count_target <= 0`` and ``mass_target = -inf`` are not selected (their result is meaningless).

        A radix select over the order-preserving integer image of the float64 keys: each round gathers every rank's
        256-bin histogram (counts, and masses when ``weight`` is given) of the next 8 bits among the candidates that
        still share the chosen prefix, and keeps the highest bin whose totals at or above it satisfy both targets.
        Exact in the keys (a value threshold: ties stay together); masses are float64 sums. Off `sync_free`, once
        every row has at most `FINISH` candidates left each rank sends them and the value is found among them (the
        same value, in fewer exchanges); `sync_free`, all eight rounds run and nothing is read back.

        key, weight : (B, V) float64 (``weight`` None: counts only)
        mask : (B, V) bool
        count_target, mass_target : (B,) float64
        """
        dev = key.device
        ct, mt = count_target.to(torch.float64).clone(), mass_target.to(torch.float64).clone()
        active = (ct > 0) | (mt > -torch.inf)
        if not self.may(active):
            return torch.full((key.shape[0],), -torch.inf, dtype=torch.float64, device=dev)
        use_mass = weight is not None
        w = torch.where(mask, weight, 0.0) if use_mass else None
        b = key.shape[0]
        bits = (key + 0.0).contiguous().view(torch.int64)  # (+0.0: -0.0 and 0.0 are one value)
        u = torch.where(bits < 0, bits ^ _LOW63, bits) ^ _SIGN  # unsigned order, held in int64
        inr = mask & active[:, None]
        k = 2 if use_mass else 1
        above = torch.zeros(b, k, dtype=torch.float64, device=dev)
        bins = torch.arange(_BINS, device=dev)
        digits = []
        for rnd in range(_ROUNDS):
            d = (u >> (64 - DIGIT_BITS * (rnd + 1))) & (_BINS - 1)
            hist = torch.zeros(b, k, _BINS, dtype=torch.float64, device=dev)
            hist[:, 0].scatter_add_(1, d, inr.to(torch.float64))
            if use_mass:
                hist[:, 1].scatter_add_(1, d, torch.where(inr, w, 0.0))
            tot = self.sum(hist)
            ge = above[:, :, None] + tot.flip(-1).cumsum(-1).flip(-1)  # totals at or above each bin
            if rnd == 0:  # no value qualifies: the smallest candidate (the count of every candidate)
                ok = (ge[:, 0, 0] >= ct) & ((ge[:, 1, 0] >= mt) if use_mass else True)
                ct = torch.where(ok, ct, ge[:, 0, 0])
                mt = torch.where(ok, mt, -torch.inf)
            nonempty = tot[:, 0] > 0
            pred = (ge[:, 0] >= ct[:, None]) & nonempty
            if use_mass:
                pred &= ge[:, 1] >= mt[:, None]
            best = torch.where(pred, bins, -1).max(1).values
            # (only by rounding, at a near-tie, does no bin of the chosen range qualify: its lowest one is taken)
            lowest = torch.where(nonempty, bins, _BINS).min(1).values.clamp(max=_BINS - 1)
            dstar = torch.where(best >= 0, best, lowest)
            nxt = torch.nn.functional.pad(ge - above[:, :, None], (0, 1))  # bins above dstar: ge[dstar + 1]
            above = above + nxt.gather(2, (dstar + 1)[:, None, None].expand(b, k, 1))[:, :, 0]
            inr &= d == dstar[:, None]
            digits.append(dstar)
            if not self.sync_free and rnd + 1 < _ROUNDS:
                left = tot[:, 0].gather(1, dstar[:, None])[:, 0]
                if float(left.max()) <= FINISH:
                    return torch.where(active, self._finish(key, w, inr, above, ct, mt), -torch.inf)
        return torch.where(active, _from_digits(torch.stack(digits, 1)), -torch.inf)

    def _finish(self, key: torch.Tensor, w: torch.Tensor | None, inr: torch.Tensor, above: torch.Tensor,
                ct: torch.Tensor, mt: torch.Tensor) -> torch.Tensor:
        """The end of `select` once at most `FINISH` candidates are left per row: every rank's candidates (value and
        weight) gathered, and the largest value whose totals at or above it (``above``: the candidates above the
        range) satisfy the targets; the smallest candidate when none does (a near-tie's rounding)."""
        b = key.shape[0]
        if key.shape[1] < FINISH:  # (every rank sends FINISH entries: a narrow shard pads)
            pad = FINISH - key.shape[1]
            key = torch.nn.functional.pad(key, (0, pad), value=-torch.inf)
            inr = torch.nn.functional.pad(inr, (0, pad), value=False)
            w = None if w is None else torch.nn.functional.pad(w, (0, pad))
        vals, idx = torch.topk(torch.where(inr, key, -torch.inf), FINISH, dim=1)
        parts = [vals, inr.gather(1, idx).to(torch.float64)]
        if w is not None:
            parts.append(w.gather(1, idx))
        g = self.gather(torch.stack(parts, 1))  # (world, b, 2 or 3, FINISH)
        v = g[:, :, 0].permute(1, 0, 2).reshape(b, -1)
        real = g[:, :, 1].permute(1, 0, 2).reshape(b, -1) > 0
        ge = (v[:, None, :] >= v[:, :, None]) & real[:, None, :]  # [row, i, j]: candidate j at or above i
        cnt = above[:, 0, None] + ge.sum(2).to(torch.float64)
        pred = real & (cnt >= ct[:, None])
        if w is not None:
            wv = g[:, :, 2].permute(1, 0, 2).reshape(b, -1)
            mass = above[:, 1, None] + torch.where(ge, wv[:, None, :], 0.0).sum(2)
            pred &= mass >= mt[:, None]
        best = torch.where(pred, v, -torch.inf).max(1).values
        low = torch.where(real, v, torch.inf).min(1).values
        return torch.where(pred.any(1), best, low)


def _from_digits(digits: torch.Tensor) -> torch.Tensor:
    """(B,) float64 from the radix digits of `Exchange.select` (the inverse of its key transform), on their
    device."""
    u = torch.zeros(digits.shape[0], dtype=torch.int64, device=digits.device)
    for rnd in range(digits.shape[1]):
        u |= digits[:, rnd].to(torch.int64) << (64 - DIGIT_BITS * (rnd + 1))  # (int64 shifts wrap: the top digit)
    s = u ^ _SIGN
    return torch.where(s < 0, s ^ _LOW63, s).view(torch.float64)


def top_values(key: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) float64: each row's ``k`` largest ``key`` among ``mask``, descending, padded with ``-inf``."""
    v = torch.where(mask, key, -torch.inf)
    if v.shape[1] < k:
        v = torch.nn.functional.pad(v, (0, k - v.shape[1]), value=-torch.inf)
    return torch.topk(v, k, dim=1).values


# --------------------------------------------------------------------------------------------- row statistics
def row_stats(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 4) float64 partials of ``v`` over ``mask``: count, max, ``Σ exp(v - max)``, ``Σ exp(v - max)(v - max)``
    (max ``-inf`` and sums 0 where the mask is empty)."""
    n = mask.sum(1).to(torch.float64)
    vm = torch.where(mask, v, -torch.inf)
    m = vm.max(1).values
    d = vm - torch.where(torch.isfinite(m), m, 0.0)[:, None]  # (-inf outside the mask)
    e = torch.exp(d)
    s = e.sum(1)
    t = (e * d.clamp(min=-torch.finfo(torch.float64).max)).sum(1)  # (0 outside the mask, not 0 x -inf)
    return torch.stack((n, m, s, t), 1)


def merge_stats(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-row ``(count, max, ln Σ exp(v - max), entropy)`` from gathered `row_stats` partials ``(world, B, 4)``,
    combined in rank order. The entropy is that of ``softmax(v)`` (``ln S - Σ q (v - max)``)."""
    n = _ordered_sum(g[:, :, 0])
    m = g[:, :, 1].max(0).values
    mf = torch.where(torch.isfinite(m), m, 0.0)
    # every rank's terms at once, then added in rank order (one operation per rank, not per term)
    mr, sr, tr = g[:, :, 1], g[:, :, 2], g[:, :, 3]
    has = sr > 0
    shift = torch.where(has, mr - mf[None, :], 0.0)
    f = torch.where(has, torch.exp(shift), 0.0)
    s = _ordered_sum(f * sr)
    t = _ordered_sum(torch.where(has, f * (tr + sr * shift), 0.0))
    ln_s = torch.log(s)
    ent = ln_s - t / s
    return n, m, ln_s, ent


def _ordered_sum(x: torch.Tensor) -> torch.Tensor:
    acc = x[0].clone()
    for r in range(1, x.shape[0]):
        acc += x[r]
    return acc


def moments(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3) float64 partials for a population variance: count, mean, ``Σ (v - mean)^2`` over ``mask``."""
    n = mask.sum(1).to(torch.float64)
    mean = torch.where(mask, v, 0.0).sum(1) / n.clamp(min=1.0)
    m2 = torch.where(mask, (v - mean[:, None]) ** 2, 0.0).sum(1)
    return torch.stack((n, mean, m2), 1)


def merge_moments(g: torch.Tensor) -> torch.Tensor:
    """(B,) population standard deviation from gathered `moments` partials ``(world, B, 3)``, combined in rank order
    (the pairwise update of Chan, Golub and LeVeque)."""
    n, mean, m2 = g[0, :, 0].clone(), g[0, :, 1].clone(), g[0, :, 2].clone()
    for r in range(1, g.shape[0]):
        nb, mb, m2b = g[r, :, 0], g[r, :, 1], g[r, :, 2]
        tot = n + nb
        has = nb > 0
        delta = mb - mean
        safe = tot.clamp(min=1.0)
        mean = torch.where(has, mean + delta * nb / safe, mean)
        m2 = torch.where(has, m2 + m2b + delta * delta * n * nb / safe, m2)
        n = tot
    return torch.sqrt(m2 / n.clamp(min=1.0))


# ---------------------------------------------------------------------------------------------------- the noise
def noise(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor, j: torch.Tensor, stream: int) -> torch.Tensor:
    """Exponential variates of docs/semantics.md §7, float64, on ``j``'s device: ``(B, K)`` counter indices ``j``
    (token ids for stream 0, tile indices for stream 1) of rows with ``(B,)`` seeds, steps and seqs."""
    s = seeds[:, None]
    key = (s & _MASK, (s >> 32) & _MASK)
    ctr = ((j >> 2) & _MASK, (steps[:, None] & _MASK).expand_as(j), (seqs[:, None] & _MASK).expand_as(j),
           torch.full_like(j, stream))
    words = torch.stack(philox4x32(key, ctr), -1)
    r = words.gather(-1, (j & 3)[..., None])[..., 0]
    scale = 2.0 ** -32
    low = r < (1 << 31)
    a = -torch.log((r.to(torch.float64) + 0.5) * scale)
    b = -torch.log1p(-(((~r) & _MASK).to(torch.float64) + 0.5) * scale)
    return torch.where(low, a, b)


def token_noise_block(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor, first: torch.Tensor,
                      n: int) -> torch.Tensor:
    """`noise` of stream 0 (token ids) at the ``n`` consecutive ids ``first, first + 1, ...`` of each row,
    ``(B, n)``: one Philox call per four ids (its four words serve ids ``4c .. 4c + 3``), a quarter of `noise`'s
    work."""
    b = first.shape[0]
    base = first >> 2
    m = (n + 3) // 4 + 1  # counters covering [first, first + n) whatever first's alignment
    ctr = base[:, None] + torch.arange(m, device=first.device)[None, :]
    s = seeds[:, None]
    key = (s & _MASK, (s >> 32) & _MASK)
    words = philox4x32(key, (ctr & _MASK, (steps[:, None] & _MASK).expand_as(ctr),
                             (seqs[:, None] & _MASK).expand_as(ctr), torch.full_like(ctr, STREAM_TOKEN)))
    r = torch.stack(words, -1).reshape(b, 4 * m)
    off = (first - 4 * base)[:, None] + torch.arange(n, device=first.device)[None, :]
    r = r.gather(1, off)
    scale = 2.0 ** -32
    low = r < (1 << 31)
    a = -torch.log((r.to(torch.float64) + 0.5) * scale)
    c = -torch.log1p(-(((~r) & _MASK).to(torch.float64) + 0.5) * scale)
    return torch.where(low, a, c)


def tile_noise(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    return noise(seeds, steps, seqs, tiles, STREAM_TILE)


def uniform_word0(seeds: torch.Tensor, steps: torch.Tensor, seqs: torch.Tensor, stream: int) -> torch.Tensor:
    """(B,) float64 ``(w0 + 0.5) 2^-32`` from word 0 of Philox at counter ``(0, step, seq, stream)`` (XTC's coin,
    docs/semantics.md §3 E item 6, with ``stream = STREAM_XTC``), on the seeds' device."""
    key = (seeds & _MASK, (seeds >> 32) & _MASK)
    w0 = philox4x32(key, (torch.zeros_like(seeds), steps & _MASK, seqs & _MASK, torch.full_like(seeds, stream)))[0]
    return (w0.to(torch.float64) + 0.5) * 2.0**-32
