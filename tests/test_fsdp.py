"""FrozenAwareAdamW and GradES on FSDP2 (fully_shard) models, gloo on CPU: 2 ranks, 4 ranks and HSDP
2x2. The fused kernels run on local shards (some of them empty); statistics are reduced over the
shard group so decisions equal a 1-process run over the global batch (with and without clipping
and accumulation); params match torch's AdamW on the same sharded model; frozen params stay
bitwise unchanged; state dicts move between the two optimizers both ways; a resume through
torch.distributed.checkpoint equals the uninterrupted run bitwise; tensor-parallel Shard(1) is
refused at construction."""
import pytest
import torch
import torch.distributed as dist

from dist_util import CFG, LR, Net, batch, spawn

pytestmark = pytest.mark.distributed

STEPS = 12
MAX_NORM = 0.5


def shard(mesh):
    from torch.distributed.fsdp import fully_shard
    m = Net()
    for b in m.layers:
        for lin in (b.self_attn.q_proj, b.mlp.up_proj, b.mlp.down_proj):
            fully_shard(lin, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def make_opt(kind, params):
    from grades import FrozenAwareAdamW
    return (torch.optim.AdamW if kind == "torch" else FrozenAwareAdamW)(params, lr=LR)


def train(model, opt, gs, steps, rank, world, clip=False, accum=1, start=0):
    """``steps`` steps from ``start``; ``rank=None``: one process over the global batch."""
    for s in range(start, start + steps):
        x, y = batch(s, rank, world)
        xs, ys = x.chunk(accum), y.chunk(accum)
        for k in range(accum):
            if hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(k == accum - 1)
            (((model(xs[k]) - ys[k]) ** 2).mean() / accum).backward()
        total = None
        if clip:
            total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], MAX_NORM)
        opt.step()
        if gs is not None:
            gs.step(total_norm=total, max_norm=MAX_NORM) if clip else gs.step()
        opt.zero_grad()
    if gs is not None:
        gs.wait()


def full(model):
    """Every parameter's full value (an all-gather per DTensor)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]


def decisions(mesh, rank, world, clip, accum, ref_fsteps):
    from grades import GradES, GradESConfig
    m = shard(mesh)
    opt = make_opt("frozenaware", m.parameters())
    gs = GradES(m, opt, GradESConfig(**CFG))
    assert gs.process_group is None and opt.reduces_stats  # reduced once, in the optimizer's step
    snaps, fsteps = {}, None
    for s in range(STEPS):
        train(m, opt, gs, 1, rank, world, clip, accum, start=s)
        for e in gs.freeze_events:
            c = next(c for c in gs.components if c.name == e["component"])
            snaps.setdefault(c.name, [p.full_tensor() for p in c.params])
    fsteps = gs.state_dict()["freeze_step"]
    named = dict(m.named_parameters())
    unchanged = all(torch.equal(named[n + ".weight"].full_tensor(), v[0]) for n, v in snaps.items())
    return {"freeze_step": fsteps, "ref": ref_fsteps, "n_frozen": len(snaps), "unchanged": unchanged,
            "frozen_mask": opt.frozen.int().tolist()}


def reference_fsteps(clip, accum, world):
    from grades import GradES, GradESConfig
    m = Net()
    opt = make_opt("frozenaware", m.parameters())
    gs = GradES(m, opt, GradESConfig(**CFG))
    train(m, opt, gs, STEPS, None, world, clip, accum)
    return gs.state_dict()["freeze_step"]


def matches_torch(mesh, rank, world):
    """FrozenAwareAdamW vs torch.optim.AdamW on the same FSDP2 model (no freezing)."""
    got = {}
    for kind in ("frozenaware", "torch"):
        m = shard(mesh)
        opt = make_opt(kind, m.parameters())
        train(m, opt, None, 6, rank, world)
        got[kind] = full(m)
    return max(float((a - b).abs().max()) for a, b in zip(got["frozenaware"], got["torch"]))


def state_dicts_interoperate(mesh, rank, world):
    """FrozenAwareAdamW -> torch.optim.AdamW -> FrozenAwareAdamW on one FSDP2 model: the moments
    survive both ways and the next steps agree."""
    m = shard(mesh)
    ours = make_opt("frozenaware", m.parameters())
    train(m, ours, None, 3, rank, world)
    theirs = make_opt("torch", m.parameters())
    theirs.load_state_dict(ours.state_dict())
    back = make_opt("frozenaware", m.parameters())
    back.load_state_dict(theirs.state_dict())
    same = all(torch.equal(ours.state[p][k].full_tensor(), back.state[p][k].full_tensor())
               and torch.equal(ours.state[p][k].full_tensor(), theirs.state[p][k].full_tensor())
               for p in m.parameters() for k in ("exp_avg", "exp_avg_sq"))
    return same


def dcp_resume(mesh, rank, world, tmp):
    """k steps, DCP save, a new model/optimizer/GradES loading it, the remaining steps: bitwise the
    uninterrupted run (params, moments, decisions)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from grades import GradES, GradESConfig

    def build():
        m = shard(mesh)
        opt = make_opt("frozenaware", m.parameters())
        return m, opt, GradES(m, opt, GradESConfig(**CFG))
    m, opt, gs = build()
    train(m, opt, gs, STEPS, rank, world)
    want, want_f = full(m), gs.state_dict()["freeze_step"]

    k = 7
    m, opt, gs = build()
    train(m, opt, gs, k, rank, world)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    gs_state = gs.state_dict()

    m, opt, gs = build()
    msd, osd = get_state_dict(m, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=tmp)
    set_state_dict(m, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    gs.load_state_dict(gs_state)
    train(m, opt, gs, STEPS - k, rank, world, start=k)
    got = full(m)
    return {"bitwise": all(torch.equal(a, b) for a, b in zip(got, want)),
            "freeze_step": gs.state_dict()["freeze_step"], "want": want_f}


def master_weights(mesh, rank, world):
    """bf16 FSDP2 parameters with float32 masters (DTensors too) follow torch's AdamW run on float32
    copies of the shards fed the same gradients; each bf16 shard is its master rounded."""
    from grades import FrozenAwareAdamW
    from torch.distributed.fsdp import fully_shard
    m = Net().bfloat16()
    for b in m.layers:
        for lin in (b.self_attn.q_proj, b.mlp.up_proj, b.mlp.down_proj):
            fully_shard(lin, mesh=mesh)
    fully_shard(m, mesh=mesh)
    params = list(m.parameters())
    opt = FrozenAwareAdamW(params, lr=LR, master_weights=True)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref = torch.optim.AdamW(shadow, lr=LR)
    for s in range(4):
        x, y = batch(s, rank, world)
        ((m(x.bfloat16()).float() - y) ** 2).mean().backward()
        for q, p in zip(shadow, params):
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        opt.zero_grad()
    masters = [opt.state[p]["master_param"] for p in params]
    return {"dtensor_masters": all(hasattr(t, "full_tensor") and t.dtype == torch.float32 for t in masters),
            "master_diff": max(float((a.full_tensor() - b.full_tensor()).abs().max()) for a, b in zip(masters, shadow)),
            "rounded": all(torch.equal(a.full_tensor().bfloat16(), p.full_tensor()) for a, p in zip(masters, params))}


def grad_scaler(mesh, rank, world):
    """A GradScaler step with a non-finite gradient: skipped on every rank, as torch's AdamW does."""
    got, skipped = [], None
    for kind in ("frozenaware", "torch"):
        m = shard(mesh)
        opt = make_opt(kind, m.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for s in range(4):
            x, y = batch(s, rank, world)
            if s == 2 and rank == 1:
                x = x.clone()
                x[0, 0] = float("inf")
            scaler.scale(((m(x) - y) ** 2).mean()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        got.append(full(m))
        if kind == "frozenaware":
            skipped = int(opt.skipped_steps)
    return {"skipped": skipped, "diff": max(float((a - b).abs().max()) for a, b in zip(*got))}


def tensor_parallel_refused(rank, world):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))
    try:
        make_opt("frozenaware", [w])
    except TypeError as e:
        return str(e)
    return None


def _worker2(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    res = {"match": matches_torch(mesh, rank, world), "interop": state_dicts_interoperate(mesh, rank, world),
           "tp": tensor_parallel_refused(rank, world), "masters": master_weights(mesh, rank, world),
           "scaler": grad_scaler(mesh, rank, world)}
    for clip, accum in ((False, 1), (True, 2)):
        res[f"dec-{clip}-{accum}"] = decisions(mesh, rank, world, clip, accum, reference_fsteps(clip, accum, world))
    tmp = [None]
    if rank == 0:
        import tempfile
        tmp[0] = tempfile.mkdtemp()
    dist.broadcast_object_list(tmp)
    res["dcp"] = dcp_resume(mesh, rank, world, tmp[0])
    return res


def _worker4(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    res = {}
    ref = reference_fsteps(False, 1, world)
    for name, shape in (("fsdp4", (4,)), ("hsdp", (2, 2))):
        names = ("replicate", "shard") if len(shape) == 2 else None
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        res[name] = {"match": matches_torch(mesh, rank, world), **decisions(mesh, rank, world, False, 1, ref)}
    return res


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn(_worker2, 2, str(tmp_path_factory.mktemp("fsdp2")))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return spawn(_worker4, 4, str(tmp_path_factory.mktemp("fsdp4")))


def test_params_match_torch_adamw_on_the_same_sharded_model(two):
    assert two[0]["match"] < 1e-6


@pytest.mark.parametrize("case", ["dec-False-1", "dec-True-2"])
def test_decisions_equal_a_one_process_run(two, case):
    r0, r1 = two[0][case], two[1][case]
    assert r0["freeze_step"] == r1["freeze_step"] == r0["ref"]
    assert r0["frozen_mask"] == r1["frozen_mask"] and any(r0["frozen_mask"])
    assert r0["n_frozen"] > 0 and r0["unchanged"] and r1["unchanged"]


def test_state_dict_interoperates_with_torch_adamw(two):
    assert two[0]["interop"] and two[1]["interop"]


def test_dcp_resume_equals_uninterrupted_run(two):
    for r in two:
        assert r["dcp"]["bitwise"]
        assert r["dcp"]["freeze_step"] == r["dcp"]["want"] and any(f >= 0 for f in r["dcp"]["want"])


def test_tensor_parallel_placement_is_refused_at_construction(two):
    assert two[0]["tp"] and "Shard(dim=1)" in two[0]["tp"]


@pytest.mark.parametrize("layout", ["fsdp4", "hsdp"])
def test_four_ranks(four, layout):
    rs = [r[layout] for r in four]
    assert rs[0]["match"] < 1e-6
    assert all(r["freeze_step"] == rs[0]["ref"] for r in rs) and any(f >= 0 for f in rs[0]["ref"])
    assert all(r["frozen_mask"] == rs[0]["frozen_mask"] for r in rs)
    assert all(r["unchanged"] for r in rs)


def test_master_weights_on_sharded_bf16_params(two):
    r = two[0]["masters"]
    assert r["dtensor_masters"] and r["rounded"]   # each bf16 shard is its float32 master rounded
    assert r["master_diff"] < 1e-6                 # torch's AdamW on float32 copies, same gradients


def test_grad_scaler_skips_the_same_step_on_every_rank(two):
    assert [r["scaler"]["skipped"] for r in two] == [1, 1]
    assert two[0]["scaler"]["diff"] < 1e-6
