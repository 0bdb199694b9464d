"""The GradES decision rule, in one signature for every implementation.

Per step, for each component: sum its rows of the statistics table, divide out the clip factor,
turn the sums into the chosen statistic, update the EMA (and in automatic mode, in the last part
of the grace period, the component's level: the lowest statistic seen there), then on check
steps count consecutive checks below the threshold: a component qualifies after ``patience`` of
them, and the qualifying ones freeze once enough qualify or are frozen (the quorum), earliest
components first up to the cap.

Two implementations decide bitwise alike (the same float64 operations in the same order):

* ``"torch"`` (:class:`TorchRule`): a dozen small tensor ops on the state's device, no host sync
  (the GPU path);
* ``"native"``: ``HostPolicy`` of the CPU extension (``csrc/cpu/policy.cpp``), one call per step
  on host-memory state; it also records history samples itself.

Both are called as ``rule.step(rows, row_part, participated, clip, skipped, t, grace)`` and return
an ``int``: :data:`FROZE` set when ``state.new_frozen`` may name newly frozen components (the
native rule: exactly when some froze; the torch rule: on every check step, as it cannot look
without a host sync), :data:`HISTORY_FULL` set when the native rule filled its history buffers.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

from .clip import unclip
from .config import LEVEL_WINDOW_DIV, STATISTICS, GradESConfig, fraction_count
from .state import DecisionState

#: bits of a rule step's result
HISTORY_FULL = 1
FROZE = 2

RULES = ("native", "torch")


def native_available() -> tuple[bool, str]:
    """Whether the CPU extension with the native rule can be loaded (and why not)."""
    if os.environ.get("GRADES_BACKEND") == "reference":
        return False, "GRADES_BACKEND=reference asks for the reference implementations only"
    from .. import _build
    mod, why = _build.load("cpu")
    if mod is None or not hasattr(mod, "HostPolicy"):
        return False, why or "the CPU extension has no HostPolicy"
    return True, ""


def select_rule(requested: Optional[str], device: torch.device) -> str:
    """The rule implementation for state on ``device``: ``requested`` when given (``"native"``
    only for host-memory state), else ``"native"`` on the CPU when the extension loads and
    ``"torch"`` otherwise.

    Raises:
        ValueError: an unknown name, ``"native"`` for device state.
        RuntimeError: ``"native"`` requested but the CPU extension is not available.
    """
    if requested is not None:
        if requested not in RULES:
            raise ValueError(f"rule must be one of {RULES} or None (automatic), got {requested!r}")
        if requested == "native":
            if device.type != "cpu":
                raise ValueError(f"the native rule decides on host-memory state; the tracked parameters are on "
                                 f"{device}: use rule='torch' or None")
            ok, why = native_available()
            if not ok:
                raise RuntimeError(f"rule='native' but the CPU extension is not available: {why}")
        return requested
    return "native" if device.type == "cpu" and native_available()[0] else "torch"


def make_rule(kind: str, idx: torch.Tensor, num_rows: int, config: GradESConfig, numel: torch.Tensor,
              max_frozen: int, state: DecisionState) -> Any:
    """Build rule ``kind`` over the statistics table ``[num_rows, 3]`` whose rows of each
    component ``idx`` (int64 ``[C, K]``, padded with ``num_rows``) names, on ``state``."""
    quorum = fraction_count(config.freeze_quorum, idx.shape[0])  # components that must qualify or be frozen
    args = dict(idx=idx.contiguous(), num_rows=num_rows, statistic=STATISTICS.index(config.statistic), numel=numel,
                ema=float(config.ema or 0.0), level_div=LEVEL_WINDOW_DIV, auto_mode=config.auto,
                check_interval=int(config.check_interval), patience=max(1, config.patience),
                max_frozen=int(max_frozen), quorum=int(quorum))
    if kind == "torch":
        return TorchRule(**args, state=state)
    from .. import _build
    mod, _ = _build.load("cpu")
    s = state
    return mod.HostPolicy(**args, frozen=s.frozen, counter=s.counter, ema_v=s.ema, ema_w=s.ema_w, ref=s.ref,
                          ref_w=s.ref_w, thresh=s.thresh, freeze_step=s.freeze_step, last_stat=s.last_stat,
                          invalid_steps=s.invalid_steps, new_frozen=s.new_frozen)


def level_window_start(grace: int, level_div: int) -> int:
    """The last step before the window of the grace period ``1..grace`` in which the automatic
    mode measures each component's level: its last ``grace // level_div`` steps, at least one."""
    return grace - max(1, grace // level_div)


def is_identity(idx: torch.Tensor, num_rows: int) -> bool:
    """Whether the row map ``idx`` ``[C, K]`` names row ``i`` for component ``i`` and nothing else
    (then the table already holds the component sums). A host sync where ``idx`` is on a device."""
    C = idx.shape[0]
    return idx.shape[1] == 1 and num_rows == C and torch.equal(idx[:, 0].cpu(), torch.arange(C))


def component_sums(rows: torch.Tensor, row_part: Optional[torch.Tensor], participated: Optional[torch.Tensor],
                   clip: Union[None, float, torch.Tensor], idx: torch.Tensor, identity: bool = False
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-component statistics ``[C, 3]`` from the table ``rows`` ``[N, 3]``: the rows each row
    of ``idx`` ``[C, K]`` names (pad ``N`` reads a zero row), added in the order ``k = 0, 1, ...``
    on every device, then unclipped. Also which components took part (all their rows in
    ``row_part`` bool ``[N]``, and ``participated`` bool ``[C]``; ``None``: all). ``identity``:
    :func:`is_identity` holds for ``idx`` (no gather needed)."""
    if identity:
        out, part = rows, row_part
    else:
        ext = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        out = ext.index_select(0, idx[:, 0])
        for j in range(1, idx.shape[1]):
            out = out + ext.index_select(0, idx[:, j])
        part = (None if row_part is None else
                torch.cat([row_part.to(idx.device), row_part.new_ones(1, device=idx.device)])[idx].all(dim=1))
    if part is not None:
        participated = part if participated is None else participated & part
    return unclip(out, clip), participated


class TorchRule:
    """The decision rule as tensor ops on the state's device (never waits for it); arguments as
    for the native ``HostPolicy``."""

    def __init__(self, idx: torch.Tensor, num_rows: int, statistic: int, numel: torch.Tensor, ema: float,
                 level_div: int, auto_mode: bool, check_interval: int, patience: int, max_frozen: int,
                 quorum: int, state: DecisionState):
        self.idx, self.num_rows, self.statistic, self.numel = idx, num_rows, STATISTICS[statistic], numel
        self.ema, self.level_div, self.auto = ema, level_div, auto_mode
        self.check_interval, self.patience, self.max_frozen, self.s = check_interval, patience, max_frozen, state
        self.quorum = quorum
        self._identity = is_identity(idx, num_rows)

    def _value(self, stats: torch.Tensor) -> torch.Tensor:
        kind = self.statistic
        if kind == "l1":
            return stats[:, 1]
        if kind == "l2":
            return stats[:, 0].sqrt()
        if kind == "mean_abs":
            return stats[:, 1] / self.numel
        return (stats[:, 0] / self.numel).sqrt()

    def step(self, rows: torch.Tensor, row_part: Optional[torch.Tensor], participated: Optional[torch.Tensor],
             clip: Union[None, float, torch.Tensor], skipped: Optional[torch.Tensor], t: int, grace: int) -> int:
        """One optimizer step ``t`` (1-based) with grace period ``grace``; see the module docstring."""
        s = self.s
        stats, took = component_sums(rows, row_part, participated, clip, self.idx, self._identity)
        live = ~s.frozen
        # a valid reading: no non-finite gradient value and no overflowed sum (a finite gradient
        # beyond ~1e19 gives an infinite float32 sum of squares)
        valid = (stats[:, 2].sum() == 0) & torch.isfinite(stats[:, :2]).all()
        if skipped is not None:
            valid = valid & ~skipped.to(valid.device)
        ok = valid if took is None else valid & (took | s.frozen)  # a frozen component reads zero
        val = torch.where(live, self._value(stats), torch.zeros((), dtype=torch.float64, device=live.device))
        val = torch.where(torch.isnan(val), torch.inf, val)
        if self.ema:
            d = self.ema
            s.ema.copy_(torch.where(ok, d * s.ema + (1 - d) * val, s.ema))
            s.ema_w.copy_(torch.where(ok, d * s.ema_w + (1 - d), s.ema_w))
            cur = s.ema / s.ema_w.clamp_min(1e-300)
        else:
            cur = val
        s.last_stat.copy_(torch.where(ok, cur, s.last_stat))
        s.invalid_steps.add_((~valid).to(torch.int64))
        if t <= grace:
            if self.auto and t > level_window_start(grace, self.level_div):
                self._track_level(ok, cur, t == grace)
            return 0
        if (t - grace) % self.check_interval != 0:
            return 0
        self._decide(t, ok, live, cur)
        return FROZE

    def _track_level(self, ok: torch.Tensor, cur: torch.Tensor, last: bool) -> None:
        s = self.s
        s.ref.copy_(torch.where(ok, torch.where(s.ref_w > 0, torch.minimum(s.ref, cur), cur), s.ref))
        s.ref_w.add_(ok.to(s.ref_w.dtype))
        if last:
            # thresholds become fixed at the end of the grace period; a component without a
            # valid reading in the level window gets a negative one (it cannot freeze)
            s.thresh.mul_(torch.where(s.ref_w > 0, s.ref, torch.full_like(s.ref, -1.0)))

    def _decide(self, t: int, ok: torch.Tensor, live: torch.Tensor, cur: torch.Tensor) -> None:
        s = self.s
        below = (cur < s.thresh) & live
        s.counter.copy_(torch.where(ok, torch.where(below, s.counter + 1, 0), s.counter))
        cand = (s.counter >= self.patience) & live & ok
        if self.quorum > 1:  # (one qualifying component meets a quorum of one by itself)
            cand = cand & (s.frozen.sum() + cand.sum() >= self.quorum)
        if self.max_frozen < len(live):
            # the earliest components in order win when more qualify than the cap allows
            room = self.max_frozen - s.frozen.sum()
            cand = cand & (torch.cumsum(cand.to(torch.int64), 0) <= room)
        s.frozen |= cand
        s.freeze_step.copy_(torch.where(cand, t, s.freeze_step))
        s.new_frozen.copy_(cand)


__all__ = ["FROZE", "HISTORY_FULL", "RULES", "TorchRule", "component_sums", "is_identity", "level_window_start",
           "make_rule", "native_available", "select_rule"]
