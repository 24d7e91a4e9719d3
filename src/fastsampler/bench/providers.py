"""The samplers a benchmark run measures side by side.

Every provider turns a `CaseInputs` into a `Prepared` runner:

- ``run(i)`` samples one step from logits buffer ``i`` (what is timed);
- ``draw(step)`` samples from buffer 0 with the randomness of step ``step`` (the validity check);
- ``probs()`` returns the distribution the tokens of buffer 0 are drawn from, ``(B, V)`` float32, when the provider
  can expose it cheaply, else ``None``.

Providers:

``fastsampler-<backend>``
    A fastsampler backend on the steady-state engine path: the batch is packed once (`pack_batch`, penalty state as
    device tensors) and ``sample_packed`` of the backend module is timed; only the logits pointer changes per call.
``fastsampler-<backend>-api``
    The same backend through the functional `fastsampler.sample` (packing on every call, host work included).
``torch-sort``
    The classic sort-based sampler, written here from the algorithm: dense penalties, one full sort, top-k / top-p /
    min-p masks in sorted order, scatter back, softmax, exponential race (``argmax(p / Exp(1))``).
``torch-warpers``
    A composition of Hugging Face-style warpers as plain torch code: temperature, then top-k (``topk``), top-p (its own
    sort), min-p (softmax), typical (entropy and its own sort) or Mirostat v2, then ``softmax`` and
    ``torch.multinomial``.
``flashinfer``
    ``flashinfer.sampling`` kernels where importable (plain and top-k/top-p/min-p only).
``numpy-ref``
    `fastsampler.reference` (numpy, float64), CPU only and capped to small cases: it is written for clarity.

Both torch samplers cut with *value thresholds* (tokens tied at a boundary are kept together), as docs/semantics.md
§3 E defines the kept set, so their distributions equal the reference's and the validity check can hold them to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .scenarios import CaseInputs

__all__ = [
    "Prepared",
    "Provider",
    "NotApplicable",
    "FastsamplerProvider",
    "TorchSortProvider",
    "TorchWarpersProvider",
    "FlashInferProvider",
    "NumpyReferenceProvider",
    "BASELINES",
    "CAPPED",
    "build_providers",
]

# providers used as the denominators of the speedup columns, in column order
BASELINES = ("torch-sort", "torch-warpers", "flashinfer", "numpy-ref")


# the first word of the n/a note of a case above a provider's size cap (B * V): it could run, but was not timed
CAPPED = "capped"


class NotApplicable(Exception):  # a status, not an error
    """The provider cannot express this case (reported as ``n/a`` with the message)."""


@dataclass
class Prepared:
    run: Callable[[int], torch.Tensor]
    draw: Callable[[int], torch.Tensor]
    probs: Callable[[], torch.Tensor | None] = lambda: None
    host_only: bool = False  # CPU provider timed with the host clock even on a CUDA run


class Provider:
    """Base class: ``name``, ``is_baseline`` and ``prepare(inputs) -> Prepared`` (raise `NotApplicable`)."""

    name = "provider"
    is_baseline = False
    max_elements: int | None = None  # cases with B * V above this are n/a (slow providers on the CPU)

    @staticmethod
    def _no_history_rules(inp: CaseInputs) -> None:
        """A baseline without the history rules (n-gram, bad words, penalty window, DRY) does not apply to them."""
        if inp.scenario.history_rules:
            raise NotApplicable("no n-gram, bad-word, penalty-window or DRY rules")

    def _check_size(self, inp: CaseInputs) -> None:
        if self.max_elements and inp.batch * inp.vocab > self.max_elements:
            raise NotApplicable(f"{CAPPED}: B*V > {self.max_elements} on {inp.device.type} (too slow; see "
                                f"--baseline-max-elements / --ref-max-elements)")

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def prepare(self, inp: CaseInputs) -> Prepared:  # pragma: no cover - interface
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------- fastsampler
class FastsamplerProvider(Provider):
    """A fastsampler backend: pre-packed ``sample_packed`` (default) or the functional API (``api=True``)."""

    def __init__(self, backend: str, *, api: bool = False) -> None:
        self.backend = backend
        self.api = api
        self.name = f"fastsampler-{backend}" + ("-api" if api else "")

    def _module(self):
        from .. import backends

        return backends.load(self.backend)

    def available(self, device: torch.device) -> tuple[bool, str]:
        try:
            self._module()
        except ImportError as e:
            return False, str(e)
        return True, ""

    def prepare(self, inp: CaseInputs) -> Prepared:
        import fastsampler as _api

        from ..backends import pack_batch

        mod = self._module()
        if not mod.supports(inp.device, inp.dtype):
            raise NotApplicable(f"backend {self.backend!r} does not support {inp.dtype_name} on {inp.device.type}")
        seeds = torch.full((inp.batch,), inp.seed, dtype=torch.int64, device=inp.device)
        state = inp.state_kwargs()
        if self.api:
            steps0 = torch.zeros(inp.batch, dtype=torch.int64, device=inp.device)

            def run(i: int) -> torch.Tensor:
                return _api.sample(inp.buffers[i], inp.params, seeds=seeds, steps=steps0, backend=self.backend,
                                   **state).tokens

            def draw(step: int) -> torch.Tensor:
                steps = torch.full((inp.batch,), step, dtype=torch.int64, device=inp.device)
                return _api.sample(inp.buffers[0], inp.params, seeds=seeds, steps=steps, backend=self.backend,
                                   **state).tokens

            def probs() -> torch.Tensor:
                return _api.sampling_probs(inp.buffers[0], inp.params, seeds=seeds, backend=self.backend, **state)

            return Prepared(run, draw, probs)

        base = pack_batch(inp.buffers[0], inp.params, seeds=seeds, **state)
        packed = [dataclasses.replace(base, logits=buf) for buf in inp.buffers]

        def run(i: int) -> torch.Tensor:
            return mod.sample_packed(packed[i]).tokens

        def draw(step: int) -> torch.Tensor:
            steps = torch.full((inp.batch,), step, dtype=torch.int64, device=inp.device)
            fresh = dataclasses.replace(base, steps=steps, mirostat_mu=base.mirostat_mu.clone())
            return mod.sample_packed(fresh).tokens

        def probs() -> torch.Tensor:
            return mod.sampling_probs_packed(base)

        return Prepared(run, draw, probs)


# --------------------------------------------------------------------------------------------------- torch helpers
@dataclass
class _RowParams:
    """Per-row parameter columns, as an engine keeps them: (B, 1) tensors."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    typical_p: torch.Tensor
    mirostat_tau: torch.Tensor
    mirostat_eta: torch.Tensor
    mirostat_mu: torch.Tensor


def _row_params(inp: CaseInputs) -> _RowParams:
    p, b, dev = inp.params, inp.batch, inp.device

    def col(v: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.full((b, 1), v, dtype=dtype, device=dev)

    return _RowParams(
        temperature=col(p.temperature), top_k=col(p.top_k, torch.int64), top_p=col(p.top_p), min_p=col(p.min_p),
        typical_p=col(p.typical_p), mirostat_tau=col(p.mirostat_target), mirostat_eta=col(p.mirostat_lr),
        mirostat_mu=col(2.0 * p.mirostat_target),
    )


def _bias_and_dense_penalties(x: torch.Tensor, inp: CaseInputs, *, repetition: bool = True) -> torch.Tensor:
    """Stages A–C on a float32 copy ``x``: logit bias, repetition penalty (dense seen-mask), frequency / presence."""
    p = inp.params
    if inp.bias_ids is not None:
        x = x.scatter_add(1, inp.bias_ids, inp.bias_vals)  # out of place: ``x`` may be the caller's fp32 logits
    if inp.output_counts is None:
        return x
    counts = inp.output_counts
    seen = counts > 0
    if repetition and p.repetition_penalty != 1.0:
        r = p.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        x = x - counts.to(torch.float32) * p.frequency_penalty - seen.to(torch.float32) * p.presence_penalty
    return x


def _top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Raw logprobs: the sampled token's, the top ``n`` and the rank (as docs/semantics.md §3 E defines them)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = lp.gather(1, tokens[:, None])
    top = lp.topk(n, dim=-1) if n > 0 else None
    rank = 1 + (lp > tok_lp).sum(-1)
    return tok_lp, top, rank


def _race(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """Exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` draws exactly from ``p``."""
    q = torch.empty_like(probs).exponential_(1.0, generator=gen)
    return probs.div_(q).argmax(dim=-1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------------------------------- torch-sort
class TorchSortProvider(Provider):
    """Sort-based sampler: one sort of the row, masks in sorted order, scatter back, softmax, exponential race."""

    name = "torch-sort"
    is_baseline = True

    def __init__(self, max_elements: int | None = None) -> None:
        self.max_elements = max_elements

    def prepare(self, inp: CaseInputs) -> Prepared:
        p = inp.params
        self._no_history_rules(inp)
        if p.mirostat_mode:
            raise NotApplicable("no Mirostat in the sort-based path")
        if p.typical_p < 1.0:
            raise NotApplicable("no typical-p in the sort-based path")
        self._check_size(inp)
        rp = _row_params(inp)
        neg_inf = float("-inf")

        def masked(logits: torch.Tensor) -> torch.Tensor:
            """Processed and truncated logits z (``-inf`` outside the kept set), vocabulary order."""
            x = _bias_and_dense_penalties(logits.float(), inp)
            if p.greedy:
                return x
            x = x / rp.temperature
            if p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0.0:
                return x
            srt, idx = x.sort(dim=-1, descending=True)
            if p.top_k > 0:
                kth = srt.gather(1, (rp.top_k - 1).clamp(max=inp.vocab - 1))
                srt = srt.masked_fill(srt < kth, neg_inf)
            if p.top_p < 1.0:
                cum = srt.softmax(dim=-1).cumsum(dim=-1)
                cut = (cum < rp.top_p).sum(dim=-1, keepdim=True).clamp(max=inp.vocab - 1)
                srt = srt.masked_fill(srt < srt.gather(1, cut), neg_inf)
            if p.min_p > 0.0:
                srt = srt.masked_fill(srt < srt[:, :1] + torch.log(rp.min_p), neg_inf)
            return torch.empty_like(x).scatter_(1, idx, srt)

        def sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            z = masked(logits)
            tokens = z.argmax(dim=-1) if p.greedy else _race(z.softmax(dim=-1), gen)
            if p.logprobs:
                _top_logprobs(logits, tokens, p.top_logprobs)
            return tokens

        gen = _generator(inp.device, inp.seed)

        def draw(step: int) -> torch.Tensor:
            return sample(inp.buffers[0], _generator(inp.device, inp.seed + 1 + step))

        def probs() -> torch.Tensor:
            z = masked(inp.buffers[0])
            if p.greedy:
                return torch.nn.functional.one_hot(z.argmax(-1), inp.vocab).float()
            return z.softmax(dim=-1)

        return Prepared(lambda i: sample(inp.buffers[i], gen), draw, probs)


# --------------------------------------------------------------------------------------------------- torch-warpers
class TorchWarpersProvider(Provider):
    """Hugging Face-style warpers in sequence, each over the whole vocabulary, then ``torch.multinomial``."""

    name = "torch-warpers"
    is_baseline = True

    def warp(self, scores: torch.Tensor, inp: CaseInputs, rp: _RowParams) -> torch.Tensor:
        """Temperature, then each enabled warper; returns scores with ``-inf`` outside the kept set."""
        p = inp.params
        neg_inf = float("-inf")
        scores = scores / rp.temperature
        if p.top_k > 0:
            kth = scores.topk(min(p.top_k, inp.vocab), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, neg_inf)
        if p.top_p < 1.0:
            srt = scores.sort(dim=-1, descending=True).values
            cum = srt.softmax(dim=-1).cumsum(dim=-1)
            cut = (cum < rp.top_p).sum(dim=-1, keepdim=True).clamp(max=inp.vocab - 1)
            scores = scores.masked_fill(scores < srt.gather(1, cut), neg_inf)
        if p.min_p > 0.0:
            probs = scores.softmax(dim=-1)
            scores = scores.masked_fill(probs < rp.min_p * probs.amax(dim=-1, keepdim=True), neg_inf)
        if p.typical_p < 1.0:
            logq = scores.log_softmax(dim=-1)
            q = logq.exp()
            ent = -(q * logq).nansum(dim=-1, keepdim=True)
            surprise = (-logq - ent).abs()
            s_srt, s_idx = surprise.sort(dim=-1)
            cum = q.gather(1, s_idx).cumsum(dim=-1)
            cut = (cum < rp.typical_p).sum(dim=-1, keepdim=True).clamp(max=inp.vocab - 1)
            scores = scores.masked_fill(surprise > s_srt.gather(1, cut), neg_inf)
        if p.mirostat_mode == 2:
            probs = scores.softmax(dim=-1)
            thr = torch.minimum(torch.exp2(-rp.mirostat_mu), probs.amax(dim=-1, keepdim=True))
            scores = scores.masked_fill(probs < thr, neg_inf)
        return scores

    def __init__(self, max_elements: int | None = None) -> None:
        self.max_elements = max_elements

    def prepare(self, inp: CaseInputs) -> Prepared:
        p = inp.params
        self._no_history_rules(inp)
        if p.mirostat_mode == 1:
            raise NotApplicable("Mirostat v1 is not written for the warpers composition")
        self._check_size(inp)
        rp = _row_params(inp)

        def processed(logits: torch.Tensor) -> torch.Tensor:
            scores = logits.float()  # the same tensor for fp32 logits: every update below is out of place
            if inp.bias_ids is not None:
                scores = scores.scatter_add(1, inp.bias_ids, inp.bias_vals)
            if inp.history_ids is not None and p.repetition_penalty != 1.0:
                # repetition penalty on the history ids (gather / scatter, as the HF processor does)
                r = p.repetition_penalty
                seen = scores.gather(1, inp.history_ids)
                scores = scores.scatter(1, inp.history_ids, torch.where(seen < 0, seen * r, seen / r))
            if inp.output_counts is not None:
                scores = _bias_and_dense_penalties_fp(scores, inp)
            return scores

        def sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            scores = processed(logits)
            if p.greedy:
                tokens = scores.argmax(dim=-1)
            else:
                probs = self.warp(scores, inp, rp).softmax(dim=-1)
                tokens = torch.multinomial(probs, 1, generator=gen)[:, 0]
                if p.mirostat_mode == 2:
                    q = probs.gather(1, tokens[:, None])
                    rp.mirostat_mu.sub_(rp.mirostat_eta * (-torch.log2(q) - rp.mirostat_tau))
            if p.logprobs:
                _top_logprobs(logits, tokens, p.top_logprobs)
            return tokens

        gen = _generator(inp.device, inp.seed)
        mu0 = rp.mirostat_mu.clone()

        def run(i: int) -> torch.Tensor:
            rp.mirostat_mu.copy_(mu0)  # every timed step starts from the same state
            return sample(inp.buffers[i], gen)

        def draw(step: int) -> torch.Tensor:
            rp.mirostat_mu.copy_(mu0)
            return sample(inp.buffers[0], _generator(inp.device, inp.seed + 1 + step))

        def probs() -> torch.Tensor:
            scores = processed(inp.buffers[0])
            if p.greedy:
                return torch.nn.functional.one_hot(scores.argmax(-1), inp.vocab).float()
            rp.mirostat_mu.copy_(mu0)
            return self.warp(scores, inp, rp).softmax(dim=-1)

        return Prepared(run, draw, probs)


def _bias_and_dense_penalties_fp(x: torch.Tensor, inp: CaseInputs) -> torch.Tensor:
    """Frequency / presence penalties only (the warpers path applies repetition on the history ids)."""
    p = inp.params
    if p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
        return x
    counts = inp.output_counts
    return x - counts.to(torch.float32) * p.frequency_penalty - (counts > 0).to(torch.float32) * p.presence_penalty


# --------------------------------------------------------------------------------------------------- flashinfer
class FlashInferProvider(Provider):
    """``flashinfer.sampling`` where importable (CUDA): plain and top-k + top-p + min-p."""

    name = "flashinfer"
    is_baseline = True

    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, "flashinfer needs a CUDA device"
        try:
            import flashinfer.sampling  # noqa: F401
        except Exception as e:  # ImportError, or a broken install raising at import
            return False, f"flashinfer is not importable ({type(e).__name__}: {e})"
        return True, ""

    def prepare(self, inp: CaseInputs) -> Prepared:
        import flashinfer.sampling as fis

        p = inp.params
        if p.greedy or p.mirostat_mode or p.typical_p < 1.0 or p.logprobs or inp.output_counts is not None:
            raise NotApplicable("not expressible with flashinfer.sampling alone")
        if p.temperature != 1.0:
            raise NotApplicable("temperature other than 1 is not benchmarked for flashinfer")
        rp = _row_params(inp)
        top_k = rp.top_k[:, 0].to(torch.int32)
        top_p = rp.top_p[:, 0]
        min_p = rp.min_p[:, 0]
        truncating = p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0

        def call(fn: Callable, *args, gen: torch.Generator | None) -> torch.Tensor:
            try:
                return fn(*args, generator=gen)
            except TypeError:  # older releases take no generator argument
                return fn(*args)

        def sample(logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
            if not truncating:
                if hasattr(fis, "sampling_from_logits"):
                    return call(fis.sampling_from_logits, logits, gen=gen).long()
                return call(fis.sampling_from_probs, logits.float().softmax(-1), gen=gen).long()
            probs = logits.float().softmax(dim=-1)
            if p.top_k > 0:
                probs = fis.top_k_renorm_probs(probs, top_k)
            if p.top_p < 1.0:
                probs = fis.top_p_renorm_probs(probs, top_p)
            if p.min_p > 0.0:
                return call(fis.min_p_sampling_from_probs, probs, min_p, gen=gen).long()
            return call(fis.sampling_from_probs, probs, gen=gen).long()

        gen = _generator(inp.device, inp.seed)
        return Prepared(lambda i: sample(inp.buffers[i], gen),
                        lambda step: sample(inp.buffers[0], _generator(inp.device, inp.seed + 1 + step)))


# --------------------------------------------------------------------------------------------------- numpy reference
class NumpyReferenceProvider(Provider):
    """`fastsampler.reference.sample` on numpy float32 copies of the logits (CPU only, capped)."""

    name = "numpy-ref"
    is_baseline = True

    def __init__(self, max_elements: int = 8 * 32000) -> None:
        self.max_elements = max_elements

    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type != "cpu":
            return False, "the numpy reference is measured on CPU runs only"
        try:
            from ..backends import reference

            reference.sample  # noqa: B018 - attribute check
        except (ImportError, AttributeError) as e:
            return False, f"fastsampler.reference is not available ({e})"
        return True, ""

    def prepare(self, inp: CaseInputs) -> Prepared:
        from ..backends import reference

        self._check_size(inp)
        import numpy as np

        arrays = [b.float().cpu().numpy() for b in inp.buffers]
        state = {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in inp.state_kwargs().items()}
        seeds = np.full(inp.batch, inp.seed, dtype=np.int64)

        def call(x: np.ndarray, step: int = 0) -> torch.Tensor:
            steps = np.full(inp.batch, step, dtype=np.int64)
            return torch.from_numpy(np.asarray(reference.sample(x, inp.params, seeds=seeds, steps=steps,
                                                                **state).tokens))

        return Prepared(lambda i: call(arrays[i]), lambda step: call(arrays[0], step), host_only=True)


# --------------------------------------------------------------------------------------------------- selection
def build_providers(device: torch.device, requested: list[str] | None, *, ref_max_elements: int = 8 * 32000,
                    baseline_max_elements: int | None = None) -> tuple[list[Provider], list[str]]:
    """The providers of a run and the notes about those left out.

    ``requested`` names providers (``fastsampler-triton``, ``torch-sort``, ...), backends (``triton``, ``cpu``) or
    groups (``fastsampler``: every fastsampler backend for this device; ``baselines``). ``None``: the default set —
    the fastsampler backends that run natively on the device (Triton is excluded on CPU, where it runs in the
    interpreter and measures nothing useful) and every baseline. ``ref_max_elements`` caps the numpy reference and
    ``baseline_max_elements`` the torch samplers (B * V; ``None`` or 0: no cap).
    """
    from ..backends import BACKENDS

    notes: list[str] = []
    names: list[str] = []
    explicit_backends: set[str] = set()
    if requested is None:
        requested = ["fastsampler", "baselines"]
    for item in requested:
        item = item.strip()
        if not item:
            continue
        if item == "fastsampler":
            names += [f"fastsampler-{b}" for b in BACKENDS if b != "reference" and not (
                b == "triton" and device.type == "cpu")]
        elif item == "baselines":
            names += list(BASELINES)
        elif item in BACKENDS:
            names.append(f"fastsampler-{item}")
            explicit_backends.add(item)
        else:
            names.append(item)
            if item.startswith("fastsampler-"):
                explicit_backends.add(item.removeprefix("fastsampler-").removesuffix("-api"))
    seen: set[str] = set()
    out: list[Provider] = []
    for name in names:
        if name in seen:
            continue
        seen.add(name)
        prov = _make(name, ref_max_elements, baseline_max_elements)
        if prov is None:
            raise ValueError(f"unknown provider {name!r}; choose from fastsampler-<{'|'.join(BACKENDS)}>[-api], "
                             f"{', '.join(BASELINES)}, or the groups 'fastsampler', 'baselines'")
        if isinstance(prov, FastsamplerProvider) and prov.backend == "triton" and device.type == "cpu":
            if prov.backend not in explicit_backends:
                continue
            notes.append("fastsampler-triton on CPU runs in the Triton interpreter: correctness only, not speed")
        ok, why = prov.available(device)
        if not ok:
            notes.append(f"{name}: skipped ({why})")
            continue
        if isinstance(prov, FastsamplerProvider) and prov.backend not in explicit_backends and not any(
                prov._module().supports(device, dt) for dt in (torch.float32, torch.bfloat16)):
            continue  # e.g. the C++ CPU backend on a CUDA run: it takes no CUDA tensors
        out.append(prov)
    return out, notes


def _make(name: str, ref_max_elements: int, baseline_max_elements: int | None = None) -> Provider | None:
    from ..backends import BACKENDS

    if name.startswith("fastsampler-"):
        rest = name.removeprefix("fastsampler-")
        api = rest.endswith("-api")
        backend = rest.removesuffix("-api")
        return FastsamplerProvider(backend, api=api) if backend in BACKENDS else None
    return {
        "torch-sort": lambda: TorchSortProvider(baseline_max_elements),
        "torch-warpers": lambda: TorchWarpersProvider(baseline_max_elements),
        "flashinfer": FlashInferProvider,
        "numpy-ref": lambda: NumpyReferenceProvider(ref_max_elements),
    }.get(name, lambda: None)()

