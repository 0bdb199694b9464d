"""GradES with torch.compile: a whole run with many freeze events costs at most two recompiles
beyond the first compile (freezes committed in waves), never falls back to eager, and takes the
decisions and reaches the parameters of an eager run."""
import pytest
import torch

from dist_util import LR, Net, batch

STEPS = 24
#: settings under which the 12 matrices of Net(blocks=4) freeze at three or more different steps
CFG = dict(rel_tau=0.7, ema=0.5, grace_steps=3, patience=2, stop_ratio=None)
MAX_NORM = 0.5


class CountingBackend:
    """aot_eager, counting compiles and calls of the compiled graphs."""

    def __init__(self):
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        inner = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return inner(*args)
        return run


def train(model, clip, opt_kind="frozenaware"):
    from grades import FrozenAwareAdamW, GradES, GradESConfig
    opt = (FrozenAwareAdamW if opt_kind == "frozenaware" else torch.optim.AdamW)(model.parameters(), lr=LR)
    gs = GradES(model, opt, GradESConfig(**CFG))
    snaps = {}
    for s in range(STEPS):
        x, y = batch(s, None, 1)
        ((model(x) - y) ** 2).mean().backward()
        if clip:
            total = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], MAX_NORM)
        opt.step()
        gs.step(total_norm=total, max_norm=MAX_NORM) if clip else gs.step()
        opt.zero_grad()
        for e in gs.freeze_events:
            c = next(c for c in gs.components if c.name == e["component"])
            snaps.setdefault(c.name.replace("_orig_mod.", ""), [p.detach().clone() for p in c.params])
    gs.wait()
    return gs, snaps


@pytest.mark.parametrize("clip,opt_kind", [(False, "frozenaware"), (True, "torch")])
def test_compiled_run_recompiles_at_most_twice(clip, opt_kind):
    torch._dynamo.reset()
    eager = Net(blocks=4)
    ref, _ = train(eager, clip, opt_kind)
    backend = CountingBackend()
    net = Net(blocks=4)
    compiled = torch.compile(net, backend=backend)
    gs, snaps = train(compiled, clip, opt_kind)
    fsteps = gs.state_dict()["freeze_step"]
    assert fsteps == ref.state_dict()["freeze_step"]
    assert len({f for f in fsteps if f >= 0}) >= 3, "the run should freeze at several different steps"
    waves = gs.autograd_gate
    assert waves.flips >= 1                         # requires_grad did flip (GEMMs removed)
    assert backend.compiles <= 1 + 2 and backend.compiles == 1 + waves.flips
    assert backend.calls == STEPS                   # every forward ran compiled: no eager fallback
    for a, b in zip(net.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    named = dict(net.named_parameters())
    for name, before in snaps.items():             # frozen: bitwise unchanged since the freeze
        assert torch.equal(named[name + ".weight"], before[0])


def test_waves_are_checked():
    from grades import GradES, GradESConfig
    from grades.integrations.compile import attach_compile
    gs = GradES(Net(), None, GradESConfig(**CFG))
    with pytest.raises(ValueError, match="increasing"):
        attach_compile(gs, (0.9, 0.5))
    attach_compile(gs, (0.5,))
    with pytest.raises(ValueError, match="already"):
        attach_compile(gs)


def test_without_waves_each_freeze_event_recompiles():
    """What the waves avoid: GradES of the uncompiled module flips requires_grad at every event."""
    torch._dynamo.reset()
    from grades import FrozenAwareAdamW, GradES, GradESConfig
    backend = CountingBackend()
    net = Net(blocks=4)
    compiled = torch.compile(net, backend=backend)
    opt = FrozenAwareAdamW(net.parameters(), lr=LR)
    gs = GradES(net, opt, GradESConfig(**CFG))
    assert gs.autograd_gate is None
    for s in range(STEPS):
        x, y = batch(s, None, 1)
        ((compiled(x) - y) ** 2).mean().backward()
        opt.step()
        gs.step()
        opt.zero_grad()
    events = len({e["step"] for e in gs.freeze_events if e["step"] < STEPS})
    assert events >= 3 and backend.compiles == 1 + events
