"""The GradES policy object: wires the statistics source, the decision rule, the host copies,
the freezer and the history together, once per optimizer step."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

from .._checks import check_coefficient, is_integer, is_real
from ..components import Component, PatternsLike, resolve_components
from ..contract import FreezableOptimizer
from .checkpoint import Checkpointing
from .clip import clip_coefficient
from .config import DEFAULT_REL_TAU, GradESConfig, TauLike, fraction_count
from .freezing import Freezer, name_list
from .history import History
from .no_gradient import NoGradientWatch
from .optimizer import OptimizerLink, check_engine, unwrap_optimizer
from .record import HostCopies
from .rule import FROZE, HISTORY_FULL, component_sums, is_identity, make_rule, select_rule
from .sharding import all_reduce_partials, dtensor_group, is_dtensor, local
from .sources import CustomSource, GradListSource, StatsSource
from .state import DecisionState


class GradES(Checkpointing):
    """Gradient-based early stopping for a model being trained.

    Args:
        model: the model (any ``nn.Module``; transformers, PEFT and plain modules alike).
        optimizer: the optimizer stepping it. With a :class:`~grades.contract.FreezableOptimizer`
            (e.g. :class:`~grades.FrozenAwareAdamW`) the statistics come from its fused pass and
            freezes act on its device mask at once; with any other optimizer (e.g.
            ``torch.optim.AdamW``) statistics are computed from the gradients in :meth:`step`, and
            freezes act when the host learns of them. May be ``None`` (statistics from gradients;
            freezing through ``requires_grad`` only). ``TypeError`` for anything else.
        config: a :class:`GradESConfig`.
        components: ``None`` for the default attention/MLP discovery, a patterns mapping, or an
            explicit list of :class:`~grades.components.Component`.
        process_group: a ``torch.distributed`` group whose ranks hold *shards* of the gradients:
            the ``[C, 4]`` partial sums are all-reduced over it once per step, so every rank takes
            the same decisions. Leave ``None`` under DDP (gradients are already averaged).
            DTensor (FSDP2) parameters are detected and reduced over their sharded mesh
            dimension automatically (see :func:`~grades.policy.sharding.dtensor_group`).
        stats_source: a custom :class:`~grades.policy.StatsSource` (e.g. a flat ``main_grad`` buffer).
        rule: the decision rule's implementation, ``"native"`` (the CPU extension, host-memory
            state only) or ``"torch"`` (tensor ops); ``None`` picks the native one on the CPU when
            the extension loads. Both decide bitwise alike (see :mod:`grades.policy.rule`).

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
                 process_group: Any = None, stats_source: Optional[StatsSource] = None,
                 rule: Optional[str] = None):
        config = GradESConfig() if config is None else config
        if not isinstance(config, GradESConfig):
            raise TypeError(f"config must be a GradESConfig, got {type(config).__name__}")
        self.config, self.model = config, model
        check_engine(optimizer)
        self.optimizer = unwrap_optimizer(optimizer)
        self.components: list[Component] = resolve_components(model, components)
        C = len(self.components)
        self.grace = config.grace(config.total_steps)
        if config.auto and self.grace < 1:
            raise ValueError("the automatic threshold (rel_tau) records each component's level during the "
                             "grace period, so it needs at least one grace step: set alpha > 0 (with "
                             "total_steps) or grace_steps >= 1, or give an absolute tau")
        self._max_frozen = int(math.floor(config.max_frozen_ratio * C + 1e-9))
        if self._max_frozen < 1:
            raise ValueError(f"max_frozen_ratio={config.max_frozen_ratio} of {C} components allows no component "
                             f"to freeze; use at least {1 / C:.4g}")
        stop_at = None if config.stop_ratio is None else min(fraction_count(config.stop_ratio, C), self._max_frozen)
        tracked = [p for c in self.components for p in c.params]
        self.device = dev = local(tracked[0]).device
        self.frozen_aware = isinstance(self.optimizer, FreezableOptimizer)
        reduces = self.frozen_aware and self.optimizer.reduces_stats  # (a sharding optimizer sums them itself)
        if reduces and process_group is not None and stats_source is None:
            raise ValueError(f"{type(self.optimizer).__name__} already all-reduces its statistics over its "
                             "data-parallel group; leave process_group=None (reducing them again would "
                             "multiply them by the group size)")
        self.process_group = dtensor_group(tracked) if process_group is None and not reduces else process_group
        self._link = (OptimizerLink(self.optimizer, self.components, dev, require_all=stats_source is None)
                      if self.frozen_aware else None)
        #: the statistics table the rule reads (see :mod:`grades.policy.sources`)
        self._input = (CustomSource(stats_source, self.components, dev) if stats_source is not None
                       else self._link if self._link is not None else GradListSource(self.components, dev))
        self.source = stats_source if stats_source is not None else self._input
        tau = self._per_component(config.rel_tau if config.auto else config.tau,
                                  DEFAULT_REL_TAU if config.auto else None)
        self.state = DecisionState(tau, dev)
        self._numel = torch.tensor([max(1, c.numel) for c in self.components], dtype=torch.float64, device=dev)
        self.rule_kind = select_rule(rule, dev)
        self._host_rule = self.rule_kind == "native"
        self._rule: Any = None  # built at the first step (the extension may have to be compiled)
        self._rule_generation = 0  # the optimizer link's row map the rule was built for
        self.step_count = 0
        self.last_stats_step = 0
        self._last_stats: Optional[np.ndarray] = None
        self._freezer = Freezer(self.components, self._link, stop_at)
        self._history = History(C, config.history_max)
        self._history.setup(config.history_every)
        self._copies = HostCopies(C, dev)
        self._warned_no_grad = self._warned_no_new_step = False
        self._no_grad_watch = NoGradientWatch(self.components, self.optimizer)
        _attach_engines(self, model)  # a DDP wrapper or a compiled model: freezes go through FreezeWaves

    # ------------------------------------------------------------------ views

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

    @property
    def autograd_gate(self) -> Any:
        """The :class:`~grades.integrations.waves.FreezeWaves` that flips ``requires_grad`` for this
        policy (DDP, torch.compile), or ``None``: GradES flips it as soon as it learns of a freeze."""
        return self._freezer.gate

    @autograd_gate.setter
    def autograd_gate(self, gate: Any) -> None:
        self._freezer.gate = gate

    @property
    def host_frozen(self) -> np.ndarray:
        """bool ``[C]``: the components the host knows to be frozen (read-only view)."""
        out = self._freezer.frozen.view()
        out.flags.writeable = False
        return out

    @property
    def frozen(self) -> torch.Tensor:
        """The device frozen mask, bool ``[C]`` (decided; the host may not know of it yet)."""
        return self.state.frozen

    @property
    def last_stats(self) -> Optional[np.ndarray]:
        """The latest statistic the host knows of, float64 ``[C]`` (``None`` before the first)."""
        if self._host_rule and self.last_stats_step > 0:
            return self.state.views["last_stat"].copy()  # the native rule keeps it current
        return self._last_stats

    @property
    def num_components(self) -> int:
        return len(self.components)

    @property
    def should_stop(self) -> bool:
        """Whether ``stop_ratio`` of the components are frozen (as far as the host knows)."""
        return self._freezer.should_stop

    @property
    def stopped_at(self) -> Optional[int]:
        return self._freezer.stopped_at

    @property
    def freeze_events(self) -> list[dict]:
        """``{"component", "type", "step", "learned_at"}`` per freeze the host learned of."""
        return self._freezer.events

    @property
    def frozen_fraction(self) -> float:
        """Fraction of components the host knows to be frozen."""
        f = self._freezer.frozen
        return float(f.mean()) if len(f) else 0.0

    @property
    def frozen_components(self) -> list[str]:
        """Names of the components the host knows to be frozen."""
        return [c.name for c, f in zip(self.components, self._freezer.frozen) if f]

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

        Raises:
            TypeError, ValueError: a bad argument (then no step is counted).
        """
        if clip_coef is not None or total_norm is not None or max_norm is not None:
            clip_coef = self._clip_factor(clip_coef, total_norm, max_norm)
        link = self._link
        if link is not None:
            calls = link.new_step()
            if calls is None:
                self._warn_no_new_step()  # e.g. called once per micro-batch: nothing new to count
                return
            if link.generation != self._rule_generation:  # parameter groups were added: a new table
                self._rule = None
        rule = self._rule
        if rule is None:
            rule = self._rule = self._build_rule()
        if self._host_rule:  # the native rule writes no autograd-tracked tensor: no no_grad() needed
            self._step(rule, clip_coef)
        else:
            with torch.no_grad():
                self._step(rule, clip_coef)
        if link is not None:
            link.calls = calls
        if not self._no_grad_watch.done:
            self._no_grad_watch.observe(self.last_stats, self.last_stats_step)
        if self.autograd_gate is not None:
            self.autograd_gate.after_step(self)

    def _clip_factor(self, clip_coef: Any, total_norm: Any, max_norm: Any) -> Union[None, float, torch.Tensor]:
        """The clip factor from :meth:`step`'s arguments, checked (before anything changes: a
        rejected call counts no step), as the rule takes it."""
        if clip_coef is not None and type(clip_coef) is not float:
            check_coefficient(clip_coef, "clip_coef")
        if total_norm is not None or max_norm is not None:
            if clip_coef is not None:
                raise ValueError("give clip_coef or total_norm and max_norm, not both")
            if total_norm is None or max_norm is None or not is_real(max_norm) or not max_norm > 0:
                raise ValueError(f"total_norm and max_norm go together, with max_norm > 0; got "
                                 f"total_norm={total_norm!r}, max_norm={max_norm!r}")
            if type(total_norm) is not float:
                check_coefficient(total_norm, "total_norm")
            clip_coef = clip_coefficient(total_norm, float(max_norm))
        if type(clip_coef) is float:
            return clip_coef
        return self._host_clip(clip_coef)

    def _host_clip(self, clip: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
        """A clip factor as the rule takes it: a float where it is a number or a host value (or
        the rule is native), the full value of a DTensor."""
        if clip is None:
            return None
        if not isinstance(clip, torch.Tensor):
            return float(clip)  # a NumPy scalar and the like
        if is_dtensor(clip):
            clip = clip.full_tensor()
        return float(clip) if self._host_rule or clip.device.type == "cpu" else clip

    def _build_rule(self) -> Any:
        src = self._input
        self._identity = is_identity(src.idx, src.num_rows)  # the table holds the sums: no gather
        if self.process_group is not None:  # the rule sees component totals, after the all-reduce
            idx, n = torch.arange(len(self.components), device=self.device)[:, None], len(self.components)
        else:
            idx, n = src.idx, src.num_rows
        rule = make_rule(self.rule_kind, idx, n, self.config, self._numel, self._max_frozen, self.state)
        self._rule_generation = self._link.generation if self._link is not None else 0
        if self._host_rule:
            self._history.bind(rule, self._history.base * self._history.stride)
        return rule

    def _step(self, rule: Any, clip: Union[None, float, torch.Tensor]) -> None:
        host = self._host_rule
        if not host:
            self.poll()
        src = self._input
        rows, row_part, part, skipped = src.gather(self.state.frozen)  # may raise: no step counted
        if src.all_missing:
            self._warn_no_grad()
        if self.process_group is not None:
            rows, part = component_sums(rows, row_part, part, clip, src.idx, self._identity)
            rows, part = all_reduce_partials(rows, part, self.process_group)
            row_part = clip = None
        t = self.step_count + 1
        flags = rule.step(rows, row_part, part, clip, skipped, t, self.grace)
        self.step_count = t
        if flags & FROZE and self._link is not None:
            self._link.freeze_(self.state.new_frozen)  # the optimizer skips them from its next step
        if host:
            self.last_stats_step = t
            if flags:
                self._host_followup(t, flags)
        else:
            if not self._copies.publish(t, self.state):
                self.poll()
                self._copies.publish(t, self.state)
            self.poll()
        if t == self.grace and self.config.auto:
            self._check_grace_readings()

    def _host_followup(self, t: int, flags: int) -> None:
        """After a native step that froze something or filled the history buffers."""
        v = self.state.views
        if flags & FROZE:
            # the native rule has recorded this step's sample already
            self._learn(t, v["last_stat"].copy(), v["frozen"], v["freeze_step"], record=False)
        if flags & HISTORY_FULL:
            if self._history.n > self.config.history_max:
                self._history.thin(e["learned_at"] for e in self._freezer.events)
            else:
                self._history.grow()

    def _check_grace_readings(self) -> None:
        missing = self.state.ref_w <= 0
        if self.device.type == "cpu":
            self._warn_no_reading(missing.numpy())
        else:
            self._copies.probe(missing)  # looked at in poll()

    def _warn_no_reading(self, missing: np.ndarray) -> None:
        """At the end of the grace period (automatic mode): warn about components that had no
        valid reading in it (``missing``, bool ``[C]``): they have no threshold and never freeze."""
        if not missing.any():
            return
        names = [c.name for c, m in zip(self.components, missing.tolist()) if m]
        warnings.warn(f"GradES: the grace period ended (step {self.grace}) without a valid reading for {len(names)} "
                      f"of {len(self.components)} component(s) ({name_list(names)}) in the last quarter of it: no "
                      "gradient reached them, or only non-finite ones, so their automatic threshold could not be "
                      "measured and they will never freeze; check that they are trained, or lengthen the grace period",
                      RuntimeWarning, stacklevel=5)

    def _warn_no_grad(self) -> None:
        if not self._warned_no_grad and not self._freezer.count:
            self._warned_no_grad = True
            warnings.warn("GradES.step(): none of the tracked parameters has a gradient, so this step does not "
                          "count; call gs.step() after optimizer.step() and before optimizer.zero_grad()",
                          RuntimeWarning, stacklevel=4)

    def _warn_no_new_step(self) -> None:
        if not self._warned_no_new_step:
            self._warned_no_new_step = True
            warnings.warn("GradES.step(): the FrozenAwareAdamW has not stepped since the last call, so there are "
                          "no new statistics; this call (and any like it) is ignored. Call gs.step() once per "
                          "optimizer step, after optimizer.step() (not once per micro-batch)",
                          RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the host learns

    def poll(self) -> None:
        """Take in any device decisions whose host copy has arrived (never waits)."""
        for t, stat, frozen, fstep in self._copies.landed():
            self._learn(t, stat, frozen, fstep)
        missing = self._copies.probe_landed()
        if missing is not None:
            self._warn_no_reading(missing)

    def wait(self) -> None:
        """Wait for the outstanding decision copies and take them in (a host sync; for the end of
        training, checkpoints and tests)."""
        self._copies.synchronize()
        self.poll()

    def _learn(self, t: int, stat: np.ndarray, frozen: np.ndarray, fstep: np.ndarray, record: bool = True) -> None:
        """Take in the decision state of step ``t``: new freezes, the history sample (unless
        ``record=False``) and ``should_stop``."""
        self._last_stats = stat
        self.last_stats_step = t
        new = self._freezer.learn(t, frozen, fstep)
        if record:
            self._history.record(t, self._freezer.count, stat, (e["learned_at"] for e in self._freezer.events),
                                 force=bool(new))

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
        if not is_integer(step) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.wait()
        if self.config.auto and step >= self.grace:
            self.grace = step + self.grace
        self.step_count = int(step)

    # ------------------------------------------------------------------ reporting

    @property
    def history(self) -> list[dict]:
        """The sampled history: ``{"step", "frozen" (count), "stat" (list of C floats)}`` per
        sample, oldest first (a new list on every access)."""
        return self._history.as_list()

    def type_means(self) -> dict[str, float]:
        """Mean statistic per component type over the non-frozen components (latest host copy)."""
        stats = self.last_stats
        if stats is None:
            return {}
        out: dict[str, list[float]] = {}
        for c, v, f in zip(self.components, stats, self._freezer.frozen):
            if not f:
                out.setdefault(c.type, []).append(float(v))
        return {k: float(np.mean(v)) for k, v in out.items()}

    def thresholds(self) -> list[float]:
        """Per-component thresholds (in auto mode: final once the grace period is over; a host sync)."""
        return self.state.thresh.detach().cpu().tolist()

    def summary(self) -> dict:
        """Step, frozen count and fraction, and the stop flag, as plain values."""
        return {"step": self.step_count, "frozen": self._freezer.count,
                "num_components": len(self.components), "frozen_fraction": self.frozen_fraction,
                "should_stop": self.should_stop, "stopped_at": self.stopped_at}

    def history_dict(self) -> dict:
        """Configuration, components, freezes and sampled statistics (what :meth:`save_history` writes)."""
        fs = self._freezer.freeze_step
        return {"config": self.config.to_dict(), "grace_steps": self.grace,
                "components": [c.as_dict() for c in self.components],
                "freeze_steps": {c.name: int(s) for c, s in zip(self.components, fs) if s >= 0},
                "freeze_events": list(self.freeze_events), "samples": list(self.history), **self.summary()}

    def save_history(self, path: Union[str, os.PathLike]) -> None:
        """Write the configuration, components, freeze events and sampled statistics as JSON."""
        d = os.path.dirname(os.fspath(path))
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.history_dict(), f, indent=1)


__all__ = ["GradES"]


def _attach_engines(gs: GradES, model: nn.Module) -> None:
    from ..integrations.waves import attach_engines  # lazy: integrations import the policy
    attach_engines(gs, model)
