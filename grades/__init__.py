"""grades: fused gradient statistics, a frozen-aware AdamW, GradES early stopping and
test-time-compute-aware early stopping for PyTorch training loops."""
from __future__ import annotations

from ._validate import STATS_DTYPE, SUMSQ, SUMABS, NONFINITE
from .segment_table import SegmentTable
from .ops import grad_stats, masked_adamw_
from .policy import GradES, GradESConfig
from .optim import FrozenAwareAdamW
from .flat_adamw import FlatAdamW

__version__ = "0.1.0"

__all__ = ["grad_stats", "masked_adamw_", "GradES", "GradESConfig", "FrozenAwareAdamW", "FlatAdamW", "SegmentTable", "STATS_DTYPE", "SUMSQ", "SUMABS", "NONFINITE",
           "__version__"]
