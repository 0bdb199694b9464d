"""The backend contract shared by the reference, CPU, CUDA and Triton implementations.

A backend implements four entry points. They receive inputs that ``grades.ops`` has already
validated (dtypes, devices, shapes, contiguity, segment tables) and a preallocated ``out`` of
shape ``[M, 3]``, dtype float64, on the tensors' device, which they must fill completely:

* column 0: sum of squares of the (unscaled) gradient, ``sum(g**2)``
* column 1: sum of absolute values, ``sum(|g|)``
* column 2: number of non-finite elements (NaN, +Inf, -Inf), an exact integer stored as float64

Sums include every element, so a NaN makes both sums NaN and an Inf makes them Inf (as
``torch.linalg.vector_norm`` would); the count says how many. A frozen matrix is neither read nor
written (its row of ``out`` is zero). Backends must be deterministic (same input, bitwise same
output) and must not synchronise with the host.

The AdamW entry points also take optional float32 master weights (``masters``: a list with one
tensor or ``None`` per matrix; ``master``: one flat buffer). A matrix with a master is updated in
its master, and the parameter receives the result rounded to its own dtype; the parameter itself
is not read. A backend without a fused form of this uses :meth:`Backend.adamw_list_via_masters`
/ :meth:`Backend.adamw_flat_via_masters`: its update on the masters, then a copy.

``hp.maximize`` negates the (unscaled) gradient in the update only: statistics describe the
gradient as given (they depend on magnitudes, so they are the same either way). amsgrad is on when
the AdamW entry points get ``max_exp_avg_sqs`` (list) / ``max_exp_avg_sq`` (flat): a buffer of
the moments' dtype that becomes ``maximum(max_exp_avg_sq, exp_avg_sq)`` (NaN propagates, as
``torch.maximum``) and gives the denominator, as in ``torch.optim.AdamW(amsgrad=True)``; frozen
matrices and ``found_inf`` steps leave it untouched like the other moments.

Each backend lists the parameter/gradient dtypes it computes in ``dtypes``. Float32, bfloat16 and
float16 tensors are computed in float32 with float32 moments; float64 tensors (where claimed) in
float64 with float64 moments and float64 gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Number = Union[int, float]


@dataclass
class AdamWArgs:
    """Hyperparameters of one ``masked_adamw_`` call.

    ``lr``: float, or a 0-dim float tensor on the params' device.
    ``step``: the 1-based step count used for bias correction of *this* update (the caller has
    already incremented it): a Python number, a 0-dim tensor, or a float32 tensor ``[M]`` with one
    step per matrix, on the params' device.
    ``grad_scale``: optional 0-dim float32 tensor; gradients are divided by it before use (and
    before statistics), as torch's fused AdamW does for ``GradScaler``.
    ``found_inf``: optional 0-dim float32 tensor; when non-zero, nothing is updated (statistics are
    still written).
    """

    lr: Union[float, torch.Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    step: Union[Number, torch.Tensor]
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    #: negate the gradient in the update (``torch.optim.AdamW(maximize=True)``); statistics unchanged
    maximize: bool = False


class Backend:
    """Base class; subclasses override ``name``, ``device_types``, ``kinds``, ``available`` and the ops."""

    name: str = "?"
    device_types: tuple[str, ...] = ()
    #: which input forms it implements: "list" and/or "flat"
    kinds: tuple[str, ...] = ("list", "flat")
    #: parameter/gradient dtypes its kernels compute (see the module docstring)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)

    def available(self) -> tuple[bool, str]:
        """``(True, detail)`` if usable in this process, else ``(False, reason)``. May build/load."""
        raise NotImplementedError

    def supports(self, device: torch.device, kind: str) -> bool:
        return device.type in self.device_types and kind in self.kinds

    def grad_stats_list(self, grads: list[torch.Tensor], frozen: Optional[torch.Tensor],
                        out: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_stats_flat(self, buf: torch.Tensor, table, frozen: Optional[torch.Tensor],
                        out: torch.Tensor) -> None:
        raise NotImplementedError

    def adamw_list(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                   exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                   frozen: Optional[torch.Tensor], hp: AdamWArgs, out: torch.Tensor,
                   masters: Optional[list[Optional[torch.Tensor]]] = None, masters_in_sync: bool = False,
                   max_exp_avg_sqs: Optional[list[torch.Tensor]] = None) -> None:
        raise NotImplementedError

    def adamw_flat(self, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                   exp_avg_sq: torch.Tensor, table, frozen: Optional[torch.Tensor], hp: AdamWArgs,
                   out: torch.Tensor, master: Optional[torch.Tensor] = None,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        raise NotImplementedError

    def adamw_list_via_masters(self, params, grads, exp_avgs, exp_avg_sqs, frozen, hp, out, masters,
                               masters_in_sync: bool = False, max_exp_avg_sqs=None) -> None:
        """Master weights without a fused kernel: the update on the masters (where given), then
        a copy of each updated master into its parameter.

        A frozen matrix, or every matrix on a ``found_inf`` step, keeps its parameter: a
        per-tensor ``torch.where`` on the device decides, without a host sync.
        ``masters_in_sync=True`` is the caller's promise that every parameter already equals
        its master rounded (``FrozenAwareAdamW`` keeps it so); then one ``torch._foreach_copy_``
        copies them all, since rewriting a kept parameter from its unchanged master writes the
        bits it already holds.
        """
        targets = [p if mw is None else mw for p, mw in zip(params, masters)]
        self.adamw_list(targets, grads, exp_avgs, exp_avg_sqs, frozen, hp, out, max_exp_avg_sqs=max_exp_avg_sqs)
        pairs = [(i, p, mw) for i, (p, mw) in enumerate(zip(params, masters)) if mw is not None]
        if pairs:
            _copy_unless_kept([p for _, p, _ in pairs], [mw for _, _, mw in pairs], [i for i, _, _ in pairs],
                              frozen, hp.found_inf, masters_in_sync)

    def adamw_flat_via_masters(self, param, grad, exp_avg, exp_avg_sq, table, frozen, hp, out, master,
                               max_exp_avg_sq=None) -> None:
        """:meth:`adamw_list_via_masters` for flat buffers: the copy covers the segments only."""
        self.adamw_flat(master, grad, exp_avg, exp_avg_sq, table, frozen, hp, out, max_exp_avg_sq=max_exp_avg_sq)
        segs = [(o, n, i) for o, n, i in table.array.tolist() if n]
        if segs:
            _copy_unless_kept([param[o:o + n] for o, n, _ in segs], [master[o:o + n] for o, n, _ in segs],
                              [i for _, _, i in segs], frozen, hp.found_inf, False)


def _copy_unless_kept(params: list[torch.Tensor], masters: list[torch.Tensor], ids: list[int],
                      frozen: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], in_sync: bool) -> None:
    """``params[j] = masters[j]`` rounded, except where matrix ``ids[j]`` is frozen or ``found_inf``
    is set (there the parameter keeps its bits). No host sync."""
    if in_sync or (frozen is None and found_inf is None):
        torch._foreach_copy_(params, masters)
        return
    keep = torch.zeros(max(ids) + 1, dtype=torch.bool, device=params[0].device) if frozen is None else frozen
    if found_inf is not None:
        keep = keep | (found_inf != 0)
    for p, mw, i in zip(params, masters, ids):
        p.copy_(torch.where(keep[i], p, mw.to(p.dtype)))
