"""No silent no-op: report tracked parameters that got no gradient in the first steps.

A loop can look healthy while nothing trains: the classic case is a Megatron-style loop that
accumulates gradients into ``param.main_grad`` (``param.grad`` is set to ``None``) under an
optimizer that reads ``param.grad``. The optimizer then updates nothing, and GradES reads zero
statistics. :class:`NoGradientWatch` looks at the statistics of the first :data:`WATCH_STEPS`
counted steps and warns once, naming the components whose parameters never had a (non-zero,
finite) gradient, with the likely cause.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..components import Component

#: counted steps looked at before the report (a component may legitimately skip a step or two,
#: e.g. an unrouted expert, so one empty step is not enough)
WATCH_STEPS = 3


def _reads_main_grad(optimizer: Any) -> bool:
    """Whether ``optimizer`` steps from flat ``main_grad`` buffers rather than ``param.grad``."""
    return hasattr(optimizer, "grad_buffer")


class NoGradientWatch:
    """Collects which components had a non-zero statistic in the first steps, then reports the
    others once (a ``RuntimeWarning``) and stops looking.

    Args:
        components: the tracked components (names and parameters for the message).
        optimizer: the optimizer GradES drives (or ``None``), to tell the likely cause.
    """

    def __init__(self, components: Sequence[Component], optimizer: Any):
        self.components = list(components)
        self.optimizer = optimizer
        self.seen = np.zeros(len(self.components), dtype=bool)
        self.done = False

    def observe(self, stat: Optional[np.ndarray], step: int) -> None:
        """Take in the host's latest statistic ``stat`` (float64 ``[C]``, ``None`` before the first)
        of counted step ``step``; report once ``step`` reaches :data:`WATCH_STEPS`."""
        if self.done or stat is None:
            return
        self.seen |= np.asarray(stat) != 0
        if step >= WATCH_STEPS:
            self.done = True
            self._report()

    def _report(self) -> None:
        missing = [c for c, s in zip(self.components, self.seen.tolist()) if not s]
        if not missing:
            return
        names = [n for c in missing for n in c.param_names]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        on_main_grad = any(isinstance(getattr(p, "main_grad", None), torch.Tensor) for c in missing for p in c.params)
        if on_main_grad and not _reads_main_grad(self.optimizer):
            cause = ("their gradients are accumulated into param.main_grad (a Megatron-style flat buffer) and "
                     "param.grad stays None, while the optimizer reads param.grad: nothing is being trained. "
                     "Step the flat buffers with grades.FlatAdamW (see attach_param_and_grad_buffers)")
        else:
            cause = ("the loss may not reach them (an unused layer, a skipped branch), their gradient may be "
                     "exactly zero, or gs.step() may run after optimizer.zero_grad() (call it right after "
                     "optimizer.step())")
        warnings.warn(f"GradES: {len(missing)} of {len(self.components)} tracked component(s) got no gradient in "
                      f"the first {WATCH_STEPS} steps ({shown}): {cause}. Such components read a statistic of 0 "
                      "and may be frozen without having trained.", RuntimeWarning, stacklevel=4)


__all__ = ["NoGradientWatch", "WATCH_STEPS"]
