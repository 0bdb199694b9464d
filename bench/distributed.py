"""GradES where large models train: DDP, FSDP2 and torch.compile, before and after freezing.

* ``ddp``: per-step time and bytes all-reduced by each rank, before any freeze and once the
  attention matrices are frozen, for DDP with its default arguments (GradES's comm hook) and for
  the older way, ``find_unused_parameters=True`` without a hook (a counting all-reduce hook that
  sends the whole bucket, as DDP does).
* ``fsdp2``: the same for ``fully_shard`` with ``FrozenAwareAdamW``; bytes are those of the
  reduce-scatters, all-gathers and all-reduces the rank issued.
* ``compile``: a run whose layers freeze at ``layers`` different steps (layer i's gradients are
  scaled down from step 4 + 2i, a known drop), compiled with a counting backend
  (``aot_eager`` and ``inductor``): number of compiles and seconds spent in the backend, with
  freezes committed in waves (GradES of the compiled model) and without (GradES of the plain
  module: one recompile per freeze event).

Usage::

    python bench/distributed.py                  # gloo on CPU, 2 ranks
    python bench/distributed.py --smoke          # seconds
    python bench/distributed.py --device cuda    # NCCL, one rank per GPU (needs 2 GPUs for ddp/fsdp2)

Writes ``bench/results/<device>/distributed.json`` and ``distributed.png``. Timings on a loaded
machine are only comparable within one run.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import statistics
import sys
import tempfile
import time

# each compile is timed from scratch: inductor's on-disk caches would let a later run reuse the
# graphs an earlier run compiled
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, results_dir  # noqa: E402

TAU = {"attention": 1e9, "mlp": 1e-30}  # attention freezes after grace + patience, MLPs never


class Blocks(nn.Module):
    """Transformer-shaped projections (q/k/v/o, gate/up/down) without attention arithmetic."""

    def __init__(self, d: int, layers: int):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.self_attn = nn.Module()
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(b.self_attn, n, nn.Linear(d, d, bias=False))
            b.mlp = nn.Module()
            b.mlp.gate_proj, b.mlp.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
            b.mlp.down_proj = nn.Linear(2 * d, d, bias=False)
            self.layers.append(b)

    def forward(self, x):
        for b in self.layers:
            a = b.self_attn
            x = x + a.o_proj(torch.tanh(a.q_proj(x)) * a.k_proj(x) + a.v_proj(x))
            x = x + b.mlp.down_proj(torch.nn.functional.silu(b.mlp.gate_proj(x)) * b.mlp.up_proj(x))
        return x


def _config(grace: int):
    from grades import GradESConfig
    return GradESConfig(tau=TAU, grace_steps=grace, patience=1, ema=None, stop_ratio=None)


def _time_steps(model, opt, gs, steps, dev, counter):
    """Per-step seconds and bytes (``counter()`` read and reset after each step)."""
    times, sent = [], []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(16, model_dim(model), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x).pow(2).mean().backward()
        opt.step()
        gs.step()
        opt.zero_grad()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        sent.append(counter())
    return times, sent


def model_dim(model) -> int:
    inner = getattr(model, "module", model)
    return inner.layers[0].self_attn.q_proj.in_features


def _phases(times, sent, frozen_from: int):
    before = slice(1, frozen_from)  # step 0 builds buckets / lazy state
    after = slice(frozen_from + 1, None)
    return {"ms_before": 1e3 * statistics.median(times[before]), "ms_after": 1e3 * statistics.median(times[after]),
            "bytes_before": statistics.median(sent[before]), "bytes_after": statistics.median(sent[after])}


def _counting_collectives():
    """Wrap the c10d collectives FSDP2 issues; returns a function reading and resetting the bytes."""
    total = [0]
    # (name, which argument is the full-size buffer): FSDP2 calls them through the dist module
    for name, arg in (("all_reduce", "tensor"), ("reduce_scatter_single", "input"), ("all_gather_single", "output_tensor"),
                      ("reduce_scatter_tensor", "input"), ("all_gather_into_tensor", "output_tensor")):
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        pos = list(inspect.signature(fn).parameters).index(arg)

        def wrapped(*a, _fn=fn, _arg=arg, _pos=pos, **k):
            t = a[_pos] if len(a) > _pos else k[_arg]
            total[0] += t.numel() * t.element_size()
            return _fn(*a, **k)
        setattr(dist, name, wrapped)

    def read():
        v, total[0] = total[0], 0
        return v
    return read


def _ddp(rank, world, dev, a):
    from torch.nn.parallel import DistributedDataParallel as DDP
    from grades import FrozenAwareAdamW, GradES
    out = {}
    grace = a.steps // 3
    for variant in ("grades_hook", "find_unused_no_hook"):
        m = Blocks(a.dim, a.layers).to(dev)
        ids = [dev.index] if dev.type == "cuda" else None
        if variant == "grades_hook":
            ddp = DDP(m, device_ids=ids)
            opt = FrozenAwareAdamW(ddp.parameters(), lr=1e-3)
            gs = GradES(ddp, opt, _config(grace))
            hook = ddp._grades_hook

            def counter():
                v = hook.bytes_sent
                hook.reset_counters()
                return v
        else:
            ddp = DDP(m, device_ids=ids, find_unused_parameters=True)
            box = [0]

            def plain(state, bucket, box=box):
                buf = bucket.buffer().div_(world)
                box[0] += buf.numel() * buf.element_size()
                return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])
            ddp.register_comm_hook(None, plain)
            opt = FrozenAwareAdamW(ddp.parameters(), lr=1e-3)
            gs = GradES(ddp.module, opt, _config(grace))

            def counter(box=box):
                v, box[0] = box[0], 0
                return v
        times, sent = _time_steps(ddp, opt, gs, a.steps, dev, counter)
        gs.wait()
        first = min(e["step"] for e in gs.freeze_events)
        out[variant] = {**_phases(times, sent, first), "frozen_fraction": gs.frozen_fraction, "first_freeze": first}
    return out


def _fsdp2(rank, world, dev, a):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from grades import FrozenAwareAdamW, GradES
    mesh = init_device_mesh(dev.type, (world,))
    m = Blocks(a.dim, a.layers).to(dev)
    for lin in [mod for mod in m.modules() if isinstance(mod, nn.Linear)]:  # the modules whose forward runs
        fully_shard(lin, mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = FrozenAwareAdamW(m.parameters(), lr=1e-3)
    gs = GradES(m, opt, _config(a.steps // 3))
    counter = _counting_collectives()
    times, sent = _time_steps(m, opt, gs, a.steps, dev, counter)
    gs.wait()
    first = min(e["step"] for e in gs.freeze_events)
    return {"frozenaware": {**_phases(times, sent, first), "frozen_fraction": gs.frozen_fraction,
                            "first_freeze": first}}


def _entry(rank, world, port, dev_type, a, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    backend = "nccl" if dev_type == "cuda" else "gloo"
    dev = torch.device(dev_type, rank) if dev_type == "cuda" else torch.device("cpu")
    if dev_type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        res = {"ddp": _ddp(rank, world, dev, a), "fsdp2": _fsdp2(rank, world, dev, a)}
        if rank == 0:
            with open(os.path.join(out, "dist.json"), "w") as f:
                json.dump(res, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()


class CountingBackend:
    """A torch.compile backend counting compiles and the seconds spent compiling."""

    def __init__(self, inner: str):
        self.inner, self.compiles, self.seconds = inner, 0, 0.0

    def __call__(self, gm, example_inputs):
        t0 = time.perf_counter()
        fn = torch._dynamo.lookup_backend(self.inner)(gm, example_inputs)
        self.seconds += time.perf_counter() - t0
        self.compiles += 1
        return fn


def _compile_run(inner: str, waves: bool, a, dev) -> dict:
    from grades import FrozenAwareAdamW, GradES, GradESConfig
    torch._dynamo.reset()
    net = Blocks(a.compile_dim, a.compile_layers).to(dev)
    be = CountingBackend(inner)
    compiled = torch.compile(net, backend=be)
    opt = FrozenAwareAdamW(net.parameters(), lr=1e-3)
    gs = GradES(compiled if waves else net, opt, GradESConfig(rel_tau=0.5, ema=None, grace_steps=3, patience=1))
    t0 = time.perf_counter()
    for s in range(a.compile_steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(16, a.compile_dim, generator=g).to(dev)
        y = torch.randn(16, a.compile_dim, generator=g).to(dev)
        ((compiled(x) - y) ** 2).mean().backward()
        for i, layer in enumerate(net.layers):  # layer i's gradients drop at step 4 + 2i: one freeze event each
            if s >= 4 + 2 * i:
                for p in layer.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1e-4)
        opt.step()
        gs.step()
        opt.zero_grad()
        if gs.should_stop:
            break
    gs.wait()
    return {"backend": inner, "waves": waves, "compiles": be.compiles, "compile_seconds": be.seconds,
            "run_seconds": time.perf_counter() - t0,
            "freeze_events": len({e["step"] for e in gs.freeze_events}), "frozen_fraction": gs.frozen_fraction,
            "flips": getattr(gs.autograd_gate, "flips", None)}


def plot(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    rows = [(f"ddp {k}", v) for k, v in res.get("ddp", {}).items()] + \
           [(f"fsdp2 {k}", v) for k, v in res.get("fsdp2", {}).items()]
    xs = range(len(rows))
    for ax, key, unit, scale in ((axes[0], "bytes", "MB per step (this rank)", 1e-6), (axes[1], "ms", "ms per step", 1)):
        ax.bar([x - 0.2 for x in xs], [r[f"{key}_before"] * scale for _, r in rows], 0.4, label="before freezing")
        ax.bar([x + 0.2 for x in xs], [r[f"{key}_after"] * scale for _, r in rows], 0.4, label="attention frozen")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([n for n, _ in rows], rotation=15, fontsize=7)
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    comp = res.get("compile", [])
    labels = [f"{c['backend']}\n{'waves' if c['waves'] else 'no waves'}" for c in comp]
    axes[2].bar(range(len(comp)), [c["compiles"] for c in comp])
    for i, c in enumerate(comp):
        axes[2].text(i, c["compiles"], f"{c['compile_seconds']:.1f}s", ha="center", va="bottom", fontsize=7)
    axes[2].set_xticks(range(len(comp)))
    axes[2].set_xticklabels(labels, fontsize=7)
    axes[2].set_ylabel(f"compiles over a run ({comp[0]['freeze_events'] if comp else 0} freeze events)")
    fig.suptitle(f"GradES under DDP / FSDP2 ({res['world']} ranks, {res['backend']}) and torch.compile\n"
                 f"{res['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--world", type=int, default=2, help="ranks (default 2; on cuda one per GPU)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--compile-steps", type=int, default=40)
    ap.add_argument("--compile-layers", type=int, default=8, help="layers (= freeze events) of the compile run")
    ap.add_argument("--compile-dim", type=int, default=64)
    ap.add_argument("--compile-backends", nargs="+", default=["aot_eager", "inductor"])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, aot_eager only")
    ap.add_argument("--out", default=None, help="output folder (default bench/results/<device>)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.dim, a.layers, a.steps, a.compile_steps, a.compile_layers, a.compile_backends = 32, 2, 9, 14, 3, ["aot_eager"]
        a.compile_dim = 32
    dev = torch.device(a.device)
    res = {"device": device_name(dev), "world": a.world, "backend": "nccl" if a.device == "cuda" else "gloo",
           "dim": a.dim, "layers": a.layers, "steps": a.steps, "compile_dim": a.compile_dim,
           "compile_layers": a.compile_layers, "compile_steps": a.compile_steps, "torch": torch.__version__,
           "load_before": os.getloadavg()[0]}
    if a.device != "cuda" or torch.cuda.device_count() >= a.world > 1:
        with tempfile.TemporaryDirectory() as tmp:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_entry, args=(a.world, port, a.device, a, tmp), nprocs=a.world, join=True)
            res.update(json.load(open(os.path.join(tmp, "dist.json"))))
    else:
        res["ddp_fsdp2_skipped"] = f"needs {a.world} GPUs, found {torch.cuda.device_count()}"
    for b in a.compile_backends:  # one-time costs (imports, compiler start-up) stay out of the counts
        torch._dynamo.reset()
        torch.compile(nn.Linear(2, 2).to(dev), backend=b)(torch.randn(1, 2, device=dev)).sum().backward()
    res["compile"] = [_compile_run(b, w, a, dev) for b in a.compile_backends for w in (True, False)]
    res["load_after"] = os.getloadavg()[0]
    out = results_dir(dev, a.out)
    with open(os.path.join(out, "distributed.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(out, "distributed.png"))
    for k in ("ddp", "fsdp2"):
        for v, r in res.get(k, {}).items():
            print(f"{k:5s} {v:20s} bytes {r['bytes_before']:>10.0f} -> {r['bytes_after']:>10.0f}  "
                  f"ms {r['ms_before']:7.2f} -> {r['ms_after']:7.2f}  frozen {r['frozen_fraction']:.2f}")
    for c in res["compile"]:
        print(f"compile {c['backend']:9s} waves={c['waves']!s:5s} compiles {c['compiles']} "
              f"({c['compile_seconds']:.1f} s) over {c['freeze_events']} freeze events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
