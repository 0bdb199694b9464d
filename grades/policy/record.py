"""Asynchronous host copies of the decision state: the device decides, the host learns of it
once a non-blocking copy has landed (looked at with ``event.query()``, never waited for)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .state import DecisionState


class HostCopy:
    """One pinned host buffer + event for a non-blocking copy of the decision state."""

    def __init__(self, C: int, device: torch.device):
        self.C = C
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(3 * C, dtype=torch.float64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.step = 0
        self.in_flight = False

    def start(self, t: int, stat: torch.Tensor, frozen: torch.Tensor, fstep: torch.Tensor) -> None:
        packed = torch.cat([stat, frozen.to(torch.float64), fstep.to(torch.float64)])
        self.host.copy_(packed, non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()
        self.step = t
        self.in_flight = True

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.in_flight = False
        a = self.host.numpy()
        C = self.C
        return a[:C].copy(), a[C:2 * C] > 0.5, a[2 * C:].astype(np.int64)



class HostCopies:
    """Two :class:`HostCopy` slots used in turn, the copies in flight in order, and the one-off
    copy of "no valid reading in the grace period" per component."""

    def __init__(self, C: int, device: torch.device):
        self.slots = [HostCopy(C, device) for _ in range(2)]
        self._i = 0
        self.pending: list[HostCopy] = []
        self._probe: Optional[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None

    def publish(self, t: int, s: DecisionState) -> bool:
        """Start a copy of step ``t``'s state; ``False`` when the next slot is still in flight (a
        later copy carries everything: the frozen state is cumulative)."""
        slot = self.slots[self._i]
        if slot.in_flight:
            return False
        slot.start(t, s.last_stat, s.frozen, s.freeze_step)
        self.pending.append(slot)
        self._i ^= 1
        return True

    def landed(self) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The copies that have arrived, oldest first: ``(step, stat, frozen, freeze_step)``."""
        out = []
        while self.pending and self.pending[0].ready():
            slot = self.pending.pop(0)
            out.append((slot.step, *slot.read()))
        return out

    def probe(self, missing: torch.Tensor) -> None:
        """Start a copy of ``missing`` (device bool ``[C]``)."""
        cuda = missing.device.type == "cuda"
        host = torch.empty(missing.shape, dtype=torch.bool, pin_memory=cuda)
        host.copy_(missing, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self._probe = (host, event)

    def probe_landed(self) -> Optional[np.ndarray]:
        """The probe's host copy once it has arrived (once), else ``None``."""
        if self._probe is None or not (self._probe[1] is None or self._probe[1].query()):
            return None
        host, self._probe = self._probe[0], None
        return host.numpy()

    def synchronize(self) -> None:
        """Wait for every copy in flight."""
        for slot in self.pending:
            slot.synchronize()
        if self._probe is not None and self._probe[1] is not None:
            self._probe[1].synchronize()


__all__ = ["HostCopies", "HostCopy"]
