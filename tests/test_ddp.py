"""GradES under DDP with its default arguments and with static_graph=True (2 gloo ranks): no crash,
no unsynchronised step, decisions and parameters equal to a 1-process run over the global batch
(with and without clipping and gradient accumulation), frozen parameters bitwise unchanged, and
bytes all-reduced per step falling with the frozen fraction."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_util import CFG, LR, Net, batch, flat_params, ranks_equal, spawn

pytestmark = pytest.mark.distributed

STEPS = 14
MAX_NORM = 0.5
# (name, DDP kwargs, optimizer, clip, accumulation micro-batches)
CASES = [
    ("default-torch", {}, "torch", False, 1),
    ("default-frozenaware-clip-accum", {}, "frozenaware", True, 2),
    ("static-frozenaware", {"static_graph": True}, "frozenaware", False, 1),
    # (static_graph with no_sync() fails inside torch's reducer even without GradES: no accumulation)
    ("static-torch-clip", {"static_graph": True}, "torch", True, 1),
]


def make_opt(kind, params):
    from grades import FrozenAwareAdamW
    return (torch.optim.AdamW if kind == "torch" else FrozenAwareAdamW)(params, lr=LR)


def train(model, module, opt_kind, clip, accum, rank, world):
    """STEPS GradES steps; ``rank=None`` is the 1-process run over the global batch. Returns the
    policy, the per-step bytes the DDP hook sent and snapshots of each frozen component."""
    from grades import GradES, GradESConfig
    opt = make_opt(opt_kind, model.parameters())
    gs = GradES(model, opt, GradESConfig(**CFG))
    hook = getattr(model, "_grades_hook", None)
    sent, frozen_at = [], {}
    for s in range(STEPS):
        x, y = batch(s, rank, world)
        xs, ys = x.chunk(accum), y.chunk(accum)
        if hook is not None:
            hook.reset_counters()
        for k in range(accum):
            sync = k == accum - 1 or not isinstance(model, DDP)
            ctx = model.no_sync() if not sync else torch.enable_grad()
            with ctx:
                (((model(xs[k]) - ys[k]) ** 2).mean() / accum).backward()
        if clip:
            params = [p for p in model.parameters() if p.grad is not None]
            total = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        gs.step(total_norm=total, max_norm=MAX_NORM) if clip else gs.step()
        opt.zero_grad()
        sent.append(hook.bytes_sent if hook is not None else 0)
        for e in gs.freeze_events:
            c = next(c for c in gs.components if c.name == e["component"])
            frozen_at.setdefault(c.name.replace("module.", ""), [p.detach().clone() for p in c.params])
    gs.wait()
    return gs, sent, frozen_at


def _worker(rank, world):
    from grades.integrations.ddp import DDPFreezeHook
    res = {}
    for name, kw, opt_kind, clip, accum in CASES:
        ref_model = Net()
        ref, _, _ = train(ref_model, ref_model, opt_kind, clip, accum, None, world)
        ddp = DDP(Net(), **kw)
        gs, sent, frozen_at = train(ddp, ddp.module, opt_kind, clip, accum, rank, world)
        assert isinstance(ddp._grades_hook, DDPFreezeHook)
        comps = {c.name.replace("module.", ""): c for c in gs.components}
        fsteps = gs.state_dict()["freeze_step"]
        # frozen by the end of the previous step: its gradient is left out of the last step's all-reduce
        frozen_numel = sum(c.numel for c, f in zip(gs.components, fsteps) if 0 <= f < STEPS)
        unfrozen_bytes = 4 * (sum(p.numel() for p in ddp.module.parameters()) - frozen_numel)
        res[name] = {
            "freeze_step": fsteps, "ref_freeze_step": ref.state_dict()["freeze_step"],
            "max_diff": float((flat_params(ddp.module) - flat_params(ref_model)).abs().max()),
            "frozen_unchanged": all(torch.equal(a, p.detach()) for n, snap in frozen_at.items()
                                    for a, p in zip(snap, comps[n].params)),
            "n_frozen_checked": len(frozen_at),
            "ranks_equal": ranks_equal(flat_params(ddp.module)),
            "requires_grad_kept": all(p.requires_grad for p in ddp.module.parameters()),
            "sent": sent, "unfrozen_bytes": unfrozen_bytes,
            "full_bytes": 4 * sum(p.numel() for p in ddp.module.parameters()),
        }
    # DDP under torch.compile: requires_grad never flips, so freezes cost no recompile
    from test_compile import CountingBackend
    torch._dynamo.reset()
    backend = CountingBackend()
    ref_model = Net()
    ref, _, _ = train(ref_model, ref_model, "frozenaware", False, 1, None, world)
    ddp = DDP(Net())
    compiled = torch.compile(ddp, backend=backend)
    gs, sent, _ = train(compiled, ddp.module, "frozenaware", False, 1, rank, world)
    fsteps = gs.state_dict()["freeze_step"]
    res["compiled"] = {"freeze_step": fsteps, "ref_freeze_step": ref.state_dict()["freeze_step"],
                       "compiles": backend.compiles, "calls": backend.calls, "sent": sent,
                       "max_diff": float((flat_params(ddp.module) - flat_params(ref_model)).abs().max())}
    # what cannot work is refused before any step
    from grades import GradES, GradESConfig
    ddp = DDP(Net())
    ddp.register_comm_hook(None, lambda state, bucket: torch.futures.Future())
    try:
        GradES(ddp, torch.optim.AdamW(ddp.parameters()), GradESConfig(**CFG))
        res["refusal"] = None
    except ValueError as e:
        res["refusal"] = str(e)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn(_worker, 2, str(tmp_path_factory.mktemp("ddp")))


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_ddp_matches_one_process_run(results, case):
    r0, r1 = results[0][case], results[1][case]
    assert r0["freeze_step"] == r1["freeze_step"] == r0["ref_freeze_step"]
    assert any(f >= 0 for f in r0["freeze_step"]), "the run should freeze something"
    assert r0["ranks_equal"] and r1["ranks_equal"]
    assert r0["max_diff"] < 1e-5
    assert r0["requires_grad_kept"]  # DDP's reducer never misses a gradient
    assert r0["n_frozen_checked"] > 0 and r0["frozen_unchanged"] and r1["frozen_unchanged"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_frozen_gradients_are_not_communicated(results, case):
    r = results[0][case]
    assert r["sent"][0] == r["full_bytes"]          # nothing frozen: the whole gradient
    assert r["sent"][-1] == r["unfrozen_bytes"] < r["full_bytes"]
    assert all(b <= a for a, b in zip(r["sent"], r["sent"][1:]))


def test_a_ddp_model_with_its_own_comm_hook_is_refused_at_construction(results):
    assert results[0]["refusal"] and "comm hook" in results[0]["refusal"]


def test_compiled_ddp_freezes_without_recompiling(results):
    r = results[0]["compiled"]
    assert r["freeze_step"] == results[1]["compiled"]["freeze_step"] == r["ref_freeze_step"]
    assert any(f >= 0 for f in r["freeze_step"])
    assert r["max_diff"] < 1e-5
    # DDP's graph splitting may compile a few subgraphs, once: every step runs them, none recompiles
    assert r["calls"] == STEPS * r["compiles"]
    assert r["sent"][-1] < r["sent"][0]
