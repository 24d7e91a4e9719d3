"""The Triton backend: the whole pipeline of docs/semantics.md §3 over a `PackedBatch`, as a few Triton launches.

Backend-module interface of ``fastsampler._api``: `is_available`, `supports`, `sample_packed`,
`sampling_probs_packed`, `kept_mask_packed`.

A step launches Triton kernels only: no torch op runs on the device (the workspace -- per-row state, chunk partials,
small per-row scratch -- is one uninitialised allocation per step, and every kernel writes what a later one reads),
nothing is read back (no host synchronisation: CUDA-graph capturable), and the host decides what to launch from
`BatchFlags`, shapes and ``n_top`` alone. ``z`` is recomputed from the raw logits in registers by every pass that reads
the row (`penalties`: bias from the CSR, masks, penalties, DRY from its sparse per-row table, temperature). Two kinds
of kernels:

- row passes, a ``(B, NC)`` grid with one program per chunk of ids (1024 on CUDA whatever ``B``, so that a small
  batch fills the GPU and a row's rounding never depends on the batch);
- per-row kernels, one program per row: the combines of chunk partials (in a fixed order) and the selects, each a
  radix select that loops over its levels inside the program (`select.radix_select`).

The passes of a step, each only when some row needs it:

1. `stats._stats_kernel` (row pass): max / log-normaliser of ``z`` (and of the raw logits for raw logprobs), argmax
   (when some row is greedy), finite count, validity, per-chunk weights -- no random numbers; with top-n-sigma on
   some row also the mean / M2 of its finite ``z``, which `stats._combine_kernel` merges per row in a fixed order
   (float64) into ``sigma`` for the min-p stage's threshold;
2. without truncation, `draw._finish_kernel` (per row) directly: row statistics, tile race (§3 F), then the token
   race over the one winning tile (Philox once per four ids, §7: 4096 ids of the row read a second time), the
   token's logprob, Mirostat ``mu``, outputs. Plain and greedy steps: **2 launches**, one full read of the row.
   With dynamic temperature on some row (its kept set is every finite ``z``: the stats pass also leaves its entropy
   partials, `dyntemp`), `stats._combine_kernel` and `dyntemp._dyn_weights_kernel` (row pass: ``rho = T / T'`` and
   the weights at ``z' = z rho``) come before the finishing kernel: 4 launches;
3. with top-k or Mirostat v1 on some row and neither typical-p nor Mirostat v2 on any (the candidate engine,
   `candidates`): the stats pass also keeps per-group maxima, `stats._combine_kernel` (per row: row statistics and
   each candidate row's bound), `candidates._compact_kernel` (the ids at or above the bound, reading only the groups
   that can hold one) and `candidates._trunc_kernel` (per row: top-k, min_keep, top-p, min-p, Mirostat v1 on the
   sorted candidates, or the exact selects where they overflow or the row has no top-k; eta over the survivors and
   XTC's bound on the buffer or, on the fallback, from more passes; the dynamic temperature's ``rho`` from the kept
   set on the buffer, or on the fallback one pass; the kept tile weights, at ``z'`` with dynamic temperature), then
   `draw._finish_kernel`: one full read of the row; the logprobs kernel then reads only the groups that hold the
   rank's and the top-N's values;
4. other truncation (§3 E): `stats._combine_kernel` (per row: row statistics, min-p and Mirostat v2 thresholds, which
   need no select), then one `select._select_kernel` per rule that needs one (top-k; min_keep when combined with
   top-p / min-p; top-p), `mirostat._mirostat_v1_kernel` (top-100 select, gather, ``k`` in float64, ``k``-th select),
   `stats._entropy_kernel` + `select._typical_kernel` (typical-p), `stats._entropy_kernel` over the survivors +
   `select._eta_kernel` (eta: the survivors' entropy, its threshold, a select only for min_keep), then
   `stats._kept_kernel` (row pass: kept-set chunk weights, and with dynamic temperature the kept set's entropy
   partials), `xtc._xtc_kernel` (XTC on some row: per row, the coin, then for a row whose coin fires the bound
   ``zhi`` from one pass and the new kept weights from another; with dynamic temperature the kept pass runs again
   after it), `dyntemp._dyn_weights_kernel` (dynamic temperature: ``rho`` and the kept weights at ``z'``) and
   `draw._finish_kernel`;
5. `logprobs._logprobs_kernel` (per row) when some row wants logprobs: ranks and the top-N.

Launches of the backend per step (tests/test_triton_launches.py; a `Sampler` step with a tensor of slots adds none:
it passes its state tables with ``slot_index`` and ``update_state``, see `PackedBatch`): plain / greedy 2; top-k +
top-p + min-p 5; top-p alone 5; typical-p 6; Mirostat v1 5 (the candidate engine), v2 4; everything at once
(penalties, logit bias, top-k / top-p / min-p, top-5 logprobs) 6; min_keep > 1 next to top-p / min-p without top-k
adds one, logprobs add one. The extended samplers: top-n-sigma is a threshold of the min-p stage (no launch of its
own); eta adds two on the select path (eta + top-n-sigma 6) and none in the candidate engine (top-k + eta 5); XTC
adds one on the select path (XTC alone 5) and none in the candidate engine (top-k + XTC 5); dynamic temperature adds
one on the select path (top-p + dynamic temperature 6; two with XTC in the batch: XTC + dynamic temperature 7), two
on a batch without truncation (alone 4) and none in the candidate engine (top-k + dynamic temperature 5); DRY none
(its table comes with the batch). A batch whose rows use none of them launches exactly the kernels it did without
them (the flags compile their code out).

Tuning knobs (environment, read per call): ``FASTSAMPLER_TRITON_DIGIT_BITS`` (2, 4 or 8 key bits per select level;
default 4 on CUDA, 8 in the interpreter), ``FASTSAMPLER_TRITON_CHUNK`` (ids per program, a power of two dividing
4096; default 1024 on CUDA, 4096 in the interpreter) and ``FASTSAMPLER_TRITON_CANDIDATES`` (candidate slots per row
of `candidates`; default 512). Results are batch-invariant for fixed knobs; changing a knob
may change float rounding (tokens only at near-ties).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..._batch import PackedBatch
from ...layout import MIROSTAT_M, TILE
from ...output import SampleOutput
from .. import Capabilities

__all__ = ["CAPABILITIES", "is_available", "supports", "sample_packed", "sampling_probs_packed", "kept_mask_packed"]

# TILE (ids per tile of the two-level race, docs/semantics.md §3 F) is also the unit of work of every pass
MIROSTAT_TOP = 1 << (MIROSTAT_M - 1).bit_length()  # scratch per row for Mirostat v1's largest z (a power of two)
CAPABILITIES = Capabilities(devices=("cuda", "cpu"), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                            features=frozenset({"slot_index"}))


def is_available() -> tuple[bool, str]:
    """(True, "") when triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        return False, f"triton is not importable: {e}"
    return True, ""


# Ids per program of the row passes on CUDA. It must not depend on the batch size: per-chunk float partial sums
# (log-normalisers, tile weights, histogram masses) are combined in a fixed order, so a row's rounding -- and with it
# its token at a near-tie and its logprobs to the last bit -- would otherwise change with B (batch invariance). 1024
# ids split a 128K-vocabulary row over ~128 programs, enough to fill the GPU at B = 1.
CUDA_CHUNK = 1024


def _chunk(dev: torch.device) -> int:
    """Ids per program of the row passes (a power of two dividing the 4096-id tile); ``FASTSAMPLER_TRITON_CHUNK``
    overrides it (tests, tuning)."""
    env = os.environ.get("FASTSAMPLER_TRITON_CHUNK")
    if env:
        c = int(env)
        if c < 16 or c > TILE or TILE % c:
            raise ValueError(f"FASTSAMPLER_TRITON_CHUNK must be a power of two in [16, {TILE}], got {env}")
        return c
    return CUDA_CHUNK if dev.type == "cuda" else TILE


def _candidates() -> int:
    """Candidate slots per row of the candidate engine (`candidates`); ``FASTSAMPLER_TRITON_CANDIDATES`` overrides it
    (tests force the exact fallback with a small buffer)."""
    from .candidates import CAP

    env = os.environ.get("FASTSAMPLER_TRITON_CANDIDATES")
    if env:
        c = int(env)
        if c < 16 or c > 4096 or c & (c - 1):
            raise ValueError(f"FASTSAMPLER_TRITON_CANDIDATES must be a power of two in [16, 4096], got {env}")
        return c
    return CAP


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """float32 / float16 / bfloat16 logits on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return True
    return device.type == "cpu" and _interpret()


class _Ctx:
    """Everything the passes of one step share: the batch's tensors, sizes, specialisation flags, and the step's
    workspace (per-row state, chunk partials, small per-row scratch) carved out of one uninitialised allocation:
    every kernel writes what it later reads, so nothing is zero-filled and no torch op launches a kernel."""

    def __init__(self, batch: PackedBatch) -> None:
        from .candidates import GROUP
        from .logprobs import LP_CAP, LP_GROUPS
        from .penalties import NRF, NRI, PD, PF, PI, PX

        logits = batch.logits
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        fl = batch.flags
        self.batch = batch
        self.flags = fl
        self.device = dev = logits.device
        self.B, self.VC = b, vc = logits.shape
        self.V = int(batch.vocab_size)
        self.TILE = TILE
        self.NT = (vc + TILE - 1) // TILE  # tiles of the draw
        interp = dev.type != "cuda"
        self.CHUNK = _chunk(dev)  # ids per program of the row passes (TILE / 2^i)
        self.NC = nc = (vc + self.CHUNK - 1) // self.CHUNK
        self.BT = max(2, 1 << (nc - 1).bit_length())  # all chunks of a row in one block
        self.BT_TILES = max(2, 1 << (self.NT - 1).bit_length())
        self.interp = interp
        env_bits = os.environ.get("FASTSAMPLER_TRITON_DIGIT_BITS")
        self.DIGIT_BITS = int(env_bits) if env_bits else (8 if interp else 4)
        if self.DIGIT_BITS not in (2, 4, 8):
            raise ValueError(f"FASTSAMPLER_TRITON_DIGIT_BITS must be 2, 4 or 8, got {self.DIGIT_BITS}")
        self._vc2 = 1 << max(vc - 1, 1).bit_length()
        self.logits = logits
        self.fparams = batch.fparams.contiguous()
        self.iparams = batch.iparams.contiguous()
        self.seeds = batch.seeds.contiguous()
        self.steps = batch.steps.contiguous()
        self.seqs = batch.seqs.contiguous()
        self.mu = batch.mirostat_mu.to(torch.float32).contiguous()
        self.truncation = fl.any_truncation
        # Mirostat versions present (flags built without them: assume both)
        either = not (fl.any_mirostat_v1 or fl.any_mirostat_v2)
        self.miro_v1 = fl.any_mirostat and (fl.any_mirostat_v1 or either)
        self.miro_v2 = fl.any_mirostat and (fl.any_mirostat_v2 or either)
        self.n_top = int(batch.n_top)
        self.K = max(2, 1 << max(self.n_top - 1, 0).bit_length())  # top-N scratch width
        self.need_raw = fl.any_logprobs
        # the candidate engine (candidates.py): some row uses top-k or Mirostat v1, none typical-p or Mirostat v2
        self.cand = (fl.any_top_k or self.miro_v1) and not fl.any_typical and not self.miro_v2
        # ids per group maximum: about 512 groups or more per row (GROUP at most; a power of two dividing every
        # BLOCK), so that a small vocabulary still gets a bound finer than its size
        self.GROUP = min(GROUP, max(16, 1 << max(vc // 512, 1).bit_length() - 1), self.CHUNK, self._vc2)
        self.NG = (vc + self.GROUP - 1) // self.GROUP
        self.GBLOCK = max(16, min(1024, 1 << max(self.NG - 1, 1).bit_length()))
        self.CAP = _candidates()
        # logprobs of a candidate batch (logprobs.py): the raw logits' group maxima too (raw logprobs), and per row a
        # list of LP_GROUPS group indices and LP_CAP gathered (id, value) pairs
        self.lp_cand = self.cand and fl.any_logprobs
        lp_scratch = b * (LP_GROUPS + 2 * LP_CAP) if self.lp_cand else 0
        # the extended rules: top-n-sigma needs whole-row moments beyond the log-normaliser (stats.py's part_x
        # partials), eta the survivors' entropy (a pass and a per-row kernel on the select path, select._eta_kernel),
        # dynamic temperature the kept set's entropy (dyntemp.py's part_d partials) and rho = T / T' in rowf, XTC an
        # upper bound of the kept set (xtc.py, penalties.kept_mask bit 2), DRY the table of PackedBatch.dry_ids /
        # dry_vals
        self.nsigma = fl.any_nsigma
        self.dyn = fl.any_dynatemp
        self.xtc = fl.any_xtc
        self.has_dry = fl.any_dry and batch.dry_ids is not None and batch.dry_ids.shape[1] > 0
        # kept-set tests beyond z >= zlo (penalties.kept_mask): 1 typical-p, 2 XTC, 4 dynamic temperature (a kept
        # z' = z rho overflowing to -inf leaves the set)
        self.kept = (1 if fl.any_typical else 0) | (2 if self.xtc else 0) | (4 if self.dyn else 0)
        # the workspace, int32 words: rowf | rowi | part_f | part_i | Mirostat v1 scratch | top-N scratch | group
        # maxima of z (and of the raw logits) | candidate ids | candidate z | logprob scratch | top-n-sigma chunk
        # partials | dynamic-temperature chunk partials
        self.part_dyn = self.dyn and not self.cand
        sizes = [b * NRF, b * NRI, b * nc * PF, b * nc * PI, b * MIROSTAT_TOP if self.miro_v1 else 0,
                 3 * b * self.K if fl.any_logprobs else 0, (2 if self.lp_cand else 1) * b * self.NG if self.cand else 0,
                 b * self.CAP if self.cand else 0, b * self.CAP if self.cand else 0, lp_scratch,
                 b * nc * PX if self.nsigma else 0, b * nc * PD if self.part_dyn else 0]
        ws = torch.empty(max(1, sum(sizes)), dtype=torch.int32, device=dev)
        parts, o = [], 0
        for n in sizes:
            parts.append(ws[o:o + n])
            o += n
        f32 = torch.float32
        self.rowf = parts[0].view(f32).view(b, NRF)
        self.rowi = parts[1].view(b, NRI)
        self.part_f = parts[2].view(f32)
        self.part_i = parts[3]
        self.miro_top = parts[4].view(f32) if self.miro_v1 else ws.view(f32)
        self.lp_val = parts[5][:b * self.K].view(f32) if fl.any_logprobs else ws.view(f32)
        self.lp_id = parts[5][b * self.K:] if fl.any_logprobs else ws
        self.gmax = parts[6].view(f32) if self.cand else ws.view(f32)  # (B, NG) z, then (B, NG) raw (lp_cand)
        self.lp_scratch = parts[9] if self.lp_cand else ws
        self.cand_ids = parts[7] if self.cand else ws
        self.cand_z = parts[8].view(f32) if self.cand else ws.view(f32)
        dummy_i, dummy_f = ws, ws.view(f32)  # never read: the kernels are specialised without them
        self.part_x = parts[10].view(f32) if self.nsigma else dummy_f
        self.part_d = parts[11].view(f32) if self.part_dyn else dummy_f
        if self.has_dry:
            self.dry_ids = batch.dry_ids.to(device=dev, dtype=torch.int32).contiguous()
            self.dry_vals = batch.dry_vals.to(device=dev, dtype=torch.float32).contiguous()
            if self.dry_ids.shape != (b, self.dry_ids.shape[1]) or self.dry_vals.shape != self.dry_ids.shape:
                raise ValueError(f"dry_ids / dry_vals must be (B, K) = ({b}, K) tables, got "
                                 f"{tuple(self.dry_ids.shape)} and {tuple(self.dry_vals.shape)}")
        else:
            self.dry_ids, self.dry_vals = dummy_i, dummy_f
        # slot-indexed mode (PackedBatch.slot_index): the per-slot tables are the Sampler's own, row r reads row
        # slot_index[r] of each (penalties.slot_row), and with update_state the step's last per-row kernel writes the
        # Sampler's state update into them in place (penalties.update_slot_state)
        self.slot_mode = batch.slot_index is not None
        self.slots = batch.slot_index.contiguous() if self.slot_mode else dummy_i
        self.update = self.slot_mode and batch.update_state
        if self.update:  # written in place: must be the tables themselves, not converted copies
            for name, t, dt in (("steps", batch.steps, torch.int64),
                                ("mirostat_mu", batch.mirostat_mu, torch.float32)):
                if t.dtype != dt or not t.is_contiguous():
                    raise ValueError(f"update_state needs {name} as a contiguous {dt} table, got {t.dtype}")
            if batch.output_counts is None or batch.output_counts.stride(1) != 1:
                raise ValueError("update_state needs output_counts (a table with unit column stride)")
        self.has_tbm = batch.token_bitmask is not None
        self.tbm = batch.token_bitmask.contiguous() if self.has_tbm else dummy_i
        # logit bias: per-slot tables (ids ascending within each slot's first len entries) or a CSR (sorted ids per
        # row), applied in the kernels
        self.bias_table = batch.bias_table_ids is not None
        if self.bias_table:
            self.has_bias = batch.bias_table_ids.shape[1] > 0
            indptr, ids, vals = batch.bias_table_len, batch.bias_table_ids, batch.bias_table_vals
        else:
            self.has_bias = batch.bias_ids is not None and batch.bias_ids.numel() > 0
            indptr, ids, vals = batch.bias_indptr, batch.bias_ids, batch.bias_vals
        if self.has_bias:
            self.bias_indptr = indptr.to(device=dev, dtype=torch.int32).contiguous()
            self.bias_ids = ids.to(device=dev, dtype=torch.int32).contiguous()
            self.bias_vals = vals.to(device=dev, dtype=torch.float32).contiguous()
        else:
            self.bias_indptr, self.bias_ids, self.bias_vals = dummy_i, dummy_i, dummy_f
        # EOS ban: step < min_tokens or ignore_eos (decided per row in the kernels)
        self.E = int(batch.eos_ids.numel())
        self.has_eos = self.E > 0 and fl.any_eos_rule
        self.eos = batch.eos_ids.to(device=dev, dtype=torch.int32).contiguous() if self.has_eos else dummy_i
        # penalties and masks
        self.has_counts = fl.any_penalty and batch.output_counts is not None
        self.has_prompt = fl.any_penalty and batch.prompt_mask is not None
        # (the counts table also when only the state update writes it)
        self.counts = batch.output_counts if batch.output_counts is not None else dummy_i
        if self.counts.stride(-1) != 1:
            self.counts = self.counts.contiguous()
        self.prompt = batch.prompt_mask.contiguous() if self.has_prompt else dummy_i
        self.has_allowed = batch.allowed_mask is not None
        self.allowed = batch.allowed_mask.contiguous() if self.has_allowed else dummy_i
        # given tokens (PackedBatch.forced_tokens, row-indexed): the finishing kernel takes them instead of drawing
        self.forced = None
        if batch.forced_tokens is not None:
            if self.slot_mode:
                raise ValueError("forced_tokens needs a row-indexed batch (gathered() first)")
            self.forced = batch.forced_tokens.to(device=dev, dtype=torch.int64).contiguous()

    # ids per loop step, from the device type (read when launching: a cost model may switch ``interp`` off to get
    # the CUDA sizes on the CPU)
    @property
    def BLOCK(self) -> int:
        """Of the (B, NC) passes: one step per program on CUDA."""
        return min(self.CHUNK, self._vc2) if self.interp else min(self.CHUNK, 1024)

    @property
    def BLOCK2(self) -> int:
        """Of the token race in the finishing kernel, whose (BLOCK2 / 4, 4) blocks hold four ids per Philox
        counter."""
        return max(16, self.BLOCK)

    @property
    def ROW_WARPS(self) -> int:
        """Warps per program of the (B, NC) row passes: one on CUDA (32 ids per thread, warp-only reductions; see
        `stats`), Triton's default elsewhere."""
        return 4 if self.interp else 1

    @property
    def SBLOCK(self) -> int:
        """Of the one-program-per-row selects: the one-hot histogram block SBLOCK x 2^DIGIT_BITS stays in
        registers (256 x 16 on CUDA)."""
        return self.BLOCK if self.interp else max(16, min(self.BLOCK, 4096 >> self.DIGIT_BITS))

    # kernel argument groups shared by every row pass (see penalties.row_scalars / row_z)
    def zargs(self):
        return (self.logits, self.counts, self.prompt, self.allowed, self.tbm, self.eos, self.bias_indptr,
                self.bias_ids, self.bias_vals, self.dry_ids, self.dry_vals, self.fparams, self.iparams, self.steps,
                self.slots)

    def zstrides(self):
        return (self.logits.stride(0), self.counts.stride(0) if self.batch.output_counts is not None else 0,
                self.prompt.stride(0) if self.has_prompt else 0, self.allowed.stride(0) if self.has_allowed else 0,
                self.tbm.stride(0) if self.has_tbm else 0,
                self.bias_ids.stride(0) if self.bias_table and self.has_bias else 0,
                self.dry_ids.shape[1] if self.has_dry else 0)

    def zsizes(self):
        return (self.V, self.VC, self.E, self.NC)

    def zsizes_row(self):
        return (self.V, self.VC, self.E)

    def zflags(self):
        return dict(HAS_BIAS=self.has_bias, HAS_COUNTS=self.has_counts, HAS_PROMPT=self.has_prompt,
                    HAS_ALLOWED=self.has_allowed, HAS_EOS=self.has_eos, SLOTS=self.slot_mode, HAS_TBM=self.has_tbm,
                    BIAS_TABLE=self.bias_table, HAS_DRY=self.has_dry, HAS_DYN=self.dyn)

    def outputs(self):
        """The step's output tensors, uninitialised (the kernels write every element)."""
        b, dev = self.B, self.device
        e = torch.empty
        return (e(b, dtype=torch.int64, device=dev), e(b, dtype=torch.int8, device=dev),
                e(b, dtype=torch.float32, device=dev), e(b, dtype=torch.int64, device=dev),
                e((b, self.n_top), dtype=torch.int64, device=dev), e((b, self.n_top), dtype=torch.float32, device=dev),
                e(b, dtype=torch.float32, device=dev))


def _run(batch: PackedBatch):
    """Stages A–F: the launches of one step (host control flow on `BatchFlags` only). Returns the context and the
    output tensors (tokens, valid int8, logprobs, ranks, top ids, top logprobs, mu)."""
    from .candidates import compact_pass, trunc_pass
    from .draw import finish
    from .dyntemp import dyn_pass
    from .mirostat import mirostat_v1_pass
    from .select import STAGE_MIN_KEEP, STAGE_TOP_K, STAGE_TOP_P, eta_pass, select_pass, typical_pass
    from .stats import combine_pass, entropy_pass, kept_pass, stats_pass
    from .xtc import xtc_pass

    ctx = _Ctx(batch)
    out = ctx.outputs()
    fl = ctx.flags
    stats_pass(ctx)
    if ctx.cand:
        # top-k / min_keep / top-p / min-p on a buffer of candidates (candidates.py): two full reads of the row
        combine_pass(ctx, minp=False)
        compact_pass(ctx)
        trunc_pass(ctx)
    elif ctx.truncation:
        # stage E (docs/semantics.md §3 E): a select per rule that some row uses, in the rules' order
        mk_select = fl.any_min_keep and (fl.any_top_p or fl.any_min_p)
        combine_pass(ctx, minp=fl.any_min_p and not mk_select)
        if fl.any_top_k:
            select_pass(ctx, STAGE_TOP_K)
        if mk_select:
            select_pass(ctx, STAGE_MIN_KEEP, fold_minp=fl.any_min_p)
        if fl.any_top_p:
            select_pass(ctx, STAGE_TOP_P)
        if ctx.miro_v1:
            mirostat_v1_pass(ctx)
        if fl.any_typical:
            entropy_pass(ctx)
            typical_pass(ctx)
        if fl.any_eta:
            entropy_pass(ctx, eta=True)  # the survivors' entropy, then eta's threshold
            eta_pass(ctx)
        kept_pass(ctx, ctx.kept & 1, dyn=ctx.dyn and not ctx.xtc)  # the kept set before XTC
        if ctx.xtc:
            xtc_pass(ctx)
            if ctx.dyn:  # the final kept set's weights again, with its dynamic-temperature partials
                kept_pass(ctx, ctx.kept & 3, dyn=True)
        if ctx.dyn:
            dyn_pass(ctx)  # rho and the kept weights at z' = z rho
    elif ctx.dyn:
        # no truncation: the kept set is every finite z, whose entropy partials the stats pass left; the row
        # statistics are combined first (the finishing kernel would otherwise do it from the weights it draws from)
        combine_pass(ctx, minp=False)
        dyn_pass(ctx)
    finish(ctx, out)
    return ctx, out


def sample_packed(batch: PackedBatch) -> SampleOutput:
    """Sample one token per row of a packed batch; see ``fastsampler.sample``.

    Returns a `SampleOutput` of torch tensors on the logits' device: tokens (B,) int64, valid (B,) bool, logprobs
    (B,) float32, top_logprob_ids (B, N) int64, top_logprobs (B, N) float32, ranks (B,) int64, mirostat_mu (B,)
    float32.
    """
    from .logprobs import logprobs_pass

    ctx, (tokens, valid, logprobs, ranks, top_ids, top_lps, mu_out) = _run(batch)
    if ctx.flags.any_logprobs:
        logprobs_pass(ctx, ranks, top_ids, top_lps)
    return SampleOutput(tokens=tokens, valid=valid.view(torch.bool), logprobs=logprobs, top_logprob_ids=top_ids,
                        top_logprobs=top_lps, ranks=ranks, mirostat_mu=mu_out)


def sampling_probs_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) float32: each row's drawing distribution (zero outside the kept set, one-hot for greedy rows, zero for
    invalid rows)."""
    from .probs import probs_pass

    ctx, _ = _run(dataclasses.replace(batch, update_state=False))  # a query: the slots' state stays as it is
    out = torch.empty((ctx.B, ctx.VC), dtype=torch.float32, device=ctx.device)
    probs_pass(ctx, out)
    return out


def kept_mask_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) bool on the logits' device: True exactly on each row's kept set after truncation (docs/semantics.md
    §3 E; the set ``sampling_probs`` is supported on), the argmax alone for greedy rows, all False for invalid rows
    and for padding columns (``>= vocab_size``).

    Computed from the kept test itself, not from the probabilities: a kept token far below the row's maximum has
    float32 probability 0 but is kept.
    """
    from .probs import kept_mask_pass

    ctx, _ = _run(dataclasses.replace(batch, update_state=False))  # a query: the slots' state stays as it is
    out = torch.empty((ctx.B, ctx.VC), dtype=torch.int8, device=ctx.device)
    kept_mask_pass(ctx, out)
    return out.view(torch.bool)
