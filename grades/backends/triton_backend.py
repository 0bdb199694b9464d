"""Triton backend (to be implemented)."""
from __future__ import annotations

from .base import Backend


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1, and only when named
    kinds = ("flat",)

    def available(self) -> tuple[bool, str]:
        return False, "not implemented yet"
