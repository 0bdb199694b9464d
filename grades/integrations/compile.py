"""GradES with ``torch.compile``: a bounded number of recompiles over a whole run.

Dynamo guards on every parameter's ``requires_grad`` (it decides which weight gradients the
compiled backward computes), so flipping it at each freeze event recompiles the graph, and past
``torch._dynamo.config.recompile_limit`` events the model silently falls back to eager. Here the
flip is batched into waves (:class:`~grades.integrations.waves.FreezeWaves`): freezes reach the
optimizer at once (nothing frozen is ever updated again), and ``requires_grad`` is set to
``False`` only when the frozen fraction reaches each wave, so the whole run costs at most
``len(waves)`` recompiles beyond the first compile (default ``(0.5, 0.9)``: two).

The price is compute, not correctness: until its wave a frozen matrix still has its
weight-gradient GEMM computed (and dropped right after accumulation). A matrix frozen early waits
until half of the components have frozen; ``bench/distributed.py`` measures the recompile time
that this saves.

``GradES(torch.compile(model), ...)`` attaches this itself. For a model compiled in place
(``model.compile()``), or to pick other waves, call :func:`attach_compile` right after building
GradES.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .waves import DEFAULT_WAVES, FreezeWaves

__all__ = ["attach_compile", "is_compiled"]


def is_compiled(model: Any) -> bool:
    """Whether ``model`` runs through ``torch.compile`` (a wrapper or compiled in place)."""
    from torch._dynamo.eval_frame import OptimizedModule
    if isinstance(model, OptimizedModule):
        return True
    return isinstance(model, nn.Module) and getattr(model, "_compiled_call_impl", None) is not None


def attach_compile(gs: Any, waves: Sequence[float] = DEFAULT_WAVES, *, every: int = 1) -> FreezeWaves:
    """Flip ``requires_grad`` of ``gs``'s frozen components only at ``waves`` (fractions of the
    components frozen): at most ``len(waves)`` recompiles. Returns the
    :class:`~grades.integrations.waves.FreezeWaves`."""
    return FreezeWaves(gs, waves, every=every, drop="accumulate")
