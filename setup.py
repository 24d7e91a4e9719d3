"""Builds the C++ CPU extension on every install (pybind11): one module per SIMD path (``_C_avx512``, ``_C_avx2``,
``_C_portable``), of which ``fastsampler.backends.cpu`` imports the best this CPU runs as ``_C``."""

from __future__ import annotations

import glob
import os

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError as e:  # pragma: no cover - pybind11 is a build requirement in pyproject.toml
    raise SystemExit("building fastsampler needs pybind11: pip install pybind11") from e

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
HEADERS = sorted(glob.glob(os.path.join("csrc", "include", "fastsampler", "*.h")))


def _find_cxx() -> str | None:
    import shutil

    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compiler_accepts(flags: list[str]) -> bool:
    """True when the C++ compiler builds a tiny program with ``flags`` (probe for -march=native / OpenMP)."""
    import subprocess
    import tempfile

    cxx = _find_cxx()
    if not cxx:
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as fh:
            fh.write("#include <cstdio>\nint main() { std::printf(\"ok\"); return 0; }\n")
        try:
            r = subprocess.run([cxx, *flags, src, "-o", os.path.join(d, "probe")], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


def _cpu_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags shared by every variant of the CPU extension.

    -O3; -pthread (rows run on a std::thread pool); OpenMP when the compiler has it (an optional row loop,
    FASTSAMPLER_THREADING=openmp); FASTSAMPLER_SANITIZE=1 builds with -fsanitize=address,undefined (docs/cpu.md).
    The instruction-set flags are per variant (`_variants`).
    """
    cflags = ["-O3", "-fno-math-errno"]
    lflags: list[str] = []
    if os.name != "nt":
        cflags.append("-pthread")
        lflags.append("-pthread")
    if os.environ.get("FASTSAMPLER_NO_OPENMP", "0") != "1" and _compiler_accepts(["-fopenmp"]):
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    if os.environ.get("FASTSAMPLER_SANITIZE", "0") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cflags = [f for f in cflags if f != "-O3"] + ["-O1", "-g", *san]
        lflags += san
    return cflags, lflags


# The x86-64 variants, best first, with their instruction-set flags: x86-64-v4 is AVX-512 F/BW/CD/DQ/VL on top of
# x86-64-v3 (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE); portable is the baseline ISA (SSE2). -mtune stays generic (the
# wheel runs on any CPU of the level), but generic tuning vectorises loops 256 bits wide even with AVX-512:
# -mprefer-vector-width=512 gives the compiler's own loops (top-p, typical) the width of the intrinsics (without it,
# top-p 0.9 and typical ran 15-16 % slower than -march=native on the development machine, Zen 5; docs/cpu.md,
# "SIMD paths", has what remains).
X86_VARIANTS = {
    "avx512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    "avx2": ["-march=x86-64-v3"],
    "portable": [],
}


def _is_x86_64() -> bool:
    import platform
    import sysconfig

    plat = sysconfig.get_platform()  # e.g. linux-x86_64, macosx-11.0-arm64, macosx-10.9-universal2
    return platform.machine().lower() in ("x86_64", "amd64") and not plat.endswith(("arm64", "universal2", "aarch64"))


def _variants() -> dict[str, list[str]]:
    """Module name -> extra compile flags.

    Default: one module per SIMD path, ``_C_avx512``, ``_C_avx2`` and ``_C_portable`` (only ``_C_portable`` off
    x86-64, e.g. aarch64, where the portable lane loops are vectorised for NEON, which is baseline there); the package
    picks one at import from the CPU's features (`fastsampler.backends.cpu`). FASTSAMPLER_NATIVE=1: a single ``_C``
    built with -march=native, for the machine that builds it (a developer build; so does FASTSAMPLER_SANITIZE=1).
    FASTSAMPLER_PORTABLE=1: only ``_C_portable``.
    """
    native = os.environ.get("FASTSAMPLER_NATIVE", "0") == "1" or os.environ.get("FASTSAMPLER_SANITIZE", "0") == "1"
    if native:
        return {"_C": ["-march=native"] if _compiler_accepts(["-march=native"]) else []}
    if os.environ.get("FASTSAMPLER_PORTABLE", "0") == "1" or not _is_x86_64():
        return {"_C_portable": []}
    out = {}
    for name, flags in X86_VARIANTS.items():
        if flags and not _compiler_accepts(flags):
            print(f"fastsampler: the compiler does not accept {' '.join(flags)}: no {name} kernels in this build")
            continue
        out[f"_C_{name}"] = flags
    return out


class BuildExt(build_ext):
    """pybind11's build_ext, compiling the variants in parallel (one per core) and, for in-place (editable) builds,
    removing the extension files of another configuration (a ``_C`` left by a native build next to the variants, or
    the reverse), which would otherwise be imported instead."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if self.parallel is None or self.parallel is True:
            self.parallel = max(1, min(len(self.extensions), os.cpu_count() or 1))

    def build_extension(self, ext) -> None:
        # the variants compile the same sources: each gets its own object directory (the threads would otherwise
        # write the same bindings.o)
        import copy

        sub = copy.copy(self)
        sub.build_temp = os.path.join(self.build_temp, ext.name.rsplit(".", 1)[-1])
        super(BuildExt, sub).build_extension(ext)

    def run(self) -> None:
        super().run()
        if not self.inplace:
            return
        from importlib.machinery import EXTENSION_SUFFIXES

        built = {os.path.basename(self.get_ext_fullpath(e.name)) for e in self.extensions}
        pkg_dir = os.path.join(HERE, "src", "fastsampler", "backends", "cpu")
        for name in ["_C", *(f"_C_{v}" for v in X86_VARIANTS)]:
            for suffix in EXTENSION_SUFFIXES:
                path = os.path.join(pkg_dir, name + suffix)
                if os.path.basename(path) not in built and os.path.exists(path):
                    print(f"fastsampler: removing {os.path.relpath(path, HERE)} (not part of this build)")
                    os.remove(path)


ext_modules = []
if SOURCES:
    if not _find_cxx():
        raise SystemExit(
            "fastsampler builds its C++ CPU extension on install and needs a C++17 compiler (g++ or clang++); "
            "none was found on PATH (nor in $CXX); install one, e.g. `apt-get install g++`, and reinstall"
        )
    _cflags, _lflags = _cpu_flags()
    for _name, _isa in _variants().items():
        ext_modules.append(
            Pybind11Extension(
                f"fastsampler.backends.cpu.{_name}",
                SOURCES,
                include_dirs=[os.path.join("csrc", "include")],
                depends=HEADERS,
                cxx_std=17,
                define_macros=[("FASTSAMPLER_MODULE", _name)],
                extra_compile_args=[*_cflags, *_isa],
                extra_link_args=_lflags,
            )
        )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
