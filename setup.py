"""Builds the C++ CPU extension ``fastsampler.backends.cpu._C`` on every install (pybind11)."""

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
    """Compile and link flags of the CPU extension.

    -O3; -march=native (the extension is built on the machine that installs it; FASTSAMPLER_PORTABLE=1 turns it off,
    e.g. for wheels); -pthread (rows run on a std::thread pool); OpenMP when the compiler has it (an optional row loop,
    FASTSAMPLER_THREADING=openmp); FASTSAMPLER_SANITIZE=1 builds with -fsanitize=address,undefined (docs/cpu.md).
    """
    cflags = ["-O3", "-fno-math-errno"]
    lflags: list[str] = []
    if os.name != "nt":
        cflags.append("-pthread")
        lflags.append("-pthread")
    if os.environ.get("FASTSAMPLER_PORTABLE", "0") != "1" and _compiler_accepts(["-march=native"]):
        cflags.append("-march=native")
    if os.environ.get("FASTSAMPLER_NO_OPENMP", "0") != "1" and _compiler_accepts(["-fopenmp"]):
        cflags.append("-fopenmp")
        lflags.append("-fopenmp")
    if os.environ.get("FASTSAMPLER_SANITIZE", "0") == "1":
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cflags = [f for f in cflags if f != "-O3"] + ["-O1", "-g", *san]
        lflags += san
    return cflags, lflags


ext_modules = []
if SOURCES:
    if not _find_cxx():
        raise SystemExit(
            "fastsampler builds its C++ CPU extension on install and needs a C++17 compiler (g++ or clang++); "
            "none was found on PATH (nor in $CXX); install one, e.g. `apt-get install g++`, and reinstall"
        )
    _cflags, _lflags = _cpu_flags()
    ext_modules.append(
        Pybind11Extension(
            "fastsampler.backends.cpu._C",
            SOURCES,
            include_dirs=[os.path.join("csrc", "include")],
            depends=HEADERS,
            cxx_std=17,
            extra_compile_args=_cflags,
            extra_link_args=_lflags,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
