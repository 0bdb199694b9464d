"""Triton backend (to be implemented)."""
from __future__ import annotations

from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda",)
    kinds = ("flat",)

    def available(self) -> tuple[bool, str]:
        return False, "not implemented yet"
