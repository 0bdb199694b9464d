"""CPU backend: the C++/OpenMP extension in ``csrc/cpu`` (to be implemented)."""
from __future__ import annotations

from .base import Backend


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)
    kinds = ("list", "flat")

    def available(self) -> tuple[bool, str]:
        return False, "not implemented yet"
