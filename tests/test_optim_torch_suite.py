"""FrozenAwareAdamW held to PyTorch's own optimizer tests, as a drop-in for torch.optim.AdamW.

The configurations and the error inputs are torch's: an ``OptimizerInfo`` for FrozenAwareAdamW
built from the AdamW entry of ``torch.testing._internal.common_optimizers`` (its
``optim_inputs_func`` and ``optim_error_inputs_func``). The tests follow the checks of torch's
``TestOptimRenewed`` (``test/test_optim.py``, not shipped in the wheel), written here for pytest,
each comparing against ``torch.optim.AdamW`` doing the same thing where torch can.
"""
from __future__ import annotations

import copy
import pickle
import re
import sys
import types
import unittest

import pytest
import torch
from torch.nn import Parameter

from grades import FrozenAwareAdamW

if "expecttest" not in sys.modules:  # torch's test utilities import it for their TestCase only
    try:
        import expecttest  # noqa: F401
    except ImportError:
        sys.modules["expecttest"] = types.SimpleNamespace(TestCase=unittest.TestCase)

common = pytest.importorskip("torch.testing._internal.common_optimizers")
OptimizerInfo, OptimizerErrorEnum = common.OptimizerInfo, common.OptimizerErrorEnum
ErrorOptimizerInput, OptimizerInput = common.ErrorOptimizerInput, common.OptimizerInput

TORCH_ADAMW = next(o for o in common.optim_db if o.optim_cls is torch.optim.AdamW)
DEVICE = "cpu"


def _error_inputs(device, dtype):
    """torch's AdamW error inputs, plus the fused-switch errors torch lists for CUDA only (its
    AdamW raises them on any device)."""
    p = torch.empty((), device=device, dtype=dtype)
    extra = [ErrorOptimizerInput(OptimizerInput(params=[p], kwargs=kw, desc=msg), error_type=RuntimeError,
                                 error_regex=re.escape(msg))
             for kw, msg in (({"foreach": True, "fused": True}, "`fused` and `foreach` cannot be `True` together"),
                             ({"fused": True, "differentiable": True}, "`fused` does not support `differentiable`"))]
    return TORCH_ADAMW.optim_error_inputs_func(device, dtype) + extra


INFO = OptimizerInfo(FrozenAwareAdamW, optim_inputs_func=TORCH_ADAMW.optim_inputs_func,
                     optim_error_inputs_func=_error_inputs, supported_impls=("foreach", "differentiable", "fused"),
                     supports_fused_on=("cpu", "cuda"), has_capturable_arg=True)
# differentiable=True is refused (the fused update is not differentiable): left out as in torch's
# own deepcopy/state-dict tests
CONFIGS = common._get_optim_inputs_including_global_cliquey_kwargs(DEVICE, torch.float32, INFO,
                                                                   skip=("differentiable",))
IDS = [c.desc.replace(" ", "_") for c in CONFIGS]
FLAGGED = [c for c in CONFIGS if c.kwargs.get("maximize") or c.kwargs.get("amsgrad")]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_params(dtype=torch.float32, seed=0):
    """Odd shapes, a channels_last conv weight, a parameter with gaps (a strided slice), a
    0-dim one, and one that never gets a gradient."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gapped = torch.randn(5, 8, generator=g, dtype=dtype)[:, ::2]
    return [Parameter(torch.randn(7, 5, generator=g, dtype=dtype)), Parameter(conv), Parameter(gapped),
            Parameter(torch.randn((), generator=g, dtype=dtype)), Parameter(torch.randn(3, generator=g, dtype=dtype)),
            Parameter(torch.randn(2, 2, generator=g, dtype=dtype))]


def clone_params(ps):
    """Copies with the same strides (gaps included)."""
    return [Parameter(torch.empty_strided(p.size(), p.stride(), dtype=p.dtype).copy_(p.detach())) for p in ps]


def grads_for(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [None if i == len(params) - 1 else torch.randn(p.shape, generator=g, dtype=p.dtype)
            for i, p in enumerate(params)]


def twin_step(a, oa, b, ob, step):
    for p, q, gr in zip(a, b, grads_for(a, step)):
        p.grad = None if gr is None else gr.clone()
        q.grad = None if gr is None else gr.clone()
    oa.step()
    ob.step()


def reference(param_groups, **kwargs):
    """torch.optim.AdamW's for-loop implementation with the same arguments. (Its fused CPU kernel
    reads a gradient laid out differently from its parameter, e.g. a contiguous gradient of a
    channels_last weight, in the parameter's memory order: wrong values; and it refuses complex
    parameters. The maths is the same in every torch implementation.)"""
    return torch.optim.AdamW(param_groups, **{k: v for k, v in kwargs.items() if k not in ("fused", "foreach")})


def groups(ps):
    """Two groups with their own lr and weight decay (torch's param-group tests)."""
    return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.3}]


def assert_params_close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for p, q in zip(a, b):
        assert p.stride() == q.stride()
        torch.testing.assert_close(p.detach(), q.detach(), **tol)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("err", _error_inputs(DEVICE, torch.float32), ids=lambda e: e.optimizer_error_input.desc)
def test_errors(err):
    """Every error input raises torch's exception type with torch's message (a warning for a
    duplicate parameter within a group), at construction as for torch.optim.AdamW."""
    inp = err.optimizer_error_input
    params = inp.params if inp.params is not None else [Parameter(torch.randn(2, 2))]
    assert err.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(err.error_type, Warning):
        with pytest.warns(err.error_type, match=err.error_regex):
            FrozenAwareAdamW(params, **inp.kwargs)
        return
    with pytest.raises(err.error_type, match=err.error_regex):
        FrozenAwareAdamW(params, **inp.kwargs)
    with pytest.raises(err.error_type, match=err.error_regex):  # torch agrees
        torch.optim.AdamW(params, **inp.kwargs)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_refused_options_say_so(flag):
    with pytest.raises(ValueError, match=f"does not support {flag}=True"):
        FrozenAwareAdamW([Parameter(torch.randn(2))], **{flag: True})


def test_sparse_gradient_and_meta_params():
    p = Parameter(torch.randn(4))
    opt = FrozenAwareAdamW([p])
    p.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    m = Parameter(torch.empty(3, device="meta"))
    opt = FrozenAwareAdamW([m])  # construction works, as in torch (deferred initialisation)
    m.grad = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        opt.step()


def test_duplicate_parameter_warns_like_torch_and_is_updated_once():
    p = Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = FrozenAwareAdamW([p, p])
    ref = Parameter(p.detach().clone())
    ro = FrozenAwareAdamW([ref])
    p.grad, ref.grad = torch.ones(4), torch.ones(4)
    opt.step()
    ro.step()
    assert torch.equal(p, ref)


# ----------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_matches_torch_adamw(cfg, dtype):
    """Same trajectory as torch.optim.AdamW with the same arguments, over two param groups of
    odd, channels_last, gapped, 0-dim and gradient-less parameters (layouts kept)."""
    a = make_params(dtype)
    b = clone_params(a)
    oa, ob = FrozenAwareAdamW(groups(a), **cfg.kwargs), reference(groups(b), **cfg.kwargs)
    for step in range(4):
        twin_step(a, oa, b, ob, step)
    assert_params_close(a, b, dtype)
    assert not oa.state[a[-1]] and not ob.state[b[-1]]  # no gradient: no state, as torch


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_goes_right_direction(cfg):
    """A few steps lower a least-squares loss (raise it with maximize), as torch's test checks."""
    torch.manual_seed(0)
    w, bias, x = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10)), torch.randn(5)
    opt = FrozenAwareAdamW([w, bias], **cfg.kwargs)
    sign = -1.0 if cfg.kwargs.get("maximize") else 1.0

    def loss():
        return (w.mv(x) + bias).pow(2).sum()

    first = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert (loss().item() - first) * sign < 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_complex_params_match_torch(cfg):
    """Complex parameters: as torch.optim.AdamW on the same complex parameters, and as on their
    real views (torch's test_complex); the state stays complex like torch's."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(4, 3, generator=g, dtype=torch.complex64), torch.randn(5, generator=g, dtype=torch.complex64)]
    a, b = [Parameter(t.clone()) for t in base], [Parameter(t.clone()) for t in base]
    r = [Parameter(torch.view_as_real(t.clone())) for t in base]
    oa, ob, orr = (FrozenAwareAdamW(a, **cfg.kwargs), reference(b, **cfg.kwargs),
                   FrozenAwareAdamW(r, **cfg.kwargs))
    for step in range(3):
        for ps in (a, b, r):
            gg = torch.Generator().manual_seed(step)
            for p, t in zip(ps, base):
                grad = torch.randn(t.shape, generator=gg, dtype=torch.complex64)
                p.grad = torch.view_as_real(grad) if not p.is_complex() else grad
        for o in (oa, ob, orr):
            o.step()
    for p, q, s in zip(a, b, r):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.view_as_real(p.detach()), s.detach(), rtol=0, atol=0)
    assert oa.state[a[0]]["exp_avg"].dtype == ob.state[b[0]]["exp_avg"].dtype == torch.complex64


def test_default_dtype_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a = [Parameter(torch.randn(6, 3)), Parameter(torch.randn(4))]
        b = clone_params(a)
        oa, ob = FrozenAwareAdamW(a), torch.optim.AdamW(b)
        for step in range(3):
            for p, q in zip(a, b):
                p.grad = torch.full_like(p, 0.1 * (step + 1))
                q.grad = p.grad.clone()
            oa.step()
            ob.step()
        assert oa.state[a[0]]["exp_avg"].dtype == torch.float64
        assert_params_close(a, b, torch.float64)
    finally:
        torch.set_default_dtype(old)


def test_tensor_lr_and_scheduler_match_torch():
    a = make_params()
    b = clone_params(a)
    oa = FrozenAwareAdamW(a, lr=torch.tensor(0.01), fused=True)
    ob = reference(b, lr=torch.tensor(0.01))
    sa, sb = (torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (oa, ob))
    for step in range(4):
        twin_step(a, oa, b, ob, step)
        sa.step()
        sb.step()
    assert_params_close(a, b, torch.float32)
    assert float(oa.param_groups[0]["lr"]) == float(ob.param_groups[0]["lr"])


def test_found_inf_skips_the_step():
    """The GradScaler protocol (torch's test_fused_does_not_step_if_foundinf): found_inf set,
    nothing moves and the step counts stay."""
    ps = make_params()
    opt = FrozenAwareAdamW(ps, fused=True)
    for p, gr in zip(ps, grads_for(ps, 0)):
        p.grad = gr
    before = [p.detach().clone() for p in ps]
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.ones(())
    opt.step()
    del opt.grad_scale, opt.found_inf
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert all(float(opt.state[p]["step"]) == 0 for p in ps[:-1])


def test_step_without_gradients_is_a_noop():
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = FrozenAwareAdamW(ps, weight_decay=0.5)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before)) and not any(opt.state[p] for p in ps)


@pytest.mark.parametrize("cfg", FLAGGED, ids=[c.desc for c in FLAGGED])
def test_non_empty_state(cfg):
    ps = make_params()
    opt = FrozenAwareAdamW(ps, **cfg.kwargs)
    for p, gr in zip(ps, grads_for(ps, 0)):
        p.grad = gr
    opt.step()
    want = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if cfg.kwargs.get("amsgrad") else set())
    ref = torch.optim.AdamW(clone_params(ps)[:1], **cfg.kwargs)
    ref.param_groups[0]["params"][0].grad = ps[0].grad.clone()
    ref.step()
    assert set(opt.state[ps[0]]) == set(ref.state[ref.param_groups[0]["params"][0]]) == want


# ----------------------------------------------------------------------------- state dicts, copies


def _trained(cfg_kwargs, steps=3):
    a = make_params()
    b = clone_params(a)
    oa, ob = FrozenAwareAdamW(groups(a), **cfg_kwargs), reference(groups(b), **cfg_kwargs)
    for step in range(steps):
        twin_step(a, oa, b, ob, step)
    return a, oa, b, ob


def _continue_equal(a, oa, c, oc, steps=(10, 11)):
    """Two optimizers over equal parameters take the same next steps, bitwise."""
    for step in steps:
        for ps, o in ((a, oa), (c, oc)):
            for p, gr in zip(ps, grads_for(ps, step)):
                p.grad = gr
            o.step()
    for p, q in zip(a, c):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_state_dict_deterministic(cfg):
    """Loading a state dict into a fresh optimizer over cloned parameters continues bitwise the
    same; the state dict loads into torch.optim.AdamW and torch's into ours (amsgrad included)."""
    a, oa, b, ob = _trained(cfg.kwargs)
    c = clone_params(a)
    oc = FrozenAwareAdamW(groups(c), **cfg.kwargs)
    oc.load_state_dict(copy.deepcopy(oa.state_dict()))
    _continue_equal(a, oa, c, oc)
    d = clone_params(b)
    od = FrozenAwareAdamW(groups(d), **cfg.kwargs)
    od.load_state_dict(ob.state_dict())  # torch's into ours: continues like torch
    for step in (10, 11):
        twin_step(d, od, b, ob, step)
    assert_params_close(d, b, torch.float32)
    e = clone_params(a)
    oe = reference(groups(e), **cfg.kwargs)
    oe.load_state_dict(oa.state_dict())  # ours into torch
    assert set(oe.state[e[0]]) == set(oa.state[a[0]])


def test_can_load_older_state_dict_and_weights_only(tmp_path):
    """A state dict whose steps are plain numbers (older torch) loads, and one saved with
    torch.save loads back with weights_only=True; both continue bitwise like the original."""
    a, oa, _, _ = _trained({"amsgrad": True})
    sd = copy.deepcopy(oa.state_dict())
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    c = clone_params(a)
    oc = FrozenAwareAdamW(groups(c), amsgrad=True)
    oc.load_state_dict(sd)
    torch.save(oa.state_dict(), tmp_path / "sd.pt")
    d = clone_params(a)
    od = FrozenAwareAdamW(groups(d), amsgrad=True)
    od.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    _continue_equal(a, oa, c, oc)
    a2, oa2, _, _ = _trained({"amsgrad": True})
    _continue_equal(a2, oa2, d, od)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_are_working_optimizers(how, tmp_path):
    """deepcopy, pickle and torch.save of the optimizer give one that steps like the original,
    with every public attribute copied (torch's test_deepcopy_copies_all_public_attrs)."""
    a, oa, _, _ = _trained({"amsgrad": True, "weight_decay": 0.1})
    oa.freeze([a[4]])
    if how == "deepcopy":
        oc = copy.deepcopy(oa)
    elif how == "pickle":
        oc = pickle.loads(pickle.dumps(oa))
    else:
        torch.save(oa, tmp_path / "opt.pt")
        oc = torch.load(tmp_path / "opt.pt", weights_only=False)
    public = {k for k in vars(oa) if not k.startswith("_")}
    assert public == {k for k in vars(oc) if not k.startswith("_")}
    c = [p for g in oc.param_groups for p in g["params"]]
    assert all(p is not q and torch.equal(p, q) for p, q in zip(a, c))
    assert torch.equal(oc.frozen, oa.frozen) and oc.param_index(c[4]) == 4
    _continue_equal(a, oa, c, oc)
    assert torch.equal(a[4], c[4])  # frozen in both
    oc.state_dict()


def test_optimizer_can_be_printed_and_hooks_run():
    ps = make_params()
    opt = FrozenAwareAdamW(ps)
    assert "FrozenAwareAdamW (" in repr(opt) and "maximize: False" in repr(opt)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kw: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kw: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load"))
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd", "load"]


# ----------------------------------------------------------------------------- state edits


EDITS = {
    "clear": lambda o, ps: o.state.clear(),
    "del": lambda o, ps: o.state.__delitem__(ps[0]),
    "exp_avg": lambda o, ps: o.state[ps[1]].__setitem__("exp_avg", torch.ones_like(o.state[ps[1]]["exp_avg"])),
    "exp_avg_sq_inplace": lambda o, ps: o.state[ps[0]]["exp_avg_sq"].mul_(4.0),
    "step_tensor": lambda o, ps: o.state[ps[2]].__setitem__("step", torch.tensor(100.0)),
    "step_inplace": lambda o, ps: o.state[ps[0]]["step"].fill_(50.0),
    "param_appended": lambda o, ps: o.param_groups[0]["params"].append(ps[-1]),
    "maximize_on": lambda o, ps: o.param_groups[1].__setitem__("maximize", True),
    "amsgrad_on": lambda o, ps: [o.param_groups[0].__setitem__("amsgrad", True)]
    + [o.state[p].setdefault("max_exp_avg_sq", torch.zeros_like(o.state[p]["exp_avg_sq"])) for p in ps[:3]
       if not isinstance(o, FrozenAwareAdamW)],
    "amsgrad_off": lambda o, ps: o.param_groups[0].__setitem__("amsgrad", False),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_state_edits_are_honoured_like_torch(edit):
    """The same edit of ``opt.state`` / ``param_groups`` between steps, in both optimizers, then
    the same trajectory (torch reads its state afresh each step; so does FrozenAwareAdamW). For
    amsgrad switched on, torch needs the maximum buffer put in by hand (ours starts it at zero).
    The state dict afterwards describes what the optimizer uses."""
    kw = {"amsgrad": True} if edit == "amsgrad_off" else {}
    a, oa, b, ob = _trained(kw, steps=2)
    # the last parameter has had no gradient so far: a fresh parameter for the append
    if edit == "param_appended":
        for ps, o in ((a, oa), (b, ob)):
            del o.param_groups[1]["params"][-1]
    EDITS[edit](oa, a)
    EDITS[edit](ob, b)
    for step in range(2, 5):
        for p, q, gr in zip(a, b, grads_for(a, step)):
            gr = torch.randn_like(p) if gr is None else gr
            p.grad, q.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    assert_params_close(a, b, torch.float32)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sb["state"]:
        assert sa["state"][k].keys() == sb["state"][k].keys()
        for name, t in sb["state"][k].items():
            torch.testing.assert_close(sa["state"][k][name].float(), t.float(), rtol=1e-5, atol=1e-6)
    if edit == "param_appended":
        assert oa.num_params == len(a) and oa.param_index(a[-1]) == 3


def test_state_dict_after_clear_has_no_moments_and_is_used():
    a, oa, _, _ = _trained({})
    oa.state.clear()
    assert oa.state_dict()["state"] == {}
    c = clone_params(a)
    oc = FrozenAwareAdamW(groups(c))
    _continue_equal(a, oa, c, oc)  # both start afresh: same steps


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_step_is_noop_for_zero_grads(cfg):
    """Zero gradients without weight decay leave the parameters exactly where they are."""
    ps = make_params()
    before = [p.detach().clone() for p in ps]
    opt = FrozenAwareAdamW(ps, **{**cfg.kwargs, "weight_decay": 0.0})
    for p in ps:
        p.grad = torch.zeros_like(p)
    for _ in range(2):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_tensor_lr_equals_float_lr():
    a = make_params()
    b = clone_params(a)
    oa, ob = FrozenAwareAdamW(a, lr=torch.tensor(0.01)), FrozenAwareAdamW(b, lr=0.01)
    for step in range(3):
        twin_step(a, oa, b, ob, step)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_named_parameters_and_their_state_dicts():
    """Named parameters as torch takes them: the state dict carries ``param_names`` and loads
    into torch.optim.AdamW and back."""
    a = make_params()[:3]
    names = [f"w{i}" for i in range(len(a))]
    b = clone_params(a)
    oa = FrozenAwareAdamW(list(zip(names, a)))
    ob = reference(list(zip(names, b)))
    for step in range(2):
        for p, q, gr in zip(a, b, grads_for(a + [None], step)):
            p.grad, q.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"][0]["param_names"] == sb["param_groups"][0]["param_names"] == names
    oc = FrozenAwareAdamW(list(zip(names, clone_params(a))))
    oc.load_state_dict(sb)
    od = reference(list(zip(names, clone_params(b))))
    od.load_state_dict(sa)
