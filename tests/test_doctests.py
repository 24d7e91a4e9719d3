"""The runnable examples in public docstrings are part of the documentation: run them."""

from __future__ import annotations

import doctest
import importlib
import importlib.util

import pytest

MODULES = [
    "fastsampler._api",
    "fastsampler.backends",
    "fastsampler.ops",
    "fastsampler.params",
    "fastsampler.backends.reference.philox",
    "fastsampler.backends.reference.pipeline",
    "fastsampler.bench.grids",
    "fastsampler.compat.flashinfer",
]
if importlib.util.find_spec("transformers") is not None:  # the `integrations` extra
    MODULES.append("fastsampler.integrations.transformers")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    mod = importlib.import_module(name)
    res = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert res.attempted > 0, f"{name} has no examples"
    assert res.failed == 0, f"{res.failed} example(s) failed in {name}"
