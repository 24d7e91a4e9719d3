"""The C++ CPU backend: `fastsampler.backends.cpu._C` kernels on CPU tensors and numpy arrays.

The same pipeline as every backend (docs/semantics.md §2, §3, §7) in float32, rows in parallel across cores on a
persistent thread pool (see ``docs/cpu.md``). The thread count is ``set_num_threads(n)`` (0: all cores) or the
``FASTSAMPLER_NUM_THREADS`` environment variable; batches of fewer than `SINGLE_THREAD_BELOW` logits (``B * V``)
run on the calling thread alone (`threads_for`).

Backend module interface (see `fastsampler._api`): `is_available`, `supports`, `sample_packed`,
`sampling_probs_packed`. Also `kept_mask_packed` (the exact kept set) and `scratch_bytes` (per-thread buffer memory).
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any

import numpy as np
import torch

from ..._batch import HostBatch, PackedBatch
from ...layout import check_extension_layout
from ...output import SampleOutput
from .. import Capabilities

__all__ = ["CAPABILITIES", "is_available", "supports", "sample_packed", "sampling_probs_packed", "kept_mask_packed",
           "set_num_threads", "get_num_threads", "scratch_bytes", "threads_for", "sample_arrays", "sample_host",
           "advance_arrays", "logits_array", "build_info", "history_keep", "dry_edits",
           "SINGLE_THREAD_BELOW"]

SINGLE_THREAD_BELOW = 16384
"""Batches with fewer logits than this (``B * V``) run on the calling thread: a greedy batch of that size takes under
8 µs, about what waking a pool worker can save (see ``docs/sampler.md``, "Overhead", for the measurements)."""

REINSTALL = "pip install --force-reinstall --no-build-isolation --no-deps .  (rebuilds the C++ extension)"

SIMD_PATHS = ("avx512", "avx2", "portable")
"""The SIMD paths of the extension, best first: one module each (``_C_avx512``, ``_C_avx2``, ``_C_portable``; only
``_C_portable`` off x86-64), of which the best this CPU runs is imported as ``_C`` (``FASTSAMPLER_SIMD`` overrides the
choice; docs/cpu.md)."""


def _built(name: str) -> bool:
    """Whether the extension module ``name`` (``_C``, ``_C_avx2``, ...) is in this package's directory (looked up
    without importing it: a variant this CPU cannot run must not be loaded)."""
    return any(os.path.exists(os.path.join(d, name + s)) for d in __path__ for s in EXTENSION_SUFFIXES)


def built_simd_paths() -> tuple[str, ...]:
    """The SIMD variants present in this installation (whether or not this CPU runs them), best first."""
    return tuple(p for p in SIMD_PATHS if _built(f"_C_{p}"))


def cpu_simd_paths() -> tuple[str, ...]:
    """The SIMD paths this CPU runs, best first (asked of the portable module, which runs everywhere; ``()`` when it is
    not built)."""
    if not _built("_C_portable"):
        return ()
    feats = importlib.import_module(f"{__name__}._C_portable").cpu_features()
    return tuple(p for p in SIMD_PATHS if feats.get(p))


def _load_extension() -> Any:
    """The extension module to use as ``_C``: a single ``_C`` build (``FASTSAMPLER_NATIVE=1``, the sanitizer build) if
    there is one, else the best variant this CPU runs, or the one ``FASTSAMPLER_SIMD`` names.

    Raises ``ValueError`` for a ``FASTSAMPLER_SIMD`` that names no path and ``RuntimeError`` for one this CPU cannot
    run or this installation lacks (an explicit request is never silently replaced by another path); ``ImportError``
    when no extension is built.
    """
    want = os.environ.get("FASTSAMPLER_SIMD", "").strip().lower()
    if want not in ("", "auto", *SIMD_PATHS):
        raise ValueError(f"FASTSAMPLER_SIMD must be one of auto, {', '.join(SIMD_PATHS)} (or unset), got "
                         f"{os.environ['FASTSAMPLER_SIMD']!r}")
    built = built_simd_paths()
    if _built("_C"):
        mod = importlib.import_module(f"{__name__}._C")
        if want not in ("", "auto") and want != mod.simd():
            raise RuntimeError(f"FASTSAMPLER_SIMD={want!r}, but this installation is a single {mod.simd()} build "
                               f"({mod.__file__}); rebuild without FASTSAMPLER_NATIVE for every path")
        return mod
    if not built:
        raise ImportError("no C++ extension module (_C_avx512, _C_avx2, _C_portable or _C) is built")
    runs = cpu_simd_paths()
    if want in ("", "auto"):
        usable = [p for p in built if p in runs]
        if not usable:  # pragma: no cover - the portable module is always built and runs everywhere
            raise ImportError(f"none of the built SIMD paths ({', '.join(built)}) runs on this CPU")
        want = usable[0]
    elif want not in built:
        raise RuntimeError(f"FASTSAMPLER_SIMD={want!r}, but this installation has no {want} kernels (built: "
                           f"{', '.join(built)})")
    elif want not in runs:
        raise RuntimeError(f"FASTSAMPLER_SIMD={want!r}, but this CPU does not run it (it runs: {', '.join(runs)})")
    mod = importlib.import_module(f"{__name__}._C_{want}")
    sys.modules[f"{__name__}._C"] = mod  # `import fastsampler.backends.cpu._C` names the chosen module
    return mod


try:
    _C = _load_extension()
    check_extension_layout(getattr(_C, "LAYOUT", {}))
    _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = f"the C++ extension fastsampler.backends.cpu._C did not import ({e}); rebuild it with: {REINSTALL}"

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
CAPABILITIES = Capabilities(devices=("cpu",), dtypes=tuple(_DTYPES), features=frozenset({"host_batch"}))


def is_available() -> tuple[bool, str]:
    """``(True, "")`` when the compiled extension imports, else ``(False, reason with the reinstall command)``."""
    if _C is None:
        return False, str(_IMPORT_ERROR)
    return True, ""


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """CPU tensors of float32, float16 or bfloat16."""
    return torch.device(device).type == "cpu" and dtype in _DTYPES


def build_info() -> dict[str, Any]:
    """How the extension was built: ``{"simd": "avx512" | "avx2" | "portable", "openmp": bool}`` (quote the SIMD
    path with every CPU figure); ``{"simd": "unavailable", "openmp": False}`` when it did not import."""
    if _C is None:
        return {"simd": "unavailable", "openmp": False}
    return {"simd": str(_C.simd()), "openmp": bool(_C.has_openmp())}


def _require() -> Any:
    if _C is None:
        raise ImportError(f"backend='cpu' is unavailable: {_IMPORT_ERROR}")
    return _C


def set_num_threads(n: int) -> None:
    """Threads the CPU kernels use for the rows of a batch; ``0`` restores the default (all cores).

    Examples
    --------
    >>> import fastsampler.backends.cpu as cpu
    >>> cpu.set_num_threads(1); cpu.get_num_threads()
    1
    >>> cpu.set_num_threads(0)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"num_threads must be an int >= 0, got {n!r}")
    if n < 0:
        raise ValueError(f"num_threads must be >= 0 (0: all cores), got {n}")
    _require().set_num_threads(int(n))
    _THREADS.clear()


def get_num_threads() -> int:
    """Threads the CPU kernels use (the default is every core OpenMP sees)."""
    return int(_require().get_num_threads())


_THREADS: list[int] = []  # get_num_threads(), resolved once (the default asks the OS each time); set_num_threads clears


def threads_for(batch: int, vocab: int) -> int:
    """The ``num_threads`` argument the kernels get for a ``(batch, vocab)`` call: 1 below `SINGLE_THREAD_BELOW`
    logits or for one row, else `get_num_threads` (resolved here once, so the extension does not ask the OS for the
    core count on every call).

    Examples
    --------
    >>> import fastsampler.backends.cpu as cpu
    >>> cpu.threads_for(8, 1024)
    1
    >>> cpu.threads_for(64, 128256) == cpu.get_num_threads()
    True
    """
    if batch <= 1 or batch * vocab < SINGLE_THREAD_BELOW:
        return 1
    if not _THREADS:
        _THREADS.append(get_num_threads())
    return _THREADS[0]


def scratch_bytes() -> int:
    """Bytes currently held by the kernels' per-thread scratch buffers, over all threads and input dtypes.

    Each thread keeps its buffers between calls (steady-state decoding allocates nothing), except that at the end
    of every call a thread whose buffers exceed ``_C.SCRATCH_CAP_BYTES`` (20 MiB, enough for rows of
    2^18 = 262144 ids) frees them, so a one-off call on a larger vocabulary does not keep its memory (see
    ``docs/cpu.md``). Thread-safe; the value may lag a call that is running concurrently.

    Examples
    --------
    >>> import fastsampler.backends.cpu as cpu
    >>> cpu.scratch_bytes() >= 0
    True
    """
    return int(_require().scratch_bytes())


if _C is not None and os.environ.get("FASTSAMPLER_NUM_THREADS"):
    try:
        set_num_threads(int(os.environ["FASTSAMPLER_NUM_THREADS"]))
    except ValueError as _e:  # pragma: no cover
        raise ValueError(f"FASTSAMPLER_NUM_THREADS must be an int >= 0, got "
                         f"{os.environ['FASTSAMPLER_NUM_THREADS']!r}") from _e


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    """A numpy view of a packed CPU tensor (dtype / shape / contiguity are checked by the extension, by name)."""
    if t is None:
        return None
    try:
        return t.numpy()
    except (RuntimeError, TypeError):  # needs grad, on another device, or a dtype numpy lacks
        t = t.detach()
        if t.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got one on {t.device}") from None
        return t.numpy()


def logits_array(logits: torch.Tensor) -> tuple[np.ndarray, str]:
    if not logits.is_cpu:
        raise ValueError(f"backend='cpu' needs CPU logits, got device {logits.device}")
    name = _DTYPES.get(logits.dtype)
    if name is None:
        raise TypeError(f"backend='cpu' takes float32, float16 or bfloat16 logits, got {logits.dtype}")
    t = logits.detach() if logits.requires_grad else logits
    if not t.is_contiguous() and t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()  # rows may be strided; the vocabulary axis must be contiguous
    if name == "bfloat16":
        return t.view(torch.int16).numpy(), name
    return t.numpy(), name


def _args(batch: PackedBatch) -> tuple[Any, ...]:
    """Positional arguments of ``_C.sample`` / ``_C.sampling_probs`` (up to eos_ids)."""
    logits, name = logits_array(batch.logits)
    return (logits, name, int(batch.vocab_size), *(_np(t) for t in batch.arrays()))


def sample_arrays(args: tuple[Any, ...], n_top: int, forced: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """``_C.sample`` on the positional arguments of `_args` (numpy arrays, up to ``eos_ids``); numpy arrays out
    (tokens, valid, logprobs, top ids, top logprobs, ranks, mu), the threads chosen by `threads_for`. ``forced``:
    int64 ``(B,)`` tokens to take instead of drawing (`PackedBatch.forced_tokens`)."""
    logits = args[0]
    return _require().sample(*args, n_top, threads_for(logits.shape[0], logits.shape[1]), forced)


def advance_arrays(steps: np.ndarray, mu: np.ndarray, counts: np.ndarray, slots: np.ndarray, tokens: np.ndarray,
                   valid: np.ndarray, mu_out: np.ndarray) -> None:
    """A `fastsampler.Sampler` step's state update on its host arrays, in place, in one extension call:
    ``steps[s] += valid[r]``, ``mu[s] = mu_out[r]`` and, for valid rows, ``counts[s, tokens[r]] += 1`` (int16,
    saturating at 32767), with ``s = slots[r]`` (distinct)."""
    _require().advance_state(steps, mu, counts, slots, tokens, valid, mu_out)


def history_keep(ring: Any, total: Any, ngram: Any, bad: Any, rows: Any, words: int) -> np.ndarray:
    """The history rules' allowed-token bitmask ``(len(rows), words)`` int32 (`fastsampler._history.ring_keep`) of
    the history rings ``ring`` (``(S, L)`` int32; ``total``, ``ngram`` ``(S,)`` int64; ``bad`` ``(S, P, M)`` int64
    or None), rows ``rows`` (int64 slots); numpy arrays or CPU tensors."""
    arr = lambda x: None if x is None else (_np(x) if isinstance(x, torch.Tensor) else np.asarray(x))
    return _require().history_keep(arr(ring), arr(total), arr(ngram), arr(bad), arr(rows), int(words))


def dry_edits(ring: Any, total: Any, rows: Any, fd: Any, idry: Any, breakers: Any) -> tuple[np.ndarray, np.ndarray]:
    """DRY's penalty table (docs/semantics.md §3 C; `fastsampler._history.dry_table`) of rows ``rows`` (int64 slots)
    of the history rings ``ring`` (``(S, L)`` int32, token ``j`` at column ``j % L``; ``total`` ``(S,)`` int64 tokens
    written), with per-slot ``fd`` ``(S, 2)`` float64 (multiplier, base; multiplier 0: no DRY), ``idry`` ``(S, 2)``
    int64 (allowed length, ``dry_penalty_last_n``) and ``breakers`` ``(S, P, M)`` int64 (left-aligned, -1 padding) or
    None; numpy arrays or CPU tensors.

    Returns ``(ids, vals)``: ``(B, K)`` int32 ids ascending per row (unused entries ``2^31 - 1``) and ``(B, K)``
    float32 penalties (0 there), ``K`` the largest entry count of any row (may be 0). O(n log n) per row for a window
    of ``n`` tokens, independent of the vocabulary.

    Examples
    --------
    >>> import numpy as np
    >>> import fastsampler.backends.cpu as cpu
    >>> ring = np.array([[0, 1, 2, 2, 1, 2, 5, 0, 1, 2]], dtype=np.int32)   # A B C C B C Y A B C
    >>> ids, vals = cpu.dry_edits(ring, np.array([10]), np.array([0]), np.array([[1.0, 2.0]]),
    ...                           np.array([[1, -1]]), None)
    >>> ids.tolist(), vals.tolist()
    ([[1, 2, 5]], [[1.0, 4.0, 2.0]])
    """
    arr = lambda x: None if x is None else (_np(x) if isinstance(x, torch.Tensor) else np.asarray(x))
    return _require().dry_edits(arr(ring), arr(total), arr(rows), arr(fd), arr(idry), arr(breakers))


def _output(res: tuple[np.ndarray, ...]) -> SampleOutput:
    f = torch.from_numpy
    tokens, valid, lps, top_ids, top_lps, ranks, mu = res
    return SampleOutput(f(tokens), f(valid), f(lps), f(top_ids), f(top_lps), f(ranks), f(mu))


def sample_packed(batch: PackedBatch) -> SampleOutput:
    """Sample a packed batch; torch CPU tensors out (see `fastsampler.SampleOutput`)."""
    forced = None if batch.forced_tokens is None else _np(batch.forced_tokens.to(torch.int64).contiguous())
    return _output(sample_arrays(_args(batch), int(batch.n_top), forced))


def sample_host(batch: HostBatch) -> SampleOutput:
    """`sample_packed` for a batch packed by `fastsampler._batch.pack_host` (numpy arrays: nothing to convert)."""
    x, name = logits_array(batch.logits)
    return _output(sample_arrays((x, name, batch.vocab_size, *batch.arrays()), batch.n_top))


def sampling_probs_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) float32 distribution each row is drawn from (zero outside the kept set)."""
    C = _require()
    b, v = batch.logits.shape
    return torch.from_numpy(C.sampling_probs(*_args(batch), threads_for(b, v)))


def kept_mask_packed(batch: PackedBatch) -> torch.Tensor:
    """(B, V) torch.bool CPU tensor: True exactly on each row's kept set S after truncation (docs/semantics.md §3 E).

    Unlike ``sampling_probs_packed(batch) > 0`` it does not depend on float32 probabilities: a kept token far below
    the maximum (z = -200 next to z = 0) has probability 0 in float32 but is True here. Greedy rows: only the
    argmax token; invalid rows (docs/semantics.md §5) and padding columns (``>= vocab_size``): all False.
    """
    C = _require()
    b, v = batch.logits.shape
    return torch.from_numpy(C.kept_mask(*_args(batch), threads_for(b, v)))
