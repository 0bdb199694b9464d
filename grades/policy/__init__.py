"""The GradES policy: per-component gradient statistics -> freeze decisions -> early stop.

Every optimizer step, :meth:`GradES.step` reduces the per-parameter gradient statistics
(``sum g^2``, ``sum |g|``, non-finite count) to one row per *component* (a weight matrix, or a
LoRA A/B pair), turns them into the chosen statistic, and decides **on the device** which
components freeze: after a grace period, on check steps, when the statistic has been below its
threshold ``tau`` on ``patience`` consecutive checks, subject to a cap on the frozen fraction.
A component that had no gradient in a step (an unrouted expert, a skipped branch) is not
counted in that step. Nothing in :meth:`GradES.step` waits for the device. When the state lives
in host memory (CPU training) the rule runs as one call into the CPU extension: a few
microseconds per step instead of a dozen small tensor ops, with bitwise the same decisions.

Freezing then acts twice:

1. at once on the device, through the optimizer's frozen mask (a
   :class:`~grades.contract.FreezableOptimizer` such as :class:`~grades.FrozenAwareAdamW`): the
   very next optimizer step leaves those matrices and their moments untouched;
2. later on the host, once a non-blocking copy of the decision has arrived (on CPU at once):
   ``requires_grad=False`` on the component's parameters, ``.grad=None``, the optimizer's host
   mask, the history record and :attr:`GradES.should_stop`.

With a stock ``torch.optim.AdamW`` only the second path exists: a frozen matrix may still be
updated by the one or two optimizer steps that run before the host learns of the decision (on
CUDA; on CPU the host learns within the same ``gs.step()`` call, so no further update happens).

The files, in the order data flows through them:

* :mod:`~grades.policy.config`: :class:`GradESConfig`, the settings;
* :mod:`~grades.policy.sources`: statistics tables (gradients, custom sources) and
  :mod:`~grades.policy.optimizer`: the link to a freezable optimizer (its table, its mask);
* :mod:`~grades.policy.clip` and :mod:`~grades.policy.sharding`: unclipping, the all-reduce;
* :mod:`~grades.policy.rule`: the decision rule (torch, native) and :mod:`~grades.policy.state`
  its state;
* :mod:`~grades.policy.record`: host copies; :mod:`~grades.policy.freezing`: what the host does
  on a freeze; :mod:`~grades.policy.history`: the sampled history;
* :mod:`~grades.policy.checkpoint`: state dicts; :mod:`~grades.policy.grad_es`: :class:`GradES`.
"""
from .clip import clip_coefficient
from .config import DEFAULT_ALPHA, DEFAULT_EMA, DEFAULT_PATIENCE, DEFAULT_REL_TAU, STATISTICS, GradESConfig
from .grad_es import GradES
from .rule import RULES, select_rule
from .sources import GradListSource, StatsSource

__all__ = ["GradES", "GradESConfig", "StatsSource", "GradListSource", "STATISTICS", "DEFAULT_ALPHA", "DEFAULT_REL_TAU",
           "DEFAULT_EMA", "DEFAULT_PATIENCE", "RULES", "clip_coefficient", "select_rule"]
