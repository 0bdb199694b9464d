"""Saturating curve fits (scipy ``curve_fit``) for accuracy vs k and accuracy vs training FLOPs.

Models
------
Accuracy vs k (samples per query)::

    A(k) = A_inf - (A_inf - A_1) * exp(-b * (k - 1))          A_1, A_inf in [0, 1], b >= 0

Accuracy vs training FLOPs F across checkpoints, ``model="exp"`` (default)::

    A(F) = A_max - (A_max - A_0) * exp(-F / F_s)                A_0, A_max in [0, 1], F_s > 0

or ``model="power"``::

    A(F) = A_max - (A_max - A_0) * (1 + F / F_s) ** (-alpha)     alpha > 0

Why the exponential by default: it is finite at F = 0 (A_0 is the starting model's accuracy, which a
fine-tuning run does measure, unlike a pure power law in F), it has three parameters (fits on the
handful of checkpoints a run evaluates), and it plateaus at A_max <= 1. Its plateau is reached
sooner than a power law's, so for a projection beyond the data it is the less optimistic of the
two about late gains only when the data already bends; ``"power"`` keeps improving slowly and
suits long pre-training-like curves. Both refuse far extrapolation (below).

Quality and extrapolation rules
-------------------------------
A fit is flagged (``ok=False`` with a ``reason``) when

* there are fewer than ``n_params + 1`` distinct x values (no residual degree of freedom),
* ``curve_fit`` fails to converge,
* the residual RMSE exceeds ``max_rmse`` (default 0.05 accuracy), or
* R^2 is below ``min_r2`` (default 0.9). R^2 is not used when the data are flat (total sum of
  squares below ``1e-8`` per point): the RMSE rule decides then.

:meth:`FitResult.predict` raises :class:`PoorFitError` for a flagged fit and
:class:`ExtrapolationError` for x beyond ``x_max + max_extrapolation * (x_max - x_min)``
(default ``max_extrapolation = 0.5``: half the data range past the last point) or below
``x_min - max_extrapolation * (x_max - x_min)``; both are ``ValueError``\\ s. Pass
``allow_poor=True`` / ``allow_extrapolation=True`` to override knowingly.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

__all__ = ["FitResult", "PoorFitError", "ExtrapolationError", "fit_accuracy_vs_k",
           "fit_accuracy_vs_flops", "MAX_RMSE", "MIN_R2", "MAX_EXTRAPOLATION"]

MAX_RMSE = 0.05
MIN_R2 = 0.9
MAX_EXTRAPOLATION = 0.5


class PoorFitError(ValueError):
    """The fit was flagged as poor; its projection is not trusted."""


class ExtrapolationError(ValueError):
    """The requested x lies too far outside the fitted data range."""


@dataclass
class FitResult:
    """A fitted saturating curve.

    Attributes:
        model: ``"k-exp"``, ``"flops-exp"`` or ``"flops-power"``.
        params: fitted parameters by name (FLOP-valued ones in FLOPs).
        rmse: root-mean-square residual (accuracy units).
        r2: coefficient of determination (NaN for flat data).
        n_points: number of points fitted.
        x_min, x_max: the fitted x range.
        ok: False when the fit is poor (see module docstring); ``reason`` says why.
        max_extrapolation: allowed distance past the range, as a fraction of its width.
        residuals: data minus fit, per point.
    """

    model: str
    params: dict[str, float]
    rmse: float
    r2: float
    n_points: int
    x_min: float
    x_max: float
    ok: bool
    reason: str = ""
    max_extrapolation: float = MAX_EXTRAPOLATION
    residuals: list[float] = field(default_factory=list)
    _fn: Callable | None = field(default=None, repr=False, compare=False)

    def in_range(self, x: float) -> bool:
        """Whether ``x`` is within the allowed extrapolation distance of the data."""
        width = self.x_max - self.x_min
        return self.x_min - self.max_extrapolation * width <= x <= self.x_max + self.max_extrapolation * width

    def predict(self, x, *, allow_poor: bool = False, allow_extrapolation: bool = False) -> np.ndarray | float:
        """Fitted accuracy at ``x`` (scalar or array); raises on a poor fit or far extrapolation."""
        if not self.ok and not allow_poor:
            raise PoorFitError(f"{self.model} fit is poor ({self.reason}); refusing to project")
        xs = np.asarray(x, dtype=np.float64)
        if not allow_extrapolation:
            bad = [float(v) for v in np.atleast_1d(xs) if not self.in_range(float(v))]
            if bad:
                raise ExtrapolationError(
                    f"x={bad[0]:.4g} is too far outside the fitted range [{self.x_min:.4g}, "
                    f"{self.x_max:.4g}] (allowed: {self.max_extrapolation:g} x the range width)")
        y = self._fn(xs)
        return float(y) if np.ndim(y) == 0 else y

    def to_dict(self) -> dict:
        return {"model": self.model, "params": self.params,
                "rmse": None if math.isnan(self.rmse) else self.rmse,
                "r2": None if math.isnan(self.r2) else self.r2, "n_points": self.n_points,
                "x_min": self.x_min, "x_max": self.x_max, "ok": self.ok, "reason": self.reason,
                "residuals": list(self.residuals)}


def _prepare(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{name}: x and accuracy must have the same length ({x.size} vs {y.size})")
    if x.size == 0:
        raise ValueError(f"{name}: no points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{name}: values must be finite")
    if (y < 0).any() or (y > 1).any():
        raise ValueError(f"{name}: accuracies must be in [0, 1]")
    return x, y


def _quality(y, yhat, n_params, n_distinct, max_rmse, min_r2) -> tuple[float, float, bool, str]:
    res = y - yhat
    rmse = float(np.sqrt(np.mean(res ** 2)))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    flat = ss_tot < 1e-8 * y.size
    r2 = float("nan") if flat else 1.0 - float(np.sum(res ** 2)) / ss_tot
    reasons = []
    if n_distinct < n_params + 1:
        reasons.append(f"{n_distinct} distinct x values for {n_params} parameters (need "
                       f">= {n_params + 1})")
    if rmse > max_rmse:
        reasons.append(f"RMSE {rmse:.3g} > {max_rmse:g}")
    if not flat and r2 < min_r2:
        reasons.append(f"R^2 {r2:.3g} < {min_r2:g}")
    return rmse, r2, not reasons, "; ".join(reasons)


def _fit(name, fn, p0, bounds, x, y, sigma, n_params, max_rmse, min_r2, max_extrap,
         to_params, make_fn) -> FitResult:
    n_distinct = int(np.unique(x).size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            popt, _ = curve_fit(fn, x, y, p0=p0, bounds=bounds, sigma=sigma, maxfev=20000)
    except (RuntimeError, ValueError) as e:
        return FitResult(name, {}, float("nan"), float("nan"), x.size, float(x.min()), float(x.max()),
                         False, f"curve_fit failed: {e}", max_extrap, [], lambda v: np.full_like(v, np.nan))
    yhat = fn(x, *popt)
    rmse, r2, ok, reason = _quality(y, yhat, n_params, n_distinct, max_rmse, min_r2)
    return FitResult(name, to_params(popt), rmse, r2, int(x.size), float(x.min()), float(x.max()), ok,
                     reason, max_extrap, (y - yhat).tolist(), make_fn(popt))


def _sigma(se, y):
    if se is None:
        return None
    s = np.asarray(se, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError("se must have one value per point")
    if not np.isfinite(s).all() or (s < 0).any():
        return None
    # floor: zero-variance points (accuracy 0 or 1) would otherwise get infinite weight
    return np.maximum(s, max(1e-3, 0.1 * float(np.median(s)) if s.size else 1e-3))


def fit_accuracy_vs_k(ks: Sequence[float], accuracy: Sequence[float], se: Sequence[float] | None = None,
                      *, max_rmse: float = MAX_RMSE, min_r2: float = MIN_R2,
                      max_extrapolation: float = MAX_EXTRAPOLATION) -> FitResult:
    """Fit ``A(k) = A_inf - (A_inf - A_1) exp(-b (k - 1))`` to accuracy at each k.

    Args:
        ks: k values (>= 1), shape ``[K]``.
        accuracy: accuracies in [0, 1], shape ``[K]``.
        se: optional standard errors (weights of the least squares), shape ``[K]``.
    Returns:
        :class:`FitResult` with ``params`` ``{"a_1", "a_inf", "b"}``.
    """
    x, y = _prepare(ks, accuracy, "fit_accuracy_vs_k")
    if (x < 1).any():
        raise ValueError("fit_accuracy_vs_k: k values must be >= 1")

    def fn(k, a1, ainf, b):
        return ainf - (ainf - a1) * np.exp(-b * (k - 1.0))

    i0 = int(np.argmin(x))
    span = max(float(x.max() - x.min()), 1.0)
    p0 = [float(y[i0]), float(min(1.0, y.max())), 3.0 / span]
    return _fit("k-exp", fn, p0, ([0.0, 0.0, 0.0], [1.0, 1.0, np.inf]), x, y, _sigma(se, y),
                3, max_rmse, min_r2, max_extrapolation,
                lambda p: {"a_1": float(p[0]), "a_inf": float(p[1]), "b": float(p[2])},
                lambda p: (lambda v: fn(v, *p)))


def fit_accuracy_vs_flops(train_flops: Sequence[float], accuracy: Sequence[float],
                          se: Sequence[float] | None = None, *, model: str = "exp",
                          max_rmse: float = MAX_RMSE, min_r2: float = MIN_R2,
                          max_extrapolation: float = MAX_EXTRAPOLATION) -> FitResult:
    """Fit a saturating curve of accuracy vs training FLOPs across checkpoints.

    Args:
        train_flops: training FLOPs of each checkpoint (>= 0), shape ``[C]``.
        accuracy: accuracy of each checkpoint in [0, 1] (e.g. pass@1), shape ``[C]``.
        se: optional standard errors, shape ``[C]``.
        model: ``"exp"`` (params ``a_0, a_max, f_s``) or ``"power"`` (``a_0, a_max, f_s, alpha``).
    Returns:
        :class:`FitResult`; use ``.predict(final_flops)`` to project the final model's accuracy.
    """
    x, y = _prepare(train_flops, accuracy, "fit_accuracy_vs_flops")
    if (x < 0).any():
        raise ValueError("fit_accuracy_vs_flops: train_flops must be >= 0")
    if model not in ("exp", "power"):
        raise ValueError(f"model must be 'exp' or 'power', got {model!r}")
    scale = float(x.max()) if x.max() > 0 else 1.0
    u = x / scale  # fit in units of the largest FLOP count (curve_fit dislikes 1e18-sized x)
    i0 = int(np.argmin(u))
    sig = _sigma(se, y)
    if model == "exp":
        def fn(v, a0, amax, fs):
            return amax - (amax - a0) * np.exp(-v / fs)
        p0 = [float(y[i0]), float(min(1.0, y.max())), 0.3]
        res = _fit("flops-exp", fn, p0, ([0, 0, 1e-6], [1, 1, 1e3]), u, y, sig, 3, max_rmse,
                   min_r2, max_extrapolation,
                   lambda p: {"a_0": float(p[0]), "a_max": float(p[1]), "f_s": float(p[2] * scale)},
                   lambda p: (lambda v: fn(np.asarray(v) / scale, *p)))
    else:
        def fn(v, a0, amax, fs, alpha):
            return amax - (amax - a0) * (1.0 + v / fs) ** (-alpha)
        p0 = [float(y[i0]), float(min(1.0, y.max())), 0.3, 1.0]
        res = _fit("flops-power", fn, p0, ([0, 0, 1e-6, 1e-3], [1, 1, 1e3, 20]), u, y, sig, 4,
                   max_rmse, min_r2, max_extrapolation,
                   lambda p: {"a_0": float(p[0]), "a_max": float(p[1]), "f_s": float(p[2] * scale),
                              "alpha": float(p[3])},
                   lambda p: (lambda v: fn(np.asarray(v) / scale, *p)))
    res.x_min, res.x_max = float(x.min()), float(x.max())
    return res
