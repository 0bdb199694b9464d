"""Kernel microbenchmark: ``grad_stats`` and ``masked_adamw_`` on a Qwen3-0.6B-shaped parameter set.

Compares, in one run on one device:

* ``grad_stats`` (every grades backend usable on the device) against ``torch._foreach_norm`` and a
  per-tensor ``g.norm().item()`` loop, as time and bytes/s of gradient read, next to the bandwidth of
  a device-to-device copy measured in the same run;
* ``masked_adamw_`` (statistics included) at 0/25/50/75 % of the parameters frozen, against
  ``torch.optim.AdamW(fused=True)`` and ``(foreach=True)`` stepping every parameter, and against the
  memory estimate ``unfrozen params x 28 B / copy bandwidth`` (fp32 param, grad, two moments). The
  copy counts read + write bytes; on CPUs its write-allocate traffic makes it slower per counted
  byte than an in-place update, so the estimate is not a strict floor there;
* the variants (``amsgrad``, ``maximize``, float64, float64 + amsgrad) of the native backend's
  ``masked_adamw_`` (list form, nothing frozen) against ``torch.optim.AdamW(fused=True)`` with the
  same flags and dtype, interleaved in one run (``--no-variants`` leaves them out).

Timing: CPU, ``time.perf_counter`` around each call after warm-up; candidates are interleaved round
by round so that load from other processes hits them alike; the median is reported. CUDA:
``triton.testing.do_bench`` (median) when Triton is installed, else CUDA events (median).

Writes ``bench/results/<device-slug>/kernels.json`` and ``kernels.png`` (``kernels-smoke.*`` with
``--smoke``) and prints a table. Usage::

    python bench/kernel_bandwidth.py --device cpu --layers 4 --no-embedding
    python bench/kernel_bandwidth.py --device cuda
    python bench/kernel_bandwidth.py --device cpu --smoke      # tiny shapes, one repetition, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import device_name, results_dir

import grades
from grades import backends
from grades.demo.models import qwen3_06b_shapes

FP32_ADAMW_BYTES = 28  # read p, g, m, v + write p, m, v, 4 bytes each
FROZEN_FRACTIONS = (0.0, 0.25, 0.5, 0.75)


# ------------------------------------------------------------------------------------------------
# device description
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, repeats: int, warmup: int = 1, spread: dict | None = None) -> dict[str, float]:
    """Median seconds per call of each function; calls are interleaved round by round.
    If ``spread`` is a dict, the minimum and maximum of each function's samples are stored in it."""
    if device.type == "cuda":
        return {k: time_cuda(f, repeats) for k, f in fns.items()}
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t0)
    if spread is not None:
        spread.update({k: (min(v), max(v)) for k, v in samples.items()})
    return {k: statistics.median(v) for k, v in samples.items()}


def time_cuda(fn, repeats: int) -> float:
    try:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=max(50, 20 * repeats), return_mode="median") / 1e3
    except ImportError:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(max(repeats, 10)):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# parameter set
# ------------------------------------------------------------------------------------------------

def make_shapes(layers: int, embedding: bool, shrink: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes = qwen3_06b_shapes(layers=layers, embedding=embedding)
    if shrink > 1:
        shapes = [(n, tuple(max(1, d // shrink) for d in s)) for n, s in shapes]
    return shapes


def frozen_mask(numels: list[int], fraction: float, seed: int = 0) -> torch.Tensor:
    """Freeze whole matrices in a fixed random order until ``fraction`` of the parameters is frozen."""
    total = sum(numels)
    order = torch.randperm(len(numels), generator=torch.Generator().manual_seed(seed)).tolist()
    mask = torch.zeros(len(numels), dtype=torch.bool)
    frozen = 0
    for i in order:
        if frozen + numels[i] / 2 > fraction * total:
            continue
        mask[i] = True
        frozen += numels[i]
    return mask


# ------------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------------

def bench_stats(grads, flat, table, device, repeats):
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    fns = {}
    names = []
    for name, (ok, _) in backends.availability().items():
        if not ok:
            continue
        b = backends.get(name)
        if device.type == "cpu" and name == "triton":
            continue  # the Triton interpreter is a correctness tool, not a CPU kernel
        if b.supports(device, "list"):
            fns[f"grades[{name}] list"] = (lambda n=name: grades.grad_stats(grads, backend=n))
            names.append(name)
        if b.supports(device, "flat"):
            fns[f"grades[{name}] flat"] = (lambda n=name: grades.grad_stats(flat, segments=table, backend=n))
    fns["torch._foreach_norm"] = lambda: torch._foreach_norm(grads)
    fns["per-tensor g.norm().item()"] = lambda: [g.norm().item() for g in grads]
    dst = torch.empty_like(flat)
    fns["copy (device to device)"] = lambda: dst.copy_(flat)

    def wrapped(f):
        def run():
            f()
            sync(device)
        return run

    slow = {k: wrapped(f) for k, f in fns.items() if k.startswith("grades[reference]")}
    fast = {k: wrapped(f) for k, f in fns.items() if k not in slow}
    spread: dict = {}
    t = time_interleaved(fast, device, repeats, spread=spread)
    # the reference backend is ~100x slower: fewer repetitions keep the run short
    t.update(time_interleaved(slow, device, min(repeats, 3), warmup=0, spread=spread))
    copy_bw = 2 * nbytes / t["copy (device to device)"]
    rows = []
    for k, sec in t.items():
        moved = 2 * nbytes if k.startswith("copy") else nbytes
        lo, hi = spread.get(k, (None, None))
        rows.append(dict(name=k, seconds=sec, min_seconds=lo, max_seconds=hi, bytes=moved,
                         gbytes_per_s=moved / sec / 1e9, fraction_of_copy_bw=(moved / sec) / copy_bw))
    ref = t["torch._foreach_norm"]
    loop = t["per-tensor g.norm().item()"]
    ratios = {k: dict(speedup_vs_foreach_norm=ref / sec, speedup_vs_item_loop=loop / sec)
              for k, sec in t.items() if k.startswith("grades[")}
    return dict(rows=rows, copy_gbytes_per_s=copy_bw / 1e9, ratios=ratios)


def bench_adamw(shapes, device, repeats, copy_bw):
    gen = torch.Generator().manual_seed(0)
    numels = [int(torch.Size(s).numel()) for _, s in shapes]
    total = sum(numels)

    def rand(s):
        return torch.randn(s, generator=gen).to(device)

    p = [rand(s) for _, s in shapes]
    g = [rand(s) for _, s in shapes]
    m = [torch.zeros(s, device=device) for _, s in shapes]
    v = [torch.zeros(s, device=device) for _, s in shapes]
    step = [0]

    def grades_step(frozen, name):
        def run():
            step[0] += 1
            grades.masked_adamw_(p, g, m, v, frozen, step=step[0], lr=1e-4, weight_decay=0.01, backend=name)
            sync(device)
        return run

    tp = [x.clone().requires_grad_(True) for x in p]
    for x, y in zip(tp, g):
        x.grad = y
    fused = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.01, fused=True)
    foreach = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.01, foreach=True)

    def torch_step(opt):
        def run():
            opt.step()
            sync(device)
        return run

    cands = {"torch AdamW fused=True": torch_step(fused), "torch AdamW foreach=True": torch_step(foreach)}
    list_backends = [n for n, (ok, _) in backends.availability().items()
                     if ok and backends.get(n).supports(device, "list") and n != "reference"]
    # the flat (Megatron-style buffer) form: Triton's path on a GPU; interpreted Triton is not timed
    flat_backends = [n for n, (ok, _) in backends.availability().items()
                     if ok and backends.get(n).supports(device, "flat") and n != "reference"
                     and not (n == "triton" and device.type != "cuda")]
    flat = [torch.cat([t.flatten() for t in ts]) for ts in (p, g, m, v)] if flat_backends else None
    table = grades.SegmentTable.from_tensors(p)

    def flat_step(frozen, name):
        def run():
            step[0] += 1
            grades.masked_adamw_(*flat, frozen, segments=table, step=step[0], lr=1e-4, weight_decay=0.01,
                                 backend=name)
            sync(device)
        return run

    masks = {}
    for frac in FROZEN_FRACTIONS:
        mask = frozen_mask(numels, frac)
        masks[frac] = mask
        for name in list_backends:
            cands[f"grades[{name}] masked_adamw_ frozen={frac:.2f}"] = grades_step(mask.to(device), name)
        for name in flat_backends:
            cands[f"grades[{name}] masked_adamw_ flat frozen={frac:.2f}"] = flat_step(mask.to(device), name)
    spread: dict = {}
    t = time_interleaved(cands, device, repeats, spread=spread)
    fused_t, foreach_t = t["torch AdamW fused=True"], t["torch AdamW foreach=True"]
    rows = []
    for k, sec in t.items():
        if k.startswith("grades["):
            frac = float(k.rsplit("=", 1)[1])
            mask = masks[frac]
            unfrozen = sum(n for n, f in zip(numels, mask.tolist()) if not f)
        else:
            frac, unfrozen = 0.0, total
        moved = FP32_ADAMW_BYTES * unfrozen
        lo, hi = spread.get(k, (None, None))
        rows.append(dict(name=k, seconds=sec, min_seconds=lo, max_seconds=hi, requested_frozen_fraction=frac,
                         actual_frozen_fraction=1 - unfrozen / total, unfrozen_params=unfrozen, bytes=moved,
                         gbytes_per_s=moved / sec / 1e9, fraction_of_copy_bw=(moved / sec) / copy_bw,
                         copy_bw_estimate_seconds=moved / copy_bw, speedup_vs_fused=fused_t / sec,
                         speedup_vs_foreach=foreach_t / sec))
    return dict(rows=rows)


VARIANTS = {  # name: (dtype, maximize, amsgrad)
    "amsgrad": (torch.float32, False, True),
    "maximize": (torch.float32, True, False),
    "float64": (torch.float64, False, False),
    "float64 amsgrad": (torch.float64, False, True),
}


def bench_variants(shapes, device, repeats):
    """Each variant of the native backend against torch's fused AdamW with the same flags and dtype."""
    native = {"cpu": "cpu", "cuda": "cuda"}.get(device.type)
    if native is None or not backends.get(native).available()[0]:
        return dict(rows=[], skipped=f"no native backend on {device.type}")
    gen = torch.Generator().manual_seed(2)
    cands = {}
    for name, (dtype, maximize, amsgrad) in VARIANTS.items():
        p = [torch.randn(s, generator=gen, dtype=dtype).to(device) for _, s in shapes]
        g = [torch.randn(s, generator=gen, dtype=dtype).to(device) for _, s in shapes]
        m, v = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
        x = [torch.zeros_like(t) for t in p] if amsgrad else None
        step = [0]

        def grades_step(p=p, g=g, m=m, v=v, x=x, step=step, maximize=maximize):
            step[0] += 1
            grades.masked_adamw_(p, g, m, v, step=step[0], lr=1e-4, weight_decay=0.01, maximize=maximize,
                                 max_exp_avg_sqs=x, backend=native)
            sync(device)

        tp = [t.clone().requires_grad_(True) for t in p]
        for t, gi in zip(tp, g):
            t.grad = gi
        opt = torch.optim.AdamW(tp, lr=1e-4, weight_decay=0.01, maximize=maximize, amsgrad=amsgrad, fused=True)

        def torch_step(opt=opt):
            opt.step()
            sync(device)

        cands[f"grades[{native}] {name}"] = grades_step
        cands[f"torch AdamW fused=True {name}"] = torch_step
    spread: dict = {}
    t = time_interleaved(cands, device, repeats, spread=spread)
    rows = []
    for name in VARIANTS:
        ours, theirs = t[f"grades[{native}] {name}"], t[f"torch AdamW fused=True {name}"]
        lo, hi = spread.get(f"grades[{native}] {name}", (None, None))
        rows.append(dict(name=name, seconds=ours, min_seconds=lo, max_seconds=hi, torch_fused_seconds=theirs,
                         speedup_vs_fused=theirs / ours))
    return dict(rows=rows)


def plot(result, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    rows = result["grad_stats"]["rows"]
    a.barh([r["name"] for r in rows], [r["gbytes_per_s"] for r in rows], color="tab:blue")
    a.axvline(result["grad_stats"]["copy_gbytes_per_s"], color="k", ls="--", label="copy bandwidth")
    a.set_xlabel("GB/s (gradient bytes read; copy: read + write)")
    a.set_title("grad_stats")
    a.legend()
    ad = result["masked_adamw"]["rows"]
    by_backend = {}
    for r in ad:
        if r["name"].startswith("grades["):
            by_backend.setdefault(r["name"].rsplit(" frozen=", 1)[0], []).append(r)
    for i, (name, rs) in enumerate(by_backend.items()):
        rs.sort(key=lambda r: r["actual_frozen_fraction"])
        a_x = [1 - r["actual_frozen_fraction"] for r in rs]
        b.plot(a_x, [r["seconds"] * 1e3 for r in rs], "o-", label=f"{name} (+stats)")
        if i == 0:
            b.plot(a_x, [r["copy_bw_estimate_seconds"] * 1e3 for r in rs], "k:",
                   label="28 B/unfrozen param at copy bandwidth")
    for r in ad:
        if r["name"].startswith("torch"):
            b.axhline(r["seconds"] * 1e3, ls="--", color="tab:red" if "fused" in r["name"] else "tab:orange",
                      label=r["name"] + " (all params)")
    b.set_xlabel("unfrozen fraction of parameters")
    b.set_ylabel("ms per step")
    b.set_ylim(bottom=0)
    b.set_title("masked AdamW step")
    b.legend(fontsize=8)
    fig.suptitle(f"{result['device']['name']} - {result['params']['total'] / 1e6:.1f}M params "
                 f"({result['params']['layers']} of 28 layers, "
                 f"{'with' if result['params']['embedding'] else 'no'} embedding, fp32, "
                 f"{result['device']['threads'] or 1} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result):
    print(f"\n{result['device']['name']}  ({result['params']['total'] / 1e6:.1f}M params, "
          f"{result['device']['threads']} threads)")
    print(f"{'grad_stats':52s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s}")
    for r in result["grad_stats"]["rows"]:
        print(f"{r['name']:52s} {r['seconds'] * 1e3:9.2f} {r['gbytes_per_s']:8.2f} {r['fraction_of_copy_bw']:8.2f}")
    for k, v in result["grad_stats"]["ratios"].items():
        print(f"  {k}: {v['speedup_vs_foreach_norm']:.2f}x vs _foreach_norm, "
              f"{v['speedup_vs_item_loop']:.2f}x vs .item() loop")
    print(f"\n{'masked AdamW (fp32)':52s} {'ms':>9s} {'GB/s':>8s} {'of copy':>8s} {'vs fused':>9s} {'vs foreach':>10s}")
    for r in result["masked_adamw"]["rows"]:
        print(f"{r['name']:52s} {r['seconds'] * 1e3:9.2f} {r['gbytes_per_s']:8.2f} {r['fraction_of_copy_bw']:8.2f} "
              f"{r['speedup_vs_fused']:9.2f} {r['speedup_vs_foreach']:10.2f}")
    var = result.get("masked_adamw_variants")
    if var and var["rows"]:
        print(f"\n{'masked AdamW variants (nothing frozen)':52s} {'ms':>9s} {'torch ms':>9s} {'vs fused':>9s}")
        for r in var["rows"]:
            print(f"{r['name']:52s} {r['seconds'] * 1e3:9.2f} {r['torch_fused_seconds'] * 1e3:9.2f} "
                  f"{r['speedup_vs_fused']:9.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=28, help="decoder layers (Qwen3-0.6B has 28)")
    ap.add_argument("--no-embedding", action="store_true", help="leave out the 151936x1024 embedding")
    ap.add_argument("--shrink", type=int, default=1, help="divide every dimension by this factor")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 7, smoke 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and one repetition (seconds)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<device>)")
    ap.add_argument("--no-variants", action="store_true", help="leave out the amsgrad/maximize/float64 section")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda asked for, but torch sees no CUDA device")
    layers, embedding, shrink = args.layers, not args.no_embedding, args.shrink
    if args.smoke:
        layers, embedding, shrink = min(layers, 2), False, max(shrink, 16)
    repeats = args.repeats or (1 if args.smoke else 7)
    shapes = make_shapes(layers, embedding, shrink)
    name = device_name(device)
    out_dir = Path(results_dir(device, args.out))
    stem = "kernels-smoke" if args.smoke else "kernels"

    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=gen).to(device) for _, s in shapes]
    flat = torch.cat([g.flatten() for g in grads])
    table = grades.SegmentTable.from_tensors(grads)
    total = sum(g.numel() for g in grads)

    result = dict(
        benchmark="kernels",
        device=dict(type=device.type, name=name, threads=torch.get_num_threads() if device.type == "cpu" else None,
                    load_average_before=list(os.getloadavg()) if hasattr(os, "getloadavg") else None),
        torch=torch.__version__, python=platform.python_version(),
        backends={k: dict(available=v[0], detail=v[1]) for k, v in backends.availability().items()},
        params=dict(total=total, tensors=len(shapes), layers=layers, embedding=embedding, shrink=shrink,
                    full_model=dict(layers=28, embedding=True, shrink=1),
                    shrunk=(layers != 28 or not embedding or shrink != 1), dtype="float32"),
        timing=dict(repeats=repeats, statistic="median (min/max kept per row)",
                    method="cuda: triton.testing.do_bench or CUDA events" if device.type == "cuda"
                    else "time.perf_counter, warm-up then interleaved rounds"),
        smoke=args.smoke,
    )
    result["grad_stats"] = bench_stats(grads, flat, table, device, repeats)
    del flat
    result["masked_adamw"] = bench_adamw(shapes, device, repeats, result["grad_stats"]["copy_gbytes_per_s"] * 1e9)
    if not args.no_variants:
        result["masked_adamw_variants"] = bench_variants(shapes, device, repeats)
    if hasattr(os, "getloadavg"):
        result["device"]["load_average_after"] = list(os.getloadavg())

    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / f"{stem}.png")
    print_table(result)
    print(f"\nwrote {out_dir / (stem + '.json')} and {stem}.png")
    return result


if __name__ == "__main__":
    main()
