"""The two public operations: ``grad_stats`` and ``masked_adamw_``.

Both take either a list of tensors (one per matrix, HF-style separate ``.grad``s) or one flat buffer
plus a :class:`~grades.SegmentTable` (Megatron-style contiguous grad buffer), validate everything
on the host before touching memory, and hand the work to the backend chosen for the device.
Neither synchronises with the host.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch

from . import backends
from ._validate import (STATS_DTYPE, as_tensor_list, check_frozen, check_no_overlap, check_out, check_plain,
                        check_same_device, check_tensor, check_writable, mark_written)
from .segment_table import SegmentTable, SegmentsLike, resolve_segments
from .backends.base import AdamWArgs

TensorList = Sequence[torch.Tensor]


def grad_stats(
    grads: Union[TensorList, torch.Tensor],
    *,
    segments: Optional[SegmentsLike] = None,
    num_matrices: Optional[int] = None,
    frozen: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-matrix gradient statistics of many tensors in one pass.

    Args:
        grads: a list of ``M`` gradient tensors (any shapes, float32/bfloat16/float16, one device),
            or one flat 1-D buffer when ``segments`` is given.
        segments: for a flat buffer, the :class:`SegmentTable` (or ``[S, 3]`` rows of
            ``(offset, length, matrix_id)`` in elements) saying where each matrix lives. Segments
            sharing a matrix id are summed (LoRA A/B pairs, sharded pieces).
        num_matrices: ``M`` for a flat buffer (default: largest matrix id + 1).
        frozen: optional bool tensor ``[M]`` on the same device; frozen matrices are not read and
            their rows read zero.
        out: optional preallocated float64 ``[M, 3]`` tensor to write into.
        backend: ``"auto"`` or a backend name (see ``grades env``).

    Returns:
        float64 tensor ``[M, 3]`` on the gradients' device: sum of squares, sum of absolute
        values, and the exact count of non-finite elements of each matrix's gradient. Within a
        backend the result is bitwise reproducible (fixed-order reductions, no float atomics):
        each chunk of the input is reduced in float32 in a fixed order and chunk partials are
        added in float64 in table order. On CUDA the split of a chunk across threads also depends
        on the 16-byte alignment of its start, so bitwise equality across processes or ranks holds
        for identically laid-out (equally aligned) buffers, which is what DDP replicas and
        Megatron-style buffers have. Float32 chunk sums overflow to ``inf`` for gradients beyond
        about 1e19 in magnitude (squares beyond float32's range) while the count stays 0;
        gradients that large are not meaningful training signals.
    """
    if segments is None:
        if isinstance(grads, torch.Tensor):
            raise TypeError("grad_stats got a single tensor: pass a list of tensors, or a flat buffer "
                            "together with segments=...")
        glist = as_tensor_list(grads, "grads")
        if num_matrices is not None and num_matrices != len(glist):
            raise ValueError(f"num_matrices={num_matrices} but {len(glist)} gradients were given; with a "
                             "list every tensor is one matrix (num_matrices is for flat buffers)")
        for i, g in enumerate(glist):
            check_tensor(g, f"grads[{i}]", sign_matters=False)  # only magnitudes are read
        device = glist[0].device if glist else torch.device("cpu")
        check_same_device(glist, "grads", device)
        m = len(glist)
        frozen = check_frozen(frozen, m, device)
        out = check_out(out, m, device)
        check_no_overlap([("out", out)], [(f"grads[{i}]", g) for i, g in enumerate(glist)] + [("frozen", frozen)])
        check_writable([("out", out)])
        if m:
            b = backends.select(device, "list", backend)
            with torch.no_grad():
                b.grad_stats_list(glist, frozen, out)
            mark_written([out])
        return out
    buf = check_tensor(grads, "grads (flat buffer)", sign_matters=False)
    if buf.dim() != 1:
        raise ValueError(f"a flat gradient buffer must be 1-D, got shape {tuple(buf.shape)}")
    table = resolve_segments(segments, buf.numel(), num_matrices)
    frozen = check_frozen(frozen, table.num_matrices, buf.device)
    out = check_out(out, table.num_matrices, buf.device)
    check_no_overlap([("out", out)], [("grads (flat buffer)", buf), ("frozen", frozen)])
    check_writable([("out", out)])
    if table.num_matrices:
        b = backends.select(buf.device, "flat", backend)
        if len(table) == 0:
            out.zero_()
        else:
            with torch.no_grad():
                b.grad_stats_flat(buf, table, frozen, out)
            mark_written([out])
    return out


def _check_float(name: str, v: object, lo: float = 0.0, hi: float = math.inf, *, lo_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v >= hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi})"
        raise ValueError(f"Invalid {name} value: {v} (expected in {rng})")
    return v


def _check_scalar_tensor(name: str, t: Optional[torch.Tensor], device: torch.device,
                         shapes: tuple = ((),), convert: bool = True) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    check_plain(t, name)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(str(list(s)) for s in shapes)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t.float().contiguous() if convert else t


def _found_inf(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``found_inf`` as float32 0/1: any non-zero value, NaN included, means found (a float64
    1e-300 must not round to 0)."""
    t = _check_scalar_tensor("found_inf", t, device, convert=False)
    return None if t is None else (t != 0).to(torch.float32)


def _adamw_args(device, num_matrices, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                found_inf) -> AdamWArgs:
    if isinstance(lr, torch.Tensor):
        lr_t = _check_scalar_tensor("lr", lr, device)
    else:
        lr_t = _check_float("lr", lr)
    beta1 = _check_float("beta1", beta1, 0.0, 1.0)
    beta2 = _check_float("beta2", beta2, 0.0, 1.0)
    eps = _check_float("eps", eps)
    weight_decay = _check_float("weight_decay", weight_decay)
    if isinstance(step, torch.Tensor):
        step_t = _check_scalar_tensor("step", step, device, shapes=((), (num_matrices,)))
    else:
        step_t = _check_float("step", step, 1.0)
    return AdamWArgs(lr=lr_t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step_t,
                     grad_scale=_check_scalar_tensor("grad_scale", grad_scale, device),
                     found_inf=_found_inf(found_inf, device))


def _read_scalars(frozen: Optional[torch.Tensor], hp: AdamWArgs) -> list[tuple[str, Optional[torch.Tensor]]]:
    """The device tensors of an update that it only reads besides the gradients."""
    return [("frozen", frozen)] + [(k, v) for k in ("lr", "step", "grad_scale", "found_inf")
                                   if isinstance(v := getattr(hp, k), torch.Tensor)]


def _check_master_list(masters, params: list[torch.Tensor], device) -> Optional[list[Optional[torch.Tensor]]]:
    """Validated master weights of a list call: ``None`` when there are none at all."""
    if masters is None:
        return None
    if isinstance(masters, torch.Tensor):
        raise TypeError("with lists of tensors, master_params must be a list (one float32 tensor or None "
                        "per param), got a single tensor")
    try:
        masters = list(masters)
    except TypeError:
        raise TypeError(f"master_params must be a list of tensors or None, got {type(masters).__name__}") from None
    if len(masters) != len(params):
        raise ValueError(f"master_params must have one entry per param: got {len(masters)} for {len(params)} params")
    for i, (mw, p) in enumerate(zip(masters, params)):
        if mw is None:
            continue
        check_tensor(mw, f"master_params[{i}]", dtypes=(torch.float32,))
        if mw.shape != p.shape:
            raise ValueError(f"master_params[{i}] has shape {tuple(mw.shape)} but params[{i}] has {tuple(p.shape)}")
        if mw.device != device:
            raise ValueError(f"master_params[{i}] is on {mw.device}, expected {device}")
    return masters if any(mw is not None for mw in masters) else None


def masked_adamw_(
    params: Union[TensorList, torch.Tensor],
    grads: Union[TensorList, torch.Tensor],
    exp_avgs: Union[TensorList, torch.Tensor],
    exp_avg_sqs: Union[TensorList, torch.Tensor],
    frozen: Optional[torch.Tensor] = None,
    *,
    step: Union[int, float, torch.Tensor],
    lr: Union[float, torch.Tensor] = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    master_params: Optional[Union[Sequence[Optional[torch.Tensor]], torch.Tensor]] = None,
    segments: Optional[SegmentsLike] = None,
    num_matrices: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused in-place AdamW over every matrix that is not frozen, returning gradient statistics.

    Each non-frozen matrix gets exactly ``torch.optim.AdamW``'s update (decoupled weight decay,
    bias correction), computed in float32 whatever the parameter dtype; params may be float32,
    bfloat16 or float16, gradients likewise, moments must be float32. Frozen matrices are neither
    read nor written: params and both moments stay bitwise identical. The statistics of the
    gradients read are produced in the same pass (see :func:`grad_stats`).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of ``M`` tensors (matching shapes), or four
            flat 1-D buffers of equal length together with ``segments``.
        frozen: optional bool tensor ``[M]``.
        step: the 1-based step number used for bias correction of this update (already
            incremented by the caller): a number, a 0-dim tensor, or a float tensor ``[M]``
            (one step count per matrix) on the params' device.
        lr, beta1, beta2, eps, weight_decay: as ``torch.optim.AdamW``; ``lr`` may be a 0-dim tensor.
        grad_scale: optional 0-dim tensor; gradients are divided by it first (``GradScaler``).
        found_inf: optional 0-dim tensor; when non-zero no parameter or moment changes.
        master_params: optional float32 master weights: a list with one tensor (the shape of
            ``params[i]``) or ``None`` per matrix, or one flat float32 buffer the length of the
            flat ``params``. A matrix with a master is updated in its master (read and written
            in float32) and ``params[i]`` receives the result rounded to its own dtype (it is
            not read); matrices without one are updated in place as usual. Frozen matrices and
            skipped steps leave masters untouched too. The native CPU backend and Triton write
            both in the same pass; the CUDA C++ backend updates the masters, then copies them
            into the params (per tensor, keeping frozen and ``found_inf`` params on the device).
        segments, num_matrices: the flat-buffer layout (see :func:`grad_stats`).
        out: optional preallocated float64 ``[M, 3]`` statistics tensor.
        backend: ``"auto"`` or a backend name.

    Returns:
        float64 ``[M, 3]`` statistics of the (unscaled) gradients; zero rows for frozen matrices.
    """
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs")
    moment_dtypes = (torch.float32,)
    if segments is None:
        lists = [as_tensor_list(x, n) for x, n in zip((params, grads, exp_avgs, exp_avg_sqs), names)]
        m = len(lists[0])
        for n, lst in zip(names, lists):
            if len(lst) != m:
                raise ValueError(f"params, grads, exp_avgs and exp_avg_sqs must have the same length; "
                                 f"got {m} params and {len(lst)} {n}")
        for n, lst in zip(names, lists):
            for i, t in enumerate(lst):
                check_tensor(t, f"{n}[{i}]", **({"dtypes": moment_dtypes} if n.startswith("exp") else {}))
        device = lists[0][0].device if m else torch.device("cpu")
        for n, lst in zip(names, lists):
            check_same_device(lst, n, device)
        for i in range(m):
            shape = lists[0][i].shape
            for n, lst in zip(names[1:], lists[1:]):
                if lst[i].shape != shape:
                    raise ValueError(f"{n}[{i}] has shape {tuple(lst[i].shape)} but params[{i}] has {tuple(shape)}")
        masters = _check_master_list(master_params, lists[0], device)
        frozen = check_frozen(frozen, m, device)
        hp = _adamw_args(device, m, lr, beta1, beta2, eps, weight_decay, step, grad_scale, found_inf)
        out = check_out(out, m, device)
        written = ([(f"{n}[{i}]", t) for n, lst in zip(names, lists) if n != "grads" for i, t in enumerate(lst)]
                   + [(f"master_params[{i}]", t) for i, t in enumerate(masters or ())] + [("out", out)])
        check_no_overlap(written, [(f"grads[{i}]", t) for i, t in enumerate(lists[1])] + _read_scalars(frozen, hp))
        check_writable(written)
        if m:
            b = backends.select(device, "list", backend)
            with torch.no_grad():  # params may be leaves that require grad
                b.adamw_list(*lists, frozen, hp, out, masters=masters)
            mark_written(t for _, t in written)
        return out
    bufs = []
    for x, n in zip((params, grads, exp_avgs, exp_avg_sqs), names):
        t = check_tensor(x, f"{n} (flat buffer)", **({"dtypes": moment_dtypes} if n.startswith("exp") else {}))
        if t.dim() != 1:
            raise ValueError(f"{n} (flat buffer) must be 1-D, got shape {tuple(t.shape)}")
        bufs.append(t)
    numel, device = bufs[0].numel(), bufs[0].device
    for t, n in zip(bufs[1:], names[1:]):
        if t.numel() != numel:
            raise ValueError(f"flat buffers must have equal length: params has {numel}, {n} has {t.numel()}")
        if t.device != device:
            raise ValueError(f"{n} is on {t.device}, expected {device}")
    master = None
    if master_params is not None:
        if not isinstance(master_params, torch.Tensor):
            raise TypeError("with a flat buffer, master_params must be one flat float32 tensor, got "
                            f"{type(master_params).__name__}")
        master = check_tensor(master_params, "master_params (flat buffer)", dtypes=(torch.float32,))
        if master.dim() != 1 or master.numel() != numel:
            raise ValueError(f"master_params (flat buffer) must be 1-D with {numel} elements like params, "
                             f"got shape {tuple(master.shape)}")
        if master.device != device:
            raise ValueError(f"master_params is on {master.device}, expected {device}")
    table = resolve_segments(segments, numel, num_matrices)
    frozen = check_frozen(frozen, table.num_matrices, device)
    hp = _adamw_args(device, table.num_matrices, lr, beta1, beta2, eps, weight_decay, step, grad_scale, found_inf)
    out = check_out(out, table.num_matrices, device)
    written = ([(f"{n} (flat buffer)", t) for n, t in zip(names, bufs) if n != "grads"]
               + [("master_params (flat buffer)", master), ("out", out)])
    check_no_overlap(written, [("grads (flat buffer)", bufs[1])] + _read_scalars(frozen, hp))
    check_writable(written)
    if table.num_matrices:
        if len(table) == 0:
            out.zero_()
        else:
            b = backends.select(device, "flat", backend)
            with torch.no_grad():
                b.adamw_flat(*bufs, table, frozen, hp, out, master=master)
            mark_written(t for _, t in written)
    return out


__all__ = ["grad_stats", "masked_adamw_", "SegmentTable", "STATS_DTYPE"]
