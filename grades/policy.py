"""The GradES policy: per-component gradient statistics -> freeze decisions -> early stop.

Every optimizer step, :meth:`GradES.step` reduces the per-parameter gradient statistics
(``sum g^2``, ``sum |g|``, non-finite count) to one row per *component* (a weight matrix, or a
LoRA A/B pair), turns them into the chosen statistic, and decides **on the device** which
components freeze: after a grace period, on check steps, when the statistic has been below its
threshold ``tau`` on ``patience`` consecutive checks, subject to a cap on the frozen fraction.
A component that had no gradient in a step (an unrouted expert, a skipped branch) is not
counted in that step. Nothing in :meth:`GradES.step` waits for the device. When the state lives
in host memory (CPU training) the whole rule runs as one call into the CPU extension
(``HostPolicy``, ``csrc/cpu/policy.cpp``): a few microseconds per step instead of a dozen small
tensor ops, with bitwise the same decisions.

Freezing then acts twice:

1. at once on the device, through the optimizer's frozen mask (``FrozenAwareAdamW.freeze_mask_``):
   the very next optimizer step leaves those matrices and their moments untouched;
2. later on the host, once a non-blocking copy of the decision has arrived (checked with
   ``event.query()``, never waited for; on CPU it arrives at once): ``requires_grad=False`` on the
   component's parameters (which removes their weight-gradient GEMM from backward), ``.grad=None``,
   ``optimizer.sync_frozen_state()``, the history record and :attr:`GradES.should_stop`.

With a stock ``torch.optim.AdamW`` only the second path exists: a frozen matrix may still be
updated by the one or two optimizer steps that run before the host learns of the decision (on
CUDA; on CPU the host learns within the same ``gs.step()`` call, so no further update happens).

Statistics come from the optimizer's own pass when it is a :class:`~grades.FrozenAwareAdamW`
(``last_grad_stats``, no extra memory traffic), otherwise from one :func:`grades.grad_stats` call
over the tracked gradients, or from any custom source (see
:mod:`grades.integrations.megatron` for flat ``main_grad`` buffers). Under ``torch.distributed``
with sharded parameters, the small ``[C, 4]`` partial sums (with a count of ranks on which the
component had no gradient) are all-reduced once per step.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import backends
from ._validate import STATS_DTYPE, SUPPORTED_DTYPES, upload
from .components import Component, PatternsLike, resolve_components
from .ops import grad_stats

STATISTICS = ("l1", "l2", "mean_abs", "rms")

#: Default relative threshold of the automatic mode: a component freezes once its statistic has
#: fallen below this fraction of its own level at the end of the grace period.
DEFAULT_REL_TAU = 0.5

#: Decay of the running mean that records each component's level during the grace period in
#: the automatic mode (about the last ten grace steps count).
REF_DECAY = 0.9

#: Default EMA decay of the statistic and default patience (consecutive checks below the
#: threshold). A single step's statistic is noisy; these defaults keep noise from freezing a
#: matrix while a real drop is still caught within about a dozen steps.
DEFAULT_EMA = 0.9
DEFAULT_PATIENCE = 10

TauLike = Union[float, Mapping[str, float], None]


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_tau(name: str, v: TauLike, upper: float = math.inf) -> None:
    if v is None:
        return
    items = v.items() if isinstance(v, Mapping) else [(None, v)]
    if isinstance(v, Mapping) and not v:
        raise ValueError(f"{name} is an empty mapping; give at least one component type")
    for k, x in items:
        where = f"{name}[{k!r}]" if k is not None else name
        if k is not None and not isinstance(k, str):
            raise TypeError(f"{name} keys must be component type names (str), got {k!r}")
        if not _is_real(x):
            raise TypeError(f"{where} must be a real number, got {type(x).__name__}")
        if not math.isfinite(x) or x <= 0 or x > upper:
            bound = f" and at most {upper}" if math.isfinite(upper) else ""
            raise ValueError(f"{where} must be a finite number > 0{bound}, got {x}")


@dataclass
class GradESConfig:
    """Settings of the GradES policy (validated when constructed).

    Threshold (give at most one of ``tau`` and ``rel_tau``; neither means automatic mode with
    ``rel_tau = DEFAULT_REL_TAU``):

    Attributes:
        tau: absolute threshold on the statistic (in the statistic's units, e.g. sum of |g| for
            ``"l1"``): one number for every component, or a mapping ``{component type: tau}``
            (e.g. ``{"attention": 2e-3, "mlp": 5e-3}``; the key ``"default"`` covers types not
            listed; a key naming a type no component has is an error).
        rel_tau: automatic mode: each component's threshold is ``rel_tau`` times its own
            statistic level at the end of the grace period (a running mean of the last grace
            steps, recorded on the device); a number or a per-type mapping, in ``(0, 1]``. A
            component without a single valid reading during the grace period (no gradient, or
            only steps with non-finite gradients or statistics) has no level to measure: it gets
            no threshold and never freezes (so ``stop_ratio=1`` is never reached); GradES warns,
            naming such components, when the grace period ends.
        statistic: ``"l1"`` (sum of |g|, the paper's), ``"l2"`` (sqrt of sum g^2), ``"mean_abs"``
            (l1 / numel) or ``"rms"`` (sqrt(sum g^2 / numel)).
        ema: decay in ``[0, 1)`` of an exponential moving average (bias-corrected, per step) applied
            to the statistic before thresholding; ``None`` or ``0`` uses each step's raw value
            (the paper's rule). Default :data:`DEFAULT_EMA`.
        alpha: grace period as a fraction of ``total_steps``, in ``[0, 1)`` (``alpha > 0`` gives at
            least one grace step, however short the run).
        grace_steps: grace period in optimizer steps (overrides ``alpha``); less than
            ``total_steps`` when both are given.
        total_steps: planned number of optimizer steps (needed with ``alpha > 0`` unless
            ``grace_steps`` is given; the Trainer callback fills it in).
        patience: a component freezes once its statistic has been below tau on this many
            consecutive check steps (``0`` and ``1`` both freeze at the first check below tau).
            Default :data:`DEFAULT_PATIENCE`.
        check_interval: decide every this many optimizer steps after the grace period (>= 1).
        max_frozen_ratio: at most ``floor(max_frozen_ratio * C)`` of the ``C`` components are ever
            frozen (in ``(0, 1]``; at least one); when more qualify at once, the earliest in
            component order win.
        stop_ratio: ``should_stop`` turns true once ``ceil(stop_ratio * C)`` components are frozen,
            or as many as ``max_frozen_ratio`` allows if that is fewer (``None``: never).
        history_every: record the statistics into the history every this many steps.
        history_max: keep at most this many history samples (older ones are thinned).
    """

    tau: TauLike = None
    rel_tau: TauLike = None
    statistic: str = "l1"
    ema: Optional[float] = DEFAULT_EMA
    alpha: float = 0.4
    grace_steps: Optional[int] = None
    total_steps: Optional[int] = None
    patience: int = DEFAULT_PATIENCE
    check_interval: int = 1
    max_frozen_ratio: float = 1.0
    stop_ratio: Optional[float] = 1.0
    history_every: int = 1
    history_max: int = 2000

    def __post_init__(self) -> None:
        if self.tau is not None and self.rel_tau is not None:
            raise ValueError("give either tau (absolute threshold) or rel_tau (automatic mode), not both")
        _check_tau("tau", self.tau)
        _check_tau("rel_tau", self.rel_tau, upper=1.0)
        if not isinstance(self.statistic, str) or self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}")
        if self.ema is not None:
            if not _is_real(self.ema) or not (0.0 <= self.ema < 1.0):
                raise ValueError(f"ema must be None or a decay in [0, 1), got {self.ema!r}")
        if not _is_real(self.alpha) or not (0.0 <= self.alpha < 1.0):
            raise ValueError(f"alpha must be in [0, 1) (fraction of total steps spent in the grace "
                             f"period), got {self.alpha!r}")
        for name in ("grace_steps", "total_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be None or a non-negative integer, got {v!r}")
        if self.total_steps is not None and self.total_steps == 0:
            raise ValueError("total_steps must be positive")
        if self.grace_steps is not None and self.total_steps is not None and self.grace_steps >= self.total_steps:
            raise ValueError(f"grace_steps={self.grace_steps} leaves no step to decide in a run of "
                             f"total_steps={self.total_steps}; use fewer grace steps")
        if not isinstance(self.patience, numbers.Integral) or isinstance(self.patience, bool) or self.patience < 0:
            raise ValueError(f"patience must be a non-negative integer, got {self.patience!r}")
        for name in ("check_interval", "history_every", "history_max"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not _is_real(self.max_frozen_ratio) or not (0.0 < self.max_frozen_ratio <= 1.0):
            raise ValueError(f"max_frozen_ratio must be in (0, 1], got {self.max_frozen_ratio!r}")
        if self.stop_ratio is not None:
            if not _is_real(self.stop_ratio) or not (0.0 < self.stop_ratio <= 1.0):
                raise ValueError(f"stop_ratio must be None or in (0, 1], got {self.stop_ratio!r}")
            if self.stop_ratio > self.max_frozen_ratio:
                raise ValueError(f"stop_ratio={self.stop_ratio} can never be reached with "
                                 f"max_frozen_ratio={self.max_frozen_ratio}; lower it or set stop_ratio=None")
        # plain Python numbers from here on (NumPy scalars from a sweep grid would break the JSON
        # of checkpoints and histories)
        for name in ("grace_steps", "total_steps", "patience", "check_interval", "history_every", "history_max"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, int(v))
        for name in ("ema", "alpha", "max_frozen_ratio", "stop_ratio"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, float(v))
        for name in ("tau", "rel_tau"):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                setattr(self, name, {str(k): float(x) for k, x in v.items()})
            elif v is not None:
                setattr(self, name, float(v))

    @property
    def auto(self) -> bool:
        """Whether thresholds are relative to each component's own level (automatic mode)."""
        return self.tau is None

    def grace(self, total_steps: Optional[int] = None) -> int:
        """The grace period in steps for a run of ``total_steps`` (or ``self.total_steps``)."""
        if self.grace_steps is not None:
            return int(self.grace_steps)
        total = self.total_steps if total_steps is None else total_steps
        if self.alpha == 0:
            return 0
        if total is None:
            raise ValueError(f"alpha={self.alpha} needs the planned number of steps: pass total_steps "
                             "(or grace_steps) in GradESConfig")
        return max(1, int(self.alpha * total))  # alpha > 0 means a grace period, even in a short run

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("tau", "rel_tau"):
            if isinstance(d[k], Mapping):
                d[k] = dict(d[k])
        return d


class StatsSource(Protocol):
    """Where per-component statistics come from: ``compute(frozen)`` returns float64 ``[C, 3]``
    local (possibly partial) sums ``(sum g^2, sum |g|, non-finite count)`` for the components,
    given their device frozen mask ``[C]``.

    A source may also define ``participation()``, called right after ``compute``: a device bool
    ``[C]`` telling which components had a gradient in this step (``None``: all of them). Steps in
    which a component had none do not count for it (no EMA update, no patience check).
    """

    def compute(self, frozen: torch.Tensor) -> torch.Tensor: ...


def _unwrap_optimizer(opt: Any) -> Any:
    seen = 0
    while opt is not None and not _is_frozen_aware(opt) and seen < 4:
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        opt, seen = inner, seen + 1
    return opt


def _is_frozen_aware(opt: Any) -> bool:
    return all(hasattr(opt, a) for a in ("freeze_mask_", "last_grad_stats", "param_index", "param_list"))


def _is_dtensor(t: Any) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _dtensor_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group over which the per-rank partial sums of ``params`` add up to the full
    statistics: ``None`` for plain tensors and for DTensors replicated on every rank, the group of
    the one sharded mesh dimension otherwise (FSDP2 on a 1-D mesh, or HSDP's shard dimension).

    Raises:
        ValueError: a mix of DTensors and plain tensors, DTensors on different meshes or with
            different sharded dimensions, more than one sharded mesh dimension, or a placement
            other than ``Shard``/``Replicate``; pass ``process_group`` explicitly for such layouts.
    """
    flags = [_is_dtensor(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError(f"{sum(flags)} of the {len(flags)} tracked parameters are DTensors (sharded) and the "
                         "others plain tensors; GradES cannot tell which partial sums to all-reduce. Shard "
                         "every tracked module, or pass process_group and a stats_source that match your layout")
    mesh = params[0].device_mesh

    def layout(p: Any) -> tuple:
        kinds = []
        for pl in p.placements:
            if pl.is_shard():
                kinds.append("shard")
            elif pl.is_replicate():
                kinds.append("replicate")
            else:
                raise ValueError(f"tracked DTensor parameters must be Shard or Replicate on each mesh dimension, "
                                 f"got {pl}; pass process_group explicitly")
        return tuple(kinds)
    kinds = layout(params[0])
    for p in params[1:]:
        if p.device_mesh != mesh or layout(p) != kinds:
            raise ValueError("tracked DTensor parameters live on different device meshes or are sharded over "
                             f"different mesh dimensions ({kinds} vs {layout(p)}); pass process_group explicitly")
    shard = [i for i, k in enumerate(kinds) if k == "shard"]
    if len(shard) > 1:
        raise ValueError(f"tracked parameters are sharded over {len(shard)} mesh dimensions {shard}; GradES "
                         "all-reduces over one group: pass process_group covering all sharded dimensions")
    return mesh.get_group(shard[0]) if shard else None


def _padded_index(groups: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    k = max(1, max(len(g) for g in groups))
    idx = torch.full((len(groups), k), pad, dtype=torch.long)
    for i, g in enumerate(groups):
        if g:
            idx[i, :len(g)] = torch.tensor(list(g), dtype=torch.long)
    return idx


def _reduce_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Deterministic per-component sums of ``rows`` ``[N, 3]``: the rows named by each column of
    the padded index ``idx`` ``[C, k]`` (pad index ``N`` reads a zero row), added in the order
    ``k = 0, 1, ...`` on every device. CPU tensors take NumPy (a fraction of torch's per-op cost
    on arrays this small; the same float64 additions, so bitwise the same result)."""
    if rows.device.type == "cpu":
        r, ix = rows.numpy(), idx.numpy()
        ext = np.concatenate([r, np.zeros((1, r.shape[1]), r.dtype)])
        out = ext[ix[:, 0]]
        for j in range(1, ix.shape[1]):
            out += ext[ix[:, j]]
        return torch.from_numpy(out)
    ext = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    out = ext.index_select(0, idx[:, 0])
    for j in range(1, idx.shape[1]):
        out = out + ext.index_select(0, idx[:, j])
    return out


#: attribute GradES sets on a parameter it freezes: its ``requires_grad`` from before, given back
#: when a loaded state has the component unfrozen (also by another GradES on the same model)
_REQUIRES_GRAD_ATTR = "_grades_requires_grad"
_NONE = object()


def _state_attr(field: str) -> str:
    """The GradES attribute holding per-component state field ``field`` (``frozen`` is public)."""
    return field if field == "frozen" else "_" + field


def _name_list(names: Sequence[str], k: int = 5) -> str:
    more = f" and {len(names) - k} more" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _check_coefficient(name: str, v: Any) -> None:
    """``v`` must be a real number or a one-element real tensor (``ValueError``/``TypeError``
    naming ``name`` otherwise; metadata only, no host sync)."""
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got a {v.dtype} tensor")
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(v.shape)}")
        return
    if not _is_real(v):
        raise TypeError(f"{name} must be a real number or a one-element tensor, got {type(v).__name__} {v!r:.40}")


def _unclip(stats: torch.Tensor, coef: Union[float, torch.Tensor]) -> torch.Tensor:
    """Statistics of ``g / coef`` from those of ``g`` (``coef``: the factor gradient clipping
    multiplied the gradients by). A coefficient that is not a finite number > 0 (the total norm
    was infinite or NaN) marks the step invalid through the non-finite count."""
    if isinstance(coef, torch.Tensor) and stats.device.type == "cpu" and coef.device.type == "cpu":
        coef = float(coef)  # a host value already: no device to wait for
    if not isinstance(coef, torch.Tensor) and stats.device.type == "cpu":
        c = float(coef)
        if c == 1.0:
            return stats
        out = stats.numpy().copy()  # the same float64 arithmetic as below, without torch's per-op cost
        out[:, 0] /= c * c
        out[:, 1] /= c
        out[:, 2] += 0.0 if (math.isfinite(c) and c > 0) else 1.0
        return torch.from_numpy(out)
    if isinstance(coef, torch.Tensor):
        c = coef.detach().to(device=stats.device, dtype=torch.float64, non_blocking=True).reshape(())
        bad = torch.isfinite(c).logical_and(c > 0).logical_not().to(torch.float64)
    else:
        c = float(coef)
        if c == 1.0:
            return stats
        bad = 0.0 if (math.isfinite(c) and c > 0) else 1.0
    return torch.cat([stats[:, :1] / (c * c), stats[:, 1:2] / c, stats[:, 2:] + bad], dim=1)


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
        if _is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()
        if total_norm.device.type == "cpu":  # a host value: plain float math, no tensor ops
            total_norm = float(total_norm)
        else:
            return _clip_coefficient_tensor(total_norm, max_norm)
    return _clip_coefficient_float(total_norm, max_norm)


class GradListSource:
    """Statistics of the tracked parameters' ``.grad`` tensors, one :func:`grad_stats` call.

    Parameters without a gradient read zero, and their components are reported as not taking
    part in the step (:meth:`participation`). DTensor gradients contribute their local shard
    (partial sums, to be all-reduced by the policy).
    """

    #: distinct participation patterns kept on the device (a new pattern costs one small copy)
    CACHE = 64

    def __init__(self, components: Sequence[Component], device: torch.device):
        self.params = [p for c in components for p in c.params]
        groups, i = [], 0
        for c in components:
            groups.append(list(range(i, i + len(c.params))))
            i += len(c.params)
        self.idx = _padded_index(groups, len(self.params)).to(device)
        self._comp_np = np.array([ci for ci, c in enumerate(components) for _ in c.params], dtype=np.int64)
        self.param_comp = torch.from_numpy(self._comp_np).to(device)
        self.num_components = len(components)
        self.single = all(len(c.params) == 1 for c in components)
        self.dtensor = any(_is_dtensor(p) for p in self.params)
        self.device = device
        self._empty = torch.empty(0, device=device)
        self._out = torch.empty((len(self.params), 3), dtype=STATS_DTYPE, device=device)
        self._missing: tuple[int, ...] = ()
        self._took: dict[tuple[int, ...], torch.Tensor] = {}
        self._backend = None  # chosen at the first compute (the backends may build native code)

    @property
    def all_missing(self) -> bool:
        """Whether no tracked parameter had a gradient in the last :meth:`compute`."""
        return len(self._missing) == len(self.params)

    def compute(self, frozen: torch.Tensor) -> torch.Tensor:
        rows = self.rows(frozen)
        return rows if self.single else _reduce_rows(rows, self.idx)

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
                    g = _local(g)
                usual = usual and g.dtype in SUPPORTED_DTYPES and g.layout == torch.strided
                grads.append(g if g.is_contiguous() else g.contiguous())
        self._missing = tuple(missing)
        pf = frozen if self.single else frozen.index_select(0, self.param_comp)
        if usual:  # gradients of this model's parameters: grad_stats without its per-tensor checks
            if self._backend is None:
                self._backend = backends.select(self.device, "list")
            self._backend.grad_stats_list(grads, pf, self._out)
            rows = self._out
        else:  # an unsupported dtype or layout: the public op names the problem
            rows = grad_stats(grads, frozen=pf, out=self._out)
        return rows

    def native_inputs(self, frozen: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """For the host rule (:class:`HostPolicy`): the per-parameter rows ``[P, 3]`` (not yet
        summed per component) and which parameters had a gradient (bool ``[P]``, ``None``: all)."""
        rows = self.rows(frozen)
        if not self._missing:
            return rows, None
        part = np.ones(len(self.params), dtype=bool)
        part[list(self._missing)] = False
        return rows, torch.from_numpy(part)

    def participation(self) -> Optional[torch.Tensor]:
        """Device bool ``[C]``: components all of whose parameters had a gradient in the last
        :meth:`compute` (``None`` when all had one). Known on the host; cached per pattern."""
        key = self._missing
        if not key:
            return None
        took = self._took.get(key)
        if took is None:
            host = np.ones(self.num_components, dtype=bool)
            host[self._comp_np[list(key)]] = False
            if len(self._took) >= self.CACHE:
                self._took.clear()
            took = upload(torch.from_numpy(host), self.device)
            self._took[key] = took
        return took


class OptimizerSource:
    """Statistics fused into the optimizer's own pass (``FrozenAwareAdamW.last_grad_stats``);
    participation from its ``last_participation`` mask when it has one."""

    def __init__(self, components: Sequence[Component], optimizer: Any, device: torch.device):
        self.optimizer = optimizer
        groups = []
        for c in components:
            g = []
            for p in c.params:
                try:
                    g.append(int(optimizer.param_index(p)))
                except (KeyError, ValueError) as e:
                    raise ValueError(f"a parameter of component {c.name!r} is not managed by the optimizer; "
                                     "pass every tracked parameter to the optimizer") from e
            groups.append(g)
        n = len(optimizer.param_list)
        self.idx = _padded_index(groups, n).to(device)
        comp_of = torch.full((n + 1,), len(components), dtype=torch.long)
        for ci, g in enumerate(groups):
            for j in g:
                comp_of[j] = ci
        self.comp_of_param = comp_of[:n].to(device)
        self._true = torch.ones(1, dtype=torch.bool, device=device)

    def compute(self, frozen: torch.Tensor) -> torch.Tensor:
        st = self.optimizer.last_grad_stats
        if st is None or st.shape[0] != self.comp_of_param.shape[0]:
            raise RuntimeError("the optimizer has no statistics for its parameters yet; call gs.step() "
                               "after optimizer.step()")
        return _reduce_rows(st, self.idx)

    def participation(self) -> Optional[torch.Tensor]:
        part = getattr(self.optimizer, "last_participation", None)
        if not isinstance(part, torch.Tensor) or part.shape[0] != self.comp_of_param.shape[0]:
            return None
        if part.device.type == "cpu":
            return torch.from_numpy(np.append(part.numpy(), True)[self.idx.numpy()].all(axis=1))
        return torch.cat([part, self._true])[self.idx].all(dim=1)

    def param_mask(self, comp_mask: torch.Tensor) -> torch.Tensor:
        ext = torch.cat([comp_mask, comp_mask.new_zeros(1)])
        return ext.index_select(0, self.comp_of_param)


class GradES:
    """Gradient-based early stopping for a model being trained.

    Args:
        model: the model (any ``nn.Module``; transformers, PEFT and plain modules alike).
        optimizer: the optimizer stepping it. With a :class:`~grades.FrozenAwareAdamW` the
            statistics come from its fused pass and freezes act on its device mask at once;
            with any other optimizer (e.g. ``torch.optim.AdamW``) statistics are computed from
            the gradients in :meth:`step`, and freezes act when the host learns of them. May be
            ``None`` (statistics from gradients; freezing through ``requires_grad`` only).
        config: a :class:`GradESConfig`.
        components: ``None`` for the default attention/MLP discovery, a patterns mapping, or an
            explicit list of :class:`~grades.components.Component`.
        process_group: a ``torch.distributed`` group whose ranks hold *shards* of the gradients:
            the ``[C, 4]`` partial sums are all-reduced over it once per step, so every rank takes
            the same decisions. Leave ``None`` under DDP (gradients are already averaged).
            DTensor (FSDP2) parameters are detected and reduced over their sharded mesh
            dimension automatically (see :func:`_dtensor_group` for the layouts accepted).
        stats_source: a custom :class:`StatsSource` (e.g. a flat ``main_grad`` buffer).

    Plain loop::

        gs = GradES(model, opt, GradESConfig(total_steps=n))
        for batch in data:
            loss = model(**batch).loss; loss.backward(); opt.step()
            gs.step()                      # after opt.step(), before opt.zero_grad()
            opt.zero_grad()
            if gs.should_stop: break
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 config: Optional[GradESConfig] = None, *,
                 components: Union[None, PatternsLike, Iterable[Component]] = None,
                 process_group: Any = None, stats_source: Optional[StatsSource] = None):
        if config is None:
            config = GradESConfig()
        if not isinstance(config, GradESConfig):
            raise TypeError(f"config must be a GradESConfig, got {type(config).__name__}")
        self.config = config
        self.model = model
        self.components: list[Component] = resolve_components(model, components)
        comps = self.components
        C = len(comps)
        self.grace = config.grace(config.total_steps)
        if config.auto and self.grace < 1:
            raise ValueError("the automatic threshold (rel_tau) records each component's level during the "
                             "grace period, so it needs at least one grace step: set alpha > 0 (with "
                             "total_steps) or grace_steps >= 1, or give an absolute tau")
        self._max_frozen = int(math.floor(config.max_frozen_ratio * C + 1e-9))
        if self._max_frozen < 1:
            raise ValueError(f"max_frozen_ratio={config.max_frozen_ratio} of {C} components allows no component "
                             f"to freeze; use at least {1 / C:.4g}")
        #: frozen components at which ``should_stop`` turns true
        self._n_stop = (None if config.stop_ratio is None else
                        min(math.ceil(config.stop_ratio * C - 1e-9), self._max_frozen))
        self._need = max(1, config.patience)
        self.optimizer = _unwrap_optimizer(optimizer)
        self.frozen_aware = self.optimizer is not None and _is_frozen_aware(self.optimizer)

        tracked = [p for c in comps for p in c.params]
        self.device = _local(tracked[0]).device
        self.process_group = process_group
        if process_group is None:
            self.process_group = _dtensor_group(tracked)

        if stats_source is not None:
            bind = getattr(stats_source, "bind", None)
            if callable(bind):
                bind(self.components)
            self.source: StatsSource = stats_source
        elif self.frozen_aware:
            self.source = OptimizerSource(comps, self.optimizer, self.device)
        else:
            self.source = GradListSource(comps, self.device)
        if self.frozen_aware:
            self._init_optimizer_map()

        dev = self.device
        self._tau_vals = self._per_component(config.rel_tau if config.auto else config.tau,
                                             DEFAULT_REL_TAU if config.auto else None)
        self._thresh = torch.tensor(self._tau_vals, dtype=torch.float64, device=dev)
        self._numel = torch.tensor([max(1, c.numel) for c in comps], dtype=torch.float64, device=dev)
        self._numel_np = np.array([max(1, c.numel) for c in comps], dtype=np.float64)
        #: state in host memory: decide with one native call (the CPU extension's HostPolicy), or
        #: with NumPy on views of the state tensors where the extension is missing
        self.host_math = dev.type == "cpu"
        # device state
        self.frozen = torch.zeros(C, dtype=torch.bool, device=dev)
        self._counter = torch.zeros(C, dtype=torch.int64, device=dev)
        self._ema = torch.zeros(C, dtype=torch.float64, device=dev)
        self._ema_w = torch.zeros(C, dtype=torch.float64, device=dev)  # 1 - decay^(steps counted)
        self._ref = torch.zeros(C, dtype=torch.float64, device=dev)
        self._ref_w = torch.zeros(C, dtype=torch.float64, device=dev)
        self._freeze_step = torch.full((C,), -1, dtype=torch.int64, device=dev)
        self._last_stat = torch.zeros(C, dtype=torch.float64, device=dev)
        self._invalid_steps = torch.zeros((), dtype=torch.int64, device=dev)
        self._views = ({k: getattr(self, n).numpy() for k, n in (
            ("frozen", "frozen"), ("counter", "_counter"), ("ema", "_ema"), ("ema_w", "_ema_w"), ("ref", "_ref"),
            ("ref_w", "_ref_w"), ("thresh", "_thresh"), ("freeze_step", "_freeze_step"),
            ("last_stat", "_last_stat"))} if self.host_math else {})
        # host state
        self.step_count = 0
        self.should_stop = False
        self.stopped_at: Optional[int] = None
        self._host_frozen = np.zeros(C, dtype=bool)
        self._host_freeze_step = np.full(C, -1, dtype=np.int64)
        self._last_stats: Optional[np.ndarray] = None
        self._last_stats_live = False  # the native rule's state is the latest statistic itself
        self.last_stats_step = 0
        self._history = _History(C, config.history_max)
        self.freeze_events: list[dict] = []
        self._hist_stride = 1
        self._n_host_frozen = 0
        #: the decision rule in native code (:class:`HostPolicy` of the CPU extension) for host state;
        #: built at the first step (``False``: not available, the NumPy rule runs instead)
        self._native: Any = None
        self._new_frozen = torch.zeros(C, dtype=torch.bool) if self.host_math else None
        self._warned_no_grad = False
        self._warned_no_new_step = False
        #: FrozenAwareAdamW._step_calls at the last counted step (a repeated call sees no new one)
        self._opt_calls: Optional[int] = None
        #: device path: host copy (and event) of "no valid reading in the grace period" per component
        self._grace_probe: Optional[tuple[torch.Tensor, Any]] = None
        self._slots = [_Slot(C, dev) for _ in range(2)]
        self._slot_i = 0
        self._pending: list[_Slot] = []

    # ------------------------------------------------------------------ helpers

    def _per_component(self, tau: TauLike, default: Optional[float]) -> list[float]:
        if tau is None:
            tau = default
        if not isinstance(tau, Mapping):
            return [float(tau)] * len(self.components)
        name = "rel_tau" if self.config.auto else "tau"
        types = {c.type for c in self.components}
        unknown = sorted(set(tau) - types - {"default"})
        if unknown:
            raise ValueError(f"{name} has entries for component type(s) {unknown} that no component has "
                             f"(types here: {sorted(types)}); fix the spelling or remove them")
        missing = sorted(t for t in types if t not in tau and "default" not in tau)
        if missing:
            raise ValueError(f"no threshold for component type(s) {missing}: add them (or a "
                             f"'default' entry) to the {name} mapping {dict(tau)}")
        return [float(tau.get(c.type, tau.get("default"))) for c in self.components]

    def _init_optimizer_map(self) -> None:
        """Optimizer rows of each component's parameters (host, for ``sync_frozen_state``) and the
        device map optimizer row -> component (for ``freeze_mask_``), built once here so that no
        freeze event has to copy anything to the device."""
        opt = self.optimizer
        n = len(opt.param_list)
        rows = []
        for c in self.components:
            r = []
            for p in c.params:
                try:
                    r.append(int(opt.param_index(p)))
                except (KeyError, ValueError):
                    pass
            rows.append(np.asarray(r, dtype=np.int64))
        self._opt_rows = rows
        self._opt_n = n
        self._opt_host_mask = np.zeros(n, dtype=bool)
        comp_of = torch.full((n,), len(self.components), dtype=torch.long)
        for ci, r in enumerate(rows):
            comp_of[torch.from_numpy(r)] = ci
        self._opt_map = comp_of.to(self.device)

    def _optimizer_changed(self) -> None:
        """The FrozenAwareAdamW's parameter list changed after this policy was built (e.g.
        ``add_param_group``): take in rows appended after the ones this policy knows (the tracked
        parameters keep theirs); anything else is refused, before the step is counted."""
        opt, n_old = self.optimizer, self._opt_n
        n = len(opt.param_list)
        moved = []
        for c, r in zip(self.components, self._opt_rows):
            for p, row in zip(c.params, r.tolist()):
                try:
                    now = int(opt.param_index(p))
                except (KeyError, ValueError):
                    now = -1
                if now != row:
                    moved.append(c.name)
        if n < n_old or moved:
            raise ValueError(f"the optimizer's parameter list changed after GradES was built ({n_old} -> {n} "
                             "parameters" + (f"; the parameters of {sorted(set(moved))[:5]} moved or left it"
                                             if moved else "") +
                             "); GradES only follows parameter groups added with add_param_group: build GradES "
                             "again after changing the optimizer's parameters")
        old_mask = self._opt_host_mask
        self._init_optimizer_map()
        self._opt_host_mask[:n_old] = old_mask
        if isinstance(self.source, OptimizerSource):
            self.source = OptimizerSource(self.components, opt, self.device)
        if self._native not in (None, False):
            self._native = None  # rebuilt at the next step for the new number of rows

    @property
    def last_stats(self) -> Optional[np.ndarray]:
        """The latest statistic the host knows of, float64 ``[C]`` (``None`` before the first)."""
        if self._last_stats_live:
            return self._views["last_stat"].copy()
        return self._last_stats

    @last_stats.setter
    def last_stats(self, value: Optional[np.ndarray]) -> None:
        self._last_stats = value
        self._last_stats_live = False

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def frozen_fraction(self) -> float:
        """Fraction of components the host knows to be frozen."""
        return float(self._host_frozen.mean()) if len(self._host_frozen) else 0.0

    @property
    def frozen_components(self) -> list[str]:
        """Names of the components the host knows to be frozen."""
        return [c.name for c, f in zip(self.components, self._host_frozen) if f]

    def _statistic(self, s: torch.Tensor) -> torch.Tensor:
        kind = self.config.statistic
        if kind == "l1":
            return s[:, 1]
        if kind == "l2":
            return s[:, 0].sqrt()
        if kind == "mean_abs":
            return s[:, 1] / self._numel
        return (s[:, 0] / self._numel).sqrt()

    def _statistic_np(self, s: np.ndarray) -> np.ndarray:
        """:meth:`_statistic` on a host array, bitwise equal to the device path: a column or a
        (correctly rounded) division in NumPy; square roots through torch, whose vectorised CPU
        square root may differ from NumPy's in the last bit."""
        kind = self.config.statistic
        if kind == "l1":
            return s[:, 1]
        if kind == "mean_abs":
            return s[:, 1] / self._numel_np
        return self._statistic(torch.from_numpy(s)).numpy()

    # ------------------------------------------------------------------ the step

    def step(self, clip_coef: Union[None, float, torch.Tensor] = None, *,
             total_norm: Union[None, float, torch.Tensor] = None, max_norm: Optional[float] = None) -> None:
        """Account for one optimizer step: call it right after ``optimizer.step()`` (and before
        ``zero_grad``). Issues a few small device ops and a non-blocking copy; never waits.

        Args:
            clip_coef: the factor the gradients were multiplied by after backward, e.g. by
                gradient clipping (:func:`clip_coefficient` of the total norm that
                ``clip_grad_norm_`` returned; a device tensor is fine). The statistics are
                divided by it, so decisions see the unclipped gradient: under global-norm
                clipping one spiking matrix would otherwise push every other one below tau.
            total_norm, max_norm: instead of ``clip_coef``, the total norm that
                ``clip_grad_norm_(params, max_norm)`` returned and the ``max_norm`` it clipped
                to (the coefficient is then :func:`clip_coefficient` of them).
        """
        # every argument is checked before anything changes: a rejected call counts no step
        if clip_coef is not None and type(clip_coef) is not float:
            _check_coefficient("clip_coef", clip_coef)
        if total_norm is not None or max_norm is not None:
            if clip_coef is not None:
                raise ValueError("give clip_coef or total_norm and max_norm, not both")
            if (total_norm is None or max_norm is None or not (type(max_norm) is float or _is_real(max_norm))
                    or not max_norm > 0):
                raise ValueError(f"total_norm and max_norm go together, with max_norm > 0; got "
                                 f"total_norm={total_norm!r}, max_norm={max_norm!r}")
            if type(total_norm) is not float:
                _check_coefficient("total_norm", total_norm)
        calls = None
        if self.frozen_aware:
            if len(self.optimizer.param_list) != self._opt_n:
                self._optimizer_changed()
            calls = getattr(self.optimizer, "_step_calls", None)
            if calls is not None and calls == self._opt_calls:
                self._warn_no_new_step()  # e.g. called once per micro-batch: nothing new to count
                return
        if total_norm is not None:
            if type(total_norm) is not torch.Tensor:  # a number, or a DTensor (its full value)
                clip_coef, total_norm = clip_coefficient(total_norm, float(max_norm)), None
        if self.host_math and self._step_native(clip_coef, total_norm, max_norm):
            self._opt_calls = calls
            return
        if total_norm is not None:
            clip_coef = clip_coefficient(total_norm, float(max_norm))
        with torch.no_grad():
            self._step_general(clip_coef)
        self._opt_calls = calls

    def _warn_no_new_step(self) -> None:
        if not self._warned_no_new_step:
            self._warned_no_new_step = True
            warnings.warn("GradES.step(): the FrozenAwareAdamW has not stepped since the last call, so there are "
                          "no new statistics; this call (and any like it) is ignored. Call gs.step() once per "
                          "optimizer step, after optimizer.step() (not once per micro-batch)",
                          RuntimeWarning, stacklevel=3)

    def _native_rule(self) -> Any:
        """The CPU extension's :class:`HostPolicy` bound to this policy's state, or ``False`` when
        the rule has to run in NumPy (no extension, a custom statistics source, or statistics
        all-reduced across ranks)."""
        src = self.source
        if (self.process_group is not None or not isinstance(src, (OptimizerSource, GradListSource))
                or os.environ.get("GRADES_BACKEND") == "reference"):
            return False
        from . import _build
        mod, _ = _build.load("cpu")
        if mod is None or not hasattr(mod, "HostPolicy"):
            return False
        cfg = self.config
        self._num_rows = (len(self.optimizer.param_list) if isinstance(src, OptimizerSource) else len(src.params))
        rule = mod.HostPolicy(
            idx=src.idx.contiguous(), num_rows=self._num_rows, statistic=STATISTICS.index(cfg.statistic),
            numel=self._numel, ema=float(cfg.ema or 0.0), ref_decay=REF_DECAY, auto_mode=cfg.auto,
            check_interval=int(cfg.check_interval), need=int(self._need), max_frozen=int(self._max_frozen),
            frozen=self.frozen, counter=self._counter, ema_v=self._ema, ema_w=self._ema_w, ref=self._ref,
            ref_w=self._ref_w, thresh=self._thresh, freeze_step=self._freeze_step, last_stat=self._last_stat,
            invalid_steps=self._invalid_steps, new_frozen=self._new_frozen)
        self._history.bind(rule, cfg.history_every * self._hist_stride)
        self._last_stats_live = True
        return rule

    def _step_native(self, clip_coef: Union[None, float, torch.Tensor], total_norm: Optional[torch.Tensor],
                     max_norm: Optional[float]) -> bool:
        """One step of the rule in native code on host state (every check it needs is done by the
        native rule; this runs on every training step, so it stays short); ``False`` when it
        cannot run here: then nothing has changed and the general path runs."""
        rule = self._native
        if rule is None:
            rule = self._native = self._native_rule()
        if rule is False:
            return False
        if clip_coef is not None:
            if isinstance(clip_coef, torch.Tensor):
                if clip_coef.device.type != "cpu" or type(clip_coef) is not torch.Tensor:
                    return False
            clip_coef = float(clip_coef)
        if self.frozen_aware:
            opt = self.optimizer
            rows = opt.last_grad_stats
            if rows is None or rows.shape[0] != self._num_rows:
                return False  # the general path names the problem
            part, skipped = opt.last_participation, opt.last_step_skipped
        else:
            with torch.no_grad():
                rows, part = self.source.native_inputs(self.frozen)
            skipped = None
            if self.source.all_missing:
                self._warn_no_grad()
        t = self.step_count + 1
        flags = rule.step(rows, part, None, clip_coef, total_norm, 0.0 if max_norm is None else max_norm,
                          skipped, t, self.grace)
        self.step_count = self.last_stats_step = t
        if flags:
            self._native_followup(t, flags)
        if t == self.grace and self.config.auto:
            self._warn_no_reading(self._views["ref_w"] <= 0)
        return True

    def _native_followup(self, t: int, flags: int) -> None:
        """After a native step that froze something (``flags >> 1`` components) or filled the
        history buffers (``flags & 1``)."""
        if flags >> 1:
            if self.frozen_aware:
                self._freeze_in_optimizer(self._new_frozen.clone())
            v = self._views
            # the native rule has recorded this step's sample already
            self._learn_arrays(t, v["last_stat"].copy(), v["frozen"], v["freeze_step"], record=False)
            self._last_stats_live = True  # _learn_arrays set a copy; the state itself stays current
        if flags & 1:
            if self._history.n > self.config.history_max:
                self._thin_history()
            else:
                self._history.grow()

    def _warn_no_reading(self, missing: np.ndarray) -> None:
        """At the end of the grace period (automatic mode): warn about components that had no
        valid reading in it (``missing``, bool ``[C]``): they have no threshold and never freeze."""
        if not missing.any():
            return
        names = [c.name for c, m in zip(self.components, missing.tolist()) if m]
        warnings.warn(f"GradES: the grace period ended (step {self.grace}) without a valid reading for {len(names)} "
                      f"of {len(self.components)} component(s) ({_name_list(names)}): no gradient reached them, "
                      "or only non-finite ones, so their automatic threshold could not be measured and they will "
                      "never freeze; check that they are trained, or lengthen the grace period",
                      RuntimeWarning, stacklevel=4)

    def _warn_no_grad(self) -> None:
        if not self._warned_no_grad and not self._host_frozen.any():
            self._warned_no_grad = True
            warnings.warn("GradES.step(): none of the tracked parameters has a gradient, so this step does not "
                          "count; call gs.step() after optimizer.step() and before optimizer.zero_grad()",
                          RuntimeWarning, stacklevel=4)

    def _step_general(self, clip_coef: Union[None, float, torch.Tensor]) -> None:
        self.poll()
        t = self.step_count + 1
        stats = self.source.compute(self.frozen)  # may name a problem: then no step is counted
        participation = getattr(self.source, "participation", None)
        took = participation() if callable(participation) else None
        if getattr(self.source, "all_missing", False):
            self._warn_no_grad()
        if clip_coef is not None:
            stats = _unclip(stats, clip_coef)
        if self.process_group is not None:
            import torch.distributed as dist
            missing = stats.new_zeros(len(stats)) if took is None else took.logical_not().to(stats.dtype)
            buf = torch.cat([stats, missing[:, None]], dim=1)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
            stats, took = buf[:, :3], buf[:, 3] == 0
        self.step_count = t
        if self.host_math:
            self._step_host(t, stats, took)
            return
        self._step_device(t, stats, took)
        self._publish(t)
        self.poll()

    def _step_device(self, t: int, stats: torch.Tensor, took: Optional[torch.Tensor]) -> None:
        cfg = self.config
        live = ~self.frozen
        # a step is a valid reading when no gradient held a non-finite value and no sum overflowed
        # (a finite gradient beyond ~1e19 gives an infinite float32 sum of squares)
        valid = (stats[:, 2].sum() == 0) & torch.isfinite(stats[:, :2]).all()
        if self.frozen_aware:
            skipped = getattr(self.optimizer, "last_step_skipped", None)
            if isinstance(skipped, torch.Tensor):
                valid = valid & ~skipped.to(valid.device)
        # counted for this component in this step (a frozen one counts as a zero reading)
        ok = valid if took is None else valid & (took | self.frozen)
        val = torch.where(live, self._statistic(stats), torch.zeros((), dtype=torch.float64, device=self.device))
        val = torch.where(torch.isnan(val), math.inf, val)
        if cfg.ema:
            d = float(cfg.ema)
            self._ema.copy_(torch.where(ok, d * self._ema + (1 - d) * val, self._ema))
            self._ema_w.copy_(torch.where(ok, d * self._ema_w + (1 - d), self._ema_w))
            cur = self._ema / self._ema_w.clamp_min(1e-300)
        else:
            cur = val
        self._last_stat.copy_(torch.where(ok, cur, self._last_stat))
        self._invalid_steps.add_((~valid).to(torch.int64))
        if t <= self.grace:
            if cfg.auto:
                self._ref.copy_(torch.where(ok, REF_DECAY * self._ref + (1 - REF_DECAY) * cur, self._ref))
                self._ref_w.copy_(torch.where(ok, REF_DECAY * self._ref_w + (1 - REF_DECAY), self._ref_w))
                if t == self.grace:
                    # thresholds become fixed at the end of the grace period; a component that never
                    # had a gradient gets a negative one (it cannot freeze)
                    level = self._ref / self._ref_w.clamp_min(1e-300)
                    self._thresh.mul_(torch.where(self._ref_w > 0, level, torch.full_like(level, -1.0)))
                    # which components had no valid reading: a non-blocking copy, looked at in poll()
                    cuda = self.device.type == "cuda"
                    host = torch.empty(len(self.components), dtype=torch.bool, pin_memory=cuda)
                    host.copy_(self._ref_w <= 0, non_blocking=cuda)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record()
                    self._grace_probe = (host, event)
        elif (t - self.grace) % cfg.check_interval == 0:
            below = (cur < self._thresh) & live
            self._counter.copy_(torch.where(ok, torch.where(below, self._counter + 1, 0), self._counter))
            cand = (self._counter >= self._need) & live & ok
            if self._max_frozen < len(self.components):
                room = self._max_frozen - self.frozen.sum()
                cand = cand & (torch.cumsum(cand.to(torch.int64), 0) <= room)
            self.frozen |= cand
            self._freeze_step.copy_(torch.where(cand, t, self._freeze_step))
            if self.frozen_aware:
                self._freeze_in_optimizer(cand)

    def _step_host(self, t: int, stats: torch.Tensor, took: Optional[torch.Tensor]) -> None:
        """The same decision rule as the device path, for CPU runs, on NumPy views of the very
        same state tensors (no device to wait for, and a fraction of the per-op cost)."""
        cfg = self.config
        v = self._views
        s = stats.numpy()
        frozen = v["frozen"]
        live = ~frozen
        valid = not s[:, 2].any() and bool(np.isfinite(s[:, :2]).all())
        if self.frozen_aware:
            skipped = getattr(self.optimizer, "last_step_skipped", None)
            if isinstance(skipped, torch.Tensor) and bool(skipped):
                valid = False
        ok = np.full(len(live), valid) if took is None else (took.numpy() | frozen) & valid
        raw = self._statistic_np(s)
        val = np.where(live, raw, 0.0)
        if np.isnan(val).any():
            val = np.where(np.isnan(val), math.inf, val)
        if cfg.ema:
            d = float(cfg.ema)
            ema, ema_w = v["ema"], v["ema_w"]
            ema[:] = np.where(ok, d * ema + (1 - d) * val, ema)
            ema_w[:] = np.where(ok, d * ema_w + (1 - d), ema_w)
            cur = ema / np.maximum(ema_w, 1e-300)
        else:
            cur = val
        v["last_stat"][:] = np.where(ok, cur, v["last_stat"])
        if not valid:
            self._invalid_steps.add_(1)
        if t <= self.grace:
            if cfg.auto:
                ref, ref_w = v["ref"], v["ref_w"]
                ref[:] = np.where(ok, REF_DECAY * ref + (1 - REF_DECAY) * cur, ref)
                ref_w[:] = np.where(ok, REF_DECAY * ref_w + (1 - REF_DECAY), ref_w)
                if t == self.grace:
                    level = ref / np.maximum(ref_w, 1e-300)
                    th = v["thresh"]
                    th[:] = th * np.where(ref_w > 0, level, -1.0)
                    self._warn_no_reading(ref_w <= 0)
        elif (t - self.grace) % cfg.check_interval == 0:
            counter = v["counter"]
            below = (cur < v["thresh"]) & live
            counter[:] = np.where(ok, np.where(below, counter + 1, 0), counter)
            cand = (counter >= self._need) & live & ok
            if self._max_frozen < len(self.components) and cand.any():
                room = self._max_frozen - int(frozen.sum())
                cand &= np.cumsum(cand) <= room
            if cand.any():
                frozen |= cand
                v["freeze_step"][cand] = t
                if self.frozen_aware:
                    self._freeze_in_optimizer(torch.from_numpy(cand))
        self._learn_arrays(t, v["last_stat"].copy(), frozen.copy(), v["freeze_step"])

    def _freeze_in_optimizer(self, cand: torch.Tensor) -> None:
        """OR the components ``cand`` (device bool ``[C]``) into the optimizer's device mask."""
        self.optimizer.freeze_mask_(torch.cat([cand, cand.new_zeros(1)]).index_select(0, self._opt_map))

    def _publish(self, t: int) -> None:
        slot = self._slots[self._slot_i]
        if slot.in_flight:
            self.poll()
            if slot.in_flight:
                return  # not taken in yet; a later copy carries everything (frozen state is cumulative)
        slot.start(t, self._last_stat, self.frozen, self._freeze_step)
        self._pending.append(slot)
        self._slot_i ^= 1

    def poll(self) -> None:
        """Take in any device decisions whose host copy has arrived (never waits)."""
        while self._pending and self._pending[0].ready():
            slot = self._pending.pop(0)
            self._learn(slot)
        if self._grace_probe is not None and (self._grace_probe[1] is None or self._grace_probe[1].query()):
            host, self._grace_probe = self._grace_probe[0], None
            self._warn_no_reading(host.numpy())

    def wait(self) -> None:
        """Wait for the outstanding decision copies and take them in (a host sync; for the end of
        training, checkpoints and tests)."""
        for slot in self._pending:
            slot.synchronize()
        if self._grace_probe is not None and self._grace_probe[1] is not None:
            self._grace_probe[1].synchronize()
        self.poll()

    def fast_forward(self, step: int) -> None:
        """Continue counting from optimizer step ``step`` without saved state (a resumed run whose
        GradES state is lost): nothing is frozen and patience counts start at zero. In automatic
        mode a grace period that had already ended starts again at ``step``, so that each
        component's level is measured anew. Only on a policy that has not stepped yet
        (``ValueError`` otherwise)."""
        if self.step_count > 0:
            raise ValueError(f"fast_forward() starts a policy whose state was lost at a later step, but this one "
                             f"has already counted {self.step_count} steps (its grace period and thresholds are "
                             "set); build a new GradES to start afresh, or load_state_dict() a saved state")
        if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.wait()
        if self.config.auto and step >= self.grace:
            self.grace = step + self.grace
        self.step_count = int(step)

    def _learn(self, slot: "_Slot") -> None:
        self._learn_arrays(slot.step, *slot.read())

    def _learn_arrays(self, t: int, stat: np.ndarray, frozen: np.ndarray, fstep: np.ndarray,
                      record: bool = True) -> None:
        """Take in the decision state of step ``t``: new freezes (``requires_grad``, optimizer,
        events), the history sample (unless ``record=False``) and ``should_stop``."""
        self.last_stats = stat
        self.last_stats_step = t
        new = np.nonzero(frozen & ~self._host_frozen)[0]
        if len(new):
            for i in new.tolist():
                c = self.components[i]
                for p in c.params:
                    if not hasattr(p, _REQUIRES_GRAD_ATTR):
                        setattr(p, _REQUIRES_GRAD_ATTR, bool(p.requires_grad))
                    p.requires_grad_(False)
                    p.grad = None
                self._host_freeze_step[i] = int(fstep[i])
                self.freeze_events.append({"component": c.name, "type": c.type, "step": int(fstep[i]),
                                           "learned_at": t})
            self._host_frozen[new] = True
            self._n_host_frozen = int(self._host_frozen.sum())
            if self.frozen_aware and hasattr(self.optimizer, "sync_frozen_state"):
                for i in new.tolist():
                    self._opt_host_mask[self._opt_rows[i]] = True
                self.optimizer.sync_frozen_state(self._opt_host_mask)
        if record:
            self._record(t, stat, force=bool(len(new)))
        if self._n_stop is not None and not self.should_stop and self._n_host_frozen >= self._n_stop:
            self.should_stop = True
            self.stopped_at = t

    def _record(self, t: int, stat: np.ndarray, force: bool = False) -> None:
        every = self.config.history_every * self._hist_stride
        if t % every != 0 and not force:
            return
        if self._history.append(t, self._n_host_frozen, stat):
            self._thin_history()

    def _thin_history(self) -> None:
        """Over ``history_max`` samples: keep every other regular sample (freeze-time samples are
        always kept) and sample half as often from now on."""
        self._hist_stride *= 2
        every = self.config.history_every * self._hist_stride
        events = np.array(sorted({e["learned_at"] for e in self.freeze_events}), dtype=np.int64)
        steps = self._history.steps[:self._history.n]
        self._history.keep((steps % every == 0) | np.isin(steps, events))
        self._history.set_every(every)

    @property
    def history(self) -> list[dict]:
        """The sampled history: ``{"step", "frozen" (count), "stat" (list of C floats)}`` per
        sample, oldest first (a new list on every access)."""
        return self._history.as_list()

    @history.setter
    def history(self, samples: Iterable[Mapping[str, Any]]) -> None:
        self._history.load(samples)

    # ------------------------------------------------------------------ reporting

    def type_means(self) -> dict[str, float]:
        """Mean statistic per component type over the non-frozen components (latest host copy)."""
        if self.last_stats is None:
            return {}
        out: dict[str, list[float]] = {}
        for c, v, f in zip(self.components, self.last_stats, self._host_frozen):
            if not f:
                out.setdefault(c.type, []).append(float(v))
        return {k: float(np.mean(v)) for k, v in out.items()}

    def thresholds(self) -> list[float]:
        """Per-component thresholds (in auto mode: final once the grace period is over; a host sync)."""
        return self._thresh.detach().cpu().tolist()

    def summary(self) -> dict:
        return {"step": self.step_count, "frozen": int(self._host_frozen.sum()),
                "num_components": len(self.components), "frozen_fraction": self.frozen_fraction,
                "should_stop": self.should_stop, "stopped_at": self.stopped_at}

    def history_dict(self) -> dict:
        return {"config": self.config.to_dict(), "grace_steps": self.grace,
                "components": [c.as_dict() for c in self.components],
                "freeze_steps": {c.name: int(s) for c, s in zip(self.components, self._host_freeze_step) if s >= 0},
                "freeze_events": list(self.freeze_events), "samples": list(self.history),
                **self.summary()}

    def save_history(self, path: Union[str, os.PathLike]) -> None:
        """Write the configuration, components, freeze events and sampled statistics as JSON."""
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.history_dict(), f, indent=1)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything needed to continue identically: step, grace period, frozen set, counters,
        thresholds, EMA and reference levels, freeze steps and history (plain Python values;
        JSON-safe). A host sync."""
        self.wait()

        def lst(t: torch.Tensor) -> list:
            return t.detach().cpu().tolist()
        return {"version": 2, "component_names": [c.name for c in self.components],
                "step": self.step_count, "grace": self.grace, "frozen": lst(self.frozen), "counter": lst(self._counter),
                "ema": lst(self._ema), "ema_w": lst(self._ema_w), "ref": lst(self._ref),
                "ref_w": lst(self._ref_w), "thresh": lst(self._thresh), "freeze_step": lst(self._freeze_step),
                "last_stat": lst(self._last_stat), "invalid_steps": int(self._invalid_steps),
                "should_stop": self.should_stop, "stopped_at": self.stopped_at,
                "history": list(self.history), "freeze_events": list(self.freeze_events),
                "hist_stride": self._hist_stride, "config": self.config.to_dict()}

    #: config fields that shape the decisions a saved state carries on (thresholds, EMA levels,
    #: counters): loading a state saved under other values is worth a warning
    _DECISION_FIELDS = ("statistic", "tau", "rel_tau", "ema", "patience", "check_interval", "max_frozen_ratio",
                        "stop_ratio")

    def _warn_config_change(self, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            return  # a state written before configs were saved with it
        now = self.config.to_dict()
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in self._DECISION_FIELDS
                if k in saved and saved[k] != now[k]]
        if diff:
            warnings.warn("GradES.load_state_dict: the state was saved under another configuration ("
                          + "; ".join(diff) + "); its thresholds, EMA levels and counters continue as saved",
                          RuntimeWarning, stacklevel=3)

    #: per-component fields of :meth:`state_dict`: (NumPy kinds accepted, dtype stored)
    _STATE_FIELDS = {"frozen": ("bi", bool), "counter": ("iu", np.int64), "ema": ("biuf", np.float64),
                     "ema_w": ("biuf", np.float64), "ref": ("biuf", np.float64), "ref_w": ("biuf", np.float64),
                     "thresh": ("biuf", np.float64), "freeze_step": ("iu", np.int64),
                     "last_stat": ("biuf", np.float64)}

    def _check_state(self, sd: Any) -> dict:
        """:meth:`load_state_dict`'s input, checked and converted (nothing is changed here):
        ``ValueError`` naming the first field that is missing or does not fit."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"a GradES state must be a mapping (GradES.state_dict() output), got {type(sd).__name__}")
        names = [c.name for c in self.components]
        C = len(names)
        saved = sd.get("component_names")
        if not isinstance(saved, (list, tuple)) or list(saved) != names:
            n = len(saved) if isinstance(saved, (list, tuple)) else "no"
            raise ValueError(f"the saved GradES state belongs to different components ({n} saved vs {C} here)")
        version = sd.get("version", 2)
        if version not in (1, 2):
            raise ValueError(f"unknown GradES state version {version!r} (this GradES reads 1 and 2)")
        missing = [k for k in (*self._STATE_FIELDS, "step", "invalid_steps") if k not in sd]
        if missing:
            raise ValueError(f"the saved GradES state lacks {missing}")
        out: dict = {}
        for k, (kinds, dtype) in self._STATE_FIELDS.items():
            v = sd[k]
            if version == 1 and k in ("ema_w", "ref_w") and _is_real(v):
                v = [v] * C  # version 1: one weight for all components
            try:
                a = np.asarray(v)
            except Exception as e:  # ragged nesting and the like
                raise ValueError(f"GradES state field {k!r} is not a list of {C} numbers: {e}") from None
            if a.shape != (C,) or a.dtype.kind not in kinds:
                what = "booleans" if dtype is bool else "integers" if dtype is np.int64 else "numbers"
                raise ValueError(f"GradES state field {k!r} must be a list of {C} {what} (one per component), "
                                 f"got {a.dtype} of shape {a.shape}")
            a = a.astype(dtype)
            if dtype is np.float64 and np.isnan(a).any():
                raise ValueError(f"GradES state field {k!r} holds NaN")
            if dtype is bool and not np.isin(np.asarray(v, dtype=np.float64), (0, 1)).all():
                raise ValueError(f"GradES state field {k!r} must hold booleans")
            out[k] = a
        if (out["counter"] < 0).any() or (out["freeze_step"] < -1).any():
            raise ValueError("GradES state fields 'counter' (>= 0) and 'freeze_step' (>= -1) hold invalid values")

        def integer(k: str, v: Any, low: int, optional: bool = False) -> Optional[int]:
            if v is None and optional:
                return None
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < low:
                raise ValueError(f"GradES state field {k!r} must be an integer >= {low}, got {v!r}")
            return int(v)
        out["step"] = integer("step", sd["step"], 0)
        out["invalid_steps"] = integer("invalid_steps", sd["invalid_steps"], 0)
        out["grace"] = integer("grace", sd.get("grace", self.grace), 0)
        out["hist_stride"] = integer("hist_stride", sd.get("hist_stride", 1), 1)
        out["stopped_at"] = integer("stopped_at", sd.get("stopped_at"), 0, optional=True)
        stop = sd.get("should_stop", False)
        if not isinstance(stop, (bool, np.bool_)):
            raise ValueError(f"GradES state field 'should_stop' must be a bool, got {stop!r}")
        out["should_stop"] = bool(stop)
        for k in ("history", "freeze_events"):
            v = sd.get(k, [])
            if not isinstance(v, (list, tuple)) or not all(isinstance(e, Mapping) for e in v):
                raise ValueError(f"GradES state field {k!r} must be a list of mappings")
            out[k] = [dict(e) for e in v]
        for i, h in enumerate(out["history"]):
            try:
                stat = np.asarray(h["stat"], dtype=np.float64)
                integer("history step", h["step"], 0)
                integer("history frozen", h["frozen"], 0)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"GradES state field 'history' sample {i} is not a {{step, frozen, stat}} "
                                 f"sample: {e}") from None
            if stat.shape != (C,):
                raise ValueError(f"GradES state field 'history' sample {i} has {stat.size} statistics for "
                                 f"{C} components")
        return out

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly: re-freezes the saved components (device
        mask, ``requires_grad`` and optimizer), and gives the components *not* frozen in the saved
        state back the ``requires_grad`` their parameters had before GradES froze them (loading an
        earlier state after later freezes, in the same process). So training continues as if
        never interrupted. (Version-1 states, with one EMA/reference weight for all components,
        load too.)

        Everything is checked before anything changes: a state that does not fit raises
        ``ValueError`` naming the field (``TypeError`` for a non-mapping) and leaves this policy
        as it was. A :class:`~grades.FrozenAwareAdamW` cannot unfreeze a parameter by itself:
        when its mask still freezes a component the loaded state has not frozen, a
        ``RuntimeWarning`` says so; load the optimizer state dict saved with this state (its
        ``["grades"]["frozen"]`` mask replaces the optimizer's), as the Trainer does on resume.
        """
        v = self._check_state(sd)
        self._warn_config_change(sd.get("config"))
        self.wait()
        snap = self._snapshot()
        try:
            self._apply_state(v)
        except BaseException:
            self._restore(snap)
            raise
        if self.frozen_aware:
            self._warn_optimizer_mask()

    #: every state tensor, as attribute names (what a failed load restores)
    _STATE_TENSORS = tuple(_state_attr(k) for k in _STATE_FIELDS) + ("_invalid_steps",)

    def _snapshot(self) -> dict:
        rg = [(p, p.requires_grad, getattr(p, _REQUIRES_GRAD_ATTR, _NONE)) for c in self.components for p in c.params]
        return {"tensors": [getattr(self, n).clone() for n in self._STATE_TENSORS],
                "host": (self.step_count, self.grace, self._host_frozen.copy(), self._n_host_frozen,
                         self._host_freeze_step.copy(), list(self.freeze_events), self.should_stop, self.stopped_at,
                         self._last_stats, self._last_stats_live, self.last_stats_step, self._hist_stride,
                         self._opt_host_mask.copy() if self.frozen_aware else None),
                "history": self._history.as_list(), "requires_grad": rg,
                "opt_frozen": self.optimizer.frozen.clone() if self.frozen_aware else None}

    def _restore(self, snap: dict) -> None:
        for n, t in zip(self._STATE_TENSORS, snap["tensors"]):
            getattr(self, n).copy_(t)
        (self.step_count, self.grace, self._host_frozen, self._n_host_frozen, self._host_freeze_step,
         self.freeze_events, self.should_stop, self.stopped_at, self._last_stats, self._last_stats_live,
         self.last_stats_step, self._hist_stride, opt_mask) = snap["host"]
        if opt_mask is not None:
            self._opt_host_mask = opt_mask
            self.optimizer.frozen.copy_(snap["opt_frozen"])
        self._history.set_every(self.config.history_every * self._hist_stride)
        self._history.load(snap["history"])
        for p, rg, attr in snap["requires_grad"]:
            p.requires_grad_(rg)
            if attr is _NONE:
                if hasattr(p, _REQUIRES_GRAD_ATTR):
                    delattr(p, _REQUIRES_GRAD_ATTR)
            else:
                setattr(p, _REQUIRES_GRAD_ATTR, attr)

    def _apply_state(self, v: dict) -> None:
        dev = self.device
        for key in self._STATE_FIELDS:
            dst = getattr(self, _state_attr(key))
            dst.copy_(torch.from_numpy(v[key]).to(device=dev, dtype=dst.dtype))
        self._invalid_steps.fill_(v["invalid_steps"])
        self.step_count = v["step"]
        self.grace = v["grace"]
        # components not frozen in the loaded state: their parameters' requires_grad as it was
        # before GradES (this instance or an earlier one on the same model) froze them
        for c, f in zip(self.components, v["frozen"]):
            if not f:
                for p in c.params:
                    if hasattr(p, _REQUIRES_GRAD_ATTR):
                        p.requires_grad_(bool(getattr(p, _REQUIRES_GRAD_ATTR)))
                        delattr(p, _REQUIRES_GRAD_ATTR)
        self._host_frozen[:] = False
        self._host_freeze_step[:] = -1
        self._n_host_frozen = 0
        self.freeze_events = []
        self.should_stop, self.stopped_at = False, None
        if self.frozen_aware:
            self._opt_host_mask[:] = False
            self._freeze_in_optimizer(self.frozen)
        slot = _Slot(len(self.components), dev)
        slot.start(self.step_count, self._last_stat, self.frozen, self._freeze_step)
        slot.synchronize()
        self._learn(slot)
        if self._native not in (None, False):
            self._last_stats_live = True  # the native rule keeps the state current
        self._hist_stride = v["hist_stride"]
        self._history.set_every(self.config.history_every * self._hist_stride)
        self.history = v["history"]
        self.freeze_events = v["freeze_events"]
        self.should_stop = v["should_stop"]
        self.stopped_at = v["stopped_at"]

    def _warn_optimizer_mask(self) -> None:
        """Warn when the FrozenAwareAdamW's mask freezes parameters of components that are not
        frozen here (it has no way to unfreeze them but loading its own state dict)."""
        opt_frozen = self.optimizer.frozen.detach().to("cpu").numpy()
        stuck = [c.name for c, r, f in zip(self.components, self._opt_rows, self._host_frozen)
                 if not f and len(r) and opt_frozen[r].any()]
        if stuck:
            warnings.warn(f"GradES.load_state_dict: the FrozenAwareAdamW still freezes {len(stuck)} component(s) "
                          f"that the loaded GradES state has not frozen ({_name_list(stuck)}); GradES cannot unset "
                          "an optimizer's frozen mask, so these matrices are not updated. Load the optimizer state "
                          "dict saved together with this GradES state (its ['grades']['frozen'] mask replaces the "
                          "optimizer's), before or after this call", RuntimeWarning, stacklevel=3)


class _History:
    """Sampled statistics over time in preallocated NumPy arrays: per sample the optimizer step,
    the number of frozen components and the statistic ``[C]``; at most ``limit`` samples kept
    (the owner thins them out when :meth:`append` says the limit is passed). The arrays grow
    geometrically; a native rule bound with :meth:`bind` writes samples into them itself."""

    def __init__(self, C: int, limit: int):
        self.C, self.limit = C, limit
        self._n = np.zeros(1, dtype=np.int64)
        self.steps = np.zeros(0, dtype=np.int64)
        self.frozen = np.zeros(0, dtype=np.int64)
        self.stat = np.zeros((0, C), dtype=np.float64)
        self._rule: Any = None
        self._every = 1

    @property
    def n(self) -> int:
        return int(self._n[0])

    @property
    def cap(self) -> int:
        return len(self.steps)

    def bind(self, rule: Any, every: int) -> None:
        """Let ``rule`` (a native :class:`HostPolicy`) record a sample every ``every`` steps."""
        self._rule, self._every = rule, every
        if self.n >= self.cap:
            self._reserve(self.n + 1)  # room for the rule's next sample (rebinds)
        else:
            self._rebind()

    def set_every(self, every: int) -> None:
        self._every = every
        self._rebind()

    def _rebind(self) -> None:
        if self._rule is not None:
            self._rule.bind_history(torch.from_numpy(self.steps), torch.from_numpy(self.frozen),
                                    torch.from_numpy(self.stat), torch.from_numpy(self._n), self._every)

    def _reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        cap = min(max(n, 2 * self.cap, 16), self.limit + 1) if n <= self.limit + 1 else n
        k = self.n
        for name in ("steps", "frozen", "stat"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], dtype=old.dtype)
            new[:k] = old[:k]
            setattr(self, name, new)
        self._rebind()

    def grow(self) -> None:
        self._reserve(self.n + 1)

    def append(self, step: int, frozen: int, stat: np.ndarray) -> bool:
        """Add a sample; returns whether there are now more than ``limit``."""
        i = self.n
        self._reserve(i + 1)
        self.steps[i] = step
        self.frozen[i] = frozen
        self.stat[i] = stat
        self._n[0] = i + 1
        if self._rule is not None and i + 1 <= self.limit:
            self._reserve(i + 2)  # a bound rule needs room for its next sample
        return i + 1 > self.limit

    def keep(self, mask: np.ndarray) -> None:
        """Keep the samples where ``mask`` (bool ``[n]``) holds, at most the last ``limit``."""
        sel = np.nonzero(mask)[0][-self.limit:]
        k = len(sel)
        for name in ("steps", "frozen", "stat"):
            a = getattr(self, name)
            a[:k] = a[sel]
        self._n[0] = k

    def as_list(self) -> list[dict]:
        n = self.n
        return [{"step": s, "frozen": f, "stat": row} for s, f, row in
                zip(self.steps[:n].tolist(), self.frozen[:n].tolist(), self.stat[:n].tolist())]

    def load(self, samples: Iterable[Mapping[str, Any]]) -> None:
        samples = list(samples)[-self.limit:]
        self._n[0] = 0
        self._reserve(len(samples))
        for h in samples:
            stat = np.asarray(h["stat"], dtype=np.float64)
            if stat.shape != (self.C,):
                raise ValueError(f"a history sample has {stat.size} statistics for {self.C} components")
            self.append(int(h["step"]), int(h["frozen"]), stat)


class _Slot:
    """One pinned host buffer + event for a non-blocking copy of the decision state."""

    def __init__(self, C: int, device: torch.device):
        self.C = C
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.empty(3 * C, dtype=torch.float64, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.step = 0
        self.in_flight = False

    def start(self, t: int, stat: torch.Tensor, frozen: torch.Tensor, fstep: torch.Tensor) -> None:
        packed = torch.cat([stat, frozen.to(torch.float64), fstep.to(torch.float64)])
        self.host.copy_(packed, non_blocking=self.cuda)
        if self.event is not None:
            self.event.record()
        self.step = t
        self.in_flight = True

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.in_flight = False
        a = self.host.numpy()
        C = self.C
        return a[:C].copy(), a[C:2 * C] > 0.5, a[2 * C:].astype(np.int64)


__all__ = ["GradES", "GradESConfig", "StatsSource", "GradListSource", "OptimizerSource", "STATISTICS",
           "DEFAULT_REL_TAU", "DEFAULT_EMA", "DEFAULT_PATIENCE", "clip_coefficient"]
