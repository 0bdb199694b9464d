"""``FrozenAwareAdamW``: a drop-in ``torch.optim.AdamW`` that can freeze parameters without a host sync.

The update itself is :func:`grades.masked_adamw_`'s backend call: one fused call per parameter
group over every parameter that has a gradient, which also returns the per-parameter gradient
statistics (sum of squares, sum of absolute values, non-finite count) of the gradients it applied.
Freezing is a device-side bool mask, so a policy can decide to freeze on the device and the
optimizer honours the decision at the next step without the host ever waiting for the device.

Rows: every per-parameter tensor (``frozen``, ``last_grad_stats``, ...) has one row per entry of
the param groups' ``"params"`` lists, in order (:attr:`param_list`). They follow the groups: a
parameter appended to a group's list or a group added gets a row at the next step.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from .. import backends, dtensor
from .._validate import upload
from ..contract import FreezableOptimizer
from . import checkpoint, nonfinite, update
from .gather import Work, gather_group
from .hparams import check_hparams, check_options
from .nonfinite import POLICIES, NonFiniteGradientError
from .rows import Rows

__all__ = ["FrozenAwareAdamW", "NonFiniteGradientError"]

_CACHES = ("_plans", "_part_cache", "_step_views", "_index", "_shards")  # _shards: holds a process group


class FrozenAwareAdamW(Rows, Optimizer, FreezableOptimizer):
    r"""AdamW with a device-side frozen mask, fused per-parameter gradient statistics and no host sync.

    Same arguments, defaults, validation, ``state`` and ``state_dict`` layout as
    ``torch.optim.AdamW``, and for parameters that are not frozen the same update (decoupled
    weight decay, bias correction with a per-parameter step count, ``maximize``, ``amsgrad``).
    ``opt.state`` is read afresh at every step, so edits to it count as in torch. Moments are
    float32 for float32/bfloat16/float16 parameters, float64 for float64 ones; complex parameters
    are updated through their real view (as torch). Any layout works (``channels_last`` included).

    Args:
        params: iterable of parameters, named parameters, or param-group dicts (as torch).
        lr: learning rate, a float or a 1-element tensor (default ``1e-3``).
        betas: ``(beta1, beta2)``, both floats or both 1-element tensors (default ``(0.9, 0.999)``).
        eps: added to the denominator (default ``1e-8``).
        weight_decay: decoupled weight decay coefficient (default ``1e-2``).
        amsgrad, maximize: as torch (read from each param group at every step).
        foreach, fused: ``None`` or a bool, checked like torch (both ``True`` is a RuntimeError;
            a tensor lr/betas with ``foreach=True`` a ValueError) and otherwise without effect:
            the update is always one fused call per parameter group.
        capturable, differentiable: refused (``ValueError``) at any value but ``False``.
        backend: the :mod:`grades` backend for the fused update (``"auto"`` or a backend name).
        nonfinite: what non-finite gradients do (see :mod:`grades.optim.nonfinite`):
            ``"auto"`` (default): a ``GradScaler``'s ``found_inf`` or a non-finite total norm
            handed in with :meth:`use_total_norm` skips the step; otherwise the gradients are
            applied as ``torch.optim.AdamW`` applies them (one read of each gradient).
            ``"skip"``: besides, a detection pass (a second read) skips any step with a NaN/Inf
            in a non-frozen gradient. ``"raise"``: the detection pass, then one host sync to
            raise :class:`NonFiniteGradientError` before anything changes. ``"ignore"``: only a
            ``GradScaler`` skips. Skipped steps leave params, moments and steps bitwise unchanged
            and count in :attr:`skipped_steps`; non-finite elements are always counted.
        release_frozen_state: free ``exp_avg``/``exp_avg_sq`` (and the master weight) of
            parameters once the host knows they are frozen (:meth:`freeze`,
            :meth:`sync_frozen_state`); see :attr:`released_bytes`.
        master_weights: keep a float32 master copy (state ``"master_param"``) of every
            bfloat16/float16 parameter; the update is applied to it and the parameter receives it
            rounded. After changing such parameters outside the optimizer call
            :meth:`refresh_master_weights`.

    Attributes (device tensors, read without syncing; rows in :attr:`param_list` order):
        frozen: bool ``[num_params]``; a frozen parameter is never updated again.
        last_grad_stats: float64 ``[num_params, 3]``: ``(sum g^2, sum |g|, non-finite count)`` of
            each gradient applied by the last step (unscaled; zero rows for parameters that did
            not take part; on a skipped step the first two columns of the rows that took part are
            NaN, so no threshold test passes on them).
        skipped_steps: int64 0-dim, steps skipped because of non-finite gradients.
        last_step_skipped: bool 0-dim, whether the last step was skipped.
        last_participation: bool ``[num_params]``, which parameters took part in the last step.
    """

    def __init__(self, params: ParamsT, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, backend: str = "auto", nonfinite: str = "auto",
                 release_frozen_state: bool = False, master_weights: bool = False) -> None:
        lr, betas = check_hparams(lr, betas, eps, weight_decay, foreach)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        check_options(defaults)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if nonfinite not in POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, POLICIES))}, got {nonfinite!r}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {type(master_weights).__name__}")
        self.backend, self.nonfinite, self.master_weights = backend, nonfinite, master_weights
        self.release_frozen_state = bool(release_frozen_state)
        self.released_bytes = 0
        self._step_calls = 0
        self._device: Optional[torch.device] = None
        self._init_rows()
        super().__init__(params, defaults)
        self._check_backend_name()
        # Tells torch.amp.GradScaler to hand us grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        dev = self.frozen.device
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
        self._false = torch.zeros((), dtype=torch.bool, device=dev)
        self.last_step_skipped = self._false
        self._norm_hint: Any = None

    def _check_backend_name(self) -> None:
        """A backend name that cannot run this optimizer fails at construction, not at the first step."""
        if self.backend == "auto":
            return
        b = backends.get(self.backend)
        dev = self._device or torch.device("cpu")
        if not b.supports(dev, "list"):
            raise ValueError(f"backend {self.backend!r} cannot run FrozenAwareAdamW on {dev.type} parameters "
                             f"(it handles {', '.join(b.kinds)} inputs on {', '.join(b.device_types)}; "
                             "the optimizer passes lists of tensors)")

    def use_total_norm(self, total_norm: Union[float, torch.Tensor]) -> None:
        """Give the next :meth:`step` the total norm of the gradients it is about to apply (what
        ``torch.nn.utils.clip_grad_norm_`` returned for them, a number or a 0-dim tensor on any
        device): with ``nonfinite="auto"``/``"skip"`` a norm that is not finite skips the step,
        and no detection pass runs. Applies to the next step only. The norm must cover every
        parameter with a gradient in this optimizer; one that overflows although every element is
        finite (above about 1.8e19 in float32) also skips the step."""
        if isinstance(total_norm, torch.Tensor):
            full = getattr(total_norm, "full_tensor", None)
            if callable(full):  # a DTensor: its value over every shard
                total_norm = full()
            if total_norm.numel() != 1:
                raise ValueError(f"total_norm must be a single number, got a tensor of shape {list(total_norm.shape)}")
        elif not isinstance(total_norm, numbers.Real) or isinstance(total_norm, bool):
            raise TypeError(f"total_norm must be a number or a 0-dim tensor, got {type(total_norm).__name__}")
        self._norm_hint = total_norm

    @property
    def uses_total_norm(self) -> bool:
        """Whether a norm handed to :meth:`use_total_norm` serves as the non-finite check."""
        return nonfinite.uses_total_norm(self.nonfinite)

    @property
    def reduces_stats(self) -> bool:  # type: ignore[override]
        """Whether :attr:`last_grad_stats` are already summed over the ranks that hold shards of the
        parameters (FSDP2 DTensor parameters), so a policy must not reduce them again."""
        return self._shards.active

    @property
    def nonfinite_count(self) -> torch.Tensor:
        """int64 0-dim: non-finite gradient elements seen in the last step."""
        return self.last_grad_stats[:, 2].sum(dtype=torch.int64)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch); its parameters get rows (not frozen, zero statistics)."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        if len(self.param_groups) == n_before:  # pragma: no cover - torch raised
            return
        group = self.param_groups[-1]
        try:
            group["lr"], group["betas"] = check_hparams(group["lr"], group["betas"], group["eps"],
                                                        group["weight_decay"], group.get("foreach"))
            check_options(group)
            for p in group["params"]:
                self._check_param(p)
            self._sync_rows()  # changes nothing if it raises (DTensors on different meshes)
        except Exception:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ master weights

    def _wants_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype in (torch.bfloat16, torch.float16)

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Copy every parameter that has a master weight into it (``master_weights=True``), after
        changing such parameters outside the optimizer."""
        for p in self.param_list:
            st = self.state.get(p)
            if st and "master_param" in st:
                st["master_param"].copy_(p.detach())

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One AdamW step over every parameter that has a gradient and is not frozen: one fused
        call per group (plus, with ``nonfinite="skip"``/``"raise"``, a detection pass), no
        host-device synchronisation (``"raise"`` waits once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_rows()
        hint, self._norm_hint = self._norm_hint, None
        if not self.param_list:
            return loss
        work = self._gather()
        grad_scale, found_inf = self._scaler_inputs()
        hps = update.check_hparams_of(self, work, grad_scale)
        all_full = self._begin_statistics(work)
        frozens = self._frozen_of(work)
        found, detected = nonfinite.decide(self, work, frozens, found_inf, hint)
        update.apply(self, work, frozens, hps, found, detected)
        update.record_skip(self, found, all_full)
        self._step_calls += 1
        return loss

    def _gather(self) -> list[Work]:
        work = [gather_group(self, gi, g) for gi, g in enumerate(self.param_groups)]
        return [w for w in work if w is not None]

    def _frozen_of(self, work: list[Work]) -> list[torch.Tensor]:
        """Each group's frozen entries for its participants (a view when all take part)."""
        return [self.frozen[slice(*self._ranges[w.gi])] if w.plan.full
                else self.frozen.index_select(0, w.plan.idx_global) for w in work]

    def _scaler_inputs(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(grad_scale, found_inf)`` a ``torch.amp.GradScaler`` set on this optimizer, if any."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is None:
            return None, None
        if grad_scale is not None:
            grad_scale = grad_scale.to(device=self.frozen.device, dtype=torch.float32, non_blocking=True).reshape(())
        return grad_scale, found_inf

    def _begin_statistics(self, work: list[Work]) -> bool:
        """Zero the rows that will not be written and set :attr:`last_participation`; returns
        whether every parameter takes part (the statistics are then written in place)."""
        all_full = len(work) == len(self.param_groups) and all(w.plan.full for w in work)
        if not all_full:
            self.last_grad_stats.zero_()
        self.last_participation = self._all_true if all_full else self._participation(work)
        return all_full

    def _rows_of(self, w: Work) -> torch.Tensor:
        """Where a group's statistics are written: its rows, or scratch rows for a subset."""
        return self.last_grad_stats[slice(*self._ranges[w.gi])] if w.plan.full else w.plan.scratch

    def _participation(self, work: list[Work]) -> torch.Tensor:
        key = tuple((w.gi, w.plan.local) for w in work)
        part = self._part_cache.get(key)
        if part is None:
            host = torch.zeros(self.num_params, dtype=torch.bool)
            for w in work:
                s = self._ranges[w.gi][0]
                host[[s + i for i in w.plan.local]] = True
            part = self._part_cache[key] = upload(host, self.frozen.device)
        return part

    # ------------------------------------------------------------------ state dict, copies

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's state dict plus ``"grades"``: ``frozen``, ``last_grad_stats``,
        ``skipped_steps`` and ``released`` (rows whose moments were freed; such a parameter has
        no entry, as one that never had a gradient, so ``torch.optim.AdamW`` loads the dict)."""
        self._sync_rows()
        return checkpoint.save(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.AdamW`` (any variant).

        Everything is checked before anything changes: a state dict that does not fit (wrong
        sizes, negative step counts or second moments, a non-bool frozen mask, a negative
        ``skipped_steps``, ...) raises ``ValueError``/``TypeError`` naming it and leaves the
        optimizer as it was. Without a ``"grades"`` entry nothing is frozen."""
        checkpoint.load(self, state_dict)

    def _load_torch_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but caches and hooks (as torch leaves hooks out), for deepcopy and pickle."""
        return {k: v for k, v in self.__dict__.items() if k not in _CACHES and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "param_list" in state:  # a whole optimizer (deepcopy, pickle): caches rebuilt
            self._shards = dtensor.ShardGroup(self.param_list)
            self._clear_plans()

