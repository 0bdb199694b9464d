"""Per-step overhead of gradient monitoring under the transformers Trainer.

Variants (each a Trainer run of the same model, data and seed; timings interleaved in rounds):

* ``none``: no monitoring (stock AdamW) -- the baseline.
* ``naive_item``: a callback taking ``p.grad.norm().item()`` of every tracked matrix (one host sync
  per matrix per step).
* ``foreach_norm``: ``torch._foreach_norm`` over the tracked gradients, one host copy per step.
* ``grades_stats``: ``GradESCallback`` with stock AdamW (one ``grad_stats`` call, device decisions).
* ``faw_none``: ``FrozenAwareAdamW`` without monitoring.
* ``grades_fused``: ``GradESCallback`` + ``FrozenAwareAdamW`` (statistics from the optimizer's pass).
* ``public_grades``: the public ``grades`` 1.0.6 callback (weight copy + L1 of the change per
  component, ``.item()`` each) -- run in a separate process because its import name is the same
  as this package's; that process times its own ``none`` baseline too.

Thresholds are set so that nothing freezes: this measures the cost of monitoring alone.

Usage::

    python bench/overhead.py                       # tiny Llama on CPU
    python bench/overhead.py --smoke               # a few seconds
    python bench/overhead.py --device cuda --model qwen3-0.6b-shaped --layers 4
    python bench/overhead.py --public-path DIR     # DIR holds the public grades 1.0.6 package

Writes ``bench/results/<device-slug>/overhead.json`` and ``overhead.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import device_name, results_dir

HERE = os.path.dirname(os.path.abspath(__file__))
OURS = ("none", "naive_item", "foreach_norm", "grades_stats", "faw_none", "grades_fused")
ATTN_MLP = re.compile(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def build_model(name: str, layers: int, vocab: int):
    """A randomly initialised model built from a config (no download, no grades import)."""
    import torch
    import transformers as T
    torch.manual_seed(0)
    if name == "tiny-llama":
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False)
    elif name == "qwen3-0.6b-shaped":
        cfg = T.Qwen3Config(vocab_size=vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=4096, tie_word_embeddings=True)
        return T.Qwen3ForCausalLM(cfg)
    else:
        raise ValueError(f"unknown model {name!r}")
    cfg._attn_implementation = "eager"
    return T.LlamaForCausalLM(cfg)


class Data:
    def __init__(self, n: int, seq: int, vocab: int):
        import torch
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tracked(model) -> list:
    return [p for n, m in model.named_modules() if ATTN_MLP.search(n) for p in [m.weight]]


def make_callbacks(variant: str, model, opts: argparse.Namespace) -> tuple[list, Any]:
    """Callbacks and optimizer for one variant (imports done here, inside the worker)."""
    import torch
    from transformers import TrainerCallback
    params = tracked(model)
    if variant in ("none", "faw_none"):
        cbs = []
    elif variant == "naive_item":
        class NaiveItem(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                self.last = [p.grad.norm().item() for p in params if p.grad is not None]
        cbs = [NaiveItem()]
    elif variant == "foreach_norm":
        class ForeachNorm(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                gs = [p.grad for p in params if p.grad is not None]
                self.last = torch.stack(torch._foreach_norm(gs)).cpu()
        cbs = [ForeachNorm()]
    elif variant in ("grades_stats", "grades_fused"):
        from grades import GradESConfig
        from grades.integrations.transformers import GradESCallback
        cbs = [GradESCallback(GradESConfig(tau=1e-300, grace_steps=0, stop_ratio=None), history_file=None)]
    elif variant == "public_grades":
        from grades import GradEarlyStoppingCallback, GradEarlyStoppingConfig  # the public package
        cbs = [GradEarlyStoppingCallback(GradEarlyStoppingConfig(
            tau=1e-300, alpha=0.999, save_freezing_history=False, enable_wandb_logging=False))]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    opt = None
    if variant in ("faw_none", "grades_fused"):
        from grades import FrozenAwareAdamW
        opt = FrozenAwareAdamW(model.parameters(), lr=opts.lr)
    return cbs, opt


def _timed(fn, sink: list, cuda: bool):
    """``fn`` wrapped to append its duration (host seconds, or CUDA events on the GPU) to ``sink``."""
    import torch

    def run(*a, **kw):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*a, **kw)
            stop.record()
            sink.append((start, stop))
        else:
            t = time.perf_counter()
            out = fn(*a, **kw)
            sink.append(time.perf_counter() - t)
        return out
    return run


def run_variant(variant: str, opts: argparse.Namespace, workdir: str) -> dict[str, list[float]]:
    """One Trainer run of ``variant``; per timed step (after the warm-up): wall time ``step``,
    host time inside the monitoring callbacks' hooks ``hooks``, and ``optimizer.step()`` time
    ``opt`` (CUDA events on the GPU), all in seconds."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    model = build_model(opts.model, opts.layers, opts.vocab)
    cuda = opts.device == "cuda"
    if cuda:
        model = model.cuda()
    cbs, opt = make_callbacks(variant, model, opts)
    steps: list[float] = []
    hooks: list[float] = []
    opt_times: list = []
    per_step_hooks: list[float] = []
    per_step_opt: list[float] = []
    for cb in cbs:  # time every hook the monitor overrides (instance attributes shadow the class)
        for name in dir(type(cb)):
            if name.startswith("on_") and getattr(type(cb), name) is not getattr(TrainerCallback, name, None):
                setattr(cb, name, _timed(getattr(cb, name), hooks, False))

    class Timer(TrainerCallback):
        t0 = None

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            optimizer.step = _timed(optimizer.step, opt_times, cuda)

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            if self.t0 is not None:
                steps.append(t - self.t0)
            self.t0 = t
            ot = [a.elapsed_time(b) / 1e3 for a, b in opt_times] if cuda else opt_times
            per_step_opt.append(sum(ot))
            per_step_hooks.append(sum(hooks))
            opt_times.clear()
            hooks.clear()

    args = TrainingArguments(output_dir=workdir, max_steps=opts.steps, per_device_train_batch_size=opts.batch,
                             learning_rate=opts.lr, report_to=[], use_cpu=opts.device == "cpu", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
                             lr_scheduler_type="constant", bf16=cuda)
    sched = None
    if opt is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = Trainer(model=model, args=args, train_dataset=Data(opts.batch * opts.steps, opts.seq, opts.vocab),
                 callbacks=[Timer()] + cbs, optimizers=(opt, sched))
    tr.train()
    w = opts.warmup
    # a monitor's hooks that run after the timer's on_step_end land in the next step's bucket:
    # totals over the timed steps are exact up to one step at the edges
    return {"step": steps[w:], "hooks": per_step_hooks[w + 1:], "opt": per_step_opt[w + 1:]}


def worker(opts: argparse.Namespace) -> None:
    print("RESULT " + json.dumps(worker_result(opts)))


def worker_result(opts: argparse.Namespace) -> dict:
    import tempfile
    variants = opts.variants.split(",")
    res: dict[str, list[dict[str, list[float]]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as d:
        for r in range(opts.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                res[v].append(run_variant(v, opts, d))
    extra = {}
    if "grades_stats" in variants or "grades_fused" in variants:
        extra = memory_report(opts)
    return {"times": res, "memory": extra, "grades_version": _installed_version()}


def _installed_version() -> str | None:
    """Version of the ``grades`` distribution that was imported (the public wheel's own
    ``__version__`` attribute lags its release number)."""
    import importlib.metadata as md
    mod = sys.modules.get("grades")
    here = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__))) if mod else None
    for dist in md.distributions(path=[here] if here else None):
        if dist.metadata["Name"] == "grades":
            return dist.version
    return getattr(mod, "__version__", None)


def memory_report(opts: argparse.Namespace) -> dict:
    """Extra memory of the monitors: ours is O(#components); a weight copy is O(#weights)."""
    import torch
    from grades import GradES, GradESConfig
    model = build_model(opts.model, opts.layers, opts.vocab)
    gs = GradES(model, None, GradESConfig(tau=1.0, grace_steps=0))
    ours = 0
    for t in (*vars(gs).values(), *gs.state.tensors(), gs.state.new_frozen):
        if isinstance(t, torch.Tensor):
            ours += t.numel() * t.element_size()
    src = gs.source
    for t in vars(src).values():
        if isinstance(t, torch.Tensor):
            ours += t.numel() * t.element_size()
    ours += sum(s.host.numel() * s.host.element_size() for s in gs._copies.slots)
    copy = sum(p.numel() * p.element_size() for c in gs.components for p in c.params)
    return {"components": len(gs.components), "grades_bytes": ours, "weight_copy_bytes": copy}


def spawn(variants: list[str], opts: argparse.Namespace, pythonpath_first: str | None = None) -> dict:
    if opts.smoke and not pythonpath_first:  # in this process: seconds, not minutes
        return worker_result(argparse.Namespace(**{**vars(opts), "variants": ",".join(variants)}))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variants", ",".join(variants)]
    for k in ("device", "model", "layers", "vocab", "steps", "warmup", "rounds", "batch", "seq", "lr"):
        cmd += [f"--{k}", str(getattr(opts, k))]
    env = dict(os.environ)
    if pythonpath_first:
        env["PYTHONPATH"] = pythonpath_first
        env["GRADES_BENCH_NO_LOCAL"] = "1"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"worker {variants} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def summarize(times: dict[str, list[dict[str, list[float]]]], base: str = "none") -> dict:
    """Per variant, over the rounds (each round runs every variant once, in alternating order):

    * ``ratio_vs_none``: median over rounds of (median step time / the baseline's median step time
      in the same round) -- the end-to-end figure, which on a small model is dominated by
      run-to-run noise;
    * ``hooks_ms``, ``optimizer_ms``: median per-step time spent in the monitoring callbacks'
      hooks and in ``optimizer.step()``, measured inside the same runs;
    * ``direct_overhead``: median over rounds of (hooks + optimizer - the baseline's optimizer) /
      the baseline's median step time: the monitoring's own cost, free of run-to-run variance.
    """
    def med(xs):
        return statistics.median(xs) if xs else 0.0

    out = {}
    for v, rounds in times.items():
        pairs = list(zip(rounds, times[base]))
        ratios = [med(r["step"]) / med(b["step"]) for r, b in pairs]
        direct = [(med(r["hooks"]) + med(r["opt"]) - med(b["opt"])) / med(b["step"]) for r, b in pairs]
        flat = [x for r in rounds for x in r["step"]]
        out[v] = {"median_step_s": med(flat), "steps": len(flat),
                  "ratio_vs_none": med(ratios), "round_ratios": ratios,
                  "hooks_ms": 1e3 * med([med(r["hooks"]) for r in rounds]),
                  "optimizer_ms": 1e3 * med([med(r["opt"]) for r in rounds]),
                  "direct_overhead": med(direct), "round_direct_overheads": direct}
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(k, v) for k, v in result["ours"].items() if k != "none"]
    if result.get("public"):
        rows.append(("public_grades", result["public"]["public_grades"]))
    names = [r[0] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    a.barh(names, [100 * v["direct_overhead"] for _, v in rows], color="tab:blue")
    a.set_xlabel("monitoring cost per step, % of a step without it\n(hooks + optimizer time vs baseline optimizer)")
    a.set_title("measured inside the runs")
    ratios = [100 * (v["ratio_vs_none"] - 1) for _, v in rows]
    lo = [100 * (v["ratio_vs_none"] - min(v["round_ratios"])) for _, v in rows]
    hi = [100 * (max(v["round_ratios"]) - v["ratio_vs_none"]) for _, v in rows]
    b.barh(names, ratios, xerr=[lo, hi], color="tab:gray", capsize=3)
    b.set_xlabel("end-to-end step time vs no monitoring, %\n(median over rounds; bars: min-max of rounds)")
    b.set_title("end to end (run-to-run noise included)")
    for ax in (a, b):
        ax.axvline(0, color="k", lw=0.8)
    fig.suptitle(f"{result['model']} under the transformers Trainer, {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "qwen3-0.6b-shaped"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--public-path", default=None,
                    help="directory containing the public grades 1.0.6 package (pip install --no-deps --target DIR grades==1.0.6)")
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything, for CI")
    ap.add_argument("--out", default=None,
                    help="results folder (default bench/results/<device-slug>; a temporary folder with --smoke)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=",".join(OURS), help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    big = opts.model != "tiny-llama"
    defaults = dict(layers=4 if big else 2, vocab=151936 if big else 256, steps=4 if opts.smoke else (20 if big else 40),
                    warmup=1 if opts.smoke else 4, rounds=1 if opts.smoke else (7 if big else 9), batch=4 if big else 8,
                    seq=256 if big else 32)
    for k, v in defaults.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    if opts.worker:
        # this folder holds scripts whose names may shadow real modules (e.g. ``kernels``)
        drop = {HERE} | ({os.path.dirname(HERE)} if os.environ.get("GRADES_BENCH_NO_LOCAL") else set())
        sys.path = [p for p in sys.path if os.path.abspath(p or ".") not in drop]
        worker(opts)
        return
    t0 = time.time()
    ours = spawn(list(OURS), opts)
    public = None
    if opts.public_path:
        public = spawn(["none", "public_grades"], opts, pythonpath_first=opts.public_path)
    import torch
    result = {
        "device": opts.device, "device_name": device_name(opts.device),
        "threads": torch.get_num_threads() if opts.device == "cpu" else None,
        "model": f"{opts.model} ({opts.layers} layers)", "torch": torch.__version__,
        "settings": {k: getattr(opts, k) for k in ("steps", "warmup", "rounds", "batch", "seq", "vocab", "lr", "smoke")},
        "ours": summarize(ours["times"]),
        "public": summarize(public["times"]) if public else None,
        "memory": ours["memory"],
        "grades_versions": {"ours": ours.get("grades_version"),
                            "public": public.get("grades_version") if public else None},
        "fused_vs_faw_none": None,
        "wall_s": round(time.time() - t0, 1),
    }
    o = result["ours"]
    if "grades_fused" in o and "faw_none" in o:
        result["fused_vs_faw_none"] = o["grades_fused"]["median_step_s"] / o["faw_none"]["median_step_s"]
    if opts.out:
        out = results_dir(opts.device, opts.out)
    elif opts.smoke:
        import tempfile
        out = tempfile.mkdtemp(prefix="grades-overhead-smoke-")
    else:
        out = results_dir(opts.device)
    stem = "overhead" if opts.model == "tiny-llama" else f"overhead-{opts.model}-{opts.layers}l"
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.join(out, stem + ".png"))
    print(f"{'variant':22s} {'ms/step':>8s} {'x none':>7s} {'hooks ms':>9s} {'opt ms':>7s} {'overhead':>9s}")
    for k, v in list(o.items()) + [(f"public:{k}", v) for k, v in (result["public"] or {}).items()]:
        print(f"{k:22s} {v['median_step_s'] * 1e3:8.2f} {v['ratio_vs_none']:7.3f} {v['hooks_ms']:9.3f} "
              f"{v['optimizer_ms']:7.3f} {100 * v['direct_overhead']:8.2f}%")
    print("memory:", result["memory"])
    print("wrote", out)


if __name__ == "__main__":
    main()
