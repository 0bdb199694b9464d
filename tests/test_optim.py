"""FrozenAwareAdamW against torch.optim.AdamW: trajectories, state dicts, freezing, non-finite
gradients, GradScaler, host-sync freedom and input validation (CPU)."""
import copy
import functools

import pytest
import torch

from conftest import available_backends
from grades import FrozenAwareAdamW
from grades.optim import NonFiniteGradientError

transformers = pytest.importorskip("transformers")

pytestmark = [pytest.mark.filterwarnings("ignore:grades. native backend:RuntimeWarning"),
              pytest.mark.usefixtures("one_thread")]

VOCAB, SEQ, BATCH = 64, 8, 2


def tiny_llama(seed=0, hidden=32, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def loss_of(model, ids):
    return model(input_ids=ids, labels=ids).loss


def groups_of(model, hp):
    """Three param groups: attention, MLP, the rest (embeddings, norms, head)."""
    attn, mlp, rest = [], [], []
    for n, p in model.named_parameters():
        (attn if "self_attn" in n else mlp if ".mlp." in n else rest).append(p)
    return [dict(params=attn, **hp[0]), dict(params=mlp, **hp[1]), dict(params=rest)]


def rel_diff(a_model, b_model):
    worst = 0.0
    for (n, a), b in zip(a_model.named_parameters(), b_model.parameters()):
        d = (a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max().clamp_min(1e-30)
        worst = max(worst, float(d))
    return worst


def train(model, opt, data, *, accum=1, sched=None, before_step=None):
    for i in range(0, len(data), accum):
        opt.zero_grad(set_to_none=True)
        for ids in data[i:i + accum]:
            (loss_of(model, ids) / accum).backward()
        if before_step is not None:
            before_step(model, i // accum)
        opt.step()
        if sched is not None:
            sched.step()


HPARAMS = [
    dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
         groups=[dict(lr=5e-3, betas=(0.8, 0.99), weight_decay=0.1), dict(eps=1e-6, weight_decay=0.0)]),
    dict(lr=1e-3, betas=(0.95, 0.98), eps=1e-6, weight_decay=0.05,
         groups=[dict(lr=2e-3), dict(betas=(0.5, 0.9), eps=1e-4, weight_decay=0.2)]),
]


def train_pair(a, oa, b, ob, data, *, accum=1, scheds=(), before_step_b=None, scalers=None, on_step=None):
    """Train ``a`` with ``oa``; ``ob`` steps ``b`` with copies of exactly the same gradients.

    Both optimizers see one gradient stream, so what is compared is the optimizer alone.
    Free-running runs amplify last-bit differences through the model: torch's own fused and
    for-loop AdamW drift apart by ~1e-6 after two steps on this model, ~1e-3 after 100.
    """
    for i in range(0, len(data), accum):
        oa.zero_grad(set_to_none=True)
        ob.zero_grad(set_to_none=True)
        for ids in data[i:i + accum]:
            loss = loss_of(a, ids) / accum
            if scalers:
                scalers[1].scale(loss.detach())  # b's scaler sees the same (scaled) gradients
            (scalers[0].scale(loss) if scalers else loss).backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        if before_step_b is not None:
            before_step_b(b, i // accum)
        if on_step is not None:
            on_step(a, oa, i // accum)
        if scalers:
            for sc, o in zip(scalers, (oa, ob)):
                sc.step(o)
                sc.update()
        else:
            oa.step()
            ob.step()
        for s in scheds:
            s.step()


_STREAMS = {}


def torch_stream(hp):
    """torch.optim.AdamW on the tiny Llama (3 groups, cosine schedule, accumulation for hp 0):
    the initial weights, the gradients of every step, the final weights and state. Cached."""
    if hp not in _STREAMS:
        cfg = HPARAMS[hp]
        kw = {k: cfg[k] for k in ("lr", "betas", "eps", "weight_decay")}
        model = tiny_llama()
        init = copy.deepcopy(model.state_dict())
        opt = torch.optim.AdamW(groups_of(model, cfg["groups"]), **kw)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-4)
        accum = 2 if hp == 0 else 1
        data = batches(100 * accum)
        grads = []
        for i in range(0, len(data), accum):
            opt.zero_grad()
            for ids in data[i:i + accum]:
                (loss_of(model, ids) / accum).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            sched.step()
        _STREAMS[hp] = (init, grads, model, opt)
    return _STREAMS[hp]


@pytest.mark.parametrize("backend", available_backends("cpu", "list"))
@pytest.mark.parametrize("hp", range(len(HPARAMS)))
def test_trajectory_matches_torch_adamw(backend, hp):
    """100 steps, 3 param groups with their own lr/betas/eps/weight decay, a cosine LR schedule
    and (hp 0) gradient accumulation: weights within 1e-6 (relative) of torch.optim.AdamW."""
    cfg = HPARAMS[hp]
    kw = {k: cfg[k] for k in ("lr", "betas", "eps", "weight_decay")}
    init, grads, ref_model, ref_opt = torch_stream(hp)
    a = tiny_llama()
    a.load_state_dict(init)
    oa = FrozenAwareAdamW(groups_of(a, cfg["groups"]), backend=backend, **kw)
    sa = torch.optim.lr_scheduler.CosineAnnealingLR(oa, T_max=100, eta_min=1e-4)
    for step_grads in grads:
        oa.zero_grad()
        for p, g in zip(a.parameters(), step_grads):
            p.grad = g.clone()
        oa.step()
        sa.step()
    assert rel_diff(a, ref_model) <= 1e-6
    for p, q in zip(a.parameters(), ref_model.parameters()):
        torch.testing.assert_close(oa.state[p]["exp_avg"], ref_opt.state[q]["exp_avg"], rtol=1e-5, atol=1e-9)
        assert float(oa.state[p]["step"]) == float(ref_opt.state[q]["step"]) == 100.0
        assert oa.state[p]["exp_avg"].dtype == torch.float32
    assert oa.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert int(oa.skipped_steps) == 0 and int(oa.nonfinite_count) == 0
    # the statistics are those of the last applied gradients
    for i, p in enumerate(oa.param_list):
        g = p.grad.double()
        torch.testing.assert_close(oa.last_grad_stats[i, 0], (g * g).sum(), rtol=1e-5, atol=0)
        torch.testing.assert_close(oa.last_grad_stats[i, 1], g.abs().sum(), rtol=1e-5, atol=0)


def test_tensor_lr_and_params_without_grad():
    a, b = tiny_llama(), tiny_llama()
    oa = FrozenAwareAdamW(a.parameters(), lr=torch.tensor(2e-3))
    ob = torch.optim.AdamW(b.parameters(), lr=torch.tensor(2e-3))
    skip = {"model.layers.1.mlp.up_proj.weight", "lm_head.weight"}

    def drop(model, opt, step):  # some params have no grad on even steps: torch skips them, so must we
        if step % 2 == 0:
            for m in (a, b):
                for n, p in m.named_parameters():
                    if n in skip:
                        p.grad = None

    train_pair(a, oa, b, ob, batches(20), on_step=drop)
    assert rel_diff(a, b) <= 1e-6
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert float(oa.state[p]["step"]) == float(ob.state[q]["step"]) == (10.0 if n in skip else 20.0)
        if n in skip:
            assert float(oa.last_grad_stats[oa.param_index(p)].abs().sum()) > 0  # odd last step: had grads


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip_with_torch(direction):
    a, b = tiny_llama(), tiny_llama()
    fused_torch = functools.partial(torch.optim.AdamW, fused=True)  # any torch variant's state loads
    first = (fused_torch if direction == "torch_to_ours" else FrozenAwareAdamW)
    second = (FrozenAwareAdamW if direction == "torch_to_ours" else torch.optim.AdamW)
    o1 = first(groups_of(a, HPARAMS[0]["groups"]), lr=2e-3)
    data = batches(16)
    train(a, o1, data[:6])
    b.load_state_dict(a.state_dict())
    o2 = second(groups_of(b, HPARAMS[0]["groups"]), lr=2e-3)
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(o1.state[p]["exp_avg"], o2.state[q]["exp_avg"])
        assert float(o1.state[p]["step"]) == float(o2.state[q]["step"]) == 6.0
    train_pair(a, o1, b, o2, data[6:])
    assert rel_diff(a, b) <= 1e-6
    # and back again into a fresh FrozenAwareAdamW
    o3 = FrozenAwareAdamW(groups_of(b, HPARAMS[0]["groups"]), lr=2e-3)
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    assert float(o3.state[next(b.parameters())]["step"]) == 16.0


def test_freeze_mid_run_matches_torch_on_unfrozen():
    a, b = tiny_llama(), tiny_llama()
    oa = FrozenAwareAdamW(a.parameters(), lr=3e-3)
    ob = torch.optim.AdamW(b.parameters(), lr=3e-3)
    data = batches(20)
    train_pair(a, oa, b, ob, data[:8])
    names = [n for n, _ in a.named_parameters()]
    by_mask = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    by_list = {"model.layers.0.mlp.gate_proj.weight"}
    mask = torch.tensor([n in by_mask for n in names])
    oa.freeze_mask_(mask)
    oa.freeze([p for n, p in a.named_parameters() if n in by_list])
    frozen = by_mask | by_list
    assert oa.frozen.tolist() == [n in frozen for n in names]
    snap = {n: (p.detach().clone(), oa.state[p]["exp_avg"].clone(), oa.state[p]["exp_avg_sq"].clone(),
                oa.state[p]["step"].clone()) for n, p in a.named_parameters() if n in frozen}

    def no_grad_for_frozen(model, step):  # torch reference: frozen params get no update at all
        for n, p in model.named_parameters():
            if n in frozen:
                p.grad = None

    train_pair(a, oa, b, ob, data[8:], before_step_b=no_grad_for_frozen)
    for n, p in a.named_parameters():
        if n in frozen:
            w, m, v, s = snap[n]
            assert torch.equal(p, w) and torch.equal(oa.state[p]["exp_avg"], m)
            assert torch.equal(oa.state[p]["exp_avg_sq"], v) and torch.equal(oa.state[p]["step"], s)
            assert torch.all(oa.last_grad_stats[oa.param_index(p)] == 0)
    assert rel_diff(a, b) <= 1e-6
    # the frozen mask survives a state-dict round trip
    oc = FrozenAwareAdamW(a.parameters(), lr=3e-3)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert torch.equal(oc.frozen, oa.frozen)


def test_release_frozen_state_frees_moments():
    model = tiny_llama()
    opt = FrozenAwareAdamW(model.parameters(), release_frozen_state=True)
    data = batches(6)
    train(model, opt, data[:3])
    params = dict(model.named_parameters())
    p1, p2 = params["model.layers.0.mlp.up_proj.weight"], params["model.layers.1.self_attn.v_proj.weight"]
    opt.freeze([p1])  # host knows at once
    assert "exp_avg" not in opt.state[p1] and opt.released_bytes == 2 * 4 * p1.numel()
    mask = torch.zeros(opt.num_params, dtype=torch.bool)
    mask[opt.param_index(p2)] = True
    opt.freeze_mask_(mask)  # device decision: the host has not learned it yet
    assert "exp_avg" in opt.state[p2]
    host_copy = opt.frozen.to("cpu", non_blocking=True)
    assert opt.sync_frozen_state(host_copy) == 1
    assert opt.released_bytes == 2 * 4 * (p1.numel() + p2.numel())
    w1, w2 = p1.detach().clone(), p2.detach().clone()
    train(model, opt, data[3:])
    assert torch.equal(p1, w1) and torch.equal(p2, w2)
    other = FrozenAwareAdamW(model.parameters())
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert bool(other.frozen[opt.param_index(p1)]) and "exp_avg" not in other.state[p1]
    train(model, other, data[:1])


@pytest.mark.parametrize("master_weights", [False, True])
def test_step_makes_no_host_sync(monkeypatch, master_weights):
    # The reference backend is written to run on any device without syncing, so it stands in for a
    # GPU backend here (the native CPU backend may read CPU scalars on the host, which is no sync).
    model = tiny_llama(dtype=torch.bfloat16 if master_weights else torch.float32)
    opt = FrozenAwareAdamW(model.parameters(), lr=torch.tensor(1e-3), nonfinite="skip", backend="reference",
                           master_weights=master_weights)
    data = batches(4)
    train(model, opt, data[:1])  # lazy state initialisation happens outside the guarded steps
    mask = torch.zeros(opt.num_params, dtype=torch.bool)
    mask[3] = True

    def boom(*a, **k):
        raise AssertionError("host sync during step()")

    guarded = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__", "__index__")
    for i, ids in enumerate(data[1:]):
        opt.zero_grad()
        loss_of(model, ids).backward()
        if i == 1:
            model.lm_head.weight.grad = None  # a group with a gap takes the indexed path
        if i == 2:
            opt.freeze_mask_(mask)
            opt.sync_frozen_state(mask.numpy())  # the host learns it: plans are rebuilt in step()
        with monkeypatch.context() as m:
            for name in guarded:
                m.setattr(torch.Tensor, name, boom)
            opt.step()
    assert int(opt.skipped_steps) == 0


def test_last_participation():
    ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(4)]
    opt = FrozenAwareAdamW([{"params": ps[:2]}, {"params": ps[2:]}])
    assert opt.last_participation.tolist() == [False] * 4  # no step yet
    for p in ps:
        p.grad = torch.ones(5)
    opt.step()
    assert opt.last_participation.tolist() == [True] * 4
    ps[1].grad = None
    opt.freeze(ps[3])
    opt.step()
    assert opt.last_participation.tolist() == [True, False, True, False]
    assert opt.last_grad_stats[[1, 3]].eq(0).all() and opt.last_grad_stats[[0, 2], 0].eq(5).all()


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for p in model.parameters() for k, v in ((f"{id(p)}{k}", v) for k, v in opt.state[p].items())})


def _assert_same(s1, s2):
    for x, y in zip(s1[0], s2[0]):
        assert torch.equal(x, y)
    assert s1[1].keys() == s2[1].keys()
    for k in s1[1]:
        assert torch.equal(s1[1][k], s2[1][k])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_leaves_state_bitwise_unchanged(bad):
    model = tiny_llama()
    opt = FrozenAwareAdamW(model.parameters(), nonfinite="skip")
    data = batches(4)
    train(model, opt, data[:2])
    before = _snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    g = model.model.layers[1].self_attn.k_proj.weight.grad
    g.view(-1)[[3, 7, 11]] = bad
    opt.step()
    _assert_same(before, _snapshot(model, opt))
    assert int(opt.skipped_steps) == 1 and int(opt.nonfinite_count) == 3 and bool(opt.last_step_skipped)
    k = opt.param_index(model.model.layers[1].self_attn.k_proj.weight)
    assert float(opt.last_grad_stats[k, 2]) == 3
    assert torch.isnan(opt.last_grad_stats[:, :2]).all()  # no freeze can follow from these
    # a non-finite gradient in a frozen parameter is not read, so it does not skip the step
    opt.freeze([model.model.layers[1].self_attn.k_proj.weight])
    opt.step()
    assert int(opt.skipped_steps) == 1 and int(opt.nonfinite_count) == 0 and not bool(opt.last_step_skipped)


def test_total_norm_replaces_the_detection_pass():
    """use_total_norm(): a finite norm gives exactly the detected step, in one pass (no
    detection call); a non-finite one skips the step with the state bitwise unchanged; it
    applies to one step only; bad values are refused."""
    a, b = tiny_llama(), tiny_llama()
    oa = FrozenAwareAdamW(a.parameters(), lr=2e-3, nonfinite="skip")
    ob = FrozenAwareAdamW(b.parameters(), lr=2e-3, nonfinite="skip")
    data = batches(4)
    calls = []

    def counted_step(opt):  # counts the detection passes (statistics-only calls) of one step
        cls = type(next(iter(opt._plans.values())).backend) if opt._plans else None
        orig = cls.grad_stats_list if cls else None
        if cls:
            cls.grad_stats_list = lambda self, *x: (calls.append(1), orig(self, *x))[1]
        try:
            opt.step()
        finally:
            if cls:
                cls.grad_stats_list = orig

    for i, ids in enumerate(data):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad(set_to_none=True)
            loss_of(m, ids).backward()
        norm = torch.nn.utils.clip_grad_norm_(b.parameters(), float("inf"))
        ob.use_total_norm(norm if i % 2 else float(norm))
        oa.step()
        counted_step(ob)
    assert calls == []  # no detection pass
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(oa.last_grad_stats, ob.last_grad_stats)
    before = _snapshot(b, ob)
    for bad in (float("inf"), torch.tensor(float("nan"))):
        ob.use_total_norm(bad)
        ob.step()
        _assert_same(before, _snapshot(b, ob))
        assert bool(ob.last_step_skipped) and torch.isnan(ob.last_grad_stats[:, :2]).all()
    assert int(ob.skipped_steps) == 2
    counted_step(ob)  # no norm given: detection runs, the (finite) step applies
    assert calls == [1] and not bool(ob.last_step_skipped) and int(ob.skipped_steps) == 2
    with pytest.raises(ValueError, match="single number"):
        ob.use_total_norm(torch.ones(2))
    with pytest.raises(TypeError, match="number or a 0-dim tensor"):
        ob.use_total_norm("1.0")


@pytest.mark.parametrize("how", ["none", "norm"])
def test_nonfinite_auto_default_is_one_pass_and_torch_like(how):
    """The default nonfinite="auto": no detection pass; without a scaler or a norm a NaN
    gradient is applied as torch.optim.AdamW applies it (and counted); a non-finite total norm
    handed in skips the step, state bitwise unchanged."""
    a, b = tiny_llama(), tiny_llama()
    oa, ob = FrozenAwareAdamW(a.parameters(), lr=2e-3), torch.optim.AdamW(b.parameters(), lr=2e-3)
    assert oa.nonfinite == "auto" and oa.uses_total_norm
    data = batches(3)
    train(a, oa, data[:2])
    train(b, ob, data[:2])
    before = _snapshot(a, oa)
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        loss_of(m, data[2]).backward()
        m.lm_head.weight.grad[0, 0] = float("nan")
    backend = type(next(iter(oa._plans.values())).backend)
    orig, calls = backend.grad_stats_list, []
    backend.grad_stats_list = lambda self, *x: (calls.append(1), orig(self, *x))[1]
    try:
        if how == "norm":
            oa.use_total_norm(torch.nn.utils.get_total_norm([p.grad for p in a.parameters()]))
        oa.step()
    finally:
        backend.grad_stats_list = orig
    assert calls == [] and int(oa.nonfinite_count) == 1
    if how == "norm":
        _assert_same(before, _snapshot(a, oa))
        assert bool(oa.last_step_skipped) and int(oa.skipped_steps) == 1
    else:
        ob.step()
        assert not bool(oa.last_step_skipped) and int(oa.skipped_steps) == 0
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, equal_nan=True)
        assert torch.isnan(a.lm_head.weight[0, 0])


def test_nonfinite_raise_and_ignore():
    model = tiny_llama()
    opt = FrozenAwareAdamW(model.parameters(), nonfinite="raise")
    data = batches(2)
    train(model, opt, data[:1])
    before = _snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, data[1]).backward()
    model.lm_head.weight.grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match="1 non-finite gradient element"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))
    ign = FrozenAwareAdamW(model.parameters(), nonfinite="ignore")
    ign.step()  # applied like torch would, but counted
    assert int(ign.nonfinite_count) == 1 and int(ign.skipped_steps) == 0
    assert torch.isnan(model.lm_head.weight[0, 0])


def test_grad_scaler_protocol_with_injected_inf():
    a, b = tiny_llama(), tiny_llama()
    oa = FrozenAwareAdamW(a.parameters(), lr=2e-3)
    ob = torch.optim.AdamW(b.parameters(), lr=2e-3)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    snaps = {}

    def inject(model, opt, step):
        if step == 3:
            for m in (a, b):
                m.model.layers[0].mlp.up_proj.weight.grad.view(-1)[5] = float("inf")
            snaps["before"] = _snapshot(a, oa)
        if step == 4:  # the step after the skipped one: nothing had changed
            _assert_same(snaps["before"], _snapshot(a, oa))
            snaps["checked"] = True

    train_pair(a, oa, b, ob, batches(8), scalers=(sa, sb), on_step=inject)
    assert snaps.get("checked")
    assert int(oa.skipped_steps) == 1
    assert sa.get_scale() == sb.get_scale() == 2.0 ** 9
    assert float(oa.state[a.lm_head.weight]["step"]) == float(ob.state[b.lm_head.weight]["step"]) == 7.0
    assert rel_diff(a, b) <= 1e-6
    assert not hasattr(oa, "found_inf")  # the scaler cleans up after itself


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_with_low_precision_params(dtype):
    """Scaling by a power of two is exact in bfloat16, so a scaled run equals an unscaled one
    bitwise; the step with an injected Inf is skipped and leaves params and state untouched."""
    a, b = tiny_llama(dtype=dtype), tiny_llama(dtype=dtype)
    oa, ob = FrozenAwareAdamW(a.parameters(), lr=2e-3), FrozenAwareAdamW(b.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    for step, ids in enumerate(batches(5)):
        for model, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            loss = loss_of(model, ids)
            (scaler.scale(loss) if model is a else loss).backward()
        if step == 2:
            a.model.layers[1].self_attn.q_proj.weight.grad.view(-1)[0] = float("inf")
            before = _snapshot(a, oa)
            scaler.step(oa)
            scaler.update()
            _assert_same(before, _snapshot(a, oa))
            for model, opt in ((a, oa), (b, ob)):  # b skips the same step so both stay in line
                opt.zero_grad()
            continue
        scaler.step(oa)
        scaler.update()
        ob.step()
        for x, y in zip(a.parameters(), b.parameters()):
            if dtype == torch.bfloat16:  # float32's exponent range: scaling loses nothing
                assert torch.equal(x, y)
            else:  # float16: unscaled gradients lose small values to subnormals (why scalers exist)
                torch.testing.assert_close(x, y, rtol=1e-2, atol=5e-3)
    assert int(oa.skipped_steps) == 1 and scaler.get_scale() == 2.0 ** 7
    assert all(oa.state[p]["exp_avg"].dtype == torch.float32 for p in a.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_fp32_moments(dtype):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32).to(dtype))
    q = torch.nn.Parameter(p.detach().float().clone())
    opt = FrozenAwareAdamW([p], lr=1e-2)
    ref = torch.optim.AdamW([q], lr=1e-2)
    for _ in range(3):
        g = torch.randn(64, 32)
        p.grad, q.grad = g.to(dtype), g.to(dtype).float()
        opt.step()
        ref.step()
        q.data.copy_(q.data.to(dtype).float())  # the fp32 reference sees the rounded weights too
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == dtype
    torch.testing.assert_close(p.float(), q.detach(), rtol=0, atol=float(torch.finfo(dtype).eps) * 4)
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"])


# ------------------------------------------------------------------ float32 master weights

@pytest.mark.parametrize("backend", available_backends("cpu", "list"))
def test_master_weights_track_fp32_adamw(backend):
    """bfloat16 params with master weights follow torch.optim.AdamW on float32 copies of the
    weights (fed the same gradients) to 1e-6, and each param is its master rounded. Without
    masters, the small updates of this learning rate are rounded away and the run drifts."""
    a = tiny_llama(dtype=torch.bfloat16)
    ref = tiny_llama(dtype=torch.bfloat16).float()  # the same bf16 weights, held in float32
    plain = tiny_llama(dtype=torch.bfloat16)
    hp = dict(lr=2e-4, betas=(0.9, 0.99), weight_decay=0.1)
    oa = FrozenAwareAdamW(groups_of(a, HPARAMS[0]["groups"]), master_weights=True, backend=backend, **hp)
    oref = torch.optim.AdamW(groups_of(ref, HPARAMS[0]["groups"]), **hp)
    oplain = FrozenAwareAdamW(groups_of(plain, HPARAMS[0]["groups"]), backend=backend, **hp)
    for ids in batches(12):
        for o in (oa, oref, oplain):
            o.zero_grad(set_to_none=True)
        loss_of(a, ids).backward()
        for p, q, r in zip(a.parameters(), ref.parameters(), plain.parameters()):
            q.grad, r.grad = p.grad.float(), p.grad.clone()
        for o in (oa, oref, oplain):
            o.step()
    worst_master = worst_plain = 0.0
    for p, q, r in zip(a.parameters(), ref.parameters(), plain.parameters()):
        master = oa.state[p]["master_param"]
        assert master.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16))
        scale = q.detach().abs().max()
        worst_master = max(worst_master, float((master - q.detach()).abs().max() / scale))
        worst_plain = max(worst_plain, float((r.detach().float() - q.detach()).abs().max() / scale))
    assert worst_master <= 1e-6
    assert worst_plain > 1000 * max(worst_master, 1e-9)  # what the masters are for


def test_master_weights_state_dict():
    """Masters travel in float32 under 'master_param'; a stale or missing master (a torch
    checkpoint, or a parameter changed since) is started from the parameter instead."""
    a = tiny_llama(dtype=torch.bfloat16)
    oa = FrozenAwareAdamW(a.parameters(), lr=1e-3, master_weights=True)
    data = batches(10)
    train(a, oa, data[:4])
    sd = copy.deepcopy(oa.state_dict())
    assert all(st["master_param"].dtype == torch.float32 for st in sd["state"].values())
    # ours -> ours: masters restored bitwise, identical continuation
    b = copy.deepcopy(a)
    ob = FrozenAwareAdamW(b.parameters(), lr=1e-3, master_weights=True)
    ob.load_state_dict(copy.deepcopy(sd))
    train_pair(a, oa, b, ob, data[4:7])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q) and torch.equal(oa.state[p]["master_param"], ob.state[q]["master_param"])
    # ours -> torch.optim.AdamW (trains on) -> ours: the carried-along master is stale and ignored
    c = copy.deepcopy(a)
    oc = torch.optim.AdamW(c.parameters(), lr=1e-3)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    train(c, oc, data[7:9])
    od = FrozenAwareAdamW(c.parameters(), lr=1e-3, master_weights=True)
    od.load_state_dict(copy.deepcopy(oc.state_dict()))
    for p in c.parameters():
        assert torch.equal(od.state[p]["master_param"], p.detach().float())
    # a float32 master whose parameter was edited after saving: the parameter wins, alone
    sd = copy.deepcopy(oa.state_dict())
    e = copy.deepcopy(a)
    edited = e.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        edited.add_(1.0)
    oe = FrozenAwareAdamW(e.parameters(), lr=1e-3, master_weights=True)
    oe.load_state_dict(sd)
    for i, p in enumerate(e.parameters()):
        want = p.detach().float() if p is edited else sd["state"][i]["master_param"]
        assert torch.equal(oe.state[p]["master_param"], want)
        assert p is edited or not torch.equal(want, p.detach().float())  # a master holds more than its param
    # without master_weights the optimizer keeps none
    of = FrozenAwareAdamW(copy.deepcopy(a).parameters(), lr=1e-3)
    of.load_state_dict(copy.deepcopy(oa.state_dict()))
    assert all("master_param" not in st for st in of.state.values())


def test_master_weights_freeze_skip_release_refresh():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = FrozenAwareAdamW(model.parameters(), lr=1e-3, master_weights=True, release_frozen_state=True,
                           nonfinite="skip")
    data = batches(8)
    train(model, opt, data[:2])
    params = dict(model.named_parameters())
    by_mask, by_host = params["model.layers.1.self_attn.v_proj.weight"], params["model.layers.0.mlp.up_proj.weight"]
    # a device-side freeze: param and master untouched by later steps
    mask = torch.zeros(opt.num_params, dtype=torch.bool)
    mask[opt.param_index(by_mask)] = True
    opt.freeze_mask_(mask)
    w, mw = by_mask.detach().clone(), opt.state[by_mask]["master_param"].clone()
    train(model, opt, data[2:4])
    assert torch.equal(by_mask, w) and torch.equal(opt.state[by_mask]["master_param"], mw)
    # a host-known freeze releases the master with the moments
    opt.freeze([by_host])
    assert "master_param" not in opt.state[by_host] and opt.released_bytes == 3 * 4 * by_host.numel()
    # a non-finite gradient skips the step: params, moments and masters bitwise unchanged
    before = _snapshot(model, opt)
    opt.zero_grad()
    loss_of(model, data[4]).backward()
    params["model.layers.1.mlp.down_proj.weight"].grad.view(-1)[5] = float("nan")
    opt.step()
    _assert_same(before, _snapshot(model, opt))
    assert int(opt.skipped_steps) == 1
    # edits outside the optimizer: refresh_master_weights() makes the masters follow them
    q = params["model.layers.0.self_attn.q_proj.weight"]
    with torch.no_grad():
        q.mul_(0.5)
    opt.refresh_master_weights()
    assert torch.equal(opt.state[q]["master_param"], q.detach().float())
    train(model, opt, data[5:6])
    assert torch.equal(q, opt.state[q]["master_param"].to(torch.bfloat16))
    with pytest.raises(TypeError, match="master_weights must be a bool"):
        FrozenAwareAdamW(model.parameters(), master_weights="yes")


def test_add_param_group_and_zero_grad():
    model = tiny_llama()
    ps = list(model.parameters())
    opt = FrozenAwareAdamW(ps[:5], lr=1e-3)
    assert opt.num_params == 5 and opt.frozen.shape == (5,)
    opt.freeze([ps[1]])
    opt.add_param_group({"params": ps[5:], "lr": 5e-4})
    assert opt.num_params == len(ps) and opt.last_grad_stats.shape == (len(ps), 3)
    assert opt.frozen.tolist() == [i == 1 for i in range(len(ps))]
    assert opt.param_index(ps[-1]) == len(ps) - 1 and opt.param_list == ps
    train(model, opt, batches(1))
    assert float(opt.state[ps[-1]]["step"]) == 1 and ps[1] not in opt.state
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)
    with pytest.raises(ValueError, match="not managed"):
        opt.param_index(torch.nn.Parameter(torch.zeros(1)))


def test_bad_inputs():
    p = torch.nn.Parameter(torch.zeros(3))
    cases = [
        (dict(lr=-1.0), ValueError, "Invalid learning rate"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, "1-element"),
        (dict(eps=-1e-8), ValueError, "Invalid epsilon"),
        (dict(betas=(1.0, 0.999)), ValueError, "index 0"),
        (dict(betas=(0.9, -0.1)), ValueError, "index 1"),
        (dict(weight_decay=-0.1), ValueError, "Invalid weight_decay"),
        (dict(amsgrad=1), TypeError, "amsgrad"),
        (dict(fused=True, foreach=True), RuntimeError, "cannot be `True` together"),
        (dict(lr=torch.tensor(1e-3), foreach=True), ValueError, "lr as a Tensor is not supported"),
        (dict(betas=(0.9, torch.tensor(0.99))), ValueError, "both floats or both Tensors"),
        (dict(foreach="yes"), TypeError, "foreach"),
        (dict(capturable=True), ValueError, "capturable"),
        (dict(differentiable=True), ValueError, "differentiable"),
        (dict(fused=1), TypeError, "fused"),
        (dict(nonfinite="zero"), ValueError, "nonfinite"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            FrozenAwareAdamW([p], **kw)
    for kw in (dict(fused=True), dict(fused=False), dict(foreach=True), dict(foreach=False)):
        FrozenAwareAdamW([p], **kw)  # implementation switches of torch's AdamW: accepted, no effect
    with pytest.raises(TypeError, match="floating-point or complex"):
        FrozenAwareAdamW([torch.zeros(3, dtype=torch.int32)])
    opt = FrozenAwareAdamW([p])
    with pytest.raises(ValueError, match="capturable"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "capturable": True})
    assert opt.num_params == 1 and len(opt.param_groups) == 1
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    before = p.detach().clone()
    p.grad_dtype = None  # lets torch accept a gradient of another dtype
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype float64"):
        opt.step()
    p.grad = torch.ones(3)
    p.grad.set_(torch.ones(4))  # a gradient whose shape no longer matches
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state[p]  # nothing happened
    with pytest.raises(TypeError, match="bool"):
        opt.freeze_mask_(torch.zeros(1))
    with pytest.raises(ValueError, match="shape"):
        opt.freeze_mask_(torch.zeros(2, dtype=torch.bool))
    capturable_sd = opt.state_dict()
    capturable_sd["param_groups"][0]["amsgrad"] = "yes"
    with pytest.raises(TypeError, match="amsgrad"):
        opt.load_state_dict(capturable_sd)


def test_tensors_without_plain_storage_are_refused(tmp_path):
    """Wrapper tensor subclasses (DTensor, FakeTensor, ...) have no storage of their own: as
    parameters, gradients or loaded moments they are refused with a TypeError that names them
    (the native kernels used to crash on them), and nothing changes."""
    import torch.distributed as dist
    from test_ops import Wrapped
    with pytest.raises(TypeError, match="got a Wrapped"):
        FrozenAwareAdamW([torch.nn.Parameter(Wrapped(torch.zeros(3)))])
    p = torch.nn.Parameter(torch.randn(3))
    opt = FrozenAwareAdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before, state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    p.grad = Wrapped(torch.ones(3))
    with pytest.raises(TypeError, match="gradient of parameter 0 is a Wrapped"):
        opt.step()
    sd = copy.deepcopy(state)
    sd["state"][0]["exp_avg"] = Wrapped(torch.zeros(3))
    with pytest.raises(TypeError, match="'exp_avg' is a Wrapped"):
        opt.load_state_dict(sd)
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], state["state"][0][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    # a real DTensor (an FSDP2 / tensor-parallel parameter), on a one-rank gloo group
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        # FSDP2's Shard(0) is taken (tests/test_fsdp.py); a tensor-parallel Shard(1) is refused, named
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(1)]))
        with pytest.raises(TypeError, match=r"placement Shard\(dim=1\)"):
            FrozenAwareAdamW([w])
        import grades
        with pytest.raises(TypeError, match=r"grads\[0\] is a DTensor.*to_local"):
            grades.grad_stats([distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])])
    finally:
        dist.destroy_process_group()


def test_step_bumps_versions_and_reads_neg_bit_gradients_like_torch():
    """A graph that saved a parameter refuses to backpropagate after step() (as after torch's
    AdamW); a gradient with the neg bit set (e.g. from .conj().imag) gives torch's update."""
    from test_ops import negbit
    w = torch.nn.Parameter(torch.randn(4))
    opt = FrozenAwareAdamW([w], lr=0.1)
    y = (w * w).sum()
    w.grad = torch.ones(4)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    ours, ref = FrozenAwareAdamW([a], lr=0.1, weight_decay=0.0), torch.optim.AdamW([b], lr=0.1, weight_decay=0.0)
    g = torch.tensor([1.0, -2.0, 3.0])
    a.grad, b.grad = negbit(g), g.clone()
    ours.step()
    ref.step()
    assert torch.equal(a.detach(), b.detach())
    with pytest.raises(ValueError, match="negative bit"):
        FrozenAwareAdamW([torch.nn.Parameter(negbit(torch.ones(3)))])


def test_resized_parameter_data_is_refused_before_anything_changes():
    """A parameter whose .data was replaced by a tensor of another size: a clear error, and no
    parameter, moment or step count changes (the second group used to be updated, and a backend
    error's rollback itself failed, leaving every step count one too high)."""
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(3)]
    opt = FrozenAwareAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.5}], lr=0.1)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in ps]
    ps[2].data = torch.randn(4)
    ps[2].grad = torch.ones(4)
    with pytest.raises(ValueError, match="parameter 2 has 4 elements but its optimizer state was made for 8"):
        opt.step()
    ps[2].data = values[2].clone()
    ps[2].grad = torch.ones(8)
    assert all(torch.equal(p.detach(), v) for p, v in zip(ps, values))
    for i, p in enumerate(ps):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], state["state"][i][k]), (i, k)
    # a backend that fails (after its own checks) takes back the step counts of its group
    plan = next(iter(opt._plans.values()))
    good = plan.backend

    class Failing:
        def __getattr__(self, name):
            return getattr(good, name)

        def adamw_list(self, *a, **k):
            raise RuntimeError("backend failure")
    plan.backend = Failing()
    with pytest.raises(RuntimeError, match="backend failure"):
        opt.step()
    plan.backend = good
    assert [float(opt.state[p]["step"]) for p in ps] == [1.0, 1.0, 1.0]


def _trained_pair(seed=0, **kw):
    """Two identical tiny models with identical optimizers, both after the same two steps."""
    pairs = []
    for _ in range(2):
        model = tiny_llama(seed)
        opt = FrozenAwareAdamW(groups_of(model, [dict(lr=1e-3), dict(weight_decay=0.1)]), **kw)
        train(model, opt, batches(2))
        pairs.append((model, opt))
    return pairs


def _same_training_state(a, b):
    """Two (model, optimizer) pairs hold bitwise the same params, state and extras."""
    (ma, oa), (mb, ob) = a, b
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa.detach(), pb.detach())
        sa, sb = oa.state[pa], ob.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    for k in ("frozen", "last_grad_stats", "skipped_steps"):
        assert torch.equal(getattr(oa, k), getattr(ob, k)), k
    assert [g["lr"] for g in oa.param_groups] == [g["lr"] for g in ob.param_groups]


def _bad_state_dicts(good, opt):
    n = opt.num_params
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).state_dict()
    cases = {}

    def case(name, exc, msg):
        def deco(edit):
            sd = copy.deepcopy(good)
            edit(sd)
            cases[name] = (sd, exc, msg)
        return deco

    @case("missing exp_avg (after an lr change in the same dict)", ValueError, "no 'exp_avg'")
    def _(sd):
        sd["param_groups"][0]["lr"] = 0.5
        del sd["state"][n - 1]["exp_avg"]

    @case("exp_avg of another shape, same size", ValueError, "parameter's shape")
    def _(sd):
        sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].reshape(-1)

    @case("non-finite step", ValueError, "step count")
    def _(sd):
        sd["state"][1]["step"] = torch.tensor(float("nan"))

    @case("negative lr", ValueError, "Invalid learning rate")
    def _(sd):
        sd["param_groups"][-1]["lr"] = -1.0

    @case("frozen mask of another length", ValueError, r"grades\['frozen'\]")
    def _(sd):
        sd["grades"]["frozen"] = torch.zeros(n + 1, dtype=torch.bool)

    @case("statistics of another shape", ValueError, r"grades\['last_grad_stats'\]")
    def _(sd):
        sd["grades"]["last_grad_stats"] = torch.zeros(n, 2, dtype=torch.float64)

    @case("released index out of range", ValueError, "released")
    def _(sd):
        sd["grades"]["released"] = [n]

    @case("different group sizes", ValueError, "doesn't match the size")
    def _(sd):
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]

    cases["an SGD state dict"] = (sgd, ValueError, "parameter groups|no 'betas'")
    return cases


def test_failed_load_state_dict_leaves_the_optimizer_as_it_was():
    """Every state dict that does not fit is refused before anything changes: training then goes
    on bitwise like a twin optimizer that never saw the failed loads."""
    (ma, oa), (mb, ob) = _trained_pair()
    good = copy.deepcopy(oa.state_dict())
    for name, (sd, exc, msg) in _bad_state_dicts(good, oa).items():
        with pytest.raises(exc, match=msg):
            oa.load_state_dict(sd)
        _same_training_state((ma, oa), (mb, ob))
    data = batches(3, seed=5)
    train(ma, oa, data)
    train(mb, ob, data)
    _same_training_state((ma, oa), (mb, ob))


def test_step_checks_every_group_before_changing_anything():
    (ma, oa), (mb, ob) = _trained_pair()
    data = batches(1, seed=7)
    for bad in (float("nan"), float("inf")):
        oa.param_groups[-1]["lr"] = bad  # the last group: earlier ones must not move either
        oa.zero_grad()
        loss_of(ma, data[0]).backward()
        with pytest.raises(ValueError, match="lr"):
            oa.step()
        oa.param_groups[-1]["lr"] = ob.param_groups[-1]["lr"]
        _same_training_state((ma, oa), (mb, ob))
    train(ma, oa, data)
    train(mb, ob, data)
    _same_training_state((ma, oa), (mb, ob))


def test_parameters_that_share_memory_are_refused():
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        dup = FrozenAwareAdamW([p, p])  # torch warns too; the duplicate is updated once
    p.grad = torch.ones(8)
    ref = FrozenAwareAdamW([torch.nn.Parameter(p.detach().clone())])
    ref.param_groups[0]["params"][0].grad = torch.ones(8)
    dup.step()
    ref.step()
    assert torch.equal(p.detach(), ref.param_groups[0]["params"][0].detach())
    assert dup.num_params == 2 and float(dup.state[p]["step"]) == 1.0
    base = torch.randn(12)
    a, b = torch.nn.Parameter(base[:8]), torch.nn.Parameter(base[4:])
    opt = FrozenAwareAdamW([a, b])
    a.grad, b.grad = torch.ones(8), torch.ones(8)
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(a.detach(), base[:8]) and not opt.state[a] and not opt.state[b]


def test_parameter_data_replaced_after_construction():
    p, q = torch.nn.Parameter(torch.randn(4, 6)), torch.nn.Parameter(torch.randn(5))
    opt = FrozenAwareAdamW([{"params": [q]}, {"params": [p]}])
    p.grad, q.grad = torch.ones(4, 6), torch.ones(5)
    opt.step()
    steps = [opt.state[x]["step"].clone() for x in (p, q)]
    q_before = q.detach().clone()
    p.data = torch.randn(6, 4).t()  # same shape, not contiguous: the state follows the new layout
    p.grad = torch.ones(4, 6)
    twin = torch.nn.Parameter(p.detach().clone())
    ref = torch.optim.AdamW([twin])
    ref.state[twin] = {k: v.clone() for k, v in opt.state[p].items()}
    twin.grad = torch.ones(4, 6)
    opt.step()
    ref.step()
    assert not torch.equal(q.detach(), q_before)
    torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-6, atol=1e-7)
    assert [opt.state[x]["step"].item() for x in (p, q)] == [s.item() + 1 for s in steps]


def test_backend_name_checked_at_construction():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="unknown backend"):
        FrozenAwareAdamW([p], backend="bogus")
    with pytest.raises(ValueError, match="lists of tensors"):
        FrozenAwareAdamW([p], backend="triton")  # Triton has a flat-buffer path only
    with pytest.raises(ValueError, match="cannot run"):
        FrozenAwareAdamW([p], backend="cuda")


def test_released_state_loads_into_torch_adamw_and_back():
    """With release_frozen_state, a frozen parameter has no state entry in the state dict (as if
    it never had a gradient): torch's AdamW loads it and trains on, and so does ours."""
    model = tiny_llama()
    opt = FrozenAwareAdamW(model.parameters(), release_frozen_state=True)
    data = batches(4)
    train(model, opt, data[:2])
    p = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    opt.freeze([p])
    sd = copy.deepcopy(opt.state_dict())
    assert opt.param_index(p) not in sd["state"] and sd["grades"]["released"] == [opt.param_index(p)]
    ref = torch.optim.AdamW(model.parameters())
    ref.load_state_dict(copy.deepcopy(sd))
    train(model, ref, data[2:3])  # torch starts p afresh
    assert ref.state[p]["step"].item() == 1
    back = FrozenAwareAdamW(model.parameters(), release_frozen_state=True)
    back.load_state_dict(sd)
    w = p.detach().clone()
    train(model, back, data[3:])
    assert bool(back.frozen[back.param_index(p)]) and torch.equal(p.detach(), w)


def _bits(t):
    """Bit patterns with every NaN made the same NaN (payloads differ between roundings)."""
    t = t.detach().clone()
    t[torch.isnan(t)] = float("nan")
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def test_master_with_nan_survives_save_and_load_bitwise():
    """A master weight holding a NaN (a NaN gradient applied under nonfinite="ignore") is kept
    on resume: its finite elements bitwise, not reset to the rounded parameter."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5).to(torch.bfloat16))
    opt = FrozenAwareAdamW([p], lr=1e-3, master_weights=True, nonfinite="ignore")
    for i in range(3):
        p.grad = torch.randn(6, 5).to(torch.bfloat16)
        if i == 2:
            p.grad[1, 2] = float("nan")
        opt.step()
    saved = opt.state_dict()
    master = saved["state"][0]["master_param"]
    assert torch.isnan(master[1, 2]) and torch.isnan(p[1, 2])
    assert not torch.equal(master.to(torch.bfloat16).float(), master)  # finite bits beyond bf16's
    q = torch.nn.Parameter(p.detach().clone())
    other = FrozenAwareAdamW([q], lr=1e-3, master_weights=True, nonfinite="ignore")
    other.load_state_dict(saved)
    assert torch.equal(_bits(other.state[q]["master_param"]), _bits(master))


def _corrupt(sd, what):
    sd = copy.deepcopy(sd)
    if what == "negative exp_avg_sq":
        sd["state"][1]["exp_avg_sq"].view(-1)[0] = -1.0
    elif what == "float frozen":
        sd["grades"]["frozen"] = sd["grades"]["frozen"].float() + 0.5
    elif what == "negative skipped_steps":
        sd["grades"]["skipped_steps"] = torch.tensor(-1)
    elif what == "float skipped_steps":
        sd["grades"]["skipped_steps"] = torch.tensor(1.5)
    return sd


@pytest.mark.parametrize("what,exc,msg", [
    ("negative exp_avg_sq", ValueError, "negative 'exp_avg_sq'"),
    ("float frozen", TypeError, r"grades\['frozen'\] must be a bool"),
    ("negative skipped_steps", ValueError, r"grades\['skipped_steps'\] must be >= 0"),
    ("float skipped_steps", TypeError, r"grades\['skipped_steps'\] must be an integer"),
])
def test_load_state_dict_refuses_bad_values_and_writes_nothing(what, exc, msg):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = FrozenAwareAdamW(ps, amsgrad=True)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    good = opt.state_dict()
    before = copy.deepcopy(good)
    with pytest.raises(exc, match=msg):
        opt.load_state_dict(_corrupt(good, what))
    after = opt.state_dict()
    for k, st in before["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in st.items())
    assert all(torch.equal(v, after["grades"][n]) for n, v in before["grades"].items() if n != "released")
    for p in ps:  # and it still steps
        p.grad = torch.randn_like(p)
    opt.step()
