"""Gradient clipping and the statistics: the factor ``clip_grad_norm_`` multiplied the gradients
by, so that decisions can see the unclipped gradient."""
from __future__ import annotations

import math
from typing import Union

import torch

from .sharding import is_dtensor

def _clip_coefficient_tensor(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """:func:`clip_coefficient` of a norm on an accelerator: tensor ops in its dtype, no host sync
    (``clamp`` keeps a NaN, so a NaN norm gives a NaN coefficient, an invalid step)."""
    return (max_norm / (total_norm.detach() + 1e-6)).clamp(max=1.0)


def _clip_coefficient_float(total_norm: float, max_norm: float) -> float:
    """:func:`clip_coefficient` of a host value, in double: like the tensor formula, a NaN ratio
    stays NaN (Python's ``min(1.0, nan)`` would give 1.0 and count the step as valid)."""
    x = max_norm / (float(total_norm) + 1e-6)
    return 1.0 if x >= 1.0 else x


def clip_coefficient(total_norm: Union[float, torch.Tensor], max_norm: float) -> Union[float, torch.Tensor]:
    """The factor ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` multiplied the gradients
    by, from the total norm it returned: ``min(1, max_norm / (total_norm + 1e-6))`` (for a norm on
    an accelerator a device tensor computed in its dtype as torch does, no host sync; for a CPU
    tensor or a number, a float). A NaN norm gives NaN, an infinite one 0: either marks the
    step invalid in :meth:`GradES.step`. Pass it to
    :meth:`GradES.step` so that decisions see the unclipped gradient."""
    if isinstance(total_norm, torch.Tensor):
        if is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()
        if total_norm.device.type == "cpu":  # a host value: plain float math, no tensor ops
            total_norm = float(total_norm)
        else:
            return _clip_coefficient_tensor(total_norm, max_norm)
    return _clip_coefficient_float(total_norm, max_norm)


def unclip(stats: torch.Tensor, coef: Union[None, float, torch.Tensor]) -> torch.Tensor:
    """Statistics ``[C, 3]`` of ``g / coef`` from those of ``g`` (``coef``: the factor clipping
    multiplied the gradients by; ``None`` or ``1.0``: unchanged). A coefficient that is not a
    finite number > 0 (the total norm was infinite or NaN) marks the step invalid through the
    non-finite count. The same float64 operations as the native rule."""
    if coef is None:
        return stats
    if isinstance(coef, torch.Tensor):
        c = coef.detach().to(device=stats.device, dtype=torch.float64, non_blocking=True).reshape(())
        bad = torch.isfinite(c).logical_and(c > 0).logical_not().to(torch.float64)
    else:
        c = float(coef)
        if c == 1.0:
            return stats
        bad = 0.0 if (math.isfinite(c) and c > 0) else 1.0
    return torch.cat([stats[:, :1] / (c * c), stats[:, 1:2] / c, stats[:, 2:] + bad], dim=1)


__all__ = ["clip_coefficient", "unclip"]
