"""AdamW over one contiguous parameter buffer and its gradient buffer, sharded ZeRO-1 style.

Megatron-style loops keep every parameter as a view into one flat parameter buffer and
accumulate gradients into ``param.main_grad``, views into a flat gradient buffer at the same
offsets. :class:`FlatAdamW` steps those buffers with the fused :func:`grades.masked_adamw_`
and a :class:`~grades.SegmentTable` (one row per parameter, its matrix id = its row):

* **Sharded optimizer state.** Each rank owns ``1/world`` of every bucket of the buffer (as
  Megatron's distributed optimizer: a bucket ``[b0, b1)`` is cut into ``world`` equal pieces)
  and keeps AdamW moments (and float32 masters for low-precision params) only for the *live*
  part of its pieces: the ranges of frozen parameters hold no optimizer bytes.
* **Statistics once per step.** One fused pass over the rank's gradient pieces gives per-parameter
  partial ``(sum g^2, sum |g|, non-finite count)``; one all-reduce of that ``[P, 3]`` float64
  tensor gives every rank the same totals, so a non-finite gradient anywhere skips the step on
  every rank and GradES takes the same decisions everywhere.
* **Frozen parameters never move.** The frozen mask goes to the fused update (no momentum or
  weight-decay drift), and once the host knows of a freeze the frozen ranges leave the update,
  the moments and the all-gather: only live elements are gathered back into the parameters.

The gradient buffer must already be averaged over the data-parallel ranks for the pieces a rank
owns (an all-reduce, or Megatron's reduce-scatter of each bucket) when :meth:`FlatAdamW.step` runs.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from ._validate import STATS_DTYPE
from .segment_table import SegmentTable
from .contract import IndexedFrozenRows
from .ops import grad_stats, masked_adamw_
from .optim.hparams import check_hparams

__all__ = ["FlatAdamW"]

Range = tuple[int, int]


def _offset_in(view: torch.Tensor, buffer: torch.Tensor, what: str) -> int:
    """Element offset of the contiguous ``view`` inside the 1-D ``buffer`` (``ValueError`` if it
    is not a view into it)."""
    if view.dtype != buffer.dtype or view.device != buffer.device:
        raise ValueError(f"{what} ({view.dtype}, {view.device}) does not live in its buffer "
                         f"({buffer.dtype}, {buffer.device})")
    if not view.is_contiguous():
        raise ValueError(f"{what} must be a contiguous view into its buffer")
    delta = view.data_ptr() - buffer.data_ptr()
    size = buffer.element_size()
    if delta < 0 or delta % size or delta // size + view.numel() > buffer.numel():
        raise ValueError(f"{what} is not a view into its flat buffer")
    return delta // size


def _owned_ranges(buckets: Sequence[Range], world: int, rank: int) -> list[Range]:
    """The piece of every bucket that ``rank`` owns: bucket ``[b0, b1)`` cut into ``world`` equal
    pieces (``ValueError`` when a bucket's length is not a multiple of ``world``)."""
    out = []
    for b0, b1 in buckets:
        if (b1 - b0) % world:
            raise ValueError(f"bucket [{b0}, {b1}) of {b1 - b0} elements cannot be split evenly over {world} "
                             "ranks; pad every bucket to a multiple of the data-parallel size")
        size = (b1 - b0) // world
        if size:
            out.append((b0 + rank * size, b0 + (rank + 1) * size))
    return out


def _live_runs(owned: Sequence[Range], table: SegmentTable, frozen: np.ndarray) -> list[Range]:
    """Maximal sub-ranges of ``owned`` that overlap no frozen parameter (padding stays in a run,
    so an unfrozen buffer has one run per owned piece)."""
    cuts = sorted((int(o), int(o + n)) for o, n, m in table.array if frozen[m] and n > 0)
    runs = []
    for lo, hi in owned:
        start = lo
        for c0, c1 in cuts:
            if c1 <= start or c0 >= hi:
                continue
            if c0 > start:
                runs.append((start, c0))
            start = max(start, c1)
        if start < hi:
            runs.append((start, hi))
    return runs


def _restrict(table: SegmentTable, lo: int, hi: int, base: int) -> SegmentTable:
    """Rows of ``table`` clipped to ``[lo, hi)``, offsets relative to ``base``."""
    off, ln, mid = table.offsets, table.lengths, table.matrix_ids
    a, b = np.maximum(off, lo), np.minimum(off + ln, hi)
    keep = b > a
    rows = np.stack([a[keep] - base, b[keep] - a[keep], mid[keep]], axis=1) if keep.any() else np.zeros((0, 3))
    return SegmentTable(rows.astype(np.int64), num_matrices=table.num_matrices)


class LiveState:
    """AdamW state for the live part of some owned ranges of a flat buffer: the ranges are cut
    into *runs* that overlap no frozen parameter, and ``exp_avg`` / ``exp_avg_sq`` (and float32
    ``master`` copies for low-precision params) are compact buffers over the runs only, so a
    frozen parameter's range holds no optimizer bytes.

    Args:
        owned: ``(start, end)`` element ranges of the flat buffer this process updates.
        table: one row per parameter, ``(offset, numel, row)`` in the flat buffer.
        params: the flat parameter buffer (read for masters; its dtype decides whether they exist).
    """

    def __init__(self, owned: Sequence[Range], table: SegmentTable, params: torch.Tensor):
        self.owned, self.table, self.params = list(owned), table, params
        self.runs: list[Range] = []
        self.state: dict[str, torch.Tensor] = {}
        self.relayout(np.zeros(table.num_matrices, dtype=bool), carry=False)

    def relayout(self, frozen: np.ndarray, carry: bool = True) -> None:
        """Rebuild the runs for the host frozen set ``frozen`` (bool ``[P]``), keeping the state of
        every element that stays live (``carry=False``: fresh state)."""
        old_runs, old = self.runs, self.state
        runs = _live_runs(self.owned, self.table, frozen)
        n = sum(b - a for a, b in runs)
        dev = self.params.device
        state = {k: torch.zeros(n, dtype=torch.float32, device=dev) for k in ("exp_avg", "exp_avg_sq")}
        if self.params.dtype != torch.float32:
            state["master"] = torch.cat([self.params[a:b].float() for a, b in runs]) if runs else \
                torch.zeros(0, device=dev)
        if carry:
            _carry(old_runs, old, runs, state)
        self.runs, self.state = runs, state
        self.tables = [_restrict(self.table, a, b, a) for a, b in runs]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def update_(self, params: torch.Tensor, grads: torch.Tensor, frozen: torch.Tensor, out: torch.Tensor,
                **hp: Any) -> None:
        """One fused :func:`masked_adamw_` call per run (``hp``: step, lr, betas, eps, weight_decay)."""
        b1, b2 = hp.pop("betas")
        pos = 0
        for (a, b), tab in zip(self.runs, self.tables):
            n = b - a
            sl = slice(pos, pos + n)
            master = self.state["master"][sl] if "master" in self.state else None
            masked_adamw_(params[a:b], grads[a:b], self.state["exp_avg"][sl], self.state["exp_avg_sq"][sl], frozen,
                          beta1=b1, beta2=b2, master_params=master, segments=tab,
                          num_matrices=self.table.num_matrices, out=out, **hp)
            pos += n


def _carry(old_runs: list[Range], old: dict, runs: list[Range], new: dict) -> None:
    """Copy state of elements live in both layouts (new runs lie inside old ones)."""
    starts, pos = [], 0
    for a, b in old_runs:
        starts.append(pos)
        pos += b - a
    npos = 0
    for a, b in runs:
        for (oa, ob), os_ in zip(old_runs, starts):
            lo, hi = max(a, oa), min(b, ob)
            if hi > lo:
                for k in new:
                    new[k][npos + lo - a:npos + hi - a].copy_(old[k][os_ + lo - oa:os_ + hi - oa])
        npos += b - a


class FlatAdamW(IndexedFrozenRows):
    """AdamW on flat parameter / gradient buffers, state sharded over a process group.

    Args:
        params: the parameters, each a contiguous view into ``param_buffer`` (their row order is
            the order given; the GradES components are built from the same tensors).
        param_buffer: 1-D buffer holding every parameter (float32, bfloat16 or float16).
        grad_buffer: 1-D gradient buffer of the same length, each parameter's gradient at the
            same offset (``param.main_grad`` in Megatron); float32, bfloat16 or float16.
        buckets: ``(start, end)`` element ranges that are sharded separately (Megatron's
            ``bucket_indices``); default one bucket over the whole buffer. Each bucket's length
            must be a multiple of the group size.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (one group).
        process_group: the data-parallel group sharing the optimizer state (``None``: the
            default group when ``torch.distributed`` is initialised, else a single process).
        names: optional parameter names, for messages.

    Attributes (device tensors, read without syncing; rows in ``params`` order):
        frozen, last_grad_stats, last_participation, last_step_skipped: the
            :class:`~grades.contract.FreezableOptimizer` contract; ``last_grad_stats`` holds the
            totals over all ranks (every row of a flat buffer counts as taking part).
        skipped_steps: int64 0-dim, steps skipped for a non-finite gradient.
        param_groups: one group dict; ``lr``, ``betas``, ``eps``, ``weight_decay`` are read at
            every step, so a scheduler may change them.
        state_bytes: host int, bytes of optimizer state this rank holds.

    Raises:
        ValueError: a parameter outside the buffer, overlapping parameters, buffers of different
            lengths or devices, buckets that do not split evenly, bad hyperparameters.
    """

    def __init__(self, params: Sequence[torch.Tensor], param_buffer: torch.Tensor, grad_buffer: torch.Tensor, *,
                 buckets: Optional[Sequence[Range]] = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 process_group: Any = None, names: Optional[Sequence[str]] = None):
        lr, (b1, b2) = check_hparams(lr, betas, eps, weight_decay)
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        hp = {"lr": float(lr), "betas": (float(b1), float(b2)), "eps": float(eps), "weight_decay": float(weight_decay)}
        self._check_buffers(param_buffer, grad_buffer)
        self.param_buffer, self.grad_buffer = param_buffer, grad_buffer
        self.param_list = list(params)
        if not self.param_list:
            raise ValueError("FlatAdamW got no parameters")
        self.names = list(names) if names is not None else [f"param {i}" for i in range(len(self.param_list))]
        if len(self.names) != len(self.param_list):
            raise ValueError(f"got {len(self.names)} names for {len(self.param_list)} parameters")
        #: one group, as torch optimizers have: a scheduler may set ``param_groups[0]["lr"]`` (read every step)
        self.param_groups = [{"params": self.param_list, **hp}]
        #: statistics are totals over the data-parallel group already (GradES must not reduce them again)
        self.reduces_stats = True
        self._index = {id(p): i for i, p in enumerate(self.param_list)}
        rows = [(_offset_in(p.data, param_buffer, f"{n} (data)"), p.numel(), i)
                for i, (p, n) in enumerate(zip(self.param_list, self.names))]
        self.table = SegmentTable(rows, numel=param_buffer.numel(), num_matrices=len(rows))
        self._group, self._world, self._rank = self._resolve_group(process_group)
        buckets = [(0, param_buffer.numel())] if buckets is None else [(int(a), int(b)) for a, b in buckets]
        self.owned = _owned_ranges(buckets, self._world, self._rank)
        #: every rank's owned ranges (all ranks know the whole layout, so gathers need no exchange)
        self._owned_all = [_owned_ranges(buckets, self._world, r) for r in range(self._world)]
        self._own_table = SegmentTable(np.concatenate(
            [_restrict(self.table, lo, hi, 0).array for lo, hi in self.owned] or [np.zeros((0, 3), np.int64)]),
            num_matrices=len(rows))
        P, dev = len(rows), param_buffer.device
        self.frozen = torch.zeros(P, dtype=torch.bool, device=dev)
        self._host_frozen = np.zeros(P, dtype=bool)
        self.last_grad_stats = torch.zeros(P, 3, dtype=STATS_DTYPE, device=dev)
        self.last_participation = torch.ones(P, dtype=torch.bool, device=dev)
        self.last_step_skipped = torch.zeros((), dtype=torch.bool, device=dev)
        #: int64 0-dim device tensor: steps skipped because a gradient was non-finite
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=dev)
        self._scratch = torch.zeros(P, 3, dtype=STATS_DTYPE, device=dev)
        self._step = torch.zeros((), dtype=torch.float32, device=dev)  # bias-correction step of live params
        self._step_calls = 0
        self.live = LiveState(self.owned, self.table, param_buffer)
        self._relayout()

    @classmethod
    def from_buffers(cls, buffers: Any, names: Optional[dict] = None, **kwargs: Any) -> "FlatAdamW":
        """A FlatAdamW over an object with Megatron-core ``_ParamAndGradBuffer``'s attributes
        (``params``, ``param_data``, ``grad_data``, ``bucket_indices``), e.g. one built by
        :func:`grades.integrations.megatron.attach_param_and_grad_buffers` or Megatron's own
        buffer made with ``use_distributed_optimizer=True`` (without it the parameters are not in
        one buffer, and this raises ``ValueError``). ``names`` maps parameters to names (default:
        the buffer's ``names`` list if it has one); other keyword arguments go to the constructor."""
        for a in ("params", "param_data", "grad_data"):
            if getattr(buffers, a, None) is None:
                raise ValueError(f"the buffer has no {a!r}; a Megatron-core buffer holds its parameters in one "
                                 "param_data tensor only with use_distributed_optimizer=True")
        params = list(buffers.params)
        if names is not None:
            listed = [names.get(p, f"param {i}") for i, p in enumerate(params)]
        else:
            listed = getattr(buffers, "names", None)
        return cls(params, buffers.param_data, buffers.grad_data, names=listed,
                   buckets=getattr(buffers, "bucket_indices", None), **kwargs)

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_buffers(pbuf: torch.Tensor, gbuf: torch.Tensor) -> None:
        for t, n in ((pbuf, "param_buffer"), (gbuf, "grad_buffer")):
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"{n} must be a 1-D tensor")
            if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{n} must be float32, bfloat16 or float16, got {t.dtype}")
        if pbuf.numel() != gbuf.numel() or pbuf.device != gbuf.device:
            raise ValueError(f"param_buffer ({pbuf.numel()} elements on {pbuf.device}) and grad_buffer "
                             f"({gbuf.numel()} on {gbuf.device}) must have the same length and device")

    @staticmethod
    def _resolve_group(group: Any) -> tuple[Any, int, int]:
        import torch.distributed as dist
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0
        return group, dist.get_world_size(group), dist.get_rank(group)

    def _relayout(self) -> None:
        """Take in the host frozen set: new live runs here, and every rank's runs for the gather."""
        self.live.relayout(self._host_frozen)
        self._all_runs = [_live_runs(o, self.table, self._host_frozen) for o in self._owned_all]
        self._gather_len = max(sum(b - a for a, b in r) for r in self._all_runs)

    # ------------------------------------------------------------------ contract

    def _frozen_changed(self, new: np.ndarray) -> None:
        self._relayout()  # frozen ranges leave the update, the moments and the all-gather

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (moments and masters of its live elements)."""
        return self.live.nbytes

    # ------------------------------------------------------------------ the step

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffer (the parameters' ``.grad`` is not used)."""
        self.grad_buffer.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW step of the live elements this rank owns, then the all-gather of the updated
        live elements. Collective: every rank of the group must call it."""
        stats = grad_stats(self.grad_buffer, segments=self._own_table, num_matrices=self.num_params,
                           frozen=self.frozen, out=self.last_grad_stats)
        if self._group is not None or self._world > 1:
            import torch.distributed as dist
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self._group)
        # a non-finite gradient anywhere skips the step on every rank, decided on the device (no sync)
        found = stats[:, 2].sum() > 0
        self.last_step_skipped.copy_(found)
        self.skipped_steps.add_(found.to(torch.int64))
        self._step.add_((~found).to(torch.float32))
        self._step_calls += 1
        self.live.update_(self.param_buffer, self.grad_buffer, self.frozen, self._scratch, step=self._step,
                          found_inf=found.to(torch.float32), **self._hparams())
        if self._world > 1:
            self._gather()

    def _hparams(self) -> dict[str, Any]:
        g = self.param_groups[0]
        return {"lr": float(g["lr"]), "betas": tuple(g["betas"]), "eps": float(g["eps"]),
                "weight_decay": float(g["weight_decay"])}

    def _gather(self) -> None:
        """All-gather the live elements of every rank's pieces (padded to the longest rank)."""
        import torch.distributed as dist
        buf, L = self.param_buffer, self._gather_len
        if L == 0:
            return
        send = buf.new_zeros(L)
        pos = 0
        for a, b in self._all_runs[self._rank]:
            send[pos:pos + b - a].copy_(buf[a:b])
            pos += b - a
        recv = buf.new_empty(self._world * L)
        dist.all_gather_into_tensor(recv, send, group=self._group)
        for r, runs in enumerate(self._all_runs):
            if r == self._rank:
                continue
            pos = r * L
            for a, b in runs:
                buf[a:b].copy_(recv[pos:pos + b - a])
                pos += b - a

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's state: step, host frozen set, live runs and their moments (and masters)."""
        return {"step": int(self._step), "frozen": self._host_frozen.copy(), "runs": list(self.live.runs),
                "world": self._world, "rank": self._rank, "numel": self.param_buffer.numel(),
                "skipped_steps": int(self.skipped_steps),
                "hparams": self._hparams(),
                "state": {k: v.clone() for k, v in self.live.state.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` of the same rank of the same layout (``ValueError`` before
        anything changes otherwise)."""
        for k in ("world", "rank", "numel"):
            mine = {"world": self._world, "rank": self._rank, "numel": self.param_buffer.numel()}[k]
            if sd.get(k) != mine:
                raise ValueError(f"state dict is for {k}={sd.get(k)!r}, this optimizer has {k}={mine}")
        frozen = np.asarray(sd["frozen"], dtype=bool)
        if frozen.shape != (self.num_params,) or (self._host_frozen & ~frozen).any():
            raise ValueError("state dict's frozen set does not fit this optimizer's parameters")
        runs = _live_runs(self.owned, self.table, frozen)
        if [tuple(r) for r in sd["runs"]] != runs:
            raise ValueError("state dict's live ranges do not match this optimizer's layout")
        n = sum(b - a for a, b in runs)
        got = sd["state"]
        if set(got) != set(self.live.state) or any(v.numel() != n for v in got.values()):
            raise ValueError("state dict's moments do not match this optimizer's layout")
        self._host_frozen[:] = frozen
        self.frozen.copy_(torch.from_numpy(frozen))
        self._relayout()
        for k, v in got.items():
            self.live.state[k].copy_(v)
        self._step.fill_(int(sd["step"]))
        self.skipped_steps.fill_(int(sd["skipped_steps"]))
        self.param_groups[0].update(sd["hparams"])
