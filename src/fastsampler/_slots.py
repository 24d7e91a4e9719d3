"""A `Sampler`'s per-slot state in its two halves: what the host knows of each slot (`SlotBook`) and the tables the
kernels read on the device (`SlotTables`). Both are filled from one `PackedRequest` per request.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from ._batch import NO_TOKEN, PackedRequest, advance_state, bias_tables_to_csr, ids_to_bitmask, mask_words, to_device
from ._history import bad_words_table, breakers_table, dry_kmax, dry_table, ordered_history
from .layout import I_IGNORE_EOS, NF, NI, combine_bits
from .params import SamplingParams

__all__ = ["HistoryTables", "RuleInfo", "SlotBook", "SlotTables"]

_NO_BIAS = (np.zeros(0, np.int32), np.zeros(0, np.float32))


class RuleInfo(NamedTuple):
    """What a batch's per-step history work needs, known on the host: some row bans its stop ids before
    ``min_tokens``, the distinct ``no_repeat_ngram_size`` values > 0, some row has bad words; and for DRY (a
    penalty table, not a ban) the longest repeat length that can change a penalty (0: no row has DRY) and whether
    some row has sequence breakers."""

    stop_ban: bool = False
    ngram_sizes: tuple[int, ...] = ()
    bad_words: bool = False
    dry_kmax: int = 0
    dry_breakers: bool = False
    dry: bool = False

    @property
    def any(self) -> bool:
        return self.stop_ban or bool(self.ngram_sizes) or self.bad_words

    @property
    def history(self) -> bool:
        return bool(self.ngram_sizes) or self.bad_words


class SlotBook:
    """Which slots are in use, and the host's copy of what each holds: its params, seed, flag bits, top-logprob
    width, logit bias and whether it restricts ids. Nothing here touches the device.

    Attributes (lists indexed by slot): ``params`` (None = free), ``seeds`` (uint64), ``bits``, ``n_top``,
    ``n_bias``, ``restricted``, ``bias`` (ids, values), ``stops`` (has stop ids), ``stop_ban`` (bans them before
    ``min_tokens``), ``ngram`` (``no_repeat_ngram_size``), ``bad_words`` (has some); ``live``, ``live_stop`` and
    ``live_rules``: `aggregate`, `stop_info` and `rule_info` over the slots in use.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.params: list[SamplingParams | None] = [None] * slots
        self.seeds = [0] * slots
        self.bits = [0] * slots
        self.n_top = [0] * slots
        self.n_bias = [0] * slots
        self.restricted = [False] * slots
        self.bias: list[tuple[np.ndarray, np.ndarray]] = [_NO_BIAS] * slots
        self.stops = [False] * slots
        self.stop_ban = [False] * slots
        self.ngram = [0] * slots
        self.bad_words = [False] * slots
        self.dry_kmax = [-1] * slots  # -1: no DRY; else its longest useful repeat length (`dry_kmax`)
        self.breakers = [False] * slots
        self.free = list(range(slots))  # a heap: `take` returns the lowest free slots
        self.live: tuple[int, int, int, bool] = (0, 0, 0, False)
        self.live_stop: tuple[bool, bool] = (False, False)
        self.live_rules: RuleInfo = RuleInfo()

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> list[int]:
        """Reserve the ``n`` lowest free slots (the caller checked that enough are free)."""
        return [heapq.heappop(self.free) for _ in range(n)]

    def fill(self, slots: Sequence[int], params: SamplingParams, seed: int, req: PackedRequest) -> None:
        """Record what ``slots`` now hold (a request's samples share its params and seed)."""
        for s in slots:
            self.params[s] = params
            self.seeds[s] = seed
            self.bits[s] = req.bits
            self.n_top[s] = req.n_top
            self.n_bias[s] = req.bias_ids.size
            self.bias[s] = (req.bias_ids, req.bias_vals)
            self.restricted[s] = req.restricted
            self.stops[s] = bool(req.stop_ids.size)
            self.stop_ban[s] = req.stop_ban
            self.ngram[s] = req.ngram
            self.bad_words[s] = bool(req.bad_words)
            self.dry_kmax[s] = dry_kmax([req.dry_f], [req.dry_i], 1 << 30) if req.dry else -1
            self.breakers[s] = req.dry and bool(req.breakers)
        self.update_live()

    def release(self, slots: Sequence[int]) -> None:
        """Free ``slots`` (checked by the caller: in use and distinct)."""
        for s in slots:
            self.params[s] = None
            heapq.heappush(self.free, s)
        self.update_live()

    def reset(self) -> None:
        self.params = [None] * self.slots
        self.free = list(range(self.slots))
        self.update_live()

    def in_use(self, slot: int) -> bool:
        return self.params[slot] is not None

    def aggregate(self, rows: Sequence[int]) -> tuple[int, int, int, bool]:
        """What a batch of ``rows`` decides on the host: (flag bits, top-logprob width, logit-bias width, whether
        some row restricts ids)."""
        return (combine_bits([self.bits[s] for s in rows]), max((self.n_top[s] for s in rows), default=0),
                max((self.n_bias[s] for s in rows), default=0), any(self.restricted[s] for s in rows))

    def stop_info(self, rows: Sequence[int]) -> tuple[bool, bool]:
        """(some row has stop ids, some row bans them before its ``min_tokens``)."""
        return any(self.stops[s] for s in rows), any(self.stop_ban[s] for s in rows)

    def rule_info(self, rows: Sequence[int]) -> RuleInfo:
        """The per-step masks ``rows`` need (`RuleInfo`)."""
        sizes = tuple(sorted({self.ngram[s] for s in rows if self.ngram[s] > 0}))
        kmax = max((self.dry_kmax[s] for s in rows), default=-1)
        return RuleInfo(any(self.stop_ban[s] for s in rows), sizes, any(self.bad_words[s] for s in rows),
                        max(kmax, 0), any(self.breakers[s] for s in rows), kmax >= 0)

    def update_live(self) -> None:
        """Recompute `live`, `live_stop` and `live_rules`, over the slots in use (a `Sampler`'s ``capture_key``)."""
        rows = [i for i, p in enumerate(self.params) if p is not None]
        self.live = self.aggregate(rows)
        self.live_stop = self.stop_info(rows)
        self.live_rules = self.rule_info(rows)

    def bias_csr(self, rows: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logit bias of ``rows`` in CSR form from the host copies: O(total bias entries)."""
        lens = np.fromiter((self.n_bias[s] for s in rows), dtype=np.int32, count=len(rows))
        indptr = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lens, out=indptr[1:])
        ids = np.concatenate([self.bias[s][0] for s in rows if self.n_bias[s]])
        vals = np.concatenate([self.bias[s][1] for s in rows if self.n_bias[s]])
        return to_device(indptr, device), to_device(ids, device), to_device(vals, device)


class HistoryTables:
    """The history ring and the tables of the rules that read it (n-gram size, bad words, DRY, the penalty window),
    per slot, on ``device``: shared by a `Sampler`'s `SlotTables` and a sharded sampler's tables (which call
    `_init_history` in their constructor and `write_history` when a request joins).

    ``hist`` ``(S, history_len)`` int32 holds token ``j`` of a slot's prompt + output at column ``j % history_len``
    (``hist_total`` counts them); ``bad`` ``(S, P, M)`` the bad words right-aligned, ``breakers`` ``(S, P, M)`` DRY's
    breakers left-aligned, ``dry_f`` / ``dry_i`` ``(S, 2)`` its parameters: allocated by the first request that uses
    them."""

    slots: int
    device: torch.device
    counts: torch.Tensor  # (S, columns) int16 output counts, of ids counts_lo ...
    counts_lo = 0
    counts_slice = False

    def _init_history(self, slots: int, history_len: int, device: torch.device) -> None:
        kw: dict[str, Any] = dict(device=device)
        self.history_len = history_len
        self.hist = torch.zeros(slots, history_len, dtype=torch.int32, **kw) if history_len else None
        self.hist_total = torch.zeros(slots, dtype=torch.int64, **kw)
        self.ngram = torch.zeros(slots, dtype=torch.int64, **kw)
        self.bad: torch.Tensor | None = None  # (S, P, M) int64
        self.dry_f: torch.Tensor | None = None  # (S, 2) float64: multiplier (0: no DRY), base
        self.dry_i: torch.Tensor | None = None  # (S, 2) int64: allowed length, window
        self.breakers: torch.Tensor | None = None  # (S, P, M) int64
        # penalty_last_n: each slot's window (-1: all generated tokens) and where its generated tokens start in the
        # history (the prompt's length); `windowed` once some slot counts a window (the step then updates counts)
        self.window = torch.full((slots,), -1, dtype=torch.int64, **kw)
        self.hist_start = torch.zeros(slots, dtype=torch.int64, **kw)
        self.windowed = False

    def write_history(self, idx: torch.Tensor, req: PackedRequest, history: np.ndarray | None,
                      history_total: int | None, history_start: int) -> None:
        """A request's history rules and history (its last tokens, oldest first, of ``history_total`` in all,
        default their number; the output starts at token ``history_start``) into the slots ``idx``."""
        dev = self.device
        self.ngram[idx] = req.ngram
        self.window[idx] = req.window
        self.hist_start[idx] = history_start
        self.windowed |= req.window >= 0
        if req.bad_words:
            self.grow_bad(len(req.bad_words), max(len(w) for w in req.bad_words))
        if self.bad is not None:
            p, m = self.bad.shape[1:]
            self.bad[idx] = torch.from_numpy(bad_words_table(req.bad_words, p, m)).to(dev)
        if req.dry and self.dry_f is None:
            self.dry_f = torch.zeros(self.slots, 2, dtype=torch.float64, device=dev)
            self.dry_i = torch.zeros(self.slots, 2, dtype=torch.int64, device=dev)
        if self.dry_f is not None and self.dry_i is not None:
            self.dry_f[idx] = torch.tensor(req.dry_f if req.dry else (0.0, 1.0), dtype=torch.float64, device=dev)
            self.dry_i[idx] = torch.tensor(req.dry_i, dtype=torch.int64, device=dev)
        if req.dry and req.breakers:
            self.grow_breakers(len(req.breakers), max(len(w) for w in req.breakers))
        if self.breakers is not None:
            p, m = self.breakers.shape[1:]
            self.breakers[idx] = torch.from_numpy(breakers_table(req.breakers if req.dry else (), p, m)).to(dev)
        if self.hist is not None:
            h = np.zeros(0, dtype=np.int64) if history is None else np.asarray(history, dtype=np.int64)
            total = h.size if history_total is None else int(history_total)
            length = self.history_len
            keep = h[max(0, h.size - length):]
            row = np.zeros(length, dtype=np.int32)
            row[(total - keep.size + np.arange(keep.size)) % length] = keep
            self.hist[idx] = torch.from_numpy(row).to(dev)
            self.hist_total[idx] = total

    def advance_history(self, slots_t: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Append each valid row's token to its slot's history ring (slots distinct); then, for a slot whose
        penalties count only its last ``n`` generated tokens, take the token that left that window out of its
        counts (the counts already hold the new token). ``counts`` are ``(S, columns)`` int16 over ids
        ``counts_lo ...``: the whole vocabulary, or one rank's slice (``counts_slice``: other ids are not counted)."""
        if self.hist is None:
            return
        length = self.history_len
        total = self.hist_total.index_select(0, slots_t)
        pos = slots_t * length + total % length
        flat = self.hist.view(-1)
        old = flat.index_select(0, pos)
        flat.index_copy_(0, pos, torch.where(valid, tokens.to(torch.int32), old))
        after = total + valid.to(torch.int64)
        self.hist_total.index_copy_(0, slots_t, after)
        if not self.windowed:
            return
        n = self.window.index_select(0, slots_t)
        leave = valid & (n >= 0) & (after - self.hist_start.index_select(0, slots_t) > n)
        # generated token g - 1 - n left the window: history token after - 1 - n (still in the ring: n < length)
        gone = flat.index_select(0, slots_t * length + (after - 1 - n) % length).to(torch.int64)
        width = self.counts.shape[1]
        if self.counts_slice:  # only this slice's ids are counted
            gone = gone - self.counts_lo
            leave = leave & (gone >= 0) & (gone < width)
        cflat = self.counts.view(-1)
        cpos = slots_t * width + torch.where(leave, gone, 0)
        cur = cflat.index_select(0, cpos)
        cflat.index_copy_(0, cpos, torch.where(leave & (cur > 0), cur - 1, cur))

    @torch.inference_mode(False)
    def grow_bad(self, p: int, m: int) -> bool:
        """Make room for ``p`` bad words of up to ``m`` tokens per slot (rewriting the rows written so far)."""
        cur_p, cur_m = (0, 0) if self.bad is None else self.bad.shape[1:]
        if p <= cur_p and m <= cur_m:
            return False
        p, m = max(p, cur_p), max(m, cur_m)
        new = torch.from_numpy(bad_words_table((), p, m)).to(self.device).expand(self.slots, p, m).clone()
        if self.bad is not None:  # old rows, right-aligned in the wider table
            new[:, :cur_p, m - cur_m:] = self.bad
        self.bad = new
        return True

    @torch.inference_mode(False)
    def grow_breakers(self, p: int, m: int) -> bool:
        """Make room for ``p`` DRY sequence breakers of up to ``m`` tokens per slot (keeping the rows written)."""
        cur_p, cur_m = (0, 0) if self.breakers is None else self.breakers.shape[1:]
        if p <= cur_p and m <= cur_m:
            return False
        p, m = max(p, cur_p), max(m, cur_m)
        new = torch.full((self.slots, p, m), -1, dtype=torch.int64, device=self.device)
        if self.breakers is not None:  # old rows, left-aligned in the wider table
            new[:, :cur_p, :cur_m] = self.breakers
        self.breakers = new
        return True

    def dry(self, slots_t: torch.Tensor, info: RuleInfo) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The DRY penalty table of ``slots_t`` (`fastsampler._history.dry_table` on their history rings; no
        read-back on a device), or (None, None) when no row has DRY."""
        if not info.dry:
            return None, None
        assert self.hist is not None and self.dry_f is not None and self.dry_i is not None
        ids, vals = dry_table(self.hist, self.hist_total, slots_t, self.dry_f, self.dry_i,
                              self.breakers if info.dry_breakers else None, kmax=min(info.dry_kmax, self.history_len))
        return (ids, vals) if ids.shape[1] else (None, None)


class SlotTables(HistoryTables):
    """The per-slot tables on the device, in the layout the backends read (`fastsampler._batch.PackedBatch`, slot-
    indexed form): packed parameters, seeds, steps, seqs, Mirostat ``mu``, prompt bitmasks, output counts, and, once
    some request uses them, allowed-id bitmasks and logit-bias tables.

    ``allowed`` and the bias tables are allocated lazily; `reserve` and `grow_bias` return True when they allocated
    (a captured CUDA graph or a cached gather of the old tensors is then stale).
    """

    def __init__(self, slots: int, vocab: int, device: torch.device, eos: Sequence[int], history_len: int = 0) -> None:
        self.slots, self.vocab, self.words, self.device = slots, vocab, mask_words(vocab), device
        self.history_len = history_len
        kw: dict[str, Any] = dict(device=device)
        self.eos = torch.tensor(list(eos), dtype=torch.int32, **kw)
        self.fparams = torch.zeros(slots, NF, dtype=torch.float32, **kw)
        self.iparams = torch.zeros(slots, NI, dtype=torch.int32, **kw)
        self.seeds = torch.zeros(slots, dtype=torch.int64, **kw)
        self.steps = torch.zeros(slots, dtype=torch.int64, **kw)
        self.seqs = torch.zeros(slots, dtype=torch.int64, **kw)
        self.mu = torch.full((slots,), math.nan, dtype=torch.float32, **kw)
        self.prompt = torch.zeros(slots, self.words, dtype=torch.int32, **kw)
        self.counts = torch.zeros(slots, vocab, dtype=torch.int16, **kw)
        self.allowed: torch.Tensor | None = None  # (S, W) int32
        self.bias_ids: torch.Tensor | None = None  # (S, K) int32, K = the largest logit bias so far
        self.bias_vals: torch.Tensor | None = None  # (S, K) float32
        self.bias_len: torch.Tensor | None = None  # (S,) int32
        # once some request has stop ids: per slot, the bits of its stop ids when it bans them before min_tokens,
        # and the ids that end it (the EOS ids unless ignore_eos, then its stop ids; padded with NO_TOKEN)
        self.stop_mask: torch.Tensor | None = None  # (S, W) int32
        self.stop_ids: torch.Tensor | None = None  # (S, E + L) int64
        # the history ring and the tables of the rules that read it (`HistoryTables`)
        self._init_history(slots, history_len, device)

    @torch.inference_mode(False)
    def write(self, slots: Sequence[int], req: PackedRequest, seed_bits: int, prompt_mask: np.ndarray, *,
              first_seq: int = 0, step: int = 0, mu: float | None = None, counts: np.ndarray | None = None,
              history: np.ndarray | None = None, history_total: int | None = None, history_start: int = 0) -> None:
        """Fill ``slots`` for a request (sample ``seq = first_seq + i`` in ``slots[i]``): its packed rows, seed bit
        pattern, ``step``, Mirostat ``mu`` (default: the request's initial ``mu``), prompt bitmask (``(W,)``
        int32), output counts (``(V,)`` int16; default zero), allowed row, logit bias, history rules and history
        (the last tokens of prompt + output, oldest first, of ``history_total`` in all, default their number; the
        output starts at token ``history_start``), allocating the lazily allocated tables it needs."""
        dev = self.device
        idx = torch.tensor(list(slots), dtype=torch.int64, device=dev)
        self.fparams[idx] = torch.from_numpy(req.f).to(dev)
        self.iparams[idx] = torch.from_numpy(req.i).to(dev)
        self.seeds[idx] = seed_bits
        self.steps[idx] = step
        self.seqs[idx] = torch.arange(first_seq, first_seq + len(slots), dtype=torch.int64, device=dev)
        self.mu[idx] = float(req.mu) if mu is None else mu
        self.prompt[idx] = torch.from_numpy(prompt_mask).to(dev)
        if counts is None:
            self.counts[idx] = 0
        else:
            self.counts[idx] = torch.from_numpy(counts).to(dev)
        if req.restricted:
            self.reserve(allowed_mask=True)
            assert self.allowed is not None
            self.allowed[idx] = torch.from_numpy(req.allowed_row(self.vocab)).to(dev)
        elif self.allowed is not None:
            self.allowed[idx] = -1
        nb = req.bias_ids.size
        if nb:
            self.grow_bias(nb)
            assert self.bias_ids is not None and self.bias_vals is not None and self.bias_len is not None
            self.bias_ids[idx, :nb] = torch.from_numpy(req.bias_ids).to(dev)
            self.bias_vals[idx, :nb] = torch.from_numpy(req.bias_vals).to(dev)
            self.bias_len[idx] = nb
        elif self.bias_len is not None:
            self.bias_len[idx] = 0
        self.write_history(idx, req, history, history_total, history_start)
        ns = req.stop_ids.size
        if ns:
            self.grow_stops(ns)
        if self.stop_ids is not None and self.stop_mask is not None:
            e = self.eos.numel()
            row = np.full(self.stop_ids.shape[1], NO_TOKEN, dtype=np.int64)
            if not req.ignore_eos:
                row[:e] = self.eos.cpu().numpy()
            row[e:e + ns] = req.stop_ids
            self.stop_ids[idx] = torch.from_numpy(row).to(dev)
            self.stop_mask[idx] = torch.from_numpy(
                ids_to_bitmask([req.stop_ids.tolist() if req.stop_ban else ()], self.vocab)[0]).to(dev)


    @torch.inference_mode(False)
    def grow_stops(self, n: int) -> bool:
        """Make room for ``n`` stop ids per slot (allocating the stop tables at the first request with any; the slots
        filled before end on the EOS ids, unless they ignore EOS)."""
        e = self.eos.numel()
        cur = -1 if self.stop_ids is None else self.stop_ids.shape[1] - e
        if n <= cur:
            return False
        k = max(n, 2 * cur)
        ids = torch.full((self.slots, e + k), NO_TOKEN, dtype=torch.int64, device=self.device)
        if self.stop_ids is None:
            self.stop_mask = torch.zeros(self.slots, self.words, dtype=torch.int32, device=self.device)
            ign = self.iparams[:, I_IGNORE_EOS, None] != 0
            ids[:, :e] = torch.where(ign, NO_TOKEN, self.eos.to(torch.int64)[None, :])
        else:
            ids[:, :self.stop_ids.shape[1]] = self.stop_ids
        self.stop_ids = ids
        return True

    @torch.inference_mode(False)
    def reserve(self, *, allowed_mask: bool = False, logit_bias_entries: int = 0) -> bool:
        """Allocate the allowed-id bitmasks and room for ``logit_bias_entries`` bias entries per slot now."""
        grew = False
        if allowed_mask and self.allowed is None:
            self.allowed = torch.full((self.slots, self.words), -1, dtype=torch.int32, device=self.device)
            grew = True
        if logit_bias_entries > 0:
            grew |= self.grow_bias(int(logit_bias_entries))
        return grew

    @torch.inference_mode(False)
    def grow_bias(self, k: int) -> bool:
        """Make room for ``k`` bias entries per slot (at least doubling), keeping the entries already written."""
        cur = 0 if self.bias_ids is None else self.bias_ids.shape[1]
        if k <= cur:
            return False
        k = max(k, 2 * cur)
        ids = torch.zeros(self.slots, k, dtype=torch.int32, device=self.device)
        vals = torch.zeros(self.slots, k, dtype=torch.float32, device=self.device)
        if self.bias_ids is not None:
            assert self.bias_vals is not None
            ids[:, :cur] = self.bias_ids
            vals[:, :cur] = self.bias_vals
        else:
            self.bias_len = torch.zeros(self.slots, dtype=torch.int32, device=self.device)
        self.bias_ids, self.bias_vals = ids, vals
        return True

    def read(self, slot: int) -> tuple[int, int, float, np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Host copies of what a step changes or a request brought, for ``slot``: (seq, step, ``mu``, output counts
        ``(V,)`` int16, prompt bitmask ``(W,)`` int32, history (its last tokens, oldest first), history length in
        all, where the output starts in it). Reads the device (synchronises)."""
        hist, total = np.zeros(0, dtype=np.int64), int(self.hist_total[slot].item())
        if self.hist is not None:
            idx = torch.tensor([slot], device=self.device)
            seq = ordered_history(self.hist.index_select(0, idx), self.hist_total.index_select(0, idx))[0]
            hist = seq[seq >= 0].cpu().numpy().copy()
        return (int(self.seqs[slot].item()), int(self.steps[slot].item()), float(self.mu[slot].item()),
                self.counts[slot].cpu().numpy().copy(), self.prompt[slot].cpu().numpy().copy(), hist, total,
                int(self.hist_start[slot].item()))

    def advance(self, slots_t: torch.Tensor, steps: torch.Tensor, out: Any) -> None:
        """The state update after a step, on the device (`fastsampler._batch.advance_state`, and the history)."""
        advance_state(self.steps, self.mu, self.counts, slots_t, steps, out)
        self.advance_history(slots_t, out.tokens, out.valid)

    def bias_csr(self, slots_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logit bias of ``slots_t`` in CSR form, built on the device (no host sync), ``k`` entries per row."""
        assert self.bias_ids is not None and self.bias_vals is not None and self.bias_len is not None
        return bias_tables_to_csr(self.bias_ids, self.bias_vals, self.bias_len, slots_t, k, self.vocab)
