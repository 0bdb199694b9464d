"""``grades demo``: GradES and TTC-aware early stopping on a tiny model, end to end, offline.

It trains a seeded tiny Llama on an embedded task (5-digit sorting by default) with the same
step budget and the same optimizer, :class:`grades.FrozenAwareAdamW`: (A) with GradES off for
the whole budget, (B) with the :class:`grades.GradES` policy, which freezes weight matrices whose
gradient magnitude has fallen below their threshold and stops once all are frozen. A and B are
the same run, bit for bit, until B's first freeze. A third run (P) with ``torch.optim.AdamW``
checks A's parity. It measures the runs on the held-out test set, checks its own premise (the
baseline learned the task), samples the checkpoints saved along A and B to choose (checkpoint,
k) with the TTC evaluator, prints a table and writes a report directory::

    grades demo                      # CPU, a few minutes on 2 cores
    grades demo --quick --out /tmp/r # the reduced CI configuration (well under a minute)
    grades demo --device cuda --model-size small --steps 3000

Every number is measured in the run; nothing is assumed. When the baseline did not learn the
task, the table says so and no TTC target is derived from it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .config import DemoConfig, quick_config, validate

__all__ = ["main", "build_parser", "run_demo", "DemoConfig"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grades demo", description=(
        "Train a tiny Llama on an embedded task with FrozenAwareAdamW, GradES off (A) and on (B), "
        "compare time, FLOPs and accuracy, and choose a (checkpoint, k) with the TTC evaluator."))
    d = DemoConfig()
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: cpu)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer step budget of each run (default: {d.steps})")
    p.add_argument("--model-size", default=d.model_size, help="tiny, small or base (default: tiny)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of model, data and sampling (default: 0)")
    p.add_argument("--task", default=d.task, choices=("sort", "addition"),
                   help=f"embedded task: sort a digit string, or add two numbers (default: {d.task})")
    p.add_argument("--digits", type=int, default=d.digits,
                   help=f"digits to sort (2-8) or per operand (1-6) (default: {d.digits})")
    p.add_argument("--out", default=d.out, help="report directory (default: ./grades_report)")
    p.add_argument("--quick", action="store_true", help="reduced configuration for CI (well under a minute)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"problems per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--rel-tau", type=float, default=d.rel_tau,
                   help=f"GradES relative threshold, fraction of each matrix's level at the end of the "
                        f"grace period (default: {d.rel_tau})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"GradES grace period, fraction of --steps (default: {d.alpha})")
    p.add_argument("--patience", type=int, default=d.patience, help=f"GradES patience in checks (default: {d.patience})")
    p.add_argument("--freeze-quorum", type=float, default=d.freeze_quorum,
                   help="GradES: matrices freeze only once this fraction of them qualifies; 1 freezes all at "
                        f"the stop, so B is A cut short (default: {d.freeze_quorum:g}, each on its own)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default: {d.threads}; 0 keeps torch's own setting)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(device=args.device, seed=args.seed, model_size=args.model_size, task=args.task,
                     digits=args.digits,
                     out=args.out, batch_size=args.batch_size, lr=args.lr, rel_tau=args.rel_tau,
                     alpha=args.alpha, patience=args.patience, freeze_quorum=args.freeze_quorum,
                     threads=None if args.threads == 0 else args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.quick:
        steps = cfg.steps
        cfg = quick_config(cfg)
        if args.steps is not None:
            cfg.steps = steps
    return cfg


def _check_device(device: str) -> None:
    import torch
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available in this PyTorch "
                         f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'}); "
                         "use --device cpu")


def run_demo(cfg: DemoConfig, *, progress: bool = True, stream=None) -> dict:
    """Run the whole demo with ``cfg`` and write the report; returns the report dictionary."""
    from .runner import run
    return run(cfg, progress=progress, stream=stream if stream is not None else sys.stdout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``grades demo``; returns the process exit status (0 ok, 2 bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the message
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        cfg = _config_from_args(args)
        if not 0 < cfg.rel_tau <= 1:
            raise ValueError(f"--rel-tau must be in (0, 1], got {cfg.rel_tau}")
        if not 0 < cfg.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {cfg.alpha}")
        if cfg.patience < 0:
            raise ValueError(f"--patience must be >= 0, got {cfg.patience}")
        if cfg.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {cfg.lr}")
        validate(cfg)
        _check_device(cfg.device)
    except ValueError as e:
        print(f"grades demo: error: {e}", file=sys.stderr)
        return 2
    run_demo(cfg, progress=not args.no_progress)
    return 0
