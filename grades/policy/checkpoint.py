"""GradES's ``state_dict`` and transactional ``load_state_dict``: a saved state is checked whole
before anything changes, and a load that fails midway leaves the policy as it was."""
from __future__ import annotations

import warnings
from typing import Any, Mapping


from .freezing import name_list
from .state import check_saved

#: config fields that shape the decisions a saved state carries on (thresholds, EMA levels,
#: counters): loading a state saved under other values is worth a warning
DECISION_FIELDS = ("statistic", "tau", "rel_tau", "ema", "patience", "check_interval", "max_frozen_ratio",
                   "freeze_quorum", "stop_ratio")


class Checkpointing:
    """:meth:`state_dict` and :meth:`load_state_dict` of :class:`~grades.GradES` (a mixin over its
    ``state``, ``_freezer``, ``_history`` and optimizer link)."""

    def state_dict(self) -> dict:
        """Everything needed to continue identically: step, grace period, frozen set, counters,
        thresholds, EMA and levels, freeze steps and history (plain Python values;
        JSON-safe). A host sync."""
        self.wait()
        return {"version": 3, "component_names": [c.name for c in self.components],
                "step": self.step_count, "grace": self.grace, **self.state.to_lists(),
                "should_stop": self.should_stop, "stopped_at": self.stopped_at,
                "history": list(self.history), "freeze_events": list(self.freeze_events),
                "hist_stride": self._history.stride, "config": self.config.to_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output exactly: re-freezes the saved components (device
        mask, ``requires_grad`` and optimizer), and gives the components *not* frozen in the saved
        state back the ``requires_grad`` their parameters had before GradES froze them (loading an
        earlier state after later freezes, in the same process). So training continues as if
        never interrupted. (States of versions 1 and 2 load too: version 1 had one EMA/level
        weight for all components, and both kept the grace-period level as a running mean, which
        a state saved during the grace period carries on as the lowest level seen so far.)

        Everything is checked before anything changes: a state that does not fit raises
        ``ValueError`` naming the field (``TypeError`` for a non-mapping) and leaves this policy
        as it was. A :class:`~grades.FrozenAwareAdamW` cannot unfreeze a parameter by itself:
        when its mask still freezes a component the loaded state has not frozen, a
        ``RuntimeWarning`` says so; load the optimizer state dict saved with this state (its
        ``["grades"]["frozen"]`` mask replaces the optimizer's), as the Trainer does on resume.
        """
        v = check_saved(sd, [c.name for c in self.components], self.grace)
        self._warn_config_change(sd.get("config"))
        self.wait()
        snap = self._snapshot()
        try:
            self._apply_state(v)
        except BaseException:
            self._restore(snap)
            raise
        if self._link is not None:
            self._warn_optimizer_mask()

    def _warn_config_change(self, saved: Any) -> None:
        if not isinstance(saved, Mapping):
            return  # a state written before configs were saved with it
        now = self.config.to_dict()
        diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in DECISION_FIELDS if k in saved and saved[k] != now[k]]
        if diff:
            warnings.warn("GradES.load_state_dict: the state was saved under another configuration ("
                          + "; ".join(diff) + "); its thresholds, EMA levels and counters continue as saved",
                          RuntimeWarning, stacklevel=3)

    def _snapshot(self) -> dict:
        return {"tensors": [t.clone() for t in self.state.tensors()],
                "host": (self.step_count, self.grace, self._last_stats, self.last_stats_step, self._history.stride),
                "history": self._history.as_list(), "freezer": self._freezer.snapshot()}

    def _restore(self, snap: dict) -> None:
        for t, saved in zip(self.state.tensors(), snap["tensors"]):
            t.copy_(saved)
        self.step_count, self.grace, self._last_stats, self.last_stats_step, stride = snap["host"]
        self._freezer.restore(snap["freezer"])
        self._history.set_stride(stride)
        self._history.load(snap["history"])

    def _apply_state(self, v: dict) -> None:
        self.state.load(v)
        self.step_count = v["step"]
        self.grace = v["grace"]
        # components not frozen in the loaded state: their parameters' requires_grad as it was
        # before GradES (this instance or an earlier one on the same model) froze them
        self._freezer.unfreeze_params(v["frozen"])
        self._freezer.reset()
        if self._link is not None:
            self._link.host_mask[:] = False
            self._link.freeze_(self.state.frozen)
        s = self.state
        host = [x.detach().cpu().numpy() for x in (s.last_stat, s.frozen, s.freeze_step)]
        self._learn(self.step_count, host[0].copy(), host[1].copy(), host[2].copy())
        self._history.set_stride(v["hist_stride"])
        self._history.load(v["history"])
        self._freezer.load(v)

    def _warn_optimizer_mask(self) -> None:
        """Warn when the optimizer's mask freezes parameters of components that are not frozen
        here (it has no way to unfreeze them but loading its own state dict)."""
        stuck = self._link.stuck(self._freezer.frozen)
        if stuck:
            warnings.warn(f"GradES.load_state_dict: the FrozenAwareAdamW still freezes {len(stuck)} component(s) "
                          f"that the loaded GradES state has not frozen ({name_list(stuck)}); GradES cannot unset "
                          "an optimizer's frozen mask, so these matrices are not updated. Load the optimizer state "
                          "dict saved together with this GradES state (its ['grades']['frozen'] mask replaces the "
                          "optimizer's), before or after this call", RuntimeWarning, stacklevel=3)


__all__ = ["Checkpointing", "DECISION_FIELDS"]
