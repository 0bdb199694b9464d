"""Choosing (checkpoint, k, strategy): the cheapest way to reach a target accuracy.

Every checkpoint is evaluated at every k in ``1..k_max`` with each strategy, from the one set of
samples it has (see :mod:`grades.ttc.estimators`). A candidate *meets* the target when its mean
accuracy, less its Monte Carlo error bound (non-zero only for a Monte Carlo majority@k estimate,
see :func:`~grades.ttc.estimators.majority_at_k`), is at least ``target - tolerance``. The reference deployment is the final checkpoint (the
one with the most training FLOPs, or ``final_train_flops`` when given) answering each query
with ``k_ref = 1`` sample. When several checkpoints share the most training FLOPs, the reference
is the one whose name sorts first (so the result does not depend on the input order).

* ``min_train``: the candidate meeting the target with the fewest training FLOPs (ties: smaller k,
  then the order of ``strategies``, then the checkpoint name).
* ``min_total``: with an expected query volume ``Q`` and inference FLOPs per sample ``f``, the
  candidate meeting the target with the fewest ``train_flops + Q * k * f``.
* Break-even query count of a candidate: ``Q* = (F_ref - F_ckpt) / ((k - k_ref) * f)``. Below Q*
  queries, the earlier checkpoint with k samples costs fewer FLOPs in total than the reference;
  ``Q* = inf`` when k <= k_ref (no extra inference) and the saving is >= 0, and ``Q* = 0`` when
  nothing is saved but inference costs more.

Strategies: ``"pass@k"`` (needs an oracle verifier at deployment -- a ceiling, not something you
can ship without one), ``"majority@k"`` (plurality vote; deployable), ``"best-of-k"`` (needs a
scorer at deployment and a ``score`` per sample). Choose what you can deploy.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from .._checks import check_number
from .estimators import Estimate, best_of_k, majority_at_k, pass_at_k

from .projection import FORMS, Projection, project_checkpoints
from .samples import CheckpointSamples, common_problems

__all__ = ["STRATEGIES", "Candidate", "Selection", "normalise_strategies", "evaluate_checkpoints",
           "break_even_queries", "select"]

STRATEGIES = ("pass@k", "majority@k", "best-of-k")
_ALIASES = {"pass": "pass@k", "pass@k": "pass@k", "majority": "majority@k", "maj": "majority@k",
            "majority@k": "majority@k", "vote": "majority@k", "best-of-k": "best-of-k",
            "best": "best-of-k", "best-of": "best-of-k", "bon": "best-of-k"}


def normalise_strategies(strategies: Sequence[str] | str | None) -> tuple[str, ...]:
    """Canonical strategy names (accepts ``pass``, ``majority``, ``best-of`` and the like)."""
    if strategies is None:
        return STRATEGIES
    if isinstance(strategies, str):
        strategies = [s for s in strategies.replace(",", " ").split() if s]
    out = []
    for s in strategies:
        if not isinstance(s, str):
            raise TypeError(f"strategy names must be strings, got {type(s).__name__}")
        key = s.strip().lower()
        if key not in _ALIASES:
            raise ValueError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
        if _ALIASES[key] not in out:
            out.append(_ALIASES[key])
    if not out:
        raise ValueError("no strategies given")
    return tuple(out)


@dataclass
class Candidate:
    """One (checkpoint, k, strategy) with its accuracy and costs (FLOPs as floats).

    ``train_flops_saved`` is against the reference; ``break_even`` is Q* (None when the inference
    FLOPs per sample are unknown and k > k_ref); ``total_flops`` is None without a query volume;
    ``mc_error_bound`` bounds the Monte Carlo error of ``accuracy`` (0 for exact estimates).
    """

    checkpoint: str
    train_flops: float
    k: int
    strategy: str
    accuracy: float
    se: float
    meets: bool
    train_flops_saved: float
    break_even: float | None
    total_flops: float | None
    mc_error_bound: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("se", "break_even"):
            v = d[key]
            if v is not None and not math.isfinite(v):
                d[key] = None if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return d


@dataclass
class Selection:
    """Result of :func:`select`."""

    target: float
    target_source: str
    tolerance: float
    threshold: float
    reference: str
    reference_flops: float
    k_max: int
    strategies: tuple[str, ...]
    queries: float | None
    infer_flops_per_sample: float | None
    n_problems: int
    dropped_problems: int
    table: list[Candidate]
    min_train: Candidate | None
    min_total: Candidate | None
    reference_total_flops: float | None = None
    projection: Projection | None = None
    estimates: dict[tuple[str, str], Estimate] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"target": self.target, "target_source": self.target_source, "tolerance": self.tolerance,
                "threshold": self.threshold, "reference": self.reference,
                "reference_flops": self.reference_flops, "k_max": self.k_max,
                "strategies": list(self.strategies), "queries": self.queries,
                "infer_flops_per_sample": self.infer_flops_per_sample, "n_problems": self.n_problems,
                "dropped_problems": self.dropped_problems,
                "min_train": None if self.min_train is None else self.min_train.to_dict(),
                "min_total": None if self.min_total is None else self.min_total.to_dict(),
                "reference_total_flops": self.reference_total_flops,
                "projection": None if self.projection is None else self.projection.to_dict(),
                "table": [c.to_dict() for c in self.table]}


def break_even_queries(train_flops_saved: float, k: int, infer_flops_per_sample: float | None,
                       k_ref: int = 1) -> float | None:
    """Q* = saved training FLOPs / extra inference FLOPs per query (``(k - k_ref) * f``).

    Returns ``inf`` when there is no extra inference (k <= k_ref) and the saving is >= 0, ``0``
    when nothing is saved (saving <= 0) and inference costs more, and None when ``f`` is None and
    k > k_ref.
    """
    for name, v in (("k", k), ("k_ref", k_ref)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if isinstance(train_flops_saved, (bool, np.bool_)) or not isinstance(train_flops_saved, numbers.Real) \
            or not math.isfinite(train_flops_saved):
        raise ValueError(f"train_flops_saved must be a finite number, got {train_flops_saved!r}")
    extra = int(k) - int(k_ref)
    if extra <= 0:
        return math.inf if train_flops_saved >= 0 else 0.0
    if infer_flops_per_sample is None:
        return None
    infer_flops_per_sample = check_number(infer_flops_per_sample, "inference FLOPs per sample", lo=0.0,
                                          lo_open=True)
    if train_flops_saved <= 0:
        return 0.0
    return train_flops_saved / (extra * infer_flops_per_sample)


def evaluate_checkpoints(checkpoints: Sequence[CheckpointSamples], k_max: int,
                         strategies: Sequence[str] | None = None
                         ) -> tuple[dict[tuple[str, str], Estimate], tuple[str, ...]]:
    """Estimates for each (checkpoint, strategy) at k = 1..k_max.

    Strategies default to all three; ``best-of-k`` is then dropped when some sample lacks a score
    (and is an error when asked for explicitly). Returns ``({(checkpoint, strategy): Estimate},
    strategies used)``.
    """
    explicit = strategies is not None
    strats = normalise_strategies(strategies)
    if isinstance(k_max, bool) or not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be an integer >= 1, got {k_max!r}")
    if not checkpoints:
        raise ValueError("no checkpoints")
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise ValueError("checkpoint names must be unique")
    scores = {c.name: c.scores() for c in checkpoints}
    if "best-of-k" in strats and any(s is None for s in scores.values()):
        missing = [n for n, s in scores.items() if s is None]
        if explicit:
            raise ValueError(f"best-of-k needs a score on every sample; checkpoint {missing[0]!r} "
                             "has samples without one")
        strats = tuple(s for s in strats if s != "best-of-k")
    ks = list(range(1, int(k_max) + 1))
    out: dict[tuple[str, str], Estimate] = {}
    for ck in checkpoints:
        if not ck.problems:
            raise ValueError(f"checkpoint {ck.name!r} has no problems")
        if ck.min_samples < k_max:
            raise ValueError(f"checkpoint {ck.name!r}: a problem has n={ck.min_samples} samples, fewer "
                             f"than k_max={k_max}")
        cor = ck.correct()
        for s in strats:
            if s == "pass@k":
                out[(ck.name, s)] = pass_at_k(cor, ks)
            elif s == "majority@k":
                out[(ck.name, s)] = majority_at_k(ck.answers(), cor, ks)
            else:
                out[(ck.name, s)] = best_of_k(scores[ck.name], cor, ks)
    return out, strats


def select(checkpoints: Sequence[CheckpointSamples], *, k_max: int, target: float | str = "final",
           tolerance: float = 0.0, strategies: Sequence[str] | None = None,
           queries: float | None = None, infer_flops_per_sample: float | None = None,
           final_train_flops: float | None = None, fit_model: str = "auto", confidence: float = 0.95,
           max_extrapolation: float | None = None) -> Selection:
    """Pick (checkpoint, k, strategy) meeting ``target - tolerance`` at the lowest cost.

    Args:
        checkpoints: samples per checkpoint (restricted to their common problems).
        k_max: largest k considered (every problem needs n >= k_max samples).
        target: a number in [0, 1]; ``"final"``: the measured accuracy (k = 1) of the checkpoint
            with the most training FLOPs; ``"projection"``: the upper bound at ``confidence`` of
            the accuracy (k = 1) projected to ``final_train_flops`` (:mod:`grades.ttc.projection`).
        tolerance: accuracy slack (finite, >= 0).
        strategies: subset of :data:`STRATEGIES` (default: all; see the module note on pass@k).
        queries: expected number of queries served, for ``min_total``.
        infer_flops_per_sample: inference FLOPs of one sampled completion (for Q* and totals).
        final_train_flops: training FLOPs of the full run (default: the largest checkpoint's; at
            least that, ``ValueError`` otherwise).
        fit_model: ``"auto"`` or one of :data:`~grades.ttc.projection.FORMS`, for ``"projection"``.
        confidence: for ``"projection"``: the target is the projection's upper bound at this
            confidence (the rule :class:`~grades.ttc.callback.TTCMonitor` stops by).
        max_extrapolation: deprecated and ignored (``FutureWarning``).
    Raises:
        ValueError: bad arguments, or ``"projection"`` when no form has enough checkpoints.
    """
    if max_extrapolation is not None:
        warnings.warn("select: max_extrapolation is deprecated and ignored: the projection's confidence "
                      "interval decides how far it can be trusted", FutureWarning, stacklevel=2)
    if fit_model != "auto" and fit_model not in FORMS:
        raise ValueError(f"fit_model must be 'auto' or one of {FORMS}, got {fit_model!r}")
    tolerance = check_number(tolerance, "tolerance", lo=0.0)
    queries = check_number(queries, "queries", lo=0.0, none=True)
    if queries is not None and infer_flops_per_sample is None:
        raise ValueError("a query volume needs infer_flops_per_sample to compare total FLOPs")
    if infer_flops_per_sample is not None:
        infer_flops_per_sample = check_number(infer_flops_per_sample, "infer_flops_per_sample", lo=0.0,
                                              lo_open=True)
    cks, dropped = common_problems(list(checkpoints))
    estimates, strats = evaluate_checkpoints(cks, k_max, strategies)
    top = max(c.train_flops for c in cks)
    # ties for the most FLOPs: the first name in sorted order, whatever the input order
    ref = min((c for c in cks if c.train_flops == top), key=lambda c: c.name)
    ref_flops = ref.train_flops
    if final_train_flops is not None:
        final_train_flops = check_number(final_train_flops, "final_train_flops", lo=0.0)
        if final_train_flops < ref.train_flops:
            raise ValueError(f"final_train_flops={final_train_flops:.6g} is below the training FLOPs "
                             f"{ref.train_flops:.6g} of checkpoint {ref.name!r}: the full run cannot "
                             "cost less than one of its checkpoints")
        ref_flops = float(final_train_flops)
    projection = None
    if isinstance(target, str):
        if target == "final":
            tgt, source = float(pass_at_k(ref.correct(), 1).mean[0]), f"final:{ref.name}"
        elif target == "projection":
            if ref_flops <= 0:
                raise ValueError("target='projection' needs training FLOPs > 0 for the full run")
            ordered = sorted(cks, key=lambda c: (c.train_flops, c.name))
            projection = project_checkpoints(ordered, ref_flops, confidence=confidence,
                                             forms=FORMS if fit_model == "auto" else (fit_model,))
            if not projection.ok:
                raise ValueError(f"cannot project: {projection.reason}")
            tgt, source = projection.upper, "projection"
        else:
            raise ValueError(f"target must be a number, 'final' or 'projection', got {target!r}")
    else:
        if isinstance(target, (bool, np.bool_)) or not isinstance(target, numbers.Real) or not 0 <= target <= 1:
            raise ValueError(f"target must be an accuracy in [0, 1], got {target!r}")
        tgt, source = float(target), "given"
    threshold = tgt - float(tolerance)
    table: list[Candidate] = []
    for ck in cks:
        saved = ref_flops - ck.train_flops
        for s in strats:
            est = estimates[(ck.name, s)]
            for i, k in enumerate(est.ks):
                k = int(k)
                acc = float(est.mean[i])
                total = None if queries is None else ck.train_flops + queries * k * infer_flops_per_sample
                bound = float(est.mc_error_bound)
                table.append(Candidate(ck.name, ck.train_flops, k, s, acc, float(est.se[i]),
                                       acc - bound >= threshold - 1e-12, saved,
                                       break_even_queries(saved, k, infer_flops_per_sample), total, bound))
    order = {s: i for i, s in enumerate(strats)}
    feas = [c for c in table if c.meets]
    min_train = min(feas, key=lambda c: (c.train_flops, c.k, order[c.strategy], -c.accuracy, c.checkpoint),
                    default=None)
    min_total = None
    ref_total = None
    if queries is not None:
        min_total = min(feas, key=lambda c: (c.total_flops, c.train_flops, c.k, order[c.strategy], c.checkpoint),
                        default=None)
        ref_total = ref_flops + queries * 1 * infer_flops_per_sample
        worst = max(c.total_flops for c in table)
        if not math.isfinite(worst) or not math.isfinite(ref_total):
            raise ValueError(f"total FLOPs overflow a float: queries={queries:.6g} x k up to {int(k_max)} "
                             f"x infer_flops_per_sample={infer_flops_per_sample:.6g}")
    return Selection(tgt, source, float(tolerance), threshold, ref.name, ref_flops, int(k_max), strats,
                     None if queries is None else float(queries), infer_flops_per_sample,
                     len(cks[0].problems), dropped, table, min_train, min_total, ref_total, projection,
                     estimates)
