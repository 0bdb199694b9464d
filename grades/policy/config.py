"""Settings of the GradES policy: :class:`GradESConfig`, validated when constructed."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

from .._checks import check_number

STATISTICS = ("l1", "l2", "mean_abs", "rms")

#: Default relative threshold of the automatic mode: a component freezes once its statistic has
#: fallen below this fraction of its own level at the end of the grace period.
DEFAULT_REL_TAU = 0.4

#: Default grace period, as a fraction of the planned steps.
DEFAULT_ALPHA = 0.35

#: The automatic mode's level of a component is the lowest value its (EMA) statistic takes in the
#: last ``1 / LEVEL_WINDOW_DIV`` of the grace period (at least one step). The lowest, not the
#: latest: a grace period that ends on a transient (a loss spike, a burst of learning) would
#: otherwise set the threshold from the transient and freeze a model that is still learning.
LEVEL_WINDOW_DIV = 4

#: Default EMA decay of the statistic (about the last ten steps count) and default patience
#: (consecutive checks below the threshold). A single step's statistic is noisy; these keep noise
#: from freezing a matrix while a real drop is still caught within about twenty steps. These,
#: DEFAULT_REL_TAU and DEFAULT_ALPHA are measured in bench/grades_defaults.py.
DEFAULT_EMA = 0.9
DEFAULT_PATIENCE = 10

TauLike = Union[float, Mapping[str, float], None]


def fraction_count(ratio: float, C: int) -> int:
    """The fewest of ``C`` components that make up ``ratio`` of them: ``ceil(ratio * C)``, with
    the float error of the product forgiven (``0.3 * 10`` counts as 3, not 4)."""
    return math.ceil(ratio * C - 1e-9)


def _check_tau(name: str, v: TauLike, upper: float = math.inf) -> TauLike:
    """``v`` (a number or a ``{component type: number}`` mapping, each in ``(0, upper]``) as
    plain floats; ``TypeError``/``ValueError`` naming the entry otherwise."""
    if v is None:
        return None
    if not isinstance(v, Mapping):
        return check_number(v, name, lo=0.0, lo_open=True, hi=upper)
    if not v:
        raise ValueError(f"{name} is an empty mapping; give at least one component type")
    for k in v:
        if not isinstance(k, str):
            raise TypeError(f"{name} keys must be component type names (str), got {k!r}")
    return {k: check_number(x, f"{name}[{k!r}]", lo=0.0, lo_open=True, hi=upper) for k, x in v.items()}


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
            statistic level at the end of the grace period (the lowest value of its statistic,
            after the EMA, in the last quarter of the grace period: see
            :data:`LEVEL_WINDOW_DIV`; recorded on the device); a number or a per-type mapping, in
            ``(0, 1]``. A component without a single valid reading in that window (no gradient,
            or only steps with non-finite gradients or statistics) has no level to measure: it
            gets no threshold and never freezes (so ``stop_ratio=1`` is never reached); GradES
            warns, naming such components, when the grace period ends.
        statistic: ``"l1"`` (sum of |g|, the paper's), ``"l2"`` (sqrt of sum g^2), ``"mean_abs"``
            (l1 / numel) or ``"rms"`` (sqrt(sum g^2 / numel)).
        ema: decay in ``[0, 1)`` of an exponential moving average (bias-corrected, per step) applied
            to the statistic before thresholding; ``None`` or ``0`` uses each step's raw value
            (the paper's rule). Default :data:`DEFAULT_EMA`.
        alpha: grace period as a fraction of ``total_steps``, in ``[0, 1)`` (``alpha > 0`` gives at
            least one grace step, however short the run). Default :data:`DEFAULT_ALPHA`.
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
        freeze_quorum: in ``[0, 1]``: a component that qualifies (``patience`` checks below tau)
            freezes only at a check where at least ``ceil(freeze_quorum * C)`` components qualify
            or are frozen, so that ``1.0`` freezes them all together, at the first check where
            every one qualifies: the run is then full training cut short, step for step (freezing
            one matrix changes how the others train, so under ``0`` the last ones can qualify
            sooner than they would have in full training), at the cost of the weight-gradient
            work that earlier freezes save. Default ``0``: each freezes on its own (the paper's).
        stop_ratio: ``should_stop`` turns true once ``ceil(stop_ratio * C)`` components are frozen,
            or as many as ``max_frozen_ratio`` allows if that is fewer (``None``: never).
        history_every: record the statistics into the history every this many steps.
        history_max: keep at most this many history samples (older ones are thinned).
    """

    tau: TauLike = None
    rel_tau: TauLike = None
    statistic: str = "l1"
    ema: Optional[float] = DEFAULT_EMA
    alpha: float = DEFAULT_ALPHA
    grace_steps: Optional[int] = None
    total_steps: Optional[int] = None
    patience: int = DEFAULT_PATIENCE
    check_interval: int = 1
    max_frozen_ratio: float = 1.0
    freeze_quorum: float = 0.0
    stop_ratio: Optional[float] = 1.0
    history_every: int = 1
    history_max: int = 2000

    def __post_init__(self) -> None:
        # checked, and plain Python numbers from here on (NumPy scalars from a sweep grid would
        # break the JSON of checkpoints and histories)
        if self.tau is not None and self.rel_tau is not None:
            raise ValueError("give either tau (absolute threshold) or rel_tau (automatic mode), not both")
        self.tau = _check_tau("tau", self.tau)
        self.rel_tau = _check_tau("rel_tau", self.rel_tau, upper=1.0)
        if not isinstance(self.statistic, str) or self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}")
        self.ema = check_number(self.ema, "ema", lo=0.0, hi=1.0, hi_open=True, none=True)
        # alpha: the fraction of total_steps spent in the grace period
        self.alpha = check_number(self.alpha, "alpha", lo=0.0, hi=1.0, hi_open=True)
        self.grace_steps = check_number(self.grace_steps, "grace_steps", lo=0, integer=True, none=True)
        self.total_steps = check_number(self.total_steps, "total_steps", lo=1, integer=True, none=True)
        if self.grace_steps is not None and self.total_steps is not None and self.grace_steps >= self.total_steps:
            raise ValueError(f"grace_steps={self.grace_steps} leaves no step to decide in a run of "
                             f"total_steps={self.total_steps}; use fewer grace steps")
        self.patience = check_number(self.patience, "patience", lo=0, integer=True)
        for name in ("check_interval", "history_every", "history_max"):
            setattr(self, name, check_number(getattr(self, name), name, lo=1, integer=True))
        self.max_frozen_ratio = check_number(self.max_frozen_ratio, "max_frozen_ratio", lo=0.0, lo_open=True, hi=1.0)
        self.freeze_quorum = check_number(self.freeze_quorum, "freeze_quorum", lo=0.0, hi=1.0)
        self.stop_ratio = check_number(self.stop_ratio, "stop_ratio", lo=0.0, lo_open=True, hi=1.0, none=True)
        if self.stop_ratio is not None and self.stop_ratio > self.max_frozen_ratio:
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
        return max(1, int(self.alpha * total))  # alpha > 0 means a grace period, even in a short run

    def to_dict(self) -> dict:
        """The settings as plain Python values (JSON-safe)."""
        d = asdict(self)
        for k in ("tau", "rel_tau"):
            if isinstance(d[k], Mapping):
                d[k] = dict(d[k])
        return d



__all__ = ["GradESConfig", "STATISTICS", "fraction_count", "DEFAULT_ALPHA", "DEFAULT_REL_TAU", "DEFAULT_EMA", "DEFAULT_PATIENCE",
           "LEVEL_WINDOW_DIV", "TauLike"]
