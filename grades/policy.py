"""The GradES policy: per-component gradient statistics -> freeze decisions -> early stop.

Every optimizer step, :meth:`GradES.step` reduces the per-parameter gradient statistics
(``sum g^2``, ``sum |g|``, non-finite count) to one row per *component* (a weight matrix, or a
LoRA A/B pair), turns them into the chosen statistic, and decides **on the device** which
components freeze: after a grace period, on check steps, when the statistic has stayed below its
threshold ``tau`` for more than ``patience`` consecutive checks, subject to a cap on the frozen
fraction. Nothing in :meth:`GradES.step` waits for the device.

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
with sharded parameters, the small ``[C, 3]`` partial sums are all-reduced once per step.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
from torch import nn

from ._validate import STATS_DTYPE
from .components import Component, PatternsLike, resolve_components
from .ops import grad_stats

STATISTICS = ("l1", "l2", "mean_abs", "rms")

#: Default relative threshold of the automatic mode: a component freezes once its statistic has
#: fallen below this fraction of its own level at the end of the grace period.
DEFAULT_REL_TAU = 0.5

#: Decay of the running mean that records each component's level during the grace period in
#: the automatic mode (about the last ten grace steps count).
REF_DECAY = 0.9

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
        tau: absolute threshold on the statistic: one number for every component, or a mapping
            ``{component type: tau}`` (e.g. ``{"attention": 2e-3, "mlp": 5e-3}``; the key
            ``"default"`` covers types not listed).
        rel_tau: automatic mode: each component's threshold is ``rel_tau`` times its own
            statistic level at the end of the grace period (a running mean of the last grace
            steps, recorded on the device); a number or a per-type mapping, in ``(0, 1]``.
        statistic: ``"l1"`` (sum of |g|, the paper's), ``"l2"`` (sqrt of sum g^2), ``"mean_abs"``
            (l1 / numel) or ``"rms"`` (sqrt(sum g^2 / numel)).
        ema: optional decay in ``[0, 1)`` of an exponential moving average applied to the
            statistic before thresholding (bias-corrected); ``None`` or ``0`` uses the raw value.
        alpha: grace period as a fraction of ``total_steps``, in ``[0, 1)``.
        grace_steps: grace period in steps (overrides ``alpha``).
        total_steps: planned number of optimizer steps (needed with ``alpha > 0`` unless
            ``grace_steps`` is given; the Trainer callback fills it in).
        patience: a component freezes when its statistic has been below tau on more than
            ``patience`` consecutive check steps (0: the first check below tau freezes it).
        check_interval: decide every this many steps after the grace period (>= 1).
        max_frozen_ratio: at most this fraction of components is ever frozen (in ``(0, 1]``);
            when more qualify at once, the earliest in component order win.
        stop_ratio: ``should_stop`` turns true once this fraction of components is frozen
            (``None``: never).
        history_every: record the statistics into the history every this many steps.
        history_max: keep at most this many history samples (older ones are thinned).
    """

    tau: TauLike = None
    rel_tau: TauLike = None
    statistic: str = "l1"
    ema: Optional[float] = None
    alpha: float = 0.3
    grace_steps: Optional[int] = None
    total_steps: Optional[int] = None
    patience: int = 0
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
        return int(self.alpha * total)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("tau", "rel_tau"):
            if isinstance(d[k], Mapping):
                d[k] = dict(d[k])
        return d


class StatsSource(Protocol):
    """Where per-component statistics come from: ``compute(frozen)`` returns float64 ``[C, 3]``
    local (possibly partial) sums for the components, given their device frozen mask ``[C]``."""

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


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _padded_index(groups: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    k = max(1, max(len(g) for g in groups))
    idx = torch.full((len(groups), k), pad, dtype=torch.long)
    for i, g in enumerate(groups):
        if g:
            idx[i, :len(g)] = torch.tensor(list(g), dtype=torch.long)
    return idx


def _reduce_rows(rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Deterministic per-component sums of ``rows`` ``[N, 3]``: a padded gather ``[C, k, 3]``
    (pad index ``N`` reads a zero row) summed over ``k`` in a fixed order."""
    ext = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    if idx.shape[1] == 1:
        return ext.index_select(0, idx[:, 0])
    return ext[idx].sum(dim=1)


class GradListSource:
    """Statistics of the tracked parameters' ``.grad`` tensors, one :func:`grad_stats` call.

    Parameters without a gradient (frozen on the host, or unused) read zero. DTensor gradients
    contribute their local shard (partial sums, to be all-reduced by the policy).
    """

    def __init__(self, components: Sequence[Component], device: torch.device):
        self.params = [p for c in components for p in c.params]
        groups, i = [], 0
        for c in components:
            groups.append(list(range(i, i + len(c.params))))
            i += len(c.params)
        self.idx = _padded_index(groups, len(self.params)).to(device)
        self.param_comp = torch.tensor([ci for ci, c in enumerate(components) for _ in c.params],
                                       dtype=torch.long, device=device)
        self.single = all(len(c.params) == 1 for c in components)
        self.dtensor = any(callable(getattr(p, "to_local", None)) for p in self.params)
        self.device = device
        self._empty = torch.empty(0, device=device)
        self._out = torch.empty((len(self.params), 3), dtype=STATS_DTYPE, device=device)

    def compute(self, frozen: torch.Tensor) -> torch.Tensor:
        grads = []
        empty, dtensor = self._empty, self.dtensor
        for p in self.params:
            g = p.grad
            if g is None:
                grads.append(empty)
            else:
                if dtensor:
                    g = _local(g)
                grads.append(g if g.is_contiguous() else g.contiguous())
        pf = frozen if self.single else frozen.index_select(0, self.param_comp)
        rows = grad_stats(grads, frozen=pf, out=self._out)
        return rows if self.single else _reduce_rows(rows, self.idx)


class OptimizerSource:
    """Statistics fused into the optimizer's own pass (``FrozenAwareAdamW.last_grad_stats``)."""

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

    def compute(self, frozen: torch.Tensor) -> torch.Tensor:
        st = self.optimizer.last_grad_stats
        if st is None or st.shape[0] != self.comp_of_param.shape[0]:
            raise RuntimeError("the optimizer has no statistics for its parameters yet; call gs.step() "
                               "after optimizer.step()")
        return _reduce_rows(st, self.idx)

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
            the ``[C, 3]`` partial sums are all-reduced over it once per step, so every rank takes
            the same decisions. Leave ``None`` under DDP (gradients are already averaged).
            DTensor (FSDP2) parameters are detected and reduced over their mesh automatically.
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
        self.optimizer = _unwrap_optimizer(optimizer)
        self.frozen_aware = self.optimizer is not None and _is_frozen_aware(self.optimizer)

        first = comps[0].params[0]
        self.device = _local(first).device
        self.process_group = process_group
        if process_group is None:
            mesh = getattr(first, "device_mesh", None)
            if mesh is not None and hasattr(first, "to_local"):
                self.process_group = mesh.get_group()

        if stats_source is not None:
            bind = getattr(stats_source, "bind", None)
            if callable(bind):
                bind(self.components)
            self.source: StatsSource = stats_source
        elif self.frozen_aware:
            self.source = OptimizerSource(comps, self.optimizer, self.device)
        else:
            self.source = GradListSource(comps, self.device)

        dev = self.device
        self._tau_vals = self._per_component(config.rel_tau if config.auto else config.tau,
                                             DEFAULT_REL_TAU if config.auto else None)
        self._thresh = torch.tensor(self._tau_vals, dtype=torch.float64, device=dev)
        self._numel = torch.tensor([max(1, c.numel) for c in comps], dtype=torch.float64, device=dev)
        self._numel_np = self._numel.cpu().numpy()
        #: decide with NumPy on views of the state tensors when they live in host memory
        self.host_math = dev.type == "cpu"
        self._max_frozen = int(math.floor(config.max_frozen_ratio * C + 1e-9))
        # device state
        self.frozen = torch.zeros(C, dtype=torch.bool, device=dev)
        self._counter = torch.zeros(C, dtype=torch.int64, device=dev)
        self._ema = torch.zeros(C, dtype=torch.float64, device=dev)
        self._ema_w = torch.zeros((), dtype=torch.float64, device=dev)  # 1 - decay^valid_steps
        self._ref = torch.zeros(C, dtype=torch.float64, device=dev)
        self._ref_w = torch.zeros((), dtype=torch.float64, device=dev)
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
        self.last_stats: Optional[np.ndarray] = None  # latest host copy of the statistic [C]
        self.last_stats_step = 0
        self.history: list[dict] = []
        self.freeze_events: list[dict] = []
        self._hist_stride = 1
        self._slots = [_Slot(C, dev) for _ in range(2)]
        self._slot_i = 0
        self._pending: list[_Slot] = []

    # ------------------------------------------------------------------ helpers

    def _per_component(self, tau: TauLike, default: Optional[float]) -> list[float]:
        if tau is None:
            tau = default
        if not isinstance(tau, Mapping):
            return [float(tau)] * len(self.components)
        out, missing = [], set()
        for c in self.components:
            v = tau.get(c.type, tau.get("default"))
            if v is None:
                missing.add(c.type)
            out.append(float(v) if v is not None else 0.0)
        if missing:
            raise ValueError(f"no threshold for component type(s) {sorted(missing)}: add them (or a "
                             f"'default' entry) to the tau/rel_tau mapping {dict(tau)}")
        return out

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

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self) -> None:
        """Account for one optimizer step: call it right after ``optimizer.step()`` (and before
        ``zero_grad``). Issues a few small device ops and a non-blocking copy; never waits."""
        self.poll()
        cfg = self.config
        self.step_count += 1
        t = self.step_count
        stats = self.source.compute(self.frozen)
        if self.process_group is not None:
            import torch.distributed as dist
            stats = stats.contiguous()
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.process_group)
        if self.host_math:
            self._step_host(t, stats)
            return
        live = ~self.frozen
        valid = stats[:, 2].sum() == 0
        if self.frozen_aware:
            skipped = getattr(self.optimizer, "last_step_skipped", None)
            if isinstance(skipped, torch.Tensor):
                valid = valid & ~skipped.to(valid.device)
        val = torch.where(live, self._statistic(stats), torch.zeros((), dtype=torch.float64, device=self.device))
        val = torch.where(torch.isnan(val), math.inf, val)
        if cfg.ema:
            d = float(cfg.ema)
            self._ema.copy_(torch.where(valid, d * self._ema + (1 - d) * val, self._ema))
            self._ema_w.copy_(torch.where(valid, d * self._ema_w + (1 - d), self._ema_w))
            cur = self._ema / self._ema_w.clamp_min(1e-300)
        else:
            cur = val
        self._last_stat.copy_(torch.where(valid, cur, self._last_stat))
        self._invalid_steps.add_((~valid).to(torch.int64))
        if t <= self.grace:
            if cfg.auto:
                self._ref.copy_(torch.where(valid, REF_DECAY * self._ref + (1 - REF_DECAY) * cur, self._ref))
                self._ref_w.copy_(torch.where(valid, REF_DECAY * self._ref_w + (1 - REF_DECAY), self._ref_w))
                if t == self.grace:
                    # thresholds become fixed at the end of the grace period
                    level = self._ref / self._ref_w.clamp_min(1e-300)
                    self._thresh.mul_(torch.where(self._ref_w > 0, level, torch.full_like(level, -1.0)))
        elif (t - self.grace) % cfg.check_interval == 0:
            below = (cur < self._thresh) & live
            self._counter.copy_(torch.where(valid, torch.where(below, self._counter + 1, 0), self._counter))
            cand = (self._counter > cfg.patience) & live & valid
            if self._max_frozen < len(self.components):
                room = self._max_frozen - self.frozen.sum()
                cand = cand & (torch.cumsum(cand.to(torch.int64), 0) <= room)
            self.frozen |= cand
            self._freeze_step.copy_(torch.where(cand, t, self._freeze_step))
            if self.frozen_aware and isinstance(self.source, OptimizerSource):
                self.optimizer.freeze_mask_(self.source.param_mask(cand))
            elif self.frozen_aware:
                self._freeze_in_optimizer(cand)
        self._publish(t)
        self.poll()

    def _step_host(self, t: int, stats: torch.Tensor) -> None:
        """The same decision rule as the device path, for CPU runs, on NumPy views of the very
        same state tensors (no device to wait for, and a fraction of the per-op cost)."""
        cfg = self.config
        v = self._views
        s = stats.numpy()
        frozen = v["frozen"]
        live = ~frozen
        valid = bool(s[:, 2].sum() == 0)
        if self.frozen_aware:
            skipped = getattr(self.optimizer, "last_step_skipped", None)
            if isinstance(skipped, torch.Tensor) and bool(skipped):
                valid = False
        raw = self._statistic(stats).numpy()  # the same kernels as the device path: bitwise equal
        val = np.where(live, raw, 0.0)
        if np.isnan(val).any():
            val = np.where(np.isnan(val), math.inf, val)
        if cfg.ema:
            d = float(cfg.ema)
            ema, ema_w = v["ema"], v["ema_w"]
            if valid:
                ema[:] = d * ema + (1 - d) * val
                ema_w[...] = d * ema_w + (1 - d)
            cur = ema / max(float(ema_w), 1e-300)
        else:
            cur = val
        if valid:
            v["last_stat"][:] = cur
        else:
            self._invalid_steps.add_(1)
        if t <= self.grace:
            if cfg.auto:
                ref, ref_w = v["ref"], v["ref_w"]
                if valid:
                    ref[:] = REF_DECAY * ref + (1 - REF_DECAY) * cur
                    ref_w[...] = REF_DECAY * ref_w + (1 - REF_DECAY)
                if t == self.grace:
                    w = float(ref_w)
                    level = ref / max(w, 1e-300) if w > 0 else np.full_like(ref, -1.0)
                    th = v["thresh"]
                    th[:] = th * level
        elif (t - self.grace) % cfg.check_interval == 0 and valid:
            counter = v["counter"]
            below = (cur < v["thresh"]) & live
            counter[:] = np.where(below, counter + 1, 0)
            cand = (counter > cfg.patience) & live
            if self._max_frozen < len(self.components) and cand.any():
                room = self._max_frozen - int(frozen.sum())
                cand &= np.cumsum(cand) <= room
            if cand.any():
                frozen |= cand
                v["freeze_step"][cand] = t
                if self.frozen_aware:
                    ct = torch.from_numpy(cand)
                    if isinstance(self.source, OptimizerSource):
                        self.optimizer.freeze_mask_(self.source.param_mask(ct))
                    else:
                        self._freeze_in_optimizer(ct)
        self._learn_arrays(t, v["last_stat"].copy(), frozen.copy(), v["freeze_step"])

    def _freeze_in_optimizer(self, cand: torch.Tensor) -> None:
        mask = getattr(self, "_opt_map", None)
        if mask is None:
            opt = self.optimizer
            n = len(opt.param_list)
            comp_of = torch.full((n,), len(self.components), dtype=torch.long)
            for ci, c in enumerate(self.components):
                for p in c.params:
                    try:
                        comp_of[int(opt.param_index(p))] = ci
                    except (KeyError, ValueError):
                        pass
            self._opt_map = mask = comp_of.to(self.device)
        ext = torch.cat([cand, cand.new_zeros(1)])
        self.optimizer.freeze_mask_(ext.index_select(0, mask))

    def _publish(self, t: int) -> None:
        slot = self._slots[self._slot_i]
        if slot.busy():
            return  # the host is behind; a later copy carries everything (frozen state is cumulative)
        slot.start(t, self._last_stat, self.frozen, self._freeze_step)
        self._pending.append(slot)
        self._slot_i ^= 1

    def poll(self) -> None:
        """Take in any device decisions whose host copy has arrived (never waits)."""
        while self._pending and self._pending[0].ready():
            slot = self._pending.pop(0)
            self._learn(slot)

    def wait(self) -> None:
        """Wait for the outstanding decision copies and take them in (a host sync; for the end of
        training, checkpoints and tests)."""
        for slot in self._pending:
            slot.synchronize()
        self.poll()

    def _learn(self, slot: "_Slot") -> None:
        self._learn_arrays(slot.step, *slot.read())

    def _learn_arrays(self, t: int, stat: np.ndarray, frozen: np.ndarray, fstep: np.ndarray) -> None:
        self.last_stats = stat
        self.last_stats_step = t
        new = np.nonzero(frozen & ~self._host_frozen)[0]
        if len(new):
            for i in new.tolist():
                c = self.components[i]
                for p in c.params:
                    p.requires_grad_(False)
                    p.grad = None
                self._host_freeze_step[i] = int(fstep[i])
                self.freeze_events.append({"component": c.name, "type": c.type, "step": int(fstep[i]),
                                           "learned_at": t})
            self._host_frozen[new] = True
            if self.frozen_aware and hasattr(self.optimizer, "sync_frozen_state"):
                n = len(self.optimizer.param_list)
                pm = np.zeros(n, dtype=bool)
                for i in np.nonzero(self._host_frozen)[0].tolist():
                    for p in self.components[i].params:
                        try:
                            pm[int(self.optimizer.param_index(p))] = True
                        except (KeyError, ValueError):
                            pass
                self.optimizer.sync_frozen_state(pm)
        self._record(t, stat, force=bool(len(new)))
        ratio = self.config.stop_ratio
        if ratio is not None and not self.should_stop:
            if self._host_frozen.sum() >= math.ceil(ratio * len(self.components) - 1e-9):
                self.should_stop = True
                self.stopped_at = t

    def _record(self, t: int, stat: np.ndarray, force: bool = False) -> None:
        every = self.config.history_every * self._hist_stride
        if t % every != 0 and not force:
            return
        self.history.append({"step": t, "frozen": int(self._host_frozen.sum()), "stat": stat.tolist()})
        if len(self.history) > self.config.history_max:
            # thin out: keep every other regular sample (freeze-time samples are always kept)
            self._hist_stride *= 2
            every = self.config.history_every * self._hist_stride
            events = {e["learned_at"] for e in self.freeze_events}
            keep = [h for h in self.history if h["step"] % every == 0 or h["step"] in events]
            self.history = keep[-self.config.history_max:]

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
        """Everything needed to continue identically: step, frozen set, counters, thresholds,
        EMA and reference levels, freeze steps and history (plain Python values; JSON-safe)."""
        self.wait()

        def lst(t: torch.Tensor) -> list:
            return t.detach().cpu().tolist()
        return {"version": 1, "component_names": [c.name for c in self.components],
                "step": self.step_count, "frozen": lst(self.frozen), "counter": lst(self._counter),
                "ema": lst(self._ema), "ema_w": float(self._ema_w), "ref": lst(self._ref),
                "ref_w": float(self._ref_w), "thresh": lst(self._thresh), "freeze_step": lst(self._freeze_step),
                "last_stat": lst(self._last_stat), "invalid_steps": int(self._invalid_steps),
                "should_stop": self.should_stop, "stopped_at": self.stopped_at,
                "history": list(self.history), "freeze_events": list(self.freeze_events),
                "hist_stride": self._hist_stride}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output: re-freezes the saved components (device mask,
        ``requires_grad`` and optimizer) so training continues as if never interrupted."""
        names = [c.name for c in self.components]
        if list(sd.get("component_names", [])) != names:
            raise ValueError("the saved GradES state belongs to different components "
                             f"({len(sd.get('component_names', []))} saved vs {len(names)} here)")
        dev = self.device

        def put(dst: torch.Tensor, v: Any) -> None:
            dst.copy_(torch.as_tensor(v, dtype=dst.dtype).to(dev))
        self.wait()
        put(self.frozen, sd["frozen"])
        put(self._counter, sd["counter"])
        put(self._ema, sd["ema"])
        put(self._ema_w, sd["ema_w"])
        put(self._ref, sd["ref"])
        put(self._ref_w, sd["ref_w"])
        put(self._thresh, sd["thresh"])
        put(self._freeze_step, sd["freeze_step"])
        put(self._last_stat, sd["last_stat"])
        put(self._invalid_steps, sd["invalid_steps"])
        self.step_count = int(sd["step"])
        self._host_frozen[:] = False
        self.freeze_events = []
        if self.frozen_aware:
            if isinstance(self.source, OptimizerSource):
                self.optimizer.freeze_mask_(self.source.param_mask(self.frozen))
            else:
                self._freeze_in_optimizer(self.frozen)
        slot = _Slot(len(self.components), dev)
        slot.start(self.step_count, self._last_stat, self.frozen, self._freeze_step)
        slot.synchronize()
        self._learn(slot)
        self.history = [dict(h) for h in sd.get("history", [])]
        self._hist_stride = int(sd.get("hist_stride", 1))
        self.freeze_events = [dict(e) for e in sd.get("freeze_events", [])]
        self.should_stop = bool(sd.get("should_stop", False))
        self.stopped_at = sd.get("stopped_at")


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

    def busy(self) -> bool:
        return self.in_flight and not self.ready()

    def synchronize(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.in_flight = False
        a = self.host.numpy()
        C = self.C
        return a[:C].copy(), a[C:2 * C] > 0.5, a[2 * C:].astype(np.int64)


__all__ = ["GradES", "GradESConfig", "StatsSource", "GradListSource", "OptimizerSource", "STATISTICS",
           "DEFAULT_REL_TAU"]
