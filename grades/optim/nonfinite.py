"""Whether a step is skipped because of non-finite gradients (the ``nonfinite`` option).

The decision is a 0-dim float32 tensor on the parameters' device (non-zero: skip; the fused
kernels take it as ``found_inf``), or ``None`` when nothing can skip the step, so the host never
waits for the device. Sources, in order of precedence:

1. a ``torch.amp.GradScaler``'s ``found_inf`` (it has already looked at every gradient);
2. a total gradient norm handed in with ``use_total_norm`` (clipping computed it anyway): not
   finite means skip;
3. with ``nonfinite="skip"``/``"raise"`` only, a detection pass over the gradients before the
   update (a second read of every gradient).

``"auto"`` (the default) uses 1 and 2 and otherwise applies the gradients as ``torch.optim.AdamW``
does, so a plain step reads each gradient once. ``"ignore"`` uses 1 only.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from .adamw import FrozenAwareAdamW
    from .gather import Work

__all__ = ["POLICIES", "NonFiniteGradientError", "decide", "uses_total_norm"]

POLICIES = ("auto", "skip", "raise", "ignore")


class NonFiniteGradientError(RuntimeError):
    """Raised by :meth:`FrozenAwareAdamW.step` with ``nonfinite="raise"`` when a gradient holds NaN/Inf."""


def uses_total_norm(policy: str) -> bool:
    """Whether a step under ``policy`` uses a total norm handed in with ``use_total_norm``."""
    return policy in ("auto", "skip")


def _from_norm(hint: Any, dev: torch.device) -> Optional[torch.Tensor]:
    if dev.type == "cpu" and (not isinstance(hint, torch.Tensor) or hint.device.type == "cpu"):
        return None if math.isfinite(float(hint)) else torch.ones((), dtype=torch.float32)
    h = torch.as_tensor(hint).detach().to(device=dev, dtype=torch.float32, non_blocking=True)
    return torch.isfinite(h.reshape(())).logical_not().to(torch.float32)


def _detect(opt: "FrozenAwareAdamW", work: list["Work"], frozens: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The detection pass: statistics of every participating gradient into ``last_grad_stats``."""
    stats_all = opt.last_grad_stats
    for w, fz in zip(work, frozens):
        rows = opt._rows_of(w)
        w.plan.backend.grad_stats_list(w.grads, fz, rows)
        if not w.plan.full:
            stats_all.index_copy_(0, w.plan.idx_global, rows)
    if opt._shards.active:  # FSDP2: partial sums over local shards, made whole (the same on every rank)
        opt._shards.reduce_stats_(stats_all)
    if stats_all.device.type == "cpu" and not stats_all[:, 2].numpy().any():
        return None  # host memory: a clean step (the usual case) is known at once
    if opt.nonfinite == "raise":
        _raise_if_nonfinite(opt)
        return None
    return (stats_all[:, 2].sum(dtype=torch.int64) > 0).to(torch.float32)


def _raise_if_nonfinite(opt: "FrozenAwareAdamW") -> None:
    counts = opt.last_grad_stats[:, 2]
    n = int(counts.sum(dtype=torch.int64).item())  # the one sync of the debugging mode
    if n:
        bad = torch.nonzero(counts).flatten().tolist()
        raise NonFiniteGradientError(
            f"{n} non-finite gradient element(s) in {len(bad)} parameter(s) (param_list indices {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}{opt._names(bad[:5])}); nothing was updated. "
            "Use nonfinite='skip' to skip such steps instead.")


def decide(opt: "FrozenAwareAdamW", work: list["Work"], frozens: list[torch.Tensor], found_inf: Any,
           hint: Any) -> tuple[Optional[torch.Tensor], bool]:
    """``(found, detected)``: the skip decision (see the module docstring) and whether a detection
    pass has already written this step's statistics."""
    dev = opt.frozen.device
    if found_inf is not None:
        found = found_inf.to(device=dev, non_blocking=True).reshape(()).ne(0).to(torch.float32)
        if opt._shards.active:  # the scaler looked at the local shards only: every rank skips alike
            found = opt._shards.reduce_found_(found)
        return found, False
    if hint is not None and uses_total_norm(opt.nonfinite):
        return _from_norm(hint, dev), False
    if opt.nonfinite in ("auto", "ignore"):
        return None, False
    return _detect(opt, work, frozens), True
