"""The backends behind one small protocol, and the registry that chooses among them.

A backend is a module (``fastsampler.backends.reference.backend``, ``fastsampler.backends.cpu``,
``fastsampler.backends.triton.backend``) that implements `Backend`: it says what it can run (`Capabilities`), whether
it imported (``is_available``), and runs a `fastsampler._batch.PackedBatch`. Every backend follows
docs/semantics.md; the numpy reference defines it. `load` imports a backend by name, `available` lists those that
run here, `resolve` picks one for a device and dtype (``"auto"``: the fastest that supports them). `pack_batch` /
`pack_host` build a backend's input from logits and `SamplingParams`.

>>> from fastsampler import backends
>>> backends.load("reference").CAPABILITIES.devices
('cpu', 'cuda')
>>> backends.resolve("auto", torch.device("cpu"), torch.float64)
'reference'
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .._batch import HostBatch, PackedBatch, ids_to_bitmask, pack_batch, pack_host
from ..output import SampleOutput

__all__ = ["BACKENDS", "Backend", "Capabilities", "HostBatch", "PackedBatch", "available", "ids_to_bitmask", "load",
           "loaded", "pack_batch", "pack_host", "resolve"]

BACKENDS = ("triton", "cpu", "reference")

_MODULES = {
    "triton": "fastsampler.backends.triton.backend",
    "cpu": "fastsampler.backends.cpu",
    "reference": "fastsampler.backends.reference.backend",
}
_INSTALL_HINT = {
    "triton": "pip install 'fastsampler[triton]'  (or: pip install triton)",
    "cpu": "pip install --force-reinstall --no-build-isolation --no-deps .  (rebuilds the C++ extension)",
    "reference": "pip install --force-reinstall fastsampler",
}
# ``auto``: the order in which backends are tried for a device type (the first that supports the dtype runs)
_AUTO = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can run.

    Attributes
    ----------
    devices : tuple of str
        Device types whose tensors it takes (``supports`` may still refuse one at run time, e.g. Triton on the CPU
        outside the interpreter).
    dtypes : tuple of torch.dtype
        Logits dtypes.
    features : frozenset of str
        Entry points beyond the three every backend has: ``"slot_index"`` (reads a `Sampler`'s slot-indexed batch
        itself and applies its state update in place; the others get the gathered row-indexed form) and
        ``"host_batch"`` (``sample_host`` on a `fastsampler._batch.HostBatch` of numpy arrays, no tensors).
    exact : bool
        Tokens equal the reference's except at the near-ties docs/semantics.md allows (every backend today).
    """

    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    features: frozenset[str] = frozenset()
    exact: bool = True


@runtime_checkable
class Backend(Protocol):
    """The interface of a backend module (module-level attributes and functions)."""

    CAPABILITIES: Capabilities

    def is_available(self) -> tuple[bool, str]:
        """(True, "") when it can run here, else (False, why)."""

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it runs logits of ``dtype`` on ``device`` now."""

    def sample_packed(self, batch: PackedBatch) -> SampleOutput:
        """One token per row (docs/semantics.md)."""

    def sampling_probs_packed(self, batch: PackedBatch) -> torch.Tensor:
        """The ``(B, V)`` float32 distribution each row's token is drawn from."""

    def kept_mask_packed(self, batch: PackedBatch) -> torch.Tensor:
        """The ``(B, V)`` bool kept set of each row."""


def _check_name(name: str) -> None:
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {name!r}")


def load(name: str) -> Backend:
    """Import the backend ``name``, or raise ``ImportError`` saying why and how to install it."""
    _check_name(name)
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as e:
        raise ImportError(f"backend={name!r} is unavailable ({e}); install it with: {_INSTALL_HINT[name]}") from e
    ok, why = mod.is_available()
    if not ok:
        raise ImportError(f"backend={name!r} is unavailable ({why}); install it with: {_INSTALL_HINT[name]}")
    return mod  # type: ignore[return-value]


def available() -> list[str]:
    """Names of the backends that import and can run here."""
    out = []
    for name in BACKENDS:
        try:
            load(name)
        except ImportError:
            continue
        out.append(name)
    return out


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs logits on ``device`` of ``dtype``: ``backend`` itself, or for ``"auto"`` the first of
    Triton (CUDA) / C++ (CPU) / reference that imports and supports them."""
    if backend == "auto":
        for name in _AUTO.get(device.type, ("reference",)):
            try:
                mod = load(name)
            except ImportError:
                continue
            if mod.supports(device, dtype):
                return name
        return "reference"
    _check_name(backend)
    return backend


def loaded(name: str) -> Backend | None:
    """The module of backend ``name`` if it is imported now (no import)."""
    return sys.modules.get(_MODULES[name])  # type: ignore[return-value]
