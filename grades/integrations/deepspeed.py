"""GradES under DeepSpeed ZeRO stages 1 and 2: a client optimizer that sees the engine's gradients.

Under ZeRO-1/2 DeepSpeed hands its client optimizer one flat float32 *partition* per parameter
group (this rank's slice of the group's flattened parameters) with ``.grad`` set to the averaged
gradient of that slice; ``param.grad`` of the model's parameters is ``None`` by then. An
optimizer that reads parameters (torch's AdamW, :class:`~grades.FrozenAwareAdamW`) therefore
cannot tell GradES anything, and a freeze never reaches the update.

:class:`ZeroAdamW` is the client optimizer for that layout. It locates every model parameter's
fragment in the partition through the engine's own fragment map (``param._hp_mapping``, what
``deepspeed.utils.safe_get_full_grad`` and friends read), and at each step

* reduces the gradient it is about to apply to per-parameter ``(sum g^2, sum |g|, non-finite)``
  with one fused pass and one all-reduce of the group's ``[P_g, 3]`` rows over the data-parallel
  group, so every rank holds the same totals and GradES takes the same decisions everywhere;
* skips the step on every rank when any gradient is non-finite;
* applies AdamW with the fused :func:`grades.masked_adamw_` over the partition and its
  :class:`~grades.SegmentTable`, leaving frozen parameters' fragments and moments untouched.

DeepSpeed then copies the partition into the model's parameters and all-gathers them as usual;
frozen parameters get back their unchanged values. Moments live in ``optimizer.state[partition]``
(``exp_avg``, ``exp_avg_sq``, ``step``) in the partition's shape, as DeepSpeed's checkpointing and
fragment accessors expect: frozen fragments are neither read nor written, but they still occupy
their slots there.

Use it as ``deepspeed.initialize(model=m, optimizer=ZeroAdamW(m.parameters(), ...), config=...)``
with ``"zero_allow_untested_optimizer": true``, or in the transformers ``Trainer`` with
``optimizer_cls_and_kwargs=(ZeroAdamW, {"lr": ...})``; then ``GradES(model, engine.optimizer, cfg)``
(or :class:`~grades.integrations.transformers.GradESCallback`). :func:`check_engine_optimizer`
refuses, when GradES is built, what cannot work: ZeRO-3 and any other client optimizer under
ZeRO-1/2.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from .._validate import STATS_DTYPE
from ..segment_table import SegmentTable
from ..contract import IndexedFrozenRows
from ..ops import grad_stats, masked_adamw_
from ..optim.hparams import check_hparams

__all__ = ["ZeroAdamW", "check_engine_optimizer"]


def _engine_chain(optimizer: Any) -> list:
    """``optimizer`` and the objects reached through ``.optimizer`` (wrappers, the ZeRO
    optimizer, its client), at most five deep."""
    chain = []
    while optimizer is not None and len(chain) < 5 and all(optimizer is not c for c in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def check_engine_optimizer(optimizer: Any) -> None:
    """Refuse DeepSpeed setups that GradES cannot drive (``ValueError`` naming the fix): ZeRO-3,
    and a ZeRO-1/2 engine whose client optimizer is not a :class:`ZeroAdamW`. Does nothing for
    anything that is not a DeepSpeed optimizer (ZeRO-0 hands the client the model's parameters,
    so any optimizer works there)."""
    chain = _engine_chain(optimizer)
    ds = [o for o in chain if type(o).__module__.startswith("deepspeed.")]
    if not ds:
        return
    engine_opt = ds[0]
    mod = type(engine_opt).__module__
    if "stage3" in mod or hasattr(engine_opt, "fp32_partitioned_groups_flat"):
        raise ValueError("GradES does not support DeepSpeed ZeRO stage 3: parameters and gradients are partitioned "
                         "per parameter and gathered on demand, so no rank holds a matrix's gradient when the "
                         "optimizer steps. Use ZeRO stage 1 or 2 with grades.integrations.deepspeed.ZeroAdamW as "
                         "the client optimizer")
    client = chain[chain.index(engine_opt) + 1] if chain.index(engine_opt) + 1 < len(chain) else None
    if "stage_1_and_2" not in mod:
        if isinstance(client, ZeroAdamW):
            raise ValueError(f"ZeroAdamW steps DeepSpeed ZeRO-1/2 partitions, but the engine's optimizer is a "
                             f"{type(engine_opt).__name__}; use ZeRO stage 1 or 2")
        raise ValueError(f"GradES cannot see the gradients behind DeepSpeed's {type(engine_opt).__name__}: use ZeRO "
                         "stage 1 or 2 with grades.integrations.deepspeed.ZeroAdamW as the client optimizer, or "
                         "ZeRO stage 0 in float32")
    if not isinstance(client, ZeroAdamW):
        raise ValueError(f"under DeepSpeed ZeRO stage 1/2 the client optimizer ({type(client).__name__}) is handed "
                         "flat float32 partitions, not the model's parameters: their param.grad is None, so GradES "
                         "would read no gradient and its freezes would not reach the update. Pass "
                         "grades.integrations.deepspeed.ZeroAdamW as the client optimizer (Trainer: "
                         "optimizer_cls_and_kwargs=(ZeroAdamW, {...}); plain DeepSpeed: optimizer=ZeroAdamW(...) "
                         "with \"zero_allow_untested_optimizer\": true)")


def _fragment_rows(params: list, rows: list[int], group_index: int, partition: torch.Tensor) -> list[tuple]:
    """``(offset, numel, row)`` of each parameter's fragment in this rank's flat partition, from
    DeepSpeed's fragment map (parameters with no fragment on this rank give no row)."""
    out = []
    for p, r in zip(params, rows):
        hp = getattr(p, "_hp_mapping", None)
        if hp is None:
            continue
        if hp.param_group_index != group_index:
            raise ValueError(f"a parameter of group {group_index} is mapped to DeepSpeed group "
                             f"{hp.param_group_index}; build the engine from this optimizer's groups unchanged")
        addr = hp.get_hp_fragment_address()
        frag = hp.hp_fragment
        if frag.data_ptr() != partition.data_ptr() + addr.start * partition.element_size():
            raise ValueError("DeepSpeed's fragment of a parameter does not lie in the partition it steps")
        out.append((int(addr.start), int(addr.numel), r))
    return out


class ZeroAdamW(torch.optim.Optimizer, IndexedFrozenRows):
    """AdamW as DeepSpeed ZeRO-1/2's client optimizer, with GradES statistics and frozen mask.

    Args:
        params: the model's parameters or param-group dicts (as for torch's AdamW); a group may
            set its own ``lr``, ``betas``, ``eps`` and ``weight_decay``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        process_group: the data-parallel group DeepSpeed partitions over (``None``: the default
            group, DeepSpeed's default too).

    Rows (:attr:`param_list`) are the model's parameters in the order given. The statistics of
    a step are those of the gradient DeepSpeed hands over: averaged over the data-parallel
    ranks, after its loss-scale unscaling and gradient clipping.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, process_group: Any = None):
        lr, betas = check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.param_list = [p for g in self.param_groups for p in g["params"]]
        self._index = {id(p): i for i, p in enumerate(self.param_list)}
        self._groups = list(self.param_groups)  # DeepSpeed keeps these dicts and steps one at a time
        self._model_params = [list(g["params"]) for g in self.param_groups]
        rows, n = [], 0
        for g in self._model_params:
            rows.append(list(range(n, n + len(g))))
            n += len(g)
        self._group_rows = rows
        P, dev = len(self.param_list), self.param_list[0].device
        self._rows_t = [torch.tensor(r, dtype=torch.long, device=dev) for r in rows]
        self.frozen = torch.zeros(P, dtype=torch.bool, device=dev)
        self._host_frozen = np.zeros(P, dtype=bool)
        self.last_grad_stats = torch.zeros(P, 3, dtype=STATS_DTYPE, device=dev)
        self.last_participation = torch.tensor([bool(p.requires_grad) for p in self.param_list], device=dev)
        self.last_step_skipped = torch.zeros((), dtype=torch.bool, device=dev)
        self.skipped_steps = 0
        self.process_group = process_group
        #: statistics are totals over the data-parallel group already (GradES must not reduce them again)
        self.reduces_stats = True
        self._scratch = torch.zeros(P, 3, dtype=STATS_DTYPE, device=dev)
        self._tables: dict[int, SegmentTable] = {}
        self._step_calls = 0
        self._skipped_now = False

    # ------------------------------------------------------------------ the step

    def _group_of(self, group: dict) -> int:
        for i, g in enumerate(self._groups):
            if g is group:
                return i
        raise ValueError("ZeroAdamW was handed a parameter group it did not create; build the DeepSpeed engine "
                         "from this optimizer")

    def _partition(self, gi: int, group: dict) -> torch.Tensor:
        ps = group["params"]
        if len(ps) != 1 or any(ps[0] is p for p in self._model_params[gi]) or ps[0].dim() != 1:
            raise ValueError("ZeroAdamW steps the flat partitions DeepSpeed ZeRO stage 1/2 hands its client "
                             "optimizer, but it got the model's own parameters (no ZeRO, or stage 0): use "
                             "grades.FrozenAwareAdamW there")
        return ps[0]

    def _table(self, gi: int, part: torch.Tensor) -> SegmentTable:
        tab = self._tables.get(gi)
        if tab is None:
            rows = _fragment_rows(self._model_params[gi], self._group_rows[gi], gi, part)
            tab = SegmentTable(rows or np.zeros((0, 3), np.int64), numel=part.numel(),
                               num_matrices=self.num_params)
            self._tables[gi] = tab
        return tab

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Step the group(s) DeepSpeed hands over (it steps one group per call). Collective:
        one all-reduce of the group's statistics rows per group."""
        if closure is not None:
            raise ValueError("ZeroAdamW does not take a closure (DeepSpeed never passes one)")
        for group in self.param_groups:
            gi = self._group_of(group)
            self._step_group(gi, group)
            if gi == len(self._groups) - 1:  # the last group closes a DeepSpeed step
                self.last_step_skipped.fill_(self._skipped_now)
                self.skipped_steps += int(self._skipped_now)
                self._skipped_now = False
                self._step_calls += 1

    def _step_group(self, gi: int, group: dict) -> None:
        part = self._partition(gi, group)
        grad = part.grad
        if grad is None:
            return
        tab = self._table(gi, part)
        stats = grad_stats(grad, segments=tab, num_matrices=self.num_params, frozen=self.frozen, out=self._scratch)
        sub = stats.index_select(0, self._rows_t[gi])
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sub, op=dist.ReduceOp.SUM, group=self.process_group)
        self.last_grad_stats.index_copy_(0, self._rows_t[gi], sub)
        if bool(sub[:, 2].sum() > 0):  # same value on every rank: all skip together
            self._skipped_now = True
            return
        st = self.state[part]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(part, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(part, dtype=torch.float32)
        st["step"] += 1
        b1, b2 = group["betas"]
        lr = group["lr"]
        masked_adamw_(part, grad, st["exp_avg"], st["exp_avg_sq"], self.frozen, step=int(st["step"]),
                      lr=float(lr) if isinstance(lr, torch.Tensor) else lr, beta1=b1, beta2=b2, eps=group["eps"],
                      weight_decay=group["weight_decay"], segments=tab, num_matrices=self.num_params,
                      out=self._scratch)
