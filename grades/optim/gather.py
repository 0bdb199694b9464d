"""What one parameter group contributes to a step: the parameters that take part, their
gradients, and their state read afresh from ``optimizer.state`` (as ``torch.optim.AdamW`` reads
it), in the form the fused kernels take.

Only what stays valid is cached (:class:`Plan`, per group and set of participating parameters):
index tensors, scratch rows, the backend, the checked hyperparameters, and the identity of the
state tensors last checked. A state tensor that is not the one checked last time (the user
rebound it, cleared the state, loaded a checkpoint) is checked again, and adopted into the
optimizer's layout when it is usable but laid out differently.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from .. import backends, dtensor
from .._validate import STATS_DTYPE, SUPPORTED_DTYPES, check_no_overlap, is_wrapper_subclass, upload
from .views import KernelViews, fits, is_plain, new_moment

if TYPE_CHECKING:
    from .adamw import FrozenAwareAdamW

__all__ = ["Plan", "Work", "gather_group"]

_PARAM_DTYPES = frozenset(SUPPORTED_DTYPES + (torch.float64, torch.complex32, torch.complex64, torch.complex128))
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param", "max_exp_avg_sq")


def _layout(params: list[torch.Tensor]) -> tuple:
    """What the kernel-ready state of these parameters depends on (their dtype, shape, strides)."""
    return tuple((p.dtype, p.shape, p.stride()) for p in params)


class Plan:
    """What stays the same while the same parameters of a group take part (cached). ``params``
    are the group's entries (DTensors stay DTensors: they key ``opt.state``)."""

    def __init__(self, opt: "FrozenAwareAdamW", gi: int, local: tuple[int, ...], params: list[torch.Tensor]):
        start, end = opt._ranges[gi]
        dev = opt.frozen.device
        self.local, self.params = local, params
        self.full = len(local) == end - start
        self.idx_local = self.idx_global = None
        if not self.full:
            self.idx_local = upload(torch.tensor(local, dtype=torch.long), dev)
            self.idx_global = self.idx_local + start
        self.scratch = torch.zeros(len(local), 3, dtype=STATS_DTYPE, device=dev)
        # the fused update's own statistics when a detection pass has already produced them
        self.discard = torch.empty_like(self.scratch)
        self.backend = backends.select(dev, "list", opt.backend)
        shards = [dtensor.local(p) for p in params]
        self.numels = tuple(t.numel() for t in shards)
        self.set_layout(shards)
        self.checked: Optional[list[tuple]] = None  # state tensors checked last, per parameter
        self.hp: Optional[tuple] = None  # (number hyperparameters, their checked AdamWArgs)

    def set_layout(self, params: list[torch.Tensor]) -> None:
        """Record the parameters' layout and which of them go to the kernels as they are."""
        self.layout = _layout(params)
        self.plain = [is_plain(p) for p in params]


@dataclass
class Work:
    """One group's part of a step, in kernel form (lists in participation order; local shards of
    DTensors)."""

    gi: int
    group: dict
    plan: Plan
    grads: list[torch.Tensor]
    params: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    masters: Optional[list[Optional[torch.Tensor]]]
    maxima: Optional[list[torch.Tensor]]
    views: list[KernelViews] = field(default_factory=list)  # parameters needing a write-back


def _check_grad(row: int, p: torch.Tensor, g: torch.Tensor, pdev: torch.device) -> torch.Tensor:
    """The checks :func:`grades.masked_adamw_` would make of a gradient (``pdev``: the parameter's
    device, already read); returns it readable."""
    if g.layout != torch.strided:
        raise RuntimeError("FrozenAwareAdamW does not support sparse gradients, please consider SparseAdam instead")
    if is_wrapper_subclass(g):
        raise TypeError(f"gradient of parameter {row} is a {type(g).__name__}, a tensor subclass without plain "
                        "storage; FrozenAwareAdamW needs plain gradients")
    ok = g.dtype == p.dtype if p.dtype in (torch.float64, torch.complex64, torch.complex128) else (
        g.dtype in SUPPORTED_DTYPES)
    if not ok:
        raise TypeError(f"gradient of parameter {row} has dtype {str(g.dtype)[6:]} for a {str(p.dtype)[6:]} "
                        "parameter (float64 and complex parameters need gradients of their own dtype; the others "
                        "float32, bfloat16 or float16)")
    if g.shape != p.shape or g.device != pdev:
        raise ValueError(f"gradient of parameter {row} has shape {tuple(g.shape)} on {g.device}, but the "
                         f"parameter has shape {tuple(p.shape)} on {p.device}")
    if g.is_neg():  # a lazily negated view (e.g. .conj().imag): the kernels read raw memory
        g = g.resolve_neg()
    return g


def _check_param_now(row: int, p: torch.Tensor, dev: torch.device) -> torch.device:
    """What may have changed since ``p`` joined: its ``.data`` (device, dtype) or a meta placeholder.
    Returns the parameter's device (read once: each read builds a new object)."""
    pdev = p.device
    if pdev != dev:
        if pdev.type == "meta":
            raise ValueError(f"parameter {row} is on the meta device (it has no data): materialise the model "
                             "(e.g. to_empty() and initialise it) before the optimizer steps")
        raise ValueError(f"parameter {row} is on {pdev} but the optimizer's state lives on {dev} "
                         "(create the optimizer after moving the model)")
    if p.dtype not in _PARAM_DTYPES:
        raise TypeError(f"parameter {row} has dtype {p.dtype}; supported: float32, bfloat16, float16, float64 "
                        "and complex64/complex128")
    return pdev


def _participants(opt: "FrozenAwareAdamW", gi: int, group: dict) -> tuple[list[int], list[torch.Tensor]]:
    start = opt._ranges[gi][0]
    host_frozen, seen = opt._host_frozen, set() if opt._has_duplicates else None
    local, grads, sharded, dev = [], [], opt._shards.has_dtensor, opt.frozen.device
    for i, p in enumerate(group["params"]):
        g = p.grad
        if g is None or host_frozen[start + i]:
            continue
        if seen is not None:  # a duplicate (torch warned at construction) is updated once
            if id(p) in seen:
                continue
            seen.add(id(p))
        if sharded:
            p, g = dtensor.local(p), dtensor.local(g)  # FSDP2: the kernels run on the local shards
        pdev = _check_param_now(start + i, p, dev)
        local.append(i)
        grads.append(_check_grad(start + i, p, g, pdev))
    return local, grads


def _init_state(opt: "FrozenAwareAdamW", gi: int, local: int, p: torch.Tensor, st: dict, amsgrad: bool) -> None:
    """Fill what a parameter's state lacks, as a fresh torch AdamW state (step 0, zero moments)."""
    if "step" not in st:
        opt._adopt_step(gi, local, st, 0.0)
    for k in ("exp_avg", "exp_avg_sq"):
        if k not in st:
            st[k] = new_moment(p)
    if amsgrad and "max_exp_avg_sq" not in st:
        st["max_exp_avg_sq"] = new_moment(p)
    if opt._wants_master(p) and "master_param" not in st:
        st["master_param"] = p.detach().to(torch.float32, copy=True)


def _adopt_tensor(row: int, key: str, t: Any, p: torch.Tensor) -> torch.Tensor:
    """A state tensor the user put there: checked, and copied into the optimizer's layout if needed
    (a DTensor parameter's state is a DTensor with its placements, compared shard to shard)."""
    what = f"state of parameter {row}: {key!r}"
    if dtensor.is_dtensor(p):
        if not dtensor.is_dtensor(t):
            raise TypeError(f"{what} must be a DTensor with the parameter's placements, got {type(t).__name__}")
        dtensor.check_moment(t, p, what)
    elif not isinstance(t, torch.Tensor) or is_wrapper_subclass(t):
        raise TypeError(f"{what} must be a plain tensor, got {type(t).__name__}")
    if t.shape != p.shape:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}")
    lt, lp = dtensor.local(t), dtensor.local(p)
    if key == "master_param":
        return t if (t.dtype == torch.float32 and lt.device == lp.device and lt.stride() == lp.stride()) else \
            p.detach().to(torch.float32, copy=True).copy_(t)
    if t.is_complex() and not p.is_complex():
        raise TypeError(f"{what} is complex but the parameter is {p.dtype}")
    return t if fits(lt, lp) else new_moment(p, t)


def _state_tensors(opt: "FrozenAwareAdamW", gi: int, plan: Plan, amsgrad: bool) -> list[tuple]:
    """Per participant ``(exp_avg, exp_avg_sq, master or None, max_exp_avg_sq or None)``, read
    from ``opt.state`` now; tensors not seen before are checked (and adopted)."""
    start = opt._ranges[gi][0]
    views = opt._step_views[gi]
    out = []
    for j, (i, p) in enumerate(zip(plan.local, plan.params)):
        st = opt.state[p]
        _init_state(opt, gi, i, p, st, amsgrad)
        if st["step"] is not views[i]:  # rebound (or loaded): the count continues from its value
            opt._adopt_step(gi, i, st, st["step"])
        now = (st["exp_avg"], st["exp_avg_sq"], st.get("master_param") if opt._wants_master(p) else None,
               st.get("max_exp_avg_sq") if amsgrad else None)
        before = plan.checked[j] if plan.checked is not None else ()
        if len(before) != 4 or not all(map(operator.is_, now, before)):
            for k, t in zip(_STATE_KEYS, now):
                if t is not None:
                    st[k] = _adopt_tensor(start + i, k, t, p)
            now = tuple(st.get(k) if t is not None else None for k, t in zip(_STATE_KEYS, now))
        out.append(now)
    return out


def _locals(opt: "FrozenAwareAdamW", ts: list[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
    # without DTensors (the usual case) the tensors are the kernels' own: no per-tensor type test
    return [dtensor.local(t) for t in ts] if opt._shards.has_dtensor else list(ts)


def gather_group(opt: "FrozenAwareAdamW", gi: int, group: dict) -> Optional[Work]:
    """One group's work for this step, or None when none of its parameters takes part."""
    local, grads = _participants(opt, gi, group)
    if not local:
        return None
    key = (gi, tuple(local))
    plan = opt._plans.get(key)
    entries = [group["params"][i] for i in local]
    # FSDP2 may give a DTensor a new local shard (lazy init, loading): taken afresh every step
    params = _locals(opt, entries)
    if plan is None:
        # the fused update writes every parameter once: no two may share memory
        start = opt._ranges[gi][0]
        check_no_overlap([(f"parameter {start + i}", p) for i, p in zip(local, params)])
        plan = opt._plans[key] = Plan(opt, gi, key[1], entries)
    elif _layout(params) != plan.layout:  # a .data replaced since the last step
        j = next((j for j, (p, n) in enumerate(zip(params, plan.numels)) if p.numel() != n), None)
        if j is not None:
            raise ValueError(f"parameter {opt._ranges[gi][0] + plan.local[j]} has {params[j].numel()} elements "
                             f"but its optimizer state was made for {plan.numels[j]}: its .data was replaced by a "
                             "tensor of another size; nothing was updated")
        plan.set_layout(params)
        plan.checked = None  # same sizes: the state is re-laid out
    amsgrad = bool(group.get("amsgrad", False))
    tensors = _state_tensors(opt, gi, plan, amsgrad)
    plan.checked = tensors
    state = [_locals(opt, [t[k] for t in tensors]) for k in range(4)]
    work = Work(gi, group, plan, grads, params, state[0], state[1], state[2], state[3] if amsgrad else None)
    if not any(m is not None for m in work.masters):
        work.masters = None
    for j, plain in enumerate(plan.plain):
        if not plain or not grads[j].is_contiguous():
            _use_views(work, j)
    return work


def _use_views(work: Work, j: int) -> None:
    """Replace entry ``j`` of the work lists by its kernel views (complex, strided or gapped)."""
    p = work.params[j]
    if is_plain(p):  # only the gradient is laid out differently: a contiguous copy of it
        work.grads[j] = work.grads[j].contiguous()
        return
    state = [work.exp_avgs[j], work.exp_avg_sqs[j], None if work.masters is None else work.masters[j],
             None if work.maxima is None else work.maxima[j]]
    v = KernelViews(p, work.grads[j], state)
    work.params[j], work.grads[j] = v.param, v.grad
    work.exp_avgs[j], work.exp_avg_sqs[j] = v.state[0], v.state[1]
    if work.masters is not None:
        work.masters[j] = v.state[2]
    if work.maxima is not None:
        work.maxima[j] = v.state[3]
    work.views.append(v)

