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
needs at least two points more than its parameters (3, or 4 for ``power``): with one residual
degree of freedom nothing in the fit can tell a saturated curve from noise on a rising one.

Noise model. Checkpoint i's accuracy is a mean over P problems of per-problem fractions
``c_j / n_j``: its sampling variance is ``sum_j p_j (1 - p_j) / n_j / P^2`` (binomial noise per
problem; the problems are fixed, the samples are not), estimated without bias by
``c_j (n_j - c_j) / (n_j^2 (n_j - 1))`` (``n_j = 1``: ``y (1 - y)`` per problem). The fit is
weighted least squares with those variances -- the normal approximation of the binomial
likelihood.

Interval: the profile likelihood of the projected value ``v = f(1)`` (and of the gain still to
come from the last checkpoint, ``f(1) - f(x_last)``). The nonlinear parameters (b; s and alpha)
run over a fixed log-spaced grid; for each grid point the curve is linear in ``(lo, hi)``, so its
profile in ``v`` is an exact parabola, and the overall profile is the lower envelope of those
parabolas. The one-sided bounds at ``confidence`` are where the profile rises by
``phi * chi2_q(2 confidence - 1, d)`` with ``d = 1 +`` the number of shape parameters (2 for
paper/exp, 3 for power): simultaneous over the shape, which the data pin down poorly near a
straight line -- with ``d = 1`` a still-rising curve's gain was under-covered (11% misses at a
nominal 5% on 8 noisy points, 3% with this ``d``; see ``tests/test_ttc_projection.py``).
``phi = max(1, chi2_min / dof)`` widens them when the points scatter more than their binomial
noise (a misfitting form). Grid rows whose best curve leaves ``[-0.1, 1.1]`` at ``B = 0`` or at
the plan are dropped (there ``lo`` and ``hi`` run off to cancel each other); within a row the
box is not imposed, which can only widen the interval; bounds are clipped to [0, 1]. A
still-rising curve therefore keeps a wide interval (the grid reaches nearly straight lines), and
a flat one a narrow interval, however far ``B_plan`` lies beyond the data: no range cut-off.

Reported numbers are rounded to 9 decimals, so the ULP-level differences of vectorised ``exp``
and sums between CPUs do not change a decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.stats import chi2 as chi2_dist

__all__ = ["FORMS", "Projection", "project_accuracy", "project_checkpoints", "accuracy_variance",
           "nondecreasing"]

FORMS = ("paper", "exp", "power")
_N_PARAMS = {"paper": 3, "exp": 3, "power": 4}
_DIGITS = 9
#: residual degrees of freedom a form needs: with one, a curve through 4 noisy points of a rising
#: run can look saturated and nothing in the fit can tell (measured: bench/ttc_stop.py)
_MIN_DOF = 2
_SLACK = 0.1  # how far outside [0, 1] a fitted curve may stray at B = 0 and at the plan


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
        gain, gain_upper: the accuracy the fit still expects from the last checkpoint to
            ``planned_flops`` (``f(1) - f(x_last)``) and its one-sided upper bound at ``confidence``.
            Both ends share the fit's level, so this bound is much tighter than ``upper`` minus the
            last point's accuracy: it is what the stop rule of
            :class:`~grades.ttc.callback.TTCMonitor` uses.
        last_accuracy: the measured accuracy of the last checkpoint.
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
    gain: float | None = None
    gain_upper: float | None = None
    last_accuracy: float | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.form is not None

    def to_dict(self) -> dict:
        return {"form": self.form, "planned_flops": self.planned_flops, "point": self.point,
                "lower": self.lower, "upper": self.upper, "confidence": self.confidence,
                "params": dict(self.params), "held_out_error": dict(self.held_out_error),
                "n_points": self.n_points, "n_used": self.n_used, "dispersion": self.dispersion,
                "gain": self.gain, "gain_upper": self.gain_upper,
                "last_accuracy": self.last_accuracy, "reason": self.reason}


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
    n = np.array([len(row) for row in correct], dtype=np.int64)
    if (n == 0).any():
        raise ValueError("a problem has no samples")
    c = np.array([sum(bool(v) for v in row) for row in correct], dtype=np.int64)
    total = int(n.sum())
    many = n > 1
    # exact integer numerators; math.fsum keeps the sums independent of the summation order
    terms = (c[many] * (n[many] - c[many])) / (n[many] ** 2 * (n[many] - 1)).astype(np.float64)
    y = math.fsum((c / n).tolist()) / n.size
    # one sample: no within-problem estimate; the checkpoint's y (1 - y) stands in
    var = (math.fsum(terms.tolist()) + int((~many).sum()) * y * (1 - y)) / n.size ** 2
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


@dataclass
class _GridFit:
    """Weighted fits of ``lo (1 - g) + hi g``, one per grid row: ``chi2`` (inf where the 2x2
    system is singular), ``lo``, ``hi`` and the inverse normal matrix ``[[i11, i12], [i12, i22]]``."""

    chi2: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    i11: np.ndarray
    i12: np.ndarray
    i22: np.ndarray

    def linear(self, t1: np.ndarray, t2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Value and variance of ``t1 lo + t2 hi`` per row."""
        var = t1 * t1 * self.i11 + 2 * t1 * t2 * self.i12 + t2 * t2 * self.i22
        return t1 * self.lo + t2 * self.hi, var


def _wls(g: np.ndarray, y: np.ndarray, w: np.ndarray) -> _GridFit:
    """Per grid row (``g`` is ``[S, m]``): the weighted least-squares fit, sums in point order."""
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
    return _GridFit(np.where(good, chi2, np.inf), lo, hi, s22 / det, -s12 / det, s11 / det)


def _fit(form: str, x: np.ndarray, y: np.ndarray, var: np.ndarray) -> tuple[list[np.ndarray], _GridFit]:
    """Grid fit of one form: ``(grid, fits)``."""
    grid = _grid(form, x)
    fit = _wls(_g(form, grid, x), y, 1.0 / var)
    # a curve must stay an accuracy from B = 0 to the plan: this drops the rows where g hardly
    # varies over the points and lo, hi run off to cancel each other
    end = fit.lo + (fit.hi - fit.lo) * _g(form, grid, np.array([1.0]))[:, 0]
    sane = (np.abs(fit.lo - 0.5) <= 0.5 + _SLACK) & (np.abs(end - 0.5) <= 0.5 + _SLACK)
    fit.chi2 = np.where(sane, fit.chi2, np.inf)
    return grid, fit


def _bounds(fit: _GridFit, v: np.ndarray, var: np.ndarray, room: np.ndarray) -> tuple[float, float]:
    """``(lower, upper)`` of the profile of ``v``: the envelope of the per-row parabolas."""
    inside = np.isfinite(fit.chi2) & (room >= 0)
    half = np.sqrt(np.maximum(var, 0.0) * np.where(inside, room, 0.0))
    return float(np.min(np.where(inside, v - half, np.inf))), float(np.max(np.where(inside, v + half, -np.inf)))


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
        grid, fit = _fit(form, x[use], y[use], var[use])
        j = int(np.argmin(fit.chi2))
        if not math.isfinite(fit.chi2[j]):
            return None
        gi = _g(form, [a[j:j + 1] for a in grid], np.array([x[i]]))[0, 0]
        errs.append((y[i] - float(fit.lo[j] * (1 - gi) + fit.hi[j] * gi)) ** 2 / var[i])
    return round(math.fsum(errs) / len(errs), _DIGITS)


def _choose(x, y, var, forms) -> tuple[str | None, dict[str, float | None]]:
    errors: dict[str, float | None] = {}
    for f in forms:
        n_used = _points(f, y).size
        errors[f] = _held_out(f, x, y, var) if n_used >= _N_PARAMS[f] + _MIN_DOF else None
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
                       held_out_error=errors, n_points=int(y.size), last_accuracy=float(y[-1]))
    if form is None:
        need = min(_N_PARAMS[f] for f in forms) + _MIN_DOF
        empty.reason = (f"no form has enough points to fit and check ({y.size} checkpoints; the "
                        f"filtered paper form may have fewer; need {need})")
        return empty
    use = _points(form, y)
    grid, fit = _fit(form, x[use], y[use], var[use])
    best = int(np.argmin(fit.chi2))
    dof = use.size - _N_PARAMS[form]
    phi = max(1.0, float(fit.chi2[best]) / dof)  # dof >= _MIN_DOF
    room = phi * _threshold(form, confidence) - (fit.chi2 - fit.chi2[best])
    gp, gc = _g(form, grid, np.array([1.0, x[-1]])).T
    v, var_v = fit.linear(1.0 - gp, gp)
    lower, upper = _bounds(fit, v, var_v, room)
    # the gain still to come from the last checkpoint: (hi - lo) (g(1) - g(x_last))
    gain, var_gain = fit.linear(gc - gp, gp - gc)
    _, gain_upper = _bounds(fit, gain, var_gain, room)
    planned = float(planned_flops)
    if form == "power":
        params = {"lo": float(fit.lo[best]), "hi": float(fit.hi[best]), "s_flops": float(grid[0][best]) * planned,
                  "alpha": float(grid[1][best])}
    else:  # a (1 - exp(-b B)) + c with b per FLOP
        params = {"a": float(fit.hi[best] - fit.lo[best]), "b_per_flop": float(grid[0][best]) / planned,
                  "c": float(fit.lo[best])}
    return Projection(form, planned, _unit(float(v[best])), _unit(lower), _unit(upper), float(confidence),
                      params, errors, int(y.size), int(use.size), round(phi, _DIGITS),
                      gain=round(float(gain[best]), _DIGITS), gain_upper=round(min(1.0, gain_upper), _DIGITS), last_accuracy=float(y[-1]))


def _threshold(form: str, confidence: float) -> float:
    """Rise of the profile's chi^2 at the one-sided bound: the chi^2 quantile at ``2 c - 1`` with
    one degree of freedom per shape parameter more than 1 (see the module docstring)."""
    return float(chi2_dist.ppf(2 * confidence - 1, 1 + _N_PARAMS[form] - 2))


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
