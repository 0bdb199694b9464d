"""Accuracy-vs-k figures, and the one plotting style every grades figure shares (matplotlib, Agg).

The style: white background, no top/right spines, light grid, legends outside the data (below
the panels) so that no curve is hidden, one distinct colour per checkpoint (in training-FLOPs
order; run B's checkpoints dashed), the target as a band and the choice annotated in words.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from .select import Candidate, Selection

__all__ = ["plot_selection", "style", "checkpoint_styles", "legend_below", "draw_strategy"]

#: rc settings of every grades figure
RC = {"figure.dpi": 120, "savefig.dpi": 120, "font.size": 9, "axes.titlesize": 10,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
      "legend.fontsize": 8, "legend.frameon": False, "lines.linewidth": 1.4}
#: colours of the demo's runs: A (GradES off), B (GradES on), P (torch AdamW parity)
RUN_COLORS = {"A": "#4d4d4d", "B": "#d62728", "P": "#1f77b4"}


@contextmanager
def style() -> Iterator[object]:
    """``with style() as plt:`` pyplot under the shared rc settings (Agg backend)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    with plt.rc_context(RC):
        yield plt


def checkpoint_styles(names: Sequence[str]) -> dict[str, dict]:
    """Line style per checkpoint name: ``names`` in training-FLOPs order get well separated
    colours (tab10, then tab20); names starting with ``B`` are dashed."""
    import matplotlib.pyplot as plt
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: {"color": cmap(i % cmap.N), "ls": "--" if n.startswith("B") else "-"}
            for i, n in enumerate(names)}


def legend_below(fig, axes, ncol: int = 3) -> None:
    """One legend for the whole figure, under the panels (handles of all axes, deduplicated)."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol,
                   bbox_to_anchor=(0.5, 0.0))
        rows = -(-len(labels) // ncol)
        fig.tight_layout(rect=(0, min(0.45, 0.035 + 0.06 * rows * 4.0 / fig.get_figheight()), 1, 1))
    else:
        fig.tight_layout()


def _names_by_flops(sel: Selection) -> list[str]:
    flops: dict[str, float] = {}
    for c in sel.table:
        flops.setdefault(c.checkpoint, c.train_flops)
    return sorted(flops, key=lambda n: (flops[n], n))


def draw_strategy(ax, sel: Selection, strategy: str, styles: dict[str, dict],
                  marks: Sequence[tuple[Optional[Candidate], str, str]] = ()) -> None:
    """One panel: accuracy (+- 1 s.e.) vs k of every checkpoint for ``strategy``, the target band,
    and each ``(candidate, marker, label)`` of ``marks`` circled and named. The y range follows
    the data, so a target near 1 is not squeezed into a corner."""
    import numpy as np
    lo = sel.threshold
    for n in _names_by_flops(sel):
        rows = sorted((c for c in sel.table if c.checkpoint == n and c.strategy == strategy), key=lambda c: c.k)
        if not rows:
            continue
        ks = np.array([c.k for c in rows])
        acc = np.array([c.accuracy for c in rows])
        se = np.nan_to_num(np.array([c.se for c in rows], dtype=float))
        st = styles[n]
        ax.plot(ks, acc, marker="o", ms=3, color=st["color"], ls=st["ls"],
                label=f"{n} ({rows[0].train_flops:.2g} training FLOPs)")
        ax.fill_between(ks, acc - se, acc + se, color=st["color"], alpha=0.12, lw=0)
        lo = min(lo, float(acc.min()))
    ax.axhspan(sel.threshold, max(sel.target, sel.threshold + 1e-3), color="0.5", alpha=0.18, lw=0,
               label=f"target {sel.target:.3f} - tolerance {sel.tolerance:g}")
    ax.axhline(sel.threshold, color="k", ls=":", lw=1)
    for cand, mark, lab in marks:
        if cand is None or cand.strategy != strategy:
            continue
        ax.plot([cand.k], [cand.accuracy], mark, ms=15 if mark == "*" else 11, mfc="none", mec="red",
                mew=2, zorder=5)
        ax.annotate(f"{lab}:\n{cand.checkpoint}, k={cand.k} -> {cand.accuracy:.3f}", (cand.k, cand.accuracy),
                    xytext=(12, -28), textcoords="offset points", fontsize=8, color="red",
                    arrowprops={"arrowstyle": "-", "color": "red", "lw": 0.8})
    pad = max(0.02, 0.08 * (1.0 - lo))
    ax.set_ylim(max(-0.02, lo - pad), 1.0 + pad / 2)
    ax.set_xscale("log", base=2)
    ks = sorted({c.k for c in sel.table})
    ticks = [k for k in ks if k & (k - 1) == 0] or ks
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (samples per query)")
    ax.set_ylabel(f"{strategy} accuracy")
    ax.set_title(strategy + (" (oracle verifier: an upper bound)" if strategy == "pass@k" else " (deployable)"))


def plot_selection(sel: Selection, path: str | os.PathLike, *, title: str | None = None,
                   choices: Optional[dict[str, Optional[Candidate]]] = None) -> None:
    """Write a figure: one panel per strategy, accuracy (+- 1 s.e.) vs k for each checkpoint, the
    target band, and the min-train-FLOPs (star) and min-total-FLOPs (square) choices marked;
    ``choices`` (strategy -> candidate) adds each strategy's own choice (circle)."""
    strats = list(sel.strategies)
    with style() as plt:
        fig, axes = plt.subplots(1, len(strats), figsize=(5.0 * len(strats), 4.4), squeeze=False)
        styles = checkpoint_styles(_names_by_flops(sel))
        marks = ((sel.min_train, "*", "fewest training FLOPs"), (sel.min_total, "s", "fewest total FLOPs"))
        for ax, s in zip(axes[0], strats):
            own = (choices or {}).get(s)
            extra = [(own, "o", "this strategy's choice")] if own is not None and own != sel.min_train else []
            draw_strategy(ax, sel, s, styles, list(marks) + extra)
        if title:
            fig.suptitle(title)
        legend_below(fig, axes[0], ncol=min(3, len(styles) + 1))
        fig.savefig(path)
        plt.close(fig)
