"""DTensor (FSDP2 ``fully_shard``) parameters in :class:`~grades.FrozenAwareAdamW`.

The fused kernels need plain storage, so the optimizer runs them on each DTensor's local shard
(its ``_local_tensor``; FSDP2 shards along dim 0, so a shard is a contiguous block of rows, maybe
empty). Everything a decision reads is made the same on every rank:

* the per-parameter statistics ``[P, 3]`` (sum g^2, sum |g|, non-finite count) are partial sums
  over the local shard; one all-reduce over the *shard* group per step turns them into the
  statistics of the whole gradient (rows of parameters that are not sharded are counted on the
  group's first rank only), so a ``"skip"`` decision and every GradES freeze decision are bitwise
  the same on every rank;
* under a ``GradScaler`` the scaler's ``found_inf`` was computed from local shards only: it is
  reduced (max) over the group too, before the update.

Accepted layouts: ``Shard(0)`` on a 1-D mesh (FSDP2), ``(Replicate(), Shard(0))`` on a 2-D mesh
(HSDP: the replicas already hold equal gradients), and ``Replicate()`` everywhere. Anything else
(tensor parallel ``Shard(1)``, ``Partial``, several sharded mesh dimensions, parameters on
different meshes) is refused when the parameter joins the optimizer, naming the placement.
Moments are DTensors with the parameter's placements, so the state dict is the one
``torch.optim.AdamW`` keeps for the same FSDP2 model, and ``torch.distributed.checkpoint`` saves
and loads it as it does torch's.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import torch

__all__ = ["is_dtensor", "local", "check_param", "check_moment", "ShardGroup"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (no import: none exists before its module is loaded)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The plain local shard of a DTensor (shares its storage), or ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def _shard_dims(p: Any) -> list[int]:
    """Mesh dimensions ``p`` is sharded over; refuses every placement but ``Shard(0)``/``Replicate``."""
    dims = []
    for i, pl in enumerate(p.placements):
        if pl.is_replicate():
            continue
        if pl.is_shard() and pl.dim == 0:
            dims.append(i)
            continue
        raise TypeError(f"FrozenAwareAdamW supports DTensor parameters sharded as FSDP2 does (Shard(0), with "
                        f"Replicate() on HSDP's replica dimension); got placement {pl!r} on mesh dimension {i} "
                        f"(placements {tuple(p.placements)}): tensor-parallel and partial layouts are not "
                        "supported, use torch.optim.AdamW for those parameters")
    if len(dims) > 1:
        raise TypeError(f"FrozenAwareAdamW supports DTensor parameters sharded over one mesh dimension, got "
                        f"placements {tuple(p.placements)} (sharded over mesh dimensions {dims})")
    return dims


def check_param(p: Any) -> torch.Tensor:
    """Check a DTensor parameter's layout (``TypeError`` naming the placement); returns its local shard."""
    _shard_dims(p)
    return local(p)


def check_moment(t: Any, p: Any, what: str) -> None:
    """A loaded DTensor moment must have its parameter's global shape, mesh and placements."""
    if tuple(t.shape) != tuple(p.shape) or t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
        raise ValueError(f"{what} is a DTensor of shape {tuple(t.shape)} with placements {tuple(t.placements)}, but "
                         f"the parameter has shape {tuple(p.shape)} with placements {tuple(p.placements)} on its "
                         "mesh; load the state dict through torch.distributed.checkpoint's set_optimizer_state_dict")
    if not t.is_floating_point():
        raise ValueError(f"{what} must be floating-point, got {t.dtype}")


class ShardGroup:
    """The one process group over which the optimizer's per-parameter partial sums add up.

    Args:
        params: the optimizer's parameters in row order (plain tensors and DTensors).

    Raises:
        ValueError: DTensor parameters on different meshes or sharded over different mesh
            dimensions (their partial sums would need different groups).
    """

    def __init__(self, params: Sequence[torch.Tensor]):
        self.group: Any = None
        self.owner = True  # this rank counts the rows of parameters that are not sharded
        mesh, dim = None, None
        sharded = []
        for p in params:
            if not is_dtensor(p):
                sharded.append(False)
                continue
            dims = _shard_dims(p)
            sharded.append(bool(dims))
            if not dims:
                continue
            if mesh is None:
                mesh, dim = p.device_mesh, dims[0]
            elif p.device_mesh != mesh or dims[0] != dim:
                raise ValueError("FrozenAwareAdamW's DTensor parameters must share one device mesh and one sharded "
                                 f"mesh dimension; got {mesh} dim {dim} and {p.device_mesh} dim {dims[0]}")
        if mesh is not None:
            import torch.distributed as dist
            self.group = mesh.get_group(dim)
            self.owner = dist.get_rank(self.group) == 0
        dev = local(params[0]).device if params else torch.device("cpu")
        self.has_dtensor = any(is_dtensor(p) for p in params)
        #: bool [P]: rows whose statistics are whole on every rank (not sharded over the group)
        self.replicated = torch.tensor([not s for s in sharded], dtype=torch.bool, device=dev)

    @property
    def active(self) -> bool:
        return self.group is not None

    def reduce_stats_(self, stats: torch.Tensor) -> None:
        """Sum the ``[P, 3]`` partial statistics over the group, in place (one all-reduce)."""
        import torch.distributed as dist
        if not self.owner and bool(self.replicated.any()):
            stats.masked_fill_(self.replicated[:, None], 0)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_found_(self, found: torch.Tensor) -> torch.Tensor:
        """A ``GradScaler``'s ``found_inf`` (0-dim float32), the max over the group."""
        import torch.distributed as dist
        found = found.clone()
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)
        return found
