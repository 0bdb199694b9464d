"""GradES under ``torch.distributed``: identical decisions on every rank.

* **DDP** (replicated parameters): gradients are already averaged by DDP when ``optimizer.step()``
  runs, so every rank computes bitwise the same statistics and takes the same decisions with no
  extra communication. Use ``GradES(ddp_model.module, opt, cfg)`` (or the DDP wrapper itself).
  Build the DDP wrapper with ``find_unused_parameters=True`` (``ddp_find_unused_parameters=True``
  in ``TrainingArguments``): frozen parameters stop producing gradients, and DDP's reducer
  otherwise waits for them.
* **Sharded parameters** (FSDP2 ``fully_shard`` DTensors, or a flat buffer split across ranks as in
  ZeRO / Megatron's distributed optimizer): each rank reduces its own shard to ``[C, 3]`` partial
  sums (sum of squares, sum of |g|, non-finite count are all additive); GradES appends a column
  counting the components that had no gradient on this rank and all-reduces that small float64
  ``[C, 4]`` tensor ONCE per step over the group, so every rank sees the same totals and freezes
  the same components at the same step. DTensor parameters are detected automatically and
  reduced over their one sharded mesh dimension (FSDP2 on a 1-D mesh, or the shard dimension of
  HSDP's 2-D mesh; replicated DTensors need no reduction); other layouts, and tracked parameters
  that are only partly DTensors, are refused with an error asking for ``process_group``. For a
  split flat buffer use :func:`sharded_flat_source` and pass ``process_group``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..segment_table import SegmentTable
from .megatron import FlatGradSource, shard_segment_table


def sharded_flat_source(local_buffer: torch.Tensor, full_table: SegmentTable, start: int) -> FlatGradSource:
    """Statistics source for one rank's slice ``[start, start + local_buffer.numel())`` of a flat
    gradient buffer described by ``full_table`` (matrix ids = component indices). Pass the result
    as ``stats_source=`` together with ``process_group=`` to :class:`~grades.GradES`."""
    if not isinstance(full_table, SegmentTable):
        full_table = SegmentTable(full_table)
    local = shard_segment_table(full_table, start, start + local_buffer.numel())
    return FlatGradSource(local_buffer, local)


def decisions_agree(gs: Any, group: Optional[Any] = None) -> bool:
    """Debug check (a host sync and one all-gather): do all ranks hold the same frozen set and
    freeze steps?"""
    import torch.distributed as dist
    gs.wait()
    mine = torch.tensor(gs.state_dict()["freeze_step"], dtype=torch.int64)
    world = dist.get_world_size(group)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine, group=group)
    return all(torch.equal(g, got[0]) for g in got)


__all__ = ["sharded_flat_source", "decisions_agree"]
