"""CUDA backend: the CUDA C++ extension in ``csrc/cuda``.

Both input forms go through one chunked multi-tensor launcher. Every tensor (list form) or every
segment of a flat buffer (flat form) is cut into chunks of ``CHUNK`` elements; the device gets

* a *plan* (int64, built once per layout and cached): the chunk rows ``(slot, start, length,
  matrix)`` followed by a CSR index of each matrix's chunks, and
* a *slot table* (int64 ``[S, 8]``): data pointers, dtype codes and sizes, rebuilt on the host each call
  and uploaded only when the pointers changed.

Uploads are non-blocking copies from pinned memory, so no op synchronises with the host; the cached
tables are :class:`~grades._validate.DeviceCopy` objects, which any CUDA stream may use. Each op is
exactly two kernel launches: one block per chunk (statistics, and for AdamW the update, in one pass
over the gradient), then one warp per matrix adding the chunk partials in float64.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .._validate import DeviceCopy, chunk_rows
from .base import AdamWArgs, Backend

#: elements per chunk (one thread block each); at most 2**30 (the kernels index chunks with int)
CHUNK = 32768
_LAYOUT_CACHE_SIZE = 64


def _plan_array(rows: np.ndarray, slots: np.ndarray, num_matrices: int) -> np.ndarray:
    """Pack ``[C, 4]`` chunk rows, ``mat_ptr [M+1]`` and ``mat_chunks [C]`` into one int64 array.

    ``rows`` are ``(start, length, matrix)`` chunks in table order; the chunks of each matrix are
    listed in that order, which fixes the order of the per-matrix float64 reduction.
    """
    rows = np.asarray(rows, np.int64).reshape(-1, 3)
    c = len(rows)
    chunks = np.empty((c, 4), np.int64)
    chunks[:, 0] = slots
    chunks[:, 1:] = rows
    mids = rows[:, 2]
    counts = np.bincount(mids, minlength=num_matrices) if c else np.zeros(num_matrices, np.int64)
    mat_ptr = np.zeros(num_matrices + 1, np.int64)
    np.cumsum(counts, out=mat_ptr[1:])
    mat_chunks = np.argsort(mids, kind="stable").astype(np.int64)
    return np.concatenate([chunks.ravel(), mat_ptr, mat_chunks])


class _Layout:
    """A device-resident plan plus the last uploaded slot table for one tensor layout. Both are
    :class:`DeviceCopy` objects: a layout may be shared by calls on different CUDA streams."""

    __slots__ = ("plan", "num_chunks", "num_matrices", "slots_host", "slots_dev")

    def __init__(self, plan: DeviceCopy, num_chunks: int, num_matrices: int):
        self.plan = plan
        self.num_chunks = num_chunks
        self.num_matrices = num_matrices
        self.slots_host: Optional[torch.Tensor] = None
        self.slots_dev: Optional[DeviceCopy] = None

    def tables(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, plan)`` on the device for the current stream; the slot table ``host`` is
        re-uploaded only when a pointer or dtype changed."""
        if self.slots_dev is None or self.slots_host is None or not torch.equal(self.slots_host, host):
            self.slots_dev = DeviceCopy(host, device)
            self.slots_host = host
        return self.slots_dev.get(), self.plan.get()


class CudaBackend(Backend):
    name = "cuda"
    device_types = ("cuda",)
    kinds = ("list", "flat")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def __init__(self) -> None:
        self._mod = None
        self._list_layouts: "OrderedDict[tuple, _Layout]" = OrderedDict()
        self._flat_layouts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ availability

    def available(self) -> tuple[bool, str]:
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        from .. import _build
        mod, detail = _build.load("cuda")
        if mod is None:
            return False, detail
        self._mod = mod
        return True, detail

    def _ext(self):
        if self._mod is None:
            ok, why = self.available()
            if not ok:
                raise RuntimeError(f"grades cuda backend is not available: {why}")
        return self._mod

    # ------------------------------------------------------------------ layouts

    def _list_layout(self, slots_host: torch.Tensor, device: torch.device, kind: str) -> _Layout:
        """Plan for a list of tensors, keyed by their sizes (the slot table's last column)."""
        numels = slots_host[:, 6].numpy()
        key = (str(device), kind, numels.tobytes())
        lay = self._list_layouts.get(key)
        if lay is not None:
            self._list_layouts.move_to_end(key)
            return lay
        m = len(numels)
        rows = chunk_rows(np.zeros(m, np.int64), numels, np.arange(m, dtype=np.int64), CHUNK)
        plan = DeviceCopy(torch.from_numpy(_plan_array(rows, rows[:, 2], m)), device)
        lay = _Layout(plan, len(rows), m)
        self._list_layouts[key] = lay
        while len(self._list_layouts) > _LAYOUT_CACHE_SIZE:
            self._list_layouts.popitem(last=False)
        return lay

    def _flat_layout(self, table, device: torch.device, kind: str) -> _Layout:
        rows = table.chunks(CHUNK)
        # cached on the table, per device, for every kind of call
        plan = table.device_copy(f"cuda_plan_{CHUNK}", device,
                                 lambda: _plan_array(rows, np.zeros(len(rows), np.int64), table.num_matrices))
        holder = self._flat_layouts.get(table)
        if holder is None:
            holder = {}
            self._flat_layouts[table] = holder
        key = (str(device), kind)
        lay = holder.get(key)
        if lay is None or lay.plan is not plan:
            lay = _Layout(plan, len(rows), table.num_matrices)
            holder[key] = lay
        return lay

    # ------------------------------------------------------------------ ops

    def grad_stats_list(self, grads, frozen, out) -> None:
        mod = self._ext()
        host = mod.slot_table(grads, [], [], [])
        lay = self._list_layout(host, out.device, "stats")
        slots, plan = lay.tables(host, out.device)
        mod.grad_stats(slots, plan, lay.num_chunks, lay.num_matrices, frozen, None, out)

    def grad_stats_flat(self, buf, table, frozen, out) -> None:
        mod = self._ext()
        lay = self._flat_layout(table, buf.device, "stats")
        slots, plan = lay.tables(mod.slot_table([buf], [], [], []), out.device)
        mod.grad_stats(slots, plan, lay.num_chunks, lay.num_matrices, frozen, None, out)

    def _adamw(self, mod, lay: _Layout, host: torch.Tensor, frozen, hp: AdamWArgs, out) -> None:
        slots, plan = lay.tables(host, out.device)
        lr_t = hp.lr if isinstance(hp.lr, torch.Tensor) else None
        lr = 0.0 if lr_t is not None else float(hp.lr)
        step_t = hp.step if isinstance(hp.step, torch.Tensor) else None
        step = 0.0 if step_t is not None else float(hp.step)
        mod.masked_adamw(slots, plan, lay.num_chunks, lay.num_matrices, frozen, out, lr_t, lr,
                         float(hp.beta1), float(hp.beta2), float(hp.eps), float(hp.weight_decay),
                         step_t, step, hp.grad_scale, hp.found_inf, hp.maximize)

    # Master weights: the update on the float32 masters, then one multi-tensor copy (not fused).
    def adamw_list(self, params, grads, exp_avgs, exp_avg_sqs, frozen, hp, out, masters=None,
                   masters_in_sync=False, max_exp_avg_sqs=None) -> None:
        if masters is not None:
            return self.adamw_list_via_masters(params, grads, exp_avgs, exp_avg_sqs, frozen, hp, out, masters,
                                               masters_in_sync, max_exp_avg_sqs)
        mod = self._ext()
        host = mod.slot_table(grads, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or [])
        lay = self._list_layout(host, out.device, "adamw")
        self._adamw(mod, lay, host, frozen, hp, out)

    def adamw_flat(self, param, grad, exp_avg, exp_avg_sq, table, frozen, hp, out, master=None,
                   max_exp_avg_sq=None) -> None:
        if master is not None:
            return self.adamw_flat_via_masters(param, grad, exp_avg, exp_avg_sq, table, frozen, hp, out, master,
                                               max_exp_avg_sq)
        mod = self._ext()
        lay = self._flat_layout(table, grad.device, "adamw")
        vmax = [] if max_exp_avg_sq is None else [max_exp_avg_sq]
        self._adamw(mod, lay, mod.slot_table([grad], [param], [exp_avg], [exp_avg_sq], vmax), frozen, hp, out)
