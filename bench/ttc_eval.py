"""Evaluation cost of the one-batch TTC method vs an exhaustive per-k evaluation.

Trains a tiny Llama on the embedded addition task, then on the same test problems:

* one batch: draw ``k_max`` samples per problem once and estimate pass@k and majority@k for every
  k in 1..k_max from them (grades.ttc estimators);
* exhaustive: a separate sampling run of k samples per problem for each k in 1..k_max, scoring
  each run once (any-correct for pass@k, plurality with random tie-break for majority@k). The
  subset k in {1, 2, 4, ..., k_max} is reported from the same runs.

Records samples generated and wall time (median over ``--repeats``), and how far the two sets of
accuracies are apart. Writes ``bench/results/<device>/ttc_eval.json`` and ``.png``
(``ttc_eval.smoke.*`` with ``--smoke``).

    python bench/ttc_eval.py            # full run (about a minute on a small CPU)
    python bench/ttc_eval.py --smoke    # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

from _common import device_slug, results_dir

from grades.demo.models import tiny_llama
from grades.demo.tasks import AdditionTask, generate_answers
from grades.ttc import majority_at_k, pass_at_k, training_flops


def train(task: AdditionTask, size: str, steps: int, batch: int, lr: float, seed: int):
    torch.manual_seed(seed)
    model = tiny_llama(task.vocab_size, size, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    it = task.iterate(batch, seed=seed)
    flops = 0.0
    for _ in range(steps):
        b = next(it)
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
        flops += training_flops(model.config, b["input_ids"].numel(), seq_len=b["input_ids"].shape[1])
    model.eval()
    return model, flops


def plurality_correct(answers, correct, rng: random.Random) -> float:
    cnt: dict = {}
    for a in answers:
        cnt[a] = cnt.get(a, 0) + 1
    m = max(cnt.values())
    win = rng.choice(sorted(a for a, v in cnt.items() if v == m))
    return float(correct[answers.index(win)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (seconds)")
    ap.add_argument("--k-max", type=int, default=None)
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the model is tiny, threads only add overhead)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    smoke = args.smoke
    digits, size, steps, batch = (1, "tiny", 40, 32) if smoke else (2, "tiny", 300, 64)
    k_max = args.k_max or (8 if smoke else 16)
    n_prob = args.problems or (32 if smoke else 200)
    repeats = args.repeats or (1 if smoke else 3)
    gen_batch = 256

    task = AdditionTask(digits=digits, seed=0, n_val=10, n_test=n_prob)
    probs = task.test[:n_prob]
    t0 = time.perf_counter()
    model, flops = train(task, size, steps, batch, 3e-3, seed=0)
    train_s = time.perf_counter() - t0

    def verify_rows(comps):
        return ([[c.strip() for c in row] for row in comps],
                [[task.verify(ex, c) for c in row] for ex, row in zip(probs, comps)])

    # --- one batch: k_max samples per problem, every k estimated from them ---------------------
    ks = np.arange(1, k_max + 1)
    one_times, one_est_times = [], []
    for r in range(repeats):
        t = time.perf_counter()
        comps = generate_answers(model, task, probs, num_samples=k_max, do_sample=True, seed=100 + r,
                                 batch_size=gen_batch)
        ans, cor = verify_rows(comps)
        t_s = time.perf_counter()
        p_one = pass_at_k(cor, ks)
        m_one = majority_at_k(ans, cor, ks)
        t_e = time.perf_counter()
        one_times.append(t_e - t)
        one_est_times.append(t_e - t_s)
    one_samples = n_prob * k_max

    # --- exhaustive: a separate run of k samples per problem for each k ------------------------
    per_k_time = {int(k): [] for k in ks}
    p_exh = np.zeros(k_max)
    m_exh = np.zeros(k_max)
    p_exh_se = np.zeros(k_max)
    m_exh_se = np.zeros(k_max)
    for r in range(repeats):
        rng = random.Random(r)
        for k in ks:
            t = time.perf_counter()
            comps = generate_answers(model, task, probs, num_samples=int(k), do_sample=True,
                                     seed=1000 * (r + 1) + int(k), batch_size=gen_batch)
            ans, cor = verify_rows(comps)
            pv = np.array([float(any(c)) for c in cor])
            mv = np.array([plurality_correct(a, c, rng) for a, c in zip(ans, cor)])
            per_k_time[int(k)].append(time.perf_counter() - t)
            if r == 0:
                p_exh[k - 1], m_exh[k - 1] = pv.mean(), mv.mean()
                p_exh_se[k - 1] = pv.std(ddof=1) / np.sqrt(n_prob)
                m_exh_se[k - 1] = mv.std(ddof=1) / np.sqrt(n_prob)
    exh_time_k = {k: statistics.median(v) for k, v in per_k_time.items()}
    pow2 = [k for k in (2 ** i for i in range(10)) if k <= k_max]
    exh_all = {"ks": [int(k) for k in ks], "samples": int(n_prob * ks.sum()),
               "wall_s": float(sum(exh_time_k.values()))}
    exh_pow2 = {"ks": pow2, "samples": int(n_prob * sum(pow2)),
                "wall_s": float(sum(exh_time_k[k] for k in pow2))}
    one = {"samples": one_samples, "wall_s": float(statistics.median(one_times)),
           "estimation_s": float(statistics.median(one_est_times))}

    result = {
        "benchmark": "ttc_eval", "device": device_slug("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0], "smoke": smoke, "repeats": repeats,
        "setup": {"task": f"addition, {digits} digit(s)", "model": f"tiny_llama size={size}",
                  "train_steps": steps, "batch": batch, "train_flops": flops, "train_s": train_s,
                  "problems": n_prob, "k_max": k_max, "generate_batch_size": gen_batch},
        "one_batch": one,
        "exhaustive_all_k": exh_all,
        "exhaustive_pow2_k": exh_pow2,
        "ratios": {"samples_all_k": exh_all["samples"] / one_samples,
                   "wall_all_k": exh_all["wall_s"] / one["wall_s"],
                   "samples_pow2_k": exh_pow2["samples"] / one_samples,
                   "wall_pow2_k": exh_pow2["wall_s"] / one["wall_s"]},
        "exhaustive_wall_s_per_k": {str(k): v for k, v in exh_time_k.items()},
        "accuracy": {
            "k": [int(k) for k in ks],
            "one_batch_pass": p_one.mean.tolist(), "one_batch_pass_se": p_one.se.tolist(),
            "one_batch_majority": m_one.mean.tolist(), "one_batch_majority_se": m_one.se.tolist(),
            "exhaustive_pass": p_exh.tolist(), "exhaustive_pass_se": p_exh_se.tolist(),
            "exhaustive_majority": m_exh.tolist(), "exhaustive_majority_se": m_exh_se.tolist(),
            "max_abs_diff_pass": float(np.abs(p_one.mean - p_exh).max()),
            "max_abs_diff_majority": float(np.abs(m_one.mean - m_exh).max()),
        },
    }
    out = results_dir("cpu", args.out)
    stem = os.path.join(out, "ttc_eval.smoke" if smoke else "ttc_eval")  # smoke never overwrites
    with open(stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, stem + ".png")
    print(f"one batch: {one_samples} samples, {one['wall_s']:.2f} s "
          f"(estimating all k: {one['estimation_s'] * 1e3:.1f} ms)")
    print(f"exhaustive k=1..{k_max}: {exh_all['samples']} samples, {exh_all['wall_s']:.2f} s "
          f"({result['ratios']['samples_all_k']:.1f}x samples, {result['ratios']['wall_all_k']:.1f}x time)")
    print(f"exhaustive k in {pow2}: {exh_pow2['samples']} samples, {exh_pow2['wall_s']:.2f} s "
          f"({result['ratios']['samples_pow2_k']:.1f}x samples, {result['ratios']['wall_pow2_k']:.1f}x time)")
    print(f"max |one-batch - exhaustive| accuracy: pass {result['accuracy']['max_abs_diff_pass']:.3f}, "
          f"majority {result['accuracy']['max_abs_diff_majority']:.3f}")
    print(f"wrote {stem}.json and .png")
    return 0


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = ["one batch", f"exhaustive\nk={res['exhaustive_pow2_k']['ks']}".replace(" ", ""),
              f"exhaustive\nk=1..{res['setup']['k_max']}"]
    rows = [res["one_batch"], res["exhaustive_pow2_k"], res["exhaustive_all_k"]]
    axes[0].bar(labels, [r["samples"] for r in rows], color=["C2", "C1", "C3"])
    axes[0].set_ylabel("samples generated")
    axes[1].bar(labels, [r["wall_s"] for r in rows], color=["C2", "C1", "C3"])
    axes[1].set_ylabel("wall time (s)")
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelsize=7)
    a = res["accuracy"]
    k = np.array(a["k"])
    for key, col, lab in (("pass", "C0", "pass@k"), ("majority", "C1", "majority@k")):
        m, s = np.array(a[f"one_batch_{key}"]), np.array(a[f"one_batch_{key}_se"])
        axes[2].plot(k, m, "-", color=col, label=f"{lab} one batch")
        axes[2].fill_between(k, m - s, m + s, color=col, alpha=0.2)
        axes[2].errorbar(k, a[f"exhaustive_{key}"], yerr=a[f"exhaustive_{key}_se"], fmt="o", ms=3,
                         color=col, alpha=0.7, label=f"{lab} exhaustive (one run per k)")
    axes[2].set_xlabel("k")
    axes[2].set_ylabel("accuracy")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"TTC evaluation cost, {res['setup']['problems']} problems, {res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
