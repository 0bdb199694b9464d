"""CPU backend: the C++/OpenMP extension in ``csrc/cpu`` (JIT-built and cached by ``grades._build``).

Work is split on the host into chunks of ``CHUNK`` elements (a constant of the extension, never
derived from the thread count): a ``[C, 3]`` int64 table of ``(start, length, id)`` rows. For flat
buffers it comes from :meth:`SegmentTable.chunks` (cached on the table); for lists it is built from
the tensors' sizes and cached by the tuple of sizes. The extension reduces each chunk on one thread
in a fixed order and adds chunk partials per matrix in table order, so statistics are bitwise
reproducible for any ``torch.get_num_threads()``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import numpy as np
import torch

from .._validate import chunk_rows
from .base import AdamWArgs, Backend

_LIST_CACHE_SIZE = 64


class CpuBackend(Backend):
    name = "cpu"
    device_types = ("cpu",)
    kinds = ("list", "flat")
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def __init__(self) -> None:
        self._mod = None
        self._list_tables: "OrderedDict[tuple[int, ...], torch.Tensor]" = OrderedDict()

    # -- loading -----------------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        from .. import _build
        mod, detail = _build.load("cpu")
        if mod is None:
            return False, detail
        self._mod = mod
        return True, f"{detail}; chunk {mod.CHUNK}, {torch.get_num_threads()} threads"

    def _ext(self):
        if self._mod is None:
            ok, why = self.available()
            if not ok:
                raise RuntimeError(f"grades CPU extension unavailable: {why}")
        return self._mod

    # -- chunk tables --------------------------------------------------------------------------
    def _list_chunks(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``[C, 3]`` int64 rows ``(start within tensor i, length, i)`` for a list of tensors."""
        key = tuple(t.numel() for t in tensors)
        got = self._list_tables.get(key)
        if got is None:
            n = len(key)
            rows = chunk_rows(np.zeros(n, np.int64), np.asarray(key, np.int64), np.arange(n, dtype=np.int64),
                              self._ext().CHUNK)
            got = torch.from_numpy(np.ascontiguousarray(rows))
            self._list_tables[key] = got
            if len(self._list_tables) > _LIST_CACHE_SIZE:
                self._list_tables.popitem(last=False)
        else:
            self._list_tables.move_to_end(key)
        return got

    def _flat_chunks(self, table) -> torch.Tensor:
        chunk = self._ext().CHUNK
        return table.device_tensor(f"cpu-chunks-{chunk}", torch.device("cpu"), lambda: table.chunks(chunk))

    # -- hyperparameters -------------------------------------------------------------------------
    @staticmethod
    def _hp_args(hp: AdamWArgs) -> dict:
        lr_is_tensor = isinstance(hp.lr, torch.Tensor)
        step, step_vec = hp.step, None
        if isinstance(step, torch.Tensor):
            if step.dim() == 1:
                step_vec, step = step.float().contiguous(), 1.0
            else:
                step = float(step)
        return dict(lr=float(hp.lr), lr_is_tensor=lr_is_tensor, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                    weight_decay=hp.weight_decay, step=float(step), step_per_matrix=step_vec,
                    grad_scale=hp.grad_scale, found_inf=hp.found_inf, maximize=hp.maximize)

    # -- the four entry points -------------------------------------------------------------------
    def grad_stats_list(self, grads, frozen: Optional[torch.Tensor], out: torch.Tensor) -> None:
        self._ext().grad_stats_list(grads, self._list_chunks(grads), frozen, out)

    def grad_stats_flat(self, buf, table, frozen, out) -> None:
        self._ext().grad_stats_flat(buf, self._flat_chunks(table), frozen, out)

    def adamw_list(self, params, grads, exp_avgs, exp_avg_sqs, frozen, hp: AdamWArgs, out, masters=None,
                   masters_in_sync=False, max_exp_avg_sqs=None) -> None:
        self._ext().adamw_list(params, grads, exp_avgs, exp_avg_sqs, self._list_chunks(params), frozen,
                               out=out, masters=masters if masters is not None else [],
                               max_exp_avg_sqs=max_exp_avg_sqs if max_exp_avg_sqs is not None else [],
                               **self._hp_args(hp))

    def adamw_flat(self, param, grad, exp_avg, exp_avg_sq, table, frozen, hp: AdamWArgs, out, master=None,
                   max_exp_avg_sq=None) -> None:
        self._ext().adamw_flat(param, grad, exp_avg, exp_avg_sq, self._flat_chunks(table), frozen,
                               out=out, master=master, max_exp_avg_sq=max_exp_avg_sq, **self._hp_args(hp))
