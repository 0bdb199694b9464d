"""Where the rule's statistics come from: a table of per-row sums ``(sum g^2, sum |g|,
non-finite count)`` (float64 ``[N, 3]``) and the map naming each component's rows in it.

* :class:`GradListSource`: one row per tracked parameter, from their ``.grad`` tensors;
* :class:`~grades.policy.optimizer.OptimizerLink`: one row per optimizer parameter, from the
  optimizer's own pass (a :class:`~grades.contract.FreezableOptimizer`);
* :class:`CustomSource`: any user :class:`StatsSource`, one row per component.

Each has ``idx`` (int64 ``[C, K]``, padded with ``num_rows``), ``num_rows`` and
``gather(frozen) -> (rows, row_part, participated, skipped)``, the first four arguments of a rule
step (see :mod:`grades.policy.rule`).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from .. import backends
from .._validate import STATS_DTYPE, SUPPORTED_DTYPES, upload
from ..components import Component
from ..ops import grad_stats
from .sharding import is_dtensor, local

#: what ``gather`` returns: rows [N, 3], row participation [N] or None, component participation
#: [C] or None, the optimizer's "step skipped" flag or None
Gathered = tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class StatsSource(Protocol):
    """A custom source of per-component statistics: ``compute(frozen)`` returns float64 ``[C, 3]``
    local (possibly partial) sums ``(sum g^2, sum |g|, non-finite count)`` for the components,
    given their device frozen mask ``[C]``.

    A source may also define ``participation()``, called right after ``compute``: a device bool
    ``[C]`` telling which components had a gradient in this step (``None``: all of them). Steps in
    which a component had none do not count for it (no EMA update, no patience check). And
    ``bind(components)``, called once by GradES with its components.
    """

    def compute(self, frozen: torch.Tensor) -> torch.Tensor: ...


def padded_index(groups: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Int64 ``[C, K]``: row ``i`` lists ``groups[i]``, padded with ``pad`` (``K`` >= 1)."""
    k = max(1, max((len(g) for g in groups), default=1))
    idx = torch.full((len(groups), k), pad, dtype=torch.long)
    for i, g in enumerate(groups):
        if g:
            idx[i, :len(g)] = torch.tensor(list(g), dtype=torch.long)
    return idx


class CustomSource:
    """A user :class:`StatsSource` as a table of one row per component."""

    all_missing = False

    def __init__(self, source: StatsSource, components: Sequence[Component], device: torch.device):
        bind = getattr(source, "bind", None)
        if callable(bind):
            bind(components)
        self.source = source
        participation = getattr(source, "participation", None)
        self._participation = participation if callable(participation) else None
        self.num_rows = len(components)
        self.idx = torch.arange(self.num_rows, device=device)[:, None]

    def gather(self, frozen: torch.Tensor) -> Gathered:
        rows = self.source.compute(frozen)
        if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (self.num_rows, 3):
            raise ValueError(f"the statistics source must return a [{self.num_rows}, 3] tensor (one row per "
                             f"component), got {getattr(rows, 'shape', type(rows).__name__)}")
        rows = rows.to(torch.float64).contiguous()
        return rows, None, self._participation() if self._participation else None, None


class GradListSource:
    """Statistics of the tracked parameters' ``.grad`` tensors, one :func:`grad_stats` call.

    Parameters without a gradient read zero, and their components do not take part in the step.
    DTensor gradients contribute their local shard (partial sums, to be all-reduced).
    """

    #: distinct participation patterns kept on the device (a new pattern costs one small copy)
    CACHE = 64

    def __init__(self, components: Sequence[Component], device: torch.device):
        self.params = [p for c in components for p in c.params]
        groups, i = [], 0
        for c in components:
            groups.append(list(range(i, i + len(c.params))))
            i += len(c.params)
        self.num_rows = len(self.params)
        self.idx = padded_index(groups, self.num_rows).to(device)
        self._comp = np.array([ci for ci, c in enumerate(components) for _ in c.params], dtype=np.int64)
        self.param_comp = torch.from_numpy(self._comp).to(device)
        self.num_components = len(components)
        self.single = all(len(c.params) == 1 for c in components)
        self.dtensor = any(is_dtensor(p) for p in self.params)
        self.device = device
        self._empty = torch.empty(0, device=device)
        self._out = torch.empty((len(self.params), 3), dtype=STATS_DTYPE, device=device)
        self._missing: tuple[int, ...] = ()
        self._participated: dict[tuple[int, ...], torch.Tensor] = {}
        self._backend = None  # chosen at the first step (the backends may build native code)

    @property
    def all_missing(self) -> bool:
        """Whether no tracked parameter had a gradient in the last :meth:`gather`."""
        return len(self._missing) == len(self.params)

    def gather(self, frozen: torch.Tensor) -> Gathered:
        return self.rows(frozen), None, self.participated(), None

    def rows(self, frozen: torch.Tensor) -> torch.Tensor:
        """Per-parameter statistics ``[P, 3]`` (a buffer reused by the next call)."""
        grads, missing = [], []
        empty, dtensor = self._empty, self.dtensor
        usual = True
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                grads.append(empty)
                missing.append(i)
            else:
                if dtensor:
                    g = local(g)
                usual = usual and g.dtype in SUPPORTED_DTYPES and g.layout == torch.strided
                grads.append(g if g.is_contiguous() else g.contiguous())
        self._missing = tuple(missing)
        pf = frozen if self.single else frozen.index_select(0, self.param_comp)
        if usual:  # gradients of this model's parameters: grad_stats without its per-tensor checks
            if self._backend is None:
                self._backend = backends.select(self.device, "list")
            self._backend.grad_stats_list(grads, pf, self._out)
            return self._out
        return grad_stats(grads, frozen=pf, out=self._out)  # the public op names the problem

    def participated(self) -> Optional[torch.Tensor]:
        """Bool ``[C]`` on the device: components all of whose parameters had a gradient in the
        last :meth:`rows` (``None`` when all had one). Known on the host; cached per pattern."""
        key = self._missing
        if not key:
            return None
        part = self._participated.get(key)
        if part is None:
            host = np.ones(self.num_components, dtype=bool)
            host[self._comp[list(key)]] = False
            if len(self._participated) >= self.CACHE:
                self._participated.clear()
            part = upload(torch.from_numpy(host), self.device)
            self._participated[key] = part
        return part


__all__ = ["CustomSource", "GradListSource", "StatsSource", "padded_index"]
