"""Evaluation problems split across the ranks of a ``torch.distributed`` job.

Rank r of W samples problems ``r, r + W, r + 2W, ...`` (strided, so every rank gets a similar mix
when problems are sorted by difficulty); the verdicts are gathered with ``all_gather_object`` and
put back in problem order, so every rank holds the same full table. The decision is computed on
rank 0 and broadcast: every rank stops at the same step, whatever the floating-point
environment of each host.

Every rank must call :meth:`TTCMonitor.evaluate` at the same steps (the calls are collective).
Each gather also carries what must agree (step, training FLOPs, problem count and samples); a
rank that disagrees makes every rank raise the same ``ValueError`` instead of a wrong decision.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["Shard", "shard_for"]


class Shard:
    """This process's part of the evaluation problems: ``rank`` of ``world`` in ``group``."""

    def __init__(self, rank: int, world: int, group: Any = None):
        self.rank, self.world, self.group = int(rank), int(world), group

    def indices(self, n: int) -> list[int]:
        """The problem indices this rank samples (strided)."""
        return list(range(self.rank, n, self.world))

    def gather(self, header: dict, rows: Sequence[Any] | None, n: int, error: str | None = None) -> list[Any]:
        """Every rank's ``rows`` (aligned with :meth:`indices`) put back in problem order.

        ``error`` (with ``rows=None``) reports that this rank's sampling failed: the others are
        not left waiting in the collective, every rank raises.

        Raises:
            RuntimeError: on every rank, when some rank's sampling failed.
            ValueError: on every rank, when some rank's ``header`` differs from rank 0's.
        """
        import torch.distributed as dist
        got: list = [None] * self.world
        dist.all_gather_object(got, (header, None if rows is None else list(rows), error), group=self.group)
        failed = [(r, e) for r, (_, _, e) in enumerate(got) if e is not None]
        if failed:
            raise RuntimeError(f"TTC evaluation failed on rank {failed[0][0]}: {failed[0][1]}")
        for r, (h, _, _) in enumerate(got):
            if h != got[0][0]:
                diff = {k: (got[0][0].get(k), h.get(k)) for k in sorted(set(h) | set(got[0][0]))
                        if h.get(k) != got[0][0].get(k)}
                raise ValueError(f"TTC evaluation: rank {r} disagrees with rank 0 on {diff} "
                                 "(rank 0's value first); every rank must evaluate the same "
                                 "problems at the same step and training FLOPs")
        full: list = [None] * n
        for r, (_, part, _) in enumerate(got):
            for i, row in zip(range(r, n, self.world), part):
                full[i] = row
        return full

    def from_first(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist
        box = [obj if self.rank == 0 else None]
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def shard_for(distributed: bool | None, group: Any = None) -> Shard | None:
    """The :class:`Shard` to use, or None for a single process.

    ``distributed=None`` shards when ``torch.distributed`` is initialised with more than one rank
    in ``group``; ``True`` requires that (``RuntimeError`` otherwise); ``False`` never shards.
    """
    if distributed is False:
        return None
    import torch.distributed as dist
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise RuntimeError("distributed=True needs torch.distributed to be initialised "
                               "(init_process_group) before the evaluation")
        return None
    world = dist.get_world_size(group)
    if world < 2:
        return None
    return Shard(dist.get_rank(group), world, group)
