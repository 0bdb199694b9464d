"""Rows: which parameter is which row of the per-parameter device tensors (``frozen``,
``last_grad_stats``, ...), kept in step with ``param_groups``, and freezing by row.

Rows are the entries of the param groups' ``"params"`` lists, in order (:attr:`param_list`). They
follow the groups: a parameter appended to a group's list or a group added gets a row at the
next step (or the next call that needs the rows); rows of parameters still there keep their
values. The host keeps its own copy of which rows are frozen (``_host_frozen``), learned without
waiting for the device, so host-known frozen parameters leave the fused calls' lists.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import numpy as np
import torch

from .. import dtensor
from .._validate import STATS_DTYPE, is_wrapper_subclass, upload

__all__ = ["Rows"]


class Rows:
    """Row bookkeeping and freezing of :class:`~grades.FrozenAwareAdamW` (a mixin: it uses the
    optimizer's ``param_groups`` and ``state``)."""

    param_groups: list[dict]
    state: Any
    release_frozen_state: bool
    released_bytes: int
    _device: Optional[torch.device]

    def _init_rows(self) -> None:
        self.param_list: list[torch.Tensor] = []
        self._ranges: list[tuple[int, int]] = []
        self._group_steps: list[torch.Tensor] = []
        self._host_frozen = np.zeros(0, dtype=bool)
        self._released: set[int] = set()
        self._has_duplicates = False
        self.frozen = torch.zeros(0, dtype=torch.bool)
        self.last_grad_stats = torch.zeros(0, 3, dtype=STATS_DTYPE)
        self.last_participation = torch.zeros(0, dtype=torch.bool)
        self._shards = dtensor.ShardGroup([])  # FSDP2: the group the per-parameter statistics are summed over
        self._clear_plans()

    def _check_param(self, p: torch.Tensor) -> None:
        """What a parameter must be to join (duplicates within a group warn in torch's add_param_group).
        A DTensor (FSDP2) must have a layout :mod:`grades.dtensor` accepts; its local shard is checked."""
        if dtensor.is_dtensor(p):
            p = dtensor.check_param(p)
        if is_wrapper_subclass(p):
            raise TypeError(f"FrozenAwareAdamW supports plain tensor parameters, got a {type(p).__name__} "
                            "(a tensor subclass without plain storage)")
        if p.is_neg():
            raise ValueError("a parameter has its negative bit set (a lazily negated view); the fused update "
                             "would write it without the negation: pass a parameter with .resolve_neg()")
        if p.is_inference():
            raise ValueError("a parameter was made under torch.inference_mode(); it cannot be updated in "
                             "place outside it")
        if p.layout != torch.strided:
            raise TypeError(f"FrozenAwareAdamW supports dense parameters only, got layout {p.layout}")
        if not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"FrozenAwareAdamW can only optimize floating-point or complex parameters, got {p.dtype}")
        if p.device.type == "meta":
            return  # checked again at the step (a clear error there if still a placeholder)
        dev = self._device or (self.param_list[0].device if self.param_list else p.device)
        if p.device != dev:
            raise ValueError(f"all parameters must be on one device: got {p.device} and {dev}")
        self._device = dev

    def _sync_rows(self) -> None:
        """Make the rows follow ``param_groups`` (a parameter appended to a group, a group added
        or removed): rows of parameters still there keep their values, new ones start afresh."""
        flat = [p for g in self.param_groups for p in g["params"]]
        sizes = [len(g["params"]) for g in self.param_groups]
        if [e - s for s, e in self._ranges] == sizes and all(a is b for a, b in zip(flat, self.param_list)):
            return
        old = {id(p): i for i, p in enumerate(self.param_list)}
        for p in flat:
            if id(p) not in old:
                self._check_param(p)
        shards = dtensor.ShardGroup(flat)
        dev = self._device or torch.device("cpu")
        keep = [(i, old[id(p)]) for i, p in enumerate(flat) if id(p) in old]
        new_i = upload(torch.tensor([i for i, _ in keep], dtype=torch.long), dev)
        old_i = upload(torch.tensor([j for _, j in keep], dtype=torch.long), dev)
        frozen = torch.zeros(len(flat), dtype=torch.bool, device=dev)
        frozen[new_i] = self.frozen.to(dev)[old_i]
        stats = torch.zeros(len(flat), 3, dtype=STATS_DTYPE, device=dev)
        stats[new_i] = self.last_grad_stats.to(dev)[old_i]
        host = np.zeros(len(flat), dtype=bool)
        host[[i for i, _ in keep]] = self._host_frozen[[j for _, j in keep]]
        released = {i for i, j in keep if j in self._released}
        self.param_list, self._shards = flat, shards
        self._ranges = [(sum(sizes[:g]), sum(sizes[:g + 1])) for g in range(len(sizes))]
        self._has_duplicates = any(len({id(p) for p in g["params"]}) != len(g["params"]) for g in self.param_groups)
        self.last_grad_stats = stats
        self.last_participation = torch.zeros(len(flat), dtype=torch.bool, device=dev)
        self._reset_rows(frozen, host, released)

    def _reset_rows(self, frozen: torch.Tensor, host_frozen: np.ndarray, released: set[int]) -> None:
        """New frozen rows; step counts are taken afresh from the state at the next step."""
        self.frozen, self._host_frozen, self._released = frozen, host_frozen, released
        dev = frozen.device
        self._group_steps = [torch.zeros(e - s, dtype=torch.float32, device=dev) for s, e in self._ranges]
        self._clear_plans()

    def _clear_plans(self) -> None:
        self._plans: dict = {}
        self._part_cache: dict = {}
        self._step_views = [[None] * (e - s) for s, e in getattr(self, "_ranges", ())]
        self._index = {id(p): i for i, p in enumerate(getattr(self, "param_list", ()))}
        self._all_true = torch.ones(len(self._index), dtype=torch.bool, device=self.frozen.device)

    def _adopt_step(self, gi: int, local: int, st: dict, value: Any) -> None:
        """Make ``st["step"]`` a view of the group's step counts holding ``value`` (no host sync)."""
        steps = self._group_steps[gi]
        if isinstance(value, torch.Tensor):
            steps[local].copy_(value.detach().reshape(()))
        else:
            steps[local].fill_(float(value))
        view = steps[local]
        st["step"] = self._step_views[gi][local] = view

    def param_index(self, p: torch.Tensor) -> int:
        """Row of parameter ``p`` in :attr:`param_list`; ``ValueError`` if not managed here."""
        self._sync_rows()
        try:
            return self._index[id(p)]
        except KeyError:
            raise ValueError("parameter is not managed by this optimizer") from None

    @property
    def num_params(self) -> int:
        """Number of rows (entries of the param groups' lists)."""
        return len(self.param_list)

    @property
    def step_calls(self) -> int:
        """Number of completed :meth:`step` calls (a host int)."""
        return self._step_calls

    def _names(self, idx: list[int]) -> str:
        names = []
        for i in idx:
            for gi, (s, e) in enumerate(self._ranges):
                pn = self.param_groups[gi].get("param_names")
                if s <= i < e and pn:
                    names.append(pn[i - s])
        return f"; names {names}" if names else ""

    def freeze(self, params: Union[torch.Tensor, Iterable[torch.Tensor]]) -> None:
        """Freeze parameters the host knows about now (their moments are freed at once with
        ``release_frozen_state=True``). No device-to-host copy."""
        if isinstance(params, torch.Tensor):
            params = [params]
        idx = sorted({self.param_index(p) for p in params})
        if idx:
            self.frozen.index_fill_(0, upload(torch.tensor(idx, dtype=torch.long), self.frozen.device), True)
            self._learn_frozen(np.asarray(idx, dtype=np.int64))

    def freeze_mask_(self, mask: torch.Tensor) -> None:
        """OR a device bool mask ``[num_params]`` into :attr:`frozen` (in place, no host sync).
        The host learns which froze only through :meth:`sync_frozen_state`."""
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
        self._sync_rows()
        if tuple(mask.shape) != (self.num_params,):
            raise ValueError(f"mask must have shape [{self.num_params}] (one entry per parameter), "
                             f"got {list(mask.shape)}")
        if mask.device != self.frozen.device:
            raise ValueError(f"mask is on {mask.device}, expected {self.frozen.device}")
        self.frozen.logical_or_(mask)

    def sync_frozen_state(self, mask: Optional[Union[torch.Tensor, np.ndarray]] = None) -> int:
        """Tell the host which parameters are frozen (``mask``: a host copy of :attr:`frozen`, e.g.
        a completed non-blocking copy; ``None`` copies it now, waiting for the device). Returns how
        many it learned about now. Host-known frozen parameters leave the fused calls' lists and,
        with ``release_frozen_state=True``, their moments are freed."""
        self._sync_rows()
        if mask is None:
            host = self.frozen.detach().to("cpu").numpy().astype(bool)
        else:
            if isinstance(mask, torch.Tensor):
                if mask.dtype != torch.bool:
                    raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
                host = mask.detach().to("cpu").numpy().astype(bool)
            else:
                host = np.asarray(mask, dtype=bool)
            if host.shape != (self.num_params,):
                raise ValueError(f"mask must have shape [{self.num_params}], got {list(host.shape)}")
        new = np.nonzero(host & ~self._host_frozen)[0]
        if len(new) and mask is not None:
            self.frozen.index_fill_(0, upload(torch.from_numpy(new), self.frozen.device), True)
        self._learn_frozen(new)
        return int(len(new))

    def _learn_frozen(self, idx: np.ndarray) -> None:
        if not len(idx):
            return
        self._host_frozen[idx] = True
        self._plans.clear()
        self._part_cache.clear()
        if self.release_frozen_state:
            for i in idx.tolist():
                self._release(int(i))

    def _release(self, i: int) -> None:
        st = self.state.get(self.param_list[i])
        if i in self._released or not st:
            return
        for k in ("exp_avg", "exp_avg_sq", "master_param", "max_exp_avg_sq"):
            t = st.pop(k, None)
            if t is not None:
                self.released_bytes += t.numel() * t.element_size()
        self._released.add(i)
