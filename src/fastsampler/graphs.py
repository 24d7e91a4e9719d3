"""`GraphedStep`: one `Sampler.sample` step captured in a CUDA graph for a fixed batch size, replayed per step.

A decoding step at small batch sizes is dominated by launch latency and host work; replaying a captured graph
removes both. The step is captured with device-tensor slots (the form that never reads device data on the host), so
the kernels, the packing of the slots' state and the state updates (steps, counts, Mirostat ``mu``) all live in the
graph. See ``docs/sampler.md`` ("CUDA graphs").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .output import SampleOutput

if TYPE_CHECKING:  # pragma: no cover
    from .sampler import Sampler

__all__ = ["GraphedStep"]


class GraphedStep:
    """`Sampler.sample` for ``batch_size`` rows, captured in a CUDA graph and replayed on every call.

    Build it with `Sampler.graphed`. Each call copies ``logits``, ``slots`` (and ``token_bitmask``) into the graph's
    static buffers and replays the graph; the result equals an eager ``sampler.sample(logits, slots)`` token for token.
    A new capture happens (on the next call, automatically) when the host-known features of the slots in use change
    (`Sampler.capture_key`: a request with a feature no live slot used joins) or when the sampler reallocated the
    state a graph points to (a wider logit bias, the first allowed-ids request); `Sampler.reserve` before the first
    call avoids the reallocations. Capturing runs the step twice on a side stream (to compile and warm up the
    kernels) and restores every slot's step, counts and ``mu`` afterwards, so capturing changes no state.

    The returned `SampleOutput` holds the graph's static output tensors: the next call overwrites them (clone what
    you keep). Not thread-safe across calls on one `GraphedStep`; the sampler's lock is held for each replay.

    Parameters
    ----------
    sampler : Sampler
        A sampler on a CUDA device.
    batch_size : int
        Rows per step (``>= 1``).
    width : int
        Columns of the logits (``>= sampler.vocab_size``).
    dtype : torch.dtype
        float32, float16 or bfloat16.
    bitmask : bool
        Whether calls pass a ``token_bitmask``.
    """

    def __init__(self, sampler: Sampler, batch_size: int, width: int, dtype: torch.dtype, bitmask: bool) -> None:
        dev = sampler.device
        if dev.type != "cuda":
            raise ValueError(f"graphed() needs a Sampler on a CUDA device (CUDA graphs), got device {dev}")
        for name, val, lo in (("batch_size", batch_size, 1), ("width", width, sampler.vocab_size)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int >= {lo}, got {val!r} of type {type(val).__name__}")
            if val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        sampler.backend_for(dtype)  # raises when no backend runs this dtype on the device
        self.sampler = sampler
        self.batch_size = batch_size
        self.width = width
        self.dtype = dtype
        self._logits = torch.zeros(batch_size, width, dtype=dtype, device=dev)
        self._slots = torch.zeros(batch_size, dtype=torch.int64, device=dev)
        words = (width + 31) // 32
        self._bitmask = torch.full((batch_size, words), -1, dtype=torch.int32, device=dev) if bitmask else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._out: SampleOutput | None = None
        self._key: tuple[Any, ...] | None = None
        self.captures = 0  # how many times the step was captured (for tests and monitoring)

    # ------------------------------------------------------------------ capture
    def _state_key(self) -> tuple[Any, ...]:
        s = self.sampler
        ptr = lambda t: 0 if t is None else t.data_ptr()  # reallocated state needs a new graph
        t = s._tables
        return (s.capture_key, ptr(t.allowed), ptr(t.bias_ids), ptr(t.bias_vals), ptr(t.bias_len), ptr(t.stop_mask),
                ptr(t.stop_ids), ptr(t.bad))

    def _capture(self) -> None:
        s = self.sampler
        t = s._tables
        state = [x for x in (t.steps, t.counts, t.mu, t.hist, t.hist_total) if x is not None]
        saved = [x.clone() for x in state]
        kw = {} if self._bitmask is None else {"token_bitmask": self._bitmask}
        side = torch.cuda.Stream(device=s.device)
        side.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(side):  # compile and warm up the kernels and the allocator outside the capture
            for _ in range(2):
                s.sample(self._logits, self._slots, **kw)
        torch.cuda.current_stream(s.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = s.sample(self._logits, self._slots, **kw)
        # the warm-up steps advanced the slots: put every slot's state back as it was
        for x, y in zip(state, saved, strict=True):
            x.copy_(y)
        self._graph, self._out, self._key = graph, out, self._state_key()
        self.captures += 1

    # ------------------------------------------------------------------ replay
    def __call__(self, logits: torch.Tensor, slots: Sequence[int] | torch.Tensor,
                 token_bitmask: torch.Tensor | None = None) -> SampleOutput:
        """Sample one token per row (as `Sampler.sample`) by replaying the captured step.

        Parameters
        ----------
        logits : (batch_size, width) tensor of the graph's dtype, on the sampler's device
        slots : batch_size distinct slots in use (ints or an integer tensor; not checked on the device path)
        token_bitmask : (batch_size, ceil(width / 32)) int32, only when built with ``bitmask=True``
        """
        b, w = self.batch_size, self.width
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (b, w) or logits.dtype != self.dtype:
            got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"logits must be a ({b}, {w}) {self.dtype} tensor (the captured shape), got {got}")
        if (token_bitmask is None) != (self._bitmask is None):
            raise ValueError("token_bitmask must be passed exactly when the step was built with bitmask=True")
        if isinstance(slots, torch.Tensor):
            if slots.shape != (b,) or slots.dtype.is_floating_point or slots.dtype == torch.bool:
                raise ValueError(f"slots must be a ({b},) integer tensor, got {slots.dtype} {tuple(slots.shape)}")
            self._slots.copy_(slots, non_blocking=True)
        else:
            rows = [self.sampler._check_slot(x) for x in slots]
            if len(rows) != b or len(set(rows)) != b:
                raise ValueError(f"slots must be {b} distinct slots in use, got {rows}")
            self._slots.copy_(torch.tensor(rows, dtype=torch.int64), non_blocking=True)
        self._logits.copy_(logits, non_blocking=True)
        if token_bitmask is not None:
            assert self._bitmask is not None
            if token_bitmask.dtype != torch.int32 or tuple(token_bitmask.shape) != tuple(self._bitmask.shape):
                raise ValueError(f"token_bitmask must be int32 of shape {tuple(self._bitmask.shape)}, got "
                                 f"{token_bitmask.dtype} {tuple(token_bitmask.shape)}")
            self._bitmask.copy_(token_bitmask, non_blocking=True)
        with self.sampler._lock:
            if self._graph is None or self._key != self._state_key():
                self._capture()
            assert self._graph is not None and self._out is not None
            self._graph.replay()
        return self._out
