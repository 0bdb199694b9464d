"""Projected accuracy at the planned training FLOPs, with a confidence interval.

The early-stopping question is "will the fully trained model beat what this checkpoint can do
with k samples?". This module answers with an interval, not a point: accuracy (k = 1) against
training FLOPs ``B`` is fitted across checkpoints and evaluated at the planned FLOPs ``B_plan``.

Forms (``x = B / B_plan``; every form is ``lo + (hi - lo) * g(x)`` with ``g(0) = 0``)::

    "paper"  a (1 - exp(-b x)) + c     fitted on the points whose accuracy is >= every earlier one
    "exp"    the same curve, fitted on all points
    "power"  hi - (hi - lo) (1 + x / s) ** (-alpha)

The paper form is the test-time-compute paper's fit: a later checkpoint that measures lower than
an earlier one is treated as noise and dropped before fitting. The form is chosen by the data:
each eligible form is fitted with each point left out in turn and scored on that point (squared
error over its variance); the lowest mean held-out error wins (ties: the order above). A form
needs at least one point more than its parameters (3, or 4 for ``power``).

Noise model. Checkpoint i's accuracy is a mean over P problems of per-problem fractions
``c_j / n_j``: its sampling variance is ``sum_j p_j (1 - p_j) / n_j / P^2`` (binomial noise per
problem; the problems are fixed, the samples are not), estimated without bias by
``c_j (n_j - c_j) / (n_j^2 (n_j - 1))`` (``n_j = 1``: ``y (1 - y)`` per problem). The fit is
weighted least squares with those variances -- the normal approximation of the binomial
likelihood.

Interval: the profile likelihood of the projected value ``v = f(1)``. The nonlinear parameters (b;
s and alpha) run over a fixed log-spaced grid; for each grid point the curve is linear in
``(lo, hi)``, so its profile in ``v`` is an exact parabola, and the overall profile is the lower
envelope of those parabolas. The one-sided bounds at ``confidence`` are where the profile rises by
``phi * z^2`` (``z`` the normal quantile of ``confidence``); ``phi = max(1, chi2_min / dof)``
widens them when the points scatter more than their binomial noise (a misfitting form). The
box ``0 <= lo, hi <= 1`` is not imposed inside the profile, which can only widen the interval;
the bounds are clipped to [0, 1]. A still-rising curve therefore keeps a wide interval (the grid
reaches nearly linear curves), and a flat one a narrow interval, however far ``B_plan`` lies
beyond the data: no range cut-off is needed.

Reported numbers are rounded to 9 decimals, so the ULP-level differences of vectorised ``exp``
and sums between CPUs do not change a decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = ["FORMS", "Projection", "project_accuracy", "project_checkpoints", "accuracy_variance",
           "nondecreasing"]

FORMS = ("paper", "exp", "power")
_N_PARAMS = {"paper": 3, "exp": 3, "power": 4}
_DIGITS = 9


@dataclass
class Projection:
    """Projected accuracy at ``planned_flops`` (all accuracies in [0, 1], FLOPs as floats).

    Attributes:
        form: the form chosen (``"paper"``, ``"exp"`` or ``"power"``); None when none could be fitted.
        planned_flops: where the projection is made.
        point: the best fit's value there (None without a fit).
        lower, upper: one-sided bounds at ``confidence`` (each holds alone with that probability).
        confidence: e.g. 0.95.
        params: the best fit's parameters: ``a``, ``b_per_flop``, ``c`` (paper and exp forms) or
            ``lo``, ``hi``, ``s_flops``, ``alpha`` (power).
        held_out_error: mean held-out error per form (None where a form had too few points).
        n_points: checkpoints given; ``n_used``: those the chosen form fitted (the filter drops some).
        dispersion: ``phi`` (>= 1), the widening for scatter beyond binomial noise.
        reason: why there is no projection ("" when there is one).
    """

    form: str | None
    planned_flops: float
    point: float | None
    lower: float | None
    upper: float | None
    confidence: float
    params: dict[str, float] = field(default_factory=dict)
    held_out_error: dict[str, float | None] = field(default_factory=dict)
    n_points: int = 0
    n_used: int = 0
    dispersion: float = 1.0
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.form is not None

    def to_dict(self) -> dict:
        return {"form": self.form, "planned_flops": self.planned_flops, "point": self.point,
                "lower": self.lower, "upper": self.upper, "confidence": self.confidence,
                "params": dict(self.params), "held_out_error": dict(self.held_out_error),
                "n_points": self.n_points, "n_used": self.n_used, "dispersion": self.dispersion,
                "reason": self.reason}


def accuracy_variance(correct: Sequence[Sequence[bool]]) -> float:
    """Sampling variance of the k = 1 accuracy of one checkpoint (see the module docstring).

    Args:
        correct: ``[P][n_p]`` verdicts.
    Returns:
        The variance, floored at ``(0.5 / N)^2`` with ``N`` the samples in all (an accuracy of
        exactly 0 or 1 is not certain).
    """
    if not correct:
        raise ValueError("no problems")
    terms, fracs, singles, total = [], [], 0, 0
    for row in correct:
        n, c = len(row), int(sum(bool(v) for v in row))
        if n == 0:
            raise ValueError("a problem has no samples")
        total += n
        fracs.append(c / n)
        if n > 1:
            terms.append(c * (n - c) / (n * n * (n - 1)))
        else:  # one sample: no within-problem estimate; the checkpoint's y (1 - y) stands in
            singles += 1
    y = math.fsum(fracs) / len(fracs)
    var = (math.fsum(terms) + singles * y * (1 - y)) / len(correct) ** 2
    return max(var, (0.5 / total) ** 2)


def nondecreasing(y: Sequence[float]) -> np.ndarray:
    """Indices of the points at least as high as every earlier one (the paper's filter)."""
    keep, best = [], -math.inf
    for i, v in enumerate(y):
        if v >= best:
            keep.append(i)
            best = v
    return np.array(keep, dtype=np.int64)


def _grid(form: str, x: np.ndarray) -> list[np.ndarray]:
    """The grid of nonlinear parameters for data at ``x`` (x = B / B_plan)."""
    pos = x[x > 0]
    lo_x = float(pos.min()) if pos.size else 1.0
    hi_x = max(float(x.max()), 1.0)
    if form in ("paper", "exp"):
        # from nearly linear over [0, 1] to saturated before the first positive point
        return [np.geomspace(1e-2 / hi_x, 14.0 / lo_x, 400)]
    s, alpha = np.meshgrid(np.geomspace(lo_x * 1e-2, 1e2, 48), np.geomspace(0.05, 5.0, 24), indexing="ij")
    return [s.ravel(), alpha.ravel()]


def _g(form: str, grid: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """``g`` of every grid point at every x: shape ``[S, len(x)]``."""
    if form in ("paper", "exp"):
        return -np.expm1(-grid[0][:, None] * x[None, :])
    return 1.0 - (1.0 + x[None, :] / grid[0][:, None]) ** (-grid[1][:, None])


def _wls(g: np.ndarray, y: np.ndarray, w: np.ndarray, gp: np.ndarray):
    """Per grid row: weighted fit of ``lo (1 - g) + hi g`` (sums in point order, elementwise).

    Returns ``(chi2 [S], v [S], var_v [S], lo [S], hi [S])`` with ``v`` the value at ``gp``; rows
    whose 2x2 system is singular get ``chi2 = inf``.
    """
    s11 = s12 = s22 = r1 = r2 = 0.0
    for i in range(y.size):  # a fixed summation order: no SIMD reordering of the point sums
        u, v = 1.0 - g[:, i], g[:, i]
        s11, s12, s22 = s11 + w[i] * u * u, s12 + w[i] * u * v, s22 + w[i] * v * v
        r1, r2 = r1 + w[i] * u * y[i], r2 + w[i] * v * y[i]
    det = s11 * s22 - s12 * s12
    good = det > 1e-12 * s11 * s22
    det = np.where(good, det, 1.0)
    lo = (s22 * r1 - s12 * r2) / det
    hi = (s11 * r2 - s12 * r1) / det
    chi2 = np.zeros_like(lo)
    for i in range(y.size):
        chi2 = chi2 + w[i] * (y[i] - lo * (1.0 - g[:, i]) - hi * g[:, i]) ** 2
    tp1, tp2 = 1.0 - gp, gp
    var_v = (tp1 * tp1 * s22 - 2 * tp1 * tp2 * s12 + tp2 * tp2 * s11) / det
    return np.where(good, chi2, np.inf), lo * tp1 + hi * tp2, var_v, lo, hi


def _fit(form: str, x: np.ndarray, y: np.ndarray, var: np.ndarray, xp: float):
    """Grid fit of one form; returns the per-shape arrays and the grid (see :func:`_wls`)."""
    grid = _grid(form, x)
    return grid, _wls(_g(form, grid, x), y, 1.0 / var, _g(form, grid, np.array([xp]))[:, 0])


def _points(form: str, y: np.ndarray) -> np.ndarray:
    return nondecreasing(y) if form == "paper" else np.arange(y.size)


def _held_out(form: str, x: np.ndarray, y: np.ndarray, var: np.ndarray) -> float | None:
    """Mean over points of (y_i - fit without i)^2 / var_i; None when a fit would be underdetermined."""
    errs = []
    for i in range(y.size):
        rest = np.delete(np.arange(y.size), i)
        use = rest[_points(form, y[rest])]
        if use.size < _N_PARAMS[form]:
            return None
        _, (chi2, v, _, _, _) = _fit(form, x[use], y[use], var[use], float(x[i]))
        j = int(np.argmin(chi2))
        if not math.isfinite(chi2[j]):
            return None
        errs.append((y[i] - float(v[j])) ** 2 / var[i])
    return round(math.fsum(errs) / len(errs), _DIGITS)


def _choose(x, y, var, forms) -> tuple[str | None, dict[str, float | None]]:
    errors: dict[str, float | None] = {}
    for f in forms:
        n_used = _points(f, y).size
        errors[f] = _held_out(f, x, y, var) if n_used >= _N_PARAMS[f] + 1 else None
    scored = [(e, i, f) for i, (f, e) in enumerate(errors.items()) if e is not None]
    return (min(scored)[2] if scored else None), errors


def _check(train_flops, accuracy, variance, planned_flops, forms, confidence):
    x = np.asarray(train_flops, dtype=np.float64).ravel()
    y = np.asarray(accuracy, dtype=np.float64).ravel()
    var = np.asarray(variance, dtype=np.float64).ravel()
    if not (x.size == y.size == var.size) or x.size == 0:
        raise ValueError(f"train_flops, accuracy and variance need one value per checkpoint "
                         f"(got {x.size}, {y.size}, {var.size})")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and np.isfinite(var).all()):
        raise ValueError("train_flops, accuracy and variance must be finite")
    if (x < 0).any() or (np.diff(x) < 0).any():
        raise ValueError("train_flops must be >= 0 and non-decreasing")
    if (y < 0).any() or (y > 1).any() or (var <= 0).any():
        raise ValueError("accuracies must be in [0, 1] and variances > 0")
    if isinstance(planned_flops, bool) or not isinstance(planned_flops, (int, float, np.floating)) \
            or not math.isfinite(planned_flops) or planned_flops <= 0:
        raise ValueError(f"planned_flops must be a finite number > 0, got {planned_flops!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence!r}")
    forms = tuple(forms)
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"forms must be a non-empty subset of {FORMS}, got {forms!r}")
    return x / float(planned_flops), y, var, forms


def project_accuracy(train_flops: Sequence[float], accuracy: Sequence[float], variance: Sequence[float],
                     planned_flops: float, *, forms: Sequence[str] = FORMS,
                     confidence: float = 0.95) -> Projection:
    """Project accuracy to ``planned_flops`` with one-sided bounds at ``confidence``.

    Args:
        train_flops: training FLOPs of each checkpoint, non-decreasing, shape ``[C]``.
        accuracy: k = 1 accuracy of each checkpoint in [0, 1], shape ``[C]``.
        variance: its sampling variance (:func:`accuracy_variance`), > 0, shape ``[C]``.
        planned_flops: training FLOPs of the full planned run (> 0).
        forms: candidate forms (default all of :data:`FORMS`).
        confidence: in [0.5, 1).
    Returns:
        A :class:`Projection`; ``form`` is None (with a ``reason``) when no form has enough points.
    Raises:
        ValueError: on malformed input.
    """
    x, y, var, forms = _check(train_flops, accuracy, variance, planned_flops, forms, confidence)
    form, errors = _choose(x, y, var, forms)
    empty = Projection(None, float(planned_flops), None, None, None, float(confidence),
                       held_out_error=errors, n_points=int(y.size))
    if form is None:
        need = min(_N_PARAMS[f] for f in forms) + 1
        empty.reason = (f"no form has enough points to fit and check ({y.size} checkpoints; the "
                        f"filtered paper form may have fewer; need {need})")
        return empty
    use = _points(form, y)
    grid, (chi2, v, var_v, lo, hi) = _fit(form, x[use], y[use], var[use], 1.0)
    best = int(np.argmin(chi2))
    dof = use.size - _N_PARAMS[form]
    phi = max(1.0, float(chi2[best]) / dof) if dof > 0 else 1.0
    room = phi * NormalDist().inv_cdf(confidence) ** 2 - (chi2 - chi2[best])
    inside = np.isfinite(chi2) & (room >= 0)
    half = np.sqrt(np.maximum(var_v, 0.0) * np.where(inside, room, 0.0))
    upper = float(np.max(np.where(inside, v + half, -np.inf)))
    lower = float(np.min(np.where(inside, v - half, np.inf)))
    planned = float(planned_flops)
    if form == "power":
        params = {"lo": float(lo[best]), "hi": float(hi[best]), "s_flops": float(grid[0][best]) * planned,
                  "alpha": float(grid[1][best])}
    else:  # a (1 - exp(-b B)) + c with b per FLOP
        params = {"a": float(hi[best] - lo[best]), "b_per_flop": float(grid[0][best]) / planned,
                  "c": float(lo[best])}
    return Projection(form, planned, _unit(float(v[best])), _unit(lower), _unit(upper), float(confidence),
                      params, errors, int(y.size), int(use.size), round(phi, _DIGITS))


def _unit(t: float) -> float:
    """Clipped to [0, 1] and rounded to ``_DIGITS`` decimals (see the module docstring)."""
    return round(min(1.0, max(0.0, t)), _DIGITS)


def project_checkpoints(checkpoints, planned_flops: float, *, forms: Sequence[str] = FORMS,
                        confidence: float = 0.95) -> Projection:
    """:func:`project_accuracy` from :class:`~grades.ttc.samples.CheckpointSamples` (in training
    order): accuracy is each checkpoint's mean over problems of its fraction of correct samples."""
    xs, ys, vs = [], [], []
    for ck in checkpoints:
        rows = ck.correct()
        xs.append(ck.train_flops)
        ys.append(math.fsum(sum(bool(v) for v in r) / len(r) for r in rows) / len(rows))
        vs.append(accuracy_variance(rows))
    return project_accuracy(xs, ys, vs, planned_flops, forms=forms, confidence=confidence)
