"""Triton backend: flat buffers on CUDA, and on CPU tensors through Triton's interpreter.

Both ops run two launches and no host synchronisation:

1. a per-chunk kernel (statistics, or statistics fused with the AdamW update) writing float64
   partial rows ``[C, 3]``;
2. a per-matrix kernel adding each matrix's partial rows in float64, in table order, into ``out``.

The chunk list is derived once per segment table from ``table.chunks(CHUNK)``, reordered so the
chunks of each matrix are contiguous (stable, so table order is kept), and cached on the device
through ``table.device_tensor`` (a one-time pinned, non-blocking host-to-device copy), so no call
waits for the device.

On CPU the kernels need ``TRITON_INTERPRET=1`` in the environment before this backend first
runs; they are then interpreted (slow, meant for tests). The backend is picked automatically only
for flat inputs on CUDA; on CPU only when asked for by name.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
import weakref
from typing import Optional

import numpy as np
import torch

from .base import AdamWArgs, Backend

_K = None  # the kernels module, imported on first use
_META: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kernels():
    """Import (once) and return the module that defines the Triton kernels."""
    global _K
    if _K is None:
        _K = importlib.import_module("._triton_kernels", __package__)
    return _K


def _interpreting() -> bool:
    if _K is not None:
        return bool(_K.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _Plan:
    """Host-side facts about one segment table at the kernels' chunk size (cached per table)."""

    __slots__ = ("rows", "ptr", "num_chunks", "aligned")

    def __init__(self, table, chunk: int, align: int):
        rows = table.chunks(chunk)
        order = np.argsort(rows[:, 2], kind="stable")
        #: [C, 3] int64 (start, length, matrix_id), chunks of each matrix contiguous, table order kept
        self.rows = np.ascontiguousarray(rows[order])
        counts = np.bincount(self.rows[:, 2], minlength=table.num_matrices)
        #: [M + 1] int64: matrix m owns partial rows [ptr[m], ptr[m + 1])
        self.ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_chunks = len(self.rows)
        #: every chunk start a multiple of ``align`` elements (lets the compiler vectorise loads)
        self.aligned = bool(self.num_chunks and (self.rows[:, 0] % align == 0).all())


def _plan(table) -> _Plan:
    K = _kernels()
    per_table = _META.get(table)
    if per_table is None:
        per_table = {}
        _META[table] = per_table
    key = (K.CHUNK, int(K.ALIGN))
    p = per_table.get(key)
    if p is None:
        p = _Plan(table, K.CHUNK, int(K.ALIGN))
        per_table[key] = p
    return p


def _device_plan(table, device: torch.device) -> tuple[_Plan, torch.Tensor, torch.Tensor]:
    """Plan plus its cached device tensors: chunk rows ``[C, 3]`` and matrix pointers ``[M + 1]``."""
    K = _kernels()
    p = _plan(table)
    rows = table.device_tensor(f"triton.chunks.{K.CHUNK}", device, lambda: p.rows)
    ptr = table.device_tensor(f"triton.matrix_ptr.{K.CHUNK}", device, lambda: p.ptr)
    return p, rows, ptr


def _check_device(device: torch.device) -> None:
    if device.type == "cpu":
        if not _interpreting():
            raise RuntimeError("the Triton backend runs on CPU tensors only under Triton's interpreter: "
                               "set TRITON_INTERPRET=1 before grades' Triton kernels are first used")
    elif device.type != "cuda":
        raise RuntimeError(f"the Triton backend does not run on {device.type} tensors")


@contextlib.contextmanager
def _launch(device: torch.device, table, frozen: Optional[torch.Tensor], out: torch.Tensor):
    """What both ops launch with, under the tensors' CUDA device (Triton launches on the current
    one): ``(kernels, plan, chunk rows, matrix ptr, partials, frozen arg, has_frozen)``, or
    ``None`` when the table has no chunks (``out`` is then zeroed)."""
    _check_device(device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        K = _kernels()
        plan, rows, ptr = _device_plan(table, device)
        if plan.num_chunks == 0:
            out.zero_()
            yield None
            return
        part = torch.empty((plan.num_chunks, 3), dtype=torch.float64, device=device)
        yield (K, plan, rows, ptr, part) + _frozen_arg(frozen, rows)


def _frozen_arg(frozen: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if frozen is None:
        return placeholder, False
    return frozen.view(torch.uint8), True


def _finish(part: torch.Tensor, ptr: torch.Tensor, out: torch.Tensor) -> None:
    K = _kernels()
    K.reduce_partials_kernel[(out.shape[0],)](part, ptr, out, RBLOCK=K.RBLOCK, num_warps=4,
                                              enable_fp_fusion=False)


def _coefficients(hp: AdamWArgs, num_matrices: int, device: torch.device):
    """Per-call AdamW coefficients ``(decay, step_size, bc2_sqrt)`` = ``(1 - lr*wd,
    lr / (1 - beta1**step), sqrt(1 - beta2**step))``, rounded to float32 as the reference does.

    Returns ``(None, 0, scalars)`` when ``lr`` and ``step`` are Python numbers (computed here in
    float64), else ``(coef, stride, None)`` with ``coef`` a float32 device tensor ``[R, 3]``
    computed with device ops (``R`` is 1, or ``M`` for a per-matrix step; ``stride`` 0 or 3)."""
    lr, step = hp.lr, hp.step
    if not isinstance(lr, torch.Tensor) and not isinstance(step, torch.Tensor):
        step = float(step)
        step_size = lr / (1.0 - hp.beta1 ** step)
        bc2_sqrt = math.sqrt(1.0 - hp.beta2 ** step)
        return None, 0, (1.0 - lr * hp.weight_decay, step_size, bc2_sqrt)
    if isinstance(step, torch.Tensor):
        s64 = step.to(device=device, dtype=torch.float64)
        bc1 = 1 - torch.pow(hp.beta1, s64)
        bc2_sqrt = (1 - torch.pow(hp.beta2, s64)).sqrt()
    else:
        step = float(step)
        bc1 = 1.0 - hp.beta1 ** step
        bc2_sqrt = math.sqrt(1.0 - hp.beta2 ** step)
    if isinstance(lr, torch.Tensor):
        step_size = lr.double() / bc1
        decay = 1 - lr.float() * hp.weight_decay
    else:
        step_size = lr / bc1
        decay = 1.0 - lr * hp.weight_decay
    per_matrix = isinstance(step, torch.Tensor) and step.dim() == 1
    shape = (num_matrices,) if per_matrix else ()

    def f32(x):
        if isinstance(x, torch.Tensor):
            return x.to(torch.float32).expand(shape)
        return torch.full(shape, x, dtype=torch.float32, device=device)

    coef = torch.stack([f32(decay), f32(step_size), f32(bc2_sqrt)], dim=-1).reshape(-1, 3).contiguous()
    return coef, (3 if per_matrix else 0), None


class TritonBackend(Backend):
    """Flat-buffer ``grad_stats`` and ``masked_adamw_`` as Triton kernels (see module docstring)."""

    name = "triton"
    device_types = ("cuda", "cpu")  # cpu only under TRITON_INTERPRET=1, and only when named
    kinds = ("flat",)

    def available(self) -> tuple[bool, str]:
        try:
            import triton
        except Exception as e:  # ImportError, or a broken install
            return False, f"triton is not importable ({type(e).__name__}: {e})"
        cuda = torch.cuda.is_available()
        interp = _interpreting()
        if not cuda and not interp:
            return False, ("no CUDA device, and TRITON_INTERPRET is not 1 (CPU tensors need Triton's "
                           "interpreter)")
        try:
            _kernels()
        except Exception as e:
            return False, f"Triton kernels failed to load ({type(e).__name__}: {e})"
        where = []
        if cuda:
            where.append("cuda")
        if _interpreting():
            where.append("cpu (interpreter)")
        return True, f"triton {triton.__version__}: {', '.join(where)}"

    def grad_stats_flat(self, buf: torch.Tensor, table, frozen: Optional[torch.Tensor],
                        out: torch.Tensor) -> None:
        with _launch(buf.device, table, frozen, out) as got:
            if got is None:
                return
            K, plan, rows, ptr, part, fz, has_frozen = got
            K.grad_stats_chunks_kernel[(plan.num_chunks,)](
                buf, rows, fz, part,
                HAS_FROZEN=has_frozen, ALIGNED=plan.aligned, BLOCK=K.BLOCK, num_warps=K.NUM_WARPS,
                enable_fp_fusion=False)
            _finish(part, ptr, out)

    def adamw_flat(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, table, frozen: Optional[torch.Tensor], hp: AdamWArgs,
                   out: torch.Tensor, master: Optional[torch.Tensor] = None,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        with _launch(param.device, table, frozen, out) as got:
            if got is None:
                return
            K, plan, rows, ptr, part, fz, has_frozen = got
            coef, stride, scalars = _coefficients(hp, table.num_matrices, param.device)
            decay, step_size, bc2_sqrt = scalars if scalars is not None else (1.0, 1.0, 1.0)
            w1 = float(np.float32(1.0 - hp.beta1))  # torch's lerp takes the weight in float32
            # with master weights the kernel updates the master and writes the parameter as its copy
            target, copy = (param, param) if master is None else (master, param)
            K.adamw_chunks_kernel[(plan.num_chunks,)](
                target, copy, grad, exp_avg, exp_avg_sq, exp_avg_sq if max_exp_avg_sq is None else max_exp_avg_sq,
                rows, fz, part,
                hp.grad_scale if hp.grad_scale is not None else part,
                hp.found_inf if hp.found_inf is not None else part,
                coef if coef is not None else part, stride,
                float(decay), float(step_size), float(bc2_sqrt),
                float(w1), float(hp.beta2), float(1.0 - hp.beta2), float(hp.eps),
                HAS_FROZEN=has_frozen, HAS_SCALE=hp.grad_scale is not None,
                HAS_FOUND_INF=hp.found_inf is not None, COEF_FROM_PTR=coef is not None,
                LERP_HI=abs(w1) >= 0.5, BF16_RNE=bool(K.INTERPRETED) and param.dtype == torch.bfloat16,
                HAS_COPY=master is not None, MAXIMIZE=hp.maximize, AMSGRAD=max_exp_avg_sq is not None,
                ALIGNED=plan.aligned, BLOCK=K.BLOCK, num_warps=K.NUM_WARPS,
                enable_fp_fusion=False)
            _finish(part, ptr, out)
