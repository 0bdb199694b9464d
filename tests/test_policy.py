"""GradES policy: configuration checks, discovery, device decisions, host follow-up, state."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import grades
from grades import GradES, GradESConfig
from grades.components import Component, discover_components


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(d, d, bias=False)
        self.self_attn.o_proj = nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.mlp.down_proj = nn.Linear(2 * d, d, bias=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.self_attn.o_proj(torch.tanh(self.self_attn.q_proj(self.norm(x))))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class Toy(nn.Module):
    def __init__(self, d: int = 8, layers: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        h = self.embed(x)
        for b in self.layers:
            h = b(h)
        return self.head(h)


def data(step: int, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def train(model, opt, gs, steps, start=0, hook=None):
    for s in range(start, start + steps):
        x, y = data(s)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if hook is not None:
            hook(s)
        opt.step()
        gs.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"), (dict(tau={"mlp": 0.0}), "tau"),
    (dict(alpha=1.0), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(patience=-1), "patience"),
    (dict(statistic="l3"), "statistic"), (dict(check_interval=0), "check_interval"),
    (dict(tau=1.0, rel_tau=0.5), "either"), (dict(rel_tau=1.5), "rel_tau"),
    (dict(ema=1.0), "ema"), (dict(max_frozen_ratio=0.0), "max_frozen_ratio"),
    (dict(max_frozen_ratio=0.5, stop_ratio=1.0), "stop_ratio"), (dict(history_max=0), "history_max"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradESConfig(**kwargs)


def test_config_needs_total_steps_for_alpha():
    with pytest.raises(ValueError, match="total_steps"):
        GradES(Toy(), None, GradESConfig(alpha=0.3))
    with pytest.raises(ValueError, match="grace"):
        GradES(Toy(), None, GradESConfig(alpha=0.0))  # automatic mode needs a grace period
    with pytest.raises(ValueError, match="mlp"):
        GradES(Toy(), None, GradESConfig(tau={"attention": 1.0}, grace_steps=1))


def test_no_components_lists_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"Modules seen: 0, 2"):
        GradES(model, None, GradESConfig(grace_steps=1))


def test_discovery_on_toy_and_custom_patterns():
    m = Toy()
    comps = discover_components(m)
    assert [c.name for c in comps[:4]] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj",
                                          "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"]
    assert [c.type for c in comps[:4]] == ["attention", "attention", "mlp", "mlp"]
    assert all(c.param_names[0].endswith(".weight") and len(c.params) == 1 for c in comps)
    custom = discover_components(m, {"norm": r"norm\.weight$"})
    assert [c.name for c in custom] == ["layers.0.norm.weight", "layers.1.norm.weight"]
    with pytest.raises(ValueError, match="invalid pattern"):
        discover_components(m, {"x": "("})


# ---------------------------------------------------------------- decisions


def test_statistics_match_manual():
    m = Toy()
    x, y = data(0)
    ((m(x) - y) ** 2).mean().backward()
    comps = discover_components(m)
    g = [c.params[0].grad.double() for c in comps]
    want = {"l1": [t.abs().sum() for t in g], "l2": [t.pow(2).sum().sqrt() for t in g],
            "mean_abs": [t.abs().mean() for t in g], "rms": [t.pow(2).mean().sqrt() for t in g]}
    for stat, ref in want.items():
        gs = GradES(m, None, GradESConfig(tau=1e-30, statistic=stat, grace_steps=0))
        gs.step()
        np.testing.assert_allclose(gs.last_stats, torch.stack(ref).numpy(), rtol=1e-5)


def simulate(stats, thresh, grace, interval, patience):
    """Host re-implementation of the freeze rule on recorded per-step statistics."""
    C = stats.shape[1]
    counter, frozen = np.zeros(C, int), np.full(C, -1)
    for i, t in enumerate(range(1, len(stats) + 1)):
        if t <= grace or (t - grace) % interval:
            continue
        live = frozen < 0
        below = (stats[i] < thresh) & live
        counter = np.where(below, counter + 1, 0)
        frozen = np.where(live & (counter > patience), t, frozen)
    return frozen


@pytest.mark.parametrize("patience, interval", [(0, 1), (2, 2)])
def test_freeze_rule_matches_recorded_statistics(patience, interval):
    torch.manual_seed(0)
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    cfg = GradESConfig(rel_tau=0.9, ema=0.5, grace_steps=6, patience=patience, check_interval=interval,
                       stop_ratio=None)
    gs = GradES(m, opt, cfg)
    train(m, opt, gs, 40)
    gs.wait()
    stats = np.array([h["stat"] for h in gs.history])
    assert len(stats) == 40
    frozen = simulate(stats, np.array(gs.thresholds()), 6, interval, patience)
    assert (frozen >= 0).any(), "tiny run produced no freeze; the test needs one"
    assert (frozen[frozen >= 0] > 6).all()
    got = np.array([gs.history_dict()["freeze_steps"].get(c.name, -1) for c in gs.components])
    np.testing.assert_array_equal(got, frozen)


def test_nothing_freezes_during_grace_and_all_freeze_after():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=5, patience=1))
    steps_seen = []

    def hook(s):
        steps_seen.append(gs.frozen_fraction)
    train(m, opt, gs, 8, hook=hook)
    # decisions at the check steps 6 (counter 1) and 7 (counter 2 > patience): frozen at step 7
    assert steps_seen[:7] == [0.0] * 7
    assert gs.should_stop and gs.stopped_at == 7
    assert set(gs.history_dict()["freeze_steps"].values()) == {7}


def test_frozen_params_leave_autograd_and_stop_changing():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, stop_ratio=None))
    train(m, opt, gs, 3)  # decision at step 3
    att = [c for c in gs.components if c.type == "attention"]
    mlp = [c for c in gs.components if c.type == "mlp"]
    assert all(not p.requires_grad for c in att for p in c.params)
    assert all(p.requires_grad for c in mlp for p in c.params)
    before = {c.name: c.params[0].detach().clone() for c in gs.components}
    x, y = data(99)
    ((m(x) - y) ** 2).mean().backward()
    assert all(c.params[0].grad is None for c in att)           # no weight-gradient GEMM any more
    assert all(c.params[0].grad is not None for c in mlp)
    assert m.layers[0].self_attn.o_proj.bias.grad is not None    # gradients still flow through
    opt.zero_grad()
    train(m, opt, gs, 3, start=3)
    for c in att:
        assert torch.equal(c.params[0], before[c.name])
    assert any(not torch.equal(c.params[0], before[c.name]) for c in mlp)
    assert not gs.should_stop


def test_max_frozen_ratio_caps_in_component_order():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=1, max_frozen_ratio=0.5, stop_ratio=None))
    train(m, opt, gs, 4)
    C = len(gs.components)
    assert gs.frozen_components == [c.name for c in gs.components[:C // 2]]


def test_nonfinite_steps_do_not_advance_patience():
    m = Toy()

    class NoUpdate:  # keeps the poisoned gradients away from the weights
        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            m.zero_grad(set_to_none=set_to_none)
    opt = NoUpdate()
    gs = GradES(m, None, GradESConfig(tau=1e9, grace_steps=1, patience=1))
    poison = {2, 3, 4}

    def hook(s):
        if s + 1 in poison:
            m.layers[1].mlp.up_proj.weight.grad[0, 0] = float("nan")
    train(m, opt, gs, 4, hook=hook)
    assert gs.frozen_fraction == 0.0           # steps 2-4 invalid: no check counted
    train(m, opt, gs, 2, start=4)              # steps 5, 6 valid -> counter 2 > patience at 6
    assert gs.stopped_at == 6


def test_state_dict_resume_continues_identically(tmp_path):
    cfg = GradESConfig(rel_tau=0.3, ema=0.8, grace_steps=5, patience=1, stop_ratio=None)

    def run(split):
        torch.manual_seed(0)
        m = Toy(seed=3)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        gs = GradES(m, opt, cfg)
        if split is None:
            train(m, opt, gs, 30)
            return gs
        train(m, opt, gs, split)
        sd = json.loads(json.dumps(gs.state_dict()))
        osd = opt.state_dict()
        m2 = Toy(seed=3)
        m2.load_state_dict(m.state_dict())
        opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
        opt2.load_state_dict(osd)
        gs2 = GradES(m2, opt2, cfg)
        gs2.load_state_dict(sd)
        assert gs2.frozen_components == gs.frozen_components
        train(m2, opt2, gs2, 30 - split, start=split)
        return gs2

    full = run(None)
    fs = sorted(f for f in full.state_dict()["freeze_step"] if f >= 0)
    assert fs and fs[0] < fs[-1], f"need freezes at different steps, got {fs}"
    split = fs[0]  # resume right after the first freeze, before the last one
    resumed = run(split)
    a, b = full.state_dict(), resumed.state_dict()
    assert a["frozen"] == b["frozen"] and a["freeze_step"] == b["freeze_step"] and a["ema"] == b["ema"]
    assert full.history == resumed.history
    full.save_history(tmp_path / "h.json")
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["freeze_steps"] and len(h["components"]) == len(full.components)


def test_history_is_bounded():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    gs = GradES(m, opt, GradESConfig(tau=1e-30, grace_steps=1, history_max=8))
    train(m, opt, gs, 40)
    assert len(gs.history) <= 8
    steps = [h["step"] for h in gs.history]
    assert steps == sorted(steps) and steps[-1] >= 32


def test_frozen_aware_optimizer_acts_on_device_mask():
    FrozenAwareAdamW = pytest.importorskip("grades.optim").FrozenAwareAdamW
    m = Toy()
    m_ref = Toy()
    opt = FrozenAwareAdamW(m.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(m_ref.parameters(), lr=1e-2)
    cfg = GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, stop_ratio=None)
    gs = GradES(m, opt, cfg)
    gs_ref = GradES(m_ref, opt_ref, cfg)
    assert gs.frozen_aware and not gs_ref.frozen_aware
    before = None
    for s in range(5):
        for model, o, g in ((m, opt, gs), (m_ref, opt_ref, gs_ref)):
            x, y = data(s)
            ((model(x) - y) ** 2).mean().backward()
            o.step()
            g.step()
            o.zero_grad()
        if s == 2:
            np.testing.assert_allclose(gs.last_stats, gs_ref.last_stats, rtol=1e-4)
            before = {c.name: c.params[0].detach().clone() for c in gs.components if c.type == "attention"}
    assert gs.frozen_components == gs_ref.frozen_components
    assert bool(opt.frozen[[opt.param_index(c.params[0]) for c in gs.components if c.type == "attention"]].all())
    for c in gs.components:
        if c.type == "attention":
            assert torch.equal(c.params[0], before[c.name]) and not c.params[0].requires_grad


def test_explicit_components_and_public_exports():
    m = Toy()
    comps = [Component("q0", "attention", ("layers.0.self_attn.q_proj.weight",), [m.layers[0].self_attn.q_proj.weight])]
    gs = GradES(m, None, GradESConfig(tau=1.0, grace_steps=0), components=comps)
    assert gs.num_components == 1 and grades.GradES is GradES
    with pytest.raises(ValueError, match="not a parameter"):
        GradES(m, None, GradESConfig(tau=1.0, grace_steps=0),
               components=[Component("x", "mlp", ("x",), [nn.Parameter(torch.zeros(2, 2))])])


@pytest.mark.parametrize("cfg", [
    dict(rel_tau=0.5, ema=0.8, grace_steps=5, patience=1, stop_ratio=None),
    dict(tau={"attention": 3.0, "mlp": 1.0}, statistic="l2", grace_steps=3, check_interval=2,
         max_frozen_ratio=0.5, stop_ratio=None),
    dict(rel_tau=0.6, statistic="rms", grace_steps=4, patience=2, max_frozen_ratio=0.75, stop_ratio=0.5),
])
def test_host_and_device_decision_paths_agree(cfg):
    """On CPU the rule runs in NumPy on views of the state; the tensor path (used on GPUs) must
    give bitwise the same state, history and freezes."""
    out = []
    for host in (True, False):
        m = Toy(seed=5)
        opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)  # skips the poisoned step
        gs = GradES(m, opt, GradESConfig(**cfg))
        gs.host_math = host
        poison = lambda s: m.layers[0].mlp.up_proj.weight.grad.__setitem__((0, 0), float("inf")) if s == 7 else None
        train(m, opt, gs, 25, hook=poison)
        gs.wait()
        out.append((gs.state_dict(), gs.history_dict()))
    (a, ha), (b, hb) = out
    assert a == b and ha == hb
    assert a["invalid_steps"] == 1 and any(f >= 0 for f in a["freeze_step"])
