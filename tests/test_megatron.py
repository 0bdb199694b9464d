"""FlatAdamW: the flat-buffer, ZeRO-1-sharded AdamW a Megatron-style loop plugs in.

One process: the update equals torch's AdamW, frozen parameters never move (no momentum or
weight-decay drift) and hold no optimizer state, bad layouts are refused, state round-trips.
Two gloo ranks (marker ``distributed``): over Megatron-core's own ``_ParamAndGradBuffer`` (two
padded buckets, built on CPU) and over :func:`attach_param_and_grad_buffers`, the parameters
match a one-process run over the global batch, frozen parameters stay bitwise unchanged after
their freeze, and both ranks take the same decisions at the same steps.
"""
import unittest.mock
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_util import CFG, LR, Net, batch, spawn, unchanged_after_freeze
from grades import FrozenAwareAdamW, GradES, GradESConfig
from grades.flat_adamw import FlatAdamW, _owned_ranges
from grades.integrations.megatron import attach_main_grad_buffer, attach_param_and_grad_buffers

STEPS = 10
WD = 0.1


def flat_params(m: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]).numpy()


def reference_run(world: int = 2):
    """One process, the global batch, torch's AdamW, GradES through requires_grad."""
    m = Net()
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)
    gs = GradES(m, opt, GradESConfig(**CFG))
    for s in range(STEPS):
        x, y = batch(s, None, world)
        ((m(x) - y) ** 2).mean().backward()
        opt.step()
        gs.step()
        opt.zero_grad()
    return m, gs


def train_flat(m, opt, gs, rank, world, average=None):
    """The Megatron-style loop: backward into main_grad, average the grad buffer, step, zero."""
    snaps = []
    for s in range(STEPS):
        x, y = batch(s, rank, world)
        ((m(x) - y) ** 2).mean().backward()
        if average is not None:
            average()
        opt.step()
        gs.step()
        opt.zero_grad()
        snaps.append(flat_params(m))
    return snaps


# ---------------------------------------------------------------------- one process


def test_flat_adamw_equals_torch_adamw_and_frozen_never_move():
    ref, gs_ref = reference_run(world=1)
    m = Net()
    bufs = attach_param_and_grad_buffers(m)
    opt = FlatAdamW.from_buffers(bufs, lr=LR, weight_decay=WD)
    gs = GradES(m, opt, GradESConfig(**CFG))
    bytes0 = opt.state_bytes
    snaps = train_flat(m, opt, gs, None, 1)
    np.testing.assert_allclose(flat_params(m), flat_params(ref), rtol=1e-5, atol=1e-6)
    fs = gs.state_dict()["freeze_step"]
    assert fs == gs_ref.state_dict()["freeze_step"] and any(f > 0 for f in fs)
    assert all(unchanged_after_freeze(m, gs, snaps))  # bitwise, weight decay on
    frozen_numel = sum(c.numel for c, f in zip(gs.components, fs) if f > 0)
    assert opt.state_bytes == bytes0 - 8 * frozen_numel  # no moments for frozen ranges


def _drift_after_freeze(freeze_in_optimizer: bool) -> float:
    """Train one step, then stop the up_proj weight's gradient (as GradES's requires_grad=False
    does) for three steps; return how far it moved. ``freeze_in_optimizer``: FlatAdamW with the
    freeze in its mask; otherwise torch's AdamW stepping the whole buffer, as Megatron's does."""
    m = Net()
    bufs = attach_param_and_grad_buffers(m)
    w = m.layers[0].mlp.up_proj.weight
    if freeze_in_optimizer:
        opt = FlatAdamW.from_buffers(bufs, lr=LR, weight_decay=WD)
    else:
        whole = nn.Parameter(bufs.param_data)  # shares the buffer's storage
        opt = torch.optim.AdamW([whole], lr=LR, weight_decay=WD)
    x, y = batch(0, None, 1)
    before = None
    for step in range(4):
        if step == 1:
            w.requires_grad_(False)
            before = w.detach().clone()
            if freeze_in_optimizer:
                opt.freeze_mask_(torch.arange(opt.num_params) == opt.param_index(w))
        ((m(x) - y) ** 2).mean().backward()
        if not freeze_in_optimizer:
            whole.grad = bufs.grad_data.clone()
        opt.step()
        bufs.grad_data.zero_()
    return float((w - before).abs().max())


def test_whole_buffer_optimizer_drifts_frozen_matrices_and_flat_adamw_does_not():
    assert _drift_after_freeze(False) > 1e-3  # momentum and weight decay on a zero main_grad
    assert _drift_after_freeze(True) == 0.0


def test_frozen_ranges_leave_the_update_once_the_host_knows():
    m = Net()
    bufs = attach_param_and_grad_buffers(m)
    opt = FlatAdamW.from_buffers(bufs, lr=LR, weight_decay=WD)
    w = m.layers[0].mlp.up_proj.weight
    i = opt.param_index(w)
    opt.freeze_mask_(torch.arange(opt.num_params) == i)
    assert len(opt.live.runs) == 1 and opt.state_bytes == 8 * bufs.param_data.numel()
    assert opt.sync_frozen_state() == 1
    lo, hi = int(opt.table.offsets[i]), int(opt.table.offsets[i]) + w.numel()
    assert opt.live.runs == [(0, lo), (hi, bufs.param_data.numel())]
    assert opt.state_bytes == 8 * (bufs.param_data.numel() - w.numel())


def test_flat_adamw_low_precision_keeps_float32_masters():
    m = Net().to(torch.bfloat16)
    bufs = attach_param_and_grad_buffers(m)
    opt = FlatAdamW.from_buffers(bufs, lr=1e-4, weight_decay=0.0)
    assert "master" in opt.state_dict()["state"]
    x, y = batch(0, None, 1)
    w0 = opt.state_dict()["state"]["master"].clone()
    for _ in range(3):
        ((m(x.bfloat16()) - y.bfloat16()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    master = opt.state_dict()["state"]["master"]
    assert not torch.equal(master, w0)
    assert torch.equal(master.bfloat16(), bufs.param_data[:master.numel()])


def _flat_adamw_after_one_step():
    """A FlatAdamW over Megatron-style buffers of a fresh Net, after one step; returns (bufs, opt)."""
    m = Net()
    bufs = attach_param_and_grad_buffers(m)
    opt = FlatAdamW.from_buffers(bufs, lr=LR)
    x, y = batch(0, None, 1)
    ((m(x) - y) ** 2).mean().backward()
    opt.step()
    return bufs, opt


def test_flat_adamw_skips_nonfinite_steps_and_state_round_trips():
    bufs, opt = _flat_adamw_after_one_step()
    sd = opt.state_dict()
    before = bufs.param_data.clone()
    bufs.grad_data[3] = float("nan")
    opt.step()
    assert bool(opt.last_step_skipped) and opt.skipped_steps == 1
    assert torch.equal(before, bufs.param_data)
    other = FlatAdamW.from_buffers(bufs, lr=LR)
    other.load_state_dict(sd)
    assert other.state_dict()["step"] == 1
    assert torch.equal(other.state_dict()["state"]["exp_avg"], sd["state"]["exp_avg"])


def test_flat_adamw_state_round_trips_after_a_freeze():
    bufs, opt = _flat_adamw_after_one_step()
    opt.freeze_mask_(torch.arange(opt.num_params) == 2)
    opt.sync_frozen_state()
    opt.step()
    sd = opt.state_dict()
    other = FlatAdamW.from_buffers(bufs, lr=LR)
    other.load_state_dict(sd)
    assert other.live.runs == opt.live.runs and bool(other.frozen[2]) and other.state_dict()["step"] == 2
    assert all(torch.equal(other.live.state[k], opt.live.state[k]) for k in opt.live.state)
    sd["runs"] = sd["runs"][:1]
    with pytest.raises(ValueError, match="live ranges"):
        FlatAdamW.from_buffers(bufs, lr=LR).load_state_dict(sd)


def test_gradES_refuses_a_second_reduction_of_flat_adamw_statistics():
    m = Net()
    opt = FlatAdamW.from_buffers(attach_param_and_grad_buffers(m), lr=LR)
    with pytest.raises(ValueError, match="leave process_group=None"):
        GradES(m, opt, GradESConfig(**CFG), process_group=object())


def test_flat_adamw_refuses_bad_layouts():
    m = Net()
    bufs = attach_param_and_grad_buffers(m)
    stray = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not a view"):
        FlatAdamW([stray], bufs.param_data, bufs.grad_data)
    with pytest.raises(ValueError, match="same length"):
        FlatAdamW(bufs.params, bufs.param_data, bufs.grad_data[:-1])
    with pytest.raises(ValueError, match="split evenly"):
        _owned_ranges([(0, 7)], 2, 0)  # what a 2-rank FlatAdamW checks for every bucket
    assert _owned_ranges([(0, 8), (8, 12)], 2, 1) == [(4, 8), (10, 12)]

    class NoParamData:
        params, param_data, grad_data = bufs.params, None, bufs.grad_data
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        FlatAdamW.from_buffers(NoParamData())


def test_main_grad_loop_with_a_grad_reading_optimizer_is_reported():
    """The .grad vs .main_grad mix-up: the optimizer sees no gradient; GradES names the
    parameters and the likely cause once, instead of quietly freezing a model that never trained."""
    m = Net()
    attach_main_grad_buffer(m)
    opt = FrozenAwareAdamW(m.parameters(), lr=LR)
    gs = GradES(m, opt, GradESConfig(**CFG))
    x, y = batch(0, None, 1)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(5):
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
            gs.step()
            opt.zero_grad()
    msgs = [str(w.message) for w in got if "no gradient" in str(w.message) and "main_grad" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in got]
    assert "layers.0.self_attn.q_proj" in msgs[0] and "FlatAdamW" in msgs[0]


# ---------------------------------------------------------------------- two ranks


def _megatron_buffer(m: nn.Module, rank: int):
    """Megatron-core's own param/grad buffer (distributed-optimizer layout: padded buckets),
    allocated on the CPU (its constructor asks torch.cuda for the device)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.process_groups_config import ProcessGroupCollection
    params = list(m.parameters())
    cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    pgc = ProcessGroupCollection(tp=dist.new_group([0]) if rank == 0 else dist.new_group([1]), dp_cp=dist.group.WORLD)
    with unittest.mock.patch("torch.cuda.current_device", lambda: "cpu"):
        buf = _ParamAndGradBuffer(cfg, torch.float32, torch.float32, params, dist.group.WORLD, 200,
                                  {p: n for n, p in m.named_parameters()}, 1.0, list(range(len(params))), False,
                                  pg_collection=pgc)
    for p in params:  # Megatron's DDP hook: accumulate into main_grad, drop .grad
        p.register_post_accumulate_grad_hook(_to_main_grad)
    return buf


def _to_main_grad(q: torch.Tensor) -> None:
    q.main_grad.add_(q.grad)
    q.grad = None


def _run_mode(mode: str, rank: int, world: int) -> dict:
    from grades.integrations.distributed import decisions_agree
    m = Net()
    bufs = _megatron_buffer(m, rank) if mode == "megatron" else attach_param_and_grad_buffers(m, world)
    names = {p: n for n, p in m.named_parameters()}
    opt = FlatAdamW.from_buffers(bufs, names=names, lr=LR, weight_decay=WD)
    gs = GradES(m, opt, GradESConfig(**CFG))
    bytes0 = opt.state_bytes

    def average():
        dist.all_reduce(bufs.grad_data)
        bufs.grad_data.div_(world)
    snaps = train_flat(m, opt, gs, rank, world, average)
    unchanged = unchanged_after_freeze(m, gs, snaps)
    frozen_numel = sum(c.numel for c, f in zip(gs.components, gs.state_dict()["freeze_step"]) if f > 0)
    return {"params": flat_params(m).tolist(), "freeze_step": gs.state_dict()["freeze_step"],
            "stats": [h["stat"] for h in gs.history], "agree": decisions_agree(gs), "unchanged": unchanged,
            "buckets": len(getattr(bufs, "bucket_indices", [])), "bytes": [bytes0, opt.state_bytes],
            "frozen_numel": frozen_numel, "numel": bufs.param_data.numel()}


def _worker(rank: int, world: int) -> dict:
    res = {}
    for mode in ("megatron", "attach"):
        try:
            res[mode] = _run_mode(mode, rank, world)
        except ImportError as e:
            res[f"{mode}_error"] = f"megatron-core is not installed: {e}"
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_worker, 2, str(tmp_path_factory.mktemp("megatron")))


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["megatron", "attach"])
def test_two_ranks_match_one_process_and_agree(results, mode):
    if mode not in results[0]:
        pytest.skip(results[0][f"{mode}_error"])
    r0, r1 = results[0][mode], results[1][mode]
    ref, gs_ref = reference_run(world=2)
    for r in (r0, r1):
        np.testing.assert_allclose(r["params"], flat_params(ref), rtol=1e-5, atol=1e-6)
        assert r["freeze_step"] == gs_ref.state_dict()["freeze_step"]
        assert r["agree"] and r["unchanged"] and all(r["unchanged"])
    assert r0["params"] == r1["params"]  # the all-gather leaves identical replicas
    assert r0["stats"] == r1["stats"] and r0["freeze_step"] == r1["freeze_step"]
    assert any(f > 0 for f in r0["freeze_step"])
    # moments are sharded (half the buffer each) and frozen ranges hold none on any rank
    assert r0["bytes"][0] == r1["bytes"][0] == 8 * r0["numel"] // 2
    assert r0["bytes"][1] + r1["bytes"][1] == 8 * (r0["numel"] - r0["frozen_numel"])
    if mode == "megatron":
        assert r0["buckets"] > 1  # several padded buckets, each sharded over the ranks


def test_readme_megatron_loop_runs_as_written(tmp_path):
    """The README's Megatron-style loop, on a one-rank gloo group: it trains and GradES counts every step."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "FlatAdamW.from_buffers" in b]
    assert len(blocks) == 1

    class Out:
        def __init__(self, loss):
            self.loss = loss

    class Model(Net):
        def forward(self, x, y):
            return Out(((super().forward(x) - y) ** 2).mean())

    model = Model()
    before = flat_params(model)
    loader = [dict(zip("xy", batch(s, None, 1))) for s in range(STEPS)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        scope = {"model": model, "loader": loader}
        exec(blocks[0], scope)
    finally:
        dist.destroy_process_group()
    assert not np.array_equal(before, flat_params(model))
    assert scope["es"].step_count == STEPS and scope["opt"].step_calls == STEPS
