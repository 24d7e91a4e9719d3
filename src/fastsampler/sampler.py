"""`Sampler`: the generation-loop object, with every request's state kept on the device.

An inference engine creates one `Sampler`, `Sampler.add` s a request when it joins the batch (one slot per sample of
the request), calls `Sampler.sample` once per decoding step with the logits of the running slots, and
`Sampler.remove` s the slots of finished requests. The per-step host work is O(batch size): parameters are packed once
per slot when it is added (and gathered once per list of slots), penalty state (prompt bitmask, output counts),
Mirostat ``mu`` and the step counter live on the device and are updated there. See ``docs/sampler.md`` for the state
layout, its memory cost and what a step costs on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import backends
from ._batch import (
    PackedBatch,
    check_ids,
    check_int,
    id_array,
    id_tensor,
    ids_to_bitmask,
    mask_words,
    pack_request,
    random_seed,
    seed_to_int64,
    to_device,
    token_array,
)
from ._custom_ops import run_backend, sample_packed, use_op
from ._history import ring_keep
from ._slots import RuleInfo, SlotBook, SlotTables
from .graphs import GraphedStep
from .layout import COUNT_MAX as _COUNT_MAX
from .layout import I_IGNORE_EOS, I_MIN_TOKENS, MAX_COLUMNS, int_to_flags
from .output import SampleOutput, ScoreOutput, VerifyOutput
from .params import SamplingParams

__all__ = ["Sampler", "COUNT_MAX"]

COUNT_MAX = _COUNT_MAX
"""Output-token counts are int16 and saturate here (a token generated more often still counts 32767)."""

_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_SLOT_SETS = 8  # cached slot lists per Sampler (all dropped by add / remove / reset / reserve)
_MAX_HISTORY = 1 << 20  # the longest history a Sampler keeps per slot


def _locked(method: Any) -> Any:
    """Run ``method`` holding the Sampler's lock (not while torch.compile traces it: a graph has no locks)."""

    @functools.wraps(method)
    def wrapper(self: Sampler, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return method(self, *args, **kwargs)
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Sampler:
    """Persistent sampling state for a continuous-batching generation loop.

    Each request takes ``params.n`` *slots* (one per sample; the samples share the request's seed and differ in
    ``seq = 0 .. n-1``, see ``docs/semantics.md`` §7). A slot holds, on ``device``:

    - its packed parameters (one float32 row of ``fparams`` and one int32 row of ``iparams``), written once by `add`;
    - seed (int64 bit pattern of the uint64 seed), step (tokens generated so far), seq, Mirostat ``mu`` (float32);
    - the prompt bitmask, int32 ``[ceil(V / 32)]`` (bit ``t % 32`` of word ``t // 32`` set = token ``t`` is in the
      prompt), used by the repetition penalty;
    - the output counts, int16 ``[V]``, saturating at 32767 (frequency / presence / repetition penalties);
    - only when some request uses them: an allowed-token bitmask row (allowed / banned ids) and the request's logit
      bias (sorted ids and values).

    Threads: a `Sampler` may be shared between threads. `add`, `remove`, `reset` and `sample` hold one lock per
    `Sampler` (a re-entrant ``threading.RLock``), so concurrent calls run one after another and no step or count
    update is lost; to sample batches in parallel, give each thread its own `Sampler`.

    Memory per slot: ``2 V`` bytes of counts plus ``V / 8`` bytes of prompt bitmask (plus ``V / 8`` for the allowed
    mask once some request restricts ids, 8 bytes per logit-bias entry of the largest bias, and ``4 * history_len``
    bytes of history), and 156 bytes of scalars and packed parameters; for ``V = 128256`` that is 266 KiB per slot.

    Parameters
    ----------
    vocab_size : int
        Real vocabulary size ``V``, at most ``2**24 - 1`` (token ids travel in float32 lanes inside the kernels).
        Logits may be wider (padded columns are never sampled), up to the same limit.
    max_slots : int
        Number of slots (concurrent sequences).
    device : torch.device or str, default "cpu"
        Where the state lives; logits passed to `sample` must be on it.
    eos_token_ids : sequence of int, default ()
        EOS ids, banned while a slot's step is below its ``min_tokens``, and always when ``ignore_eos``.
    backend : {'auto', 'triton', 'cpu', 'reference'}, default "auto"
        As in `fastsampler.sample`; ``auto`` picks per logits dtype.
    history_len : int, default 0
        Tokens of history kept per slot (the last ``history_len`` of prompt + output, in a ring buffer of
        ``4 * history_len`` bytes per slot) for the history rules ``no_repeat_ngram_size`` and ``bad_words_ids``,
        which then look at those tokens only. 0: no history; a request that uses a history rule is refused.

    Examples
    --------
    >>> import torch, fastsampler
    >>> s = fastsampler.Sampler(vocab_size=8, max_slots=4, backend="reference")
    >>> a = s.add(fastsampler.SamplingParams(temperature=0.0), prompt_token_ids=[1, 2])
    >>> b = s.add(fastsampler.SamplingParams(seed=7, n=2))
    >>> a, b, s.seed_of(b[1])
    ([0], [1, 2], 7)
    >>> logits = torch.zeros(3, 8); logits[:, 5] = 3.0
    >>> out = s.sample(logits, a + b)
    >>> out.tokens[0].item(), s.step_of(a[0])
    (5, 1)
    >>> s.remove(b); s.num_active
    1
    """

    @torch.inference_mode(False)  # the state must stay updatable in place inside and outside inference mode
    def __init__(
        self,
        vocab_size: int,
        max_slots: int,
        device: torch.device | str = "cpu",
        *,
        eos_token_ids: Sequence[int] = (),
        backend: str = "auto",
        history_len: int = 0,
    ) -> None:
        history_len = check_int("history_len", history_len, 0, _MAX_HISTORY)
        for name, val in (("vocab_size", vocab_size), ("max_slots", max_slots)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
                raise TypeError(f"{name} must be an integer >= 1, got {val!r} of type {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
        if vocab_size > MAX_COLUMNS:
            raise ValueError(f"vocab_size must be at most 2^24 - 1 = {MAX_COLUMNS} (token ids are exact in float32 "
                             f"lanes up to 2^24), got {vocab_size}")
        if backend not in ("auto", *backends.BACKENDS):
            raise ValueError(f"backend must be one of {('auto', *backends.BACKENDS)}, got {backend!r}")
        if backend != "auto":
            backends.load(backend)  # raise now, with the install command, not at the first step
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
                raise ValueError(f"device={str(dev)!r} needs CUDA, which is not available here ({why}); use "
                                 f"device='cpu'")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            elif dev.index >= torch.cuda.device_count():
                raise ValueError(f"device={str(dev)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                                 f"are visible")
        self._vocab = int(vocab_size)
        self._slots = int(max_slots)
        self._device = dev
        self._backend = backend
        self._resolved: dict[torch.dtype, str] = {}
        self._resolve_backends()
        if isinstance(eos_token_ids, (int, np.integer, str, bytes)) or not isinstance(eos_token_ids, Iterable):
            raise TypeError(f"eos_token_ids must be a sequence of ints, got {eos_token_ids!r}")
        eos_seq = eos_token_ids.tolist() if isinstance(eos_token_ids, (torch.Tensor, np.ndarray)) else eos_token_ids
        check_ids("eos_token_ids", None, eos_seq, self._vocab)
        eos = [int(t) for t in eos_seq]
        self._eos_host = tuple(eos)
        self._lock = threading.RLock()
        self._words = mask_words(self._vocab)
        self._book = SlotBook(self._slots)  # which slots are in use, and what the host knows of each
        self._tables = SlotTables(self._slots, self._vocab, dev, eos, history_len)  # the per-slot tables on the device
        # per-step fast path: what a list of slots gathers once (see `_SlotSet`), and numpy views of the state that
        # changes every step (CPU only: updated in place through them, no torch op per update)
        self._slot_sets: dict[tuple[int, ...], _SlotSet] = {}
        self._host_state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if dev.type == "cpu":
            t = self._tables
            self._host_state = (t.steps.numpy(), t.mu.numpy(), t.counts.numpy())

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """The vocabulary size ``V``."""
        return self._vocab

    @property
    def max_slots(self) -> int:
        """The number of slots."""
        return self._slots

    @property
    def device(self) -> torch.device:
        """The device that holds the state."""
        return self._device

    @property
    def history_len(self) -> int:
        """Tokens of history kept per slot for the history rules (0: none)."""
        return self._tables.history_len

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The EOS ids given at construction."""
        return self._eos_host

    @property
    def num_active(self) -> int:
        """Slots in use."""
        return self._slots - self._book.num_free

    @property
    def num_free(self) -> int:
        """Slots free for `add`."""
        return self._book.num_free

    @property
    def active_slots(self) -> list[int]:
        """The slots in use, ascending."""
        return [i for i, p in enumerate(self._book.params) if p is not None]

    # ------------------------------------------------------------------ per-slot queries
    def _check_slot(self, slot: Any) -> int:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)):
            raise TypeError(f"slot must be an int, got {slot!r} of type {type(slot).__name__}")
        i = int(slot)
        if not 0 <= i < self._slots:
            raise ValueError(f"slot {i} is outside [0, {self._slots})")
        if not self._book.in_use(i):
            raise ValueError(f"slot {i} is not in use (never added, or already removed)")
        return i

    def seed_of(self, slot: int) -> int:
        """The uint64 seed of ``slot``'s request: ``params.seed``, or the random seed drawn by `add`."""
        return self._book.seeds[self._check_slot(slot)]

    def params_of(self, slot: int) -> SamplingParams:
        """The `SamplingParams` that ``slot`` was added with."""
        p = self._book.params[self._check_slot(slot)]
        assert p is not None
        return p

    def step_of(self, slot: int) -> int:
        """Tokens generated so far by ``slot`` (reads the device: for inspection, not for the hot loop)."""
        return int(self._tables.steps[self._check_slot(slot)].item())

    def seq_of(self, slot: int) -> int:
        """The sample index of ``slot`` within its request (``0 .. n-1``)."""
        return int(self._tables.seqs[self._check_slot(slot)].item())

    def mirostat_mu_of(self, slot: int) -> float:
        """Mirostat ``mu`` of ``slot`` (NaN for a request without Mirostat; reads the device)."""
        return float(self._tables.mu[self._check_slot(slot)].item())

    def output_counts_of(self, slot: int) -> torch.Tensor:
        """A copy of ``slot``'s output counts, ``(V,)`` int16 on the device (of its last ``penalty_last_n`` generated
        tokens when it has a penalty window)."""
        return self._tables.counts[self._check_slot(slot)].clone()

    def prompt_mask_of(self, slot: int) -> torch.Tensor:
        """A copy of ``slot``'s prompt bitmask, ``(ceil(V / 32),)`` int32 on the device."""
        return self._tables.prompt[self._check_slot(slot)].clone()

    # ------------------------------------------------------------------ add / remove
    @_locked
    def add(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = (),
        *,
        output_token_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        step: int | None = None,
        mirostat_mu: float | None = None,
    ) -> list[int]:
        """Add a request; returns its ``params.n`` slots (sample ``seq = i`` in slot ``slots[i]``).

        A request that was preempted and is added again continues exactly where it stopped when it brings back what
        it had: its tokens so far (``output_token_ids``: the penalty counts), ``step`` and ``mirostat_mu``, and its
        seed (``params.seed``, or `seed_of` of the old slot in ``params.replace(seed=...)``). `export` / `restore`
        move one slot's whole state instead.

        Parameters
        ----------
        params : SamplingParams
            The request's parameters. ``params.seed`` of ``None`` draws a random 64-bit seed, shared by the request's
            samples and reported by `seed_of`.
        prompt_token_ids : sequence of int, default ()
            The prompt, for the repetition penalty (host work O(len(prompt)) once, here).
        output_token_ids : sequence of int, optional
            Tokens the request already generated (each sample starts with these counts, saturating at
            `COUNT_MAX`).
        step : int, optional
            Tokens generated so far: the Philox counter of the next draw and the ``min_tokens`` clock (default
            ``len(output_token_ids)``, else 0).
        mirostat_mu : float, optional
            Mirostat state to continue from (default ``2 * mirostat_target``); only for a Mirostat request.

        Returns
        -------
        list of int
            The slots, lowest free first.

        Raises
        ------
        ValueError
            When fewer than ``params.n`` slots are free, a token id is outside ``[0, vocab_size)``, or the request
            sets ``min_tokens`` / ``ignore_eos`` while the Sampler has no ``eos_token_ids`` (they would do nothing).

        Examples
        --------
        >>> import fastsampler
        >>> s = fastsampler.Sampler(vocab_size=16, max_slots=4, backend="reference")
        >>> s.add(fastsampler.SamplingParams(n=3, seed=1)), s.num_free
        ([0, 1, 2], 1)
        """
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        n = params.n
        if n > self._book.num_free:
            raise ValueError(
                f"Sampler is full: the request needs n={n} slots, {self._book.num_free} of max_slots={self._slots} are "
                f"free; remove finished requests first"
            )
        v = self._vocab
        prompt = token_array(prompt_token_ids, "prompt_token_ids", v)
        self._check_request(params)
        counts = None
        if output_token_ids is not None:
            out = token_array(output_token_ids, "output_token_ids", v)
            win = pack_request(params).window  # penalty_last_n: the last n generated tokens count
            counted = out if win < 0 else out[max(0, out.size - win):] if win else out[:0]
            counts = np.minimum(np.bincount(counted, minlength=v), _COUNT_MAX).astype(np.int16)
        if step is None:
            step = 0 if output_token_ids is None else int(out.size)
        else:
            step = check_int("step", step, 0, (1 << 63) - 1)
        if mirostat_mu is not None:
            if not params.mirostat_mode:
                raise ValueError("mirostat_mu is the state of a Mirostat request; this request has mirostat_mode=0")
            if isinstance(mirostat_mu, (bool, np.bool_)) or not isinstance(mirostat_mu, (int, float, np.floating,
                                                                                          np.integer)):
                raise TypeError(f"mirostat_mu must be a float, got {mirostat_mu!r}")
            if math.isnan(mirostat_mu):
                raise ValueError("mirostat_mu must not be NaN")

        seed = params.seed if params.seed is not None else random_seed()
        req = pack_request(params)
        slots = self._book.take(n)
        history = prompt if output_token_ids is None else np.concatenate((prompt, out))
        self._tables.write(slots, req, seed_to_int64(seed), ids_to_bitmask([prompt], v)[0], step=step,
                           mu=None if mirostat_mu is None else float(mirostat_mu), counts=counts, history=history,
                           history_start=prompt.size)
        self._book.fill(slots, params, seed, req)
        self._slot_sets.clear()
        return slots

    def _check_request(self, params: SamplingParams) -> None:
        """What `SamplingParams` could not check alone: its token ids against the vocabulary, and EOS ids for
        ``min_tokens`` / ``ignore_eos`` (which ban them: without any they would silently do nothing)."""
        v = self._vocab
        for name, ids in (("allowed_token_ids", params.allowed_token_ids), ("banned_token_ids",
                          params.banned_token_ids), ("logit_bias", params.logit_bias.keys()),
                          ("stop_token_ids", params.stop_token_ids)):
            if ids is not None:
                check_ids(f"params.{name}", None, ids, v)
        if (params.min_tokens > 0 or params.ignore_eos) and not self._eos_host:
            rule = f"min_tokens={params.min_tokens}" if params.min_tokens > 0 else "ignore_eos=True"
            raise ValueError(f"params.{rule} bans the EOS ids, but this Sampler has none: pass eos_token_ids to "
                             f"Sampler(...), or leave min_tokens and ignore_eos at their defaults")
        for seq in params.bad_words_ids or ():
            check_ids("params.bad_words_ids", None, seq, v)
        # the history rules read the last history_len tokens: each needs at least as many as it looks back
        need = max([params.no_repeat_ngram_size] + [len(w) - 1 for w in params.bad_words_ids or ()])
        if need > self._tables.history_len:
            rule = (f"no_repeat_ngram_size={params.no_repeat_ngram_size}" if params.no_repeat_ngram_size >= need
                    else f"a bad word of {need + 1} tokens")
            raise ValueError(f"params.{rule} reads {need} tokens of history, but this Sampler keeps "
                             f"history_len={self._tables.history_len}: pass history_len >= {need} to Sampler(...)")
        if params.dry_active:
            for seq in params.dry_sequence_breakers or ():
                check_ids("params.dry_sequence_breakers", None, seq, v)
            n = params.dry_penalty_last_n
            if self._tables.history_len == 0 or n > self._tables.history_len:
                need = "some history" if n < 0 else f"{n} tokens of history"
                raise ValueError(f"params.dry_multiplier={params.dry_multiplier} (dry_penalty_last_n={n}) reads "
                                 f"{need}, but this Sampler keeps history_len={self._tables.history_len}: pass "
                                 f"history_len >= {max(n, 1)} to Sampler(...) (dry_penalty_last_n=-1 reads the last "
                                 f"history_len tokens)")
        win = pack_request(params).window
        if win >= 0 and win >= self._tables.history_len:
            raise ValueError(f"params.penalty_last_n={win} takes tokens out of the penalty counts once they leave "
                             f"the window, read from the history: pass history_len > {win} to Sampler(...) (this one "
                             f"keeps {self._tables.history_len})")

    @_locked
    def export(self, slot: int) -> SlotState:
        """Everything ``slot`` holds, copied to the host (reads the device): `restore` puts it back into a free slot
        of this or another `Sampler` with the same vocabulary, and the request continues as if it had never left.

        >>> import torch, fastsampler
        >>> s = fastsampler.Sampler(vocab_size=8, max_slots=1, backend="reference")
        >>> slot = s.add(fastsampler.SamplingParams(seed=5, presence_penalty=1.0))[0]
        >>> _ = s.sample(torch.zeros(1, 8), [slot])
        >>> state = s.export(slot); s.remove(slot)
        >>> t = fastsampler.Sampler(vocab_size=8, max_slots=2, backend="reference")
        >>> new = t.restore(state); t.step_of(new), t.seed_of(new), int(t.output_counts_of(new).sum())
        (1, 5, 1)
        """
        i = self._check_slot(slot)
        params = self._book.params[i]
        assert params is not None
        seq, step, mu, counts, prompt_mask, history, total, start = self._tables.read(i)
        return SlotState(params=params, seed=self._book.seeds[i], seq=seq, step=step, mirostat_mu=mu,
                         output_counts=counts, prompt_mask=prompt_mask, history=history, history_total=total,
                         history_start=start)

    @_locked
    def restore(self, state: SlotState) -> int:
        """Put a slot exported by `export` back into the lowest free slot; returns it.

        Raises
        ------
        TypeError
            When ``state`` is not a `SlotState`.
        ValueError
            When no slot is free, the state was exported by a `Sampler` of another vocabulary size, or its params
            do not fit this one (token ids, ``min_tokens`` / ``ignore_eos`` without EOS ids), as in `add`.
        """
        if not isinstance(state, SlotState):
            raise TypeError(f"state must be a SlotState (from Sampler.export), got {type(state).__name__}")
        v, w = self._vocab, self._words
        if state.output_counts.shape != (v,) or state.prompt_mask.shape != (w,):
            raise ValueError(f"state holds counts for a vocabulary of {state.output_counts.shape[0]} tokens; this "
                             f"Sampler has vocab_size={v}")
        if not self._book.num_free:
            raise ValueError(f"Sampler is full: all max_slots={self._slots} slots are in use; remove finished "
                             f"requests first")
        p = state.params
        self._check_request(p)
        req = pack_request(p)
        slots = self._book.take(1)
        self._tables.write(slots, req, seed_to_int64(state.seed), state.prompt_mask.astype(np.int32, copy=False),
                           first_seq=state.seq, step=state.step, mu=state.mirostat_mu,
                           counts=state.output_counts.astype(np.int16, copy=False), history=state.history,
                           history_total=state.history_total, history_start=state.history_start)
        self._book.fill(slots, p, state.seed, req)
        self._slot_sets.clear()
        return slots[0]

    @_locked
    @torch.inference_mode(False)
    def reserve(self, *, allowed_mask: bool = False, logit_bias_entries: int = 0) -> None:
        """Allocate lazily allocated state now, so that later `add` calls never reallocate it.

        A captured CUDA graph holds the addresses of the state tensors: reserve what the requests may use before
        capturing. ``allowed_mask`` allocates the allowed-token bitmask rows (``V / 8`` bytes per slot);
        ``logit_bias_entries`` makes room for that many logit-bias entries per slot (8 bytes each).

        >>> import fastsampler
        >>> s = fastsampler.Sampler(vocab_size=64, max_slots=2, backend="reference")
        >>> s.reserve(allowed_mask=True, logit_bias_entries=4)
        """
        if self._tables.reserve(allowed_mask=allowed_mask, logit_bias_entries=logit_bias_entries):
            self._slot_sets.clear()

    @property
    def capture_key(self) -> tuple[Any, ...]:
        """What a step with a tensor of slots decides on the host: (flag bits, top-logprob width, bias width,
        restricted ids, stop ids, stop ids banned before ``min_tokens``, the history rules' `RuleInfo`), all over the
        slots in use.

        A CUDA graph captured around `sample` replays the decisions of its capture; when this key changes (a
        request with a feature the live set did not use joins), capture again (or keep one graph per key).
        """
        return (*self._book.live, *self._book.live_stop, self._book.live_rules)

    def graphed(self, batch_size: int, *, width: int | None = None, dtype: torch.dtype = torch.float32,
                bitmask: bool = False) -> GraphedStep:
        """A `sample` step for ``batch_size`` rows, captured in a CUDA graph and replayed on every call.

        Returns a `fastsampler.graphs.GraphedStep`; call it as ``step(logits, slots)`` (``token_bitmask=`` when
        ``bitmask=True``). It captures lazily at its first call and again whenever `capture_key` or the state
        layout changes, restores every slot's state after the warm-up it runs before capturing, and returns the
        graph's static outputs (overwritten by the next call). Needs a CUDA device; see ``docs/sampler.md``.

        Parameters
        ----------
        batch_size : int
            Rows per step.
        width : int, optional
            Columns of the logits (default ``vocab_size``).
        dtype : torch.dtype, default torch.float32
            Logits dtype (float32, float16 or bfloat16).
        bitmask : bool, default False
            Whether each call passes a ``token_bitmask``.
        """
        return GraphedStep(self, batch_size, self._vocab if width is None else width, dtype, bitmask)

    @_locked
    def remove(self, slots: int | Iterable[int]) -> None:
        """Free slots (e.g. all slots of a finished request). Raises ``ValueError`` for a slot not in use.

        Examples
        --------
        >>> import fastsampler
        >>> s = fastsampler.Sampler(vocab_size=16, max_slots=2, backend="reference")
        >>> slots = s.add(fastsampler.SamplingParams(n=2))
        >>> s.remove(slots); s.num_free
        2
        """
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        if isinstance(slots, (bool, np.bool_)) or not isinstance(slots, (int, np.integer, Iterable)):
            raise TypeError(f"slots must be an int or an iterable of ints, got {slots!r} of type "
                            f"{type(slots).__name__}")
        items = [slots] if isinstance(slots, (int, np.integer)) and not isinstance(slots, bool) else list(slots)
        checked = [self._check_slot(s) for s in items]
        if len(set(checked)) != len(checked):
            raise ValueError(f"slots to remove must be distinct, got {checked}")
        self._book.release(checked)
        self._slot_sets.clear()

    @_locked
    def reset(self) -> None:
        """Free every slot."""
        self._book.reset()
        self._slot_sets.clear()

    # ------------------------------------------------------------------ sample
    def _resolve_backends(self) -> None:
        """Pick the backend for every logits dtype now: `sample` then only reads a dict (traceable by dynamo).

        Raises ``ValueError`` (as `fastsampler.sample` does for logits a backend cannot run) when the backend runs no
        logits dtype on the device, e.g. ``backend="triton"`` on the CPU outside the Triton interpreter."""
        for dt in _LOGIT_DTYPES:
            name = backends.resolve(self._backend, self._device, dt)
            mod = backends.load(name)
            if mod.supports(self._device, dt):
                self._resolved[dt] = name
        if not self._resolved:
            runs = " or ".join(backends.load(self._backend).CAPABILITIES.devices)
            if self._backend == "triton":
                runs = "CUDA, or the CPU under the Triton interpreter (TRITON_INTERPRET=1, set before triton is " \
                       "imported)"
            raise ValueError(f"backend={self._backend!r} does not support device {self._device} (it runs on {runs}); "
                             f"pick another backend, or backend='auto'")

    def backend_for(self, dtype: torch.dtype = torch.float32) -> str:
        """The backend that `sample` runs for logits of ``dtype`` (``auto`` resolved).

        >>> import fastsampler
        >>> fastsampler.Sampler(vocab_size=8, max_slots=1, backend="reference").backend_for()
        'reference'
        """
        name = self._resolved.get(dtype)
        if name is None:  # (a ValueError, as in `fastsampler.sample`)
            raise ValueError(f"backend={self._backend!r} does not support logits of dtype {dtype} on device "
                             f"{self._device}")
        return name

    def __repr__(self) -> str:
        backend = repr(self._backend)
        if self._backend == "auto":
            backend += f" ({self._resolved.get(torch.float32, '?')} for float32)"
        eos = self._eos_host
        eos_s = repr(eos) if len(eos) <= 8 else f"({', '.join(map(str, eos[:8]))}, ... {len(eos)} ids)"
        return (f"Sampler(vocab_size={self._vocab}, max_slots={self._slots}, device={str(self._device)!r}, "
                f"backend={backend}, active={self.num_active}, eos_token_ids={eos_s})")

    def _numpy_logits(self, logits: Any) -> torch.Tensor:
        """Numpy logits on a CPU sampler as a tensor that shares their memory (``torch.from_numpy``, no copy for a
        C-contiguous array); anything else that is not a tensor is refused."""
        if not isinstance(logits, np.ndarray):
            raise TypeError(f"logits must be a torch.Tensor (or a numpy array on a CPU sampler), got "
                            f"{type(logits).__name__}")
        if self._device.type != "cpu":
            raise TypeError(f"logits must be a torch.Tensor on the sampler's device {self._device}, got a numpy "
                            f"array (numpy logits are taken by a CPU sampler only: move them to the device first)")
        if logits.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
        return torch.from_numpy(np.ascontiguousarray(logits))

    def _check_logits(self, logits: Any, b: int) -> None:
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dtype not in _LOGIT_DTYPES:
            raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
        if logits.dim() != 2 or logits.shape[0] != b or logits.shape[1] < self._vocab:
            raise ValueError(
                f"logits must have shape ({b}, >= {self._vocab}) (one row per slot, vocab_size columns or more), got "
                f"{tuple(logits.shape)}"
            )
        if self._host_state is not None and logits.is_cpu:  # a CPU sampler (``device.type`` costs more than this)
            return
        d = logits.device
        if d.type != self._device.type or (self._device.index is not None and d.index != self._device.index):
            raise ValueError(f"logits must be on the sampler's device {self._device}, got {d}")

    @_locked
    def sample(
        self,
        logits: torch.Tensor,
        slots: Sequence[int] | torch.Tensor,
        *,
        token_bitmask: torch.Tensor | None = None,
    ) -> SampleOutput:
        """Sample one token per row of ``logits``, row ``r`` for slot ``slots[r]``, and advance those slots.

        On the device, after the draw: each valid row's slot advances its step by one and counts its token (int16,
        saturating at 32767); every row's slot stores the returned Mirostat ``mu``. Invalid rows (token ``-1``)
        leave step and counts unchanged.

        Parameters
        ----------
        logits : (batch_size, V') torch.Tensor or numpy array
            float32, float16 or bfloat16 (float64: reference backend) on the sampler's device, ``V' >= vocab_size``.
            A CPU sampler also takes a float16 / float32 / float64 numpy array (used without a copy through
            ``torch.from_numpy``) and then returns numpy arrays.
        slots : sequence of batch_size ints, or (batch_size,) integer tensor
            Distinct slots in use. With a sequence they are checked, and the host-known flags and the top-logprob
            width ``N`` are those of these slots; for a list or tuple (the fast path) that happens on the first
            step with it, and what the step needs from the slots is cached until the next `add` / `remove` /
            `reset` (see ``docs/sampler.md``, "One step"). With a tensor nothing is read back (no host
            synchronisation: this is the form for ``torch.compile`` and CUDA graphs); the slots are not checked, and
            flags and ``N`` are taken over all slots in use.
        token_bitmask : (batch_size, ceil(vocab_size / 32)) int32 tensor, optional
            Allowed tokens (bit ``t % 32`` of word ``t // 32`` set = ``t`` allowed), AND-ed with the slots' allowed
            and banned ids.

        Returns
        -------
        SampleOutput
            Torch tensors on the sampler's device (numpy arrays for numpy logits).

        Raises
        ------
        TypeError, ValueError
            For logits of the wrong type, dtype, shape or device, an unknown or freed or repeated slot, or a
            ``token_bitmask`` of the wrong dtype or shape.

        Examples
        --------
        >>> import torch, fastsampler
        >>> s = fastsampler.Sampler(vocab_size=4, max_slots=2, backend="reference")
        >>> slots = s.add(fastsampler.SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2))
        >>> out = s.sample(torch.tensor([[0.0, 2.0, 1.0, -1.0]]), slots)
        >>> out.tokens.tolist(), out.top_logprob_ids.tolist(), s.output_counts_of(slots[0]).tolist()
        ([1], [[1, 2]], [0, 1, 0, 0])
        """
        if not isinstance(logits, torch.Tensor):  # numpy logits (CPU sampler): numpy outputs
            x = self._numpy_logits(logits)
            listed = type(slots) is list or type(slots) is tuple
            out = (self._sample_listed if listed else self._sample_general)(x, slots, token_bitmask)
            return out.numpy()
        if (type(slots) is list or type(slots) is tuple) and not use_op(logits):
            return self._sample_listed(logits, slots, token_bitmask)
        return self._sample_general(logits, slots, token_bitmask)

    # ------------------------------------------------------------------ the per-step fast path
    def _slot_set(self, slots: list[int] | tuple[int, ...]) -> _SlotSet:
        """The cached `_SlotSet` of a list of slots, built (and the slots checked) on the first step with it.

        The cache is dropped by every `add`, `remove`, `reset` and reallocation, so a hit stands for slots that were
        checked (in use, distinct) and whose packed rows have not changed since.
        """
        key = tuple(slots)
        ss = self._slot_sets.get(key)
        # ``True == 1`` and hashes alike: only exact ints hit (anything else is checked, and refused, below)
        if ss is not None and all(type(x) is int for x in key):
            return ss
        rows = [self._check_slot(x) for x in key]
        if len(set(rows)) != len(rows):
            raise ValueError(f"slots must be distinct within a batch, got {rows}")
        ss = _SlotSet(self, rows)
        if all(type(x) is int for x in key):
            if len(self._slot_sets) >= _MAX_SLOT_SETS:
                self._slot_sets.clear()
            self._slot_sets[key] = ss
        return ss

    def _sample_listed(self, logits: torch.Tensor, slots: list[int] | tuple[int, ...],
                       token_bitmask: torch.Tensor | None) -> SampleOutput:
        """An eager step with a list of slots: the cached `_SlotSet` and the backend called directly."""
        ss = self._slot_set(slots)
        self._check_logits(logits, ss.b)
        name = self.backend_for(logits.dtype)
        if ss.b == 0:
            return _empty_output(logits, ss.n_top)
        wl = mask_words(logits.shape[1])
        if name == "cpu" and self._host_state is not None:
            return self._sample_host(logits, ss, wl, token_bitmask)
        allowed, prompt = ss.masks(wl)
        if token_bitmask is not None:
            tb = self._check_bitmask(token_bitmask, ss.b, wl)
            allowed = tb if allowed is None else allowed & tb
        if ss.span is not None:  # consecutive slots: views of the state, no gather
            lo, hi = ss.span
            steps, mu = self._tables.steps[lo:hi], self._tables.mu[lo:hi]
            counts = self._tables.counts[lo:hi] if ss.flags.any_penalty else None
        else:
            steps, mu = self._tables.steps.index_select(0, ss.index), self._tables.mu.index_select(0, ss.index)
            counts = self._tables.counts.index_select(0, ss.index) if ss.flags.any_penalty else None
        if ss.rules.any:  # per-step bans: stop ids before min_tokens, history rules
            keep = self._rule_bitmask(ss.index, ss.rules, logits.shape[1], None, steps)
            allowed = keep if allowed is None else allowed & keep
        indptr, ids, vals = ss.bias if ss.bias is not None else (None, None, None)
        dry_ids, dry_vals = self._tables.dry(ss.index, ss.rules)
        batch = PackedBatch(logits=logits, vocab_size=self._vocab, fparams=ss.fparams, iparams=ss.iparams,
                            seeds=ss.seeds, steps=steps, seqs=ss.seqs, mirostat_mu=mu, allowed_mask=allowed,
                            prompt_mask=prompt, output_counts=counts, bias_indptr=indptr, bias_ids=ids,
                            bias_vals=vals, eos_ids=self._tables.eos, n_top=ss.n_top, flags=ss.flags,
                            dry_ids=dry_ids, dry_vals=dry_vals)
        out = run_backend(name, batch)
        self._advance(ss.index, steps, out)
        if ss.stop_ids is not None:
            out.stopped = (out.tokens[:, None] == ss.stop_ids).any(1)
        return out

    def _sample_host(self, logits: torch.Tensor, ss: _SlotSet, wl: int,
                     token_bitmask: torch.Tensor | None) -> SampleOutput:
        """The C++ backend on numpy views: no packed batch, no torch op; the state is updated through its views."""
        from .backends import cpu

        assert self._host_state is not None
        steps_all, mu_all, counts_all = self._host_state
        x, dtype_name = cpu.logits_array(logits)
        h = ss.host(wl, self._vocab, self._host_state)
        allowed = h.allowed
        if token_bitmask is not None:
            tb = self._check_bitmask(token_bitmask, ss.b, wl).numpy()
            allowed = tb if allowed is None else allowed & tb
        if h.steps is not None:  # consecutive slots: views of the state, no gather
            steps, mu, counts = h.steps, h.mu, h.counts
        else:
            steps, mu = steps_all[h.index], mu_all[h.index]
            counts = counts_all[h.index] if ss.flags.any_penalty else None
        if ss.rules.any:  # per-step bans: stop ids before min_tokens, history rules
            keep = self._rule_bitmask(ss.index, ss.rules, logits.shape[1], None, torch.from_numpy(steps))
            assert keep is not None
            allowed = keep.numpy() if allowed is None else allowed & keep.numpy()
        dry_ids, dry_vals = self._tables.dry(ss.index, ss.rules)
        tokens, valid, lps, top_ids, top_lps, ranks, mu_out = cpu.sample_arrays(
            (x, dtype_name, self._vocab, h.f, h.i, h.seeds, steps, h.seqs, mu, allowed, h.prompt, counts,
             h.bias_indptr, h.bias_ids, h.bias_vals, h.eos, None if dry_ids is None else dry_ids.numpy(),
             None if dry_vals is None else dry_vals.numpy()), ss.n_top)
        # state updates (slots are distinct): steps += valid, mu = returned mu, counts[token] += 1 up to COUNT_MAX
        cpu.advance_arrays(steps_all, mu_all, counts_all, h.index, tokens, valid, mu_out)
        if self._tables.hist is not None:
            self._tables.advance_history(ss.index, torch.from_numpy(tokens), torch.from_numpy(valid))
        f = torch.from_numpy
        stopped = None if h.stop_ids is None else f((tokens[:, None] == h.stop_ids).any(1))
        return SampleOutput(f(tokens), f(valid), f(lps), f(top_ids), f(top_lps), f(ranks), f(mu_out), stopped)

    # ------------------------------------------------------------------ the general path
    def _sample_general(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor,
                        token_bitmask: torch.Tensor | None) -> SampleOutput:
        """Any slots (a tensor: no host synchronisation), traceable by dynamo: gathers every row each step."""
        rows, slots_t, (bits, n_top, n_bias, restricted) = self._resolve_slots(logits, slots)
        name = self.backend_for(logits.dtype)
        if slots_t.shape[0] == 0:  # nothing to sample (an idle engine step); no backend call
            return _empty_output(logits, n_top)
        stops = (self._book.stop_info(rows) if rows is not None else self._book.live_stop)[0]
        rules = self._rules(rows)
        token_bitmask = self._rule_bitmask(slots_t, rules, logits.shape[1], token_bitmask)
        if rows is None and name == "triton":
            flags, wl = int_to_flags(bits), mask_words(logits.shape[1])
            out = self._sample_slot_indexed(logits, slots_t, token_bitmask, flags, n_top, n_bias, restricted, wl,
                                            self._tables.dry(slots_t, rules))
            self._tables.advance_history(slots_t, out.tokens, out.valid)  # (the kernels updated the rest)
        else:
            batch = self._row_batch(logits, rows, slots_t, (bits, n_top, n_bias, restricted), token_bitmask)
            out = sample_packed(name, batch)
            self._advance(slots_t, batch.steps, out)
        if stops:
            out.stopped = self._stopped(out.tokens, slots_t)
        return out

    def _rules(self, rows: list[int] | None) -> RuleInfo:
        """The per-step bans of ``rows`` (None: a tensor of slots, so every slot in use)."""
        return self._book.rule_info(rows) if rows is not None else self._book.live_rules

    def _rule_bitmask(self, slots_t: torch.Tensor, info: RuleInfo, width: int, token_bitmask: torch.Tensor | None,
                      steps: torch.Tensor | None = None) -> torch.Tensor | None:
        """``token_bitmask`` AND-ed with the per-step bans of ``slots_t`` (docs/semantics.md §3 A): stop ids while a
        slot's step is below its ``min_tokens``, and the history rules (`fastsampler._history`) on its history ring;
        ``(B, ceil(width / 32))`` int32 on the device, no read-back; ``token_bitmask`` itself when nothing is banned.
        ``steps``: the slots' steps (default: read from the table)."""
        if not info.any:
            return token_bitmask
        t = self._tables
        b, wl = slots_t.shape[0], mask_words(width)
        keep = None
        if info.stop_ban:
            assert t.stop_mask is not None
            if steps is None:
                steps = t.steps.index_select(0, slots_t)
            keep = _stop_keep(t.stop_mask.index_select(0, slots_t), t.iparams.index_select(0, slots_t), steps, wl)
        if info.history:
            assert t.hist is not None
            bad = t.bad if info.bad_words else None
            hk = self._pad_words(ring_keep(t.hist, t.hist_total, t.ngram, info.ngram_sizes, bad, slots_t, t.words),
                                 wl, -1)
            keep = hk if keep is None else keep & hk
        assert keep is not None
        return keep if token_bitmask is None else keep & self._check_bitmask(token_bitmask, b, wl)

    def _ends(self, tokens: torch.Tensor, slots_t: torch.Tensor) -> torch.Tensor:
        """Whether each token ends its slot's request (its stop ids; the EOS ids unless it ignores EOS), whether or
        not any slot has stop ids."""
        t = self._tables
        if t.stop_ids is not None:
            return self._stopped(tokens, slots_t)
        if not t.eos.numel():
            return torch.zeros_like(tokens, dtype=torch.bool)
        use = t.iparams.index_select(0, slots_t)[:, I_IGNORE_EOS] == 0
        return (tokens[:, None] == t.eos.to(torch.int64)[None, :]).any(1) & use

    def _stopped(self, tokens: torch.Tensor, slots_t: torch.Tensor) -> torch.Tensor:
        """`SampleOutput.stopped`: whether each token ends its slot's request (stop ids, EOS unless ignored)."""
        assert self._tables.stop_ids is not None
        return (tokens[:, None] == self._tables.stop_ids.index_select(0, slots_t)).any(1)

    @_locked
    def sampling_probs(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor, *,
                       token_bitmask: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution `sample` would draw row ``r``'s token from, for slot ``slots[r]``, ``(B, V')`` float32;
        nothing advances. Zero outside the kept set, one-hot for greedy rows, all zero for invalid rows (as
        `fastsampler.sampling_probs`). Arguments as in `sample` (numpy logits give a numpy array).

        >>> import torch, fastsampler
        >>> s = fastsampler.Sampler(vocab_size=3, max_slots=1, backend="reference")
        >>> slot = s.add(fastsampler.SamplingParams(top_k=2))[0]
        >>> [round(p, 3) for p in s.sampling_probs(torch.tensor([[0.0, 0.0, -1.0]]), [slot])[0].tolist()]
        [0.5, 0.5, 0.0]
        >>> s.step_of(slot)
        0
        """
        if not isinstance(logits, torch.Tensor):
            return self.sampling_probs(self._numpy_logits(logits), slots, token_bitmask=token_bitmask).numpy()
        rows, slots_t, agg = self._resolve_slots(logits, slots)
        name = self.backend_for(logits.dtype)
        if slots_t.shape[0] == 0:
            return logits.new_zeros(logits.shape, dtype=torch.float32)
        token_bitmask = self._rule_bitmask(slots_t, self._rules(rows), logits.shape[1], token_bitmask)
        batch = self._row_batch(logits, rows, slots_t, agg, token_bitmask)
        return backends.load(name).sampling_probs_packed(batch).to(logits.device)

    @_locked
    def verify(self, logits: Any, draft_tokens: Any, slots: Sequence[int] | torch.Tensor, *,
               draft_probs: torch.Tensor | None = None, method: str | None = None) -> VerifyOutput:
        """Verify ``K`` draft tokens per slot against the target model's logits, and advance each slot by the tokens
        it emits (speculative decoding, docs/semantics.md §11).

        Row ``b`` is slot ``slots[b]``; ``logits[b, j]`` are the target's logits after the slot's tokens so far and
        its first ``j`` drafts. Positions run in order: position ``j`` is scored on the slot's state after the
        tokens emitted before it (step, penalty counts, Mirostat ``mu``), exactly as a step at ``step + j``.

        - ``method="match"`` (the default without ``draft_probs``): position ``j`` draws a token as `sample` would,
          and the draft is accepted while it equals it. The tokens are those of non-speculative decoding, token for
          token.
        - ``method="rejection"`` (the default with ``draft_probs``): the draft ``d`` is accepted when
          ``u * q[d] < p[d]`` (``p`` = `sampling_probs` of the position, ``q`` = ``draft_probs``, one-hot at ``d``
          when None), else the token is drawn from ``max(0, p - q)`` normalised; ``u`` and that draw use the
          reserved Philox stream 2 of docs/semantics.md §7, so results are reproducible and batch-invariant.
          The emitted tokens follow the target's distribution whatever the draft.

        A row stops at its first rejected position (whose token it still emits), after ``K`` accepted drafts plus
        one bonus token from position ``K``, at an emitted token that ends its request (one of its
        ``stop_token_ids``, or an EOS id unless ``ignore_eos``), or at an invalid position (nothing emitted there).
        Steps, counts and ``mu`` advance by the emitted tokens only. Positions run as up to ``2 (K + 1)`` backend
        calls without a host synchronisation (a CPU sampler stops early once every row has stopped).

        Parameters
        ----------
        logits : (B, K + 1, V') torch.Tensor or numpy array
            On the sampler's device, ``V' >= vocab_size`` (numpy on a CPU sampler: numpy outputs).
        draft_tokens : (B, K) ints (tensor, array or nested sequence)
            In ``[0, vocab_size)`` (a device tensor is read back once to check them).
        slots : sequence of B ints, or (B,) integer tensor
            Distinct slots in use, as in `sample`.
        draft_probs : (B, K, >= vocab_size) float tensor, optional
            The draft model's distribution at each position (non-negative; rows need not be normalised).
        method : {'match', 'rejection'}, optional

        Returns
        -------
        VerifyOutput

        Examples
        --------
        >>> import torch, fastsampler
        >>> s = fastsampler.Sampler(vocab_size=4, max_slots=1, backend="reference")
        >>> slot = s.add(fastsampler.SamplingParams(temperature=0.0))[0]
        >>> logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0], [5.0, 0.0, 0.0, 0.0]]])
        >>> out = s.verify(logits, [[1, 3]], [slot])
        >>> out.tokens.tolist(), out.num_accepted.tolist(), s.step_of(slot)
        ([[1, 2, -1]], [1], 2)
        """
        from ._speculative import VerifyRecord, accept_or_recover, verify_method, verify_uniforms

        if not isinstance(logits, torch.Tensor):
            x = self._numpy_logits(logits)
            return self.verify(x, draft_tokens, slots, draft_probs=draft_probs, method=method).numpy()
        if logits.dim() != 3:
            raise ValueError(f"logits must have shape (batch_size, K + 1, >= {self._vocab}), got "
                             f"{tuple(logits.shape)}")
        method = verify_method(method, draft_probs)
        b, k1 = logits.shape[0], logits.shape[1]
        k = k1 - 1
        if k < 0:
            raise ValueError("logits must have K + 1 >= 1 positions per row")
        rows, slots_t, agg = self._resolve_slots(logits[:, 0], slots)
        name = self.backend_for(logits.dtype)
        dev = self._device
        drafts = _draft_tensor(draft_tokens, b, k, self._vocab, dev)
        q_all = None
        if draft_probs is not None:
            if draft_probs.dim() != 3 or draft_probs.shape[:2] != (b, k) or draft_probs.shape[2] < self._vocab:
                raise ValueError(f"draft_probs must have shape ({b}, {k}, >= {self._vocab}), got "
                                 f"{tuple(draft_probs.shape)}")
            q_all = draft_probs.to(dev)
            if dev.type == "cpu" and q_all.numel() and not bool(q_all[..., :self._vocab].min() >= 0):  # (NaN too)
                raise ValueError("draft_probs must be non-negative probabilities")
        i64, f32 = torch.int64, torch.float32
        rec = VerifyRecord(b, k1, agg[1], dev)
        mod = backends.load(name)
        rules = self._rules(rows)
        if method == "rejection" and b and k:  # every position's uniforms at once (a row at position j is at step + j)
            t = self._tables
            pos = torch.arange(k, dtype=i64, device=dev)[None, :]
            u_all, v_all = verify_uniforms(t.seeds.index_select(0, slots_t)[:, None],
                                           t.steps.index_select(0, slots_t)[:, None] + pos,
                                           t.seqs.index_select(0, slots_t)[:, None])
        for j in range(k1 if b else 0):
            tb = self._rule_bitmask(slots_t, rules, logits.shape[2], None)  # (the history grew with the last token)
            batch = self._row_batch(logits[:, j], rows, slots_t, agg, tb)
            if j < k and method == "rejection":
                p = mod.sampling_probs_packed(batch)
                q = None if q_all is None else q_all[:, j]
                tok, acc = accept_or_recover(p, drafts[:, j], q, (u_all[:, j], v_all[:, j]), self._vocab)
                # (a row without mass is invalid: its forced token is never used)
                out = run_backend(name, dataclasses.replace(batch, forced_tokens=tok.clamp(min=0)))
            else:
                out = run_backend(name, batch)
                acc = out.tokens == drafts[:, j] if j < k else torch.zeros_like(rec.active)
            emit = rec.emit(j, out, acc, self._ends(out.tokens, slots_t))
            mu = torch.where(emit, out.mirostat_mu.to(f32), batch.mirostat_mu)
            self._tables.advance(slots_t, batch.steps, dataclasses.replace(out, valid=emit, mirostat_mu=mu))
            if dev.type == "cpu" and not bool(rec.active.any()):
                break
        return rec.output(self._tables.mu.index_select(0, slots_t))

    def score(self, logits: Any, token_ids: Any, *, top_n: int = 0, extra_token_ids: Any = None) -> ScoreOutput:
        """Raw logprobs of given tokens (echo / prompt logprobs): `fastsampler.score` on this Sampler's device,
        backend and vocabulary. Row ``t`` of ``logits`` scores ``token_ids[t]``; for a request's prompt ``p`` with
        prefill logits ``L``, ``score(L[:-1], p[1:])``. Reads no slot and changes nothing.

        >>> import torch, fastsampler
        >>> s = fastsampler.Sampler(vocab_size=3, max_slots=1, backend="reference")
        >>> out = s.score(torch.tensor([[0.0, 0.0, 0.0]]), [1], top_n=1)
        >>> round(out.logprobs[0].item(), 4), out.ranks.tolist()
        (-1.0986, [1])
        """
        from ._score import score

        if isinstance(logits, torch.Tensor):
            self._check_logits(logits, logits.shape[0] if logits.dim() == 2 else -1)
        else:
            logits = self._numpy_logits(logits)
            return self.score(logits, token_ids, top_n=top_n, extra_token_ids=extra_token_ids).numpy()
        return score(logits, token_ids, top_n=top_n, extra_token_ids=extra_token_ids, vocab_size=self._vocab,
                     backend=self.backend_for(logits.dtype))

    def _resolve_slots(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor
                       ) -> tuple[list[int] | None, torch.Tensor, tuple[int, int, int, bool]]:
        """Check ``slots`` and ``logits``: (the slots as a list, or None for a tensor of slots, which is not read
        back; the slots as an int64 tensor on the device; the host aggregate: flag bits, top-logprob width,
        logit-bias width, restricted ids — over the slots, or over every slot in use for a tensor)."""
        dev = self._device
        if isinstance(slots, torch.Tensor):
            if slots.dim() != 1 or slots.dtype.is_floating_point or slots.dtype == torch.bool:
                raise TypeError(f"slots must be a 1-D integer tensor, got {slots.dtype} of shape {tuple(slots.shape)}")
            b = slots.shape[0]
            self._check_logits(logits, b)
            return None, slots.to(device=dev, dtype=torch.int64, non_blocking=True), self._book.live
        if isinstance(slots, (int, np.integer)):
            raise TypeError(f"slots must be a sequence of ints or a tensor, got {slots!r}")
        rows = [self._check_slot(s) for s in slots]
        b = len(rows)
        if len(set(rows)) != b:
            raise ValueError(f"slots must be distinct within a batch, got {rows}")
        self._check_logits(logits, b)
        return rows, torch.tensor(rows, dtype=torch.int64, device=dev), self._book.aggregate(rows)

    def _row_batch(self, logits: torch.Tensor, rows: list[int] | None, slots_t: torch.Tensor,
                   agg: tuple[int, int, int, bool], token_bitmask: torch.Tensor | None) -> PackedBatch:
        """The row-indexed batch of ``slots_t``: every table's rows gathered (`_resolve_slots` gives the rest)."""
        bits, n_top, n_bias, restricted = agg
        b, flags, wl = slots_t.shape[0], int_to_flags(bits), mask_words(logits.shape[1])
        allowed = None
        if restricted and self._tables.allowed is not None:
            allowed = self._pad_words(self._tables.allowed.index_select(0, slots_t), wl, -1)
        if token_bitmask is not None:
            tb = self._check_bitmask(token_bitmask, b, wl)
            allowed = tb if allowed is None else allowed & tb
        prompt_mask = output_counts = None
        if flags.any_penalty:
            prompt_mask = self._pad_words(self._tables.prompt.index_select(0, slots_t), wl, 0)
            output_counts = self._tables.counts.index_select(0, slots_t)
        bias_indptr = bias_ids = bias_vals = None
        if n_bias:
            if rows is None:
                bias_indptr, bias_ids, bias_vals = self._tables.bias_csr(slots_t, n_bias)
            else:
                bias_indptr, bias_ids, bias_vals = self._book.bias_csr(rows, self._device)
        dry_ids, dry_vals = self._tables.dry(slots_t, self._rules(rows))
        return PackedBatch(
            logits=logits,
            vocab_size=self._vocab,
            fparams=self._tables.fparams.index_select(0, slots_t),
            iparams=self._tables.iparams.index_select(0, slots_t),
            seeds=self._tables.seeds.index_select(0, slots_t),
            steps=self._tables.steps.index_select(0, slots_t),
            seqs=self._tables.seqs.index_select(0, slots_t),
            mirostat_mu=self._tables.mu.index_select(0, slots_t),
            allowed_mask=allowed,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            bias_indptr=bias_indptr,
            bias_ids=bias_ids,
            bias_vals=bias_vals,
            eos_ids=self._tables.eos,
            n_top=n_top,
            flags=flags,
            dry_ids=dry_ids,
            dry_vals=dry_vals,
        )

    def _sample_slot_indexed(self, logits: torch.Tensor, slots_t: torch.Tensor, token_bitmask: torch.Tensor | None,
                             flags: Any, n_top: int, n_bias: int, restricted: bool, wl: int,
                             dry: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> SampleOutput:
        """A step with a tensor of slots on the Triton backend: the kernels read the state tables through the slot
        index and apply the state update in place (`PackedBatch.slot_index`, ``update_state``), so the step runs
        no torch op of its own. While tracing, `sample_packed` gathers the rows for the custom op and applies the
        update outside it (the op mutates nothing)."""
        tb = None if token_bitmask is None else self._check_bitmask(token_bitmask, slots_t.shape[0], wl)
        bias = (self._tables.bias_ids, self._tables.bias_vals, self._tables.bias_len) if n_bias else (None, None, None)
        batch = PackedBatch(
            logits=logits,
            vocab_size=self._vocab,
            fparams=self._tables.fparams,
            iparams=self._tables.iparams,
            seeds=self._tables.seeds,
            steps=self._tables.steps,
            seqs=self._tables.seqs,
            mirostat_mu=self._tables.mu,
            allowed_mask=self._tables.allowed if restricted else None,
            prompt_mask=self._tables.prompt if flags.any_penalty else None,
            output_counts=self._tables.counts,
            eos_ids=self._tables.eos,
            n_top=n_top,
            flags=flags,
            slot_index=slots_t,
            token_bitmask=tb,
            bias_table_ids=bias[0],
            bias_table_vals=bias[1],
            bias_table_len=bias[2],
            update_state=True,
            dry_ids=dry[0],
            dry_vals=dry[1],
        )
        return sample_packed("triton", batch)

    def _advance(self, slots_t: torch.Tensor, steps: torch.Tensor, out: SampleOutput) -> None:
        """The state updates after a step, on the device (slots are distinct, so the scatters do not collide)."""
        self._tables.advance(slots_t, steps, out)

    @staticmethod
    def _pad_words(mask: torch.Tensor, wl: int, fill: int) -> torch.Tensor:
        w = mask.shape[1]
        if wl > w:  # logits wider than the vocabulary: the extra columns are padding, masked by the backend anyway
            mask = torch.nn.functional.pad(mask, (0, wl - w), value=fill)
        return mask

    def _check_bitmask(self, tb: Any, b: int, wl: int) -> torch.Tensor:
        if not isinstance(tb, torch.Tensor):
            raise TypeError(f"token_bitmask must be a torch.Tensor, got {type(tb).__name__}")
        if tb.dtype != torch.int32:
            raise TypeError(f"token_bitmask must be int32 (packed bits, 1 = allowed), got {tb.dtype}")
        need = self._words
        if tb.dim() != 2 or tb.shape[0] != b or tb.shape[1] < need:
            raise ValueError(f"token_bitmask must have shape ({b}, {need}) (ceil(vocab_size / 32) words per row), got "
                             f"{tuple(tb.shape)}")
        tb = tb.to(self._device, non_blocking=True)
        if tb.shape[1] < wl:
            tb = torch.nn.functional.pad(tb, (0, wl - tb.shape[1]), value=-1)
        return tb[:, :wl].contiguous()


@dataclasses.dataclass(frozen=True)
class SlotState:
    """One slot's whole state on the host (`Sampler.export`, `Sampler.restore`): picklable, device-free.

    Attributes
    ----------
    params : SamplingParams
        The request's parameters.
    seed : int
        Its uint64 seed (the random one `Sampler.add` drew when ``params.seed`` was None).
    seq : int
        The sample index within the request.
    step : int
        Tokens generated so far.
    mirostat_mu : float
        Mirostat state (NaN without Mirostat).
    output_counts : np.ndarray
        ``(V,)`` int16 counts of the generated tokens.
    prompt_mask : np.ndarray
        ``(ceil(V / 32),)`` int32 prompt bitmask.
    history : np.ndarray
        The last tokens of prompt + output the slot kept (its Sampler's ``history_len``), oldest first, int64.
    history_total : int
        How many tokens of prompt + output the history has seen in all.
    history_start : int
        Where the output starts in that count (the prompt's length).
    """

    params: SamplingParams
    seed: int
    seq: int
    step: int
    mirostat_mu: float
    output_counts: np.ndarray
    prompt_mask: np.ndarray
    history: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    history_total: int = 0
    history_start: int = 0


def _empty_output(logits: torch.Tensor, n_top: int) -> SampleOutput:
    """The result of a step without rows (an idle engine step): empty tensors on the logits' device."""
    e = logits.new_empty
    return SampleOutput(e((0,), dtype=torch.int64), e((0,), dtype=torch.bool), e((0,), dtype=torch.float32),
                        e((0, n_top), dtype=torch.int64), e((0, n_top), dtype=torch.float32),
                        e((0,), dtype=torch.int64), e((0,), dtype=torch.float32))


class _SlotSet:
    """What a step with one list of slots needs that does not change between steps (until `Sampler.add` /
    `remove` / `reset` / a reallocation drop it): the host-known flags, ``N``, the logit-bias CSR, and the slots' rows
    of the packed parameters, seeds, seqs, prompt mask and allowed mask (views of the state for consecutive slots,
    else gathered once: ``B * V / 8`` bytes per mask, so a `Sampler` keeps at most `_MAX_SLOT_SETS` lists). Per step
    only steps, ``mu`` and the output counts are read (views for consecutive slots, else one gather each).
    """

    __slots__ = ("b", "index", "span", "flags", "n_top", "n_bias", "fparams", "iparams", "seeds", "seqs", "bias",
                 "eos", "_allowed", "_prompt", "_masks", "_host", "rules", "stop_ids")

    def __init__(self, s: Sampler, rows: list[int]) -> None:
        self.b = len(rows)
        self.index = to_device(np.array(rows, dtype=np.int64), s._device)
        lo = rows[0] if rows else 0
        self.span = (lo, lo + len(rows)) if rows and rows == list(range(lo, lo + len(rows))) else None
        bits, self.n_top, self.n_bias, restricted = s._book.aggregate(rows)
        self.flags = int_to_flags(bits)
        idx, span = self.index, self.span

        def take(t: torch.Tensor) -> torch.Tensor:  # consecutive slots: a view (no memory), else a gather
            return t[span[0]:span[1]] if span is not None else t.index_select(0, idx)

        t = s._tables
        self.fparams, self.iparams, self.seeds, self.seqs = (take(x) for x in (t.fparams, t.iparams, t.seeds, t.seqs))
        self._allowed = take(s._tables.allowed) if restricted and s._tables.allowed is not None else None
        self._prompt = take(s._tables.prompt) if self.flags.any_penalty else None
        self.bias = s._book.bias_csr(rows, s._device) if self.n_bias and rows else None
        self.eos = s._tables.eos
        stops = s._book.stop_info(rows)[0]
        self.rules = s._book.rule_info(rows)  # the per-step bans (`Sampler._rule_bitmask`)
        self.stop_ids = take(t.stop_ids) if stops and t.stop_ids is not None else None  # (B, E + L) ending ids
        self._masks: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._host: dict[int, _HostRows] = {}

    def masks(self, wl: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The allowed mask and the prompt mask (None when unused), padded to ``wl`` words."""
        m = self._masks.get(wl)
        if m is None:
            allowed = None if self._allowed is None else Sampler._pad_words(self._allowed, wl, -1)
            prompt = None if self._prompt is None else Sampler._pad_words(self._prompt, wl, 0)
            m = self._masks[wl] = (allowed, prompt)
        return m

    def host(self, wl: int, vocab: int, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> _HostRows:
        """The same rows as numpy arrays (CPU), for logits of ``wl`` mask words and a vocabulary of ``vocab``;
        ``state``: the sampler's host steps, ``mu`` and counts."""
        h = self._host.get(wl)
        if h is None:
            h = self._host[wl] = _HostRows(self, wl, vocab, state)
        return h


class _HostRows:
    """Numpy views of a CPU `_SlotSet`'s tensors: the arguments of ``_C.sample`` that stay fixed."""

    __slots__ = ("index", "f", "i", "seeds", "seqs", "allowed", "prompt", "bias_indptr", "bias_ids", "bias_vals",
                 "eos", "steps", "mu", "counts", "stop_ids")

    def __init__(self, ss: _SlotSet, wl: int, vocab: int, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        allowed, prompt = ss.masks(wl)
        self.index = ss.index.numpy()
        # consecutive slots: views of the state that changes every step (steps, mu, counts when penalised), which
        # the kernel reads in place; else None (gathered each step)
        self.steps = self.mu = self.counts = None
        if ss.span is not None:
            lo, hi = ss.span
            self.steps, self.mu = state[0][lo:hi], state[1][lo:hi]
            self.counts = state[2][lo:hi] if ss.flags.any_penalty else None
        self.f, self.i, self.seeds, self.seqs = (ss.fparams.numpy(), ss.iparams.numpy(), ss.seeds.numpy(),
                                                 ss.seqs.numpy())
        self.allowed = None if allowed is None else allowed.numpy()
        self.prompt = None if prompt is None else prompt.numpy()
        self.bias_indptr, self.bias_ids, self.bias_vals = (None, None, None) if ss.bias is None else tuple(
            t.numpy() for t in ss.bias)
        self.eos = ss.eos.numpy()
        self.stop_ids = None if ss.stop_ids is None else ss.stop_ids.numpy()


def _stop_keep(stop_mask: torch.Tensor, iparams: torch.Tensor, steps: torch.Tensor, wl: int) -> torch.Tensor:
    """``(B, wl)`` int32 allowed bits from the rows' stop-id ban bits ``(B, W)``: cleared while a row's step is
    below its ``min_tokens`` (``iparams`` rows), all ones after (and in the padding words)."""
    keep = torch.where((steps < iparams[:, I_MIN_TOKENS].to(torch.int64))[:, None], ~stop_mask, -1)
    return Sampler._pad_words(keep, wl, -1)


def _draft_tensor(drafts: Any, b: int, k: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Draft tokens as a ``(b, k)`` int64 tensor on ``device``, every id checked in ``[0, vocab)`` (a device tensor
    is read back once for the check)."""
    if isinstance(drafts, torch.Tensor):
        out = id_tensor(drafts, "draft_tokens", vocab, device)
    else:
        rows = [id_array(r, "draft_tokens") for r in drafts] if not isinstance(drafts, np.ndarray) else None
        arr = np.asarray(drafts) if rows is None else (np.stack(rows) if rows and len({r.size for r in rows}) == 1
                                                       else None)
        if arr is None and rows is not None and rows:
            raise ValueError(f"draft_tokens must hold K = {k} ids for every row, got rows of {[r.size for r in rows]}")
        arr = np.zeros((0, k), dtype=np.int64) if arr is None else arr
        if arr.size and arr.dtype.kind not in "iu":
            raise TypeError(f"draft_tokens must hold integer token ids, got dtype {arr.dtype}")
        out = torch.from_numpy(arr.astype(np.int64)).to(device)
    if out.numel() == 0 and b * k == 0:
        return out.reshape(b, k)
    if tuple(out.shape) != (b, k):
        raise ValueError(f"draft_tokens must have shape ({b}, {k}) (K = logits.shape[1] - 1 per row), got "
                         f"{tuple(out.shape)}")
    return out if isinstance(drafts, torch.Tensor) else id_tensor(out, "draft_tokens", vocab, device)
