"""Settings of ``grades demo``: one dataclass, a full and a quick preset, and their validation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Union

from .._checks import check_number
from ..policy.config import DEFAULT_ALPHA, DEFAULT_EMA, DEFAULT_PATIENCE, DEFAULT_REL_TAU, GradESConfig
from ..ttc.cli import DEFAULT_TOLERANCE
from .models import LLAMA_SIZES


#: embedded tasks of the demo and their allowed --digits
TASKS = {"sort": (2, 8), "addition": (1, 6)}


@dataclass
class DemoConfig:
    """Everything a demo run depends on (all of it goes into ``report.json``).

    Task and model: ``task`` (``"sort"``: sort a string of ``digits`` digits; ``"addition"``:
    ``digits``-digit addition with reversed answers), a seeded Llama of ``model_size``. Training:
    ``steps`` optimizer steps of ``batch_size`` problems, AdamW (``lr``, betas ``(0.9, beta2)``)
    with linear warm-up over ``warmup_frac`` of the budget and linear decay to zero at ``steps``
    (every run uses the same schedule), the gradients' total norm clipped to ``max_grad_norm``
    (``None``: no clipping) as transformers' ``Trainer`` does by default: unclipped, Adam's loss
    spikes at the task's near-zero loss dropped test accuracy to 0.80 in mid-run on some seeds
    and kept the gradients from settling until late. Sorting is learned steadily, with no loss
    plateau whose escape the last bits of float sums could decide, and by about a quarter of the
    default budget: the budget leaves a wide margin over convergence. GradES, with
    ``GradESConfig``'s defaults: the automatic threshold (``rel_tau`` times each component's own
    level at the end of the grace period ``alpha * steps``, its lowest statistic in the last
    quarter of that period), an EMA of the statistic, and ``patience`` checks below threshold,
    told the clip so that it judges the unclipped gradient.
    TTC: ``ttc_problems`` test problems, ``ttc_samples`` samples each at temperature
    ``ttc_temperature`` for every saved checkpoint, k up to ``ttc_k_max``, target = A's final
    accuracy at k = 1 minus ``ttc_tolerance``. ``threads``: torch CPU threads (default 1: the
    tiny model's operations are too small to gain from intra-op threads, and several threads slow
    down badly when the cores are shared with other work; ``None`` keeps torch's own setting).
    """

    device: str = "cpu"
    seed: int = 0
    model_size: str = "tiny"
    task: str = "sort"
    digits: int = 5
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    beta2: float = 0.999
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    max_grad_norm: Optional[float] = 1.0
    n_val: int = 200
    n_test: int = 500
    threads: Optional[int] = 1
    # GradES
    statistic: str = "l1"
    rel_tau: float = DEFAULT_REL_TAU
    # absolute threshold instead of rel_tau: one number or {component type: number} (GradESConfig.tau)
    tau: Optional[Union[float, dict]] = None
    alpha: float = DEFAULT_ALPHA
    patience: int = DEFAULT_PATIENCE
    ema: float = DEFAULT_EMA
    freeze_quorum: float = GradESConfig.freeze_quorum  # (1.0: every matrix freezes at the stop)
    # checkpoints and TTC
    checkpoint_fracs: tuple = (0.25, 0.5, 0.75)
    ttc_problems: int = 100
    ttc_samples: int = 16
    ttc_k_max: int = 16
    ttc_temperature: float = 1.0
    ttc_tolerance: float = DEFAULT_TOLERANCE
    quick: bool = False
    out: str = "grades_report"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["checkpoint_fracs"] = list(self.checkpoint_fracs)
        return d


def quick_config(base: DemoConfig) -> DemoConfig:
    """The reduced configuration of ``--quick`` (CI): a short run and a small TTC evaluation.

    It keeps every stage of the full demo (the three trainings, GradES, checkpoints, sampling,
    selection, plots) with a sixth of the budget: enough to learn the default task roughly, not
    to show the margin of the full budget.
    """
    return replace(base, quick=True, steps=min(base.steps, 160), n_val=50, n_test=100,
                   ttc_problems=20, ttc_samples=8, ttc_k_max=8)


def validate(cfg: DemoConfig) -> None:
    """Raise ``ValueError`` with a clear message for settings that cannot work together."""
    if cfg.model_size not in LLAMA_SIZES:
        raise ValueError(f"unknown model size {cfg.model_size!r}; choose one of {', '.join(LLAMA_SIZES)}")
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    lo, hi = TASKS[cfg.task]
    if not lo <= cfg.digits <= hi:
        raise ValueError(f"--digits must be in [{lo}, {hi}] for {cfg.task}, got {cfg.digits}")
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.steps < 4:
        raise ValueError(f"--steps must be >= 4 so that the runs have a grace period, checkpoints and "
                         f"a decision window, got {cfg.steps}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {cfg.batch_size}")
    check_number(cfg.max_grad_norm, "max_grad_norm", lo=0.0, lo_open=True, none=True)
    check_number(cfg.freeze_quorum, "freeze_quorum", lo=0.0, hi=1.0)
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    total = (10 ** cfg.digits) ** (2 if cfg.task == "addition" else 1)
    if cfg.n_val + cfg.n_test >= total:
        raise ValueError(f"{cfg.digits}-digit {cfg.task} has only {total} distinct problems, too few for "
                         f"{cfg.n_val} validation + {cfg.n_test} test problems and a training set; "
                         "use more --digits")
    train = min(20000, total - cfg.n_val - cfg.n_test)
    if train < cfg.batch_size:
        raise ValueError(f"only {train} training problems for a batch of {cfg.batch_size}")
    if cfg.ttc_samples < cfg.ttc_k_max:
        raise ValueError("ttc_samples must be >= ttc_k_max")
    if cfg.ttc_problems < 1:
        raise ValueError("ttc_problems must be >= 1")
