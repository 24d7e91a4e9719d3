"""``import fastsampler`` imports no torch: every public name loads its module on first use, and is then the same
object as before (``fastsampler.sample is fastsampler._api.sample``, ``fastsampler.reference`` the numpy reference
module itself under both names)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CODE = textwrap.dedent(
    """
    import sys

    import fastsampler

    print("after import:", sorted(m for m in sys.modules if m == "torch" or m.startswith("fastsampler.")))
    assert fastsampler.__version__
    import fastsampler.reference as ref

    from fastsampler import Sampler, SamplingParams, backends, reference, sample
    from fastsampler import _api, _score, output, params, sampler

    assert ref is reference is fastsampler.reference is backends.reference
    assert sys.modules["fastsampler.reference"] is sys.modules["fastsampler.backends.reference"] is ref
    assert sample is _api.sample and fastsampler.sampling_probs is _api.sampling_probs
    assert fastsampler.score is _score.score and Sampler is sampler.Sampler and SamplingParams is params.SamplingParams
    assert fastsampler.SampleOutput is output.SampleOutput and fastsampler.available_backends is _api.available_backends
    assert issubclass(fastsampler.SeedWithoutStepsWarning, Warning)
    assert fastsampler.layout.NF > 0  # submodules load on attribute access too
    assert set(fastsampler.__all__) <= set(dir(fastsampler))
    try:
        fastsampler.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("no AttributeError")
    ns = {}
    exec("from fastsampler import *", ns)
    assert ns["sample"] is sample and ns["reference"] is ref
    print("ok")
    """
)


def test_import_is_light_and_names_resolve_as_before() -> None:
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "after import: []", lines[0]
    assert lines[-1] == "ok"


def test_integrations_import_nothing_until_asked() -> None:
    """``fastsampler.integrations`` names its modules; importing it (or fastsampler) imports no third-party library."""
    code = ("import sys, fastsampler, fastsampler.integrations; "
            "print(sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
