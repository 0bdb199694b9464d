"""GradES policy: configuration checks, discovery, device decisions, host follow-up, state."""
import dataclasses
import json
import warnings

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
    (dict(grace_steps=10, total_steps=10), "grace_steps"), (dict(freeze_quorum=1.5), "freeze_quorum"),
    (dict(freeze_quorum=-0.1), "freeze_quorum"), (dict(freeze_quorum=float("nan")), "freeze_quorum"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradESConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ema="0.9"), "ema"), (dict(patience=1.5), "patience"), (dict(tau=True), "tau"),
    (dict(tau={"mlp": "1"}), r"tau\['mlp'\]"), (dict(tau={1: 1.0}), "keys"), (dict(stop_ratio=[1]), "stop_ratio"),
])
def test_config_of_the_wrong_type_raises_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
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


DECISION_PATHS = grades.policy.RULES


def rule_for(path: str) -> str:
    """The ``rule=`` for decision path ``path``: the native rule (C++ on host state) or the torch
    rule (the tensor ops GPUs run, here on CPU tensors); skips (fails under ``GRADES_STRICT=1``)
    where the CPU extension is missing."""
    if path == "native":
        ok, why = grades.policy.rule.native_available()
        if not ok:
            if grades.backends.strict():
                pytest.fail(f"GRADES_STRICT=1 but the CPU extension is not available: {why}")
            pytest.skip(f"CPU extension not available: {why}")
    return path


def _late_mlp_run(path: str, quorum: float, steps: int, never_freeze: bool = False):
    """Toy trained with FrozenAwareAdamW, gradients scaled so that the attention components
    qualify (patience 2 below tau) at step 4 and the MLP ones at step 9; ``never_freeze``: the
    same run with GradES watching and nothing ever below tau."""
    m = Toy(seed=3)
    opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
    cfg = GradESConfig(tau=1e-30 if never_freeze else 1e-3, ema=None, grace_steps=2, patience=2,
                       freeze_quorum=quorum)
    gs = GradES(m, opt, cfg, rule=rule_for(path))

    def quiet(s):  # step s + 1: tiny attention gradients from step 3, tiny MLP ones from step 8
        for c in gs.components:
            if s + 1 >= (3 if c.type == "attention" else 8):
                for p in c.params:
                    if p.grad is not None:
                        p.grad.mul_(1e-9)
    train(m, opt, gs, steps, hook=quiet)
    gs.wait()
    return m, gs


@pytest.mark.parametrize("path", DECISION_PATHS)
def test_freeze_quorum_holds_freezes_until_enough_qualify(path):
    """Attention components qualify at step 4, MLP ones at step 9. Each on its own (quorum 0),
    attention freezes at 4; with a quorum of all, nothing freezes before 9, then everything
    does, and the model at the stop is bitwise that of the run in which nothing ever froze
    (full training cut short); a quorum of half is met by the attention half at step 4."""
    m0, alone = _late_mlp_run(path, 0.0, 9)
    fs = alone.history_dict()["freeze_steps"]
    assert sorted(set(fs.values())) == [4, 9]
    m, together = _late_mlp_run(path, 1.0, 9)
    assert set(together.history_dict()["freeze_steps"].values()) == {9} and together.stopped_at == 9
    ref, _ = _late_mlp_run(path, 1.0, 9, never_freeze=True)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(m0.parameters(), ref.parameters()))  # freezing changed it
    n_att = sum(c.type == "attention" for c in alone.components)
    assert n_att * 2 == len(alone.components)
    _, half = _late_mlp_run(path, 0.5, 9)
    assert half.history_dict()["freeze_steps"] == fs
    _, most = _late_mlp_run(path, 0.75, 9)
    assert set(most.history_dict()["freeze_steps"].values()) == {9}


def test_optimizer_and_rule_arguments_are_checked():
    """Anything but an optimizer (or None) is a TypeError; the rule is named from RULES, and the
    policy drives an optimizer through the FreezableOptimizer contract only (a stock optimizer
    that happens to have a ``freeze_mask_`` attribute is not one)."""
    m = Toy()
    for bad in ("x", 3, [torch.zeros(1)]):
        with pytest.raises(TypeError, match="optimizer must be"):
            GradES(m, bad, GradESConfig(tau=1.0, grace_steps=0))
    with pytest.raises(ValueError, match="rule must be one of"):
        GradES(m, None, GradESConfig(tau=1.0, grace_steps=0), rule="numpy")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    opt.freeze_mask_ = lambda mask: None
    opt.last_grad_stats = opt.param_list = None
    gs = GradES(m, opt, GradESConfig(tau=1.0, grace_steps=0))
    assert not gs.frozen_aware and isinstance(gs.source, grades.policy.GradListSource)
    faw = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
    assert GradES(m, faw, GradESConfig(tau=1.0, grace_steps=0)).frozen_aware
    assert isinstance(faw, grades.contract.FreezableOptimizer)


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
    dict(rel_tau=0.8, ema=0.8, grace_steps=9, patience=1, stop_ratio=None),
    dict(tau={"attention": 3.0, "mlp": 1.0}, statistic="l2", grace_steps=3, check_interval=2, patience=3,
         max_frozen_ratio=0.5, stop_ratio=None, history_max=5),
    dict(rel_tau=0.9, statistic="rms", ema=None, grace_steps=9, patience=2, max_frozen_ratio=0.75, stop_ratio=0.5,
         history_every=3, history_max=4),
    dict(rel_tau=0.95, statistic="mean_abs", ema=0.9, grace_steps=3, patience=1, stop_ratio=None),
    dict(rel_tau=0.9, ema=0.8, grace_steps=9, patience=2, freeze_quorum=0.5, max_frozen_ratio=0.75, stop_ratio=None),
    dict(rel_tau=0.95, statistic="l2", ema=0.5, grace_steps=5, patience=1, freeze_quorum=1.0),
])
@pytest.mark.parametrize("optim", ["frozen_aware", "torch"])
@pytest.mark.parametrize("comps", ["matrices", "pairs"])
def test_decision_paths_agree(cfg, optim, comps):
    """The rule runs natively (C++) on host state on CPU, in NumPy where the extension is missing,
    and as tensor ops on GPUs: the three give bitwise the same state, history and freezes, with
    statistics from the optimizer's pass or from the gradients, one- and two-matrix components, a
    skipped (non-finite) step, steps in which a matrix has no gradient, clip coefficients
    (one of them infinite, which makes its step invalid), a NaN total norm (invalid too) and a
    finite gradient whose float32 sum of squares overflows during the grace period (an invalid
    reading, which must not reach the EMA or the automatic threshold), and a burst in the last
    grace step (the level is the lowest statistic of the last grace steps, not the latest)."""
    out = {}
    for path in DECISION_PATHS:
        m = Toy(seed=5)
        opt = (grades.FrozenAwareAdamW(m.parameters(), lr=1e-2, nonfinite="skip") if optim == "frozen_aware"
               else torch.optim.AdamW(m.parameters(), lr=1e-2))
        gs = GradES(m, opt, GradESConfig(**cfg), components=pairs(m) if comps == "pairs" else None, rule=rule_for(path))
        for s in range(25):
            x, y = data(s)
            ((m(x) - y) ** 2).mean().backward()
            if s == 7 and optim == "frozen_aware":  # FrozenAwareAdamW skips this step
                m.layers[0].mlp.up_proj.weight.grad[0, 0] = float("inf")
            if s in (2, 9, 10, 11):
                m.layers[1].self_attn.q_proj.weight.grad = None
            if s == 1:  # finite, but its square overflows float32: sum g^2 = inf
                m.layers[0].mlp.down_proj.weight.grad[0, 0] = 2e19
            opt.step()
            # step 9 (s = 8) ends the grace period with a tenfold reading: the level stays lower
            clip = {3: 0.5, 4: torch.tensor(0.25), 8: 0.1, 12: float("inf"), 13: 1.0}.get(s)
            if s in (5, 6, 14):  # the total norm clip_grad_norm_ returned (a tensor, a float, a NaN)
                gs.step(total_norm={5: torch.tensor(7.5), 6: 0.3, 14: torch.tensor(float("nan"))}[s], max_norm=1.0)
            else:
                gs.step(clip_coef=clip)
            opt.zero_grad(set_to_none=True)
        gs.wait()
        assert gs.rule_kind == path
        out[path] = (gs.state_dict(), gs.history_dict())
    (a, ha), (b, hb) = out["torch"], out["native"]
    assert a == b
    assert ha == hb
    assert a["invalid_steps"] == (4 if optim == "frozen_aware" else 3)  # steps 2, 13, 15 (and 8)
    assert all(np.isfinite(a[k]).all() for k in ("ema", "ref", "thresh", "last_stat"))
    assert any(f >= 0 for f in a["freeze_step"])
    if comps == "matrices":
        q = [c["name"] for c in ha["components"]].index("layers.1.self_attn.q_proj")
        assert a["ema_w"][q] != a["ema_w"][0] or not cfg.get("ema", 0.9)  # fewer steps counted for q_proj


def test_native_rule_rejects_inconsistent_inputs():
    """The native rule checks what it is given (it may be called directly)."""
    ok, why = grades.policy.rule.native_available()
    if not ok:
        pytest.skip(why)
    m = Toy()
    opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1.0, grace_steps=1), rule="native")
    train(m, opt, gs, 1)
    rule = gs._rule
    rows = opt.last_grad_stats
    with pytest.raises(RuntimeError, match="rows must be"):
        rule.step(rows[:-1], None, None, None, None, 2, 1)
    with pytest.raises(RuntimeError, match="rows must be"):
        rule.step(rows.float(), None, None, None, None, 2, 1)
    with pytest.raises(RuntimeError, match="row_part"):
        rule.step(rows, torch.ones(3, dtype=torch.bool), None, None, None, 2, 1)
    with pytest.raises(RuntimeError, match="participated"):
        rule.step(rows, None, torch.ones(len(rows), dtype=torch.int64), None, None, 2, 1)
    with pytest.raises(RuntimeError, match="skipped must be"):
        rule.step(rows, None, None, None, torch.ones(1), 2, 1)
    with pytest.raises(ValueError, match="not both"):
        gs.step(0.5, total_norm=1.0, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm > 0"):
        gs.step(total_norm=1.0)
    assert gs.step_count == 1  # nothing counted
    mod = type(rule)
    with pytest.raises(RuntimeError, match="idx entry"):
        mod(idx=torch.tensor([[5]]), num_rows=2, statistic=0, numel=torch.ones(1, dtype=torch.float64), ema=0.0,
            level_div=4, auto_mode=False, check_interval=1, patience=1, max_frozen=1, quorum=0,
            frozen=torch.zeros(1, dtype=torch.bool), counter=torch.zeros(1, dtype=torch.int64),
            ema_v=torch.zeros(1, dtype=torch.float64), ema_w=torch.zeros(1, dtype=torch.float64),
            ref=torch.zeros(1, dtype=torch.float64), ref_w=torch.zeros(1, dtype=torch.float64),
            thresh=torch.ones(1, dtype=torch.float64), freeze_step=torch.zeros(1, dtype=torch.int64),
            last_stat=torch.zeros(1, dtype=torch.float64), invalid_steps=torch.zeros((), dtype=torch.int64),
            new_frozen=torch.zeros(1, dtype=torch.bool))


@pytest.mark.parametrize("path", DECISION_PATHS)
def test_automatic_level_is_the_lowest_statistic_at_the_end_of_the_grace_period(path):
    """The automatic threshold is rel_tau times the lowest (EMA) statistic of the last
    grace // 4 grace steps (13-16 of 16). A gradient burst in the last two grace steps does not
    raise it: a threshold set from a transient would freeze a model that is still learning."""
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(rel_tau=0.5, ema=0.5, grace_steps=16, stop_ratio=None), rule=rule_for(path))

    def burst(s):
        if s + 1 in (15, 16):
            for p in m.parameters():
                p.grad.mul_(50.0)
    train(m, opt, gs, 16, hook=burst)
    gs.wait()
    stats = np.array([h["stat"] for h in gs.history])  # the EMA statistic of steps 1-16
    assert (stats[15] > 5 * stats[12:14].max(axis=0)).all()  # the burst shows in the statistic
    np.testing.assert_array_equal(gs.thresholds(), 0.5 * stats[12:16].min(axis=0))
    assert not (np.array(gs.thresholds()) <= 0.5 * stats[11]).all()  # step 12 is outside the window


def test_a_version_2_state_saved_in_the_grace_period_carries_its_level_on():
    """Versions 1-2 kept the level as a running mean with an unnormalised weight: loading such a
    state saved during the grace period carries the mean on as the lowest level seen so far."""
    cfg = GradESConfig(rel_tau=0.5, ema=None, grace_steps=8, stop_ratio=None)
    m, opt, gs = _trained(steps=7, cfg=cfg)
    sd = json.loads(json.dumps(gs.state_dict()))
    C = len(sd["ref"])
    gs.load_state_dict(dict(sd, version=2, ref=[1e-3] * C, ref_w=[0.25] * C))  # a mean of 4e-3
    assert gs.state.ref.tolist() == [4e-3] * C and gs.state.ref_w.tolist() == [1.0] * C
    train(m, opt, gs, 1, start=7)
    gs.wait()
    np.testing.assert_array_equal(gs.thresholds(), 0.5 * np.minimum(4e-3, gs.history[-1]["stat"]))


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


@pytest.mark.parametrize("path", DECISION_PATHS)
def test_a_call_without_a_new_optimizer_step_is_ignored(path):
    """gs.step() once per micro-batch (or twice by mistake) with a FrozenAwareAdamW: the calls
    that see no new optimizer step count nothing (one warning), so decisions equal a run that
    calls it once per step."""
    runs = []
    for repeat in (1, 3):
        m = Toy()
        opt = grades.FrozenAwareAdamW(m.parameters(), lr=1e-2)
        gs = GradES(m, opt, GradESConfig(tau=0.05, grace_steps=2, patience=1), rule=rule_for(path))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            for s in range(8):
                x, y = data(s)
                ((m(x) - y) ** 2).mean().backward()
                opt.step()
                for _ in range(repeat):
                    gs.step()
                opt.zero_grad(set_to_none=True)
        assert sum("has not stepped since the last call" in str(r.message) for r in rec) == (repeat > 1)
        assert gs.step_count == 8
        runs.append(gs.state_dict())
    assert json.dumps(runs[0], sort_keys=True, default=str) == json.dumps(runs[1], sort_keys=True, default=str)


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
    """Learning rate 0: the statistics only carry batch noise, so every freeze is false. With a
    threshold of 0.8 times the level, the raw rule without patience freezes all 8 matrices within
    91 decision steps; the default EMA and patience freeze none, at that threshold or the default."""
    def run(**kw):
        m = Toy()
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        gs = GradES(m, opt, GradESConfig(total_steps=140, stop_ratio=None, **kw))  # grace 49
        train(m, opt, gs, 140)
        return gs.history_dict()["freeze_steps"]
    assert GradESConfig().ema == grades.policy.DEFAULT_EMA and GradESConfig().patience == grades.policy.DEFAULT_PATIENCE
    assert run() == {} and run(rel_tau=0.8) == {}
    assert len(run(ema=None, patience=0, rel_tau=0.8)) == 8


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
                                     stop_ratio=None), rule="torch")  # the device path, with host copies
    for slot in gs._copies.slots:
        slot.event = FakeEvent(lambda n: n >= 5)           # lands right after the next step's poll
    train(m, opt, gs, 20)
    assert len({id(s) for s in gs._copies.pending}) == len(gs._copies.pending)
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
                                     stop_ratio=None), rule="torch")
    for slot in gs._copies.slots:
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

    from grades.policy.sharding import dtensor_group as _dtensor_group

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


# ---------------------------------------------------------------- state loading, rejected input, odd readings


def _trained(optim="torch", steps=4, cfg=None, path=None):
    m = Toy(seed=5)
    opt = (grades.FrozenAwareAdamW if optim == "frozen_aware" else torch.optim.AdamW)(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, cfg or GradESConfig(tau=1e9, grace_steps=2, patience=1, stop_ratio=None),
                rule=None if path is None else rule_for(path))
    train(m, opt, gs, steps)
    return m, opt, gs


def _set(sd, key, value):
    sd = json.loads(json.dumps(sd))
    if value is _DEL:
        del sd[key]
    else:
        sd[key] = value(sd[key]) if callable(value) else value
    return sd


_DEL = object()


@pytest.mark.parametrize("key, value", [
    ("thresh", lambda v: v[:-1]), ("thresh", [123.0]), ("counter", lambda v: v + [0]), ("ref_w", _DEL),
    ("component_names", _DEL), ("step", "abc"), ("step", -1), ("frozen", lambda v: ["x"] * len(v)),
    ("frozen", lambda v: [2] * len(v)), ("counter", lambda v: [0.5] * len(v)), ("ema", lambda v: [None] * len(v)),
    ("history", [{"step": 1}]), ("history", lambda v: v + [{"step": 9, "frozen": 0, "stat": [1.0]}]),
    ("invalid_steps", [1]), ("should_stop", "yes"), ("version", 7), ("ema", lambda v: [float("nan")] * len(v)),
])
@pytest.mark.parametrize("optim", ["torch", "frozen_aware"])
def test_load_state_dict_rejects_a_bad_state_and_changes_nothing(key, value, optim):
    """Every field is checked before anything is written: a ValueError naming the field, and the
    policy (state, freezes, requires_grad, optimizer mask) exactly as before."""
    m, opt, gs = _trained(optim)
    before = gs.state_dict()
    assert sum(before["frozen"]) == len(before["frozen"])
    bad = _set(before, "frozen", lambda v: [False] * len(v))   # would unfreeze, if anything were written
    bad["counter"] = [7] * len(bad["counter"])
    bad = _set(bad, key, value)
    with pytest.raises(ValueError, match=key if key != "component_names" else "different components"):
        gs.load_state_dict(bad)
    assert gs.state_dict() == before
    assert gs.frozen_fraction == 1.0 and all(not p.requires_grad for c in gs.components for p in c.params)
    if optim == "frozen_aware":
        assert bool(opt.frozen[[opt.param_index(c.params[0]) for c in gs.components]].all())
    with pytest.raises(TypeError, match="mapping"):
        gs.load_state_dict([("step", 1)])


def test_load_state_dict_restores_what_it_failed_to_write(monkeypatch):
    """An error while writing (after the checks) puts everything back."""
    m, opt, gs = _trained("frozen_aware")
    before = gs.state_dict()
    early = _set(before, "frozen", lambda v: [False] * len(v))

    apply = GradES._apply_state

    def boom(self, v):
        apply(self, v)                                  # everything written, then a failure
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(GradES, "_apply_state", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gs.load_state_dict(early)
    assert gs.state_dict() == before
    assert all(not p.requires_grad for c in gs.components for p in c.params)


@pytest.mark.parametrize("optim", ["torch", "frozen_aware"])
def test_load_state_dict_rolls_back_later_freezes_exactly(optim):
    """Loading an earlier state (with the model and optimizer states of that step) after later
    freezes gives requires_grad back, and training then repeats the first run bitwise. A
    FrozenAwareAdamW cannot unfreeze by itself: GradES warns until its own state dict is loaded."""
    import copy
    m = Toy(seed=5)
    extra = m.layers[0].self_attn.q_proj.weight
    extra.requires_grad_(False)          # frozen by the user, not by GradES: stays so
    comps = discover_components(m)
    opt = (grades.FrozenAwareAdamW if optim == "frozen_aware" else torch.optim.AdamW)(
        [p for p in m.parameters() if p is not extra], lr=1e-2)
    if optim == "frozen_aware":
        comps = [c for c in comps if c.params[0] is not extra]
    gs = GradES(m, opt, GradESConfig(rel_tau=0.9, grace_steps=3, patience=1, ema=None, stop_ratio=None),
                components=comps)
    train(m, opt, gs, 3)
    saved = (json.loads(json.dumps(gs.state_dict())), copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict()))
    train(m, opt, gs, 10, start=3)
    first = gs.state_dict()
    assert sum(first["frozen"]) >= 2
    m.load_state_dict(saved[1])
    if optim == "frozen_aware":
        with pytest.warns(RuntimeWarning, match="cannot unset"):
            gs.load_state_dict(saved[0])
        opt.load_state_dict(copy.deepcopy(saved[2]))    # as the Trainer does on resume
        assert not bool(opt.frozen.any())
    else:
        gs.load_state_dict(saved[0])
        opt.load_state_dict(copy.deepcopy(saved[2]))
    assert gs.frozen_components == [] and not extra.requires_grad
    assert all(p.requires_grad for c in gs.components for p in c.params if p is not extra)
    assert all(not hasattr(p, "_grades_requires_grad") for p in m.parameters())
    assert gs.history_dict()["freeze_steps"] == {}
    train(m, opt, gs, 10, start=3)
    assert gs.state_dict() == first


@pytest.mark.parametrize("path", DECISION_PATHS)
def test_add_param_group_after_grades_is_followed(path):
    """Parameters added to a FrozenAwareAdamW after GradES was built: the steps go on counting
    and deciding (the new rows are not tracked); a changed list otherwise is refused uncounted."""
    m = Toy(seed=5)
    rest = [p for n, p in m.named_parameters() if "proj" not in n]
    opt = grades.FrozenAwareAdamW([p for n, p in m.named_parameters() if "proj" in n], lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1e9, grace_steps=3, patience=1, stop_ratio=None), rule=rule_for(path))
    train(m, opt, gs, 2)
    opt.add_param_group({"params": rest, "lr": 1e-3})
    train(m, opt, gs, 2, start=2)
    assert gs.step_count == 4 and gs.frozen_fraction == 1.0 and gs.history_dict()["freeze_steps"]
    assert bool(opt.frozen[[opt.param_index(c.params[0]) for c in gs.components]].all())
    assert not bool(opt.frozen[[opt.param_index(p) for p in rest]].any())
    opt.param_list.pop()                               # a shrunk list: refused, not counted
    with pytest.raises(ValueError, match="parameter list changed after GradES was built"):
        gs.step()
    assert gs.step_count == 4


def test_numpy_config_values_become_plain_python():
    cfg = GradESConfig(rel_tau={"attention": np.float32(0.5), "default": np.float64(0.4)}, alpha=np.float64(0.3),
                       total_steps=np.int64(10), patience=np.int64(2), check_interval=np.int32(2),
                       ema=np.float64(0.5), max_frozen_ratio=np.float64(1.0), history_max=np.int64(100))
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert type(cfg.patience) is int and type(cfg.alpha) is float and type(cfg.rel_tau["attention"]) is float
    cfg2 = GradESConfig(tau=np.float64(2.0), grace_steps=np.int64(1))
    assert type(cfg2.tau) is float and type(cfg2.grace_steps) is int
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, cfg)
    train(m, opt, gs, 3)
    json.dumps(gs.state_dict())
    json.dumps(gs.history_dict())


@pytest.mark.parametrize("total", [1, 2, 3])
def test_short_runs_get_a_grace_step(total):
    """alpha > 0 with a run shorter than 1 / alpha: one grace step, not zero (which the automatic
    threshold cannot work with)."""
    assert GradESConfig(total_steps=total).grace() == 1
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(total_steps=total))
    assert gs.grace == 1
    train(m, opt, gs, total)
    assert GradESConfig(alpha=0.0, tau=1.0).grace(3) == 0


@pytest.mark.parametrize("path", DECISION_PATHS)
@pytest.mark.parametrize("optim", ["torch", "frozen_aware"])
def test_a_rejected_step_changes_nothing(path, optim):
    """Bad arguments give the same TypeError/ValueError on every path, before anything counts."""
    m = Toy(seed=5)
    opt = (grades.FrozenAwareAdamW if optim == "frozen_aware" else torch.optim.AdamW)(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1.0, grace_steps=3), rule=rule_for(path))
    train(m, opt, gs, 1)
    x, y = data(1)
    ((m(x) - y) ** 2).mean().backward()
    opt.step()
    before = gs.state_dict()
    cases = [(dict(clip_coef="abc"), TypeError, "clip_coef"), (dict(clip_coef=[0.5]), TypeError, "clip_coef"),
             (dict(clip_coef=torch.tensor([0.5, 0.5])), ValueError, "clip_coef"),
             (dict(clip_coef=torch.tensor(True)), TypeError, "clip_coef"),
             (dict(total_norm=torch.tensor([1.0, 2.0]), max_norm=1.0), ValueError, "total_norm"),
             (dict(total_norm="1", max_norm=1.0), TypeError, "total_norm"),
             (dict(total_norm=1.0, max_norm=0.0), ValueError, "max_norm"),
             (dict(clip_coef=0.5, total_norm=1.0, max_norm=1.0), ValueError, "not both")]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            gs.step(**kw)
        assert gs.step_count == 1, kw
    assert gs.state_dict() == before
    gs.step(clip_coef=np.float64(0.5))
    opt.step()  # one counted gs.step() per optimizer step (with a FrozenAwareAdamW a repeat is ignored)
    gs.step(total_norm=torch.tensor([2.0]), max_norm=np.float32(1.0))  # one element is fine
    assert gs.step_count == 3


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("path", DECISION_PATHS)
def test_a_source_error_counts_no_step(path):
    """A statistics source that names a problem (here a complex gradient) leaves the count alone."""
    m = Toy(seed=5).to(torch.complex64)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=1.0, grace_steps=3), rule=rule_for(path))
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="complex64"):
        gs.step()
    assert gs.step_count == 0


@pytest.mark.parametrize("path", DECISION_PATHS)
@pytest.mark.parametrize("statistic", ["l1", "l2"])
def test_an_overflowing_sum_is_an_invalid_reading(path, statistic):
    """A finite gradient entry of 2e19 squares to more than float32 holds: sum g^2 = inf. That
    reading does not count (like a non-finite gradient), so it neither poisons the EMA nor the
    automatic threshold measured in the grace period."""
    def run(spike):
        m = Toy(seed=5)
        gs = GradES(m, None, GradESConfig(grace_steps=3, patience=1, statistic=statistic, stop_ratio=None), rule=rule_for(path))
        for s in range(6):
            x, y = data(s)
            ((m(x) - y) ** 2).mean().backward()
            if s == 1 and spike:
                m.layers[0].self_attn.q_proj.weight.grad[0, 0] = 2e19
            if s == 1 and not spike:
                m.layers[0].self_attn.q_proj.weight.grad[0, 0] = float("nan")
            gs.step()
            m.zero_grad(set_to_none=True)
        return gs.state_dict()
    spiked, nan = run(True), run(False)
    assert spiked["invalid_steps"] == 1
    assert spiked == nan


def test_nan_total_norm_marks_the_step_invalid_in_both_formulas():
    """clip_coefficient of a NaN norm: NaN from the host formula as from the tensor formula a
    GPU norm takes (run here on a CPU tensor), and the two agree on other norms."""
    from grades.policy.clip import _clip_coefficient_float, _clip_coefficient_tensor, clip_coefficient
    nan = float("nan")
    assert np.isnan(clip_coefficient(nan, 1.0)) and np.isnan(clip_coefficient(torch.tensor(nan), 1.0))
    for norm in (nan, float("inf"), 0.0, 0.5, 1.0, 7.5, 1e30):
        host = _clip_coefficient_float(norm, 1.0)
        dev = float(_clip_coefficient_tensor(torch.tensor(norm, dtype=torch.float64), 1.0))
        assert host == dev or (np.isnan(host) and np.isnan(dev)), norm
    for path in DECISION_PATHS:
        for kw in (dict(total_norm=torch.tensor(nan), max_norm=1.0), dict(total_norm=nan, max_norm=1.0),
                   dict(clip_coef=_clip_coefficient_tensor(torch.tensor(nan), 1.0))):
            m = Toy()
            gs = GradES(m, None, GradESConfig(tau=1e9, grace_steps=0, patience=1, ema=None), rule=rule_for(path))
            x, y = data(0)
            ((m(x) - y) ** 2).mean().backward()
            gs.step(**kw)
            assert gs.state_dict()["invalid_steps"] == 1 and gs.frozen_fraction == 0.0, (path, kw)


def test_fast_forward_only_on_a_fresh_policy():
    m, opt, gs = _trained(steps=2)
    with pytest.raises(ValueError, match="already counted 2 steps"):
        gs.fast_forward(5)
    gs2 = GradES(m, opt, GradESConfig(rel_tau=0.5, grace_steps=3))
    with pytest.raises(ValueError, match="non-negative integer"):
        gs2.fast_forward(True)
    gs2.fast_forward(5)
    assert gs2.step_count == 5 and gs2.grace == 8


@pytest.mark.parametrize("path", DECISION_PATHS)
def test_grace_period_without_a_valid_reading_warns(path):
    """A matrix with no valid reading during the grace period has no automatic threshold (it can
    never freeze): the end of the grace period says which."""
    m = Toy(seed=5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(grace_steps=2, patience=1), rule=rule_for(path))

    def hook(s):
        if s < 2:
            m.layers[1].mlp.up_proj.weight.grad = None
    with pytest.warns(RuntimeWarning, match=r"without a valid reading for 1 of 8 component\(s\) \(layers.1.mlp.up_proj\)"):
        train(m, opt, gs, 4, hook=hook)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2 = Toy(seed=5)
        opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
        gs2 = GradES(m2, opt2, GradESConfig(grace_steps=2, patience=1), rule=rule_for(path))
        train(m2, opt2, gs2, 4)


def test_loading_a_state_saved_under_another_config_warns():
    m = Toy()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    gs = GradES(m, opt, GradESConfig(tau=0.05, grace_steps=2, patience=2, statistic="l1"))
    train(m, opt, gs, 3)
    sd = json.loads(json.dumps(gs.state_dict()))  # as a checkpoint stores it
    same = GradES(m, opt, GradESConfig(tau=0.05, grace_steps=2, patience=2, statistic="l1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(sd)
    other = GradES(m, opt, GradESConfig(tau=0.1, grace_steps=2, patience=2, statistic="l2"))
    with pytest.warns(RuntimeWarning, match=r"statistic: 'l1' -> 'l2'; tau: 0.05 -> 0.1"):
        other.load_state_dict(sd)
    assert other.state_dict()["thresh"] == sd["thresh"]  # the saved state carries on
    del sd["config"]  # a state saved before configs travelled with it: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(sd)
