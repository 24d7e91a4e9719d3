"""The README's Python examples run as written, and it states the prerequisites."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), ns)  # the examples share one namespace


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_readme_states_the_prerequisites() -> None:
    pre = _section("Prerequisites")
    for needed in ("**make**", "C++17", "gcc", "clang", "Python ≥ 3.10", "GB", "`.venv`", "`make setup`",
                   "`make test`", "minutes"):
        assert needed in pre, f"README § Prerequisites does not mention {needed!r}"
    assert re.search(r"Disk: about \d+(\.\d+)? GB", pre), "README § Prerequisites gives no disk size"
    assert re.search(r"`make setup` from nothing\s+\d+ s", pre), "README § Prerequisites gives no setup time"


def test_readme_explains_cpu_and_cuda_torch() -> None:
    install = _section("Install")
    makefile = (README.parent / "Makefile").read_text()
    pinned = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, flags=re.M).group(1)
    for variant in ("cpu", "cu128"):
        url = f"--index-url https://download.pytorch.org/whl/{variant}"
        assert f"pip install {pinned} {url}" in install
        assert f'make setup TORCH="{pinned} {url}"' in install
    assert pinned in (README.parent / ".ci" / "run").read_text()  # the version the README quotes is CI's


def test_pyproject_license_is_an_spdx_string() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((README.parent / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"  # a table is deprecated by setuptools (a build warning)
    setuptools_req = next(r for r in data["build-system"]["requires"] if r.startswith("setuptools"))
    assert setuptools_req == "setuptools>=77.0.3"  # setuptools 77 reads an SPDX license string
