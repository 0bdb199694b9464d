"""``FrozenAwareAdamW``: a drop-in ``torch.optim.AdamW`` that can freeze parameters without a host sync.

The update itself is :func:`grades.masked_adamw_`: one fused call per parameter group over every
parameter that has a gradient, which also returns the per-parameter gradient statistics
(sum of squares, sum of absolute values, non-finite count) of the gradients it applied. Freezing
is a device-side bool mask, so a policy can decide to freeze on the device and the optimizer
honours the decision at the next step without the host ever waiting for the device.

Layout of the state is the one ``torch.optim.AdamW(fused=True)`` uses (per parameter: a 0-dim
float32 ``step`` on the parameter's device, ``exp_avg`` and ``exp_avg_sq``), so state dicts move
freely between this optimizer and ``torch.optim.AdamW`` in both directions. Moments are always
float32, also for bfloat16/float16 parameters. Extras (frozen mask, last statistics, skipped step
counter) travel under the ``"grades"`` key of the state dict, which torch ignores.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
from torch.optim.optimizer import Optimizer, ParamsT

from . import backends, dtensor
from ._validate import STATS_DTYPE, SUPPORTED_DTYPES, check_no_overlap, is_wrapper_subclass, mark_written, upload
from .backends.base import AdamWArgs
from .contract import FreezableOptimizer
from .ops import _adamw_args

__all__ = ["FrozenAwareAdamW", "NonFiniteGradientError"]

_NONFINITE_POLICIES = ("skip", "raise", "ignore")
# Options torch.optim.AdamW accepts that this optimizer only accepts at their default value.
_FIXED_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
_WHY = {"amsgrad": "the AMSGrad variant is not implemented",
        "maximize": "negate the loss instead",
        "capturable": "step() never synchronises with the host, but CUDA-graph capture is not supported",
        "differentiable": "the fused update is not differentiable"}
# torch.optim.AdamW's implementation switches: accepted (None or a bool) and without effect here,
# since the update is always one fused call per parameter group.
_IMPL_SWITCHES = ("foreach", "fused")


class NonFiniteGradientError(RuntimeError):
    """Raised by :meth:`FrozenAwareAdamW.step` with ``nonfinite="raise"`` when a gradient holds NaN/Inf."""


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> tuple[Any, tuple[float, float]]:
    """torch.optim.AdamW's checks and messages; returns ``(lr, (beta1, beta2))`` normalised."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be a real floating-point tensor, got {lr.dtype}")
        lr = lr.detach().reshape(())
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a float or a 1-element tensor, got {type(lr).__name__}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    try:
        b0, b1 = betas
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
    out = []
    for i, b in enumerate((b0, b1)):
        if isinstance(b, torch.Tensor):
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
            b = float(b.detach().reshape(()).item())  # host value, read once at construction
        elif isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"betas[{i}] must be a float, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        out.append(float(b))
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real):
        raise TypeError(f"weight_decay must be a float, got {type(weight_decay).__name__}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    return lr, (out[0], out[1])


def _check_options(group: dict) -> None:
    for name in _IMPL_SWITCHES:
        v = group.get(name)
        if v is not None and not isinstance(v, bool):
            raise TypeError(f"{name} must be None or a bool, got {v!r}")
    for name, default in _FIXED_OPTIONS.items():
        v = group.get(name, default)
        if not isinstance(v, (bool, int)) or bool(v) != default:
            raise ValueError(f"FrozenAwareAdamW does not support {name}={v!r} ({_WHY[name]}); "
                             f"leave {name} at its default ({default!r}) or use torch.optim.AdamW")
    if group.get("decoupled_weight_decay", True) is not True:
        raise ValueError("FrozenAwareAdamW always uses decoupled weight decay (AdamW); "
                         "decoupled_weight_decay must be True")


class _Plan:
    """What one group's update looks like for one set of participating parameters (cached)."""

    __slots__ = ("local", "full", "params", "exp_avgs", "exp_avg_sqs", "masters", "idx_local", "idx_global",
                 "scratch", "discard", "backend", "hp", "numels")

    def __init__(self, local: tuple, full: bool, params, exp_avgs, exp_avg_sqs, masters, idx_local, idx_global,
                 scratch, backend):
        self.local, self.full, self.backend = local, full, backend
        self.params, self.exp_avgs, self.exp_avg_sqs = params, exp_avgs, exp_avg_sqs
        self.numels = tuple(m.numel() for m in exp_avgs)  # sizes the moments were made for
        # float32 master weights (None per parameter that has none), or None when no parameter has one
        self.masters = masters if masters is not None and any(m is not None for m in masters) else None
        self.idx_local, self.idx_global, self.scratch = idx_local, idx_global, scratch
        # the fused update's own statistics when a detection pass has already produced them
        self.discard = torch.empty_like(scratch)
        # (lr, beta1, beta2, eps, weight_decay) and their checked form, for the usual case of
        # number hyperparameters that rarely change
        self.hp: Optional[tuple] = None


class FrozenAwareAdamW(Optimizer, FreezableOptimizer):
    r"""AdamW with a device-side frozen mask, fused per-parameter gradient statistics and no host sync.

    Same arguments, defaults, validation and ``state_dict`` layout as ``torch.optim.AdamW``, and for
    parameters that are not frozen the same update (decoupled weight decay, bias correction with a
    per-parameter step count, computed in float32).

    Args:
        params: iterable of parameters, named parameters, or param-group dicts (as torch).
        lr: learning rate, a float or a 1-element tensor (default ``1e-3``).
        betas: ``(beta1, beta2)`` (default ``(0.9, 0.999)``).
        eps: added to the denominator (default ``1e-8``).
        weight_decay: decoupled weight decay coefficient (default ``1e-2``).
        foreach, fused: accepted (``None`` or a bool) for signature compatibility and without
            effect: the update is always one fused call per parameter group.
        amsgrad, maximize, capturable, differentiable: accepted at torch's default values only;
            any other value raises ``ValueError`` naming the option.
        backend: the :mod:`grades` backend for the fused update (``"auto"`` or a backend name).
        nonfinite: what to do with NaN/Inf gradients when no ``GradScaler`` drives the step:

            * ``"skip"`` (default): one statistics pass before the update detects them on the
              device; if any non-frozen gradient holds one, the whole step is skipped (params,
              moments and steps bitwise unchanged) and :attr:`skipped_steps` grows by one.
            * ``"raise"``: the same detection, then one host sync to raise
              :class:`NonFiniteGradientError` before anything changes (a debugging mode).
            * ``"ignore"``: no detection pass (one pass over memory instead of two); non-finite
              values are applied as ``torch.optim.AdamW`` would apply them, and still counted.

            Under a ``torch.amp.GradScaler`` the scaler's protocol decides instead (its
            ``found_inf`` skips the step, in the same single pass as the update). Where the total
            gradient norm is computed anyway (gradient clipping; the transformers ``Trainer``
            always computes it), :meth:`use_total_norm` hands it to the next step as its check
            and ``"skip"`` needs no detection pass either.
        release_frozen_state: free ``exp_avg``/``exp_avg_sq`` (and the master weight) of
            parameters once the host knows they are frozen (after :meth:`freeze` or
            :meth:`sync_frozen_state`); see :attr:`released_bytes`. A state dict then lacks the
            moments of those parameters.
        master_weights: keep a float32 master copy of every bfloat16/float16 parameter (in the
            state, key ``"master_param"``, 4 bytes per element). The update is applied to the
            master in float32 and the parameter receives it rounded, in the same fused pass on
            the native CPU backend (on CUDA: one extra multi-tensor copy), so updates smaller
            than the parameter's precision accumulate instead of being rounded away. float32
            parameters are updated in place as always. The optimizer owns the values: after
            changing such parameters outside it, call :meth:`refresh_master_weights`.

    Attributes (all device tensors, read without syncing; the order is :attr:`param_list`):
        frozen: bool ``[num_params]``; a frozen parameter is never updated again.
        last_grad_stats: float64 ``[num_params, 3]``: ``(sum g^2, sum |g|, non-finite count)`` of
            each gradient applied by the last step (unscaled). Rows of frozen parameters and of
            parameters without a gradient are zero. On a skipped step the first two columns of
            the participating rows are NaN, so no threshold test can pass on them.
        nonfinite_count: int64 0-dim, non-finite gradient elements seen in the last step.
        skipped_steps: int64 0-dim, number of steps skipped because of non-finite gradients.
        last_step_skipped: bool 0-dim, whether the last step was skipped.
        last_participation: bool ``[num_params]``, which parameters took part in the last step
            (had a gradient and were not frozen on the host); a statistics row of a parameter that
            did not take part is zero and says nothing about its gradient.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        backend: str = "auto",
        nonfinite: str = "skip",
        release_frozen_state: bool = False,
        master_weights: bool = False,
    ) -> None:
        lr, betas = _check_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused, decoupled_weight_decay=True)
        _check_options(defaults)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {', '.join(map(repr, _NONFINITE_POLICIES))}, "
                             f"got {nonfinite!r}")
        self.backend = backend
        self.nonfinite = nonfinite
        self.release_frozen_state = bool(release_frozen_state)
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be a bool, got {type(master_weights).__name__}")
        self.master_weights = master_weights
        self.released_bytes = 0
        #: number of completed step() calls (host int; GradES uses it to see a new step)
        self._step_calls = 0
        self.param_list: list[torch.Tensor] = []
        self._index: dict[int, int] = {}
        self._ranges: list[tuple[int, int]] = []
        self._group_steps: list[torch.Tensor] = []
        self._host_frozen = np.zeros(0, dtype=bool)
        self._released: set[int] = set()
        self._plans: dict[tuple, _Plan] = {}
        self._shards = dtensor.ShardGroup([])
        self._part_cache: dict[tuple, torch.Tensor] = {}
        self._device: Optional[torch.device] = None
        self.frozen = torch.zeros(0, dtype=torch.bool)
        self.last_grad_stats = torch.zeros(0, 3, dtype=STATS_DTYPE)
        super().__init__(params, defaults)
        if backend != "auto":  # a name that cannot run this optimizer fails here, not at the first step
            b = backends.get(backend)
            dev = self._device or torch.device("cpu")
            if not b.supports(dev, "list"):
                raise ValueError(f"backend {backend!r} cannot run FrozenAwareAdamW on {dev.type} parameters "
                                 f"(it handles {', '.join(b.kinds)} inputs on {', '.join(b.device_types)}; "
                                 "the optimizer passes lists of tensors)")
        # Tells torch.amp.GradScaler to hand us grad_scale/found_inf instead of unscaling itself.
        self._step_supports_amp_scaling = True
        dev = self._device or torch.device("cpu")
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
        self._false = torch.zeros((), dtype=torch.bool, device=dev)
        self.last_step_skipped = self._false
        self._norm_hint: Any = None

    def use_total_norm(self, total_norm: Union[float, torch.Tensor]) -> None:
        """Give the next :meth:`step` the total norm of the gradients it is about to apply (what
        ``torch.nn.utils.clip_grad_norm_`` returned for these parameters, a number or a 0-dim
        tensor on any device) as its non-finite check: with ``nonfinite="skip"`` a norm that is
        not finite skips the step, and the separate detection pass is left out, so the step
        reads each gradient once. Applies to the next step only (``"raise"`` and ``"ignore"``
        do not use it; a ``GradScaler``'s ``found_inf`` takes precedence).

        The norm must cover every parameter with a gradient in this optimizer. A norm that
        overflows although every element is finite (above about 1.8e19 in float32) also skips
        the step, where the detection pass would not.
        """
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
    def nonfinite_count(self) -> torch.Tensor:
        """int64 0-dim on the params' device: non-finite gradient elements seen in the last step
        (computed from :attr:`last_grad_stats` when read)."""
        return self.last_grad_stats[:, 2].sum(dtype=torch.int64)

    # ------------------------------------------------------------------ parameter bookkeeping

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch), extending :attr:`param_list`, :attr:`frozen` and
        :attr:`last_grad_stats` with rows for its parameters (not frozen, zero statistics)."""
        n_before = len(self.param_groups)
        super().add_param_group(param_group)
        if len(self.param_groups) == n_before:  # pragma: no cover - torch raised
            return
        group = self.param_groups[-1]
        try:
            group["lr"], group["betas"] = _check_hparams(group["lr"], group["betas"], group["eps"],
                                                         group["weight_decay"])
            _check_options(group)
            self._check_params(group["params"])
            shards = dtensor.ShardGroup(self.param_list + list(group["params"]))
        except Exception:
            self.param_groups.pop()
            raise
        start = len(self.param_list)
        for i, p in enumerate(group["params"]):
            self._index[id(p)] = start + i
        self.param_list.extend(group["params"])
        self._shards = shards  # FSDP2: the group the per-parameter statistics are summed over
        end = len(self.param_list)
        self._ranges.append((start, end))
        if self._device is None and self.param_list:
            self._device = self.param_list[0].device
        dev = self._device or torch.device("cpu")
        n = end - start
        self._group_steps.append(torch.zeros(n, dtype=torch.float32, device=dev))
        self.frozen = torch.cat([self.frozen.to(dev), torch.zeros(n, dtype=torch.bool, device=dev)])
        self.last_grad_stats = torch.cat([self.last_grad_stats.to(dev),
                                          torch.zeros(n, 3, dtype=STATS_DTYPE, device=dev)])
        self._host_frozen = np.concatenate([self._host_frozen, np.zeros(n, dtype=bool)])
        self._clear_plans()
        self.last_participation = torch.zeros(end, dtype=torch.bool, device=dev)  # no step yet

    def _check_params(self, params: list, joined: bool = False) -> None:
        """What a parameter must be to join (``joined``: to stay, after its ``.data`` changed)."""
        if not joined and len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter group contains the same parameter more than once; the fused "
                             "update would apply it twice (pass each parameter once)")
        for p0 in params:
            # FSDP2 (DTensor) parameters: layout checked, the kernels run on the local shard
            p = dtensor.check_param(p0) if dtensor.is_dtensor(p0) else p0
            if is_wrapper_subclass(p):
                raise TypeError(f"FrozenAwareAdamW supports plain tensor parameters, got a {type(p).__name__} "
                                "(a tensor subclass without plain storage)")
            if p.is_neg():
                raise ValueError("a parameter has its negative bit set (a lazily negated view); the fused update "
                                 "would write it without the negation: pass a parameter with .resolve_neg()")
            if p.is_inference():
                raise ValueError("a parameter was made under torch.inference_mode(); it cannot be updated in "
                                 "place outside it")
            if p.is_complex():
                raise TypeError(f"FrozenAwareAdamW supports real parameters only, got a {p.dtype} "
                                "parameter (view complex parameters with torch.view_as_real)")
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"FrozenAwareAdamW supports float32, bfloat16 and float16 parameters, "
                                f"got {p.dtype}")
            if p.layout != torch.strided:
                raise TypeError(f"FrozenAwareAdamW supports dense parameters only, got layout {p.layout}")
            if not p.is_contiguous():
                raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous; the fused update "
                                 "needs contiguous parameters")
            dev = self._device or (self.param_list[0].device if self.param_list else p.device)
            if p.device != dev:
                raise ValueError(f"all parameters must be on one device: got {p.device} and {dev}"
                                 + (" (the optimizer's state lives there: create the optimizer after moving "
                                    "the model)" if joined else ""))
            if joined:
                continue
            if id(p0) in self._index:
                raise ValueError("some parameters appear in more than one parameter group")

    def param_index(self, p: torch.Tensor) -> int:
        """Position of parameter ``p`` in :attr:`param_list` (the row of :attr:`frozen` and
        :attr:`last_grad_stats` that belongs to it)."""
        try:
            return self._index[id(p)]
        except KeyError:
            raise ValueError("parameter is not managed by this optimizer") from None

    @property
    def num_params(self) -> int:
        """Number of parameters over all groups (the length of :attr:`frozen`)."""
        return len(self.param_list)

    @property
    def reduces_stats(self) -> bool:
        """Whether :attr:`last_grad_stats` are already summed over the ranks that hold shards of the
        parameters (FSDP2), so a policy must not reduce them again."""
        return self._shards.active

    @property
    def step_calls(self) -> int:
        """Number of completed :meth:`step` calls (a host int)."""
        return self._step_calls

    # ------------------------------------------------------------------ freezing

    def freeze(self, params: Union[torch.Tensor, Iterable[torch.Tensor]]) -> None:
        """Freeze parameters the host already knows about: set their :attr:`frozen` entries.

        The host learns the decision at once, so with ``release_frozen_state=True`` their moments
        are freed right away. No device-to-host copy.
        """
        if isinstance(params, torch.Tensor):
            params = [params]
        idx = sorted({self.param_index(p) for p in params})
        if not idx:
            return
        self.frozen.index_fill_(0, upload(torch.tensor(idx, dtype=torch.long), self.frozen.device), True)
        self._learn_frozen(np.asarray(idx, dtype=np.int64))

    def freeze_mask_(self, mask: torch.Tensor) -> None:
        """OR a device bool mask ``[num_params]`` into :attr:`frozen` (in place, no host sync).

        The host does not learn which parameters froze; call :meth:`sync_frozen_state` once a
        (non-blocking) host copy of the mask is available, to drop them from the host-side lists
        and, with ``release_frozen_state=True``, free their moments.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
        if tuple(mask.shape) != (self.num_params,):
            raise ValueError(f"mask must have shape [{self.num_params}] (one entry per parameter), "
                             f"got {list(mask.shape)}")
        if mask.device != self.frozen.device:
            raise ValueError(f"mask is on {mask.device}, expected {self.frozen.device}")
        self.frozen.logical_or_(mask)

    def sync_frozen_state(self, mask: Optional[Union[torch.Tensor, np.ndarray]] = None) -> int:
        """Tell the host which parameters are frozen; returns how many it learned about now.

        Args:
            mask: a host copy of :attr:`frozen` (bool ``[num_params]``), typically the result of a
                non-blocking copy that has completed. ``None`` copies :attr:`frozen` now, which
                waits for the device. Entries set here are also set in :attr:`frozen`.

        Host-known frozen parameters leave the lists handed to the fused update (so they cost no
        launch work at all) and, with ``release_frozen_state=True``, their moments are freed.
        """
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
        self._clear_plans()
        if self.release_frozen_state:
            for i in idx.tolist():
                self._release(int(i))

    def _release(self, i: int) -> None:
        if i in self._released:
            return
        st = self.state.get(self.param_list[i])
        if not st:
            return
        for k in ("exp_avg", "exp_avg_sq", "master_param"):
            t = st.pop(k, None)
            if t is not None:
                self.released_bytes += t.numel() * t.element_size()
        self._released.add(i)

    # ------------------------------------------------------------------ step

    def _init_state(self, gi: int, local: int, p: torch.Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = self._group_steps[gi][local]
            # like the parameter (a DTensor's moments are DTensors with its placements, as torch keeps them)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            if self._wants_master(p):
                state["master_param"] = p.detach().to(torch.float32, copy=True)
        return state

    @staticmethod
    def _adopt_saved_masters(candidates: list) -> None:
        """Keep a checkpoint's float32 master only where it rounds to the parameter's current value
        (bitwise): otherwise the parameter was changed after the master was saved (trained on by
        another optimizer, or loaded from elsewhere) and the master, already set from the
        parameter, wins over the stale copy. One host read for all of them."""
        if not candidates:
            return
        # bit patterns (masters exist for 2-byte dtypes only), so NaN == NaN and -0.0 != 0.0
        agree = torch.stack([(dtensor.local(saved.to(p.dtype)).view(torch.int16)
                              == dtensor.local(p.detach()).view(torch.int16)).all()
                             for _, saved, p in candidates]).cpu()
        for ok, (master, saved, _) in zip(agree.tolist(), candidates):
            if ok:
                master.copy_(saved)

    def _wants_master(self, p: torch.Tensor) -> bool:
        return self.master_weights and p.dtype != torch.float32

    @torch.no_grad()
    def refresh_master_weights(self) -> None:
        """Copy every parameter that has a master weight into it (``master_weights=True``).

        Call after changing such parameters outside the optimizer (loading or merging weights,
        editing them in place); otherwise the next step would continue from the old master
        values and overwrite the change.
        """
        for p in self.param_list:
            st = self.state.get(p)
            if st and "master_param" in st:
                st["master_param"].copy_(p.detach())

    def _gather(self, gi: int, group: dict) -> tuple[Optional[_Plan], list[torch.Tensor]]:
        start, end = self._ranges[gi]
        local, grads = [], []
        host_frozen = self._host_frozen
        dev = self.frozen.device
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None or host_frozen[start + i]:
                continue
            if self._shards.has_dtensor:
                p, g = dtensor.local(p), dtensor.local(g)
            if not p.is_contiguous() or p.dtype not in SUPPORTED_DTYPES or p.device != dev:
                # its .data was replaced since it joined (checked then)
                self._check_params([group["params"][i]], joined=True)
            # the checks grades.masked_adamw_ would make of a gradient (parameters and moments
            # were checked when they joined, and the native backends check sizes again)
            if g.layout != torch.strided:
                raise TypeError("FrozenAwareAdamW does not support sparse gradients, please consider "
                                "SparseAdam instead")
            if is_wrapper_subclass(g):
                raise TypeError(f"gradient of parameter {start + i} is a {type(g).__name__}, a tensor subclass "
                                "without plain storage; FrozenAwareAdamW needs plain gradients")
            if g.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"gradient of parameter {start + i} has dtype {str(g.dtype)[6:]}; supported: "
                                "float32, bfloat16, float16")
            if g.shape != p.shape or g.device != p.device:
                raise ValueError(f"gradient of parameter {start + i} has shape {tuple(g.shape)} on {g.device}, "
                                 f"but the parameter has shape {tuple(p.shape)} on {p.device}")
            if not g.is_contiguous():
                g = g.contiguous()
            if g.is_neg():  # a lazily negated view (e.g. .conj().imag): the kernels read raw memory
                g = g.resolve_neg()
            local.append(i)
            grads.append(g)
        if not local:
            return None, grads
        key = (gi, tuple(local))
        plan = self._plans.get(key)
        if plan is None:
            params = [dtensor.local(group["params"][i]) for i in local]
            # the fused update writes every parameter once: no two may share memory
            check_no_overlap([(f"parameter {start + i}", p) for i, p in zip(local, params)])
            states = [self._init_state(gi, i, group["params"][i]) for i in local]
            full = len(local) == end - start
            idx_local = idx_global = None
            if not full:
                idx_local = upload(torch.tensor(local, dtype=torch.long), dev)
                idx_global = idx_local + start
            scratch = torch.zeros(len(local), 3, dtype=STATS_DTYPE, device=dev)
            plan = _Plan(key[1], full, params, [dtensor.local(s["exp_avg"]) for s in states],
                         [dtensor.local(s["exp_avg_sq"]) for s in states],
                         [dtensor.local(s.get("master_param")) for s in states],
                         idx_local, idx_global, scratch, backends.select(dev, "list", self.backend))
            self._plans[key] = plan
        elif self._shards.has_dtensor:  # FSDP2 may give a parameter a new local shard (lazy init, loading)
            plan.params = [dtensor.local(group["params"][i]) for i in plan.local]
        if tuple(p.numel() for p in plan.params) != plan.numels:
            j = next(j for j, (p, n) in enumerate(zip(plan.params, plan.numels)) if p.numel() != n)
            raise ValueError(f"parameter {start + plan.local[j]} has {plan.params[j].numel()} elements but its "
                             f"optimizer state was made for {plan.numels[j]}: its .data was replaced by a tensor "
                             "of another size; nothing was updated")
        return plan, grads

    def _lr_of(self, group: dict) -> Union[float, torch.Tensor]:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            dev = self.frozen.device
            if lr.device != dev or lr.dtype != torch.float32 or lr.dim() != 0:
                lr = lr.detach().reshape(()).to(device=dev, dtype=torch.float32, non_blocking=True)
        return lr

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One AdamW step over every parameter that has a gradient and is not frozen.

        No host-device synchronisation (except ``nonfinite="raise"``, which waits once for the
        non-finite count). Per group: one fused :func:`grades.masked_adamw_` call, plus with
        ``nonfinite="skip"`` one :func:`grades.grad_stats` detection pass, plus a few tiny
        kernels for the step counters and statistics rows.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.param_list:
            return loss
        hint, self._norm_hint = self._norm_hint, None
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        dev = self.frozen.device
        stats_all = self.last_grad_stats
        work = []
        for gi, group in enumerate(self.param_groups):
            plan, grads = self._gather(gi, group)
            if plan is not None:
                work.append((gi, group, plan, grads))
        if found_inf is not None and grad_scale is not None:
            grad_scale = grad_scale.to(device=dev, dtype=torch.float32, non_blocking=True).reshape(())
        # every hyperparameter of every group is checked before anything changes (the detection pass
        # included): found_inf joins below
        checked = []
        for gi, group, plan, grads in work:
            beta1, beta2 = group["betas"]
            lr = self._lr_of(group)
            if isinstance(lr, torch.Tensor) or grad_scale is not None:
                hp = _adamw_args(dev, len(plan.params), lr, beta1, beta2, group["eps"], group["weight_decay"],
                                 1.0, grad_scale, None)
            else:  # number hyperparameters that rarely change: checked once per plan
                key = (lr, beta1, beta2, group["eps"], group["weight_decay"])
                if plan.hp is None or plan.hp[0] != key:
                    plan.hp = (key, _adamw_args(dev, len(plan.params), *key, 1.0, None, None))
                hp = plan.hp[1]
            checked.append(hp)

        all_full = len(work) == len(self.param_groups) and all(w[2].full for w in work)
        if not all_full:
            stats_all.zero_()  # rows of parameters without a gradient (or host-frozen) read zero
        self.last_participation = self._all_true if all_full else self._participation(work)

        frozens = []
        for gi, _, plan, _ in work:
            s, e = self._ranges[gi]
            frozens.append(self.frozen[s:e] if plan.full else self.frozen.index_select(0, plan.idx_global))

        def rows_of(gi: int, plan: _Plan) -> torch.Tensor:
            s, e = self._ranges[gi]
            return stats_all[s:e] if plan.full else plan.scratch

        if found_inf is not None:
            # GradScaler protocol: the scaler has already checked the gradients; one pass.
            found = found_inf.to(device=dev, non_blocking=True).reshape(()).ne(0).to(torch.float32)
            if self._shards.active:  # the scaler looked at local shards only
                found = self._shards.reduce_found_(found)
            detect = False
        elif self.nonfinite == "ignore":
            found, detect = None, False
        elif hint is not None and self.nonfinite == "skip":
            # the total norm already looked at every gradient: one pass, as with a GradScaler
            detect = False
            if dev.type == "cpu" and (not isinstance(hint, torch.Tensor) or hint.device.type == "cpu"):
                found = None if math.isfinite(float(hint)) else torch.ones((), dtype=torch.float32)
            else:
                h = torch.as_tensor(hint).detach().to(device=dev, dtype=torch.float32, non_blocking=True)
                found = torch.isfinite(h.reshape(())).logical_not().to(torch.float32)
        else:
            detect, host = True, dev.type == "cpu"
            for (gi, group, plan, grads), fz in zip(work, frozens):
                rows = rows_of(gi, plan)
                plan.backend.grad_stats_list(grads, fz, rows)
                if not plan.full:
                    stats_all.index_copy_(0, plan.idx_global, rows)
            if self._shards.active:
                self._shards.reduce_stats_(stats_all)
            if host and not stats_all[:, 2].numpy().any():
                # host memory: the outcome is known at once, and a clean step (the usual case)
                # needs none of the skip machinery below (the update is the one found_inf == 0 gives)
                found = None
            elif self.nonfinite == "raise":
                count = stats_all[:, 2].sum(dtype=torch.int64)
                n = int(count.item())  # the one sync of the debugging mode
                if n:
                    bad = torch.nonzero(stats_all[:, 2]).flatten().tolist()
                    raise NonFiniteGradientError(
                        f"{n} non-finite gradient element(s) in {len(bad)} parameter(s) "
                        f"(param_list indices {bad[:5]}{' ...' if len(bad) > 5 else ''}"
                        f"{self._names(bad[:5])}); nothing was updated. "
                        "Use nonfinite='skip' to skip such steps instead.")
                found = None
            else:
                found = (stats_all[:, 2].sum(dtype=torch.int64) > 0).to(torch.float32)

        ok = None if found is None else found == 0
        for (gi, group, plan, grads), fz, hp in zip(work, frozens, checked):
            active = fz.logical_not()
            if ok is not None:
                active.logical_and_(ok)
            steps = self._group_steps[gi]
            if plan.full:
                steps.add_(active)
                step_t = steps
            else:
                steps.index_add_(0, plan.idx_local, active.to(torch.float32))
                step_t = steps.index_select(0, plan.idx_local)
            out = plan.discard if detect else rows_of(gi, plan)
            # grades.masked_adamw_ without its per-tensor argument checks, done once per plan
            hp = AdamWArgs(lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay,
                           step=step_t, grad_scale=hp.grad_scale, found_inf=found)
            try:
                # with master weights, each param is its master rounded (refresh_master_weights,
                # load_state_dict)
                plan.backend.adamw_list(plan.params, grads, plan.exp_avgs, plan.exp_avg_sqs, fz, hp, out,
                                        masters=plan.masters, masters_in_sync=True)
            except Exception:  # the backend checks before it writes: take the counts back
                if plan.full:
                    steps.sub_(active.to(steps.dtype))
                else:
                    steps.index_add_(0, plan.idx_local, active.to(torch.float32).neg_())
                raise
            # written through raw pointers: bump the version counters as in-place torch ops would
            mark_written([*plan.params, *(plan.masters or ())])
            if not detect and not plan.full:
                stats_all.index_copy_(0, plan.idx_global, out)

        if not detect and self._shards.active:
            self._shards.reduce_stats_(stats_all)
        if found is not None:
            skipped = found != 0
            self.skipped_steps.add_(skipped)
            self.last_step_skipped = skipped
            # A skipped step's statistics must not drive a freeze decision: NaN compares false
            # with any threshold. Only rows that took part (had a gradient, not frozen) get NaN.
            live = self.frozen.logical_not().logical_and_(skipped)
            if not all_full:
                live.logical_and_(self.last_participation)
            stats_all[:, :2].masked_fill_(live[:, None], math.nan)
        else:
            self.last_step_skipped = self._false
        self._step_calls += 1
        return loss

    def _participation(self, work: list) -> torch.Tensor:
        key = tuple((w[0], w[2].local) for w in work)
        part = self._part_cache.get(key)
        if part is None:
            host = torch.zeros(self.num_params, dtype=torch.bool)
            for gi, _, plan, _ in work:
                s, _e = self._ranges[gi]
                host[[s + i for i in plan.local]] = True
            part = upload(host, self.frozen.device)
            self._part_cache[key] = part
        return part

    def _clear_plans(self) -> None:
        self._plans.clear()
        self._part_cache.clear()
        self._all_true = torch.ones(self.num_params, dtype=torch.bool, device=self.frozen.device)

    def _names(self, idx: list[int]) -> str:
        names = []
        for i in idx:
            for gi, (s, e) in enumerate(self._ranges):
                if s <= i < e:
                    pn = self.param_groups[gi].get("param_names")
                    if pn:
                        names.append(pn[i - s])
        return f"; names {names}" if names else ""

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's state dict (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``),
        plus ``"grades"``: ``frozen`` (bool ``[num_params]``), ``last_grad_stats``,
        ``skipped_steps`` and ``released`` (indices whose moments were freed).

        A parameter whose state was released has no entry at all, as torch writes for a
        parameter that never had a gradient, so ``torch.optim.AdamW`` can load the dict and would
        start such a parameter afresh."""
        sd = super().state_dict()
        sd["state"] = {k: ({**v, "step": v["step"].clone()} if isinstance(v, dict) and "step" in v else v)
                       for k, v in sd["state"].items() if k not in self._released}
        sd["grades"] = {"frozen": self.frozen.clone(), "last_grad_stats": self.last_grad_stats.clone(),
                        "skipped_steps": self.skipped_steps.clone(), "released": sorted(self._released)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer or of ``torch.optim.AdamW`` (any of its variants).

        Moments are kept in float32 whatever the parameter dtype; steps are moved to the
        parameters' device. Without a ``"grades"`` entry nothing is frozen. Everything is checked
        before anything changes: a state dict that does not fit raises ``ValueError`` (or
        ``TypeError``) and leaves the optimizer as it was. (One host read of the frozen mask and
        the step counts.)
        """
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
        sd = dict(state_dict)
        extras = sd.pop("grades", None)
        sd["param_groups"] = self._check_loaded_groups(sd["param_groups"])
        saved_ids = [i for g in sd["param_groups"] for i in g["params"]]  # in param_list order
        host_frozen = self._check_loaded_state(sd, extras, saved_ids)
        saved = (self.state, self.param_groups, list(self._group_steps), self.frozen, self._host_frozen,
                 self._released, self.last_grad_stats, self.skipped_steps, self.released_bytes)
        try:
            self._load_checked(sd, extras, host_frozen, saved_ids)
        except BaseException:
            (self.state, self.param_groups, self._group_steps, self.frozen, self._host_frozen,
             self._released, self.last_grad_stats, self.skipped_steps, self.released_bytes) = saved
            self._clear_plans()
            raise

    def _check_loaded_groups(self, saved_groups: Any) -> list[dict]:
        """The saved param groups, checked (torch's messages for a mismatch) and normalised."""
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
            raise ValueError("not an optimizer state dict: 'param_groups' must be a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups = []
        for gi, (g, mine) in enumerate(zip(saved_groups, self.param_groups)):
            if len(g.get("params", ())) != len(mine["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                                 "of optimizer's group")
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
            if missing:
                raise ValueError(f"not an AdamW state dict: parameter group {gi} has no {missing[0]!r}")
            g = dict(g)
            # foreach/fused/capturable/differentiable pick an implementation, not the math: a state
            # dict of any torch AdamW variant loads. amsgrad/maximize change the update: refused.
            for k in ("capturable", "differentiable"):
                g[k] = _FIXED_OPTIONS[k]
            for k in _IMPL_SWITCHES:
                g[k] = g.get(k) if isinstance(g.get(k), bool) else None
            g["decoupled_weight_decay"] = True
            _check_options(g)
            g["lr"], g["betas"] = _check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
            groups.append(g)
        return groups

    def _check_loaded_state(self, sd: dict, extras: Any, saved_ids: list) -> np.ndarray:
        """Check the per-parameter state and the ``"grades"`` extras against this optimizer's
        parameters before anything is loaded; returns the host copy of the frozen mask."""
        n = self.num_params
        host_frozen = np.zeros(n, dtype=bool)
        if extras is not None:
            if not isinstance(extras, dict):
                raise ValueError(f"state dict entry 'grades' must be a dict, got {type(extras).__name__}")
            want = {"frozen": (n,), "last_grad_stats": (n, 3), "skipped_steps": ()}
            for k, shape in want.items():
                v = extras.get(k)
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                    got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(f"state dict entry grades[{k!r}] must be a tensor of shape {list(shape)} "
                                     f"for {n} parameters, got {got}")
            host_frozen = extras["frozen"].detach().to("cpu").numpy().astype(bool)
            for i in extras.get("released", ()):
                if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n:
                    raise ValueError(f"state dict entry grades['released'] holds {i!r}, not a parameter index "
                                     f"in [0, {n})")
        src = sd["state"]
        if not isinstance(src, dict):
            raise ValueError("not an optimizer state dict: 'state' must be a dict")
        steps = []
        for gidx, (sid, p) in enumerate(zip(saved_ids, self.param_list)):
            st = src.get(sid)
            if not st:
                continue
            if not isinstance(st, dict):
                raise ValueError(f"state of parameter {gidx} must be a dict, got {type(st).__name__}")
            if "step" not in st:
                raise ValueError(f"state of parameter {gidx} has no 'step'")
            v = st["step"]
            if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
                steps.append(v.detach().reshape(()))
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                steps.append(torch.tensor(float(v), dtype=torch.float64))
            else:
                raise ValueError(f"state of parameter {gidx}: 'step' must be a number or a 1-element tensor")
            for k in ("exp_avg", "exp_avg_sq"):
                t = st.get(k)
                if t is None:
                    if not host_frozen[gidx]:
                        raise ValueError(f"state of parameter {gidx} has no {k!r} but it is not frozen")
                elif dtensor.is_dtensor(t) and dtensor.is_dtensor(p):
                    dtensor.check_moment(t, p, f"state of parameter {gidx}: {k!r}")
                elif isinstance(t, torch.Tensor) and is_wrapper_subclass(t):
                    raise TypeError(f"state of parameter {gidx}: {k!r} is a {type(t).__name__}, a tensor subclass "
                                    "without plain storage (a sharded checkpoint? load it as plain tensors)")
                elif not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point():
                    got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"state of parameter {gidx}: {k!r} must be a floating-point tensor of the "
                                     f"parameter's shape {tuple(p.shape)}, got {got}")
        if steps:
            dev = steps[0].device  # one host read for all of them
            bad = torch.stack([t.to(device=dev, dtype=torch.float64) for t in steps]).cpu()
            bad = torch.nonzero(~(torch.isfinite(bad) & (bad >= 0))).flatten().tolist()
            if bad:
                raise ValueError(f"state dict holds {len(bad)} step count(s) that are negative or not finite")
        return host_frozen

    def _load_checked(self, sd: dict, extras: Optional[dict], host_frozen: np.ndarray, saved_ids: list) -> None:
        src = sd["state"]
        super().load_state_dict(sd)
        dev = self.frozen.device
        n = self.num_params
        frozen = torch.from_numpy(host_frozen).to(dev)
        released: set[int] = set()
        if extras is not None:
            released = set(int(i) for i in extras.get("released", ()))
        candidates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (master, saved, param)
        group_steps = []
        for gi, group in enumerate(self.param_groups):
            s, e = self._ranges[gi]
            steps = torch.zeros(e - s, dtype=torch.float32, device=dev)
            for local, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                gidx = s + local
                orig = src.get(saved_ids[gidx], {})
                st.pop("max_exp_avg_sq", None)
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in orig:
                        st[k] = orig[k].detach().to(device=p.device, dtype=torch.float32, copy=True)
                    else:  # frozen (checked above)
                        released.add(gidx)
                # master weights (torch's loader cast them to the param's dtype: take the saved ones)
                st.pop("master_param", None)
                if self._wants_master(p) and not host_frozen[gidx]:
                    st["master_param"] = p.detach().to(torch.float32, copy=True)
                    saved = orig.get("master_param")
                    if (isinstance(saved, torch.Tensor) and saved.dtype == torch.float32
                            and saved.shape == p.shape):
                        candidates.append((st["master_param"], saved.detach().to(p.device), p))
                v = st["step"]
                steps[local] = v.detach().reshape(()).to(torch.float32) if isinstance(v, torch.Tensor) else float(v)
                st["step"] = steps[local]
            group_steps.append(steps)
        self._group_steps = group_steps
        self._adopt_saved_masters(candidates)
        self.frozen = frozen
        self._host_frozen = host_frozen
        self._released = released
        self._clear_plans()
        if extras is not None:
            self.last_grad_stats = extras["last_grad_stats"].to(device=dev, dtype=STATS_DTYPE).clone()
            self.skipped_steps = extras["skipped_steps"].to(device=dev, dtype=torch.int64).clone()
        else:
            self.last_grad_stats = torch.zeros(n, 3, dtype=STATS_DTYPE, device=dev)
            self.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
        if self.release_frozen_state:
            for i in np.nonzero(host_frozen)[0].tolist():
                self._release(int(i))
