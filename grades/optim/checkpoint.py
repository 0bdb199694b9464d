"""``state_dict`` / ``load_state_dict`` of :class:`~grades.FrozenAwareAdamW`: torch's AdamW
layout plus a ``"grades"`` entry, loaded transactionally (everything is checked before anything
changes; a failure leaves the optimizer as it was)."""
from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from .. import dtensor
from .._validate import STATS_DTYPE, is_wrapper_subclass
from .hparams import IMPL_SWITCHES, REFUSED, check_hparams, check_options
from .views import new_moment

if TYPE_CHECKING:
    from .adamw import FrozenAwareAdamW

__all__ = ["save", "load"]

_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def save(opt: "FrozenAwareAdamW", sd: dict) -> dict:
    """Add the extras to torch's state dict ``sd`` and leave out released parameters."""
    sd["state"] = {k: ({**v, "step": v["step"].clone()} if isinstance(v, dict) and isinstance(v.get("step"),
                                                                                              torch.Tensor) else v)
                   for k, v in sd["state"].items() if k not in opt._released}
    sd["grades"] = {"frozen": opt.frozen.clone(), "last_grad_stats": opt.last_grad_stats.clone(),
                    "skipped_steps": opt.skipped_steps.clone(), "released": sorted(opt._released)}
    return sd


def check_groups(opt: "FrozenAwareAdamW", saved_groups: Any) -> list[dict]:
    """The saved param groups, checked (torch's messages for a mismatch) and normalised."""
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
        raise ValueError("not an optimizer state dict: 'param_groups' must be a list of dicts")
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    groups = []
    for gi, (g, mine) in enumerate(zip(saved_groups, opt.param_groups)):
        if len(g.get("params", ())) != len(mine["params"]):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                             "of optimizer's group")
        missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
        if missing:
            raise ValueError(f"not an AdamW state dict: parameter group {gi} has no {missing[0]!r}")
        g = dict(g)
        # implementation switches pick an implementation, not the maths: any torch AdamW variant loads
        for k in REFUSED:
            g[k] = False
        for k in IMPL_SWITCHES:
            g[k] = g.get(k) if isinstance(g.get(k), bool) else None
        if g.get("fused") and g.get("foreach"):
            g["foreach"] = None
        g["decoupled_weight_decay"] = True
        g.setdefault("amsgrad", False)
        g.setdefault("maximize", False)
        check_options(g)
        g["lr"], g["betas"] = check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"])
        groups.append(g)
    return groups


def _check_extras(extras: Any, n: int) -> np.ndarray:
    """The ``"grades"`` entry; returns the host frozen mask."""
    if not isinstance(extras, dict):
        raise ValueError(f"state dict entry 'grades' must be a dict, got {type(extras).__name__}")
    want = {"frozen": ((n,), (torch.bool,)), "last_grad_stats": ((n, 3), None), "skipped_steps": ((), None)}
    for k, (shape, dtypes) in want.items():
        v = extras.get(k)
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"state dict entry grades[{k!r}] must be a tensor of shape {list(shape)} "
                             f"for {n} parameters, got {got}")
    if extras["frozen"].dtype != torch.bool:
        raise TypeError(f"state dict entry grades['frozen'] must be a bool tensor, got {extras['frozen'].dtype}")
    if not extras["last_grad_stats"].is_floating_point():
        raise TypeError(f"state dict entry grades['last_grad_stats'] must be floating point, "
                        f"got {extras['last_grad_stats'].dtype}")
    sk = extras["skipped_steps"]
    if sk.is_floating_point() or sk.is_complex() or sk.dtype == torch.bool:
        raise TypeError(f"state dict entry grades['skipped_steps'] must be an integer tensor, got {sk.dtype}")
    if int(sk) < 0:
        raise ValueError(f"state dict entry grades['skipped_steps'] must be >= 0, got {int(sk)}")
    for i in extras.get("released", ()):
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n:
            raise ValueError(f"state dict entry grades['released'] holds {i!r}, not a parameter index in [0, {n})")
    return extras["frozen"].detach().to("cpu").numpy().astype(bool)


def _check_step(gidx: int, v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        return v.detach().reshape(())
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return torch.tensor(float(v), dtype=torch.float64)
    raise ValueError(f"state of parameter {gidx}: 'step' must be a number or a 1-element tensor")


def _check_moment(gidx: int, k: str, t: Any, p: torch.Tensor) -> None:
    if dtensor.is_dtensor(t) and dtensor.is_dtensor(p):  # FSDP2: sharded like its parameter
        dtensor.check_moment(t, p, f"state of parameter {gidx}: {k!r}")
        return
    if isinstance(t, torch.Tensor) and is_wrapper_subclass(t):
        raise TypeError(f"state of parameter {gidx}: {k!r} is a {type(t).__name__}, a tensor subclass "
                        "without plain storage (a sharded checkpoint? load it as plain tensors)")
    ok = isinstance(t, torch.Tensor) and t.shape == p.shape and (t.is_floating_point() or (
        t.is_complex() and p.is_complex()))
    if not ok:
        got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"state of parameter {gidx}: {k!r} must be a floating-point tensor of the "
                         f"parameter's shape {tuple(p.shape)}, got {got}")


def _check_all_at_once(steps: list[torch.Tensor], sqs: list[tuple[int, torch.Tensor]]) -> None:
    """Step counts finite and >= 0, second moments >= 0 (one host read for all of them)."""
    flags = [(~(torch.isfinite(s.to(torch.float64)) & (s >= 0))).reshape(1) for s in steps]
    flags += [(torch.view_as_real(t) if t.is_complex() else t).lt(0).any().reshape(1)
              for t in (dtensor.local(t) for _, t in sqs)]  # a DTensor: this rank's shard
    if not flags:
        return
    dev = sqs[0][1].device if sqs else flags[0].device
    bad = torch.cat([f.to(dev) for f in flags]).cpu().tolist()
    if any(bad[:len(steps)]):
        raise ValueError(f"state dict holds {sum(bad[:len(steps)])} step count(s) that are negative or not finite")
    neg = [gidx for (gidx, _), b in zip(sqs, bad[len(steps):]) if b]
    if neg:
        raise ValueError(f"state dict holds a negative 'exp_avg_sq' (a second moment is a mean of squares) for "
                         f"parameter(s) {neg[:5]}; the next step would make them NaN")


def check_state(opt: "FrozenAwareAdamW", sd: dict, extras: Any, saved_ids: list) -> np.ndarray:
    """Check the per-parameter state and the extras before anything is loaded; returns the host
    frozen mask."""
    n = opt.num_params
    host_frozen = np.zeros(n, dtype=bool) if extras is None else _check_extras(extras, n)
    src = sd["state"]
    if not isinstance(src, dict):
        raise ValueError("not an optimizer state dict: 'state' must be a dict")
    steps, sqs = [], []
    for gidx, (sid, p) in enumerate(zip(saved_ids, opt.param_list)):
        st = src.get(sid)
        if not st:
            continue
        if not isinstance(st, dict):
            raise ValueError(f"state of parameter {gidx} must be a dict, got {type(st).__name__}")
        if "step" not in st:
            raise ValueError(f"state of parameter {gidx} has no 'step'")
        steps.append(_check_step(gidx, st["step"]))
        for k in _MOMENTS:
            t = st.get(k)
            if t is None:
                if k != "max_exp_avg_sq" and not host_frozen[gidx]:
                    raise ValueError(f"state of parameter {gidx} has no {k!r} but it is not frozen")
                continue
            _check_moment(gidx, k, t, p)
            if k != "exp_avg":
                sqs.append((gidx, t))
    _check_all_at_once(steps, sqs)
    return host_frozen


def adopt_saved_masters(candidates: list) -> None:
    """Keep a checkpoint's float32 master where it rounds to the parameter's current value: else
    the parameter changed after the master was saved, and the master taken from the parameter
    wins. Compared bit by bit with every NaN counted equal to every NaN (rounding rewrites a NaN's
    payload), so a NaN element keeps the finite elements of its master. One host read."""
    if not candidates:
        return
    agree = []
    for _, saved, p in candidates:  # DTensors: compared shard to shard
        a, b = dtensor.local(saved.to(p.dtype)), dtensor.local(p.detach())
        same = (a.view(torch.int16) == b.view(torch.int16)) | (torch.isnan(a) & torch.isnan(b))
        agree.append(same.all())
    for ok, (master, saved, _) in zip(torch.stack(agree).cpu().tolist(), candidates):
        if ok:
            master.copy_(saved)


def load_checked(opt: "FrozenAwareAdamW", sd: dict, extras: Optional[dict], host_frozen: np.ndarray,
                 saved_ids: list) -> None:
    """The load proper, after every check passed (torch's loader, then this optimizer's layout)."""
    src = sd["state"]
    opt._load_torch_state_dict(sd)
    dev = opt.frozen.device
    released: set[int] = set(int(i) for i in extras.get("released", ())) if extras is not None else set()
    candidates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (master, saved, param)
    for gidx, p in enumerate(opt.param_list):
        st = opt.state.get(p)
        if not st:
            continue
        orig = src.get(saved_ids[gidx], {})
        for k in _MOMENTS:
            st.pop(k, None)
            if k in orig:
                st[k] = new_moment(p, orig[k].detach().to(p.device))
            elif k != "max_exp_avg_sq":  # frozen (checked)
                released.add(gidx)
        # master weights (torch's loader cast them to the param's dtype: take the saved ones)
        st.pop("master_param", None)
        if opt._wants_master(p) and not host_frozen[gidx]:
            st["master_param"] = p.detach().to(torch.float32, copy=True)
            saved = orig.get("master_param")
            if isinstance(saved, torch.Tensor) and saved.dtype == torch.float32 and saved.shape == p.shape:
                candidates.append((st["master_param"], saved.detach().to(p.device), p))
    adopt_saved_masters(candidates)
    opt._reset_rows(torch.from_numpy(host_frozen).to(dev), host_frozen, released)
    if extras is not None:
        opt.last_grad_stats = extras["last_grad_stats"].to(device=dev, dtype=STATS_DTYPE).clone()
        opt.skipped_steps = extras["skipped_steps"].to(device=dev, dtype=torch.int64).clone()
    else:
        opt.last_grad_stats = torch.zeros(opt.num_params, 3, dtype=STATS_DTYPE, device=dev)
        opt.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
    if opt.release_frozen_state:
        for i in np.nonzero(host_frozen)[0].tolist():
            opt._release(int(i))


def load(opt: "FrozenAwareAdamW", state_dict: Any) -> None:
    """Check, then load; restores every attribute on failure."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: expected a dict with 'state' and 'param_groups'")
    sd = dict(state_dict)
    extras = sd.pop("grades", None)
    opt._sync_rows()
    sd["param_groups"] = check_groups(opt, sd["param_groups"])
    saved_ids = [i for g in sd["param_groups"] for i in g["params"]]  # in param_list order
    host_frozen = check_state(opt, sd, extras, saved_ids)
    saved = dict(opt.__dict__)
    try:
        load_checked(opt, sd, extras, host_frozen, saved_ids)
    except BaseException:
        opt.__dict__.clear()
        opt.__dict__.update(saved)
        opt._clear_plans()
        raise
