"""End to end: the demo's two trainings (GradES off vs on) over several seeds, and its promise.

For each seed both runs train the same seeded tiny Llama on the demo's embedded task with the
same step budget and the same optimizer (``FrozenAwareAdamW``); run B has GradES on and stops
when it has frozen every tracked matrix. Reported per run:
time to finish (training loop only), optimizer steps, training FLOPs (frozen-aware ledger) and
greedy test accuracy, with mean and standard deviation over seeds, and the speedup B vs A per
seed, and per seed whether the demo's promise holds: A reaches 0.99 test accuracy, B stays within
0.01 of it and stops at least 1.3x sooner in optimizer steps. ``ATEN_CPU_CAPABILITY`` (default,
avx2, avx512) and ``--threads`` stand in for other machines; both are recorded. Writes
``bench/results/<device>/e2e[-<capability>-t<threads>].json`` and ``.png`` (the plain name for the
machine's own kernels at one thread; ``--out`` overrides the folder).

    python bench/e2e.py --seeds 0 1 2 3 4 5 6 7 8 9
    ATEN_CPU_CAPABILITY=avx2 python bench/e2e.py --threads 2 --seeds 0 1 2 3 4
    python bench/e2e.py --smoke --out /tmp/e2e
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from _common import device_slug, results_dir


def _mean_sd(xs):
    xs = [float(x) for x in xs]
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs)}


def run_seed(cfg, progress: bool) -> dict:
    from grades.demo.train import make_task, train
    from grades.demo.tasks import greedy_accuracy
    task = make_task(cfg)
    out = {"seed": cfg.seed}
    for name in ("A", "B"):
        r = train(cfg, task, name, progress=progress)
        acc = greedy_accuracy(r.model, task, task.test)
        d = {"wall_time_s": r.wall_s, "steps": r.steps, "train_flops": r.ledger.train_flops,
             "test_accuracy": acc, "stopped_early": r.stopped_early}
        if r.grades is not None:
            d["frozen"] = len(r.grades.frozen_components)
            d["num_components"] = r.grades.num_components
            d["first_freeze"] = min((e["step"] for e in r.grades.freeze_events), default=None)
            d["grace_steps"] = r.grades.grace
        out[name] = d
    out["speedup_steps"] = out["A"]["steps"] / out["B"]["steps"]
    out["speedup_wall"] = out["A"]["wall_time_s"] / out["B"]["wall_time_s"]
    out["speedup_flops"] = out["A"]["train_flops"] / out["B"]["train_flops"]
    out["accuracy_delta"] = out["B"]["test_accuracy"] - out["A"]["test_accuracy"]
    out["promise_met"] = promise_met(out)
    return out


def promise_met(r: dict) -> bool:
    """The demo's promise on one seed: A >= 0.99, B within 0.01 of A, B >= 1.3x fewer steps."""
    return (r["A"]["test_accuracy"] >= 0.99 and r["accuracy_delta"] >= -0.01 - 1e-9
            and r["speedup_steps"] >= 1.3)


def plot(res: dict, path: str) -> None:
    """Per seed: optimizer steps, training FLOPs and test accuracy of A and B (shared style)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from grades.ttc.plot import RUN_COLORS, legend_below, style
    per = res["per_seed"]
    seeds = [r["seed"] for r in per]
    with style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
        for ax, key, lab in ((axes[0], "steps", "optimizer steps"), (axes[1], "train_flops", "training FLOPs"),
                             (axes[2], "test_accuracy", "test accuracy (greedy)")):
            for j, (run, name) in enumerate((("A", "A: GradES off"), ("B", "B: GradES on"))):
                ax.plot([s + (j - 0.5) * 0.25 for s in seeds], [r[run][key] for r in per], "o",
                        color=RUN_COLORS[run], label=name)
            ax.set_xlabel("seed")
            ax.set_ylabel(lab)
            ax.set_xticks(seeds)
        accs = [r[run]["test_accuracy"] for r in per for run in "AB"]
        axes[2].set_ylim(min(0.98, min(accs) - 0.005), 1.002)
        axes[2].axhline(0.99, color="k", ls=":", lw=1, label="0.99")
        c, sm = res["config"], res["summary"]
        fig.suptitle(f"e2e: Llama-{c['model_size']}, {c['digits']}-digit {c['task']}, {c['steps']}-step budget, "
                     f"{res['device']} ({res['capability']}, {res['threads']} thread(s))\n"
                     f"B: {sm['speedup_steps']['min']:.2f}-{sm['speedup_steps']['max']:.2f}x fewer steps, accuracy "
                     f"{sm['accuracy_delta']['min']:+.3f}..{sm['accuracy_delta']['max']:+.3f} vs A; promise met on "
                     f"{sum(r['promise_met'] for r in per)}/{len(per)} seeds", fontsize=10)
        legend_below(fig, axes, ncol=3)
        fig.savefig(path)
        plt.close(fig)


def write(per_seed: list, cfg, seeds: list, device, args, elapsed: float) -> dict:
    """Summarise the seeds done so far and write the JSON and the figure; returns the result."""
    summary = {run: {k: _mean_sd([r[run][k] for r in per_seed])
                     for k in ("wall_time_s", "steps", "train_flops", "test_accuracy")} for run in ("A", "B")}
    for k in ("speedup_steps", "speedup_wall", "speedup_flops", "accuracy_delta"):
        summary[k] = _mean_sd([r[k] for r in per_seed])
    cfgd = cfg.to_dict()
    cfgd.pop("seed")
    cap = os.environ.get("ATEN_CPU_CAPABILITY") or "native"
    done = [r["seed"] for r in per_seed]
    res = {"benchmark": "e2e", "device": device_slug(device), "torch": torch.__version__,
           "capability": cap, "threads": torch.get_num_threads(),
           "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "promise_met": sum(r["promise_met"] for r in per_seed),
           "smoke": args.smoke, "seeds": done, "seeds_planned": seeds, "config": cfgd, "per_seed": per_seed,
           "summary": summary, "total_time_s": elapsed}
    out = results_dir(device, args.out)
    name = "e2e" if (cap, res["threads"]) == ("native", 1) or args.device != "cpu" else f"e2e-{cap}-t{res['threads']}"
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(out, name + ".png"))
    res["path"] = out
    return res


def main(argv=None) -> int:
    from grades.demo.config import DemoConfig, validate
    d = DemoConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model-size", default=d.model_size, choices=("tiny", "small", "base"))
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--task", default=d.task, choices=("sort", "addition"))
    ap.add_argument("--digits", type=int, default=d.digits)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rel-tau", type=float, default=d.rel_tau)
    ap.add_argument("--alpha", type=float, default=d.alpha)
    ap.add_argument("--patience", type=int, default=d.patience)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as the demo; 0 keeps torch's setting)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed (seconds)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("e2e: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    cfg = DemoConfig(device=args.device, model_size=args.model_size, steps=args.steps, task=args.task, digits=args.digits,
                     rel_tau=args.rel_tau, alpha=args.alpha, patience=args.patience, threads=None)
    seeds = args.seeds
    if args.smoke:
        cfg.steps, cfg.n_val, cfg.n_test = 24, 20, 40
        seeds = seeds[:1]
    try:
        validate(cfg)
    except ValueError as e:
        print(f"e2e: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    per_seed = []
    t0 = time.perf_counter()
    for s in seeds:
        cfg.seed = s
        r = run_seed(cfg, args.progress)
        per_seed.append(r)
        print(f"seed {s}: A {r['A']['wall_time_s']:.1f}s {r['A']['steps']} steps acc {r['A']['test_accuracy']:.3f} | "
              f"B {r['B']['wall_time_s']:.1f}s {r['B']['steps']} steps acc {r['B']['test_accuracy']:.3f} "
              f"frozen {r['B']['frozen']}/{r['B']['num_components']} | speedup {r['speedup_wall']:.2f}x time, "
              f"{r['speedup_steps']:.2f}x steps | promise {'met' if r['promise_met'] else 'NOT met'}", flush=True)
        # written after every seed, so an interrupted run keeps what it measured
        res = write(per_seed, cfg, seeds, device, args, time.perf_counter() - t0)
    sm = res["summary"]
    print(f"A: {sm['A']['wall_time_s']['mean']:.1f}+-{sm['A']['wall_time_s']['sd']:.1f}s acc "
          f"{sm['A']['test_accuracy']['mean']:.3f}+-{sm['A']['test_accuracy']['sd']:.3f} | "
          f"B: {sm['B']['wall_time_s']['mean']:.1f}+-{sm['B']['wall_time_s']['sd']:.1f}s acc "
          f"{sm['B']['test_accuracy']['mean']:.3f}+-{sm['B']['test_accuracy']['sd']:.3f} | speedup "
          f"{sm['speedup_wall']['mean']:.2f}x+-{sm['speedup_wall']['sd']:.2f} -> {res['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
