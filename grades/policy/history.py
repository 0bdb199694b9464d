"""The sampled history of the statistics: preallocated NumPy arrays the native rule can write
into, thinned to stay under a size limit."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch


class History:
    """Sampled statistics over time in preallocated NumPy arrays: per sample the optimizer step,
    the number of frozen components and the statistic ``[C]``; at most ``limit`` samples kept
    (:meth:`record` thins them when the limit is passed). The arrays grow geometrically; a native
    rule bound with :meth:`bind` writes samples into them itself."""

    def __init__(self, C: int, limit: int):
        self.C, self.limit = C, limit
        self._n = np.zeros(1, dtype=np.int64)
        self.steps = np.zeros(0, dtype=np.int64)
        self.frozen = np.zeros(0, dtype=np.int64)
        self.stat = np.zeros((0, C), dtype=np.float64)
        self._rule: Any = None
        self._every = 1
        self.base = self.stride = 1

    @property
    def n(self) -> int:
        return int(self._n[0])

    @property
    def cap(self) -> int:
        return len(self.steps)

    def bind(self, rule: Any, every: int) -> None:
        """Let ``rule`` (a native :class:`HostPolicy`) record a sample every ``every`` steps."""
        self._rule, self._every = rule, every
        if self.n >= self.cap:
            self._reserve(self.n + 1)  # room for the rule's next sample (rebinds)
        else:
            self._rebind()

    def set_every(self, every: int) -> None:
        self._every = every
        self._rebind()

    def _rebind(self) -> None:
        if self._rule is not None:
            self._rule.bind_history(torch.from_numpy(self.steps), torch.from_numpy(self.frozen),
                                    torch.from_numpy(self.stat), torch.from_numpy(self._n), self._every)

    def _reserve(self, n: int) -> None:
        if n <= self.cap:
            return
        cap = min(max(n, 2 * self.cap, 16), self.limit + 1) if n <= self.limit + 1 else n
        k = self.n
        for name in ("steps", "frozen", "stat"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], dtype=old.dtype)
            new[:k] = old[:k]
            setattr(self, name, new)
        self._rebind()

    def grow(self) -> None:
        self._reserve(self.n + 1)

    def append(self, step: int, frozen: int, stat: np.ndarray) -> bool:
        """Add a sample; returns whether there are now more than ``limit``."""
        i = self.n
        self._reserve(i + 1)
        self.steps[i] = step
        self.frozen[i] = frozen
        self.stat[i] = stat
        self._n[0] = i + 1
        if self._rule is not None and i + 1 <= self.limit:
            self._reserve(i + 2)  # a bound rule needs room for its next sample
        return i + 1 > self.limit

    def keep(self, mask: np.ndarray) -> None:
        """Keep the samples where ``mask`` (bool ``[n]``) holds, at most the last ``limit``."""
        sel = np.nonzero(mask)[0][-self.limit:]
        k = len(sel)
        for name in ("steps", "frozen", "stat"):
            a = getattr(self, name)
            a[:k] = a[sel]
        self._n[0] = k

    def as_list(self) -> list[dict]:
        n = self.n
        return [{"step": s, "frozen": f, "stat": row} for s, f, row in
                zip(self.steps[:n].tolist(), self.frozen[:n].tolist(), self.stat[:n].tolist())]

    def load(self, samples: Iterable[Mapping[str, Any]]) -> None:
        samples = list(samples)[-self.limit:]
        self._n[0] = 0
        self._reserve(len(samples))
        for h in samples:
            stat = np.asarray(h["stat"], dtype=np.float64)
            if stat.shape != (self.C,):
                raise ValueError(f"a history sample has {stat.size} statistics for {self.C} components")
            self.append(int(h["step"]), int(h["frozen"]), stat)


    # ------------------------------------------------------------------ sampling policy

    def setup(self, every: int) -> None:
        """Sample every ``every`` steps (``GradESConfig.history_every``), at stride 1."""
        self.base, self.stride = every, 1
        self.set_every(every)

    def record(self, t: int, frozen: int, stat: np.ndarray, events: Iterable[int], force: bool = False) -> None:
        """Sample step ``t`` if it is due (or ``force``: a freeze step); thin when over the limit
        (``events``: steps whose samples are always kept)."""
        if t % (self.base * self.stride) != 0 and not force:
            return
        if self.append(t, frozen, stat):
            self.thin(events)

    def thin(self, events: Iterable[int]) -> None:
        """Over the limit: keep every other regular sample (the samples of steps in ``events`` are
        always kept) and sample half as often from now on."""
        self.stride *= 2
        every = self.base * self.stride
        ev = np.array(sorted(set(events)), dtype=np.int64)
        steps = self.steps[:self.n]
        self.keep((steps % every == 0) | np.isin(steps, ev))
        self.set_every(every)

    def set_stride(self, stride: int) -> None:
        self.stride = stride
        self.set_every(self.base * stride)


__all__ = ["History"]
