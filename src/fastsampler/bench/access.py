"""Global-memory bytes of a Triton launch: which arguments a kernel loads and stores, and the per-kernel access rules.

Which pointer arguments a kernel reads and writes is found from its source (`pointer_access`): every
``tl.load`` / ``tl.store`` / ``tl.atomic_*`` (and ``.load`` / ``.store`` of descriptors) is traced back, through
local assignments and calls of other ``@triton.jit`` functions, to the kernel's parameters. A kernel changes, the
analysis follows; nothing here lists the current kernels' arguments.

Bytes of a launch (`launch_bytes`), default rule: every tensor argument the kernel loads is read once in full
(``numel x element size``), every one it stores to is written once in full (arguments on one buffer count once).
The source analysis does not see constexpr branches, so with a probe an argument the executed probe step never
loaded nor stored counts 0 bytes: the probe runs the same specialisation, which compiled that access out.
Kernels that read part of a tensor, or read it several times, have an explicit rule in `ACCESS_RULES`, the one table
of per-kernel rules (documented in ``docs/benchmarks.md``). A rule applies to the per-id tensors `VOCAB_ARGS`
(logits, output counts, prompt / allowed bitmasks: what a row pass reads per token id):

- ``id_fraction``: the fraction of each row's ids read per pass (the finishing kernel reads a few ids per row);
- ``passes``: how many times the kernel reads them, at most (a select: once per radix level);
- ``measured``: the traffic is data-dependent (a row stops at the level that resolves its threshold; rows that do
  not use the rule read nothing). With a probe -- an executed B = 1 step of the same case, whose loads the
  interpreter counts -- the per-id tensors' bytes are the probe's bytes loaded per byte of argument, scaled to the
  case; without one, ``id_fraction x passes`` (the worst case).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from .record import ArgInfo, TritonLaunch

__all__ = ["AccessRule", "ACCESS_RULES", "DEFAULT_RULE", "VOCAB_ARGS", "LaunchBytes", "launch_bytes",
           "pointer_access", "rule_for"]

# arguments indexed by token id: the tensors a row pass reads per id (backend convention: see penalties.row_z)
VOCAB_ARGS: tuple[str, ...] = ("logits_ptr", "bias_ptr", "counts_ptr", "prompt_ptr", "allowed_ptr")


@dataclass(frozen=True)
class AccessRule:
    """How a kernel reads its per-id tensors, where it differs from the default (every argument once, in full)."""

    summary: str
    id_fraction: Callable[[Mapping[str, Any]], float] | None = None  # of each row's ids, per pass
    passes: Callable[[Mapping[str, Any]], float] | None = None  # reads of the per-id tensors, at most
    measured: bool = False  # data-dependent: the probe's measured traffic replaces id_fraction x passes
    vocab_args: tuple[str, ...] = VOCAB_ARGS


DEFAULT_RULE = AccessRule("every tensor argument loaded is read once in full, every one stored to is written once "
                          "in full")


def _levels(a: Mapping[str, Any]) -> float:
    """Radix levels of a select: 32 key bits / DIGIT_BITS per level."""
    return 32 / max(1, int(a.get("DIGIT_BITS") or 4))


def _one_tile(a: Mapping[str, Any]) -> float:
    """One tile of the row (the token race over the winning tile, ``TILE`` ids; not for an all-greedy batch, which
    compiles the race out) and the drawn token's two ids."""
    vc = max(1, int(a.get("VC") or a.get("V") or 1))
    tile = int(a.get("TILE") or 0) if a.get("RACE", True) else 0
    return min(1.0, (tile + 2) / vc)


# THE per-kernel access rules (keys: module relative to backends.triton, then the kernel's name). A kernel not
# listed here follows DEFAULT_RULE; `fastsampler.bench.model` names a kernel whose rule is off by more than 2x from
# what its probe touched.
ACCESS_RULES: dict[str, AccessRule] = {
    "draw._finish_kernel": AccessRule(
        "per-id tensors: the winning tile (TILE ids, the token race) and the drawn token's 2 ids per row; chunk "
        "partials and row state in full",
        id_fraction=_one_tile),
    "select._select_kernel": AccessRule(
        "per-id tensors: once per radix level until the row's threshold is resolved (at most 32 / DIGIT_BITS); "
        "rows without the rule read nothing",
        passes=_levels, measured=True),
    "select._typical_kernel": AccessRule(
        "per-id tensors: once per radix level until resolved (at most 32 / DIGIT_BITS); rows without typical-p "
        "read nothing",
        passes=_levels, measured=True),
    "logprobs._logprobs_kernel": AccessRule(
        "per-id tensors: the top-N select (once per radix level until resolved, at most 32 / DIGIT_BITS) plus one "
        "compaction / rank pass; in a batch of the candidate engine only the groups that hold the rank's and the "
        "top-N's values; rows without logprobs read nothing",
        passes=lambda a: _levels(a) + 1, measured=True),
    "candidates._compact_kernel": AccessRule(
        "per-id tensors: only the groups of GROUP ids whose maximum reaches the row's bound (a few per kept id); "
        "chunks below the bound and rows without top-k read nothing",
        measured=True),
    "candidates._trunc_kernel": AccessRule(
        "per-id tensors: none on a row whose candidates fit the buffer; the exact fallback (overflow, or a truncating "
        "row without top-k) reads the row once per radix level of up to three selects plus one kept-weight pass",
        passes=lambda a: 3 * _levels(a) + 1, measured=True),
    "mirostat._mirostat_v1_kernel": AccessRule(
        "per-id tensors: the top-100 select and the k select (each once per radix level until resolved, at most "
        "32 / DIGIT_BITS) plus one gather pass; rows without Mirostat v1 read nothing",
        passes=lambda a: 2 * _levels(a) + 1, measured=True),
}


def rule_for(kernel: str) -> AccessRule:
    """The access rule of a kernel name (`DEFAULT_RULE` when it has none)."""
    return ACCESS_RULES.get(kernel, DEFAULT_RULE)


# --------------------------------------------------------------------------------------------------- analysis
_LOADS = {"load"}
_STORES = {"store"}
_ATOMICS = {"atomic_add", "atomic_max", "atomic_min", "atomic_cas", "atomic_xchg", "atomic_and", "atomic_or",
            "atomic_xor"}


def _raw_fn(obj: Any) -> Any:
    """The Python function behind a JITFunction / InterpretedFunction (or None)."""
    fn = getattr(obj, "fn", None)
    return fn if inspect.isfunction(fn) else None


class _Analyzer:
    """Trace loads / stores of one function back to its parameters (see `pointer_access`)."""

    def __init__(self, fn: Any, seeds: dict[str, frozenset[str]], depth: int) -> None:
        self.fn = fn
        self.globals = getattr(fn, "__globals__", {})
        self.taint: dict[str, set[str]] = {k: set(v) for k, v in seeds.items()}
        self.depth = depth
        self.access: dict[str, set[str]] = {}

    def _resolve(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Name):
            return self.globals.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value)
            return getattr(base, node.attr, None) if base is not None else None
        return None

    def _is_lang(self, node: ast.AST) -> bool:
        mod = self._resolve(node)
        return getattr(mod, "__name__", "").startswith("triton.language")

    def _mem_call(self, call: ast.Call) -> tuple[str, ast.AST | None] | None:
        """("load" | "store" | "atomic", pointer expression) of a memory call, else None."""
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")
        kind = "load" if name in _LOADS else "store" if name in _STORES else "atomic" if name in _ATOMICS else ""
        if not kind:
            return None
        if isinstance(f, ast.Attribute) and not self._is_lang(f.value):
            return kind, f.value  # desc.load(...) / desc.store(...): the object is the pointer
        if isinstance(f, ast.Name) and not getattr(self.globals.get(f.id), "__module__", "").startswith("triton"):
            return None
        ptr = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "pointer"), None)
        return kind, ptr

    def names(self, node: ast.AST | None) -> set[str]:
        """Parameters a value may point into. Loads return data (their arguments are not followed); a call of
        another jit function points where its return value points."""
        out: set[str] = set()
        if node is None:
            return out
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, ast.Call):
                mem = self._mem_call(n)
                if mem is not None and mem[0] == "load":
                    continue
                callee = _raw_fn(self._resolve(n.func))
                if callee is not None:
                    if self.depth <= 8:
                        out |= set(_analyze(callee, self._seeds(callee, n), self.depth + 1)[1])
                    continue
            if isinstance(n, ast.Name) and n.id in self.taint:
                out |= self.taint[n.id]
            stack.extend(ast.iter_child_nodes(n))
        return out

    def _seeds(self, callee: Any, call: ast.Call) -> tuple[tuple[str, frozenset[str]], ...]:
        """The callee's parameters that receive pointers, and into which of our parameters they point."""
        params = list(inspect.signature(callee).parameters)
        seeds: dict[str, frozenset[str]] = {}
        for i, a in enumerate(call.args):
            if i < len(params):
                t = self.names(a)
                if t:
                    seeds[params[i]] = frozenset(t)
        for k in call.keywords:
            if k.arg in params:
                t = self.names(k.value)
                if t:
                    seeds[k.arg] = frozenset(t)
        return tuple(sorted(seeds.items()))

    def _assign(self, target: ast.AST, value: set[str]) -> None:
        if isinstance(target, ast.Name):
            self.taint.setdefault(target.id, set()).update(value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._assign(t, value)

    def run(self, tree: ast.FunctionDef) -> tuple[dict[str, set[str]], set[str]]:
        for _ in range(3):  # loop-carried assignments: iterate to a fixed point
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign):
                    v = self.names(node.value)
                    for t in node.targets:
                        self._assign(t, v)
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    self._assign(node.target, self.names(node.value))
                elif isinstance(node, ast.For):
                    self._assign(node.target, self.names(node.iter))
        ret: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Return):
                ret |= self.names(node.value)
            if not isinstance(node, ast.Call):
                continue
            mem = self._mem_call(node)
            if mem is not None:
                kinds = {"load", "store"} if mem[0] == "atomic" else {mem[0]}
                for p in self.names(mem[1]):
                    self.access.setdefault(p, set()).update(kinds)
                continue
            callee = _raw_fn(self._resolve(node.func))
            if callee is None or self.depth > 8:
                continue
            seeds = self._seeds(callee, node)
            if seeds:
                for p, kinds in _analyze(callee, seeds, self.depth + 1)[0].items():
                    self.access.setdefault(p, set()).update(kinds)
        return self.access, ret


@cache
def _analyze(fn: Any, seeds: tuple[tuple[str, frozenset[str]], ...],
             depth: int) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """(accesses, return taint) of ``fn`` whose parameters point into ``seeds``."""
    src = textwrap.dedent(inspect.getsource(fn))
    tree = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef))
    access, ret = _Analyzer(fn, dict(seeds), depth).run(tree)
    return {k: frozenset(v) for k, v in access.items()}, frozenset(ret)


def pointer_access(module: str, qualname: str, pointer_args: tuple[str, ...]) -> dict[str, frozenset[str]] | None:
    """``{argument: {"load", "store"}}`` for the pointer arguments of a kernel, from its source; None on failure.

    Parameters
    ----------
    module, qualname : where the kernel lives (``fastsampler.backends.triton.stats``, ``_stats_kernel``)
    pointer_args : the arguments that were tensors at the launch
    """
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        fn = _raw_fn(obj) or (obj if inspect.isfunction(obj) else None)
        if fn is None:
            return None
        return _analyze(fn, tuple((p, frozenset([p])) for p in sorted(pointer_args)), 0)[0]
    except Exception:  # any failure falls back to the conservative default
        return None


# --------------------------------------------------------------------------------------------------- bytes
@dataclass
class LaunchBytes:
    """Bytes of one Triton launch (whole batch)."""

    read: float
    write: float
    logits_read: float  # bytes of the logits buffer read (every pass counted)
    ids_read: float  # token ids processed: logits elements read, every pass counted
    full_row_reads: int  # full passes over the logits row (0 when the kernel reads part of each row)
    rule: str  # the rule applied ("default" or the kernel name)
    analysed: bool  # loads / stores found from the source (False: every tensor counted as read, nothing written)
    measured: bool  # the per-id traffic comes from a probe


def launch_bytes(launch: TritonLaunch, probe: Mapping[str, Any] | None = None) -> LaunchBytes:
    """Global-memory bytes of a launch under its access rule.

    Parameters
    ----------
    launch : TritonLaunch
    probe : mapping, optional
        The same launch in an executed probe step: ``touched`` (per argument ``[distinct read, distinct written,
        loaded, stored]`` bytes) and ``nbytes`` (per argument). Used for rules with ``measured=True``.
    """
    rule = rule_for(launch.kernel)
    tensors = [a for a in launch.args if a.kind == "tensor"]
    access = pointer_access(launch.module, launch.qualname, tuple(a.name for a in tensors))
    scalars: dict[str, Any] = {a.name: a.value for a in launch.args if a.kind in ("int", "float", "bool")}
    scalars.update(launch.constexprs)
    idf = float(rule.id_fraction(scalars)) if rule.id_fraction is not None else 1.0
    passes = float(rule.passes(scalars)) if rule.passes is not None else 1.0
    use_probe = rule.measured and probe is not None
    read = write = logits = 0.0
    seen: set[tuple] = set()
    logits_arg: ArgInfo | None = None
    for a in tensors:
        k = (a.storage, a.offset_bytes, a.nbytes)  # one buffer passed twice (also as another dtype) counts once
        if k in seen:
            continue
        seen.add(k)
        kinds = access.get(a.name, frozenset()) if access is not None else frozenset({"load"})
        r = a.nbytes if "load" in kinds else 0.0
        w = a.nbytes if "store" in kinds else 0.0
        if probe is not None and a.name in probe["touched"] and not any(probe["touched"][a.name][2:4]):
            # the source loads it under a constexpr branch this specialisation compiles out: the executed probe
            # of the same case (same flags, same specialisation) never touched it
            r = w = 0.0
        if a.name in rule.vocab_args:
            if use_probe and probe is not None:
                t = probe["touched"].get(a.name, [0, 0, 0, 0])
                n = probe["nbytes"].get(a.name) or 0
                r = a.nbytes * t[2] / n if n else 0.0
                w = a.nbytes * t[3] / n if n else 0.0
            else:
                r, w = r * idf * passes, w * idf * passes
        read += r
        write += w
        if a.logits:
            logits += r
            logits_arg = a
    ids = logits / logits_arg.elem_size if logits_arg is not None else 0.0
    full = 0
    if logits_arg is not None and logits_arg.nbytes and idf >= 1.0:
        full = int(round(logits / logits_arg.nbytes))
    return LaunchBytes(read=read, write=write, logits_read=logits, ids_read=ids, full_row_reads=full,
                       rule=launch.kernel if launch.kernel in ACCESS_RULES else "default",
                       analysed=access is not None, measured=use_probe)
