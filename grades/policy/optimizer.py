"""The policy's side of the :class:`~grades.contract.FreezableOptimizer` contract: the one map
between components and optimizer rows, and every call GradES makes into such an optimizer."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..components import Component
from ..contract import FreezableOptimizer
from .sources import Gathered, padded_index


def unwrap_optimizer(opt: Any) -> Any:
    """``opt``, or the :class:`FreezableOptimizer` a wrapper (e.g. accelerate's) holds as
    ``.optimizer``, a few levels deep.

    Raises:
        TypeError: ``opt`` is neither ``None`` nor an optimizer (an object with a ``step`` method).
    """
    if opt is not None and not (isinstance(opt, (torch.optim.Optimizer, FreezableOptimizer))
                                or callable(getattr(opt, "step", None))):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or None), got {type(opt).__name__}")
    # through wrappers that are no torch optimizer themselves (accelerate's, a DeepSpeed engine's
    # ZeRO optimizer) to the first frozen-aware optimizer, else to the innermost torch optimizer
    found, seen = opt, 0
    while opt is not None and not isinstance(opt, FreezableOptimizer) and seen < 4:
        opt, seen = getattr(opt, "optimizer", None), seen + 1
        if isinstance(opt, (torch.optim.Optimizer, FreezableOptimizer)):
            found = opt
    return found


def check_engine(opt: Any) -> None:
    """Refuse a DeepSpeed optimizer GradES cannot drive (DeepSpeed is imported only when one is present)."""
    o = opt
    for _ in range(5):
        if o is None:
            return
        if type(o).__module__.startswith("deepspeed."):
            from ..integrations.deepspeed import check_engine_optimizer
            check_engine_optimizer(opt)
            return
        o = getattr(o, "optimizer", None)


class OptimizerLink:
    """GradES's link to a :class:`FreezableOptimizer`: the rows of each component's parameters,
    the statistics table (its ``last_grad_stats``) and the freeze writes.

    Args:
        optimizer: the optimizer.
        components: the policy's components.
        device: where the policy's state lives.
        require_all: every tracked parameter must be one of the optimizer's (``ValueError``
            otherwise); true when the statistics come from the optimizer.
    """

    def __init__(self, optimizer: FreezableOptimizer, components: Sequence[Component], device: torch.device,
                 require_all: bool = True):
        self.optimizer, self.components, self.device, self.require_all = optimizer, components, device, require_all
        self.host_mask = np.zeros(0, dtype=bool)
        self.generation = 0  # counts row maps: a rule built over an older one must be rebuilt
        self._map()
        self.calls: Optional[int] = None  # the optimizer's step_calls at the last step counted

    #: a source that could find no gradient at all says so (the optimizer's rows always exist)
    all_missing = False

    def _map(self) -> None:
        opt = self.optimizer
        self.num_rows = n = opt.num_params
        self.rows = [np.asarray(self._rows_of(c), dtype=np.int64) for c in self.components]
        self.idx = padded_index([r.tolist() for r in self.rows], n).to(self.device)
        comp_of = torch.full((n + 1,), len(self.components), dtype=torch.long)
        for ci, r in enumerate(self.rows):
            comp_of[torch.from_numpy(r)] = ci
        self._comp_of_row = comp_of[:n].to(self.device)  # optimizer row -> component (C: none)
        mask = np.zeros(n, dtype=bool)
        mask[:len(self.host_mask)] = self.host_mask[:n]
        self.host_mask = mask

    def _rows_of(self, c: Component, strict: Optional[bool] = None) -> list[int]:
        strict = self.require_all if strict is None else strict
        out = []
        for p in c.params:
            try:
                out.append(int(self.optimizer.param_index(p)))
            except (KeyError, ValueError) as e:
                if strict:
                    raise ValueError(f"a parameter of component {c.name!r} is not managed by the optimizer; "
                                     "pass every tracked parameter to the optimizer") from e
        return out

    def new_step(self) -> Optional[int]:
        """The optimizer's step count when it has stepped since the last counted step (the
        owner sets :attr:`calls` to it once counted), else ``None``. Follows parameter groups
        appended with ``add_param_group`` (``ValueError`` for any other change)."""
        opt = self.optimizer
        if len(opt.param_list) != self.num_rows:
            self._follow_change()
        calls = opt.step_calls
        return None if calls == self.calls else calls

    def _follow_change(self) -> None:
        n_old, n = self.num_rows, self.optimizer.num_params
        moved = []
        for c, r in zip(self.components, self.rows):
            now = np.asarray(self._rows_of(c, strict=False), dtype=np.int64)
            if now.shape != r.shape or (now != r).any():
                moved.append(c.name)
        if n < n_old or moved:
            raise ValueError(f"the optimizer's parameter list changed after GradES was built ({n_old} -> {n} "
                             "parameters" + (f"; the parameters of {sorted(set(moved))[:5]} moved or left it"
                                             if moved else "") +
                             "); GradES only follows parameter groups added with add_param_group: build GradES "
                             "again after changing the optimizer's parameters")
        self._map()
        self.generation += 1

    def gather(self, frozen: torch.Tensor) -> Gathered:
        """The optimizer's statistics of its last step: rows ``[P, 3]``, which rows took part and
        whether it skipped the step."""
        opt = self.optimizer
        rows = opt.last_grad_stats
        if rows is None or rows.shape[0] != self.num_rows:
            raise RuntimeError("the optimizer has no statistics for its parameters yet; call gs.step() "
                               "after optimizer.step()")
        return rows, opt.last_participation, None, opt.last_step_skipped

    def freeze_(self, components: torch.Tensor) -> None:
        """OR the components ``components`` (device bool ``[C]``) into the optimizer's device mask."""
        ext = torch.cat([components, components.new_zeros(1)])
        self.optimizer.freeze_mask_(ext.index_select(0, self._comp_of_row))

    def sync(self, new: Sequence[int]) -> None:
        """Tell the optimizer on the host that components ``new`` froze."""
        for i in new:
            self.host_mask[self.rows[i]] = True
        self.optimizer.sync_frozen_state(self.host_mask)

    def stuck(self, host_frozen: np.ndarray) -> list[str]:
        """Components not in ``host_frozen`` whose rows the optimizer's mask still freezes."""
        opt_frozen = self.optimizer.frozen.detach().to("cpu").numpy()
        return [c.name for c, r, f in zip(self.components, self.rows, host_frozen)
                if not f and len(r) and opt_frozen[r].any()]

    def snapshot(self) -> tuple:
        return self.host_mask.copy(), self.optimizer.frozen.clone()

    def restore(self, snap: tuple) -> None:
        self.host_mask = snap[0]
        self.optimizer.frozen.copy_(snap[1])


__all__ = ["OptimizerLink", "unwrap_optimizer"]
