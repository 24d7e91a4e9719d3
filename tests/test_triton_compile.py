"""Every Triton kernel specialisation the CUDA path launches compiles for a CUDA target (sm_90), offline.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy code and accepts programs the compiler rejects (loop
-carried types, scalar / block mixes, constexpr branches), so CI compiles them too, without a GPU.

The specialisations are not written out by hand: they are recorded from the backend itself. A subprocess under the
interpreter runs `CALLS` (``fastsampler.sample``, ``sampling_probs``, ``score``, the mask ops, `Sampler` steps with a
list and a tensor of slots and its ``verify``, the kernels' test helpers) for each vocabulary of `VOCABS` and each
logits dtype, in record-only mode with the CUDA launch configuration (`fastsampler.bench.record.record_launches`:
``CHUNK`` 1024, ``DIGIT_BITS`` 4 and the block sizes ``backend._Ctx`` picks on a CUDA device). The launches are reduced
to one compilation per kernel, constexprs and launch options (`_representatives`: the logits dtype rotates among those
recorded, and every kernel compiles in every dtype at least once), then compiled with
`fastsampler.bench.sass.compile_launches` in a subprocess without the interpreter: source -> TTIR -> TTGIR -> LLVM IR ->
PTX -> cubin (the ptxas shipped with triton), disassembled with its cuobjdump. Compiled kernels are cached on disk,
keyed by each kernel's Triton cache key (a hash of its source and of every jit function it calls), the specialisation
and the triton version: a second run with unchanged kernels compiles nothing. The cache is
``$FASTSAMPLER_COMPILE_CACHE``, by default ``~/.cache/fastsampler/sm90``.

Skipped when triton's CUDA backend (or its cuobjdump) is missing. Marked ``slow``: about two seconds per
specialisation when the cache is cold (``make test-all`` runs it).
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the benchmark vocabulary (Llama 3): 126 programs of 1024 ids per row; another vocabulary changes only the block
# constexprs sized by it (BT, BT_TILES, GBLOCK)
VOCABS = (128256,)
DTYPES = ("float32", "bfloat16", "float16")
BATCH = 3
SLOT_LIST_CALLS = ("full", "candidates_logprobs", "greedy")  # also a list of slots, and a token bitmask


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _triton_available(), reason="triton is not installed")]


def _calls():
    """(name, params of every row, extra keyword arguments): the batches whose launches are recorded; together they
    set every specialisation flag of the backend (each truncation path, logprobs widths, penalties, masks, EOS)."""
    from fastsampler import SamplingParams as SP

    penalties = dict(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.2,
                     logit_bias={3: 1.0, 7: -2.0}, banned_token_ids=[4], min_tokens=2)
    full = dict(penalties, top_k=50, top_p=0.9, min_p=0.05)
    history = dict(output_token_ids=[[1, 2]] * BATCH, prompt_token_ids=[[5]] * BATCH, eos_token_ids=[0, 2])
    return [
        ("plain", SP(), {}),
        ("greedy", SP(temperature=0.0), {}),
        ("candidates", SP(top_k=50, top_p=0.9, min_p=0.05), {}),
        ("candidates_min_keep", SP(top_k=50, min_keep=60), {}),
        ("candidates_logprobs", SP(top_k=50, top_p=0.9, logprobs=True, top_logprobs=5), {}),
        ("mirostat_v1", SP(mirostat_mode=1), {}),
        ("mirostat_v1_logprobs", SP(mirostat_mode=1, logprobs=True, logprobs_mode="processed"), {}),
        ("top_p", SP(top_p=0.9), {}),
        ("min_p", SP(min_p=0.05), {}),
        ("min_keep_top_p_min_p", SP(top_p=0.9, min_p=0.05, min_keep=3), {}),
        ("typical", SP(typical_p=0.9), {}),
        ("typical_min_keep", SP(typical_p=0.9, min_keep=4, top_k=40), {}),
        ("mirostat_v2", SP(mirostat_mode=2), {}),
        ("both_mirostats", [SP(mirostat_mode=1), SP(mirostat_mode=2), SP(mirostat_mode=1)], {}),
        ("logprobs_raw", SP(logprobs=True, top_logprobs=20), {}),
        ("logprobs_final", SP(top_p=0.9, typical_p=0.95, logprobs=True, logprobs_mode="final", top_logprobs=2), {}),
        ("logprobs_widths", [SP(logprobs=True, top_logprobs=1), SP(logprobs=True, top_logprobs=3),
                             SP(logprobs=True, top_logprobs=8)], {}),
        ("logprobs_width_16", SP(logprobs=True, top_logprobs=16), {}),
        ("greedy_logprobs", SP(temperature=0.0, logprobs=True, top_logprobs=4), {}),
        ("allowed", SP(allowed_token_ids=list(range(100)), top_k=10), {}),
        ("full", SP(**full, logprobs=True, top_logprobs=5), history),
        ("full_typical", SP(**penalties, typical_p=0.9, logprobs=True, logprobs_mode="final"), history),
        ("full_mirostat", SP(**penalties, mirostat_mode=2), history),
        # the extended samplers (docs/semantics.md §3 C-E) on the select path, the candidate engine and the plain path
        ("extended_select", SP(eta_cutoff=1e-3, top_n_sigma=2.0, typical_p=0.95, xtc_probability=1.0,
                               xtc_threshold=0.1, dynatemp_range=0.3, min_keep=2, logprobs=True,
                               logprobs_mode="final", top_logprobs=2), {}),
        ("extended_candidates", SP(top_k=50, top_p=0.95, eta_cutoff=1e-3, top_n_sigma=2.0, xtc_probability=1.0,
                                   xtc_threshold=0.05, dynatemp_range=0.3, logprobs=True, top_logprobs=2), {}),
        ("dynatemp_plain", SP(dynatemp_range=0.5, logprobs=True, logprobs_mode="final"), {}),
        ("dynatemp_top_p", SP(top_p=0.9, dynatemp_range=0.5, mirostat_mode=0), {}),
        ("dynatemp_mirostat", SP(mirostat_mode=1, dynatemp_range=0.5), {}),
        ("eta_min_keep", SP(eta_cutoff=0.01, min_keep=3), {}),
        ("dry", SP(**penalties, dry_multiplier=1.0, dry_allowed_length=1, dry_sequence_breakers=[[9]]), history),
    ]


def _kernels() -> set[str]:
    """Every ``*_kernel`` jit function of the Triton backend's modules (``module.name``, module relative)."""
    import pkgutil

    import fastsampler.backends.triton as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            # a JITFunction, or an InterpretedFunction under the interpreter: both wrap the Python function as ``fn``
            fn = getattr(obj, "fn", None)
            if name.endswith("_kernel") and callable(fn) and getattr(fn, "__module__", "") == mod.__name__:
                names.add(f"{info.name}.{name}")
    return names


def _record(out: Path) -> None:
    """Record the launches of every call of `_calls` (CUDA launch configuration, record-only) and write their compile
    specialisations, with the backend's kernel list, to ``out`` as JSON. Runs under the interpreter."""
    import torch

    import fastsampler
    from fastsampler import ops
    from fastsampler.backends.triton import dry
    from fastsampler.backends.triton.philox import philox4x32, philox_words
    from fastsampler.bench.record import record_launches
    from fastsampler.bench.sass import spec_of

    with record_launches() as launches:
        for vocab in VOCABS:
            for dtype in DTYPES:
                x = torch.randn(BATCH, vocab).to(getattr(torch, dtype))
                for name, p, kw in _calls():
                    params = p if isinstance(p, list) else [p] * BATCH
                    fastsampler.sample(x, params, backend="triton", **kw)
                    fastsampler.sampling_probs(x, params, backend="triton", **kw)
                    sampler = fastsampler.Sampler(vocab_size=vocab, max_slots=BATCH, device="cpu", backend="triton",
                                                  eos_token_ids=[0, 2], history_len=32)
                    slots = [sampler.add(q, prompt_token_ids=kw.get("prompt_token_ids", [[]])[0])[0] for q in params]
                    sampler.sample(x, torch.tensor(slots))  # a tensor of slots: the CUDA-graph step
                    if name in SLOT_LIST_CALLS:
                        sampler.sample(x, slots)  # a list of slots
                        words = (vocab + 31) // 32
                        sampler.sample(x, torch.tensor(slots), token_bitmask=torch.full((BATCH, words), -1,
                                                                                       dtype=torch.int32))
                        # speculative verification: match (ordinary steps) and rejection (forced tokens)
                        y = torch.stack([x, x], 1)
                        sampler.verify(y, [[1]] * BATCH, slots)
                        sampler.verify(y, [[1]] * BATCH, slots, draft_probs=torch.full((BATCH, 1, vocab), 1 / vocab))
                # scoring: forced tokens, raw (greedy rows) and processed (stages A-D)
                fastsampler.score(x, [1] * BATCH, top_n=2, extra_token_ids=[[3]] * BATCH, backend="triton")
                full_p = next(q for n, q, _ in _calls() if n == "full")
                fastsampler.score(x, [1] * BATCH, logprobs_mode="processed", params=full_p, backend="triton",
                                  prompt_token_ids=[[5]] * BATCH, output_token_ids=[[1, 2]] * BATCH,
                                  eos_token_ids=[0, 2])
                ops.top_k_mask_logits(x, 50, backend="triton")
                ops.top_p_mask_logits(x, 0.9, min_keep=2, backend="triton")
                ops.min_p_mask_logits(x, 0.05, backend="triton")
                ops.typical_mask_logits(x, 0.9, backend="triton")
        philox4x32(torch.zeros((4, 4), dtype=torch.int64), torch.zeros((4, 2), dtype=torch.int64))
        philox_words(torch.arange(64, dtype=torch.int64))
        # DRY's table on a device (a CPU ring takes the C++ extension: launched here directly), with and without
        # breakers
        ring = torch.zeros((BATCH, 1024), dtype=torch.int32)
        fd = torch.tensor([[0.8, 1.75]] * BATCH, dtype=torch.float64)
        idry = torch.tensor([[2, -1]] * BATCH)
        for brk in (None, torch.full((BATCH, 2, 3), -1, dtype=torch.int64)):
            dry.dry_table(ring, torch.full((BATCH,), 2000), torch.arange(BATCH), fd, idry, brk, 160)
    specs = [spec_of(x) for x in launches if x.kind == "triton"]
    out.write_text(json.dumps({"specs": specs, "kernels": sorted(_kernels())}, default=repr), encoding="utf-8")


def _logits_dtype(spec: dict) -> str:
    return next((a["dtype"] for a in spec["args"] if a["name"] == "logits_ptr"), "")


def _representatives(specs: list[dict]) -> list[dict]:
    """One specialisation per kernel, constexprs and launch options (with the integer classes of its first launch in
    the chosen logits dtype). The logits dtype is one not yet compiled for that kernel where the launches offer one,
    else the dtypes take turns, so every kernel compiles in every logits dtype it was launched with."""
    groups: dict[str, dict[str, dict]] = {}
    for s in specs:
        key = json.dumps([s["module"], s["qualname"], s["constexprs"], s["options"]], sort_keys=True, default=repr)
        groups.setdefault(key, {}).setdefault(_logits_dtype(s), s)
    chosen, seen = [], set()
    turn: collections.Counter = collections.Counter()
    for by_dtype in groups.values():
        kernel = next(iter(by_dtype.values()))["qualname"]
        dtypes = sorted(by_dtype)
        dt = next((d for d in dtypes if (kernel, d) not in seen), dtypes[turn[kernel] % len(dtypes)])
        turn[kernel] += 1
        seen.add((kernel, dt))
        chosen.append(by_dtype[dt])
    missing = {(s["qualname"], _logits_dtype(s)) for s in specs} - seen
    for kernel, dt in sorted(missing):  # a dtype every group of the kernel offered only after another
        chosen.append(next(s for s in specs if s["qualname"] == kernel and _logits_dtype(s) == dt))
    return chosen


def _cache_dir() -> Path:
    env = os.environ.get("FASTSAMPLER_COMPILE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fastsampler" / "sm90"


def test_launched_kernels_compile_for_cuda(tmp_path):
    """Record the specialisations the CUDA path launches, then compile each one for sm_90 (cached)."""
    try:
        from fastsampler.bench.sass import compile_launches, spec_id
    except ImportError as e:  # pragma: no cover - triton layout change
        pytest.skip(f"the compile helpers are unavailable: {e}")
    out = tmp_path / "specs.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "tests.test_triton_compile", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads(out.read_text(encoding="utf-8"))
    specs = recorded["specs"]
    launched = {s["module"].rsplit(".", 1)[-1] + "." + s["qualname"] for s in specs}
    assert launched == set(recorded["kernels"]), (
        f"kernels never launched by the recorded calls: {sorted(set(recorded['kernels']) - launched)}")
    todo = _representatives(specs)
    # two compile workers (each compiles its share in a subprocess without TRITON_INTERPRET)
    workers = max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda share: compile_launches(share, _cache_dir()), [todo[i::workers]
                                                                                  for i in range(workers)]))
    results = {sid: r for part in parts for sid, r in part.items()}
    assert len(results) == len(todo)
    if all(r.get("unavailable") for r in results.values()):
        pytest.skip(next(iter(results.values()))["error"])
    by_id = {spec_id(s): s for s in todo}
    bad = [f"{by_id[sid]['qualname']} {_logits_dtype(by_id[sid])} {by_id[sid]['constexprs']}: {r.get('error', '')}"
           for sid, r in results.items() if not r.get("ok")]
    assert not bad, f"{len(bad)} of {len(todo)} specialisations failed to compile:\n" + "\n".join(bad)

if __name__ == "__main__":
    _record(Path(sys.argv[1]))
