"""How a parameter and its state are handed to the fused kernels, which read plain real
contiguous memory element by element.

AdamW is elementwise, so any layout works once every tensor of a parameter lists its elements in
the same order: a complex tensor is its real view (real and imaginary parts as two elements, as
``torch.optim.AdamW`` treats them), a dense tensor with permuted strides (``channels_last``) is its
memory in storage order, and a parameter with gaps (a strided slice) is updated in a contiguous
copy that is written back.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["moment_dtype", "new_moment", "fits", "is_plain", "KernelViews"]


def moment_dtype(p: torch.Tensor) -> torch.dtype:
    """dtype of the moments (and amsgrad maximum) of ``p``: float32 for float32/bfloat16/float16
    parameters, the parameter's own dtype for float64 and complex ones (as torch)."""
    return p.dtype if p.dtype in (torch.float64, torch.complex64, torch.complex128) else torch.float32


def new_moment(p: torch.Tensor, src: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A zero moment buffer laid out like ``p`` (or a copy of ``src``'s values in that layout)."""
    t = torch.zeros_like(p, dtype=moment_dtype(p), memory_format=torch.preserve_format)
    if src is not None:
        t.copy_(src.detach())
    return t


def is_plain(p: torch.Tensor) -> bool:
    """Whether ``p`` goes to the kernels as it is (real and contiguous: the usual case)."""
    return p.is_contiguous() and not p.is_complex()


def _dense_order(t: torch.Tensor) -> Optional[list[int]]:
    """Dimensions by decreasing stride if that makes ``t`` contiguous (dense, no gaps), else None."""
    order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    return order if t.permute(order).is_contiguous() else None


def fits(t: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether state tensor ``t`` can be handed to the kernels with ``p``: its dtype, device,
    shape, and the same element order (the strides of a dense ``p``, contiguous otherwise)."""
    if t.dtype != moment_dtype(p) or t.shape != p.shape or t.device != p.device or t.layout != torch.strided:
        return False
    if p.is_contiguous():
        return t.is_contiguous()
    return t.stride() == p.stride() if _dense_order(p) is not None else t.is_contiguous()


class KernelViews:
    """The kernel-ready forms of one parameter that is not plain (complex and/or not contiguous).

    ``param`` and ``state`` (moments, master, amsgrad maximum) are aliases of the real memory;
    ``grad`` may be a copy (it is only read). :meth:`write_back` finishes a parameter with gaps,
    which is updated in a contiguous copy.
    """

    def __init__(self, p: torch.Tensor, g: torch.Tensor, state: list[Optional[torch.Tensor]]) -> None:
        self._target = None
        if p.is_complex():
            p, g = torch.view_as_real(p), torch.view_as_real(g.resolve_conj())
            state = [None if s is None else torch.view_as_real(s) for s in state]
        if p.is_contiguous():
            order = None
        else:
            order = _dense_order(p)
            if order is None:  # gaps: work on a contiguous copy, written back after the update
                self._target, p, order = p, p.contiguous(), None
        if order is not None:
            p = p.permute(order).view(-1)
            g = g.permute(order).reshape(-1)
            state = [None if s is None else s.permute(order).view(-1) for s in state]
        self.param = p
        self.grad = g if g.is_contiguous() else g.contiguous()
        self.state = state

    def write_back(self) -> None:
        """Copy the updated contiguous copy into a parameter with gaps (no-op otherwise)."""
        if self._target is not None:
            self._target.copy_(self.param)
