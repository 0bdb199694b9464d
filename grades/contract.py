"""The contract between the GradES policy and an optimizer that honours freezes itself.

An optimizer that implements :class:`FreezableOptimizer` collects per-parameter gradient
statistics in its own pass and keeps a device-side frozen mask, so the policy reads statistics
from it and writes freeze decisions into it without a host sync. :class:`~grades.FrozenAwareAdamW`
implements it; so can an engine's optimizer (a flat-buffer or sharded one). Any other optimizer
(e.g. ``torch.optim.AdamW``) is driven through ``requires_grad`` alone.

Rows: every per-parameter tensor below has one row per parameter, in :attr:`param_list` order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Union

import numpy as np
import torch

from ._validate import upload

__all__ = ["FreezableOptimizer"]


class FreezableOptimizer(ABC):
    """What :class:`~grades.GradES` needs from an optimizer that freezes on the device.

    Attributes an implementation provides (device tensors, read without syncing):
        param_list: the parameters in row order (list of tensors, ``P`` entries).
        frozen: bool ``[P]``; a frozen parameter is never updated again.
        last_grad_stats: float64 ``[P, 3]``: ``(sum g^2, sum |g|, non-finite count)`` of each
            gradient applied by the last step (zero rows for parameters that did not take part).
        last_participation: bool ``[P]``: which parameters took part in the last step.
        last_step_skipped: bool 0-dim: whether the last step was skipped (non-finite gradients).
    """

    param_list: list[torch.Tensor]
    frozen: torch.Tensor
    last_grad_stats: torch.Tensor
    last_participation: torch.Tensor
    last_step_skipped: torch.Tensor

    #: whether :attr:`last_grad_stats` are already summed over the ranks that hold shards of the
    #: parameters (FSDP2, ZeRO), so a policy must not reduce them again
    reduces_stats: bool = False

    @abstractmethod
    def param_index(self, p: torch.Tensor) -> int:
        """Row of parameter ``p``; ``ValueError`` if the optimizer does not manage it."""

    @property
    def num_params(self) -> int:
        """Number of rows ``P``."""
        return len(self.param_list)

    @property
    @abstractmethod
    def step_calls(self) -> int:
        """Host count of completed ``step()`` calls (the policy uses it to see a new step)."""

    @abstractmethod
    def freeze_mask_(self, mask: torch.Tensor) -> None:
        """OR a device bool mask ``[P]`` into :attr:`frozen`, in place, without a host sync."""

    @abstractmethod
    def sync_frozen_state(self, mask: Optional[Union[torch.Tensor, np.ndarray]] = None) -> int:
        """Tell the host which rows are frozen (a host copy of :attr:`frozen`); returns how many
        it learned about now."""


class IndexedFrozenRows(FreezableOptimizer):
    """The row bookkeeping of an optimizer whose rows are fixed at construction: ``_index``
    (``id(param)`` → row), ``_step_calls``, the device mask :attr:`frozen` and its host copy
    ``_host_frozen``. :meth:`_frozen_changed` is told the rows newly known to be frozen."""

    def param_index(self, p: torch.Tensor) -> int:
        try:
            return self._index[id(p)]
        except KeyError:
            raise ValueError(f"parameter is not managed by this {type(self).__name__}") from None

    @property
    def step_calls(self) -> int:
        return self._step_calls

    def freeze_mask_(self, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (self.num_params,):
            raise ValueError(f"mask must be a bool tensor of shape [{self.num_params}]")
        self.frozen.logical_or_(mask.to(self.frozen.device))

    def sync_frozen_state(self, mask: Optional[Union[torch.Tensor, np.ndarray]] = None) -> int:
        host = (self.frozen.to("cpu").numpy() if mask is None else
                (mask.to("cpu").numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask))).astype(bool)
        if host.shape != (self.num_params,):
            raise ValueError(f"mask must have shape [{self.num_params}], got {list(host.shape)}")
        new = np.nonzero(host & ~self._host_frozen)[0]
        if len(new):
            self.frozen.index_fill_(0, upload(torch.from_numpy(new), self.frozen.device), True)
            self._host_frozen[new] = True
            self._frozen_changed(new)
        return int(len(new))

    def _frozen_changed(self, new: np.ndarray) -> None:
        """Rows ``new`` just became frozen on the host (default: nothing to do)."""

