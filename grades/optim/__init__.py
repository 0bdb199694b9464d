"""The frozen-aware AdamW optimizer, one concept per module:

* :mod:`.adamw`: :class:`FrozenAwareAdamW` itself (arguments, the step as named steps, copies);
* :mod:`.rows`: which parameter is which row of the device tensors, and freezing by row;
* :mod:`.hparams`: constructor and param-group checks, with torch's exception types;
* :mod:`.gather`: what a group contributes to a step, its state read afresh from ``opt.state``;
* :mod:`.views`: how complex and non-contiguous parameters reach the kernels;
* :mod:`.nonfinite`: whether a step is skipped for non-finite gradients;
* :mod:`.update`: the fused update with its step counts and statistics rows;
* :mod:`.checkpoint`: ``state_dict`` / transactional ``load_state_dict``.
"""
from .adamw import FrozenAwareAdamW
from .nonfinite import NonFiniteGradientError

__all__ = ["FrozenAwareAdamW", "NonFiniteGradientError"]
