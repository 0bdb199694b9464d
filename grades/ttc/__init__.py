"""Test-time-compute-aware early stopping.

Can an intermediate checkpoint plus k samples per query (pass@k, majority vote, best-of-k) match
the fully trained model for fewer training FLOPs, and up to how many queries does that pay off?

* :mod:`~grades.ttc.estimators` -- accuracy at every k from one set of n samples per problem.
* :mod:`~grades.ttc.fits` -- saturating fits of accuracy vs k and vs training FLOPs.
* :mod:`~grades.ttc.projection` -- accuracy projected to the planned training FLOPs, with a
  confidence interval (what early stopping decides by).
* :mod:`~grades.ttc.select` -- the (checkpoint, k, strategy) choice and the break-even volume Q*.
* :mod:`~grades.ttc.flops` -- training / inference FLOP accounting (dense, MoE, LoRA),
  GradES-aware ledger.
* :mod:`~grades.ttc.samples` -- the samples JSONL format.
* :mod:`~grades.ttc.callback` -- :class:`TTCMonitor` (plain loops) and :class:`TTCEarlyStopping`
  (transformers ``TrainerCallback``); imported lazily (they pull in transformers).
* :mod:`~grades.ttc.shard` -- evaluation problems split across ``torch.distributed`` ranks.
* ``grades ttc SAMPLES.jsonl`` -- the offline command (:mod:`~grades.ttc.cli`).

pass@k assumes an oracle verifier at deployment; it bounds what a real selector can reach.
"""
from __future__ import annotations

from .estimators import Estimate, best_of_k, majority_at_k, pass_at_k
from .fits import ExtrapolationError, FitResult, PoorFitError, fit_accuracy_vs_flops, fit_accuracy_vs_k
from .flops import (FlopLedger, LoraSpec, active_weights, inference_flops_per_sample,
                    inference_flops_per_token, matrix_shapes, training_flops)
from .samples import (CheckpointSamples, Sample, SamplesFormatError, load_samples,
                      samples_from_completions, write_samples)
from .select import STRATEGIES, Candidate, Selection, break_even_queries, select

__all__ = ["Estimate", "pass_at_k", "majority_at_k", "best_of_k", "FitResult", "PoorFitError",
           "ExtrapolationError", "fit_accuracy_vs_k", "fit_accuracy_vs_flops", "FlopLedger",
           "training_flops", "LoraSpec", "active_weights", "inference_flops_per_token",
           "inference_flops_per_sample", "matrix_shapes",
           "Sample", "CheckpointSamples", "SamplesFormatError", "load_samples", "write_samples",
           "samples_from_completions", "STRATEGIES", "Candidate", "Selection", "select",
           "break_even_queries", "TTCMonitor", "TTCEarlyStopping", "TTCDecision"]

_LAZY = {"TTCMonitor", "TTCEarlyStopping", "TTCDecision"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import callback
        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
