"""Shared fixtures: hypothesis profiles, the device under test, and the Triton interpreter switch (helpers shared by
the tests are modules of this package: `tests.backend_checks`, `tests.strategies`).

Triton kernels run natively on CUDA when a GPU is present, otherwise under ``TRITON_INTERPRET=1`` on the CPU. The
interpreter flag must be set before triton is imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present, else CPU (Triton kernels then run in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

