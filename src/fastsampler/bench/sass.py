"""Compile recorded Triton launches for sm_90 and read registers, spills and the main loop from the SASS.

`compile_launches` runs in the calling process (which records under the interpreter) and hands the work to a
subprocess without ``TRITON_INTERPRET`` (``python -m fastsampler.bench.sass IN.json OUT.json CACHE_DIR``), where the
kernels are native ``JITFunction`` s. For each launch specialisation the worker

1. rebuilds Triton's own specialisation of the launch (the JIT's binder on mock arguments: pointer dtypes and
   16-byte alignment, integer values -- ``1`` and multiples of 16 are specialised as on a GPU), then
   ``triton.compile(ASTSource(fn=kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``;
2. disassembles the cubin with the ``cuobjdump`` shipped with triton (``cuobjdump -res-usage -sass``): registers
   ``REG`` and spills ``LOCAL / 4`` (the figure Triton reports as ``n_spills`` when it loads a kernel);
3. finds the loops: the control-flow graph of the SASS (branch targets, fall-through), where a branch back to a
   block that dominates it closes a natural loop. The *id loop* is, among the loops with global loads (``LDG``) of
   their own, the one with the most instructions of its own (nested loops excluded): the per-id work; an enclosing
   loop over select levels owns only its per-level bookkeeping, a nested loop over EOS ids or logit-bias entries
   a few instructions. Instructions per id = id-loop body (warp-instructions, static count: nested loops and both
   sides of a branch once, out-of-line subroutines it ``CALL`` s not at all) x ``num_warps`` x 32 / ``BLOCK``
   (ids per loop iteration, the ``BLOCK`` constexpr): thread-instructions per id. A program that covers no more
   ids than one iteration (``CHUNK <= BLOCK``, ``CHUNK`` = ids per program) runs the id loop once and the
   compiler removes it: the main path (every instruction reachable from the entry; loops left there run over EOS
   ids or logit-bias entries) is the body of that one iteration, as when no loop loads from global memory.
   Kernels without a ``BLOCK`` constexpr (one-program-per-row combines) have no instructions per id.

Results are cached on disk, one JSON file per specialisation, keyed by the kernel's Triton cache key (a hash of its
source and of every jit function it calls), the specialisation and the triton version; the SASS is kept beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["compile_launches", "parse_sass", "spec_of", "spec_id", "SassStats"]

TARGET = ("cuda", 90, 32)
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*?)\s*;")
_HEX = re.compile(r"0x[0-9a-f]+")
_RES = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")

SassStats = dict  # JSON-able dict, see `parse_sass` and `_compile_one`


def spec_of(launch: Any) -> dict:
    """The compile specialisation of a recorded `~fastsampler.bench.record.TritonLaunch` (JSON-able)."""
    args = []
    for a in launch.args:
        d: dict[str, Any] = {"name": a.name, "kind": a.kind}
        if a.kind == "tensor":
            d["dtype"] = a.dtype
            d["aligned"] = a.offset_bytes % 16 == 0
        elif a.kind == "int":
            d["value"] = _int_class(int(a.value))
        elif a.kind in ("bool", "float"):
            d["value"] = a.value
        args.append(d)
    return {"module": launch.module, "qualname": launch.qualname, "args": args,
            "constexprs": launch.constexprs, "options": launch.options}


def _int_class(v: int) -> int:
    """A representative of what Triton's JIT specialises an integer argument on: the value 1, divisibility by 16
    and the 32-bit range (so launches that differ only in such a value share one compilation)."""
    if v == 1:
        return 1
    wide = not -(2**31) <= v < 2**31
    base = 2**32 if wide else 16
    return base if v % 16 == 0 else base + 1


def spec_id(spec: dict) -> str:
    """A short stable id of a compile specialisation."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=repr).encode()).hexdigest()[:24]


def compile_launches(specs: list[dict], cache_dir: Path, *, timeout_s: float = 900.0) -> dict[str, SassStats]:
    """Compile and analyse each distinct specialisation (``spec_of``); returns ``{spec id: stats}``.

    ``stats`` holds ``ok`` (False with ``error`` on failure) and ``n_regs``, ``n_spills``, ``num_warps``,
    ``shared``, ``total_instr``, ``main_instr``, ``loop_body``, ``loops``, ``instr_per_id``, ``sass``. A missing
    nvidia backend or ``cuobjdump`` gives ``ok=False`` with the reason for every spec.
    """
    uniq: dict[str, dict] = {}
    for s in specs:
        uniq.setdefault(spec_id(s), s)
    if not uniq:
        return {}
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default, without its deprecation warning
    src_root = str(Path(importlib.import_module("fastsampler").__file__).parent.parent)
    env["PYTHONPATH"] = src_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory() as td:
        inp, outp = Path(td) / "in.json", Path(td) / "out.json"
        inp.write_text(json.dumps(uniq, default=repr), encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-m", "fastsampler.bench.sass", str(inp), str(outp),
                                   str(cache_dir)], env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {k: {"ok": False, "error": f"compile worker timed out after {timeout_s:.0f}s"} for k in uniq}
        if not outp.exists():
            err = (proc.stderr or proc.stdout or "").strip().splitlines()
            msg = err[-1] if err else f"exit status {proc.returncode}"
            return {k: {"ok": False, "error": f"compile worker failed: {msg}"} for k in uniq}
        return json.loads(outp.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------------ SASS
_TERMINATORS = ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "KILL")
_GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG", "UBLKCP")


def _instructions(text: str) -> list[tuple[int, bool, str, str]]:
    """(address, predicated, opcode, operand text) of the first function of ``cuobjdump -sass`` output."""
    instrs: list[tuple[int, bool, str, str]] = []
    started = False
    for line in text.splitlines():
        if "Function :" in line:
            if started:
                break  # only the first function
            started = True
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        pred = re.match(r"^@!?U?P[T0-9]+\s+", body)
        op_text = body[pred.end():] if pred else body
        opcode = op_text.split()[0] if op_text else ""
        instrs.append((int(m.group(1), 16), bool(pred), opcode, op_text))
    return instrs


def _cfg(instrs: list[tuple[int, bool, str, str]]) -> tuple[list[tuple[int, int]], list[set[int]]]:
    """Basic blocks ``(first, end)`` (instruction indices, end exclusive) and their successors (block indices).

    ``CALL`` continues at the next instruction (the callee, an out-of-line subroutine, is not part of the caller's
    flow); a branch with a predicate (``@P0 BRA``, ``BRA !P0, ...``) also falls through; an indirect branch is
    treated as falling through."""
    index = {a: i for i, (a, _, _, _) in enumerate(instrs)}
    leaders = {0}
    targets: dict[int, int] = {}
    for i, (_, _, op, text) in enumerate(instrs):
        if op.startswith(_TERMINATORS):
            leaders.add(i + 1)
            hexes = _HEX.findall(text)
            if op.startswith("BRA") and hexes and int(hexes[-1], 16) in index:
                targets[i] = index[int(hexes[-1], 16)]
                leaders.add(targets[i])
    starts = sorted(x for x in leaders if x < len(instrs))
    blocks = [(b, starts[k + 1] if k + 1 < len(starts) else len(instrs)) for k, b in enumerate(starts)]
    block_of = {b: k for k, (b, _) in enumerate(blocks)}
    succ: list[set[int]] = []
    for k, (_, e) in enumerate(blocks):
        last = e - 1
        _, pred, op, text = instrs[last]
        out: set[int] = set()
        conditional = pred or bool(re.match(r"BRA\S*\s+!?U?P[T0-9]+\s*,", text))
        if op.startswith("BRA") and last in targets:
            out.add(block_of[targets[last]])
            if conditional and k + 1 < len(blocks):
                out.add(k + 1)
        elif op.startswith(("EXIT", "RET", "KILL")):
            if pred and k + 1 < len(blocks):
                out.add(k + 1)
        elif k + 1 < len(blocks):
            out.add(k + 1)
        succ.append(out)
    return blocks, succ


def parse_sass(text: str) -> dict:
    """Instruction counts and loops of the first kernel function in ``cuobjdump -sass`` output.

    The control-flow graph is built from the branches; a back edge (a branch to a block that dominates it, i.e. to
    an earlier address on every path) closes a natural loop: the header plus every block that reaches the branch
    without passing the header (loops sharing a header are merged). Returns

    - ``total_instr``: every instruction of the function;
    - ``main_instr``: instructions reachable from the entry (no out-of-line subroutines, no trailing self-branch);
    - ``loops``: ``[header address, body instructions, global loads, own global loads, own instructions]`` per
      loop, where *own* excludes what loops nested inside hold;
    - ``id_loops``: the id loop, ``[loop]``: among the loops with global loads of their own, the one with the most
      instructions of its own -- the per-id work (an enclosing loop over select levels owns only its per-level
      bookkeeping, a nested loop over EOS ids or logit-bias entries a few instructions). Empty when no loop loads
      from global memory;
    - ``loop_body``: the id loop's body, warp-instructions (nested loops counted once).
    """
    instrs = _instructions(text)
    if not instrs:
        return {"total_instr": 0, "main_instr": 0, "loops": [], "id_loops": [], "loop_body": 0}
    blocks, succ = _cfg(instrs)
    n = len(blocks)
    pred: list[set[int]] = [set() for _ in range(n)]
    for k, out in enumerate(succ):
        for j in out:
            pred[j].add(k)
    reach = {0}
    stack = [0]
    while stack:
        for j in succ[stack.pop()]:
            if j not in reach:
                reach.add(j)
                stack.append(j)
    # dominators over the reachable blocks (iterative; blocks are few)
    dom: dict[int, set[int]] = {k: set(reach) for k in reach}
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for k in sorted(reach - {0}):
            ps = [dom[p] for p in pred[k] if p in reach]
            new = (set.intersection(*ps) if ps else set()) | {k}
            if new != dom[k]:
                dom[k], changed = new, True
    bodies: dict[int, set[int]] = {}
    for u in reach:
        for h in succ[u]:
            if h in dom[u]:  # back edge u -> h
                body = bodies.setdefault(h, {h})
                work = [u]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(p for p in pred[x] if p in reach)

    def size(bs: set[int]) -> int:
        return sum(blocks[b][1] - blocks[b][0] for b in bs)

    def loads(bs: set[int]) -> int:
        return sum(1 for b in bs for i in range(*blocks[b]) if instrs[i][2].startswith(_GLOBAL_LOADS))

    loops = []
    for h, body in bodies.items():
        inner = [o for g, o in bodies.items() if g != h and g in body and o <= body]
        nested = set().union(*inner) if inner else set()
        own = body - nested
        loops.append([instrs[blocks[h][0]][0], size(body), loads(body), loads(own), size(own)])
    loops.sort()
    cand = [lp for lp in loops if lp[3] > 0]
    id_loop = max(cand, key=lambda lp: (lp[4], lp[3])) if cand else None
    return {"total_instr": len(instrs), "main_instr": size(reach), "loops": loops,
            "id_loops": [id_loop] if id_loop else [], "loop_body": id_loop[1] if id_loop else 0}


# ------------------------------------------------------------------------------------------------------ worker
def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump is not shipped with this triton ({path})")
    return str(path)


class _Ptr:
    """A mock pointer argument for Triton's binder: a dtype and an address (16-byte aligned or not)."""

    def __init__(self, dtype: Any, aligned: bool) -> None:
        self.dtype = dtype
        self._addr = 0 if aligned else 4

    def data_ptr(self) -> int:
        return self._addr

    @staticmethod
    def ptr_range() -> int:
        return 0


def _bind(kernel: Any, spec: dict) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) as Triton's JIT derives them for this launch on an sm_90 GPU."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget(*TARGET))
    values: dict[str, Any] = {}
    for a in spec["args"]:
        if a["kind"] == "tensor":
            values[a["name"]] = _Ptr(getattr(torch, a["dtype"]), a["aligned"])
        elif a["kind"] in ("int", "bool", "float"):
            values[a["name"]] = a["value"]
        elif a["kind"] == "none":
            values[a["name"]] = None
        else:
            raise TypeError(f"argument {a['name']} of kind {a['kind']} cannot be rebuilt for compilation")
    values.update(spec["constexprs"])
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**values, **spec.get("options", {}))
    opts, signature, constexprs, attrs = kernel._pack_args(backend, dict(spec.get("options", {})), bound,
                                                          specialization, options)
    return signature, constexprs, attrs, opts.__dict__


def _compile_one(spec: dict, cache_dir: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(spec["module"])
    kernel: Any = mod
    for part in spec["qualname"].split("."):
        kernel = getattr(kernel, part)
    key_src = json.dumps([spec, kernel.cache_key, triton.__version__, TARGET], sort_keys=True, default=repr)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    name = spec["qualname"].split(".")[-1]
    meta_path = cache_dir / f"{name}-{key}.json"
    sass_path = cache_dir / f"{name}-{key}.sass"
    cached = meta_path.exists() and sass_path.exists()
    if cached:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        sass = sass_path.read_text(encoding="utf-8")
    else:
        t0 = time.perf_counter()
        signature, constexprs, attrs, options = _bind(kernel, spec)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget(*TARGET), options=options)
        cubin = compiled.asm.get("cubin")
        if not cubin:
            raise RuntimeError("no cubin produced (ptxas missing?)")
        cubin_path = cache_dir / f"{name}-{key}.cubin"
        cubin_path.write_bytes(cubin)
        proc = subprocess.run([_cuobjdump(), "-res-usage", "-sass", str(cubin_path)], capture_output=True,
                              text=True, timeout=120)
        cubin_path.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"cuobjdump failed: {proc.stderr.strip()[-500:]}")
        sass = proc.stdout
        res_m = _RES.search(sass)
        meta = {"key": key, "kernel": spec["qualname"], "n_regs": int(res_m.group(2)) if res_m else None,
                "n_spills": int(res_m.group(5)) // 4 if res_m else None,
                "num_warps": int(getattr(compiled.metadata, "num_warps", options.get("num_warps", 4))),
                "shared": int(getattr(compiled.metadata, "shared", 0) or 0),
                "compile_s": round(time.perf_counter() - t0, 2)}
        sass_path.write_text(sass, encoding="utf-8")
        meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    parsed = parse_sass(sass)  # parsed on every run: the cache holds the compiler's output only
    block = _int_constexpr(spec, "BLOCK")
    chunk = _int_constexpr(spec, "CHUNK")
    ipi = None
    if block:
        if (chunk and chunk <= block) or not parsed["loop_body"]:
            # one iteration per program (CHUNK <= BLOCK: the compiler removes the id loop; loops left there run
            # over EOS ids or logit-bias entries): the main path is the body of that one iteration
            parsed["id_loop"] = "straight-line"
            parsed["loop_body"] = parsed["main_instr"]
        else:
            parsed["id_loop"] = "loop"
        ipi = parsed["loop_body"] * meta["num_warps"] * 32 / block
    else:
        parsed["id_loop"] = "none"
    return {"ok": True, **meta, **parsed, "instr_per_id": ipi, "block": block, "sass": str(sass_path),
            "cached": cached}


def _int_constexpr(spec: dict, name: str) -> int | None:
    v = spec["constexprs"].get(name)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _worker(inp: str, outp: str, cache_dir: str) -> int:
    specs: dict[str, dict] = json.loads(Path(inp).read_text(encoding="utf-8"))
    cache = Path(cache_dir)
    out: dict[str, dict] = {}
    setup_error = ""
    try:
        importlib.import_module("triton.backends.nvidia.compiler")
        _cuobjdump()
    except Exception as e:  # reported per spec
        setup_error = f"triton's nvidia backend / cuobjdump unavailable: {type(e).__name__}: {e}"
    for sid, spec in specs.items():
        if setup_error:
            out[sid] = {"ok": False, "error": setup_error, "unavailable": True}
            continue
        try:
            out[sid] = _compile_one(spec, cache)
        except Exception as e:  # reported to the parent
            out[sid] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-2000:]}"}
    Path(outp).write_text(json.dumps(out), encoding="utf-8")
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("fastsampler.bench.sass compiles native kernels: run it without TRITON_INTERPRET=1")
    if len(sys.argv) != 4:
        sys.exit("usage: python -m fastsampler.bench.sass IN.json OUT.json CACHE_DIR")
    sys.exit(_worker(*sys.argv[1:]))
