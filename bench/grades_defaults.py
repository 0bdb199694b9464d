"""Validation of GradES's default rule: what it saves and what it costs, next to other settings.

For each embedded task (of different difficulty) and seed, the same seeded tiny Llama trains with
``FrozenAwareAdamW`` and the demo's recipe (``DemoConfig``: schedule, gradient clipping) for the
full budget (GradES off), then once per rule with GradES on, each stopping when every matrix is
frozen. Rules:

* ``defaults``: ``GradESConfig()``'s own defaults (automatic threshold ``DEFAULT_REL_TAU``, EMA
  ``DEFAULT_EMA``, ``DEFAULT_ALPHA``, ``DEFAULT_PATIENCE``), read from the package, so the bench
  follows them;
* ``rel .3, EMA .95``: the defaults with a lower threshold on a longer EMA (a more cautious
  neighbour: what caution buys);
* ``defaults, quorum 1``: the defaults with ``freeze_quorum=1``: no matrix freezes before every
  one qualifies, so the run is full training cut short (what the freezing of single matrices
  costs in accuracy, and what it saves in training FLOPs);
* ``alpha .4, rel .5``: the values the defaults had before this bench chose the current ones (a
  longer grace period, a higher threshold, EMA 0.9);
* ``paper``: the paper's rule -- a fixed absolute threshold ``tau`` on the raw per-step statistic
  (no EMA), freeze at the first check below it, grace period ``alpha = 0.55``. As in the paper,
  ``tau`` is tuned once per model and then kept: one value per matrix type, the median of the
  thresholds the automatic mode sets on the calibration run (the medium task, seed 0, defaults),
  the same for every task and seed.

Each task has a step budget in which full training converges (GradES stops training whose
matrices have converged); the hard task also runs at half its budget, where it is still learning
when the grace period ends (the case automatic thresholds cannot tell from convergence). Reported
per (task, rule): mean over seeds of the steps saved (fraction of the budget) and of the test
accuracy change against full training (points = 100 x fraction), the worst seed, and how many seeds
stay within ``AIM_POINTS`` of full training. Writes ``bench/results/<device>/grades_defaults.json``
and ``.png``.

    python bench/grades_defaults.py --jobs 2              # 4 task/budget pairs x 10 seeds, 2 processes (~1 h)
    python bench/grades_defaults.py --smoke --out /tmp/d  # seconds
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

from _common import device_slug, results_dir

#: (task, digits, step budget): easy, medium (the demo's), hard (carries; reversed answers), and the
#: hard task on a budget it only just fills (its accuracy still climbs from 0.5 to 0.99 between 40%
#: and 80% of 1000 steps)
TASKS = (("sort", 4, 1000), ("sort", 5, 1000), ("addition", 2, 2000), ("addition", 2, 1000))
CALIBRATION = ("sort", 5, 1000, 0)  # (task, digits, budget, seed) of the run that tunes the paper's tau
#: the aim: a rule costs no seed more than this many points of test accuracy against full training
AIM_POINTS = 0.5


def rules(paper_tau: dict) -> dict[str, dict]:
    """GradES settings compared (DemoConfig field overrides)."""
    from grades.policy import DEFAULT_ALPHA, DEFAULT_EMA, DEFAULT_PATIENCE, DEFAULT_REL_TAU
    return {"defaults": dict(rel_tau=DEFAULT_REL_TAU, ema=DEFAULT_EMA, alpha=DEFAULT_ALPHA, patience=DEFAULT_PATIENCE),
            "rel .3, EMA .95": dict(rel_tau=0.3, ema=0.95, alpha=DEFAULT_ALPHA, patience=DEFAULT_PATIENCE),
            "defaults, quorum 1": dict(rel_tau=DEFAULT_REL_TAU, ema=DEFAULT_EMA, alpha=DEFAULT_ALPHA,
                                       patience=DEFAULT_PATIENCE, freeze_quorum=1.0),
            "alpha .4, rel .5": dict(rel_tau=0.5, ema=0.9, alpha=0.4, patience=DEFAULT_PATIENCE),
            "paper": dict(tau=paper_tau, ema=None, alpha=0.55, patience=0)}


def calibrate(cfg, progress: bool) -> dict[str, float]:
    """The paper's tau per matrix type: the median automatic threshold of one run with the defaults."""
    from grades.demo.train import make_task, train
    r = train(cfg, make_task(cfg), "B", progress=progress)
    by_type: dict[str, list[float]] = {}
    for c, t in zip(r.grades.components, r.grades.thresholds()):
        by_type.setdefault(c.type, []).append(t)
    return {k: statistics.median(v) for k, v in by_type.items()}


def run_one(cfg, rule_set: dict, progress: bool) -> dict:
    """Full training and every rule on one (task, seed); accuracies on the task's test split."""
    from grades.demo.tasks import greedy_accuracy
    from grades.demo.train import make_task, train
    task = make_task(cfg)
    full = train(cfg, task, "A", progress=progress)
    out = {"full": {"steps": full.steps, "flops": full.ledger.train_flops,
                    "acc": greedy_accuracy(full.model, task, task.test)}}
    for name, over in rule_set.items():
        r = train(dataclasses.replace(cfg, **over), task, "B", progress=progress)
        out[name] = {"steps": r.steps, "flops": r.ledger.train_flops, "acc": greedy_accuracy(r.model, task, task.test)}
    return out


def summarise(per: list[dict]) -> dict:
    """Per (task, rule): steps and training FLOPs saved, accuracy change in points (mean, worst
    seed), and on how many seeds the change is within :data:`AIM_POINTS`."""
    out: dict = {}
    for row in per:
        for rule, d in row["runs"].items():
            if rule == "full":
                continue
            s = out.setdefault(row["task"], {}).setdefault(rule, {"saved": [], "flops_saved": [], "delta_points": []})
            s["saved"].append(1.0 - d["steps"] / row["budget"])
            s["flops_saved"].append(1.0 - d["flops"] / row["runs"]["full"]["flops"])
            s["delta_points"].append(100.0 * (d["acc"] - row["runs"]["full"]["acc"]))
    for t in out.values():
        for s in t.values():
            s.update(saved_mean=statistics.fmean(s["saved"]), flops_saved_mean=statistics.fmean(s["flops_saved"]),
                     delta_mean=statistics.fmean(s["delta_points"]),
                     delta_worst=min(s["delta_points"]), seeds=len(s["delta_points"]),
                     within_aim=sum(d > -AIM_POINTS - 1e-9 for d in s["delta_points"]))
    return out


def plot(res: dict, path: str) -> None:
    from grades.ttc.plot import legend_below, style
    sm, names = res["summary"], list(res["rules"])
    with style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
        cols = plt.get_cmap("tab10")
        width = 0.8 / len(names)

        def x_of(i: int, j: int) -> float:  # bar j of task i
            return i + (j - (len(names) - 1) / 2) * width
        for j, rule in enumerate(names):
            xs = [x_of(i, j) for i in range(len(sm))]
            for ax, key, worst in ((axes[0], "saved_mean", None), (axes[1], "delta_mean", "delta_worst")):
                vals = [sm[t][rule][key] * (100 if key == "saved_mean" else 1) for t in sm]
                ax.bar(xs, vals, width=width, color=cols(j), label=rule)
                if worst:
                    ax.plot(xs, [sm[t][rule][worst] for t in sm], "v", color="k", ms=5,
                            label="worst seed" if j == 0 else None)
        for ax, lab in ((axes[0], "steps saved (% of budget)"), (axes[1], "test accuracy vs full (points)")):
            ax.set_xticks(range(len(sm)), [t.replace("/", "\n") + " steps" for t in sm])
            ax.set_ylabel(lab)
        axes[1].axhline(-AIM_POINTS, color="k", ls=":", lw=1, label=f"-{AIM_POINTS} points")
        # a collapse (tens of points) would squeeze every other bar flat: clip the axis, print those
        worst_all = [s[r]["delta_worst"] for s in sm.values() for r in names]
        low = max(min(worst_all) - 0.5, -5.0)
        axes[1].set_ylim(low, 0.5)
        for i, t in enumerate(sm):
            for j, rule in enumerate(names):
                mean, worst = sm[t][rule]["delta_mean"], sm[t][rule]["delta_worst"]
                within, n = sm[t][rule]["within_aim"], sm[t][rule]["seeds"]
                if worst < low:
                    axes[1].annotate(f"mean {mean:.0f}\nworst {worst:.0f}\n{within}/{n}", (x_of(i, j), low),
                                     xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7)
                elif within < n:  # how many seeds kept the aim, under the worst one
                    axes[1].annotate(f"{within}/{n}", (x_of(i, j), worst), xytext=(0, -6), textcoords="offset points",
                                     ha="center", va="top", fontsize=7, rotation=90)
        seeds = res["seeds"]
        fig.suptitle(f"GradES rules against full training, {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), "
                     f"{res['device']}; n/{len(seeds)}: seeds within {AIM_POINTS} points")
        legend_below(fig, axes, ncol=5)
        fig.savefig(path)
        plt.close(fig)


def write(per: list, seeds: list, rule_set: dict, args, elapsed: float) -> dict:
    """Summarise the runs done so far, write the JSON and the figure; returns the result."""
    res = {"benchmark": "grades_defaults", "device": device_slug("cpu"), "torch": torch.__version__,
           "budgets": {r["task"]: r["budget"] for r in per}, "seeds": sorted({r["seed"] for r in per}),
           "seeds_planned": seeds,
           "rules": rule_set, "calibration": dict(zip(("task", "digits", "budget", "seed"), CALIBRATION)),
           "per_seed": per,
           "summary": {t: {r: {k: v for k, v in s.items() if k not in ("saved", "flops_saved", "delta_points")}
                           for r, s in rs.items()} for t, rs in summarise(per).items()},
           "total_time_s": elapsed, "smoke": args.smoke}
    out = results_dir("cpu", args.out)
    with open(os.path.join(out, "grades_defaults.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(out, "grades_defaults.png"))
    return res


def _config(task: str, digits: int, budget: int, seed: int, smoke: bool):
    from grades.demo.config import DemoConfig
    return DemoConfig(task=task, digits=digits, seed=seed, steps=16 if smoke else budget, threads=None,
                      n_val=20 if smoke else 200, n_test=40 if smoke else 500)


def _job(task: str, digits: int, budget: int, seed: int, rule_set: dict, smoke: bool, progress: bool) -> dict:
    """One (task, seed) in a worker process (one thread each, as the demo)."""
    torch.set_num_threads(1)
    cfg = _config(task, digits, budget, seed, smoke)
    runs = run_one(cfg, rule_set, progress)
    return {"task": f"{task}-{digits}/{cfg.steps}", "seed": seed, "budget": cfg.steps, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed, one task")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    torch.set_num_threads(1)
    tasks, seeds = (TASKS[:1], args.seeds[:1]) if args.smoke else (TASKS, args.seeds)
    t0 = time.perf_counter()
    rule_set = rules(calibrate(_config(*CALIBRATION, smoke=args.smoke), args.progress))
    print("paper tau per matrix type: " + ", ".join(f"{k} {v:.4g}" for k, v in rule_set["paper"]["tau"].items()))
    # seeds outermost: an interrupted run still covers every task
    jobs = [(t, d, b, seed, rule_set, args.smoke, args.progress) for seed in seeds for t, d, b in tasks]
    per: list[dict] = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        for row in pool.map(_job, *zip(*jobs)):
            per.append(row)
            print(f"{row['task']} seed {row['seed']}: " + " | ".join(
                f"{k} {v['steps']} steps acc {v['acc']:.3f}" for k, v in row["runs"].items()), flush=True)
            # written after every run, so an interrupted sweep keeps what it measured
            res = write(per, seeds, rule_set, args, time.perf_counter() - t0)
    for t, rs in res["summary"].items():
        print(t + ": " + " | ".join(f"{r} saves {100 * s['saved_mean']:.0f}% of steps "
                                     f"({100 * s['flops_saved_mean']:.0f}% of FLOPs), {s['delta_mean']:+.2f} points "
                                     f"(worst {s['delta_worst']:+.2f}; {s['within_aim']} of {s['seeds']} seeds within "
                                     f"{AIM_POINTS})" for r, s in rs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
