"""The fused update of one step, group by group, with its step counts and statistics rows."""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Optional

import torch

from .._validate import mark_written
from ..backends.base import AdamWArgs
from ..ops import _adamw_args

if TYPE_CHECKING:
    from .adamw import FrozenAwareAdamW
    from .gather import Work

__all__ = ["check_hparams_of", "apply", "record_skip"]


def _lr_of(group: dict, dev: torch.device):
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and (lr.device != dev or lr.dtype != torch.float32 or lr.dim() != 0):
        lr = lr.detach().reshape(()).to(device=dev, dtype=torch.float32, non_blocking=True)
    return lr


def check_hparams_of(opt: "FrozenAwareAdamW", work: list["Work"], grad_scale) -> list[AdamWArgs]:
    """Every group's hyperparameters checked before anything changes (number hyperparameters
    that rarely change are checked once per plan)."""
    dev = opt.frozen.device
    out = []
    for w in work:
        group, plan = w.group, w.plan
        beta1, beta2 = group["betas"]
        lr = _lr_of(group, dev)
        maximize = bool(group.get("maximize", False))
        if isinstance(lr, torch.Tensor) or grad_scale is not None:
            hp = _adamw_args(dev, len(w.params), lr, beta1, beta2, group["eps"], group["weight_decay"],
                             1.0, grad_scale, None)
        else:
            key = (lr, beta1, beta2, group["eps"], group["weight_decay"])
            if plan.hp is None or plan.hp[0] != key:
                plan.hp = (key, _adamw_args(dev, len(w.params), *key, 1.0, None, None))
            hp = plan.hp[1]
        out.append(dataclasses.replace(hp, maximize=True) if maximize else hp)
    return out


def _count_steps(w: "Work", steps: torch.Tensor, active: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """Add ``active`` (bool per participant) to the group's step counts; returns this update's steps."""
    if w.plan.full:
        steps.add_(active.to(steps.dtype), alpha=sign)
        return steps
    steps.index_add_(0, w.plan.idx_local, active.to(torch.float32), alpha=sign)
    return steps.index_select(0, w.plan.idx_local)


def apply(opt: "FrozenAwareAdamW", work: list["Work"], frozens: list[torch.Tensor], hps: list[AdamWArgs],
          found: Optional[torch.Tensor], detected: bool) -> None:
    """One fused call per group; the statistics go to ``last_grad_stats`` unless a detection
    pass has written them (summed over the shard group for FSDP2 parameters, once). A backend
    that refuses the call (it checks before it writes) leaves the step counts as they were."""
    ok = None if found is None else found == 0
    for w, fz, hp in zip(work, frozens, hps):
        active = fz.logical_not()
        if ok is not None:
            active.logical_and_(ok)
        steps = opt._group_steps[w.gi]
        step_t = _count_steps(w, steps, active)
        out = w.plan.discard if detected else opt._rows_of(w)
        hp = dataclasses.replace(hp, step=step_t, found_inf=found)
        extra = {"max_exp_avg_sqs": w.maxima} if w.maxima is not None else {}
        try:
            # with master weights, each param is its master rounded (refresh_master_weights, load_state_dict)
            w.plan.backend.adamw_list(w.params, w.grads, w.exp_avgs, w.exp_avg_sqs, fz, hp, out,
                                      masters=w.masters, masters_in_sync=True, **extra)
        except Exception:
            _count_steps(w, steps, active, sign=-1)
            raise
        for v in w.views:
            v.write_back()
        # written through raw pointers: bump the version counters as in-place torch ops would
        mark_written([*w.plan.params, *(w.masters or ())])
        if not detected and not w.plan.full:
            opt.last_grad_stats.index_copy_(0, w.plan.idx_global, out)
    if not detected and opt._shards.active:
        opt._shards.reduce_stats_(opt.last_grad_stats)


def record_skip(opt: "FrozenAwareAdamW", found: Optional[torch.Tensor], all_full: bool) -> None:
    """Count a skipped step; its statistics rows become NaN so no freeze decision passes on them."""
    if found is None:
        opt.last_step_skipped = opt._false
        return
    skipped = found != 0
    opt.skipped_steps.add_(skipped)
    opt.last_step_skipped = skipped
    live = opt.frozen.logical_not().logical_and_(skipped)  # only rows that took part
    if not all_full:
        live.logical_and_(opt.last_participation)
    opt.last_grad_stats[:, :2].masked_fill_(live[:, None], math.nan)
