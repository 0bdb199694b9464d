"""Constructor and param-group checks of :class:`~grades.FrozenAwareAdamW`, with
``torch.optim.AdamW``'s exception types and messages (a drop-in fails the way torch fails)."""
from __future__ import annotations

from typing import Any

import torch

from .._checks import is_real

__all__ = ["check_hparams", "check_options", "REFUSED", "IMPL_SWITCHES"]

# The two options of torch.optim.AdamW this optimizer refuses (at any value but the default).
REFUSED = {"capturable": "CUDA-graph capture is not supported (step() never syncs with the host anyway)",
           "differentiable": "the fused update is not differentiable"}
# torch.optim.AdamW's implementation switches: None or a bool, without effect on the maths here
# (the update is always one fused call per parameter group).
IMPL_SWITCHES = ("foreach", "fused")


def _check_tensor_hp(name: str, t: torch.Tensor, foreach: Any) -> torch.Tensor:
    """A 1-element tensor hyperparameter, as torch checks it (foreach without capturable refuses it)."""
    if foreach:
        raise ValueError(f"{name} as a Tensor is not supported for capturable=False and foreach=True")
    if t.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element")
    if t.is_complex() or not t.is_floating_point():
        raise TypeError(f"Tensor {name} must be a real floating-point tensor, got {t.dtype}")
    return t.detach().reshape(())


def _check_real(name: str, v: Any) -> None:
    """The package's number test (a bool is not one). The ranges stay in :func:`check_hparams`:
    torch's messages name each value its own way, and torch accepts an infinite lr or eps."""
    if not is_real(v):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")


def check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any,
                  foreach: Any = None) -> tuple[Any, tuple[float, float]]:
    """torch.optim.AdamW's checks and messages; returns ``(lr, (beta1, beta2))`` normalised
    (a tensor lr as a 0-dim tensor, tensor betas read once on the host as floats).

    Raises ``ValueError`` for values out of range, a non-1-element tensor, a float and a tensor
    mixed in ``betas``, or a tensor lr/betas with ``foreach=True``; ``TypeError`` for non-numbers.
    """
    if isinstance(lr, torch.Tensor):
        lr = _check_tensor_hp("lr", lr, foreach)
    else:
        _check_real("lr", lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    _check_real("eps", eps)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    try:
        b0, b1 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    if isinstance(b0, torch.Tensor) != isinstance(b1, torch.Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    out = []
    for i, b in enumerate((b0, b1)):
        if isinstance(b, torch.Tensor):
            b = float(_check_tensor_hp(f"betas[{i}]", b, foreach).item())  # read once, at construction
        else:
            _check_real(f"betas[{i}]", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        out.append(float(b))
    _check_real("weight_decay", weight_decay)
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    return lr, (out[0], out[1])


def check_options(group: dict) -> None:
    """The boolean options of a param group: torch's RuntimeErrors for contradicting switches,
    ``ValueError`` for the two refused options, ``TypeError`` for a non-bool."""
    for name in IMPL_SWITCHES:
        v = group.get(name)
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be None or a bool, got {v!r}")
    for name in ("amsgrad", "maximize"):
        if not isinstance(group.get(name, False), bool):
            raise TypeError(f"{name} must be a bool, got {group.get(name)!r}")
    if group.get("fused"):
        if group.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if group.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    for name, why in REFUSED.items():
        if group.get(name, False) is not False:
            raise ValueError(f"FrozenAwareAdamW does not support {name}={group.get(name)!r} ({why}); "
                             f"leave {name}=False or use torch.optim.AdamW")
    if group.get("decoupled_weight_decay", True) is not True:
        raise ValueError("FrozenAwareAdamW always uses decoupled weight decay (AdamW); "
                         "decoupled_weight_decay must be True")
