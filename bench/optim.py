"""Step time of FrozenAwareAdamW against torch.optim.AdamW (fused and foreach).

Parameter set shaped like Qwen3-0.6B (``grades.demo.models.qwen3_06b_shapes``): 28 layers of hidden 1024, q_proj 2048x1024, k/v 1024x1024
(8 kv heads x 128), o_proj 1024x2048, gate/up 3072x1024, down 1024x3072, four norms per layer,
the tied 151936x1024 embedding and the final norm. For each frozen fraction (the first parameters
in model order, by element count, i.e. whole early layers, as GradES freezes them) it times:

* ``torch_fused`` / ``torch_foreach``: torch.optim.AdamW on the unfrozen parameters only (frozen
  ones have no gradient, which is what ``requires_grad=False`` gives a torch user);
* ``grades_auto``: FrozenAwareAdamW as constructed by default (``nonfinite="auto"``: the update
  alone, one pass over memory);
* ``grades_skip``: ``nonfinite="skip"`` (a detection pass + the update: every gradient read twice);
* ``grades_ignore``: ``nonfinite="ignore"`` (the update alone, one pass);
* ``grades_scaler``: the default, driven as under a GradScaler (``grad_scale``/``found_inf``
  handed in, one pass);
* ``grades_norm``: the default with the total gradient norm handed in (``use_total_norm``, as the
  Trainer callback does with the norm the Trainer computes anyway; its computation is not timed):
  the norm is the non-finite check, one pass;
* ``*_devmask`` variants: frozen set with ``freeze_mask_`` only (the host never learns it, the
  kernel skips frozen matrices); the plain variants call ``sync_frozen_state`` as the GradES
  policy does once its non-blocking copy of the mask arrives;
* ``grades_master`` (``--dtype bf16`` only): ``master_weights=True``, ``nonfinite="ignore"``:
  float32 master weights updated and rounded into the bf16 parameters (28 bytes per parameter
  against ``grades_ignore``'s 22); its anchor ``torch_fused_fp32`` is torch's fused AdamW on
  float32 copies of the parameters (the same float32 math and 28 bytes per parameter, without
  the bf16 copy torch has no way to write).

All FrozenAwareAdamW variants return per-matrix gradient statistics; torch's do not. On CUDA the
steps are timed with CUDA events, and host syncs inside ``step()`` are counted with
``torch.cuda.set_sync_debug_mode("warn")``. The memory floor is
``(1 - frozen) x bytes_per_param x params / bandwidth`` with the bandwidth of a device copy
measured in the same run. Writes ``bench/results/<device>/optim.json`` and ``optim.png``
(``optim-bf16.*`` with ``--dtype bf16``).

    python bench/optim.py --device cuda
    python bench/optim.py --device cpu --layers 2 --no-embedding
    python bench/optim.py --device cpu --layers 2 --no-embedding --dtype bf16
    python bench/optim.py --smoke      # seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from _common import device_slug, results_dir

import grades
from grades import FrozenAwareAdamW, backends
from grades.demo.models import qwen3_06b_shapes

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = max(nbytes // 4, 1 << 20)
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / statistics.median(times[1:])


def time_steps(step, device: torch.device, warmup: int, iters: int) -> tuple[float, int]:
    """Median ms per call of ``step`` and the number of host syncs seen per call (CUDA only)."""
    for _ in range(warmup):
        step()
    sync(device)
    times, syncs = [], 0
    if device.type == "cuda":
        start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i in range(iters):
                    start[i].record()
                    step()
                    end[i].record()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(start, end)]
    else:
        for _ in range(iters):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), syncs / iters


def frozen_prefix(numels: list[int], fraction: float) -> int:
    """How many leading parameters to freeze so that ``fraction`` of the elements are frozen."""
    if fraction >= 1.0:
        return len(numels)
    total, acc = sum(numels), 0
    for k, n in enumerate(numels):
        if acc >= fraction * total:
            return k
        acc += n
    return len(numels)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shapes = qwen3_06b_shapes(args.layers, not args.no_embedding)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02) for _, s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype) * 1e-3 for _, s in shapes]
    numels = [p.numel() for p in params]
    total = sum(numels)
    bytes_per_param = 28 if dtype == torch.float32 else 22
    bw = copy_bandwidth(device, min(total * 4, 1 << 30), 5)
    print(f"{len(params)} params, {total / 1e6:.1f}M elements, {args.dtype}, device {device_slug(device)}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s, grades backend {backends.select(device, 'list').name}",
          flush=True)
    measured: dict[tuple[str, float], dict] = {}  # (variant, fraction) -> times over rounds

    def record(name, frac, k, ms, syncs, nbytes=bytes_per_param):
        m = measured.setdefault((name, frac), dict(k=k, ms=[], syncs=[], nbytes=nbytes))
        m["ms"].append(ms)
        m["syncs"].append(syncs)
        print(f"  round {rnd + 1}/{args.rounds}  {name:22s} frozen {frac:4.2f}  {ms:9.3f} ms  "
              f"(syncs/step {syncs:g})", flush=True)

    for rnd, frac in ((r, f) for r in range(args.rounds) for f in args.fractions):
        k = frozen_prefix(numels, frac)
        for p, g in zip(params, grads):
            p.grad = g
        # torch baselines: frozen params simply have no gradient
        for name, kw in (("torch_fused", dict(fused=True)), ("torch_foreach", dict(foreach=True))):
            for i, p in enumerate(params):
                p.grad = None if i < k else grads[i]
            opt = torch.optim.AdamW(params, lr=1e-4, **kw)
            ms, syncs = time_steps(opt.step, device, args.warmup, args.iters)
            record(name, frac, k, ms, syncs)
            del opt
            gc.collect()
        if dtype != torch.float32 and k < len(params):
            p32 = [torch.nn.Parameter(p.detach().float()) for p in params[k:]]
            for p, g in zip(p32, grads[k:]):
                p.grad = g.float()
            opt = torch.optim.AdamW(p32, lr=1e-4, fused=True)
            ms, syncs = time_steps(opt.step, device, args.warmup, args.iters)
            record("torch_fused_fp32", frac, k, ms, syncs, 28)
            del opt, p32
            gc.collect()
        for p, g in zip(params, grads):
            p.grad = g
        variants = [("grades_auto", "auto", False, True), ("grades_skip", "skip", False, True),
                    ("grades_ignore", "ignore", False, True), ("grades_scaler", "auto", True, True),
                    ("grades_norm", "auto", False, True), ("grades_auto_devmask", "auto", False, False)]
        if args.smoke:
            variants = variants[:2]
        if dtype != torch.float32:
            variants.append(("grades_master", "ignore", False, True))
        norm = torch.ones((), device=device)
        for name, nonfinite, scaler, host_sync in variants:
            master = name == "grades_master"
            opt = FrozenAwareAdamW(params, lr=1e-4, nonfinite=nonfinite, master_weights=master)
            opt.step()  # lazy state initialisation, outside the timing
            if k:
                mask = torch.zeros(len(params), dtype=torch.bool)
                mask[:k] = True
                opt.freeze_mask_(mask.to(device))
                if host_sync:
                    opt.sync_frozen_state(mask)
            if scaler:
                opt.grad_scale = torch.ones((), device=device)
                opt.found_inf = torch.zeros((), device=device)
            if name == "grades_norm":
                def step(opt=opt):
                    opt.use_total_norm(norm)
                    opt.step()
            else:
                step = opt.step
            ms, syncs = time_steps(step, device, args.warmup, args.iters)
            record(name, frac, k, ms, syncs, 28 if master else bytes_per_param)
            del opt, step
            gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = []
    for (name, frac), m in measured.items():
        frozen_elems = sum(numels[:m["k"]])
        rows.append(dict(optimizer=name, frozen_fraction=frac, frozen_params=m["k"],
                         frozen_element_fraction=frozen_elems / total,
                         ms_per_step=statistics.median(m["ms"]), ms_per_round=m["ms"],
                         floor_ms=(total - frozen_elems) * m["nbytes"] / bw * 1e3,
                         syncs_per_step=max(m["syncs"]), bytes_per_param=m["nbytes"]))
    fused = {r["frozen_fraction"]: r["ms_per_step"] for r in rows if r["optimizer"] == "torch_fused"}
    fused_rounds = {r["frozen_fraction"]: r["ms_per_round"] for r in rows if r["optimizer"] == "torch_fused"}
    for r in rows:
        r["ratio_vs_fused"] = r["ms_per_step"] / fused[r["frozen_fraction"]] if fused.get(r["frozen_fraction"]) else None
        r["ratio_vs_fused_unfrozen"] = r["ms_per_step"] / fused[0.0] if fused.get(0.0) else None
        # the same ratio taken within each round (both measured seconds apart), then the median:
        # less sensitive to a machine whose speed drifts between rounds
        base = fused_rounds.get(r["frozen_fraction"])
        r["ratio_vs_fused_paired"] = (statistics.median(a / b for a, b in zip(r["ms_per_round"], base))
                                      if base and all(base) else None)
    return {
        "benchmark": "optim", "device": device_slug(device), "torch": torch.__version__,
        "grades": grades.__version__, "grades_backend": backends.select(device, "list").name,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "dtype": args.dtype, "layers": args.layers, "embedding": not args.no_embedding,
        "num_params": len(params), "num_elements": total, "bytes_per_param": bytes_per_param,
        "copy_bandwidth_gbs": bw / 1e9, "warmup": args.warmup, "iters": args.iters, "rounds": args.rounds,
        "results": rows,
    }


def table(result: dict) -> str:
    lines = [f"{'optimizer':22s} {'frozen':>6s} {'ms/step':>10s} {'floor ms':>9s} {'x fused':>8s} "
             f"{'paired':>7s} {'x fused@0':>9s} {'syncs':>5s}"]
    for r in result["results"]:
        rf, rp, r0 = r["ratio_vs_fused"], r.get("ratio_vs_fused_paired"), r["ratio_vs_fused_unfrozen"]
        lines.append(f"{r['optimizer']:22s} {r['frozen_fraction']:6.2f} {r['ms_per_step']:10.3f} "
                     f"{r['floor_ms']:9.3f} {'' if rf is None else f'{rf:8.2f}':>8s} "
                     f"{'' if rp is None else f'{rp:7.2f}':>7s} "
                     f"{'' if r0 is None else f'{r0:9.2f}':>9s} {r['syncs_per_step']:5g}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(dict.fromkeys(r["optimizer"] for r in result["results"]))
    for name in names:
        rs = [r for r in result["results"] if r["optimizer"] == name]
        ax.plot([r["frozen_fraction"] for r in rs], [r["ms_per_step"] for r in rs], marker="o", label=name)
    floor = [r for r in result["results"] if r["optimizer"] == names[0]]
    ax.plot([r["frozen_fraction"] for r in floor], [r["floor_ms"] for r in floor], "k--", label="memory floor")
    ax.set_xlabel("frozen fraction of parameters")
    ax.set_ylabel("ms per optimizer step (median)")
    emb = "with" if result["embedding"] else "without"
    ax.set_title(f"AdamW step, Qwen3-0.6B shapes ({result['layers']} layers, {emb} embedding, "
                 f"{result['dtype']})\n{result['device']}, grades backend {result['grades_backend']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--layers", type=int, default=28, help="transformer layers (default 28, as Qwen3-0.6B)")
    ap.add_argument("--no-embedding", action="store_true", help="leave out the 151936x1024 embedding")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="parameter dtype (FrozenAwareAdamW keeps fp32 moments; torch keeps them in the "
                         "parameter dtype, so bf16 rows compare different amounts of memory)")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every measurement this many times, in turn, and report the median "
                         "(evens out drift of a shared machine)")
    ap.add_argument("--smoke", action="store_true", help="1 layer, no embedding, 2 fractions, 2 iterations")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA GPU")
    if args.smoke:
        args.layers, args.no_embedding, args.fractions, args.warmup, args.iters = 1, True, [0.0, 0.5], 1, 2
        args.rounds = 1
    result = run(args)
    print(table(result))
    out = results_dir(args.device, args.out)
    stem = "optim" if args.dtype == "fp32" else f"optim-{args.dtype}"
    with open(os.path.join(out, f"{stem}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(out, f"{stem}.png"))
    print(f"wrote {os.path.join(out, stem + '.json')} and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
