"""Helpers of the multi-process tests: a small transformer-shaped model, the global batch of a
step, and spawning gloo ranks that each write a JSON result."""
import json
import os
import socket
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

LR = 5e-2
#: GradES settings under which matrices of :class:`Net` freeze at different steps of a short run
CFG = dict(rel_tau=0.9, ema=0.5, grace_steps=4, patience=2, stop_ratio=None)


class Net(nn.Module):
    """Two blocks with q/up/down projections (the components GradES tracks), same init everywhere."""

    def __init__(self, d: int = 8, blocks: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, d)
        self.layers = nn.ModuleList()
        for _ in range(blocks):
            blk = nn.Module()
            blk.self_attn = nn.Module()
            blk.self_attn.q_proj = nn.Linear(d, d, bias=False)
            blk.mlp = nn.Module()
            blk.mlp.up_proj = nn.Linear(d, 2 * d, bias=False)
            blk.mlp.down_proj = nn.Linear(2 * d, d, bias=False)
            self.layers.append(blk)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.layers:
            h = h + torch.tanh(b.self_attn.q_proj(h))
            h = h + b.mlp.down_proj(torch.relu(b.mlp.up_proj(h)))
        return self.out(h)


def batch(step: int, rank, world: int, per_rank: int = 8):
    """The global batch of ``step`` (``rank=None``) or ``rank``'s slice of it."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(per_rank * world, 4, generator=g)
    y = x.sum(dim=1, keepdim=True)
    if rank is None:
        return x, y
    return x[per_rank * rank:per_rank * (rank + 1)], y[per_rank * rank:per_rank * (rank + 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        res = fn(rank, world)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.barrier()  # gloo aborts when a peer leaves while another still talks to it
        dist.destroy_process_group()


def _results(out: str, world: int) -> list:
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def spawn(fn, world: int, out: str) -> list:
    """Run ``fn(rank, world)`` on ``world`` gloo ranks; returns each rank's JSON result."""
    mp.spawn(_entry, args=(fn, world, free_port(), out), nprocs=world, join=True)
    return _results(out, world)


def run_workers(worker, world: int, out: str) -> list:
    """Run ``worker(rank, world, port, out)`` (it sets up its own process group and writes
    ``out/rank<r>.json``) on ``world`` processes; returns each rank's JSON result."""
    mp.spawn(worker, args=(world, free_port(), out), nprocs=world, join=True)
    return _results(out, world)


def unchanged_after_freeze(m: nn.Module, gs, snaps: list) -> list:
    """For every frozen parameter of ``m``: are its values after its freeze step those at the end,
    bitwise? ``snaps`` holds the flat parameters after each step."""
    params = list(m.parameters())
    ends = np.cumsum([p.numel() for p in params]).tolist()
    out = []
    for comp, f in zip(gs.components, gs.state_dict()["freeze_step"]):
        if f > 0:
            for p in comp.params:
                i = next(j for j, q in enumerate(params) if q is p)
                lo, hi = ends[i] - p.numel(), ends[i]
                out.append(bool(np.array_equal(snaps[f - 1][lo:hi], snaps[-1][lo:hi])))
    return out


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def ranks_equal(t: torch.Tensor) -> bool:
    """Whether ``t`` is bitwise the same on every rank (one all-gather)."""
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t)
    return all(torch.equal(g, got[0]) for g in got)
