"""How early TTC early stopping stops, and how often wrongly, on curves with known truth.

Synthetic training runs: the accuracy of problem j after a fraction x of the planned training FLOPs
is ``p_j(x) = clip(A(x) + d_j, 0.02, 0.98)`` with a per-problem offset ``d_j`` (uniform in
+-0.2) and one of three curves ``A``:

* ``early``: saturates by 20% of the planned FLOPs (``0.3 + 0.45 (1 - exp(-x / 0.04))``);
* ``late``: saturates near the end (``0.3 + 0.45 (1 - exp(-x / 0.3))``);
* ``rising``: still rising linearly (``0.3 + 0.45 x``).

A :class:`grades.ttc.TTCMonitor` with ``target="projection"`` evaluates every 5% of the planned
FLOPs up to 95% (at 100% the run is over), drawing ``n`` Bernoulli(``p_j``) samples per problem
(100 or 500 problems; n = 16, the monitor's default, or ``--samples``), and the run stops at its
first ``stop``. The truth is exact: the accuracy of (checkpoint x, k) is
``mean_j p_j(x)`` at k = 1 and ``mean_j 1 - (1 - p_j(x))^k`` for pass@k; the target is the final
model's ``mean_j p_j(1)``. A stop is *wrong* when the chosen (checkpoint, k) misses that target by
more than the tolerance. Two settings: ``k1`` (k_max = 1: the projection alone decides) and
``passk`` (pass@k with k_max = 4, an oracle verifier at deployment).

Goals: on ``early``, a stop by 40% of the planned FLOPs in >= 80% of trials; on ``rising``, at
most 5% wrong stops. Writes ``bench/results/<device>/ttc_stop.json`` and ``.png``
(``ttc_stop-n<samples>.*`` with another ``--samples``, ``ttc_stop.smoke.*`` with ``--smoke``). CPU only (no model is trained).

    python bench/ttc_stop.py            # full run (about 10 minutes on a small CPU)
    python bench/ttc_stop.py --smoke    # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter

import numpy as np

from _common import device_slug, results_dir

from grades.ttc import TTCMonitor

CURVES = {
    "early": lambda x: 0.3 + 0.45 * (1.0 - np.exp(-x / 0.04)),
    "late": lambda x: 0.3 + 0.45 * (1.0 - np.exp(-x / 0.3)),
    "rising": lambda x: 0.3 + 0.45 * x,
}
SETTINGS = {"k1": dict(k_max=1, strategies=("pass@k",)), "passk": dict(k_max=4, strategies=("pass@k",))}
PLANNED = 1e15
EVAL_EVERY = 0.05


def truth(p: np.ndarray, k: int) -> float:
    """Exact accuracy of pass@k for problems with correct-probabilities ``p`` (k = 1: the mean)."""
    return float(np.mean(1.0 - (1.0 - p) ** k))


def probs(curve: str, x: float, offsets: np.ndarray) -> np.ndarray:
    return np.clip(CURVES[curve](x) + offsets, 0.02, 0.98)


def trial(curve: str, problems: int, setting: str, seed: int, n_samples: int, tolerance: float,
          confidence: float) -> dict:
    """One synthetic run: where it stopped, whether wrongly, and the projection there."""
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-0.2, 0.2, problems)

    def sample_fn(x, probs_, n):
        p = probs(curve, x, offsets)
        hits = rng.random((problems, n)) < p[:, None]
        return [["ok" if h else "no" for h in row] for row in hits]

    cfg = SETTINGS[setting]
    mon = TTCMonitor(list(range(problems)), sample_fn=sample_fn, verifier=lambda _, c: c == "ok",
                     n_samples=n_samples, k_max=cfg["k_max"], strategies=cfg["strategies"],
                     target="projection", tolerance=tolerance, planned_train_flops=PLANNED,
                     min_checkpoints=4, confidence=confidence, seed=seed)
    final = truth(probs(curve, 1.0, offsets), 1)
    steps = int(round(1.0 / EVAL_EVERY))
    d = None
    for i in range(1, steps):  # the last evaluation is at 95%: at 100% the run is over anyway
        x = round(i * EVAL_EVERY, 10)
        d = mon.evaluate(x, step=i, train_flops=x * PLANNED)
        if d.stop:
            got = truth(probs(curve, x, offsets), d.choice.k)
            return {"stop": x, "k": d.choice.k, "true_accuracy": got, "final": final,
                    "wrong": got < final - tolerance, "form": d.projection.form,
                    "projection": d.projection.to_dict()}
    return {"stop": None, "k": None, "true_accuracy": None, "final": final, "wrong": False,
            "form": None if d.projection is None else d.projection.form,
            "projection": None if d.projection is None else d.projection.to_dict()}


def summarise(runs: list[dict]) -> dict:
    stops = [r["stop"] for r in runs if r["stop"] is not None]
    return {"trials": len(runs), "stopped": len(stops) / len(runs),
            "stopped_by_40pct": sum(s <= 0.4 + 1e-9 for s in stops) / len(runs),
            "wrong_stops": sum(r["wrong"] for r in runs) / len(runs),
            "median_stop_fraction": statistics.median(stops) if stops else None,
            "mean_flops_fraction_spent": statistics.fmean([r["stop"] or 1.0 for r in runs]),
            "forms_at_stop_or_end": dict(Counter(str(r["form"]) for r in runs)),
            "example_projection": runs[0]["projection"],
            "stop_fractions": [r["stop"] for r in runs]}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    settings = list(res["settings"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.8), squeeze=False)
    styles = {"early": "tab:green", "late": "tab:orange", "rising": "tab:red"}
    for ax, setting in zip(axes[0], settings):
        for key, row in res["settings"][setting].items():
            curve, problems = key.split("/")
            fr = sorted(s if s is not None else 1.05 for s in row["stop_fractions"])
            ys = np.arange(1, len(fr) + 1) / len(fr)
            ax.step(fr, ys, where="post", color=styles[curve], ls="-" if problems == "P500" else "--",
                    label=f"{curve}, {problems}: wrong {row['wrong_stops']:.0%}")
        ax.axvline(0.4, color="k", lw=0.8, ls=":")
        ax.axhline(0.8, color="k", lw=0.8, ls=":")
        ax.set_xlim(0, 1.08)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("fraction of planned training FLOPs at the stop (1.05: never stopped)")
        ax.set_ylabel("fraction of trials stopped")
        ax.set_title(f"{setting} (tolerance {res['tolerance']}, confidence {res['confidence']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="3 trials, 100 problems (seconds)")
    ap.add_argument("--trials", type=int, default=None,
                    help="trials per curve with 100 problems (default 60; 20 with 500 problems)")
    ap.add_argument("--samples", type=int, default=16, help="samples per problem per evaluation")
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    trials = args.trials or (3 if args.smoke else 60)
    sizes = {100: trials} if args.smoke else {100: trials, 500: max(1, trials // 3)}
    res = {"planned_flops": PLANNED, "eval_every": EVAL_EVERY, "samples_per_problem": args.samples,
           "tolerance": args.tolerance, "confidence": args.confidence,
           "trials": {f"P{k}": v for k, v in sizes.items()},
           "settings": {}, "goals": {}}
    for setting in SETTINGS:
        out = res["settings"][setting] = {}
        for curve in CURVES:
            for problems, count in sizes.items():
                runs = [trial(curve, problems, setting, 1000 * t + problems, args.samples, args.tolerance,
                              args.confidence) for t in range(count)]
                out[f"{curve}/P{problems}"] = row = summarise(runs)
                print(f"{setting:6s} {curve:7s} P={problems:4d}: stopped {row['stopped']:.0%}, by 40% "
                      f"{row['stopped_by_40pct']:.0%}, wrong {row['wrong_stops']:.0%}, median stop "
                      f"{row['median_stop_fraction']}, forms {row['forms_at_stop_or_end']}", flush=True)
        early = [v["stopped_by_40pct"] for k, v in out.items() if k.startswith("early/")]
        rising = [v["wrong_stops"] for k, v in out.items() if k.startswith("rising/")]
        res["goals"][setting] = {"early_stopped_by_40pct_min": min(early), "goal_early": ">= 0.8",
                                 "rising_wrong_stops_max": max(rising), "goal_rising": "<= 0.05",
                                 "met": min(early) >= 0.8 and max(rising) <= 0.05}
    folder = results_dir("cpu", args.out)
    stem = "ttc_stop" + ("" if args.samples == 16 else f"-n{args.samples}") + (".smoke" if args.smoke else "")
    res["device"] = device_slug("cpu")
    with open(os.path.join(folder, stem + ".json"), "w") as fh:
        json.dump(res, fh, indent=1)
    plot(res, os.path.join(folder, stem + ".png"))
    print(json.dumps(res["goals"], indent=1))
    print("wrote", os.path.join(folder, stem + ".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
