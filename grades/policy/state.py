"""The decision state of the GradES rule: per-component tensors the rule updates in place, and
the checks a saved state passes before any of it is loaded."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from .._checks import is_integer, is_real

#: per-component fields of a saved state: (NumPy kinds accepted, dtype stored)
FIELDS = {"frozen": ("bi", bool), "counter": ("iu", np.int64), "ema": ("biuf", np.float64),
          "ema_w": ("biuf", np.float64), "ref": ("biuf", np.float64), "ref_w": ("biuf", np.float64),
          "thresh": ("biuf", np.float64), "freeze_step": ("iu", np.int64), "last_stat": ("biuf", np.float64)}


class DecisionState:
    """What the decision rule remembers, one entry per component ``C``, on the policy's device.

    Attributes:
        frozen: bool ``[C]``.  counter: int64 ``[C]``, consecutive checks below threshold.
        ema, ema_w: float64 ``[C]``, the running mean of the statistic and its weight
            ``1 - decay^(steps counted)`` (bias correction).
        ref, ref_w: float64 ``[C]``, automatic mode: the level, the lowest statistic seen in the
            level window at the end of the grace period, and how many valid readings it saw.
        thresh: float64 ``[C]``, thresholds (in automatic mode the relative ones until the grace
            period ends).  freeze_step: int64 ``[C]``, step each froze at (-1: not frozen).
        last_stat: float64 ``[C]``, the latest statistic counted.
        invalid_steps: int64 0-dim, steps whose statistics were not finite.
        new_frozen: bool ``[C]``, the components the last rule step froze.
        views: NumPy views of the tensors above when they live in host memory (else empty).
    """

    def __init__(self, thresh: list[float], device: torch.device):
        C = len(thresh)
        f64 = dict(dtype=torch.float64, device=device)
        self.frozen = torch.zeros(C, dtype=torch.bool, device=device)
        self.counter = torch.zeros(C, dtype=torch.int64, device=device)
        self.ema, self.ema_w = torch.zeros(C, **f64), torch.zeros(C, **f64)
        self.ref, self.ref_w = torch.zeros(C, **f64), torch.zeros(C, **f64)
        self.thresh = torch.tensor(thresh, **f64)
        self.freeze_step = torch.full((C,), -1, dtype=torch.int64, device=device)
        self.last_stat = torch.zeros(C, **f64)
        self.invalid_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.new_frozen = torch.zeros(C, dtype=torch.bool, device=device)
        self.views = ({k: getattr(self, k).numpy() for k in (*FIELDS, "new_frozen")}
                      if device.type == "cpu" else {})

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor (what a failed load restores)."""
        return [getattr(self, k) for k in FIELDS] + [self.invalid_steps]

    def to_lists(self) -> dict:
        """The per-component fields as plain Python lists, and ``invalid_steps`` (a host sync)."""
        out = {k: getattr(self, k).detach().cpu().tolist() for k in FIELDS}
        out["invalid_steps"] = int(self.invalid_steps)
        return out

    def load(self, v: Mapping[str, Any]) -> None:
        """Copy checked fields (:func:`check_saved`) into the tensors."""
        for k in FIELDS:
            dst = getattr(self, k)
            dst.copy_(torch.from_numpy(v[k]).to(device=dst.device, dtype=dst.dtype))
        self.invalid_steps.fill_(v["invalid_steps"])


def _integer(k: str, v: Any, low: int, optional: bool = False) -> Optional[int]:
    if v is None and optional:
        return None
    if not is_integer(v) or v < low:
        raise ValueError(f"GradES state field {k!r} must be an integer >= {low}, got {v!r}")
    return int(v)


def _check_fields(sd: Mapping[str, Any], C: int, version: int) -> dict:
    out: dict = {}
    for k, (kinds, dtype) in FIELDS.items():
        v = sd[k]
        if version == 1 and k in ("ema_w", "ref_w") and is_real(v):
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
    return out


def _check_records(sd: Mapping[str, Any], C: int) -> dict:
    out: dict = {}
    for k in ("history", "freeze_events"):
        v = sd.get(k, [])
        if not isinstance(v, (list, tuple)) or not all(isinstance(e, Mapping) for e in v):
            raise ValueError(f"GradES state field {k!r} must be a list of mappings")
        out[k] = [dict(e) for e in v]
    for i, h in enumerate(out["history"]):
        try:
            stat = np.asarray(h["stat"], dtype=np.float64)
            _integer("history step", h["step"], 0)
            _integer("history frozen", h["frozen"], 0)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"GradES state field 'history' sample {i} is not a {{step, frozen, stat}} "
                             f"sample: {e}") from None
        if stat.shape != (C,):
            raise ValueError(f"GradES state field 'history' sample {i} has {stat.size} statistics for "
                             f"{C} components")
    return out


def _level_from_mean(out: dict) -> None:
    """Versions 1-2 kept the level as a running mean with weight ``ref_w`` (unnormalised): carry
    its value on as the lowest statistic seen so far (only a state saved during the grace period
    still uses it)."""
    seen = out["ref_w"] > 0
    out["ref"] = np.where(seen, out["ref"] / np.where(seen, out["ref_w"], 1.0), out["ref"])
    out["ref_w"] = seen.astype(np.float64)


def check_saved(sd: Any, names: list[str], grace: int) -> dict:
    """A saved GradES state, checked and converted (nothing is changed here): the fields of
    :data:`FIELDS` as NumPy arrays ``[C]``, plus ``step``, ``invalid_steps``, ``grace``,
    ``hist_stride``, ``stopped_at``, ``should_stop``, ``history`` and ``freeze_events``.

    Raises:
        TypeError: ``sd`` is not a mapping.
        ValueError: naming the first field that is missing or does not fit ``names``.
    """
    if not isinstance(sd, Mapping):
        raise TypeError(f"a GradES state must be a mapping (GradES.state_dict() output), got {type(sd).__name__}")
    C = len(names)
    saved = sd.get("component_names")
    if not isinstance(saved, (list, tuple)) or list(saved) != names:
        n = len(saved) if isinstance(saved, (list, tuple)) else "no"
        raise ValueError(f"the saved GradES state belongs to different components ({n} saved vs {C} here)")
    version = sd.get("version", 2)
    if version not in (1, 2, 3):
        raise ValueError(f"unknown GradES state version {version!r} (this GradES reads 1 to 3)")
    missing = [k for k in (*FIELDS, "step", "invalid_steps") if k not in sd]
    if missing:
        raise ValueError(f"the saved GradES state lacks {missing}")
    out = _check_fields(sd, C, version)
    if version < 3:
        _level_from_mean(out)
    out["step"] = _integer("step", sd["step"], 0)
    out["invalid_steps"] = _integer("invalid_steps", sd["invalid_steps"], 0)
    out["grace"] = _integer("grace", sd.get("grace", grace), 0)
    out["hist_stride"] = _integer("hist_stride", sd.get("hist_stride", 1), 1)
    out["stopped_at"] = _integer("stopped_at", sd.get("stopped_at"), 0, optional=True)
    stop = sd.get("should_stop", False)
    if not isinstance(stop, (bool, np.bool_)):
        raise ValueError(f"GradES state field 'should_stop' must be a bool, got {stop!r}")
    out["should_stop"] = bool(stop)
    out.update(_check_records(sd, C))
    return out


__all__ = ["DecisionState", "FIELDS", "check_saved"]
