"""Accuracy-vs-k plot of a :class:`~grades.ttc.select.Selection` (matplotlib, Agg backend)."""
from __future__ import annotations

import os

from .select import Selection

__all__ = ["plot_selection"]


def plot_selection(sel: Selection, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Write a PNG: one panel per strategy, accuracy (+- 1 s.e.) vs k for each checkpoint, the
    target band dashed, and the min-train-FLOPs (star) and min-total-FLOPs (square) choices marked."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    strats = list(sel.strategies)
    names = []
    for c in sel.table:
        if c.checkpoint not in names:
            names.append(c.checkpoint)
    names.sort(key=lambda n: next(c.train_flops for c in sel.table if c.checkpoint == n))
    fig, axes = plt.subplots(1, len(strats), figsize=(4.6 * len(strats), 3.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, s in zip(axes[0], strats):
        for i, n in enumerate(names):
            rows = sorted((c for c in sel.table if c.checkpoint == n and c.strategy == s), key=lambda c: c.k)
            ks = np.array([c.k for c in rows])
            acc = np.array([c.accuracy for c in rows])
            se = np.nan_to_num(np.array([c.se for c in rows]))
            col = cmap(i / max(1, len(names) - 1))
            ax.plot(ks, acc, "-o", ms=3, color=col, label=f"{n} ({rows[0].train_flops:.2g} FLOPs)")
            ax.fill_between(ks, acc - se, acc + se, color=col, alpha=0.15)
        ax.axhline(sel.target, color="k", ls="--", lw=1, label=f"target {sel.target:.3f}")
        if sel.tolerance > 0:
            ax.axhline(sel.threshold, color="k", ls=":", lw=1, label=f"target - tol {sel.threshold:.3f}")
        for cand, mark, lab in ((sel.min_train, "*", "fewest training FLOPs"),
                                (sel.min_total, "s", "fewest total FLOPs")):
            if cand is not None and cand.strategy == s:
                ax.plot([cand.k], [cand.accuracy], mark, ms=14 if mark == "*" else 10, mfc="none",
                        mec="red", mew=2, zorder=5, label=f"{lab}: {cand.checkpoint}, k={cand.k}")
        ax.set_xlabel("k (samples per query)")
        ax.set_ylabel(f"{s} accuracy")
        ax.set_title(s + (" (oracle verifier)" if s == "pass@k" else ""))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
