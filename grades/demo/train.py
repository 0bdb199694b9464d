"""The demo's training runs: (A) ``FrozenAwareAdamW`` with GradES off, (B) the same with GradES
on, and (P) plain ``torch.optim.AdamW``, the parity check of A.

All runs start from the same seeded model, see the same batches in the same order under the
same learning-rate schedule, and are timed the same way (training loop only; checkpoint copies
and evaluation are outside the timed region). Training FLOPs are counted per step with
:class:`grades.ttc.FlopLedger`, which charges a frozen matrix 4 instead of 6 FLOPs per weight
and token (no weight-gradient GEMM). A and B run the same optimizer and kernels, so they are
the same run, bit for bit, until GradES freezes its first matrix: every later difference is
GradES's doing. P differs from A only in the last bits of its float sums.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .models import tiny_llama
from .tasks import AdditionTask, DigitTask, SortTask
from ..ttc import FlopLedger
from .config import DemoConfig


@dataclass
class Checkpoint:
    """A copy of the model's weights at ``step`` and the training FLOPs spent to get there."""

    name: str
    run: str
    step: int
    train_flops: float
    state: dict = field(repr=False)


@dataclass
class RunResult:
    """What one training run produced."""

    name: str
    model: torch.nn.Module
    steps: int
    wall_s: float
    losses: list[float]
    ledger: FlopLedger
    checkpoints: list[Checkpoint]
    stopped_early: bool = False
    grades: Optional[object] = None          # the GradES instance of run B
    frozen_steps: list[tuple[int, int]] = field(default_factory=list)  # (step, frozen count)


RUNS = {"A": "grades.FrozenAwareAdamW (GradES off)", "B": "grades.FrozenAwareAdamW + grades.GradES",
        "P": "torch.optim.AdamW"}


def make_task(cfg: DemoConfig) -> DigitTask:
    """The demo's embedded task: digit sorting, or addition with reversed answers (seeded split)."""
    if cfg.task == "sort":
        return SortTask(digits=cfg.digits, seed=cfg.seed, n_val=cfg.n_val, n_test=cfg.n_test)
    return AdditionTask(digits=cfg.digits, seed=cfg.seed, n_val=cfg.n_val, n_test=cfg.n_test,
                        reverse_answer=True)


def _schedule(cfg: DemoConfig):
    warm = max(1, int(round(cfg.warmup_frac * cfg.steps)))

    def factor(s: int) -> float:
        # s counts completed steps: the first update uses factor(0)
        return min(1.0, (s + 1) / warm) * max(0.0, 1.0 - s / cfg.steps)
    return factor


def _checkpoint_steps(cfg: DemoConfig) -> list[int]:
    steps = sorted({max(1, int(round(f * cfg.steps))) for f in cfg.checkpoint_fracs})
    return [s for s in steps if s < cfg.steps]


def _snapshot(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(device: torch.device) -> None:
    """Select (and, for native backends, build or load) the grades kernels for ``device`` once,
    outside any timed region, so that neither run's wall time includes a one-off compilation."""
    from ..ops import grad_stats, masked_adamw_
    p, g = torch.zeros(8, device=device), torch.ones(8, device=device)
    m, v = torch.zeros(8, device=device), torch.zeros(8, device=device)
    grad_stats([g])
    masked_adamw_([p], [g], [m], [v], step=1)
    _sync(device)


def _optimizer(cfg: DemoConfig, model: torch.nn.Module, run: str):
    """The optimizer of ``run`` and, for B, its GradES policy."""
    from ..optim import FrozenAwareAdamW
    from ..policy import GradES, GradESConfig

    kw = dict(lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=cfg.weight_decay)
    if run == "P":
        return torch.optim.AdamW(model.parameters(), **kw), None
    opt = FrozenAwareAdamW(model.parameters(), **kw)
    if run == "A":
        return opt, None
    threshold = dict(rel_tau=cfg.rel_tau) if cfg.tau is None else dict(tau=cfg.tau)
    return opt, GradES(model, opt, GradESConfig(**threshold, statistic=cfg.statistic, ema=cfg.ema,
                                                alpha=cfg.alpha, total_steps=cfg.steps,
                                                patience=cfg.patience, freeze_quorum=cfg.freeze_quorum,
                                                history_every=1,
                                                history_max=max(2000, cfg.steps + 1)))


def train(cfg: DemoConfig, task: DigitTask, run: str, *, progress: bool = True) -> RunResult:
    """Train one run (see :data:`RUNS`): ``"A"`` and ``"P"`` use the full budget, ``"B"`` stops
    when every component is frozen or at the budget. Raises ``ValueError`` for another name."""
    from tqdm.auto import tqdm

    if run not in RUNS:
        raise ValueError(f"run must be one of {', '.join(RUNS)}, got {run!r}")
    device = torch.device(cfg.device)
    warm_up(device)
    model = tiny_llama(task.vocab_size, cfg.model_size, seed=cfg.seed).to(device)
    model.train()
    opt, gs = _optimizer(cfg, model, run)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    ledger = FlopLedger(model.config, seq_len=None)
    batches = task.iterate(cfg.batch_size, seed=cfg.seed)
    ck_steps = set(_checkpoint_steps(cfg)) if run != "P" else set()
    checkpoints: list[Checkpoint] = []
    losses: list[torch.Tensor] = []
    frozen_steps: list[tuple[int, int]] = []
    frozen_names: list[str] = []
    label = {"A": "A: GradES off", "B": "B: GradES on ", "P": "P: torch AdamW"}[run]
    bar = tqdm(total=cfg.steps, desc=label, disable=not progress, leave=True, dynamic_ncols=True,
               mininterval=0.5)
    torch.manual_seed(cfg.seed)
    wall = 0.0
    step = 0
    stopped = False
    _sync(device)
    t0 = time.perf_counter()
    while step < cfg.steps:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        loss = model(**batch).loss
        loss.backward()
        norm = None
        if cfg.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        if gs is not None:
            # GradES divides the clip coefficient out (none without a clip): it judges the unclipped gradient
            gs.step(total_norm=norm, max_norm=cfg.max_grad_norm)
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        losses.append(loss.detach())
        ledger.add_step(float(batch["input_ids"].numel()), frozen_names)
        if gs is not None:
            # the host learns freeze decisions through gs (non-blocking); the FLOP count follows it
            if len(gs.frozen_components) != len(frozen_names):
                frozen_names = gs.frozen_components
            frozen_steps.append((step, len(frozen_names)))
        if step % 25 == 0 or step == cfg.steps:
            bar.update(step - bar.n)
            post = {"loss": f"{float(loss.detach()):.3f}"}
            if gs is not None:
                post["frozen"] = f"{len(frozen_names)}/{gs.num_components}"
            bar.set_postfix(post, refresh=False)
        if step in ck_steps:
            _sync(device)
            wall += time.perf_counter() - t0
            checkpoints.append(Checkpoint(f"{run}@{step}", run, step, ledger.train_flops, _snapshot(model)))
            t0 = time.perf_counter()
        if gs is not None and gs.should_stop:
            stopped = True
            break
    _sync(device)
    wall += time.perf_counter() - t0
    if gs is not None:
        gs.wait()
    bar.update(step - bar.n)
    if stopped:
        bar.set_postfix_str(f"stopped by GradES at step {step}: all {gs.num_components} components frozen")
    bar.close()
    checkpoints.append(Checkpoint(f"{run}@{step}", run, step, ledger.train_flops, _snapshot(model)))
    return RunResult(name=run, model=model, steps=step, wall_s=wall,
                     losses=torch.stack(losses).float().cpu().tolist(), ledger=ledger,
                     checkpoints=checkpoints, stopped_early=stopped, grades=gs, frozen_steps=frozen_steps)
