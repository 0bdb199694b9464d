"""How a GradES freeze reaches autograd when flipping ``requires_grad`` costs something.

By default :class:`~grades.GradES` sets ``requires_grad=False`` on a component's parameters as
soon as the host learns that it froze; that removes its weight-gradient GEMM from backward. Two
consumers pay for every such change:

* ``torch.compile``: dynamo guards on each parameter's ``requires_grad``, so every freeze event
  recompiles the graph, and after ``torch._dynamo.config.recompile_limit`` events the model
  silently runs eagerly;
* DDP with ``find_unused_parameters=False`` (its default) or ``static_graph=True``: a parameter
  that stops producing gradients leaves the reducer waiting ("Expected to have finished
  reduction in the prior iteration").

:class:`FreezeWaves` takes over that last step. A freeze still reaches the optimizer at once
(the frozen mask of a :class:`~grades.FrozenAwareAdamW`, or for any other optimizer its gradient
being dropped), so the *decisions* and the *updates* are those of an ordinary run. Only the
``requires_grad`` flip is batched into a few *waves*: when the fraction of frozen components
first reaches each entry of ``waves``, every component frozen so far is flipped at once (one
recompile per wave). Until its wave, a frozen matrix still pays for its weight-gradient GEMM
(the trade-off: with ``waves=(0.5, 0.9)`` the earliest freezes wait longest, until half of the
components have frozen). ``waves=()`` never flips (what DDP needs).

The set of frozen parameters that the gradient drop and a DDP comm hook use is *committed* at
step boundaries only (every ``every`` GradES steps, after waiting for the device decisions), so
that it is the same on every rank at the same step.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..policy.freezing import REQUIRES_GRAD_ATTR

__all__ = ["FreezeWaves", "attach_engines", "DEFAULT_WAVES"]

#: Default waves under ``torch.compile``: at most two recompiles over a whole run.
DEFAULT_WAVES = (0.5, 0.9)



def _check_waves(waves: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(w) for w in waves)
    except (TypeError, ValueError):
        raise TypeError(f"waves must be a sequence of fractions in (0, 1], got {waves!r}") from None
    if any(not 0.0 < w <= 1.0 for w in out) or list(out) != sorted(set(out)):
        raise ValueError(f"waves must be increasing fractions in (0, 1], got {waves!r}")
    return out


class FreezeWaves:
    """Commit a :class:`~grades.GradES`'s freezes to autograd in a few waves.

    Args:
        gs: the policy; its freezes go through this object from now on (``gs.autograd_gate``).
        waves: increasing fractions of the tracked components; when the frozen fraction first
            reaches one, every frozen component's parameters get ``requires_grad=False``.
            ``()`` never flips (DDP).
        every: commit the frozen set every ``every`` GradES steps (1: each step). On a CUDA
            device each commit waits for the outstanding decisions (a host sync), which is what
            makes the set the same on every rank; on CPU they are known at once.
        drop: how a frozen parameter whose ``requires_grad`` is still set loses its gradient:
            ``"accumulate"`` (a post-accumulate-grad hook, so clipping and the optimizer never
            see it) or ``"step"`` (an optimizer step pre-hook; needed under DDP, whose reducer
            must still find the gradient). ``None``: ``"accumulate"``.

    Attributes:
        flips: number of waves taken so far (each one is a recompile under ``torch.compile``).
        committed: bool ``[C]`` host mask of the components committed as frozen.
    """

    def __init__(self, gs: Any, waves: Sequence[float] = DEFAULT_WAVES, *, every: int = 1,
                 drop: str = "accumulate"):
        if getattr(gs, "autograd_gate", None) is not None:
            raise ValueError("this GradES already commits its freezes through a FreezeWaves; attach one only")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if drop not in ("accumulate", "step"):
            raise ValueError(f"drop must be 'accumulate' or 'step', got {drop!r}")
        if gs.step_count > 0 and gs.frozen_fraction > 0:
            raise ValueError("attach FreezeWaves before the first freeze (right after building GradES)")
        self.gs = gs
        self.waves = _check_waves(waves)
        self.every = int(every)
        self.drop = drop
        self.flips = 0
        self._next = 0  # index of the next wave in self.waves
        C = len(gs.components)
        self.committed = np.zeros(C, dtype=bool)
        self._flipped = np.zeros(C, dtype=bool)
        self._drop_ids: set[int] = set()
        self._listeners: list[Callable[[np.ndarray], None]] = []
        self._handles: list[Any] = []
        params = [p for c in gs.components for p in c.params]
        if drop == "accumulate":
            self._handles = [p.register_post_accumulate_grad_hook(self._drop_grad) for p in params
                             if p.requires_grad]
        elif gs.optimizer is not None:
            self._handles = [gs.optimizer.register_step_pre_hook(self._drop_before_step)]
        gs.autograd_gate = self

    # ------------------------------------------------------------------ called by GradES

    def after_step(self, gs: Any) -> None:
        """At a GradES step boundary: commit the frozen set (every ``every`` steps) and flip a wave."""
        if gs.step_count % self.every:
            return
        if gs.device.type != "cpu":
            gs.wait()  # every rank commits the decisions of the same steps
        now = gs.host_frozen.copy()
        if np.array_equal(now, self.committed):
            return
        self.committed = now
        self._flipped &= now  # a loaded state may have unfrozen components (GradES restored them)
        comps = gs.components
        self._drop_ids = {id(p) for c, f in zip(comps, now) if f for p in c.params}
        for c, f in zip(comps, now):
            if f:
                for p in c.params:
                    p.grad = None
        for fn in self._listeners:
            fn(now)
        frac = float(now.mean()) if len(now) else 0.0
        if self._next < len(self.waves) and frac + 1e-12 >= self.waves[self._next]:
            while self._next < len(self.waves) and frac + 1e-12 >= self.waves[self._next]:
                self._next += 1  # waves passed together flip together
            self.flips += 1
            self._flip(now & ~self._flipped)

    # ------------------------------------------------------------------ internals

    def _flip(self, mask: np.ndarray) -> None:
        for c, f in zip(self.gs.components, mask):
            if f:
                for p in c.params:
                    if not hasattr(p, REQUIRES_GRAD_ATTR):
                        setattr(p, REQUIRES_GRAD_ATTR, bool(p.requires_grad))
                    p.requires_grad_(False)
        self._flipped |= mask

    def _drop_grad(self, p: torch.Tensor) -> None:
        if id(p) in self._drop_ids:
            p.grad = None

    def _drop_before_step(self, opt: Any, args: Any, kwargs: Any) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in self._drop_ids:
                    p.grad = None

    def add_listener(self, fn: Callable[[np.ndarray], None]) -> None:
        """Call ``fn(committed_mask)`` at each commit that changes the frozen set."""
        self._listeners.append(fn)

    def frozen_params(self) -> set[int]:
        """``id()`` of every parameter of a committed frozen component."""
        return set(self._drop_ids)


def attach_engines(gs: Any, model: Any) -> None:
    """Called by :class:`~grades.GradES` at construction: attach to a DDP wrapper
    (:func:`~grades.integrations.ddp.attach_ddp`, which never flips ``requires_grad``) or to a
    ``torch.compile``d model (:func:`~grades.integrations.compile.attach_compile`), whichever
    ``model`` is, including either one wrapped in the other."""
    from torch.nn.parallel import DistributedDataParallel
    from .compile import attach_compile, is_compiled
    inner = getattr(model, "_orig_mod", None)  # torch.compile(ddp_model)
    ddp = model if isinstance(model, DistributedDataParallel) else inner
    if isinstance(ddp, DistributedDataParallel):
        from .ddp import attach_ddp
        attach_ddp(ddp, gs)
    elif is_compiled(model):
        attach_compile(gs)
