"""Megatron-style contiguous gradient buffers: statistics of every component in ONE pass.

Megatron-core (and similar frameworks) accumulate gradients into ``param.main_grad``: views into
one contiguous fp32 buffer per dtype/bucket, with ``param.grad`` left empty. GradES reads such a
buffer directly: a :class:`~grades.SegmentTable` maps each parameter's range to its *component*
id (LoRA pairs share an id, so their sums add up), and one :func:`grades.grad_stats` call returns
the ``[C, 3]`` statistics.

Usage::

    src = FlatGradSource.from_model(model, grad_buffer)   # params carry .main_grad views
    gs = GradES(model, optimizer, cfg, stats_source=src)

:func:`attach_main_grad_buffer` builds such a buffer for a plain ``nn.Module`` (handy for tests
and for custom loops that want one flat gradient buffer).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..segment_table import SegmentTable
from ..components import Component
from ..ops import grad_stats


def _offset_in(view: torch.Tensor, buffer: torch.Tensor) -> int:
    if view.dtype != buffer.dtype or view.device != buffer.device:
        raise ValueError(f"main_grad ({view.dtype}, {view.device}) does not live in the buffer "
                         f"({buffer.dtype}, {buffer.device})")
    if not view.is_contiguous():
        raise ValueError("main_grad must be a contiguous view into the gradient buffer")
    delta = view.data_ptr() - buffer.data_ptr()
    size = buffer.element_size()
    if delta < 0 or delta % size or delta // size + view.numel() > buffer.numel():
        raise ValueError("a parameter's main_grad is not a view into the given gradient buffer")
    return delta // size


def main_grad_segment_table(components: Sequence[Component], buffer: torch.Tensor) -> SegmentTable:
    """Segment table of the components' ``main_grad`` views inside ``buffer``: one row
    ``(offset, numel, component_id)`` per parameter (so a LoRA pair's two rows share an id)."""
    if not isinstance(buffer, torch.Tensor) or buffer.dim() != 1:
        raise ValueError("the gradient buffer must be a 1-D tensor")
    rows = []
    for ci, c in enumerate(components):
        for name, p in zip(c.param_names, c.params):
            mg = getattr(p, "main_grad", None)
            if not isinstance(mg, torch.Tensor):
                raise ValueError(f"parameter {name} has no main_grad tensor; attach the flat buffer first")
            rows.append((_offset_in(mg, buffer), mg.numel(), ci))
    return SegmentTable(rows, numel=buffer.numel(), num_matrices=len(components))


def shard_segment_table(table: SegmentTable, start: int, end: int) -> SegmentTable:
    """The part of ``table`` that falls in ``[start, end)`` of the full buffer, with offsets
    relative to ``start``: the layout of one rank's slice of a flat buffer split across ranks.
    Matrix ids are kept, so per-rank partial sums add up to the full statistics."""
    if not 0 <= start <= end:
        raise ValueError(f"invalid shard range [{start}, {end})")
    off, ln, mid = table.offsets, table.lengths, table.matrix_ids
    lo, hi = np.maximum(off, start), np.minimum(off + ln, end)
    keep = hi > lo
    rows = np.stack([lo[keep] - start, hi[keep] - lo[keep], mid[keep]], axis=1) if keep.any() else np.zeros((0, 3), np.int64)
    return SegmentTable(rows, numel=end - start, num_matrices=table.num_matrices)


class FlatGradSource:
    """A :class:`~grades.policy.StatsSource` reading one flat gradient buffer in one
    :func:`grades.grad_stats` call.

    A flat buffer cannot tell "no gradient" from a zero gradient: a zeroed segment looks the
    same whether backward never reached the matrix (an unrouted expert, a skipped branch, a
    frozen-by-the-user parameter) or wrote zeros. So this source has no ``participation()``:
    every component counts as taking part in every step, and a matrix without a gradient reads
    a statistic of 0, which is below any threshold and, after ``patience`` such checks, freezes
    it (the per-tensor sources skip such steps instead). Where matrices can miss steps, track
    them with the default source (``param.grad``), give a source with a ``participation()`` that
    knows which ones ran, or leave them out of the components.

    Args:
        buffer: the 1-D gradient buffer (or a rank's slice of it).
        table: a segment table whose matrix ids are component indices; ``None`` to build it from
            the components' ``main_grad`` views when GradES binds the source.
    """

    def __init__(self, buffer: torch.Tensor, table: Optional[SegmentTable] = None):
        if not isinstance(buffer, torch.Tensor) or buffer.dim() != 1:
            raise ValueError("buffer must be a 1-D tensor")
        self.buffer = buffer
        self.table = table

    @classmethod
    def from_model(cls, model: nn.Module, buffer: torch.Tensor) -> "FlatGradSource":
        """A source whose table is built from the parameters' ``main_grad`` views at bind time."""
        return cls(buffer)

    def bind(self, components: Sequence[Component]) -> None:
        if self.table is None:
            self.table = main_grad_segment_table(components, self.buffer)
        elif self.table.num_matrices != len(components):
            raise ValueError(f"the segment table has {self.table.num_matrices} matrix ids but GradES "
                             f"tracks {len(components)} components")

    def compute(self, frozen: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            raise RuntimeError("FlatGradSource is not bound to components; pass it to GradES(stats_source=...)")
        return grad_stats(self.buffer, segments=self.table, num_matrices=self.table.num_matrices, frozen=frozen)


def attach_main_grad_buffer(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Give every trainable parameter a ``main_grad`` view into one new contiguous buffer, and
    accumulate gradients there (``param.grad`` is moved into ``main_grad`` after each backward
    and set to ``None``), as Megatron's distributed optimizer does. Returns the buffer; zero it
    (``buffer.zero_()``) between optimizer steps.

    This gives GradES its statistics only: an optimizer that reads ``param.grad`` (torch's AdamW,
    :class:`grades.FrozenAwareAdamW`) then sees no gradient and trains nothing. To train from the
    buffer, use :func:`attach_param_and_grad_buffers` with :class:`grades.FlatAdamW`."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    dev = params[0].device
    buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=dev)
    off = 0
    for p in params:
        p.main_grad = buffer[off:off + p.numel()].view_as(p)
        off += p.numel()
        p.register_post_accumulate_grad_hook(_move_grad_to_main_grad)
    return buffer


class FlatBuffers:
    """The flat parameter and gradient buffers of a model, laid out as Megatron-core's
    ``_ParamAndGradBuffer`` lays them out (the attributes :meth:`grades.FlatAdamW.from_buffers`
    reads): ``params``, ``param_data``, ``grad_data``, ``bucket_indices``, and ``names``."""

    def __init__(self, params: list, names: list, param_data: torch.Tensor, grad_data: torch.Tensor):
        self.params, self.names = params, names
        self.param_data, self.grad_data = param_data, grad_data
        self.bucket_indices = [(0, param_data.numel())]


def attach_param_and_grad_buffers(model: nn.Module, world_size: int = 1,
                                  grad_dtype: torch.dtype = torch.float32) -> FlatBuffers:
    """Move every trainable parameter into one contiguous parameter buffer (``param.data``
    becomes a view, values kept) and give it a ``main_grad`` view at the same offset of a gradient
    buffer of ``grad_dtype``; after each backward ``param.grad`` is added into ``main_grad`` and
    set to ``None``, as Megatron-core's DDP does. Both buffers are padded to a multiple of
    ``world_size`` so that :class:`grades.FlatAdamW` can shard them.

    Average ``grad_data`` over the data-parallel ranks before ``FlatAdamW.step()`` (an
    all-reduce, or a reduce-scatter of each rank's piece), and zero it after."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    dtypes = {p.dtype for _, p in named}
    if len(dtypes) != 1:
        raise ValueError(f"the trainable parameters have several dtypes {sorted(map(str, dtypes))}; one "
                         "buffer holds one dtype")
    first = named[0][1]
    total = sum(p.numel() for _, p in named)
    total += -total % world_size
    pbuf = torch.zeros(total, dtype=first.dtype, device=first.device)
    gbuf = torch.zeros(total, dtype=grad_dtype, device=first.device)
    off = 0
    for _, p in named:
        view = pbuf[off:off + p.numel()].view_as(p)
        view.copy_(p.data)
        p.data = view
        p.main_grad = gbuf[off:off + p.numel()].view_as(p)
        off += p.numel()
        p.register_post_accumulate_grad_hook(_move_grad_to_main_grad)
    return FlatBuffers([p for _, p in named], [n for n, _ in named], pbuf, gbuf)


def _move_grad_to_main_grad(param: torch.Tensor) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


__all__ = ["FlatGradSource", "main_grad_segment_table", "shard_segment_table", "attach_main_grad_buffer",
           "attach_param_and_grad_buffers", "FlatBuffers"]
