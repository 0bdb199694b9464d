"""Test-time-compute-aware early stopping during training.

:class:`TTCMonitor` holds the logic and works in any loop: call
``monitor.evaluate(model, step, train_flops)`` at each evaluation. It draws ``n_samples``
completions per evaluation problem (once: every k up to ``k_max`` is estimated from that batch),
verifies them, records the checkpoint, fits accuracy (k = 1) against training FLOPs, and returns a
:class:`TTCDecision`. Training should stop when the checkpoint just evaluated reaches
``target - tolerance`` with some k <= k_max and an allowed strategy and, if a query volume is
declared, that volume is at most the candidate's break-even count Q* (so this checkpoint with k
samples costs fewer total FLOPs than finishing the run and answering with one sample). Only the
current checkpoint can stop training, because only its weights are at hand; an earlier one that
met the target is reported (``TTCDecision.earliest``).

:class:`TTCEarlyStopping` wraps a monitor as a ``transformers.TrainerCallback``.

The target is either a number or ``"projection"``: what the full run is projected to reach at
``planned_train_flops`` (:mod:`grades.ttc.projection`). With a projection the monitor stops only
when, with probability ``confidence``, the rest of the run would add less than what a candidate of
this checkpoint gains with k samples (plus ``tolerance``): the target is this checkpoint's measured
accuracy (k = 1) plus the upper bound of the gain the fit still expects (``Projection.gain_upper``).
For k = 1 that reads "the fit says, with that confidence, the remaining training adds at most
``tolerance``". A still-rising curve keeps a large bound and does not stop; a saturated one stops
as soon as its points say so, however far the planned FLOPs lie beyond them (no range cut-off).
Until ``min_checkpoints`` are recorded (and a form has enough points) it does not
stop (the decision's ``reason`` says why).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from .._checks import check_number
from .projection import FORMS, Projection, project_checkpoints
from .samples import CheckpointSamples, _verdict, samples_from_completions, write_samples
from .shard import shard_for
from .select import Candidate, Selection, normalise_strategies, select

__all__ = ["TTCDecision", "TTCMonitor", "TTCEarlyStopping"]

_STATE_VERSION = 1

SampleFn = Callable[[Any, Sequence[Any], int], Sequence[Sequence[str]]]


@dataclass
class TTCDecision:
    """Outcome of one evaluation.

    Attributes:
        step, train_flops: where the evaluation happened (FLOPs as a float).
        stop: whether training should stop now.
        reason: a sentence on why (not).
        target: the target accuracy used (None when none could be set yet); with a projection,
            this checkpoint's k = 1 accuracy plus the projected gain's upper bound.
        choice: when ``stop``, the (k, strategy) of *this* checkpoint that meets the target (the
            weights in hand); None otherwise.
        accuracy: ``{strategy: [accuracy at k=1..k_max]}`` of this checkpoint.
        samples_drawn: completions generated at this evaluation.
        eval_flops: inference FLOPs of those completions (None without ``infer_flops_per_sample``).
        earliest: for information, the recorded checkpoint with the fewest training FLOPs that
            meets the target (and pays off); it may be an earlier one, usable only if its weights
            were saved.
    """

    step: int
    train_flops: float
    stop: bool
    reason: str
    target: float | None
    choice: Candidate | None
    accuracy: dict[str, list[float]]
    samples_drawn: int
    eval_flops: float | None = None
    earliest: Candidate | None = None
    selection: Selection | None = field(default=None, repr=False)
    projection: Projection | None = field(default=None, repr=False)


def _number(v, name: str, *, lo: float = 0.0, strict: bool = False, none: bool = True) -> float | None:
    """:func:`~grades._checks.check_number` (``> lo`` when ``strict``, None passes where ``none``),
    a non-number raising ``ValueError`` too: every bad argument of the monitor is a ``ValueError``."""
    try:
        return check_number(v, name, lo=lo, lo_open=strict, none=none)
    except TypeError as e:
        raise ValueError(str(e)) from None


def _rng_fork(model):
    """Fork torch's CPU RNG (and that of the CUDA devices holding ``model``) around sampling."""
    import torch
    params = getattr(model, "parameters", None)
    devices = sorted({p.get_device() for p in params() if p.is_cuda}) if callable(params) else []
    return torch.random.fork_rng(devices=devices)


class TTCMonitor:
    """Plain-loop TTC early stopping (see the module docstring).

    Args:
        problems: evaluation problems (any objects your ``sample_fn``/``verifier`` understand).
        task: an :class:`~grades.demo.tasks.AdditionTask`; supplies the default ``sample_fn``
            (:func:`~grades.demo.tasks.generate_answers` with ``do_sample=True``) and ``verifier``.
        sample_fn: ``sample_fn(model, problems, n) -> [len(problems)][n]`` completion strings.
            It runs inside :func:`torch.random.fork_rng`: seeding there leaves training's RNG as is.
        verifier: ``verifier(problem, completion) -> bool``.
        answer_fn: completion -> answer compared by majority vote (default: ``str.strip``).
        score_fn: ``score_fn(problem, completion) -> float`` for best-of-k (optional).
        n_samples: completions per problem per evaluation (>= k_max).
        k_max: k budget (default ``n_samples``).
        strategies: allowed strategies (default ``("majority@k",)``: deployable without an oracle;
            add ``"pass@k"`` only if an exact verifier is available at test time).
        target: accuracy in [0, 1] or ``"projection"``.
        tolerance: accuracy slack (>= 0).
        planned_train_flops: FLOPs of the full planned run (needed for ``"projection"`` and with
            ``expected_queries``; the reference for the training FLOPs saved).
        expected_queries: declared query volume Q; stop only if Q <= Q* of the candidate.
        infer_flops_per_sample: inference FLOPs of one completion (needed with ``expected_queries``).
        min_checkpoints: checkpoints needed before a projection is attempted (>= 1).
        fit_model: ``"auto"`` (the form with the lowest held-out error) or one of
            :data:`~grades.ttc.projection.FORMS` (``"paper"``, ``"exp"``, ``"power"``).
        confidence: confidence of the bound on the projected remaining gain, in [0.5, 1).
        max_extrapolation: deprecated and ignored (the interval replaces the range cut-off); a
            ``FutureWarning`` says so.
        problem_ids: distinct identifiers for the recorded table (default ``0..P-1``).
        seed: base seed; evaluation at step s samples with seed ``seed + s``.
        distributed: ``None`` (default): under an initialised ``torch.distributed`` job with more
            than one rank, each rank samples its share of the problems, the verdicts are gathered
            and rank 0's decision is used on every rank (:mod:`grades.ttc.shard`; every rank must
            call :meth:`evaluate` at the same steps with the same ``train_flops``). ``True``
            requires such a job, ``False`` makes every rank sample everything.
        process_group: the group to shard over (default: the whole job).
    """

    def __init__(self, problems: Sequence[Any], *, task=None, sample_fn: SampleFn | None = None,
                 verifier: Callable[[Any, str], bool] | None = None,
                 answer_fn: Callable[[str], Hashable] | None = None,
                 score_fn: Callable[[Any, str], float] | None = None, n_samples: int = 16,
                 k_max: int | None = None, strategies: Sequence[str] | None = ("majority@k",),
                 target: float | str = "projection", tolerance: float = 0.0,
                 planned_train_flops: float | None = None, expected_queries: float | None = None,
                 infer_flops_per_sample: float | None = None, min_checkpoints: int = 4,
                 fit_model: str = "auto", confidence: float = 0.95, max_extrapolation: float | None = None,
                 problem_ids: Sequence[Hashable] | None = None, seed: int = 0,
                 distributed: bool | None = None, process_group=None):
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("no evaluation problems")
        if task is not None:
            from ..demo.tasks import generate_answers
            if sample_fn is None:
                def sample_fn(model, probs, n, _task=task):
                    return generate_answers(model, _task, probs, num_samples=n, do_sample=True,
                                            seed=self._seed)
            if verifier is None:
                verifier = task.verify
        if sample_fn is None or verifier is None:
            raise TypeError("give a task, or both sample_fn(model, problems, n) and verifier(problem, completion)")
        if not callable(sample_fn) or not callable(verifier):
            raise TypeError("sample_fn and verifier must be callable")
        for name, v in (("n_samples", n_samples), ("min_checkpoints", min_checkpoints), ("seed", seed),
                        ("k_max", n_samples if k_max is None else k_max)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (v < 1 and name != "seed"):
                raise ValueError(f"{name} must be an integer{'' if name == 'seed' else ' >= 1'}, got {v!r}")
        self.k_max = int(n_samples if k_max is None else k_max)
        if self.k_max > n_samples:
            raise ValueError(f"k_max must be in [1, n_samples={n_samples}], got {k_max}")
        if isinstance(target, str):
            if target != "projection":
                raise ValueError(f"target must be an accuracy or 'projection', got {target!r}")
            if planned_train_flops is None:
                raise ValueError("target='projection' needs planned_train_flops")
        elif isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0 <= target <= 1:
            raise ValueError(f"target must be in [0, 1], got {target!r}")
        if expected_queries is not None and (infer_flops_per_sample is None or planned_train_flops is None):
            raise ValueError("expected_queries needs infer_flops_per_sample and planned_train_flops "
                             "(the break-even volume compares the training FLOPs saved against the full "
                             "run with the extra inference FLOPs)")
        self.tolerance = _number(tolerance, "tolerance", none=False)
        self.planned_train_flops = _number(planned_train_flops, "planned_train_flops")
        self.expected_queries = _number(expected_queries, "expected_queries")
        self.infer_flops_per_sample = _number(infer_flops_per_sample, "infer_flops_per_sample", strict=True)
        if max_extrapolation is not None:
            _number(max_extrapolation, "max_extrapolation")
            warnings.warn("TTCMonitor: max_extrapolation is deprecated and ignored: the projection's "
                          "confidence interval decides how far it can be trusted (see confidence)",
                          FutureWarning, stacklevel=2)
        if fit_model != "auto" and fit_model not in FORMS:
            raise ValueError(f"fit_model must be 'auto' or one of {FORMS}, got {fit_model!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) \
                or not 0.5 <= confidence < 1:
            raise ValueError(f"confidence must be a number in [0.5, 1), got {confidence!r}")
        self.confidence = float(confidence)
        self.sample_fn, self.verifier, self.score_fn = sample_fn, verifier, score_fn
        self.answer_fn = answer_fn or (lambda c: c.strip())
        self.n_samples = int(n_samples)
        self.strategies = normalise_strategies(strategies)
        if "best-of-k" in self.strategies and score_fn is None:
            raise ValueError("best-of-k needs a score_fn")
        self.target = target if isinstance(target, str) else float(target)
        self.min_checkpoints, self.fit_model = int(min_checkpoints), fit_model
        self.problem_ids = list(range(len(self.problems))) if problem_ids is None else list(problem_ids)
        if len(self.problem_ids) != len(self.problems):
            raise ValueError("problem_ids must have one id per problem")
        if len(set(self.problem_ids)) != len(self.problem_ids):
            raise ValueError("problem_ids must be distinct")
        self.seed = int(seed)
        self._seed = self.seed
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        self.distributed, self.process_group = distributed, process_group
        self.checkpoints: list[CheckpointSamples] = []
        self.decisions: list[TTCDecision] = []
        self.samples_drawn = 0

    # -- evaluation ------------------------------------------------------------------------------
    def _sample(self, model, step: int, problems: list) -> list[tuple]:
        """``(answers, verdicts, scores)`` rows of ``problems`` (scores None without a score_fn)."""
        self._seed = self.seed + int(step)
        if not problems:
            return []
        with _rng_fork(model):
            comps = self.sample_fn(model, problems, self.n_samples)
        if len(comps) != len(problems):
            raise ValueError(f"sample_fn returned {len(comps)} rows for {len(problems)} problems")
        rows = []
        for prob, row in zip(problems, comps):
            if len(row) != self.n_samples:
                raise ValueError(f"sample_fn returned {len(row)} completions, expected {self.n_samples}")
            rows.append(([str(self.answer_fn(c)) for c in row],
                         [_verdict(self.verifier(prob, c), "verifier result") for c in row],
                         None if self.score_fn is None else [float(self.score_fn(prob, c)) for c in row]))
        return rows

    def _checkpoint(self, model, step: int, train_flops: float, shard) -> CheckpointSamples:
        """Sample (this rank's share, gathered when sharded) and build the checkpoint's table."""
        n = len(self.problems)
        if shard is None:
            rows = self._sample(model, step, self.problems)
        else:
            mine, error = None, None
            try:
                mine = self._sample(model, step, [self.problems[i] for i in shard.indices(n)])
            except Exception as e:  # reported to every rank, so none waits in the gather
                error = f"{type(e).__name__}: {e}"
            header = {"step": int(step), "train_flops": float(train_flops), "problems": n,
                      "n_samples": self.n_samples, "checkpoints": len(self.checkpoints)}
            rows = shard.gather(header, mine, n, error)
        answers, correct, scores = (list(col) for col in zip(*rows))
        return samples_from_completions(f"step-{step}", float(train_flops), self.problem_ids, answers, correct,
                                        scores if self.score_fn is not None else None)

    def evaluate(self, model, step: int, train_flops: float) -> TTCDecision:
        """Sample, verify, record this checkpoint and decide whether to stop.

        Only this checkpoint's (k, strategy) candidates can stop training: the monitor keeps no
        weights, so an earlier checkpoint that met the target is only reported
        (``TTCDecision.earliest``). A checkpoint whose evaluation raises is not recorded.

        Args:
            model: anything ``sample_fn`` accepts (a transformers causal LM for the task default).
            step: the training step (names the checkpoint ``step-<step>``).
            train_flops: training FLOPs spent so far (float, >= those of earlier evaluations).
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        train_flops = _number(train_flops, "train_flops", none=False)
        if self.checkpoints and train_flops < self.checkpoints[-1].train_flops:
            raise ValueError("train_flops must not decrease between evaluations")
        if any(c.name == f"step-{step}" for c in self.checkpoints):
            raise ValueError(f"step {step} was already evaluated")
        shard = shard_for(self.distributed, self.process_group)
        ck = self._checkpoint(model, step, train_flops, shard)
        self.samples_drawn += len(self.problems) * self.n_samples
        if shard is None:
            d = self._decide(self.checkpoints + [ck], int(step))
        else:  # one decision, rank 0's, on every rank
            d = shard.from_first(self._decide(self.checkpoints + [ck], int(step)) if shard.rank == 0 else None)
        self.checkpoints.append(ck)
        self.decisions.append(d)
        return d

    def _decide(self, cks: list[CheckpointSamples], step: int) -> TTCDecision:
        """The decision at the last of ``cks`` (the checkpoint just evaluated, at ``step``)."""
        ck = cks[-1]
        target, projection, why_not = self._target(cks)
        sel = select(cks, k_max=self.k_max, target=0.0 if target is None else target,
                     tolerance=self.tolerance, strategies=self.strategies, queries=self.expected_queries,
                     infer_flops_per_sample=self.infer_flops_per_sample,
                     final_train_flops=self._reference_flops(cks))
        acc = {s: [float(v) for v in sel.estimates[(ck.name, s)].mean] for s in sel.strategies}
        choice = earliest = None
        if target is None:
            reason = why_not
        else:
            order = {s: i for i, s in enumerate(sel.strategies)}
            ok = sorted((c for c in sel.table if c.meets and self._pays_off(c)),
                        key=lambda c: (c.train_flops, c.k, order[c.strategy]))
            earliest = ok[0] if ok else None
            choice = next((c for c in ok if c.checkpoint == ck.name), None)
            thr = target - self.tolerance
            if choice is None:
                here = [c for c in sel.table if c.checkpoint == ck.name]
                best = max(here, key=lambda c: c.accuracy)
                pays = ("" if self.expected_queries is None else
                        f" with a break-even Q* >= the declared {self.expected_queries:.4g} queries")
                reason = (f"no k<={self.k_max} at {ck.name} reaches {thr:.4f}{pays} (best: {best.strategy} "
                          f"k={best.k}: {best.accuracy:.4f})")
            else:
                reason = (f"{ck.name} with {choice.strategy} k={choice.k} reaches {choice.accuracy:.4f} "
                          f">= {thr:.4f}; {self._q_text(choice)}")
            if earliest is not None and earliest.checkpoint != ck.name:
                reason += (f"; the earlier {earliest.checkpoint} met it with {earliest.strategy} "
                           f"k={earliest.k} (its weights are not kept by this monitor)")
            if projection is not None:
                reason += (f"; target = {projection.last_accuracy:.4f} (k=1 here) + {projection.gain_upper:.4f} "
                           f"(the {projection.confidence:.0%} upper bound of the gain still projected; "
                           f"{projection.form} form, final accuracy {projection.point:.4f} in "
                           f"[{projection.lower:.4f}, {projection.upper:.4f}])")
        f = self.infer_flops_per_sample
        drawn = sum(len(v) for v in ck.problems.values())
        return TTCDecision(step, ck.train_flops, choice is not None, reason, target, choice, acc, drawn,
                           None if f is None else f * drawn, earliest, sel, projection)

    def _reference_flops(self, cks: list[CheckpointSamples]) -> float | None:
        if self.planned_train_flops is None:
            return None
        return max(self.planned_train_flops, max(c.train_flops for c in cks))

    def _pays_off(self, c: Candidate) -> bool:
        if self.expected_queries is None:
            return True
        return c.break_even is not None and self.expected_queries <= c.break_even

    def _q_text(self, c: Candidate) -> str:
        if self.planned_train_flops is None:
            return "Q* unknown (give planned_train_flops)"
        if c.break_even is None:
            return "Q* unknown (give infer_flops_per_sample)"
        if math.isinf(c.break_even):
            return "Q*=inf (no extra inference per query)"
        return f"Q*={c.break_even:.3g} queries"

    def _target(self, cks: list[CheckpointSamples]) -> tuple[float | None, Projection | None, str]:
        """``(target, projection, why none)``: the number given, or this checkpoint's accuracy plus
        the upper bound of the projected remaining gain."""
        if not isinstance(self.target, str):
            return float(self.target), None, ""
        if len(cks) < self.min_checkpoints:
            return None, None, (f"projection waits for {self.min_checkpoints} checkpoints "
                                f"(have {len(cks)})")
        forms = FORMS if self.fit_model == "auto" else (self.fit_model,)
        proj = project_checkpoints(cks, self.planned_train_flops, forms=forms, confidence=self.confidence)
        if not proj.ok:
            return None, proj, f"no projection yet: {proj.reason}"
        return round(min(1.0, proj.last_accuracy + proj.gain_upper), 9), proj, ""

    # -- state -------------------------------------------------------------------------------------
    def _settings(self) -> dict:
        ids = self.problem_ids
        jsonable = all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in ids)
        return {"problems": len(ids), "problem_ids": list(ids) if jsonable else None,
                "n_samples": self.n_samples, "k_max": self.k_max, "strategies": list(self.strategies),
                "target": self.target, "tolerance": self.tolerance,
                "planned_train_flops": self.planned_train_flops, "expected_queries": self.expected_queries,
                "infer_flops_per_sample": self.infer_flops_per_sample,
                "min_checkpoints": self.min_checkpoints, "fit_model": self.fit_model,
                "confidence": self.confidence, "seed": self.seed}

    def state_dict(self) -> dict:
        """The recorded evaluations as a JSON-serialisable dict (what :meth:`load_state_dict`
        takes): the settings they were made under, ``samples_drawn``, and per evaluated
        checkpoint its ``step``, ``train_flops`` and the ``[P][n]`` answers, verdicts and scores
        (``None`` without a ``score_fn``). Decisions are not stored: they follow from the
        checkpoints and are recomputed on load."""
        cks = [{"step": d.step, "train_flops": ck.train_flops, "answers": ck.answers(),
                "correct": ck.correct(), "scores": ck.scores() if self.score_fn is not None else None}
               for ck, d in zip(self.checkpoints, self.decisions)]
        return {"version": _STATE_VERSION, "settings": self._settings(),
                "samples_drawn": self.samples_drawn, "checkpoints": cks}

    def load_state_dict(self, state: dict) -> None:
        """Replace the recorded evaluations with those of :meth:`state_dict` (e.g. when training
        resumes from a checkpoint) and recompute their decisions under this monitor's settings.

        The problems (count and ids) and ``n_samples`` must be those the state was recorded with
        (``ValueError`` otherwise); other settings that differ are named in a ``RuntimeWarning``.
        Everything is checked before anything changes: a bad state leaves the monitor as it was.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from TTCMonitor.state_dict(), got {type(state).__name__}")
        missing = {"version", "settings", "samples_drawn", "checkpoints"} - set(state)
        if missing:
            raise ValueError(f"TTCMonitor state lacks {sorted(missing)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"TTCMonitor state version {state['version']!r} is not {_STATE_VERSION}")
        saved, mine = state["settings"], self._settings()
        if not isinstance(saved, dict):
            raise TypeError("TTCMonitor state: settings must be a dict")
        for key in ("problems", "n_samples"):
            if saved.get(key) != mine[key]:
                raise ValueError(f"TTCMonitor state was recorded with {key}={saved.get(key)!r}, this monitor "
                                 f"has {mine[key]!r}: its samples cannot be used here")
        if saved.get("problem_ids") is not None and mine["problem_ids"] is not None \
                and saved["problem_ids"] != mine["problem_ids"]:
            raise ValueError("TTCMonitor state was recorded on other problem ids than this monitor's")
        drawn = state["samples_drawn"]
        if isinstance(drawn, bool) or not isinstance(drawn, numbers.Integral) or drawn < 0:
            raise ValueError(f"TTCMonitor state: samples_drawn must be an integer >= 0, got {drawn!r}")
        records = state["checkpoints"]
        if not isinstance(records, list):
            raise TypeError("TTCMonitor state: checkpoints must be a list")
        cks, steps = [], []
        for i, rec in enumerate(records):
            where = f"TTCMonitor state: checkpoints[{i}]"
            if not isinstance(rec, dict) or not {"step", "train_flops", "answers", "correct"} <= set(rec):
                raise ValueError(f"{where} must be a dict with step, train_flops, answers, correct")
            step = rec["step"]
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0 or step in steps:
                raise ValueError(f"{where}: step must be a distinct integer >= 0, got {step!r}")
            flops = _number(rec["train_flops"], f"{where}.train_flops", none=False)
            if cks and flops < cks[-1].train_flops:
                raise ValueError(f"{where}: train_flops decreases")
            answers, correct, scores = rec["answers"], rec["correct"], rec.get("scores")
            rows = [answers, correct] + ([] if scores is None else [scores])
            if not all(isinstance(r, list) and len(r) == len(self.problems)
                       and all(isinstance(x, list) and len(x) == self.n_samples for x in r) for r in rows):
                raise ValueError(f"{where}: answers, correct and scores must be "
                                 f"[{len(self.problems)}][{self.n_samples}] lists")
            if not all(isinstance(a, str) for row in answers for a in row):
                raise TypeError(f"{where}: answers must be strings")
            if self.score_fn is not None and scores is None:
                raise ValueError(f"{where} has no scores, and this monitor scores samples (score_fn)")
            try:
                ck = samples_from_completions(f"step-{int(step)}", flops, self.problem_ids, answers, correct,
                                              scores if self.score_fn is not None else None)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where}: {e}") from None
            cks.append(ck)
            steps.append(int(step))
        changed = sorted(k for k in mine if k not in ("problems", "problem_ids", "n_samples")
                         and saved.get(k) != mine[k])
        decisions = [self._decide(cks[:i + 1], step) for i, step in enumerate(steps)]
        if changed:
            warnings.warn("TTCMonitor.load_state_dict: the state was recorded under other settings "
                          f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); its decisions are "
                          "recomputed under this monitor's", RuntimeWarning, stacklevel=2)
        self.checkpoints, self.decisions, self.samples_drawn = cks, decisions, int(drawn)

    def write(self, path) -> int:
        """Write the recorded samples as JSONL (see :mod:`grades.ttc.samples`); returns lines."""
        return write_samples(path, self.checkpoints)


def _trainer_callback_base():
    from transformers import TrainerCallback
    return TrainerCallback


class TTCEarlyStopping(_trainer_callback_base()):
    """``transformers.TrainerCallback`` running a :class:`TTCMonitor` every ``eval_steps`` steps.

    Training FLOPs come from, in order of preference: ``ledger`` (a
    :class:`~grades.ttc.flops.FlopLedger` that something else fills each step), ``train_flops_fn``
    (``state -> float``), or ``flops_per_step * state.global_step``. With a ledger, the inference
    FLOPs of each evaluation's sampling go into its ``eval_flops`` (:meth:`FlopLedger.add_eval`), so
    the monitor needs ``infer_flops_per_sample``. When the monitor decides to stop,
    ``control.should_training_stop`` is set; the model's weights at that step are the chosen
    checkpoint. Decisions are in ``monitor.decisions``.
    Under ``torch.distributed`` (the Trainer calls callbacks on every rank) the monitor shards the
    evaluation problems across the ranks and every rank gets the same decision (see
    :class:`TTCMonitor`'s ``distributed``); the training FLOPs must then be the same on every rank
    (a ledger counting the global batch), or the evaluation is refused on every rank.

    Resuming: the monitor's recorded evaluations (and the ledger's totals) travel in every
    checkpoint's ``trainer_state.json``, under ``stateful_callbacks["grades.TTCEarlyStopping"]``,
    and are restored when training resumes from that checkpoint (the projection then keeps its
    earlier points, and the ledger its FLOP count). A ledger filled by another callback should be
    filled before this one's ``on_step_end`` (e.g. in ``on_optimizer_step``), or a checkpoint's
    copy misses that step. The entry is the callback's own, not an ``ExportableState``: the
    Trainer's ``restore_callback_states_from_checkpoint`` cannot rebuild a monitor (it holds your
    functions) and only notes the entry as unknown.
    """

    STATE_KEY = "grades.TTCEarlyStopping"

    def __init__(self, monitor: TTCMonitor, *, eval_steps: int, flops_per_step: float | None = None,
                 ledger=None, train_flops_fn: Callable[[Any], float] | None = None):
        from .flops import FlopLedger
        if not isinstance(monitor, TTCMonitor):
            raise TypeError("monitor must be a TTCMonitor")
        if isinstance(eval_steps, bool) or not isinstance(eval_steps, numbers.Integral) or eval_steps < 1:
            raise ValueError(f"eval_steps must be an integer >= 1, got {eval_steps!r}")
        if ledger is None and train_flops_fn is None and flops_per_step is None:
            raise ValueError("give ledger, train_flops_fn or flops_per_step to count training FLOPs")
        if ledger is not None and not isinstance(ledger, FlopLedger):
            raise TypeError(f"ledger must be a FlopLedger, got {type(ledger).__name__}")
        if ledger is not None and monitor.infer_flops_per_sample is None:
            raise ValueError("with a ledger, give the monitor infer_flops_per_sample: the ledger "
                             "accounts the FLOPs of the TTC sampling (FlopLedger.eval_flops)")
        if train_flops_fn is not None and not callable(train_flops_fn):
            raise TypeError("train_flops_fn must be callable (state -> FLOPs)")
        self.flops_per_step = _number(flops_per_step, "flops_per_step")
        self.monitor, self.eval_steps = monitor, int(eval_steps)
        self.ledger, self.train_flops_fn = ledger, train_flops_fn
        self.stopped_at: int | None = None
        self._monitor_state: tuple[int, dict] | None = None

    def _flops(self, state) -> float:
        if self.ledger is not None:
            return float(self.ledger.train_flops)
        if self.train_flops_fn is not None:
            return float(self.train_flops_fn(state))
        return self.flops_per_step * state.global_step

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the monitor's :meth:`TTCMonitor.state_dict`, the ledger's
        totals (``None`` without a ledger), ``eval_steps`` and ``stopped_at``."""
        n = len(self.monitor.checkpoints)
        if self._monitor_state is None or self._monitor_state[0] != n:
            self._monitor_state = (n, self.monitor.state_dict())
        return {"version": _STATE_VERSION, "monitor": self._monitor_state[1],
                "ledger": None if self.ledger is None else self.ledger.state_dict(),
                "eval_steps": self.eval_steps, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the monitor's evaluations and the ledger's totals. The
        ledger's totals are refused (``ValueError``) when the state has them and this callback has
        no ledger, or the other way round; nothing changes when anything is refused."""
        if not isinstance(state, dict) or "monitor" not in state or "ledger" not in state:
            raise ValueError("not a TTCEarlyStopping state (a dict with 'monitor' and 'ledger')")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"TTCEarlyStopping state version {state.get('version')!r} is not {_STATE_VERSION}")
        if (state["ledger"] is None) != (self.ledger is None):
            raise ValueError("the TTCEarlyStopping state was saved " + ("without" if state["ledger"] is None
                             else "with") + " a FlopLedger and this callback has " +
                             ("one" if self.ledger is not None else "none"))
        stopped = state.get("stopped_at")
        if stopped is not None and (isinstance(stopped, bool) or not isinstance(stopped, numbers.Integral)):
            raise ValueError(f"TTCEarlyStopping state: stopped_at must be an int or None, got {stopped!r}")
        ledger_backup = None if self.ledger is None else self.ledger.state_dict()
        if self.ledger is not None:
            self.ledger.load_state_dict(state["ledger"])
        try:
            self.monitor.load_state_dict(state["monitor"])
        except BaseException:
            if ledger_backup is not None:
                self.ledger.load_state_dict(ledger_backup)
            raise
        self.stopped_at = None if stopped is None else int(stopped)
        self._monitor_state = None

    def _save_to(self, state) -> None:
        if isinstance(getattr(state, "stateful_callbacks", None), dict):
            state.stateful_callbacks[self.STATE_KEY] = self.state_dict()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:
            saved = (getattr(state, "stateful_callbacks", None) or {}).get(self.STATE_KEY)
            if saved is not None:
                self.load_state_dict(saved)
            else:
                warnings.warn(f"TTCEarlyStopping: training resumes at step {state.global_step} but the checkpoint "
                              "holds no TTC state (saved without this callback), so the monitor keeps what it "
                              "has recorded in this process" + (" and the ledger's FLOP count does not include "
                                                                "the steps before the resume"
                                                                if self.ledger is not None else ""),
                              RuntimeWarning, stacklevel=2)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.eval_steps == 0 and model is not None:
            d = self.monitor.evaluate(model, state.global_step, self._flops(state))
            if self.ledger is not None:
                self.ledger.add_eval(d.eval_flops)
            if d.stop:
                self.stopped_at = state.global_step
                control.should_training_stop = True
            self._save_to(state)
        elif control.should_save:
            self._save_to(state)
        return control
