"""GradES under ``DistributedDataParallel``, whatever its arguments.

DDP's reducer expects every parameter that required a gradient at construction to produce one
in each backward (unless ``find_unused_parameters=True``, which costs a graph traversal per
step), and with ``static_graph=True`` it expects the same set every step. So under DDP a frozen
parameter keeps ``requires_grad=True`` (a :class:`~grades.integrations.waves.FreezeWaves` with no
waves) and the freeze reaches the other two consumers instead:

* **communication**: a comm hook all-reduces only the gradients of parameters that are not
  frozen; a frozen parameter's slice of the bucket is zero-filled locally and a fully frozen
  bucket sends nothing. Bytes all-reduced per step fall with the frozen fraction
  (:attr:`DDPFreezeHook.bytes_sent`).
* **the optimizer**: its step pre-hook drops the frozen gradients (``grad=None``), so any
  optimizer skips them; a :class:`~grades.FrozenAwareAdamW` skips them by its mask anyway.

The frozen set is committed at GradES step boundaries, identically on every rank (the decisions
come from DDP-averaged gradients, so they are bitwise the same everywhere), hence every rank
all-reduces the same slices in each step: no step is ever unsynchronised. What is left is the
weight-gradient GEMM of frozen matrices, which DDP without ``find_unused_parameters`` requires.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .waves import FreezeWaves

__all__ = ["DDPFreezeHook", "attach_ddp"]


class DDPFreezeHook:
    """The comm hook state: which parameters are frozen, and what was sent.

    Attributes:
        bytes_sent: bytes all-reduced by this rank since the last :meth:`reset_counters`.
        calls: buckets seen since then.
    """

    def __init__(self, group: Optional[Any] = None):
        self.group = group
        self.frozen_ids: set[int] = set()
        self.bytes_sent = 0
        self.calls = 0

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.calls = 0

    def hook(self, state, bucket):  # unannotated: DDP checks the annotations it finds
        """DDP comm hook: average the unfrozen gradients of ``bucket`` (a ``dist.GradBucket``)
        over the group; returns a future of the bucket's buffer."""
        self.calls += 1
        buf = bucket.buffer()
        world = dist.get_world_size(self.group)
        frozen = [id(p) in self.frozen_ids for p in bucket.parameters()]
        if not any(frozen):
            return self._all_reduce(buf.div_(world), lambda t: t)
        grads = bucket.gradients()
        live = []
        for g, f in zip(grads, frozen):
            if f:
                g.zero_()  # a frozen gradient is never applied: no bytes for it
            else:
                live.append(g)
        if not live:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(buf)
            return fut
        flat = torch.cat([g.reshape(-1) for g in live]).div_(world)

        def back(t: torch.Tensor) -> torch.Tensor:
            off = 0
            for g in live:
                n = g.numel()
                g.copy_(t[off:off + n].view_as(g))
                off += n
            return buf
        return self._all_reduce(flat, back)

    def _all_reduce(self, t: torch.Tensor, then: Any) -> torch.futures.Future:
        self.bytes_sent += t.numel() * t.element_size()
        fut = dist.all_reduce(t, group=self.group, async_op=True).get_future()
        return fut.then(lambda f: then(f.value()[0]))


def _check_ddp(ddp: Any) -> None:
    """Refuse, before any step, a DDP wrapper the hook cannot serve."""
    if getattr(ddp, "_comm_hooks", None) and getattr(ddp, "_grades_hook", None) is None:
        raise ValueError("this DistributedDataParallel model already has a comm hook; GradES needs its own to stop "
                         "communicating frozen gradients (remove register_comm_hook, or pass ddp.module to GradES "
                         "and build DDP with find_unused_parameters=True)")


def attach_ddp(ddp_model: Any, gs: Any, *, every: int = 1) -> DDPFreezeHook:
    """Make ``gs`` (a :class:`~grades.GradES` of ``ddp_model`` or of ``ddp_model.module``) work
    under ``ddp_model`` with any of DDP's arguments; returns the comm hook state.

    Call before the first step. ``every``: commit freezes every ``every`` GradES steps (see
    :class:`~grades.integrations.waves.FreezeWaves`). ``GradES(ddp_model, ...)`` and the
    ``GradESCallback`` (Trainer under ``torchrun``) call it themselves.

    Raises:
        ValueError: ``ddp_model`` already has a comm hook of its own, ``gs`` has no optimizer, or
            ``gs`` has already stepped. (Attaching a later GradES to the same wrapper takes its hook
            over from the earlier one.)
    """
    from torch.nn.parallel import DistributedDataParallel
    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"attach_ddp needs a DistributedDataParallel model, got {type(ddp_model).__name__}")
    if gs.step_count > 0:
        raise ValueError("attach_ddp before the first GradES step (a freeze would otherwise have flipped "
                         "requires_grad, which DDP without find_unused_parameters cannot take)")
    _check_ddp(ddp_model)
    if gs.optimizer is None:
        raise ValueError("GradES under DDP needs the optimizer (GradES(model, optimizer, ...)): frozen parameters "
                         "keep requires_grad there, and their gradients are dropped before each optimizer step")
    hook = getattr(ddp_model, "_grades_hook", None)
    if hook is None:
        hook = DDPFreezeHook(ddp_model.process_group)
        ddp_model.register_comm_hook(None, hook.hook)
        ddp_model._grades_hook = hook
    hook.frozen_ids = set()  # a later GradES (a second train() call) takes the hook over
    waves = FreezeWaves(gs, (), every=every, drop="step")

    def learn(committed: Any) -> None:
        hook.frozen_ids = waves.frozen_params()
    waves.add_listener(learn)
    return hook
