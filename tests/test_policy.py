"""GradES policy: configuration checks, discovery, device decisions, host follow-up, state."""
import dataclasses
import json

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
    (dict(grace_steps=10, total_steps=10), "grace_steps"),
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
    with pytest.raises(ValueError, match=r"\['atention'\]"):  # a typo is not hidden by "default"
        GradES(Toy(), None, GradESConfig(tau={"atention": 1.0, "default": 2.0}, grace_steps=1))
    with pytest.raises(ValueError, match="allows no component"):  # floor(0.1 * 8) = 0
        GradES(Toy(), None, GradESConfig(tau=1.0, grace_steps=1, max_frozen_ratio=0.1, stop_ratio=None))
    with pytest.raises(ValueError, match="grace_steps"):            # the Trainer fills total_steps in
        dataclasses.replace(GradESConfig(grace_steps=20), total_steps=8)


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
        frozen = np.where(live & (counter >= max(patience, 1)), t, frozen)
    return frozen


@pytest.mark.parametrize("patience, interval", [(1, 1), (3, 2)])
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


@pytest.mark.parametrize("patience, at", [(0, 6), (1, 6), (2, 7), (3, 8)])
def test_patience_counts_consecutive_checks_below_tau(patience, at):
    """patience=P freezes on the P-th consecutive check below tau (0 and 1: the first)."""
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=5, patience=patience))
    steps_seen = []

    def hook(s):
        steps_seen.append(gs.frozen_fraction)
    train(m, opt, gs, 8, hook=hook)
    assert steps_seen[:at] == [0.0] * at                      # nothing during the grace period (1-5)
    assert gs.should_stop and gs.stopped_at == at
    assert set(gs.history_dict()["freeze_steps"].values()) == {at}


def test_frozen_params_leave_autograd_and_stop_changing():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=1, stop_ratio=None))
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
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=1, patience=1, max_frozen_ratio=0.5, stop_ratio=None))
    train(m, opt, gs, 4)
    C = len(gs.components)
    assert gs.frozen_components == [c.name for c in gs.components[:C // 2]]


@pytest.mark.parametrize("ratio", [0.5, 0.4])
def test_stop_ratio_is_reached_with_an_odd_number_of_components(ratio):
    """C = 3: the cap lets floor(r * 3) = 1 freeze; stop must come at that one, not at ceil(r * 3) = 2."""
    m = Toy()
    comps = [c for c in discover_components(m)][:3]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=1, patience=1, max_frozen_ratio=ratio, stop_ratio=ratio),
                components=comps)
    train(m, opt, gs, 3)
    assert gs.frozen_components == [comps[0].name]
    assert gs.should_stop and gs.stopped_at == 2


def test_nonfinite_steps_do_not_advance_patience():
    m = Toy()

    class NoUpdate:  # keeps the poisoned gradients away from the weights
        def step(self):
            pass

        def zero_grad(self, set_to_none=True):
            m.zero_grad(set_to_none=set_to_none)
    opt = NoUpdate()
    gs = GradES(m, None, GradESConfig(tau=1e9, grace_steps=1, patience=2))
    poison = {2, 3, 4}

    def hook(s):
        if s + 1 in poison:
            m.layers[1].mlp.up_proj.weight.grad[0, 0] = float("nan")
    train(m, opt, gs, 4, hook=hook)
    assert gs.frozen_fraction == 0.0           # steps 2-4 invalid: no check counted
    train(m, opt, gs, 2, start=4)              # steps 5, 6 valid -> second check below tau at 6
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
    gs = GradES(m, opt, GradESConfig(tau=1e-30, grace_steps=1, history_max=8, ema=None))
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
    cfg = GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=1, ema=None, stop_ratio=None)
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


DECISION_PATHS = ("native", "numpy", "device")


def use_path(gs: GradES, path: str) -> None:
    """Run ``gs``'s decision rule natively (C++ on host state), in NumPy, or as tensor ops (the
    path GPUs take, here on CPU tensors)."""
    gs.host_math = path != "device"
    if path == "numpy":
        gs._native = False
    elif path == "native":
        ok, why = grades.backends.get("cpu").available()
        if not ok:
            if grades.backends.strict():
                pytest.fail(f"GRADES_STRICT=1 but the CPU extension is not available: {why}")
            pytest.skip(f"CPU extension not available: {why}")


def pairs(m: nn.Module) -> list[Component]:
    """LoRA-like components: two matrices each (q+o, up+down of each layer), to exercise the
    per-component row sums."""
    out = []
    for i, b in enumerate(m.layers):
        for typ, (x, y) in (("attention", ("self_attn.q_proj", "self_attn.o_proj")),
                            ("mlp", ("mlp.up_proj", "mlp.down_proj"))):
            names = tuple(f"layers.{i}.{n}.weight" for n in (x, y))
            params = [b.get_submodule(n).weight for n in (x, y)]
            out.append(Component(f"layers.{i}.{typ}", typ, names, params))
    return out


@pytest.mark.parametrize("cfg", [
    dict(rel_tau=0.5, ema=0.8, grace_steps=5, patience=1, stop_ratio=None),
    dict(tau={"attention": 3.0, "mlp": 1.0}, statistic="l2", grace_steps=3, check_interval=2,
         max_frozen_ratio=0.5, stop_ratio=None, history_max=5),
    dict(rel_tau=0.6, statistic="rms", ema=None, grace_steps=4, patience=2, max_frozen_ratio=0.75, stop_ratio=0.5,
         history_every=3, history_max=4),
    dict(rel_tau=0.95, statistic="mean_abs", grace_steps=3, patience=1, stop_ratio=None),
])
@pytest.mark.parametrize("optim", ["frozen_aware", "torch"])
@pytest.mark.parametrize("comps", ["matrices", "pairs"])
def test_decision_paths_agree(cfg, optim, comps):
    """The rule runs natively (C++) on host state on CPU, in NumPy where the extension is missing,
    and as tensor ops on GPUs: the three give bitwise the same state, history and freezes, with
    statistics from the optimizer's pass or from the gradients, one- and two-matrix components, a
    skipped (non-finite) step, steps in which a matrix has no gradient, and clip coefficients
    (one of them infinite, which makes its step invalid)."""
    out = {}
    for path in DECISION_PATHS:
        m = Toy(seed=5)
        opt = (grades.FrozenAwareAdamW if optim == "frozen_aware" else torch.optim.AdamW)(m.parameters(), lr=1e-2)
        gs = GradES(m, opt, GradESConfig(**cfg), components=pairs(m) if comps == "pairs" else None)
        use_path(gs, path)
        for s in range(25):
            x, y = data(s)
            ((m(x) - y) ** 2).mean().backward()
            if s == 7 and optim == "frozen_aware":  # FrozenAwareAdamW skips this step
                m.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
            if s in (2, 9, 10, 11):
                m.layers[1].self_attn.q_proj.weight.grad = None
            opt.step()
            clip = {3: 0.5, 4: torch.tensor(0.25), 12: float("inf"), 13: 1.0}.get(s)
            if s in (5, 6, 14):  # the total norm clip_grad_norm_ returned (a tensor, a float, a NaN)
                gs.step(total_norm={5: torch.tensor(7.5), 6: 0.3, 14: torch.tensor(float("nan"))}[s], max_norm=1.0)
            else:
                gs.step(clip_coef=clip)
            opt.zero_grad(set_to_none=True)
        gs.wait()
        assert (gs._native not in (None, False)) == (path == "native")
        out[path] = (gs.state_dict(), gs.history_dict())
    (a, ha) = out["device"]
    for path in ("native", "numpy"):
        b, hb = out[path]
        assert a == b, path
        assert ha == hb, path
    assert a["invalid_steps"] == (2 if optim == "frozen_aware" else 1)
    assert any(f >= 0 for f in a["freeze_step"])
    if comps == "matrices":
        q = [c["name"] for c in ha["components"]].index("layers.1.self_attn.q_proj")
        assert a["ema_w"][q] != a["ema_w"][0] or not cfg.get("ema", 0.9)  # fewer steps counted for q_proj


def test_native_rule_rejects_inconsistent_inputs():
    """The native rule checks what it is given (it may be called directly)."""
    ok, why = grades.backends.get("cpu").available()
    if not ok:
        pytest.skip(why)
    m = Toy()
    opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1.0, grace_steps=1))
    train(m, opt, gs, 1)
    rule = gs._native
    rows = opt.last_grad_stats
    with pytest.raises(RuntimeError, match="rows must be"):
        rule.step(rows[:-1], None, None, None, None, 0.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="rows must be"):
        rule.step(rows.float(), None, None, None, None, 0.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="row_part"):
        rule.step(rows, torch.ones(3, dtype=torch.bool), None, None, None, 0.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="took"):
        rule.step(rows, None, torch.ones(len(rows), dtype=torch.int64), None, None, 0.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="not both"):
        rule.step(rows, None, None, 0.5, torch.tensor(1.0), 1.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="total_norm must be"):
        rule.step(rows, None, None, None, torch.ones(2), 1.0, None, 2, 1)
    with pytest.raises(RuntimeError, match="skipped must be"):
        rule.step(rows, None, None, None, None, 0.0, torch.ones(1), 2, 1)
    with pytest.raises(ValueError, match="not both"):
        gs.step(0.5, total_norm=1.0, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm > 0"):
        gs.step(total_norm=1.0)
    assert gs.step_count == 1  # nothing counted
    mod = type(rule)
    with pytest.raises(RuntimeError, match="idx entry"):
        mod(idx=torch.tensor([[5]]), num_rows=2, statistic=0, numel=torch.ones(1, dtype=torch.float64), ema=0.0,
            ref_decay=0.9, auto_mode=False, check_interval=1, need=1, max_frozen=1,
            frozen=torch.zeros(1, dtype=torch.bool), counter=torch.zeros(1, dtype=torch.int64),
            ema_v=torch.zeros(1, dtype=torch.float64), ema_w=torch.zeros(1, dtype=torch.float64),
            ref=torch.zeros(1, dtype=torch.float64), ref_w=torch.zeros(1, dtype=torch.float64),
            thresh=torch.ones(1, dtype=torch.float64), freeze_step=torch.zeros(1, dtype=torch.int64),
            last_stat=torch.zeros(1, dtype=torch.float64), invalid_steps=torch.zeros((), dtype=torch.int64),
            new_frozen=torch.zeros(1, dtype=torch.bool))


# ---------------------------------------------------------------- steps without gradients, clipping


@pytest.mark.parametrize("frozen_aware", [False, True])
def test_steps_without_a_gradient_do_not_count(frozen_aware):
    """A matrix that gets no gradient (an unrouted expert, a skipped branch) is not judged on those
    steps: without a gradient in steps 3-5, layers.1.mlp.up_proj reaches patience 2 at step 7
    (checks 6, 7) while the others freeze at step 4. Statistics come from the gradients with
    torch AdamW and from FrozenAwareAdamW's last_participation otherwise."""
    m = Toy()
    opt = (grades.FrozenAwareAdamW if frozen_aware else torch.optim.AdamW)(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=2, patience=2, stop_ratio=None))
    w = m.layers[1].mlp.up_proj.weight

    def hook(s):
        if s + 1 in (3, 4, 5):
            w.grad = None
    train(m, opt, gs, 7, hook=hook)
    fs = gs.history_dict()["freeze_steps"]
    assert fs.pop("layers.1.mlp.up_proj") == 7 and set(fs.values()) == {4}


def test_step_after_zero_grad_warns_once_and_freezes_nothing():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=1, patience=1))
    with pytest.warns(RuntimeWarning, match="none of the tracked parameters has a gradient") as rec:
        for s in range(4):
            x, y = data(s)
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad()
            gs.step()                         # wrong order: after zero_grad
    assert sum("tracked parameters" in str(r.message) for r in rec) == 1
    assert gs.frozen_fraction == 0.0 and not gs.should_stop


@pytest.mark.parametrize("unclip", [False, True])
def test_clipping_spike_in_one_matrix_does_not_freeze_the_others(unclip):
    """Learning rate 0 (stationary statistics), clip_grad_norm_(..., 1.0) every step, and at step 6
    one matrix's gradient spikes 1000x. The shared clip coefficient shrinks every other clipped
    gradient about 1000x: unless GradES divides it out, the other 7 matrices freeze."""
    from grades.policy import clip_coefficient
    m = Toy()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    gs = GradES(m, opt, GradESConfig(rel_tau=0.5, ema=None, patience=1, grace_steps=4, stop_ratio=None))
    for s in range(6):
        x, y = data(s)
        ((m(x) - y) ** 2).mean().backward()
        if s == 5:
            m.layers[0].mlp.up_proj.weight.grad.mul_(1000)
        unclipped = [c.params[0].grad.double().abs().sum() for c in gs.components]
        total = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        gs.step(clip_coef=clip_coefficient(total, 1.0) if unclip else None)
        opt.zero_grad()
    assert float(total) > 1.0                          # the clip acted
    assert len(gs.frozen_components) == (0 if unclip else 7)
    if unclip:
        np.testing.assert_allclose(gs.last_stats, torch.stack(unclipped).numpy(), rtol=1e-6)


def test_nonfinite_clip_coefficient_marks_the_step_invalid():
    m = Toy()
    gs = GradES(m, None, GradESConfig(tau=1e9, grace_steps=0, patience=1))
    x, y = data(0)
    ((m(x) - y) ** 2).mean().backward()
    gs.step(clip_coef=torch.tensor(0.0))               # what an infinite total norm gives
    gs.step(clip_coef=float("nan"))
    assert gs.state_dict()["invalid_steps"] == 2 and gs.frozen_fraction == 0.0
    gs.step(clip_coef=torch.tensor(0.5))
    assert gs.frozen_fraction == 1.0


def test_default_settings_do_not_freeze_on_noise():
    """Learning rate 0: the statistics only carry batch noise (3-10% of single steps fall below
    half the level), so every freeze is false. The raw rule without patience freezes most
    matrices within 100 decision steps; the defaults (EMA 0.9, patience 3) freeze none."""
    def run(**kw):
        m = Toy()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        gs = GradES(m, opt, GradESConfig(total_steps=140, stop_ratio=None, **kw))  # grace 42
        train(m, opt, gs, 140)
        return gs.history_dict()["freeze_steps"]
    assert GradESConfig().ema == grades.policy.DEFAULT_EMA and GradESConfig().patience == grades.policy.DEFAULT_PATIENCE
    assert run() == {}
    assert len(run(ema=None, patience=0)) >= 4


# ---------------------------------------------------------------- delayed host copies (CUDA path on CPU)


class FakeEvent:
    """Stands in for the CUDA event of a decision copy: the copy has landed once ``landed(n)`` is
    true, n being the number of queries since it was recorded."""

    def __init__(self, landed):
        self.landed, self.n, self.done = landed, 0, False

    def record(self):
        self.n, self.done = 0, False

    def query(self):
        self.n += 1
        self.done = self.done or self.landed(self.n)
        return self.done

    def synchronize(self):
        self.done = True


def test_copy_landing_between_poll_and_publish_is_read_once_and_in_order():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=6, patience=1,
                                     stop_ratio=None))
    gs.host_math = False                                   # the device path, with its host copies
    for slot in gs._slots:
        slot.event = FakeEvent(lambda n: n >= 5)           # lands right after the next step's poll
    train(m, opt, gs, 20)
    assert len({id(s) for s in gs._pending}) == len(gs._pending)
    gs.wait()
    steps = [h["step"] for h in gs.history]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert len(steps) >= 10                                # a copy every other step at least
    assert gs.history_dict()["freeze_steps"] == {c.name: 7 for c in gs.components if c.type == "attention"}


def test_requires_grad_flips_within_two_steps_of_the_device_decision():
    """Decided on the device at step 3: FrozenAwareAdamW skips the matrix from step 4 on at once;
    the host learns of it when the copy lands during step 4, so the backward of step 5 no longer
    computes its weight gradient."""
    m = Toy()
    opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau={"attention": 1e9, "mlp": 1e-30}, grace_steps=2, patience=1,
                                     stop_ratio=None))
    gs.host_math = False
    for slot in gs._slots:
        slot.event = FakeEvent(lambda n: n >= 2)           # lands one step after it was recorded
    q = m.layers[0].self_attn.q_proj.weight
    seen = {}
    for s in range(1, 6):
        x, y = data(s)
        ((m(x) - y) ** 2).mean().backward()
        had_grad = q.grad is not None
        before = q.detach().clone()
        opt.step()
        gs.step()
        opt.zero_grad(set_to_none=True)
        seen[s] = (had_grad, not torch.equal(before, q), q.requires_grad, bool(opt.frozen[opt.param_index(q)]))
    assert seen[3] == (True, True, True, True)        # decided at 3: device mask set, host not told yet
    assert seen[4] == (True, False, False, True)      # not updated; host learned during step 4
    assert seen[5] == (False, False, False, True)     # no weight gradient any more


# ---------------------------------------------------------------- sharded parameters


def test_dtensor_group_accepts_one_sharded_mesh_dimension_only():
    from torch.distributed.tensor import Partial, Replicate, Shard

    from grades.policy import _dtensor_group

    class Mesh:
        def __init__(self, name):
            self.name = name

        def get_group(self, dim):
            return f"{self.name}:{dim}"

    class DT:
        def __init__(self, mesh, *placements):
            self.device_mesh, self.placements = mesh, placements

        def to_local(self):
            return self

    a, b = Mesh("a"), Mesh("b")
    assert _dtensor_group([torch.zeros(2), torch.zeros(2)]) is None
    assert _dtensor_group([DT(a, Shard(0)), DT(a, Shard(1))]) == "a:0"            # FSDP2
    assert _dtensor_group([DT(a, Replicate(), Shard(0))] * 2) == "a:1"           # HSDP: the shard dim
    assert _dtensor_group([DT(a, Replicate())] * 2) is None                       # replicated: no reduction
    for params, match in [([torch.zeros(2), DT(a, Shard(0))], "DTensors"),
                          ([DT(a, Shard(0)), DT(b, Shard(0))], "different"),
                          ([DT(a, Shard(0)), DT(a, Replicate())], "different"),
                          ([DT(a, Shard(0), Shard(1))], "2 mesh dimensions"),
                          ([DT(a, Partial())], "Shard or Replicate")]:
        with pytest.raises(ValueError, match=match):
            _dtensor_group(params)
