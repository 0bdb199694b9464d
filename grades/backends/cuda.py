"""CUDA backend: the CUDA C++ extension in ``csrc/cuda`` (to be implemented)."""
from __future__ import annotations

from .base import Backend


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)
    kinds = ("list", "flat")

    def available(self) -> tuple[bool, str]:
        return False, "not implemented yet"
