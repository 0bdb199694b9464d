"""What the host does once it learns of freezes: ``requires_grad=False`` and ``.grad=None`` on the
component's parameters (which removes their weight-gradient GEMM from backward), the optimizer's
host mask, the freeze events and ``should_stop``."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from ..components import Component
from .optimizer import OptimizerLink

#: attribute set on a parameter GradES freezes: its ``requires_grad`` from before, given back when
#: a loaded state has the component unfrozen (also by another GradES on the same model)
REQUIRES_GRAD_ATTR = "_grades_requires_grad"
_NONE = object()


class Freezer:
    """The host's knowledge of the frozen components.

    Attributes:
        frozen: bool ``[C]``, components the host knows to be frozen.
        freeze_step: int64 ``[C]``, the step each froze at (-1: not frozen).
        count: how many are frozen.
        events: ``{"component", "type", "step", "learned_at"}`` per freeze, in order.
        should_stop, stopped_at: whether (and at which step) ``stop_at`` components froze.
    """

    def __init__(self, components: Sequence[Component], link: Optional[OptimizerLink], stop_at: Optional[int]):
        self.components, self.link, self.stop_at = components, link, stop_at
        #: a :class:`~grades.integrations.waves.FreezeWaves` that flips ``requires_grad`` in waves
        #: (DDP, torch.compile); ``None``: flip as soon as the host learns of a freeze
        self.gate: Optional[object] = None
        self.reset()

    def reset(self) -> None:
        C = len(self.components)
        self.frozen = np.zeros(C, dtype=bool)
        self.freeze_step = np.full(C, -1, dtype=np.int64)
        self.count = 0
        self.events: list[dict] = []
        self.should_stop, self.stopped_at = False, None

    def learn(self, t: int, frozen: np.ndarray, fstep: np.ndarray) -> int:
        """Take in the frozen mask ``frozen`` and freeze steps ``fstep`` known at step ``t``;
        returns how many components are newly frozen."""
        new = np.nonzero(frozen & ~self.frozen)[0].tolist()
        for i in new:
            c = self.components[i]
            for p in c.params:
                if self.gate is None:  # otherwise the gate flips it, in waves
                    if not hasattr(p, REQUIRES_GRAD_ATTR):
                        setattr(p, REQUIRES_GRAD_ATTR, bool(p.requires_grad))
                    p.requires_grad_(False)
                p.grad = None
            self.freeze_step[i] = int(fstep[i])
            self.events.append({"component": c.name, "type": c.type, "step": int(fstep[i]), "learned_at": t})
        if new:
            self.frozen[new] = True
            self.count = int(self.frozen.sum())
            if self.link is not None:
                self.link.sync(new)
        if self.stop_at is not None and not self.should_stop and self.count >= self.stop_at:
            self.should_stop, self.stopped_at = True, t
        return len(new)

    def unfreeze_params(self, frozen: Sequence[bool]) -> None:
        """Give the parameters of the components not in ``frozen`` back the ``requires_grad`` they
        had before GradES froze them."""
        for c, f in zip(self.components, frozen):
            if not f:
                for p in c.params:
                    if hasattr(p, REQUIRES_GRAD_ATTR):
                        p.requires_grad_(bool(getattr(p, REQUIRES_GRAD_ATTR)))
                        delattr(p, REQUIRES_GRAD_ATTR)

    def snapshot(self) -> dict:
        rg = [(p, p.requires_grad, getattr(p, REQUIRES_GRAD_ATTR, _NONE)) for c in self.components for p in c.params]
        return {"host": (self.frozen.copy(), self.freeze_step.copy(), self.count, list(self.events),
                         self.should_stop, self.stopped_at),
                "requires_grad": rg, "link": self.link.snapshot() if self.link is not None else None}

    def restore(self, snap: dict) -> None:
        (self.frozen, self.freeze_step, self.count, self.events, self.should_stop, self.stopped_at) = snap["host"]
        if self.link is not None:
            self.link.restore(snap["link"])
        for p, rg, attr in snap["requires_grad"]:
            p.requires_grad_(rg)
            if attr is _NONE:
                if hasattr(p, REQUIRES_GRAD_ATTR):
                    delattr(p, REQUIRES_GRAD_ATTR)
            else:
                setattr(p, REQUIRES_GRAD_ATTR, attr)

    def load(self, v: dict) -> None:
        """Set the record fields of a checked saved state (after :meth:`learn` of its mask)."""
        self.events = v["freeze_events"]
        self.should_stop = v["should_stop"]
        self.stopped_at = v["stopped_at"]


def name_list(names: Sequence[Any], k: int = 5) -> str:
    """``names`` joined with commas, at most ``k`` of them."""
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(map(str, names[:k])) + more


__all__ = ["Freezer", "REQUIRES_GRAD_ATTR", "name_list"]
