"""The demo's test-time-compute step: sample every saved checkpoint, then choose (checkpoint, k).

For each checkpoint (several along each run, and each run's final weights) the same subset of
test problems is answered ``n`` times by sampling; from those one batch of samples
:func:`grades.ttc.select` evaluates pass@k and majority@k for every k up to ``k_max`` and picks
the checkpoint with the fewest training FLOPs whose accuracy at some k reaches the target (the
accuracy at k = 1 of the checkpoint with the most training FLOPs, minus a tolerance), together
with its break-even query count Q*.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tasks import DigitTask, generate_answers
from ..ttc import CheckpointSamples, Selection, inference_flops_per_sample, samples_from_completions, select
from .config import DemoConfig
from .train import Checkpoint


@dataclass
class TTCResult:
    """Samples of every checkpoint, their accuracy-vs-k curves and the choices made from them
    (one per strategy; none when the baseline gives no target to derive)."""

    samples: list[CheckpointSamples]
    curves: dict[str, Selection]
    selections: dict[str, Selection]
    infer_flops_per_sample: float
    problem_ids: list[int]


def sample_checkpoints(cfg: DemoConfig, task: DigitTask, model: torch.nn.Module,
                       checkpoints: list[Checkpoint], *, progress: bool = True) -> list[CheckpointSamples]:
    """Load each checkpoint into ``model`` and draw ``cfg.ttc_samples`` answers per problem."""
    from tqdm.auto import tqdm

    problems = task.test[:cfg.ttc_problems]
    ids = list(range(len(problems)))
    out = []
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # one sampling seed for every checkpoint: equal weights (A and B before the first freeze)
    # give equal samples, and differences between checkpoints are not sampling noise alone
    for ck in tqdm(checkpoints, desc="TTC sampling     ", disable=not progress, dynamic_ncols=True):
        model.load_state_dict(ck.state)
        comps = generate_answers(model, task, problems, num_samples=cfg.ttc_samples, do_sample=True,
                                 temperature=cfg.ttc_temperature, batch_size=512,
                                 seed=cfg.seed * 1000)
        answers = [[c.strip() for c in row] for row in comps]
        correct = [[task.verify(ex, c) for c in row] for ex, row in zip(problems, comps)]
        out.append(samples_from_completions(ck.name, ck.train_flops, ids, answers, correct))
    model.load_state_dict(saved)
    return out


def evaluate(cfg: DemoConfig, task: DigitTask, model: torch.nn.Module, checkpoints: list[Checkpoint],
             *, progress: bool = True, choose: bool = True) -> TTCResult:
    """Sample all checkpoints and run the selection for pass@k (oracle verifier: an upper bound)
    and majority@k (deployable without a verifier); ``choose=False`` (a baseline that did not
    converge) measures the curves only and derives no target."""
    samples = sample_checkpoints(cfg, task, model, checkpoints, progress=progress)
    f = inference_flops_per_sample(model.config, task.prompt_len, task.answer_len + 1)
    sels = {}
    for strat in ("pass@k", "majority@k"):
        sels[strat] = select(samples, k_max=cfg.ttc_k_max, target="final" if choose else 0.0,
                             tolerance=cfg.ttc_tolerance, strategies=[strat], infer_flops_per_sample=f)
    return TTCResult(samples, sels, sels if choose else {}, f,
                     list(range(min(cfg.ttc_problems, len(task.test)))))
