"""The C++ CPU backend's SIMD variants (docs/cpu.md, "SIMD paths"): the package imports the best module this CPU runs
as ``_C`` (``_C_avx512``, ``_C_avx2``, ``_C_portable``), ``FASTSAMPLER_SIMD`` overrides the choice, and every variant
this CPU runs gives the reference's tokens and the same outputs as the others: bit for bit between the AVX2 and
AVX-512 paths (the same fused multiply-adds), within float32 rounding for the portable path (no FMA on baseline
x86-64).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import numpy as np
import pytest
import torch

import fastsampler
from fastsampler.backends import cpu as fcpu
from tests.backend_checks import check_exact, mixed_params, random_logits

pytestmark = pytest.mark.skipif(not fcpu.is_available()[0], reason=fcpu.is_available()[1])

SINGLE_BUILD = fcpu._C is not None and fcpu._C.__name__.endswith("._C")  # FASTSAMPLER_NATIVE=1 or the sanitizer build
needs_variants = pytest.mark.skipif(SINGLE_BUILD, reason="a single-module build (FASTSAMPLER_NATIVE=1 / sanitizer)")


def _variants() -> dict[str, ModuleType]:
    """Every built variant this CPU runs, imported directly."""
    runs = fcpu.cpu_simd_paths()
    return {p: importlib.import_module(f"fastsampler.backends.cpu._C_{p}") for p in fcpu.built_simd_paths()
            if p in runs}


def _run(code: str, simd: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("FASTSAMPLER_SIMD", None)
    if simd is not None:
        env["FASTSAMPLER_SIMD"] = simd
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_simd_reports_a_path() -> None:
    assert fcpu._C.simd() in fcpu.SIMD_PATHS
    assert fcpu.build_info()["simd"] == fcpu._C.simd()
    import fastsampler.backends.cpu._C as by_path  # the import path the extension always had

    assert by_path is fcpu._C


@needs_variants
def test_the_best_variant_this_cpu_runs_is_chosen() -> None:
    built, runs = fcpu.built_simd_paths(), fcpu.cpu_simd_paths()
    assert "portable" in built and "portable" in runs  # the portable module is always built and runs everywhere
    if os.environ.get("FASTSAMPLER_SIMD", "auto") in ("", "auto"):
        assert fcpu._C.simd() == next(p for p in built if p in runs)
    for p in built:
        if p in runs:
            assert importlib.import_module(f"fastsampler.backends.cpu._C_{p}").simd() == p


@needs_variants
@pytest.mark.parametrize("v", [7, 4097, 32001])  # one partial 16-lane block; a second tile; Llama-2's vocabulary + 1
def test_every_variant_matches_the_reference_and_the_others(v: int, monkeypatch: pytest.MonkeyPatch) -> None:
    mods = _variants()
    b = 16
    x = random_logits(b, v, seed=v, scale=3.0)
    params = mixed_params(v, seed=v) * 2
    counts = torch.from_numpy(np.random.default_rng(v).integers(0, 3, (b, v), dtype=np.int32))
    kw = dict(output_counts=counts, steps=torch.arange(b, dtype=torch.int64))
    outs = {}
    for p, mod in mods.items():
        monkeypatch.setattr(fcpu, "_C", mod)
        check_exact("cpu", x, params, **kw)  # tokens except at near-ties, logprobs etc. within 1e-5
        outs[p] = fastsampler.sample(x, params, backend="cpu", **kw).numpy()
    fields = ("tokens", "valid", "logprobs", "top_logprob_ids", "top_logprobs", "ranks", "mirostat_mu")
    first = next(iter(outs))
    for p, o in outs.items():
        a = outs[first]
        np.testing.assert_array_equal(o.tokens, a.tokens, err_msg=f"tokens: {p} vs {first}")
        np.testing.assert_array_equal(o.valid, a.valid, err_msg=f"valid: {p} vs {first}")
        np.testing.assert_array_equal(o.top_logprob_ids, a.top_logprob_ids, err_msg=f"top ids: {p} vs {first}")
        if "portable" in (p, first):  # no FMA: float32 rounding may differ in the last bits
            for f in ("logprobs", "top_logprobs", "mirostat_mu"):
                np.testing.assert_allclose(getattr(o, f), getattr(a, f), rtol=1e-6, atol=1e-5, err_msg=f"{f}: {p}")
        else:
            for f in fields:
                np.testing.assert_array_equal(getattr(o, f), getattr(a, f), err_msg=f"{f}: {p} vs {first} bitwise")


@needs_variants
def test_variants_draw_the_same_noise() -> None:
    """The Philox words and the float32 noise of the token race, per variant."""
    for p, mod in _variants().items():
        assert mod.philox4x32_10(1, 2, 3, 4, 5, 6) == fcpu._C.philox4x32_10(1, 2, 3, 4, 5, 6), p
        np.testing.assert_allclose(mod.neg_log_noise(7, 3, 1, 0, 5), fcpu._C.neg_log_noise(7, 3, 1, 0, 5), rtol=1e-6,
                                   err_msg=p)


_SHOW = "import fastsampler.backends.cpu as c; print(c._C.simd(), c._C.__name__)"


@needs_variants
@pytest.mark.parametrize("path", ["avx512", "avx2", "portable"])
def test_fastsampler_simd_selects_a_path(path: str) -> None:
    if path not in fcpu.built_simd_paths():
        pytest.skip(f"no {path} module in this build")
    res = _run(_SHOW, path)
    if path not in fcpu.cpu_simd_paths():
        assert res.returncode != 0 and "this CPU does not run it (it runs: " in res.stderr, res.stderr
        return
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [path, f"fastsampler.backends.cpu._C_{path}"]


@needs_variants
def test_fastsampler_simd_auto_is_the_default() -> None:
    assert _run(_SHOW, "auto").stdout == _run(_SHOW, None).stdout
    assert _run(_SHOW, None).stdout.split()[0] == next(p for p in fcpu.built_simd_paths()
                                                      if p in fcpu.cpu_simd_paths())


def test_fastsampler_simd_rejects_an_unknown_path() -> None:
    res = _run(_SHOW, "avx9")
    assert res.returncode != 0
    want = "ValueError: FASTSAMPLER_SIMD must be one of auto, avx512, avx2, portable (or unset), got 'avx9'"
    assert want in res.stderr, res.stderr


@needs_variants
def test_fastsampler_simd_rejects_a_path_this_cpu_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX-512 (the portable module's feature report replaced): asking for it is refused before the
    module is loaded, and auto picks the AVX2 path."""
    portable = importlib.import_module("fastsampler.backends.cpu._C_portable")
    monkeypatch.setattr(portable, "cpu_features", lambda: {"avx512": False, "avx2": True, "portable": True})
    monkeypatch.setitem(sys.modules, "fastsampler.backends.cpu._C", fcpu._C)  # restored after the auto case
    monkeypatch.setenv("FASTSAMPLER_SIMD", "avx512")
    with pytest.raises(RuntimeError, match=r"FASTSAMPLER_SIMD='avx512', but this CPU does not run it "
                                           r"\(it runs: avx2, portable\)"):
        fcpu._load_extension()
    monkeypatch.setenv("FASTSAMPLER_SIMD", "auto")
    if "avx2" in fcpu.built_simd_paths():
        assert fcpu._load_extension().simd() == "avx2"


@needs_variants
def test_fastsampler_simd_rejects_a_path_not_built(tmp_path) -> None:
    """A copy of the package without the AVX2 module: asking for it names what is built."""
    import shutil

    pkg = tmp_path / "fastsampler"
    shutil.copytree(os.path.dirname(fastsampler.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (pkg / "backends" / "cpu").glob("_C_avx2*"):
        f.unlink()
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); " + _SHOW
    res = _run(code, "avx2")
    assert res.returncode != 0
    assert "RuntimeError: FASTSAMPLER_SIMD='avx2', but this installation has no avx2 kernels (built: " in res.stderr


def _setup_functions() -> dict:
    """setup.py's build-planning functions (`_variants` and what it calls), without running ``setup()``."""
    import ast
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "setup.py"
    tree = ast.parse(path.read_text())
    names = {"_find_cxx", "_compiler_accepts", "_is_x86_64", "_variants"}
    body = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in names) or (
        isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "X86_VARIANTS" for t in n.targets))]
    ns: dict = {"os": os}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), ns)
    return ns


def test_build_plan_per_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The modules setup.py builds: off x86-64 (aarch64, Apple silicon) only the portable one; on x86-64 the three
    variants, each with its instruction-set flags; ``FASTSAMPLER_NATIVE=1`` a single native ``_C``;
    ``FASTSAMPLER_PORTABLE=1`` the portable one alone."""
    for var in ("FASTSAMPLER_NATIVE", "FASTSAMPLER_SANITIZE", "FASTSAMPLER_PORTABLE"):
        monkeypatch.delenv(var, raising=False)
    ns = _setup_functions()
    ns["_is_x86_64"] = lambda: False
    assert ns["_variants"]() == {"_C_portable": []}
    ns["_is_x86_64"] = lambda: True
    ns["_compiler_accepts"] = lambda flags: True
    plan = ns["_variants"]()
    assert list(plan) == ["_C_avx512", "_C_avx2", "_C_portable"]
    assert "-march=x86-64-v4" in plan["_C_avx512"] and "-march=x86-64-v3" in plan["_C_avx2"] and not plan["_C_portable"]
    monkeypatch.setenv("FASTSAMPLER_PORTABLE", "1")
    assert ns["_variants"]() == {"_C_portable": []}
    monkeypatch.setenv("FASTSAMPLER_NATIVE", "1")
    assert ns["_variants"]() == {"_C": ["-march=native"]}
