"""PNG figures of a demo run, in the style every grades figure shares (:mod:`grades.ttc.plot`)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..ttc.plot import RUN_COLORS, checkpoint_styles, draw_strategy, legend_below, style

#: short names of a Llama decoder layer's matrices, in the order they are drawn
_SHORT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _label(name: str) -> tuple[str, str]:
    """``("layer 0", "q_proj")`` from ``model.layers.0.self_attn.q_proj``."""
    parts = name.split(".")
    layer = next((f"layer {p}" for a, p in zip(parts, parts[1:]) if a == "layers" and p.isdigit()), "other")
    return layer, parts[-1]


def plot_grad_stats(history: dict, thresholds: list[float], path: str) -> None:
    """One panel per decoder layer: each matrix's gradient statistic over steps (log scale) in its
    own colour, named in the legend, its threshold as a dotted line of the same colour from the end
    of the grace period, and its freeze point marked with an x; the grace period is shaded."""
    comps = history["components"]
    samples = history["samples"]
    steps = np.array([s["step"] for s in samples])
    stats = np.array([s["stat"] for s in samples], dtype=float) if samples else np.zeros((0, len(comps)))
    freeze = history.get("freeze_steps", {})
    grace = int(history.get("grace_steps", 0))
    last = int(steps.max()) if len(steps) else 1
    layers: dict[str, list[int]] = {}
    for i, c in enumerate(comps):
        layers.setdefault(_label(c["name"])[0], []).append(i)
    cfg = history.get("config", {})
    ylabel = f"gradient {cfg.get('statistic', 'statistic')}" + (" (EMA)" if cfg.get("ema") else "")
    with style() as plt:
        fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4.6), squeeze=False, sharey=True)
        cmap = plt.get_cmap("tab10")
        for ax, (layer, idx) in zip(axes[0], layers.items()):
            for i in idx:
                short = _label(comps[i]["name"])[1]
                col = cmap(_SHORT.index(short) if short in _SHORT else 7 + i % 3)
                fs = freeze.get(comps[i]["name"])
                m = steps <= fs if fs is not None else np.ones_like(steps, dtype=bool)
                y = stats[m, i] if len(stats) else np.array([])
                ok = y > 0
                ax.plot(steps[m][ok], y[ok], color=col, lw=1.0, label=short)
                if i < len(thresholds) and thresholds[i] > 0:
                    ax.hlines(thresholds[i], grace, fs if fs is not None else last, colors=[col], linestyles=":", lw=1.0)
                if fs is not None and ok.any():
                    ax.plot([fs], [y[ok][-1]], "x", color=col, ms=8, mew=2)
            ax.axvspan(0, grace, color="0.88", lw=0, label=f"grace period ({grace} steps)")
            ax.plot([], [], "k:", lw=1.0, label="threshold (same colour)")
            ax.plot([], [], "kx", ms=8, mew=2, label="freeze point")
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_title(f"{layer}: gradient magnitude per matrix (run B)")
        axes[0][0].set_ylabel(ylabel)
        legend_below(fig, axes[0], ncol=5)
        fig.savefig(path)
        plt.close(fig)


def plot_frozen_fraction(frozen_steps: list[tuple[int, int]], num_components: int, budget: int,
                         path: str) -> None:
    """Fraction of tracked matrices frozen at each step of run B, against the step budget."""
    with style() as plt:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        if frozen_steps:
            s = np.array([a for a, _ in frozen_steps])
            f = np.array([b for _, b in frozen_steps]) / max(1, num_components)
            ax.step(s, f, where="post", color=RUN_COLORS["B"], label="B: frozen fraction")
            ax.axvline(s[-1], color=RUN_COLORS["B"], ls="--", lw=1, label=f"B stops at step {s[-1]}")
        ax.axvline(budget, color="k", ls="--", lw=1, label=f"step budget ({budget})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0, budget * 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("frozen fraction")
        ax.set_title(f"Run B: fraction of its {num_components} matrices frozen")
        legend_below(fig, [ax], ncol=3)
        fig.savefig(path)
        plt.close(fig)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if len(y) < w or w < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:w] / np.arange(1, w)
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def plot_losses(loss_a: list[float], loss_b: list[float], stop_b: int, path: str,
                loss_p: Optional[list[float]] = None, first_freeze: Optional[int] = None) -> None:
    """Training loss of the runs (raw, faint, and a running mean): A and B coincide until B's
    first freeze; P (torch AdamW) is the parity check of A."""
    with style() as plt:
        fig, ax = plt.subplots(figsize=(7.0, 4.2))
        w = max(1, min(25, len(loss_a) // 40))
        runs = [(loss_a, "A", "A: GradES off"), (loss_b, "B", "B: GradES on")]
        if loss_p is not None:
            runs.append((loss_p, "P", "P: torch AdamW (parity of A)"))
        for y, key, lab in runs:
            y = np.asarray(y, dtype=float)
            x = np.arange(1, len(y) + 1)
            ax.plot(x, y, color=RUN_COLORS[key], alpha=0.15, lw=0.5)
            ax.plot(x, _smooth(y, w), color=RUN_COLORS[key], lw=1.0 if key == "P" else 1.5,
                    ls=":" if key == "P" else "-", label=lab + f" (mean of {w})")
        if first_freeze is not None:
            ax.axvline(first_freeze, color=RUN_COLORS["B"], ls=":", lw=1, label=f"B's first freeze (step {first_freeze})")
        ax.axvline(stop_b, color=RUN_COLORS["B"], ls="--", lw=1, label=f"B stops (step {stop_b})")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss")
        legend_below(fig, [ax], ncol=2)
        fig.savefig(path)
        plt.close(fig)


def plot_ttc(curves: dict, selections: dict, path: str) -> None:
    """Accuracy vs k per checkpoint, one panel per strategy, with the target band and the choice
    (none when the baseline gave no target)."""
    strats = list(curves)
    with style() as plt:
        fig, axes = plt.subplots(1, len(strats), figsize=(5.4 * len(strats), 4.6), squeeze=False)
        names: list[str] = []
        first = curves[strats[0]]
        for c in sorted(first.table, key=lambda c: (c.train_flops, c.checkpoint)):
            if c.checkpoint not in names:
                names.append(c.checkpoint)
        styles = checkpoint_styles(names)
        for ax, s in zip(axes[0], strats):
            sel = selections.get(s)
            draw_strategy(ax, curves[s], s, styles, [(sel.min_train, "*", "choice")] if sel is not None else [])
            if sel is None:
                ax.set_title(ax.get_title() + "\nno target: the baseline did not converge", fontsize=9)
        legend_below(fig, axes[0], ncol=4)
        fig.savefig(path)
        plt.close(fig)


def write_all(out_dir: str, *, history: dict, thresholds: list[float], frozen_steps, num_components: int,
              budget: int, loss_a, loss_b, stop_b: int, curves: dict, selections: dict,
              loss_p=None) -> dict[str, str]:
    """Write every figure; returns ``{figure name: file name}`` relative to ``out_dir``."""
    files = {"grad_stats": "grad_stats.png", "frozen_fraction": "frozen_fraction.png",
             "loss": "loss.png", "ttc_accuracy": "ttc_accuracy.png"}
    plot_grad_stats(history, thresholds, os.path.join(out_dir, files["grad_stats"]))
    plot_frozen_fraction(frozen_steps, num_components, budget, os.path.join(out_dir, files["frozen_fraction"]))
    first = next((s for s, n in frozen_steps if n > 0), None)
    plot_losses(loss_a, loss_b, stop_b, os.path.join(out_dir, files["loss"]), loss_p=loss_p, first_freeze=first)
    plot_ttc(curves, selections, os.path.join(out_dir, files["ttc_accuracy"]))
    return files
