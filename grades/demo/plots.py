"""PNG plots of a demo run (matplotlib, Agg backend)."""
from __future__ import annotations

import os

import numpy as np

COLORS = {"attention": "tab:blue", "mlp": "tab:orange"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_grad_stats(history: dict, thresholds: list[float], path: str) -> None:
    """Per-component gradient statistic over steps (log scale), attention and MLP in different
    colours, each component's threshold tau as a dotted line from the end of the grace period,
    and its freeze point marked with an x; the grace period is shaded."""
    plt = _plt()
    comps = history["components"]
    samples = history["samples"]
    steps = np.array([s["step"] for s in samples])
    stats = np.array([s["stat"] for s in samples], dtype=float) if samples else np.zeros((0, len(comps)))
    freeze = history.get("freeze_steps", {})
    grace = int(history.get("grace_steps", 0))
    last = int(steps.max()) if len(steps) else 1
    fig, ax = plt.subplots(figsize=(8, 4.6))
    seen_types = set()
    for i, c in enumerate(comps):
        col = COLORS.get(c["type"], "tab:gray")
        fs = freeze.get(c["name"])
        m = steps <= fs if fs is not None else np.ones_like(steps, dtype=bool)
        y = stats[m, i] if len(stats) else np.array([])
        ok = y > 0
        lab = c["type"] if c["type"] not in seen_types else None
        seen_types.add(c["type"])
        ax.plot(steps[m][ok], y[ok], color=col, lw=0.8, alpha=0.75, label=lab)
        if i < len(thresholds) and thresholds[i] > 0:
            ax.hlines(thresholds[i], grace, last, colors=col, linestyles=":", lw=0.7, alpha=0.6)
        if fs is not None and ok.any():
            j = np.nonzero(steps == fs)[0]
            yv = stats[j[0], i] if len(j) else y[ok][-1]
            ax.plot([fs], [yv], "x", color=col, ms=7, mew=1.6)
    ax.axvspan(0, grace, color="0.85", alpha=0.5, lw=0, label=f"grace period ({grace} steps)")
    ax.plot([], [], "k:", lw=0.7, label="tau (per component)")
    ax.plot([], [], "kx", label="freeze point")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    stat = history.get("config", {}).get("statistic", "statistic")
    ax.set_ylabel(f"gradient {stat} (EMA)" if history.get("config", {}).get("ema") else f"gradient {stat}")
    ax.set_title("GradES: per-matrix gradient magnitude, threshold and freeze points (run B)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frozen_fraction(frozen_steps: list[tuple[int, int]], num_components: int, budget: int,
                         path: str) -> None:
    """Fraction of tracked matrices frozen at each step of run B."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    if frozen_steps:
        s = np.array([a for a, _ in frozen_steps])
        f = np.array([b for _, b in frozen_steps]) / max(1, num_components)
        ax.step(s, f, where="post", color="tab:green")
    ax.axvline(budget, color="k", ls="--", lw=1, label=f"step budget ({budget})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(0, budget * 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("frozen fraction")
    ax.set_title(f"Run B: frozen fraction of {num_components} matrices")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if len(y) < w or w < 2:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    head = c[1:w] / np.arange(1, w)
    return np.concatenate([head, (c[w:] - c[:-w]) / w])


def plot_losses(loss_a: list[float], loss_b: list[float], stop_b: int, path: str) -> None:
    """Training loss of both runs (raw, faint, and a running mean)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    w = max(1, min(50, len(loss_a) // 20))
    for y, col, lab in ((loss_a, "tab:gray", "A: AdamW"), (loss_b, "tab:red", "B: FrozenAwareAdamW + GradES")):
        y = np.asarray(y, dtype=float)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, color=col, alpha=0.2, lw=0.6)
        ax.plot(x, _smooth(y, w), color=col, lw=1.4, label=lab)
    ax.axvline(stop_b, color="tab:red", ls="--", lw=1, label=f"B stops at step {stop_b}")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttc(selections: dict, path: str) -> None:
    """Accuracy vs k per checkpoint, one panel per strategy (pass@k, majority@k)."""
    plt = _plt()
    strats = list(selections)
    fig, axes = plt.subplots(1, len(strats), figsize=(5.2 * len(strats), 4.0), squeeze=False)
    for ax, s in zip(axes[0], strats):
        sel = selections[s]
        names = []
        for c in sel.table:
            if c.checkpoint not in names:
                names.append(c.checkpoint)
        names.sort(key=lambda n: next(c.train_flops for c in sel.table if c.checkpoint == n))
        for n in names:
            rows = sorted((c for c in sel.table if c.checkpoint == n), key=lambda c: c.k)
            ks = np.array([c.k for c in rows])
            acc = np.array([c.accuracy for c in rows])
            ls = "-" if n.startswith("A") else "--"
            ax.plot(ks, acc, ls, marker="o", ms=3, label=f"{n} ({rows[0].train_flops:.2e} FLOPs)")
        ax.axhline(sel.threshold, color="k", ls=":", lw=1, label=f"target - tol ({sel.threshold:.3f})")
        c = sel.min_train
        if c is not None:
            ax.plot([c.k], [c.accuracy], "*", ms=15, mfc="none", mec="red", mew=2,
                    label=f"choice: {c.checkpoint}, k={c.k}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (samples per query)")
        ax.set_ylabel(f"{s} accuracy")
        ax.set_title(s + (" (oracle verifier)" if s == "pass@k" else " (deployable)"))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower right", framealpha=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out_dir: str, *, history: dict, thresholds: list[float], frozen_steps, num_components: int,
              budget: int, loss_a, loss_b, stop_b: int, selections: dict) -> dict[str, str]:
    """Write every plot; returns ``{plot name: file name}`` relative to ``out_dir``."""
    files = {"grad_stats": "grad_stats.png", "frozen_fraction": "frozen_fraction.png",
             "loss": "loss.png", "ttc_accuracy": "ttc_accuracy.png"}
    plot_grad_stats(history, thresholds, os.path.join(out_dir, files["grad_stats"]))
    plot_frozen_fraction(frozen_steps, num_components, budget, os.path.join(out_dir, files["frozen_fraction"]))
    plot_losses(loss_a, loss_b, stop_b, os.path.join(out_dir, files["loss"]))
    plot_ttc(selections, os.path.join(out_dir, files["ttc_accuracy"]))
    return files
