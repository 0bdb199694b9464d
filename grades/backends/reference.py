"""Pure-PyTorch reference backend: the specification every other backend is tested against.

Written for reading, not speed. It is still free of host synchronisation (frozen matrices are
handled with ``torch.where`` rather than Python branches on device values), so it is a correct,
if slow, fallback on any device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import AdamWArgs, Backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an update and its statistics are computed in: float64 for float64 tensors,
    float32 for every other (float32, bfloat16, float16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_row(g: torch.Tensor, grad_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[3]`` float64: sum g^2, sum |g|, non-finite count of one gradient (after unscaling).

    The gradient is unscaled and tested for finiteness in its compute dtype (float32, or float64
    for a float64 gradient). It is the gradient as given: with ``maximize`` the update negates it,
    the statistics do not (they depend on magnitudes only, so the sign would not change them)."""
    gc = g.to(compute_dtype(g.dtype))
    if grad_scale is not None:
        gc = gc / grad_scale
    g64 = gc.double()
    return torch.stack([
        (g64 * g64).sum(),
        g64.abs().sum(),
        (~torch.isfinite(gc)).sum().double(),
    ])


def _masked_rows(rows: list[torch.Tensor], frozen: Optional[torch.Tensor], out: torch.Tensor) -> None:
    if not rows:
        return
    stats = torch.stack(rows)
    if frozen is not None:
        stats = torch.where(frozen[:, None], torch.zeros_like(stats), stats)
    out.copy_(stats)


def _matrix_stats_from_flat(buf: torch.Tensor, table, grad_scale=None) -> list[torch.Tensor]:
    rows = [torch.zeros(3, dtype=torch.float64, device=buf.device) for _ in range(table.num_matrices)]
    for off, length, m in table.array.tolist():  # host table, no device read
        rows[m] = rows[m] + _stats_row(buf[off:off + length], grad_scale)
    return rows


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                 hp: AdamWArgs, step, active, master: Optional[torch.Tensor] = None,
                 vmax: Optional[torch.Tensor] = None) -> None:
    """One AdamW update of one tensor, in its compute dtype (float64 for float64 params, float32
    otherwise), written back only where ``active``.

    Same arithmetic as ``torch.optim.AdamW``: the gradient is divided by ``grad_scale`` and, with
    ``hp.maximize``, negated; decoupled weight decay ``p *= 1 - lr*wd``, then
    ``m = lerp(m, g, 1-beta1)``, ``v = beta2*v + (1-beta2)*g*g``, with ``vmax`` (amsgrad)
    ``vmax = maximum(vmax, v)`` (NaN propagates) and the denominator taken from ``vmax``,
    ``p -= (lr / (1-beta1^t)) * m / (sqrt(v or vmax) / sqrt(1-beta2^t) + eps)``.
    With a float32 ``master`` the update starts from and is stored in the master, and ``p``
    receives the result rounded to its dtype.
    """
    cd = compute_dtype(p.dtype)
    gc = g.to(cd)
    if hp.grad_scale is not None:
        gc = gc / hp.grad_scale
    if hp.maximize:
        gc = -gc
    pc = p.to(cd) if master is None else master
    lr = hp.lr
    step = torch.as_tensor(step, dtype=torch.float64, device=p.device)
    bc1 = 1 - hp.beta1 ** step
    bc2_sqrt = (1 - hp.beta2 ** step).sqrt()
    new_p = pc * (1 - lr * hp.weight_decay)
    new_m = m.lerp(gc, 1 - hp.beta1)
    new_v = v * hp.beta2 + (1 - hp.beta2) * gc * gc
    new_vmax = new_v if vmax is None else torch.maximum(vmax, new_v)
    step_size = (lr / bc1).to(cd)
    denom = new_vmax.sqrt() / bc2_sqrt.to(cd) + hp.eps
    new_p = new_p - step_size * new_m / denom
    if master is not None:
        master.copy_(torch.where(active, new_p, master))
    p.copy_(torch.where(active, new_p.to(p.dtype), p))
    m.copy_(torch.where(active, new_m, m))
    v.copy_(torch.where(active, new_v, v))
    if vmax is not None:
        vmax.copy_(torch.where(active, new_vmax, vmax))


def _active(frozen: Optional[torch.Tensor], hp: AdamWArgs, i: int, device) -> torch.Tensor:
    active = torch.ones((), dtype=torch.bool, device=device)
    if frozen is not None:
        active = active & ~frozen[i]
    if hp.found_inf is not None:
        active = active & (hp.found_inf == 0)
    return active


def _step_of(hp: AdamWArgs, i: int):
    s = hp.step
    if isinstance(s, torch.Tensor) and s.dim() == 1:
        return s[i]
    return s


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "xpu", "mps", "meta")
    kinds = ("list", "flat")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def available(self) -> tuple[bool, str]:
        return True, "pure PyTorch"

    def grad_stats_list(self, grads, frozen, out) -> None:
        _masked_rows([_stats_row(g) for g in grads], frozen, out)

    def grad_stats_flat(self, buf, table, frozen, out) -> None:
        _masked_rows(_matrix_stats_from_flat(buf, table), frozen, out)

    def adamw_list(self, params, grads, exp_avgs, exp_avg_sqs, frozen, hp, out, masters=None,
                   masters_in_sync=False, max_exp_avg_sqs=None) -> None:
        _masked_rows([_stats_row(g, hp.grad_scale) for g in grads], frozen, out)
        none = [None] * len(params)
        for i, (p, g, m, v, mw, vmax) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, masters or none,
                                                        max_exp_avg_sqs or none)):
            adamw_update(p, g, m, v, hp, _step_of(hp, i), _active(frozen, hp, i, p.device), mw, vmax)

    def adamw_flat(self, param, grad, exp_avg, exp_avg_sq, table, frozen, hp, out, master=None,
                   max_exp_avg_sq=None) -> None:
        _masked_rows(_matrix_stats_from_flat(grad, table, hp.grad_scale), frozen, out)
        for off, length, i in table.array.tolist():
            sl = slice(off, off + length)
            adamw_update(param[sl], grad[sl], exp_avg[sl], exp_avg_sq[sl], hp, _step_of(hp, i),
                         _active(frozen, hp, i, param.device), None if master is None else master[sl],
                         None if max_exp_avg_sq is None else max_exp_avg_sq[sl])
