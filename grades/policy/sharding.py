"""GradES under sharded parameters: which process group the partial statistics add up over,
and the one all-reduce per step that gives every rank the same totals."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (duck-typed: the class lives in an optional torch module)."""
    return callable(getattr(t, "to_local", None)) and hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def dtensor_group(params: Sequence[torch.Tensor]) -> Any:
    """The process group over which the per-rank partial sums of ``params`` add up to the full
    statistics: ``None`` for plain tensors and for DTensors replicated on every rank, the group of
    the one sharded mesh dimension otherwise (FSDP2 on a 1-D mesh, or HSDP's shard dimension).

    Raises:
        ValueError: a mix of DTensors and plain tensors, DTensors on different meshes or with
            different sharded dimensions, more than one sharded mesh dimension, or a placement
            other than ``Shard``/``Replicate``; pass ``process_group`` explicitly for such layouts.
    """
    flags = [is_dtensor(p) for p in params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError(f"{sum(flags)} of the {len(flags)} tracked parameters are DTensors (sharded) and the "
                         "others plain tensors; GradES cannot tell which partial sums to all-reduce. Shard "
                         "every tracked module, or pass process_group and a stats_source that match your layout")
    mesh = params[0].device_mesh

    def layout(p: Any) -> tuple:
        kinds = []
        for pl in p.placements:
            if pl.is_shard():
                kinds.append("shard")
            elif pl.is_replicate():
                kinds.append("replicate")
            else:
                raise ValueError(f"tracked DTensor parameters must be Shard or Replicate on each mesh dimension, "
                                 f"got {pl}; pass process_group explicitly")
        return tuple(kinds)
    kinds = layout(params[0])
    for p in params[1:]:
        if p.device_mesh != mesh or layout(p) != kinds:
            raise ValueError("tracked DTensor parameters live on different device meshes or are sharded over "
                             f"different mesh dimensions ({kinds} vs {layout(p)}); pass process_group explicitly")
    shard = [i for i, k in enumerate(kinds) if k == "shard"]
    if len(shard) > 1:
        raise ValueError(f"tracked parameters are sharded over {len(shard)} mesh dimensions {shard}; GradES "
                         "all-reduces over one group: pass process_group covering all sharded dimensions")
    return mesh.get_group(shard[0]) if shard else None


def all_reduce_partials(stats: torch.Tensor, participated: Optional[torch.Tensor],
                        group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-component partial statistics ``[C, 3]`` over ``group`` with, as a fourth column,
    the count of ranks on which the component had no gradient (one all-reduce of ``[C, 4]``
    float64). Returns the totals ``[C, 3]`` and which components took part on every rank
    (bool ``[C]``)."""
    import torch.distributed as dist
    missing = stats.new_zeros(len(stats)) if participated is None else participated.logical_not().to(stats.dtype)
    buf = torch.cat([stats, missing[:, None]], dim=1)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf[:, :3].contiguous(), buf[:, 3] == 0


__all__ = ["all_reduce_partials", "dtensor_group", "is_dtensor", "local"]
