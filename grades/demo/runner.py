"""Orchestration of ``grades demo``: train both runs, evaluate, select, print, write the report."""
from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Optional, TextIO

import torch

from .tasks import greedy_accuracy
from .config import DemoConfig
from .plots import write_all
from .train import RUNS, RunResult, make_task, train
from .ttc_eval import TTCResult, evaluate

REPORT_FILE = "report.json"
HISTORY_FILE = "grades_history.json"
SAMPLES_FILE = "ttc_samples.jsonl"
TABLE_FILE = "table.txt"

#: The baseline must reach this test accuracy for the comparison to mean anything: below it, it
#: has not learned the task, and neither the table's "B vs A" nor a TTC target derived from it do.
PREMISE_ACCURACY = 0.9


def _finite(v):
    """JSON-safe number: inf/nan become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _run_dict(r: RunResult, acc: float, n_test: int) -> dict:
    d = {"optimizer": RUNS[r.name],
         "wall_time_s": r.wall_s, "optimizer_steps": r.steps, "train_flops": r.ledger.train_flops,
         "dense_flops": r.ledger.dense_flops, "tokens": r.ledger.tokens, "test_accuracy": acc,
         "test_problems": n_test, "stopped_early": r.stopped_early,
         "final_loss": r.losses[-1] if r.losses else None,
         "checkpoints": [{"name": c.name, "step": c.step, "train_flops": c.train_flops} for c in r.checkpoints]}
    if r.grades is not None:
        gs = r.grades
        d.update(num_components=gs.num_components, frozen_components=len(gs.frozen_components),
                 frozen_fraction=gs.frozen_fraction, stopped_at=gs.stopped_at,
                 first_freeze=min((e["step"] for e in gs.freeze_events), default=None),
                 grace_steps=gs.grace,
                 freeze_steps={e["component"]: e["step"] for e in gs.freeze_events})
    return d


def identical_until(a: list[float], b: list[float]) -> int:
    """Steps over which two loss curves are bit-identical from the start (their common length
    when they never differ)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def premise(acc_a: float) -> dict:
    """Whether the baseline learned the task (see :data:`PREMISE_ACCURACY`), and why not."""
    ok = acc_a >= PREMISE_ACCURACY
    why = None if ok else (f"the baseline A did not converge (test accuracy {acc_a:.3f} < {PREMISE_ACCURACY}): "
                           "B vs A says nothing about GradES, and no TTC target is derived from A")
    return {"baseline_converged": ok, "min_accuracy": PREMISE_ACCURACY, "reason": why}


def _choice_dict(sel, ref_flops: float) -> dict:
    c = sel.min_train
    out = {"strategy": sel.strategies[0], "target": sel.target, "tolerance": sel.tolerance,
           "threshold": sel.threshold, "reference": sel.reference, "reference_flops": sel.reference_flops,
           "n_problems": sel.n_problems, "k_max": sel.k_max, "choice": None}
    if c is not None:
        out["choice"] = {"checkpoint": c.checkpoint, "k": c.k, "accuracy": c.accuracy, "se": _finite(c.se),
                         "train_flops": c.train_flops, "train_flops_saved": c.train_flops_saved,
                         "train_flops_saved_frac": c.train_flops_saved / ref_flops if ref_flops else None,
                         "break_even_queries": _finite(c.break_even) if c.break_even is not None else None}
    return out


def _fmt_q(q) -> str:
    if q is None:
        return "n/a"
    if q == "inf" or (isinstance(q, float) and math.isinf(q)):
        return "unbounded (no extra samples)"
    return f"{q:,.0f} queries"


def _ratio(r, better: str, worse: str) -> str:
    if r is None or not r > 0:
        return "n/a"
    return f"{r:.2f}x {better}" if r >= 1 else f"{1 / r:.2f}x {worse}"


def format_table(rep: dict) -> str:
    """The compact text table printed at the end of a demo run."""
    a, b, p, sp = rep["runs"]["A"], rep["runs"]["B"], rep["runs"]["P"], rep["speedup"]
    cfg, pr = rep["config"], rep["premise"]
    lines = [f"grades demo: {cfg['digits']}-digit {cfg['task']}, Llama-{cfg['model_size']} "
             f"({rep['model']['parameters']:,} params), {cfg['steps']} step budget, seed {cfg['seed']}, "
             f"device {rep['environment']['device_name']}" + ("  [--quick: reduced configuration]" if cfg["quick"] else ""),
             "A and B: FrozenAwareAdamW with GradES off / on, the same run until B's first freeze "
             f"(bit-identical losses for {rep['identical_steps']} steps; first freeze at step "
             f"{b['first_freeze'] if b['first_freeze'] is not None else '-'})",
             ""]
    if not pr["baseline_converged"]:
        lines += [f"NOTE: {pr['reason']}.", ""]
    lines += [f"{'':<26}{'A: GradES off':>14}{'B: GradES on':>14}   B vs A",
              f"{'wall time (s)':<26}{a['wall_time_s']:>14.1f}{b['wall_time_s']:>14.1f}   {_ratio(sp['wall_time'], 'faster', 'slower')}",
              f"{'optimizer steps':<26}{a['optimizer_steps']:>14d}{b['optimizer_steps']:>14d}   "
              f"{_ratio(sp['steps'], 'fewer', 'more')}",
              f"{'training FLOPs':<26}{a['train_flops']:>14.3e}{b['train_flops']:>14.3e}   "
              f"{_ratio(sp['train_flops'], 'fewer', 'more')}",
              f"{'final training loss':<26}{a['final_loss']:>14.4f}{b['final_loss']:>14.4f}",
              f"{'test accuracy (greedy)':<26}{a['test_accuracy']:>14.3f}{b['test_accuracy']:>14.3f}   "
              f"{rep['accuracy_delta']:+.3f} ({a['test_problems']} problems)"
              + ("" if pr["baseline_converged"] else "  [baseline did not converge]"),
              f"{'frozen matrices at end':<26}{'-':>14}{str(b['frozen_components']) + '/' + str(b['num_components']):>14}   "
              + (f"stopped by GradES at step {b['stopped_at']}" if b["stopped_early"] else "ran to the budget"),
              f"parity: torch.optim.AdamW on the same run ends at loss {p['final_loss']:.4f} "
              f"(A: {a['final_loss']:.4f}), test accuracy {p['test_accuracy']:.3f} (A: {a['test_accuracy']:.3f})",
              ""]
    t = rep["ttc"]
    lines.append(f"TTC ({t['n_problems']} test problems x {t['samples_per_problem']} samples per checkpoint, "
                 f"checkpoints {', '.join(t['checkpoints'])}):")
    if not t["selections"]:
        lines.append(f"  no choice: {t['skipped']}")
    for s, sel in t["selections"].items():
        c = sel["choice"]
        bound = " (upper bound: oracle verifier)" if s == "pass@k" else ""
        head = f"  {s:<11} target {sel['threshold']:.3f} (= {sel['reference']} at k=1 - {sel['tolerance']}): "
        if c is None:
            lines.append(head + "no checkpoint reaches it" + bound)
        else:
            frac = c["train_flops_saved_frac"]
            lines.append(head + f"{c['checkpoint']} with k={c['k']} -> {c['accuracy']:.3f}, saves "
                         f"{c['train_flops_saved']:.3e} training FLOPs ({100 * frac:.0f}%), "
                         f"break-even Q* = {_fmt_q(c['break_even_queries'])}" + bound)
    return "\n".join(lines)


def run(cfg: DemoConfig, *, progress: bool = True, stream: Optional[TextIO] = None) -> dict:
    """Run the demo (see :mod:`grades.demo`) and write the report directory ``cfg.out``.

    ``cfg.threads`` applies for the duration of the run; torch's thread count is restored after."""
    before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress=progress, stream=stream)
    finally:
        torch.set_num_threads(before)


def _write_samples(path: str, ttc: TTCResult) -> None:
    """The samples file, each line also carrying the inference FLOPs of one sample, so that
    ``grades ttc`` computes Q* from it alone."""
    from ..ttc import write_samples
    from ..ttc.cli import INFER_FIELD
    write_samples(path, ttc.samples)
    with open(path, encoding="utf-8") as fh:
        lines = [json.loads(ln) for ln in fh if ln.strip()]
    with open(path, "w", encoding="utf-8") as fh:
        for d in lines:
            d[INFER_FIELD] = ttc.infer_flops_per_sample
            fh.write(json.dumps(d) + "\n")


def _run(cfg: DemoConfig, *, progress: bool, stream: Optional[TextIO]) -> dict:
    import sys
    stream = stream or sys.stdout
    t_start = time.perf_counter()
    os.makedirs(cfg.out, exist_ok=True)
    task = make_task(cfg)
    res = {r: train(cfg, task, r, progress=progress) for r in ("A", "B", "P")}
    res_a, res_b = res["A"], res["B"]
    acc = {r: greedy_accuracy(res[r].model, task, task.test) for r in res}
    acc_a, acc_b = acc["A"], acc["B"]
    pre = premise(acc_a)
    checkpoints = res_a.checkpoints + res_b.checkpoints
    ttc: TTCResult = evaluate(cfg, task, res_a.model, checkpoints, progress=progress,
                              choose=pre["baseline_converged"])
    gs = res_b.grades
    history_path = os.path.join(cfg.out, HISTORY_FILE)
    gs.save_history(history_path)
    history = gs.history_dict()
    thresholds = gs.thresholds()
    _write_samples(os.path.join(cfg.out, SAMPLES_FILE), ttc)
    plots = write_all(cfg.out, history=history, thresholds=thresholds, frozen_steps=res_b.frozen_steps,
                      num_components=gs.num_components, budget=cfg.steps, loss_a=res_a.losses,
                      loss_b=res_b.losses, loss_p=res["P"].losses, stop_b=res_b.steps,
                      curves=ttc.curves, selections=ttc.selections)
    ref_flops = res_a.ledger.train_flops
    dev = torch.device(cfg.device)
    rep = {
        "config": cfg.to_dict(),
        "model": {"family": "llama", "size": cfg.model_size,
                  "parameters": sum(p.numel() for p in res_a.model.parameters()),
                  "hidden_size": res_a.model.config.hidden_size,
                  "layers": res_a.model.config.num_hidden_layers},
        "task": {"name": task.name, "digits": cfg.digits,
                 "train": len(task.train), "val": len(task.val), "test": len(task.test)},
        "runs": {r: _run_dict(res[r], acc[r], len(task.test)) for r in res},
        "premise": pre,
        "identical_steps": identical_until(res_a.losses, res_b.losses),
        "speedup": {"wall_time": res_a.wall_s / res_b.wall_s if res_b.wall_s > 0 else None,
                    "steps": res_a.steps / res_b.steps,
                    "train_flops": res_a.ledger.train_flops / res_b.ledger.train_flops},
        "accuracy_delta": acc_b - acc_a,
        "grades": {"thresholds": thresholds, "components": [c.name for c in gs.components],
                   "component_types": [c.type for c in gs.components]},
        "ttc": {"n_problems": len(ttc.problem_ids), "samples_per_problem": cfg.ttc_samples,
                "k_max": cfg.ttc_k_max, "temperature": cfg.ttc_temperature,
                "infer_flops_per_sample": ttc.infer_flops_per_sample,
                "checkpoints": [c.name for c in checkpoints],
                "checkpoint_flops": {c.name: c.train_flops for c in checkpoints},
                "accuracy_vs_k": {s: {ck: [row.accuracy for row in sorted(
                    (x for x in sel.table if x.checkpoint == ck), key=lambda x: x.k)]
                    for ck in [c.name for c in checkpoints]} for s, sel in ttc.curves.items()},
                "selections": {s: _choice_dict(sel, ref_flops) for s, sel in ttc.selections.items()},
                "skipped": None if ttc.selections else pre["reason"]},
        "files": {"report": REPORT_FILE, "history": HISTORY_FILE, "samples": SAMPLES_FILE,
                  "table": TABLE_FILE, "plots": plots},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "device": cfg.device,
                        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                        else f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"),
                        "threads": torch.get_num_threads()},
    }
    from .. import __version__
    rep["environment"]["grades"] = __version__
    table = format_table(rep)
    rep["table"] = table
    rep["total_time_s"] = time.perf_counter() - t_start
    with open(os.path.join(cfg.out, TABLE_FILE), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out, REPORT_FILE), "w") as f:
        json.dump(rep, f, indent=1, default=_finite)
    print("", file=stream)
    print(table, file=stream)
    print(f"\nreport: {os.path.abspath(cfg.out)} ({REPORT_FILE}, {TABLE_FILE}, {HISTORY_FILE}, {SAMPLES_FILE}, "
          f"{', '.join(plots.values())}); total {rep['total_time_s']:.0f} s", file=stream)
    return rep
