"""Record the device work of one `fastsampler.Sampler` step of the Triton backend, on the CPU, without a GPU.

The step runs under the Triton interpreter (``TRITON_INTERPRET=1``) with the CUDA launch settings
(`CUDA_KNOBS`). Two things are recorded, in launch order:

- every Triton launch ``kernel[grid](...)``: kernel, grid, every argument (tensor shape / dtype / storage, scalar
  value), constexprs and launch options. The interpreter's launch path (``InterpretedFunction.run``) is patched:
  in *record-only* mode the launch is recorded and returns without running the kernel, so a B = 256 x V = 128256
  step takes seconds. This is exact for the launch list because the Triton backend's host control flow depends only
  on host flags, shapes and ``n_top``, never on device data (module docstring of ``fastsampler/triton/backend.py``);
  what the kernel would have written is zeroed instead (in-range values for host-side ops that index with a
  kernel's output, e.g. the token counts update). With ``execute=True`` the kernels run as well
  (small cases: the test that checks record-only == real execution, and the probe step, which also records the
  bytes every kernel touches);
- every torch op that would launch a device kernel, counted by a ``TorchDispatchMode`` over aten ops. An op counts
  as one kernel when it writes device memory: it mutates a tensor argument (``x.add_``, ``copy_``, ``index_copy_``)
  or returns a tensor in fresh storage (``zeros``, ``where``, ``clone``, ``_to_copy``), with at least one element.
  Pure views and metadata ops (view, reshape, expand, as_strided, alias, detach, _unsafe_view, t, transpose,
  select, slice, unsqueeze, squeeze, permute, lift_fresh, a no-op ``to``) return storage of an input and count 0;
  allocations (``empty*``, ``new_empty*``) count 0; ``_local_scalar_dense`` (``.item()``) is a host
  synchronisation, counted apart. A custom op (``fastsampler::sample_packed``) is entered, so the ops inside it
  are seen. One op is one kernel even where CUDA launches several (sort, cumsum): a lower bound there.

The torch ops run for real on CPU tensors (record-only mode skips only the Triton kernels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

__all__ = ["CUDA_KNOBS", "ArgInfo", "TritonLaunch", "TorchOp", "StepRecord", "record_step", "record_launches",
           "ensure_interpreter", "launch_signature", "KERNEL_PACKAGE"]

# The CUDA launch settings of the Triton backend, forced while recording (read per call by the backend).
CUDA_KNOBS: dict[str, str] = {"FASTSAMPLER_TRITON_CHUNK": "1024", "FASTSAMPLER_TRITON_DIGIT_BITS": "4"}
KERNEL_PACKAGE = "fastsampler.backends.triton."  # kernel names are relative to it ("stats._stats_kernel")

_ALLOC_ONLY = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "equal"}
# indexed reads: the ``self`` operand is read only where indexed (counted as the output's size)
_INDEXED_READ = {"index_select", "gather", "index", "take", "embedding", "searchsorted"}
# indexed writes: write only the indexed elements (counted as the source / values operand), read nothing of ``self``
_INDEXED_WRITE = {"index_copy_", "index_put_", "scatter_", "scatter_add_", "index_add_", "index_fill_",
                  "scatter_reduce_", "masked_scatter_", "_index_put_impl_"}
_OVERWRITE = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "exponential_"}  # do not read ``self``


@dataclass
class ArgInfo:
    """One argument of a Triton launch."""

    name: str
    kind: str  # "tensor", "int", "float", "bool", "none" or "other"
    dtype: str = ""  # tensors: torch dtype without the "torch." prefix
    shape: tuple[int, ...] = ()
    elem_size: int = 0
    storage: int = 0  # identity of the underlying buffer (two arguments on one buffer share it)
    offset_bytes: int = 0  # offset of the view in its buffer
    value: Any = None  # scalars
    logits: bool = False  # the step's logits buffer

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_size

    def key(self) -> tuple:
        """What identifies the argument across runs (no buffer addresses)."""
        if self.kind == "tensor":
            return (self.name, "tensor", self.dtype, self.shape)
        return (self.name, self.kind, self.value if self.kind in ("int", "bool", "none") else None)


@dataclass
class TritonLaunch:
    """One ``kernel[grid](...)`` launch."""

    kernel: str  # "stats._stats_kernel" (module relative to fastsampler.backends.triton, then the function name)
    module: str
    qualname: str
    grid: tuple[int, int, int]
    args: list[ArgInfo]  # the non-constexpr parameters, in order
    constexprs: dict[str, Any]
    options: dict[str, Any]  # launch options (num_warps, num_stages, ...) passed at the call
    # executed runs, per argument: [distinct bytes read, distinct bytes written, bytes loaded, bytes stored] (the
    # last two count every access: a row read once per select level counts once per level)
    touched: dict[str, list[int]] = field(default_factory=dict)

    kind = "triton"

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def key(self) -> tuple:
        return ("triton", self.kernel, self.grid, tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
                tuple(a.key() for a in self.args), tuple(sorted((k, repr(v)) for k, v in self.options.items())))


@dataclass
class TorchOp:
    """One aten op that launches a device kernel (or a host synchronisation, ``kernels == 0``)."""

    op: str  # "aten.index_select.default"
    kernels: int  # 1, or 0 for a host synchronisation
    read_bytes: int
    write_bytes: int
    elements: int  # elements written (sizes the grid of the CUDA kernel)
    logits_read: bool  # reads the whole logits buffer
    sync: bool = False

    kind = "torch"

    def key(self) -> tuple:
        return ("torch", self.op, self.kernels, self.read_bytes, self.write_bytes)


@dataclass
class StepRecord:
    """The device work of one recorded step."""

    scenario: str
    batch: int
    dtype: str
    vocab: int
    launches: list[TritonLaunch | TorchOp]
    logits_bytes: int
    logits_elem_size: int
    executed: bool
    seconds: float
    cuda_settings: str  # how the CUDA block policy was obtained (see `_cuda_block_policy`)

    @property
    def triton(self) -> list[TritonLaunch]:
        return [x for x in self.launches if isinstance(x, TritonLaunch)]

    @property
    def torch_ops(self) -> list[TorchOp]:
        return [x for x in self.launches if isinstance(x, TorchOp)]


def launch_signature(rec: StepRecord) -> list[tuple]:
    """The launch list without buffer addresses or measured values: equal for record-only and executed runs."""
    return [x.key() for x in rec.launches]


# ------------------------------------------------------------------------------------------------ interpreter
def ensure_interpreter() -> None:
    """Make sure Triton kernels are (or will be) built as interpreted functions.

    Sets ``TRITON_INTERPRET=1`` when it is unset. Raises RuntimeError when a kernel module of the backend was
    already imported for native execution (triton.jit reads the flag at decoration time).
    """
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] != "1":
        raise RuntimeError("the cost model records under the Triton interpreter; TRITON_INTERPRET is set to "
                           f"{os.environ['TRITON_INTERPRET']!r} in this process (run it with TRITON_INTERPRET=1, as "
                           "`python -m fastsampler.bench --model` does)")
    try:
        from triton.runtime.jit import JITFunction
    except ImportError as e:  # pragma: no cover - environment
        raise RuntimeError(f"the cost model needs triton: {e}") from e
    for name, mod in list(sys.modules.items()):
        if name.startswith(KERNEL_PACKAGE) and mod is not None:
            for obj in vars(mod).values():
                if isinstance(obj, JITFunction):
                    raise RuntimeError(f"{name} was imported with TRITON_INTERPRET unset (kernel {obj.fn.__name__} "
                                       "is native): the cost model must run in a process that sets "
                                       "TRITON_INTERPRET=1 before the kernels are imported")


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _cuda_block_policy(status: list[str]) -> Iterator[None]:
    """Make the backend choose its CUDA block sizes although the tensors are on the CPU.

    The backend picks some block sizes from the device type (``_Ctx.interp``: e.g. ids per step of a histogram pass),
    which the `CUDA_KNOBS` environment does not cover. While recording, a context built by the backend gets
    ``interp = False`` right after construction, which is what it computes on a CUDA device (record-only launches
    never run, and the interpreter runs any block size). When the backend has no such attribute the policy is left
    alone and ``status`` says so.
    """
    status.append("cuda")
    try:
        from ..backends.triton import backend
    except ImportError:
        status[-1] = "interpreter (triton backend not importable)"
        yield
        return
    cls = getattr(backend, "_Ctx", None)
    orig = getattr(cls, "__init__", None) if cls is not None else None
    if cls is None or orig is None:
        status[-1] = "interpreter (backend._Ctx not found: block sizes may differ from CUDA)"
        yield
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        if hasattr(self, "interp"):
            self.interp = False
        else:
            status[-1] = "interpreter (backend._Ctx has no 'interp': block sizes may differ from CUDA)"

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = orig


def _kernel_name(fn: Any) -> tuple[str, str, str]:
    module = getattr(fn, "__module__", "") or ""
    qual = getattr(fn, "__qualname__", getattr(fn, "__name__", "kernel"))
    short = module[len(KERNEL_PACKAGE):] if module.startswith(KERNEL_PACKAGE) else module
    return f"{short}.{qual}" if short else qual, module, qual


def _is_constexpr(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    return "constexpr" in (annotation if isinstance(annotation, str) else repr(annotation))


def _arg_info(name: str, value: Any, logits_storage: int) -> ArgInfo:
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage().data_ptr()
        return ArgInfo(name=name, kind="tensor", dtype=str(value.dtype).replace("torch.", ""),
                       shape=tuple(int(s) for s in value.shape), elem_size=value.element_size(), storage=storage,
                       offset_bytes=value.storage_offset() * value.element_size(),
                       logits=bool(logits_storage) and storage == logits_storage)
    if isinstance(value, bool):
        return ArgInfo(name=name, kind="bool", value=value)
    if isinstance(value, int):
        return ArgInfo(name=name, kind="int", value=int(value))
    if isinstance(value, float):
        return ArgInfo(name=name, kind="float", value=value)
    if value is None:
        return ArgInfo(name=name, kind="none")
    return ArgInfo(name=name, kind="other", value=repr(value))


def _plain(v: Any) -> Any:
    """A constexpr value as a JSON-able Python value."""
    v = getattr(v, "value", v)  # tl.constexpr
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)


class _Touch:
    """Executed launches: the distinct bytes of each tensor argument that the kernel's loads / stores touch.

    Patches the interpreter's masked load / store (plain loads and stores go through them) and atomics, and marks the
    addresses of the unmasked lanes in a per-argument bitmap. Descriptor (TMA) accesses are not seen.
    """

    def __init__(self, launch: TritonLaunch, values: dict[str, Any]) -> None:
        import numpy as np

        self.np = np
        self.ranges: list[tuple[str, int, int, int, Any, Any, list[int]]] = []
        for a in launch.args:
            t = values.get(a.name)
            if a.kind != "tensor" or not isinstance(t, torch.Tensor) or not t.numel():
                continue
            lo = t.data_ptr()
            n = t.numel()
            self.ranges.append((a.name, lo, lo + n * t.element_size(), t.element_size(), np.zeros(n, dtype=bool),
                                np.zeros(n, dtype=bool), [0, 0]))
        self._saved: list[tuple[str, Any]] = []

    def mark(self, ptrs: Any, mask: Any, write: bool) -> None:
        np = self.np
        a = np.asarray(ptrs).astype(np.uint64).ravel()
        if mask is not None:
            a = a[np.broadcast_to(np.asarray(mask, dtype=bool), np.asarray(ptrs).shape).ravel()]
        if not a.size:
            return
        for _, lo, hi, es, rd, wr, total in self.ranges:
            sel = (a >= lo) & (a < hi)
            if sel.any():
                idx = ((a[sel] - np.uint64(lo)) // np.uint64(es)).astype(np.int64)
                (wr if write else rd)[idx] = True
                total[int(write)] += idx.size * es
                break  # an address belongs to one argument (arguments on one buffer: the first)

    def __enter__(self) -> _Touch:
        from triton.runtime.interpreter import InterpreterBuilder

        touch = self
        orig_load, orig_store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        orig_rmw = getattr(InterpreterBuilder, "create_atomic_rmw", None)

        def load(b: Any, ptrs: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
            touch.mark(ptrs.data, mask.data, False)
            return orig_load(b, ptrs, mask, *args, **kwargs)

        def store(b: Any, ptrs: Any, value: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
            touch.mark(ptrs.data, mask.data, True)
            return orig_store(b, ptrs, value, mask, *args, **kwargs)

        self._saved = [("create_masked_load", orig_load), ("create_masked_store", orig_store)]
        InterpreterBuilder.create_masked_load = load
        InterpreterBuilder.create_masked_store = store
        if orig_rmw is not None:
            def rmw(b: Any, op: Any, ptr: Any, val: Any, mask: Any, *args: Any, **kwargs: Any) -> Any:
                touch.mark(ptr.data, mask.data, False)
                touch.mark(ptr.data, mask.data, True)
                return orig_rmw(b, op, ptr, val, mask, *args, **kwargs)

            self._saved.append(("create_atomic_rmw", orig_rmw))
            InterpreterBuilder.create_atomic_rmw = rmw
        return self

    def __exit__(self, *exc: Any) -> None:
        from triton.runtime.interpreter import InterpreterBuilder

        for name, fn in self._saved:
            setattr(InterpreterBuilder, name, fn)

    def result(self) -> dict[str, list[int]]:
        return {name: [int(rd.sum()) * es, int(wr.sum()) * es, total[0], total[1]]
                for name, _, _, es, rd, wr, total in self.ranges}


def _benign_outputs(launch: TritonLaunch, values: dict[str, Any]) -> None:
    """Record-only: zero what the skipped kernel would have written, so host-side torch ops that index with its
    outputs (token ids, counts) see in-range values instead of uninitialised memory."""
    from .access import pointer_access

    names = tuple(a.name for a in launch.args if a.kind == "tensor")
    access = pointer_access(launch.module, launch.qualname, names)
    for name in names:
        if access is None or "store" in access.get(name, ()):
            t = values.get(name)
            if isinstance(t, torch.Tensor) and t.numel():
                t.zero_()


class _Recorder(TorchDispatchMode):
    """Records Triton launches (patched interpreter launch path) and kernel-launching aten ops."""

    def __init__(self, execute: bool, logits: torch.Tensor | None) -> None:
        super().__init__()
        self.execute = execute
        self.logits_storage = logits.untyped_storage().data_ptr() if logits is not None else 0
        self.logits_nbytes = logits.numel() * logits.element_size() if logits is not None else 0
        self.launches: list[TritonLaunch | TorchOp] = []
        self._orig_run: Any = None

    # ---------------------------------------------------------------- Triton
    def _launch(self, ifn: Any, args: tuple, grid: Any, warmup: bool, kwargs: dict) -> Any:
        if warmup:
            return None
        fn = ifn.fn
        sig = inspect.signature(fn)
        params = sig.parameters
        call_kwargs = {k: v for k, v in kwargs.items() if k in params}
        options = {k: _plain(v) for k, v in kwargs.items() if k not in params}
        bound = sig.bind_partial(*args, **call_kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        constexprs: dict[str, Any] = {}
        infos: list[ArgInfo] = []
        with _disable_current_modes():
            for name, p in params.items():
                v = values.get(name)
                if _is_constexpr(p.annotation):
                    constexprs[name] = _plain(v)
                else:
                    infos.append(_arg_info(name, v, self.logits_storage))
            g = grid(values) if callable(grid) else grid
            g = tuple(int(x) for x in g) + (1,) * (3 - len(g))
            kernel, module, qual = _kernel_name(fn)
            launch = TritonLaunch(kernel=kernel, module=module, qualname=qual, grid=g, args=infos,
                                  constexprs=constexprs, options=options)
            self.launches.append(launch)
            if not self.execute:
                _benign_outputs(launch, values)
                return None
            with _Touch(launch, values) as touch:
                res = self._orig_run(ifn, *args, grid=grid, warmup=warmup, **kwargs)
            launch.touched = touch.result()
            return res

    # ---------------------------------------------------------------- torch
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            # a custom op: run its implementation below the Python key with this mode active, to see its inside
            flat, _ = tree_flatten((args, kwargs))
            dev = next((t.device for t in flat if isinstance(t, torch.Tensor)), torch.device("cpu"))
            key = torch._C.DispatchKey.CUDA if dev.type == "cuda" else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        flat_in, _ = tree_flatten((args, kwargs))
        ins = [t for t in flat_in if isinstance(t, torch.Tensor)]
        in_storages = {t.untyped_storage().data_ptr() for t in ins if t.numel()}
        out = func(*args, **kwargs)
        self._classify(func, args, kwargs, ins, in_storages, out)
        return out

    def _classify(self, func: Any, args: tuple, kwargs: dict, ins: list[torch.Tensor], in_storages: set[int],
                  out: Any) -> None:
        name = func._opname
        if name in _SYNC_OPS:
            self.launches.append(TorchOp(op=str(func), kernels=0, read_bytes=0, write_bytes=0, elements=0,
                                         logits_read=False, sync=True))
            return
        if name in _ALLOC_ONLY:
            return
        schema = func._schema
        mutated: list[torch.Tensor] = []
        named: dict[str, Any] = {}
        for i, a in enumerate(schema.arguments):
            v = args[i] if i < len(args) else kwargs.get(a.name)
            named[a.name] = v
            if a.alias_info is not None and a.alias_info.is_write and isinstance(v, torch.Tensor):
                mutated.append(v)
        flat_out, _ = tree_flatten(out)
        fresh = [t for t in flat_out if isinstance(t, torch.Tensor) and t.numel()
                 and t.untyped_storage().data_ptr() not in in_storages]
        mutated = [t for t in mutated if t.numel()]
        if not fresh and not mutated:
            return  # a view, a metadata op, a no-op conversion, or empty tensors: no kernel
        mut_ptrs = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for t in mutated}
        write = sum(t.numel() * t.element_size() for t in fresh)
        elements = max([t.numel() for t in fresh] + [0])
        if mutated:
            if name in _INDEXED_WRITE:
                src = next((named.get(k) for k in ("source", "values", "src", "value")
                            if isinstance(named.get(k), torch.Tensor)), None)
                idx = next((named.get(k) for k in ("index",) if isinstance(named.get(k), torch.Tensor)), None)
                n = src.numel() if src is not None else (idx.numel() if idx is not None else mutated[0].numel())
                write += n * mutated[0].element_size()
                elements = max(elements, n)
            else:
                write += sum(t.numel() * t.element_size() for t in mutated)
                elements = max(elements, max(t.numel() for t in mutated))
        read = 0
        seen: set[tuple] = set()
        logits_read = False
        out_bytes = sum(t.numel() * t.element_size() for t in fresh)
        for i, t in enumerate(ins):
            k = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if k in seen or not t.numel():
                continue
            seen.add(k)
            nb = t.numel() * t.element_size()
            is_mut = (k[0], k[1], k[2]) in mut_ptrs
            if is_mut and (name in _INDEXED_WRITE or name in _OVERWRITE):
                continue
            if i == 0 and name in _INDEXED_READ:
                nb = min(nb, out_bytes)
            elif self.logits_storage and k[0] == self.logits_storage and nb >= self.logits_nbytes:
                logits_read = True
            read += nb
        self.launches.append(TorchOp(op=str(func), kernels=1, read_bytes=read, write_bytes=write,
                                     elements=elements, logits_read=logits_read))


@contextlib.contextmanager
def _recording(execute: bool, logits: torch.Tensor | None) -> Iterator[_Recorder]:
    """Patch the interpreter's launch path and push the op-counting mode; yields the recorder."""
    from triton.runtime.interpreter import InterpretedFunction

    rec = _Recorder(execute, logits)
    rec._orig_run = orig = InterpretedFunction.run

    def run(ifn: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return rec._launch(ifn, args, grid, warmup, kwargs)

    InterpretedFunction.run = run
    # the recording mode is no tracing mode: the step takes its eager path (`_custom_ops.use_op` sees no dispatch
    # mode), the one an engine runs, instead of the gathered path reserved for tracing
    from .. import _custom_ops

    orig_stack = _custom_ops._len_dispatch_stack
    _custom_ops._len_dispatch_stack = lambda: 0
    try:
        with rec:
            yield rec
    finally:
        InterpretedFunction.run = orig
        _custom_ops._len_dispatch_stack = orig_stack


def _case_rows(scenario: str, batch: int, dtype_name: str, vocab: int, seed: int) -> tuple[Any, list, list]:
    """The case's inputs, the per-row params (explicit seeds) and the per-row prompts (the penalty history)."""
    from .scenarios import SCENARIOS, make_inputs

    scen = SCENARIOS[scenario]
    inp = make_inputs(scen, dtype_name, batch, vocab, torch.device("cpu"), seed=seed, check_rows=min(4, batch),
                      n_buffers=1)
    params = [dataclasses.replace(inp.params, seed=(seed * 1_000_003 + r) % (1 << 63)) for r in range(batch)]
    if inp.history_ids is not None:
        prompts = [inp.history_ids[r].tolist() for r in range(batch)]
    else:
        prompts = [[] for _ in range(batch)]
    return inp, params, prompts


@contextlib.contextmanager
def record_launches(*, execute: bool = False) -> Iterator[list[TritonLaunch | TorchOp]]:
    """Record the device work of any calls made inside the block, with the CUDA launch settings.

    The same recording as `record_step` (`CUDA_KNOBS`, the CUDA block policy, Triton launches and kernel-launching
    torch ops), around arbitrary calls on CPU tensors: ``fastsampler.sample``, ``sampling_probs``, a `Sampler`
    step, the kernels' test helpers. Yields the list the launches are appended to, in launch order.

    >>> with record_launches() as launches:  # doctest: +SKIP
    ...     fastsampler.sample(torch.randn(2, 4096), SamplingParams(top_p=0.9), backend="triton")
    """
    ensure_interpreter()
    status: list[str] = []
    with _env(CUDA_KNOBS), _cuda_block_policy(status), _recording(execute, None) as rec:
        yield rec.launches


def record_step(scenario: str, batch: int, dtype_name: str, vocab: int, *, execute: bool = False,
                warmup: bool = True, seed: int = 1234) -> StepRecord:
    """Record the device work of one ``Sampler.sample`` step of the Triton backend.

    Parameters
    ----------
    scenario : str
        A name of `fastsampler.bench.scenarios.SCENARIOS`; every row of the batch uses its parameters (explicit
        per-row seeds; the ``full`` scenario's penalty history enters as each request's prompt).
    batch, vocab : int
    dtype_name : str
        ``fp32``, ``bf16`` or ``fp16``.
    execute : bool
        False (default): record-only, Triton kernels do not run. True: they run in the interpreter (small cases).
    warmup : bool
        Run (and discard) one step first, as the timing does.
    seed : int

    Returns
    -------
    StepRecord
        The launches of the recorded step (the steady-state engine path: slots passed as a device tensor, the
        CUDA-graph form of `Sampler.sample`).
    """
    ensure_interpreter()
    from ..sampler import Sampler

    with _env(CUDA_KNOBS):
        inp, params, prompts = _case_rows(scenario, batch, dtype_name, vocab, seed)
        logits = inp.buffers[0]
        sampler = Sampler(vocab_size=vocab, max_slots=batch, device="cpu", backend="triton")
        slots = [sampler.add(p, prompt_token_ids=pr)[0] for p, pr in zip(params, prompts, strict=True)]
        slots_t = torch.tensor(slots, dtype=torch.int64)
        status: list[str] = []
        with _cuda_block_policy(status):
            if warmup:
                with _recording(execute, logits):
                    sampler.sample(logits, slots_t)
            t0 = time.perf_counter()
            with _recording(execute, logits) as rec:
                sampler.sample(logits, slots_t)
            seconds = time.perf_counter() - t0
    return StepRecord(scenario=scenario, batch=batch, dtype=dtype_name, vocab=vocab, launches=rec.launches,
                      logits_bytes=logits.numel() * logits.element_size(), logits_elem_size=logits.element_size(),
                      executed=execute, seconds=seconds, cuda_settings=status[0] if status else "cuda")
