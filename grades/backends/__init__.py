"""Backend registry and selection.

``auto`` picks, per device type and input form:

* CPU tensors:  ``cpu`` (C++/OpenMP extension) then ``reference``
* CUDA tensors: ``cuda`` (CUDA C++ extension), then ``triton`` (flat buffers), then ``reference``

``triton`` also runs on CPU tensors under ``TRITON_INTERPRET=1`` when asked for by name (that is
how CI tests it). Environment switches:

* ``GRADES_BACKEND=<name>`` forces a backend wherever it supports the input (device and list or
  flat form); other inputs keep the automatic choice. An unknown name is an error.
* ``GRADES_STRICT=1`` turns the fall-back from a native backend (``cpu`` on CPU, ``cuda`` on CUDA)
  into an error, so a run can prove the native code was built and used.
"""
from __future__ import annotations

import os
import warnings

import torch

from .base import AdamWArgs, Backend
from .reference import ReferenceBackend

_REGISTRY: dict[str, Backend] = {}
_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
_NATIVE = {"cpu": "cpu", "cuda": "cuda"}
_warned: set[str] = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _lazy_register() -> None:
    if _REGISTRY:
        return
    register(ReferenceBackend())
    from .cpu import CpuBackend
    from .cuda import CudaBackend
    from .triton_backend import TritonBackend
    for b in (CpuBackend(), CudaBackend(), TritonBackend()):
        register(b)


def names() -> list[str]:
    _lazy_register()
    return list(_REGISTRY)


def get(name: str) -> Backend:
    _lazy_register()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def availability() -> dict[str, tuple[bool, str]]:
    """``{name: (available, detail or reason)}`` for every backend (building native code if needed)."""
    _lazy_register()
    out = {}
    for name, b in _REGISTRY.items():
        try:
            out[name] = b.available()
        except Exception as e:  # a backend's probe must never take the package down
            out[name] = (False, f"{type(e).__name__}: {e}")
    return out


def strict() -> bool:
    return os.environ.get("GRADES_STRICT", "0") not in ("", "0", "false", "False")


def select(device: torch.device, kind: str, requested: str = "auto") -> Backend:
    """The backend that will run an op on ``device`` for input form ``kind`` ("list"/"flat")."""
    _lazy_register()
    if requested == "auto":
        forced = os.environ.get("GRADES_BACKEND", "auto") or "auto"
        # the switch applies where the named backend handles the input; elsewhere auto decides
        if forced != "auto" and get(forced).supports(device, kind):
            requested = forced
    if requested != "auto":
        b = get(requested)
        if not b.supports(device, kind):
            raise ValueError(f"backend {requested!r} does not support {kind} inputs on {device.type} "
                             f"(it handles {', '.join(b.kinds)} on {', '.join(b.device_types)})")
        ok, why = b.available()
        if not ok:
            raise RuntimeError(f"backend {requested!r} is not available: {why}")
        return b
    order = _ORDER.get(device.type, ("reference",))
    reasons = []
    for name in order:
        b = _REGISTRY[name]
        if not b.supports(device, kind):
            reasons.append(f"{name}: no {kind} path")
            continue
        ok, why = b.available()
        if ok:
            native = _NATIVE.get(device.type)
            if native is not None and name != native and native in order:
                nb = _REGISTRY[native]
                nok, nwhy = nb.available()
                msg = (f"grades: native backend {native!r} not used for {kind} inputs on {device.type} "
                       f"({nwhy if not nok else 'no ' + kind + ' path'}); falling back to {name!r}")
                if strict():
                    raise RuntimeError(msg + " (GRADES_STRICT=1 forbids the fall-back)")
                if msg not in _warned:
                    _warned.add(msg)
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
            return b
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no grades backend for {kind} inputs on {device}: " + "; ".join(reasons))


__all__ = ["AdamWArgs", "Backend", "availability", "get", "names", "register", "select", "strict"]
