"""Thin adapters between training frameworks and the GradES policy.

* :mod:`grades.integrations.transformers`: ``GradESCallback`` for ``Trainer``/``SFTTrainer``.
* :mod:`grades.integrations.megatron`: statistics straight from contiguous ``main_grad`` buffers,
  and flat parameter / gradient buffers for :class:`grades.FlatAdamW`.
* :mod:`grades.integrations.deepspeed`: ``ZeroAdamW``, the client optimizer under DeepSpeed ZeRO-1/2.
* :mod:`grades.integrations.distributed`: DDP / sharded helpers (one all-reduce of a small vector).

Modules are imported lazily so that ``import grades`` never pulls in transformers or deepspeed.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "GradESCallback": "transformers",
    "FlatGradSource": "megatron",
    "main_grad_segment_table": "megatron",
    "shard_segment_table": "megatron",
    "attach_main_grad_buffer": "megatron",
    "attach_param_and_grad_buffers": "megatron",
    "ZeroAdamW": "deepspeed",
    "check_engine_optimizer": "deepspeed",
    "sharded_flat_source": "distributed",
    "decisions_agree": "distributed",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'grades.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = list(_LAZY)
