"""The Triton backend: the whole pipeline of docs/semantics.md §3 over a `PackedBatch`, as a sequence of Triton passes.

Backend-module interface of ``fastsampler._api``: `is_available`, `supports`, `sample_packed`,
`sampling_probs_packed`, `kept_mask_packed`.

Passes over the rows (each a ``(B, NC)`` grid, one program per chunk of ids -- 1024 on CUDA whatever ``B``, so that
small batches fill the GPU and a row's rounding never depends on the batch; ``z`` recomputed from the raw logits in
registers), with per-row combines in one-program-per-row kernels and O(B)-sized torch ops on the device (no host
synchronisation anywhere: CUDA-graph capturable; host control flow only on `BatchFlags`, shapes and ``n_top``):

1. stats: max / log-normaliser of ``z`` (and of the raw logits for raw logprobs), argmax, validity, per-tile
   weights of all finite ``z`` (the draw's tile weights when the batch has no truncation);
2. thresholds, each a radix select (`select`) of at most ``32 / DIGIT_BITS`` passes (a row stops reading once its
   threshold is resolved), only for what the batch uses:
   top-k, min_keep, top-p, (min-p needs none), typical-p (one entropy pass + selects on ``s``), mirostat v1 (top-100
   select + gather + one select); mirostat v2 needs none;
3. kept weights (only with truncation, only rows that truncate): per-tile weights of the kept set;
4. draw: the tile race, then the token race inside one tile (`draw`);
5. logprobs (only when asked): a rank pass, and for top-N a select + one gather pass (`logprobs`).

Tuning knobs (environment, read per call): ``FASTSAMPLER_TRITON_DIGIT_BITS`` (2, 4 or 8 key bits per select level;
default 4 on CUDA, 8 in the interpreter) and ``FASTSAMPLER_TRITON_CHUNK`` (ids per program, a power of two dividing
4096; default 1024 on CUDA, 4096 in the interpreter). Results are batch-invariant for fixed knobs; changing a knob
may change float rounding (tokens only at near-ties).
"""

from __future__ import annotations

import math
import os

import torch

from .._batch import (
    F_MIN_P,
    F_MIRO_ETA,
    F_MIRO_TAU,
    F_TEMPERATURE,
    F_TOP_P,
    F_TYPICAL_P,
    I_IGNORE_EOS,
    I_LOGPROBS,
    I_LOGPROBS_MODE,
    I_MIN_KEEP,
    I_MIN_TOKENS,
    I_MIRO_MODE,
    I_TOP_K,
    I_TOP_LOGPROBS,
    MODE_FINAL,
    MODE_RAW,
    NF,
    PackedBatch,
)
from ..output import SampleOutput
from .penalties import (
    NRF,
    NRI,
    RF_DOM_LO,
    RF_LS,
    RF_LS_KEPT,
    RF_LS_RAW,
    RF_M,
    RF_M_KEPT,
    RF_M_RAW,
    RF_RAWX,
    RF_STHR,
    RF_ZLO,
    RF_ZX,
    RI_BAN_EOS,
    RI_BIAS_SLOT,
    RI_GID,
    RI_LP_MODE,
    RI_NFIN,
    RI_TOKEN,
    RI_VALID,
)

__all__ = ["is_available", "supports", "sample_packed", "sampling_probs_packed", "kept_mask_packed"]

TILE = 4096  # ids per tile of the two-level race (docs/semantics.md §3 F); also the unit of work of every pass
MIROSTAT_M = 100  # Mirostat v1 estimates s from the 100 most probable tokens
LN2 = math.log(2.0)


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
    """Everything the passes share: the batch's tensors, sizes, specialisation flags and per-row state."""

    def __init__(self, batch: PackedBatch) -> None:
        from .select import KIND_LP  # noqa: F401  (import kernels lazily, after TRITON_INTERPRET is set)

        logits = batch.logits
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        self.batch = batch
        self.flags = batch.flags
        self.device = dev = logits.device
        self.B, self.VC = logits.shape
        self.V = int(batch.vocab_size)
        self.TILE = TILE
        self.NT = (self.VC + TILE - 1) // TILE  # tiles of the draw
        interp = dev.type != "cuda"
        self.CHUNK = _chunk(dev)  # ids per program of the row passes (TILE / 2^i)
        self.NC = (self.VC + self.CHUNK - 1) // self.CHUNK
        self.BT = max(2, 1 << (self.NC - 1).bit_length())  # all chunks of a row in one block
        self.BT_TILES = max(2, 1 << (self.NT - 1).bit_length())
        self.NF = NF
        self.F_TEMPERATURE = F_TEMPERATURE
        self.interp = interp
        env_bits = os.environ.get("FASTSAMPLER_TRITON_DIGIT_BITS")
        self.DIGIT_BITS = int(env_bits) if env_bits else (8 if interp else 4)
        if self.DIGIT_BITS not in (2, 4, 8):
            raise ValueError(f"FASTSAMPLER_TRITON_DIGIT_BITS must be 2, 4 or 8, got {self.DIGIT_BITS}")
        vc2 = 1 << max(self.VC - 1, 1).bit_length()
        self.BLOCK = min(self.CHUNK, vc2) if interp else min(self.CHUNK, 1024)
        self.logits = logits
        self.fparams = batch.fparams.contiguous()
        self.iparams = batch.iparams.contiguous()
        self.seeds = batch.seeds.contiguous()
        self.steps = batch.steps.contiguous()
        self.seqs = batch.seqs.contiguous()
        self._dummy = torch.zeros(1, dtype=torch.int32, device=dev)
        fl = batch.flags
        b = self.B
        rowi = torch.zeros((b, NRI), dtype=torch.int32, device=dev)
        rowi[:, RI_GID] = -1
        rowi[:, RI_BIAS_SLOT] = -1
        rowi[:, RI_LP_MODE] = self.iparams[:, I_LOGPROBS_MODE]
        # logit bias: a float32 row per row that has one (rows without a bias read nothing)
        self.bias = self._dummy
        self.stride_b = 0
        nnz = 0 if batch.bias_ids is None else int(batch.bias_ids.numel())
        if nnz > 0:
            indptr = batch.bias_indptr.to(torch.int64)
            has = (indptr[1:] - indptr[:-1]) > 0
            slot = torch.cumsum(has.to(torch.int32), 0, dtype=torch.int32) - 1
            rowi[:, RI_BIAS_SLOT] = torch.where(has, slot, -1)
            nslots = min(b, nnz)
            self.bias = torch.zeros((nslots, self.VC), dtype=torch.float32, device=dev)
            entry_row = torch.searchsorted(indptr, torch.arange(nnz, device=dev), right=True) - 1
            self.bias[slot.to(torch.int64)[entry_row], batch.bias_ids.to(torch.int64)] = batch.bias_vals.to(
                torch.float32)
            self.stride_b = self.VC
        self.has_bias = nnz > 0
        # EOS ban: step < min_tokens or ignore_eos
        self.E = int(batch.eos_ids.numel())
        self.eos = batch.eos_ids.to(device=dev, dtype=torch.int32).contiguous() if self.E else self._dummy
        self.has_eos = self.E > 0 and fl.any_eos_rule
        if self.has_eos:
            step32 = self.steps & 0xFFFFFFFF
            ban = (step32 < self.iparams[:, I_MIN_TOKENS].to(torch.int64)) | (self.iparams[:, I_IGNORE_EOS] != 0)
            rowi[:, RI_BAN_EOS] = ban.to(torch.int32)
        # penalties and masks
        self.has_counts = fl.any_penalty and batch.output_counts is not None
        self.has_prompt = fl.any_penalty and batch.prompt_mask is not None
        self.counts = batch.output_counts.contiguous() if self.has_counts else self._dummy
        self.prompt = batch.prompt_mask.contiguous() if self.has_prompt else self._dummy
        self.has_allowed = batch.allowed_mask is not None
        self.allowed = batch.allowed_mask.contiguous() if self.has_allowed else self._dummy
        self.has_typ = fl.any_typical
        self.need_raw = fl.any_logprobs
        self.rowi = rowi
        self.rowf = torch.zeros((b, NRF), dtype=torch.float32, device=dev)
        self.tile_w = None

    # kernel argument groups shared by every pass (see penalties.row_z)
    def zargs(self):
        return (self.logits, self.bias, self.counts, self.prompt, self.allowed, self.eos, self.fparams, self.rowi)

    def zstrides(self):
        return (self.logits.stride(0), self.stride_b, self.counts.stride(0) if self.has_counts else 0,
                self.prompt.stride(0) if self.has_prompt else 0, self.allowed.stride(0) if self.has_allowed else 0)

    def zsizes(self):
        return (self.V, self.VC, self.E, self.NC)

    def zflags(self):
        return dict(HAS_BIAS=self.has_bias, HAS_COUNTS=self.has_counts, HAS_PROMPT=self.has_prompt,
                    HAS_ALLOWED=self.has_allowed, HAS_EOS=self.has_eos)

    def block_for(self, nb: int) -> int:
        """Ids per step of a histogram pass (the one-hot block is BLOCK x nb)."""
        if self.interp:
            return self.BLOCK
        return max(16, min(self.BLOCK, 4096 // nb))  # 256 x 16 buckets: the one-hot tiles stay in registers

    def empty(self, shape, kind: str) -> torch.Tensor:
        dt = {"f": torch.float32, "i": torch.int32}[kind]
        return torch.empty(shape, dtype=dt, device=self.device)


def _thresholds(ctx: _Ctx) -> None:
    """Stage E: fill ``rowf[:, RF_ZLO]`` (keep ``z >= zlo``) and ``rowf[:, RF_STHR]`` (typical: keep ``s <= sthr``)."""
    from .logprobs import top_values
    from .select import KIND_NEG_S, KIND_Z, radix_select
    from .stats import typical_entropy_pass

    fl = ctx.flags
    f, ip, rowf, rowi = ctx.fparams, ctx.iparams, ctx.rowf, ctx.rowi
    valid = rowi[:, RI_VALID] != 0
    samp = valid & (f[:, F_TEMPERATURE] > 0)
    nfin = rowi[:, RI_NFIN]
    m = rowf[:, RF_M].clone()
    ninf = torch.full_like(m, float("-inf"))
    zlo = ninf.clone()
    min_keep = ip[:, I_MIN_KEEP]
    rowf[:, RF_DOM_LO] = ninf
    if fl.any_top_k:
        k = ip[:, I_TOP_K]
        keff = torch.where(k > 0, torch.maximum(k, min_keep), 0)
        act = samp & (k > 0) & (keff < nfin)
        thr = radix_select(ctx, KIND_Z, keff, act)
        zlo = torch.where(act, thr, zlo)
    thr_mk = m
    if fl.any_min_keep and (fl.any_top_p or fl.any_min_p):
        act = samp & (min_keep > 1)
        thr_mk = torch.where(act, radix_select(ctx, KIND_Z, min_keep, act), m)
    if fl.any_top_p:
        p = f[:, F_TOP_P]
        act = samp & (p < 1.0)
        rowf[:, RF_DOM_LO] = zlo
        thr = radix_select(ctx, KIND_Z, p, act, mass=True)
        zlo = torch.where(act, torch.maximum(zlo, torch.minimum(thr, thr_mk)), zlo)
        rowf[:, RF_DOM_LO] = ninf
    if fl.any_min_p:
        mp = f[:, F_MIN_P]
        act = samp & (mp > 0.0)
        thr = m + torch.log(torch.where(act, mp, 1.0))
        zlo = torch.where(act, torch.maximum(zlo, torch.minimum(thr, thr_mk)), zlo)
    if fl.any_mirostat:
        mode = ip[:, I_MIRO_MODE]
        mu = ctx.batch.mirostat_mu.to(torch.float32)
        v2 = samp & (mode == 2)
        # keep ln q = (z - m) - ln s >= -mu ln 2, i.e. z >= m + (ln s - mu ln 2) (docs/semantics.md §3 E)
        thr2 = torch.minimum(m + (rowf[:, RF_LS] - mu * LN2), m)
        zlo = torch.where(v2, thr2, zlo)
        v1 = samp & (mode == 1)
        _, vals, _ = top_values(ctx, KIND_Z, torch.full_like(nfin, MIROSTAT_M), v1.to(torch.int32), MIROSTAT_M)
        k = _mirostat_v1_k(vals, mu, f[:, F_MIRO_TAU], ctx.V)
        act1 = v1 & (k < nfin)
        thr1 = radix_select(ctx, KIND_Z, k, act1)
        zlo = torch.where(act1, thr1, zlo)
    rowf[:, RF_ZLO] = zlo
    if fl.any_typical:
        tp = f[:, F_TYPICAL_P]
        act = samp & (tp < 1.0)
        typical_entropy_pass(ctx, act.to(torch.int32))
        s_sel = -radix_select(ctx, KIND_NEG_S, tp, act, mass=True)
        sthr = s_sel
        if fl.any_min_keep:
            act_mk = act & (min_keep > 1)
            s_mk = -radix_select(ctx, KIND_NEG_S, min_keep, act_mk)
            sthr = torch.where(act_mk, torch.maximum(s_sel, s_mk), s_sel)
        rowf[:, RF_STHR] = torch.where(act, sthr, float("inf"))


def _mirostat_v1_k(vals: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor, n_vocab: int) -> torch.Tensor:
    """Mirostat v1 ``k`` (B,) int32 from the row's 100 largest ``z`` (descending, ``-inf`` past the finite ones)."""
    del tau
    z = vals.to(torch.float64)
    m = z.shape[1]
    i = torch.arange(m - 1, device=z.device, dtype=torch.float64)
    t = torch.log((i + 2.0) / (i + 1.0))
    pair = z[:, 1:] > float("-inf")
    b = torch.where(pair, z[:, :-1] - torch.where(pair, z[:, 1:], 0.0), 0.0)
    num = (torch.where(pair, t * b, 0.0)).sum(1)
    den = (torch.where(pair, t * t, 0.0)).sum(1)
    s = num / den
    eps = s - 1.0
    mu64 = mu.to(torch.float64)
    n = float(n_vocab)
    two_mu = torch.pow(2.0, mu64)
    k_gen = torch.pow((eps * two_mu) / (1.0 - torch.pow(torch.full_like(eps, n), -eps)), 1.0 / s)
    k_lim = torch.pow(two_mu / math.log(n), 1.0 / s) if n > 1 else torch.full_like(s, float("inf"))
    k = torch.where(eps.abs() < 1e-6, k_lim, k_gen)
    k = torch.where(torch.isnan(k), n, k)
    k = torch.clamp(torch.floor(k), 1.0, n)
    return k.to(torch.int32)


def _run(batch: PackedBatch) -> _Ctx:
    """Stages A–F: fills the per-row state of a context (tokens in ``rowi[:, RI_TOKEN]``)."""
    from .draw import draw
    from .stats import kept_weights_pass, stats_pass

    ctx = _Ctx(batch)
    stats_pass(ctx)
    if ctx.flags.any_truncation:
        _thresholds(ctx)
        rowf = ctx.rowf
        trunc = (rowf[:, RF_ZLO] > float("-inf")) | (rowf[:, RF_STHR] < float("inf"))
        active = (ctx.rowi[:, RI_VALID] != 0) & (ctx.fparams[:, F_TEMPERATURE] > 0) & trunc
        kept_weights_pass(ctx, active.to(torch.int32))
    draw(ctx)
    return ctx


def sample_packed(batch: PackedBatch) -> SampleOutput:
    """Sample one token per row of a packed batch; see ``fastsampler.sample``.

    Returns a `SampleOutput` of torch tensors on the logits' device: tokens (B,) int64, valid (B,) bool, logprobs
    (B,) float32, top_logprob_ids (B, N) int64, top_logprobs (B, N) float32, ranks (B,) int64, mirostat_mu (B,)
    float32.
    """
    from .logprobs import KIND_LP, rank_pass, top_values

    ctx = _run(batch)
    b, dev = ctx.B, ctx.device
    rowi, rowf, f, ip = ctx.rowi, ctx.rowf, ctx.fparams, ctx.iparams
    valid = rowi[:, RI_VALID] != 0
    tokens = rowi[:, RI_TOKEN].to(torch.int64)
    greedy = f[:, F_TEMPERATURE] == 0.0
    n_top = int(batch.n_top)
    nan = float("nan")
    logprobs = torch.full((b,), nan, dtype=torch.float32, device=dev)
    ranks = torch.full((b,), -1, dtype=torch.int64, device=dev)
    top_ids = torch.full((b, n_top), -1, dtype=torch.int64, device=dev)
    top_lps = torch.full((b, n_top), nan, dtype=torch.float32, device=dev)
    if ctx.flags.any_logprobs:
        lp_on = (ip[:, I_LOGPROBS] != 0) & valid
        mode = ip[:, I_LOGPROBS_MODE]
        # lp = (x - m) - ln s with (m, ln s) the mode's log-normaliser; x - (m + ln s) would lose ln s once |x| is
        # above ~1e8 in float32 (docs/semantics.md §6)
        m_mode = torch.where(mode == MODE_RAW, rowf[:, RF_M_RAW],
                             torch.where(mode == MODE_FINAL, rowf[:, RF_M_KEPT], rowf[:, RF_M]))
        ls_mode = torch.where(mode == MODE_RAW, rowf[:, RF_LS_RAW],
                              torch.where(mode == MODE_FINAL, rowf[:, RF_LS_KEPT], rowf[:, RF_LS]))
        vx = torch.where(mode == MODE_RAW, rowf[:, RF_RAWX], rowf[:, RF_ZX])
        final_greedy = (mode == MODE_FINAL) & greedy
        lp = torch.where(final_greedy, 0.0, (vx - m_mode) - ls_mode)
        logprobs = torch.where(lp_on, lp, nan)
        rk = rank_pass(ctx, lp_on.to(torch.int32))
        ranks = torch.where(lp_on, rk, -1)
        if n_top > 0:
            ntop = ip[:, I_TOP_LOGPROBS]
            act = lp_on & (ntop > 0)
            ids, vals, _ = top_values(ctx, KIND_LP, ntop, act.to(torch.int32), n_top)
            tl_ = (vals - m_mode[:, None]) - ls_mode[:, None]
            tl_ = torch.where(final_greedy[:, None], torch.where(vals > float("-inf"), 0.0, float("-inf")), tl_)
            top_ids = ids
            top_lps = torch.where(ids >= 0, tl_, nan)
    mu_in = batch.mirostat_mu.to(torch.float32)
    mu_out = mu_in.clone()
    if ctx.flags.any_mirostat:
        upd = valid & ~greedy & (ip[:, I_MIRO_MODE] != 0)
        # -log2 q'[x] with ln q'[x] = (z_x - m) - ln s over the kept set (docs/semantics.md §3 E, update)
        surprise = -((rowf[:, RF_ZX] - rowf[:, RF_M_KEPT]) - rowf[:, RF_LS_KEPT]) / LN2
        new = mu_in - f[:, F_MIRO_ETA] * (surprise - f[:, F_MIRO_TAU])
        mu_out = torch.where(upd, new, mu_in)
    return SampleOutput(tokens=tokens, valid=valid, logprobs=logprobs, top_logprob_ids=top_ids,
                        top_logprobs=top_lps, ranks=ranks, mirostat_mu=mu_out)


def sampling_probs_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) float32: each row's drawing distribution (zero outside the kept set, one-hot for greedy rows, zero for
    invalid rows)."""
    from .probs import probs_pass

    ctx = _run(batch)
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

    ctx = _run(batch)
    out = torch.empty((ctx.B, ctx.VC), dtype=torch.int8, device=ctx.device)
    kept_mask_pass(ctx, out)
    return out.view(torch.bool)


# silence "imported but unused" for columns kept for readers of this module
_ = (F_MIN_P, F_TYPICAL_P, RF_DOM_LO, I_TOP_K, I_MIN_KEEP)
