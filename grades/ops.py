"""The two public operations: ``grad_stats`` and ``masked_adamw_``.

Both take either a list of tensors (one per matrix, HF-style separate ``.grad``s) or one flat buffer
plus a :class:`~grades.SegmentTable` (Megatron-style contiguous grad buffer), validate everything
on the host before touching memory, and hand the work to the backend chosen for the device.
Neither synchronises with the host.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import backends
from ._checks import check_number
from ._validate import (STATS_DTYPE, SUPPORTED_DTYPES, as_tensor_list, check_frozen, check_no_overlap, check_out,
                        check_plain, check_same_device, check_tensor, check_writable, mark_written)
from .segment_table import SegmentTable, SegmentsLike, resolve_segments
from .backends.base import AdamWArgs, Backend

TensorList = Sequence[torch.Tensor]

#: dtypes the ops accept for params and gradients; each backend computes a subset (see kernel_dtypes)
ACCEPTED_DTYPES = SUPPORTED_DTYPES + (torch.float64,)


def kernel_dtypes() -> dict[str, tuple[torch.dtype, ...]]:
    """``{backend name: param/gradient dtypes its kernels compute}``. Float64 is computed in float64
    (float64 moments) by ``reference``, ``cpu`` and ``cuda``; ``triton`` refuses it with a TypeError
    (its CPU interpreter and the GPU kernels are written for float32 arithmetic)."""
    return {name: backends.get(name).dtypes for name in backends.names()}


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _check_backend_dtypes(b: Backend, named: list[tuple[str, torch.Tensor]]) -> None:
    """TypeError if backend ``b`` does not compute one of these tensors' dtype (nothing written yet)."""
    for name, t in named:
        if t.dtype not in b.dtypes:
            raise TypeError(f"{name} has dtype {_dt(t.dtype)}, which backend {b.name!r} "
                            f"does not compute (it supports {', '.join(_dt(d) for d in b.dtypes)})")


def _moment_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _check_family(i: str, p: torch.Tensor, g: torch.Tensor, moments: list[tuple[str, torch.Tensor]]) -> None:
    """float64 params go with float64 gradients and moments; the other dtypes with float32 moments."""
    pn, gn = f"params{i}", f"grads{i}"
    if (g.dtype == torch.float64) != (p.dtype == torch.float64):
        raise TypeError(f"{gn} has dtype {_dt(g.dtype)} but {pn} has {_dt(p.dtype)}: float64 params need "
                        "float64 gradients and float64 gradients float64 params")
    want = _moment_dtype(p.dtype)
    for name, t in moments:
        if t.dtype != want:
            raise TypeError(f"{name} has dtype {_dt(t.dtype)}; moments of {_dt(p.dtype)} params must be {_dt(want)}")


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
        grads: a list of ``M`` gradient tensors (any shapes, float32/bfloat16/float16, one device;
            float64 on the backends that claim it, see :func:`kernel_dtypes`, summed in float64),
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
        each chunk of the input is reduced in float32 (float64 for float64 gradients) in a fixed
        order and chunk partials are added in float64 in table order. On CUDA the split of a chunk
        across threads also depends on the 16-byte alignment of its start, so bitwise equality
        across processes or ranks holds for identically laid-out (equally aligned) buffers, which
        is what DDP replicas and Megatron-style buffers have. Float32 chunk sums overflow to
        ``inf`` for gradients beyond about 1e19 in magnitude (squares beyond float32's range)
        while the count stays 0; gradients that large are not meaningful training signals.
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
            check_tensor(g, f"grads[{i}]", dtypes=ACCEPTED_DTYPES, sign_matters=False)  # only magnitudes are read
        device = glist[0].device if glist else torch.device("cpu")
        check_same_device(glist, "grads", device)
        m = len(glist)
        frozen = check_frozen(frozen, m, device)
        out = check_out(out, m, device)
        check_no_overlap([("out", out)], [(f"grads[{i}]", g) for i, g in enumerate(glist)] + [("frozen", frozen)])
        check_writable([("out", out)])
        if m:
            b = backends.select(device, "list", backend)
            _check_backend_dtypes(b, [(f"grads[{i}]", g) for i, g in enumerate(glist)])
            with torch.no_grad():
                b.grad_stats_list(glist, frozen, out)
            mark_written([out])
        return out
    buf = check_tensor(grads, "grads (flat buffer)", dtypes=ACCEPTED_DTYPES, sign_matters=False)
    if buf.dim() != 1:
        raise ValueError(f"a flat gradient buffer must be 1-D, got shape {tuple(buf.shape)}")
    table = resolve_segments(segments, buf.numel(), num_matrices)
    frozen = check_frozen(frozen, table.num_matrices, buf.device)
    out = check_out(out, table.num_matrices, buf.device)
    check_no_overlap([("out", out)], [("grads (flat buffer)", buf), ("frozen", frozen)])
    check_writable([("out", out)])
    if table.num_matrices:
        b = backends.select(buf.device, "flat", backend)
        _check_backend_dtypes(b, [("grads (flat buffer)", buf)])
        if len(table) == 0:
            out.zero_()
        else:
            with torch.no_grad():
                b.grad_stats_flat(buf, table, frozen, out)
            mark_written([out])
    return out


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


def _check_tensor_values(hp: AdamWArgs, frozen: Optional[torch.Tensor]) -> None:
    """Tensor-valued ``lr``, ``step`` and ``grad_scale`` checked like numbers: ValueError naming the
    argument. Only CPU tensors: reading a CUDA tensor's value would make the host wait for the device,
    which these ops never do, so device tensors are the caller's responsibility. A per-matrix step
    is checked for the matrices that are not frozen (a frozen matrix may never have been stepped)."""
    def on_cpu(t):
        return isinstance(t, torch.Tensor) and t.device.type == "cpu"
    if on_cpu(hp.lr) and not (math.isfinite(v := float(hp.lr)) and v >= 0):
        raise ValueError(f"Invalid lr value: {v} (a tensor lr must be finite and >= 0)")
    if on_cpu(hp.grad_scale) and not (math.isfinite(v := float(hp.grad_scale)) and v > 0):
        raise ValueError(f"Invalid grad_scale value: {v} (expected finite and > 0)")
    s = hp.step
    if on_cpu(s):
        bad = ~(torch.isfinite(s) & (s >= 1))
        if s.dim() == 1 and frozen is not None:
            bad &= ~frozen
        if bool(bad.any()):
            v = float(s[bad][0]) if s.dim() else float(s)
            raise ValueError(f"Invalid step value: {v} (a step tensor must be finite and >= 1"
                             f"{' for every matrix that is not frozen' if s.dim() else ''})")


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _adamw_args(device, num_matrices, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
                found_inf, maximize=False) -> AdamWArgs:
    if isinstance(lr, torch.Tensor):
        lr_t = _check_scalar_tensor("lr", lr, device)
    else:
        lr_t = check_number(lr, "lr", lo=0.0)
    beta1 = check_number(beta1, "beta1", lo=0.0, hi=1.0, hi_open=True)
    beta2 = check_number(beta2, "beta2", lo=0.0, hi=1.0, hi_open=True)
    eps = check_number(eps, "eps", lo=0.0)
    weight_decay = check_number(weight_decay, "weight_decay", lo=0.0)
    if isinstance(step, torch.Tensor):
        step_t = _check_scalar_tensor("step", step, device, shapes=((), (num_matrices,)))
    else:
        step_t = check_number(step, "step", lo=1.0)
    return AdamWArgs(lr=lr_t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step_t,
                     grad_scale=_check_scalar_tensor("grad_scale", grad_scale, device),
                     found_inf=_found_inf(found_inf, device), maximize=_check_bool("maximize", maximize))


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
        if p.dtype == torch.float64:
            raise TypeError(f"master_params[{i}] given for float64 params[{i}]: masters are for low-precision params")
    return masters if any(mw is not None for mw in masters) else None


def _check_list_call(lists: list[list[torch.Tensor]], names: tuple[str, ...]) -> torch.device:
    """Lengths, tensors, dtype families, devices and shapes of a list call; returns the device."""
    m = len(lists[0])
    for n, lst in zip(names, lists):
        if len(lst) != m:
            raise ValueError(f"{', '.join(names[:-1])} and {names[-1]} must have the same length; "
                             f"got {m} params and {len(lst)} {n}")
    for n, lst in zip(names, lists):
        for i, t in enumerate(lst):
            check_tensor(t, f"{n}[{i}]", dtypes=ACCEPTED_DTYPES)
    for i in range(m):
        moments = [(f"{n}[{i}]", lst[i]) for n, lst in zip(names[2:], lists[2:])]
        _check_family(f"[{i}]", lists[0][i], lists[1][i], moments)
    device = lists[0][0].device if m else torch.device("cpu")
    for n, lst in zip(names, lists):
        check_same_device(lst, n, device)
    for i in range(m):
        shape = lists[0][i].shape
        for n, lst in zip(names[1:], lists[1:]):
            if lst[i].shape != shape:
                raise ValueError(f"{n}[{i}] has shape {tuple(lst[i].shape)} but params[{i}] has {tuple(shape)}")
    return device


def _check_flat_call(flat: list[torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """The flat buffers of a flat call: 1-D, equal lengths, dtype family, one device."""
    bufs = []
    for x, n in zip(flat, names):
        t = check_tensor(x, f"{n} (flat buffer)", dtypes=ACCEPTED_DTYPES)
        if t.dim() != 1:
            raise ValueError(f"{n} (flat buffer) must be 1-D, got shape {tuple(t.shape)}")
        bufs.append(t)
    _check_family(" (flat buffer)", bufs[0], bufs[1], [(f"{n} (flat buffer)", t) for n, t in zip(names[2:], bufs[2:])])
    numel, device = bufs[0].numel(), bufs[0].device
    for t, n in zip(bufs[1:], names[1:]):
        if t.numel() != numel:
            raise ValueError(f"flat buffers must have equal length: params has {numel}, {n} has {t.numel()}")
        if t.device != device:
            raise ValueError(f"{n} is on {t.device}, expected {device}")
    return bufs


def _check_flat_master(master_params, numel: int, device: torch.device, param: torch.Tensor) -> Optional[torch.Tensor]:
    if master_params is None:
        return None
    if not isinstance(master_params, torch.Tensor):
        raise TypeError("with a flat buffer, master_params must be one flat float32 tensor, got "
                        f"{type(master_params).__name__}")
    master = check_tensor(master_params, "master_params (flat buffer)", dtypes=(torch.float32,))
    if master.dim() != 1 or master.numel() != numel:
        raise ValueError(f"master_params (flat buffer) must be 1-D with {numel} elements like params, "
                         f"got shape {tuple(master.shape)}")
    if master.device != device:
        raise ValueError(f"master_params is on {master.device}, expected {device}")
    if param.dtype == torch.float64:
        raise TypeError("master_params are float32 masters of low-precision params; params are float64")
    return master


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
    maximize: bool = False,
    max_exp_avg_sqs: Optional[Union[TensorList, torch.Tensor]] = None,
    segments: Optional[SegmentsLike] = None,
    num_matrices: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused in-place AdamW over every matrix that is not frozen, returning gradient statistics.

    Each non-frozen matrix gets exactly ``torch.optim.AdamW``'s update (decoupled weight decay,
    bias correction), computed in float32 for float32, bfloat16 and float16 params (gradients any
    of those, moments float32), and in float64 for float64 params (gradients and moments float64;
    see :func:`kernel_dtypes` for which backends compute float64). Frozen matrices are neither
    read nor written: params and every moment stay bitwise identical. The statistics of the
    gradients read are produced in the same pass (see :func:`grad_stats`).

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of ``M`` tensors (matching shapes), or four
            flat 1-D buffers of equal length together with ``segments``.
        frozen: optional bool tensor ``[M]``.
        step: the 1-based step number used for bias correction of this update (already
            incremented by the caller): a number, a 0-dim tensor, or a float tensor ``[M]``
            (one step count per matrix) on the params' device.
        lr, beta1, beta2, eps, weight_decay: as ``torch.optim.AdamW``; ``lr`` may be a 0-dim tensor
            (rounded to float32).
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
            Not for float64 params.
        maximize: as ``torch.optim.AdamW``: the update follows the gradient upwards (the unscaled
            gradient is negated). The statistics are those of the gradient as given.
        max_exp_avg_sqs: amsgrad (``torch.optim.AdamW(amsgrad=True)``) when given: the running
            maximum of ``exp_avg_sqs`` (same form, shapes and dtype as ``exp_avg_sqs``), updated
            to ``maximum(max_exp_avg_sqs, exp_avg_sqs)`` after the second moment, its square root
            the denominator. Start it at zeros, like torch.
        segments, num_matrices: the flat-buffer layout (see :func:`grad_stats`).
        out: optional preallocated float64 ``[M, 3]`` statistics tensor.
        backend: ``"auto"`` or a backend name.

    Tensor-valued ``lr``, ``step`` and ``grad_scale`` on the CPU are checked like numbers (a
    ValueError for a negative or NaN lr, a step below 1 or NaN, a grad_scale of 0 or NaN) before
    anything is written; on other devices they are not read, since that would synchronise with the
    host.

    Returns:
        float64 ``[M, 3]`` statistics of the (unscaled) gradients; zero rows for frozen matrices.
    """
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs") + (() if max_exp_avg_sqs is None else ("max_exp_avg_sqs",))
    given = (params, grads, exp_avgs, exp_avg_sqs) + (() if max_exp_avg_sqs is None else (max_exp_avg_sqs,))
    if segments is None:
        lists = [as_tensor_list(x, n) for x, n in zip(given, names)]
        m = len(lists[0])
        device = _check_list_call(lists, names)
        masters = _check_master_list(master_params, lists[0], device)
        frozen = check_frozen(frozen, m, device)
        hp = _adamw_args(device, m, lr, beta1, beta2, eps, weight_decay, step, grad_scale, found_inf, maximize)
        out = check_out(out, m, device)
        written = ([(f"{n}[{i}]", t) for n, lst in zip(names, lists) if n != "grads" for i, t in enumerate(lst)]
                   + [(f"master_params[{i}]", t) for i, t in enumerate(masters or ())] + [("out", out)])
        check_no_overlap(written, [(f"grads[{i}]", t) for i, t in enumerate(lists[1])] + _read_scalars(frozen, hp))
        check_writable(written)
        _check_tensor_values(hp, frozen)
        if m:
            b = backends.select(device, "list", backend)
            _check_backend_dtypes(b, [(f"params[{i}]", t) for i, t in enumerate(lists[0])])
            with torch.no_grad():  # params may be leaves that require grad
                b.adamw_list(*lists[:4], frozen, hp, out, masters=masters,
                             max_exp_avg_sqs=lists[4] if len(lists) > 4 else None)
            mark_written(t for _, t in written)
        return out
    bufs = _check_flat_call(list(given), names)
    numel, device = bufs[0].numel(), bufs[0].device
    master = _check_flat_master(master_params, numel, device, bufs[0])
    table = resolve_segments(segments, numel, num_matrices)
    frozen = check_frozen(frozen, table.num_matrices, device)
    hp = _adamw_args(device, table.num_matrices, lr, beta1, beta2, eps, weight_decay, step, grad_scale, found_inf,
                     maximize)
    out = check_out(out, table.num_matrices, device)
    written = ([(f"{n} (flat buffer)", t) for n, t in zip(names, bufs) if n != "grads"]
               + [("master_params (flat buffer)", master), ("out", out)])
    check_no_overlap(written, [("grads (flat buffer)", bufs[1])] + _read_scalars(frozen, hp))
    check_writable(written)
    _check_tensor_values(hp, frozen)
    if table.num_matrices:
        if len(table) == 0:
            out.zero_()
        else:
            b = backends.select(device, "flat", backend)
            _check_backend_dtypes(b, [("params (flat buffer)", bufs[0])])
            with torch.no_grad():
                b.adamw_flat(*bufs[:4], table, frozen, hp, out, master=master,
                             max_exp_avg_sq=bufs[4] if len(bufs) > 4 else None)
            mark_written(t for _, t in written)
    return out


__all__ = ["ACCEPTED_DTYPES", "grad_stats", "kernel_dtypes", "masked_adamw_", "SegmentTable", "STATS_DTYPE"]
