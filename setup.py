"""Builds the C++ CPU extension ``fastsampler._C`` on every install (pybind11)."""

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

ext_modules = []
if SOURCES:
    ext_modules.append(
        Pybind11Extension(
            "fastsampler._C",
            SOURCES,
            include_dirs=[os.path.join("csrc", "include")],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
