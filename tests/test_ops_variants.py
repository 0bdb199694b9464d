"""``masked_adamw_`` variants against the reference backend and torch: ``maximize``, amsgrad
(``max_exp_avg_sqs``), float64, on every backend, list and flat forms, odd sizes, empty tensors,
frozen masks; the per-backend dtype claims; tensor-valued hyperparameters checked like numbers.

CPU-tensor backends run here (the native ``cpu`` extension, ``triton`` under ``TRITON_INTERPRET=1``,
``reference``); the same checks on CUDA tensors are marked ``gpu``. Updates are compared within
rounding (float64: 1e-12), statistics' counts exactly, frozen matrices bitwise.
"""
from __future__ import annotations

import math

import pytest
import torch

import grades
from conftest import available_backends
from grades import backends
from grades.backends.base import AdamWArgs
from grades.ops import kernel_dtypes

SIZES = [4097, 0, 7, 1, 33, 130]
FROZEN = [False, True, False, False, True, False]
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]  # (maximize, amsgrad)
LOW = [torch.float32, torch.bfloat16, torch.float16]


def _id(v):
    return str(v).replace("torch.", "")


def _cases(device: str) -> list[tuple[str, str, torch.dtype]]:
    out = []
    for kind in ("list", "flat"):
        for b in available_backends(device, kind):
            if b == "reference":
                continue
            out += [(b, kind, dt) for dt in LOW + [torch.float64] if dt in backends.get(b).dtypes]
    return out


def bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


class Opt:
    """params/grads/moments (and the amsgrad maximum) of ``SIZES``, as lists or one flat buffer each."""

    def __init__(self, dtype, amsgrad, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        md = torch.float64 if dtype == torch.float64 else torch.float32
        self.keys = "pgmvx" if amsgrad else "pgmv"
        self.t = {
            "p": [torch.randn(n, generator=gen).to(dtype) for n in SIZES],
            "g": [torch.randn(n, generator=gen).to(dtype) for n in SIZES],
            "m": [0.1 * torch.randn(n, generator=gen, dtype=md) for n in SIZES],
            "v": [torch.rand(n, generator=gen, dtype=md) for n in SIZES],
            "x": [torch.rand(n, generator=gen, dtype=md) for n in SIZES],
        }
        self.t = {k: [x.to(device) for x in v] for k, v in self.t.items() if k in self.keys}
        self.frozen = torch.tensor(FROZEN, device=device)

    def clone(self):
        c = object.__new__(Opt)
        c.keys, c.frozen = self.keys, self.frozen
        c.t = {k: [x.clone() for x in v] for k, v in self.t.items()}
        return c

    def new_grads(self, seed):
        gen = torch.Generator().manual_seed(seed)
        for g in self.t["g"]:
            g.copy_(torch.randn(g.numel(), generator=gen).to(g.dtype))

    def step(self, backend, kind, **hp):
        t = self.t
        x = t.get("x")
        if kind == "list":
            return grades.masked_adamw_(t["p"], t["g"], t["m"], t["v"], self.frozen, max_exp_avg_sqs=x,
                                        backend=backend, **hp)
        # flat: the matrices in reverse order with a gap of 3 before each
        rows, off = [], 0
        for i in reversed(range(len(SIZES))):
            rows.append((off + 3, SIZES[i], i))
            off += 3 + SIZES[i]
        bufs = {}
        for k in self.keys:
            buf = torch.full((off,), 7.0, dtype=t[k][0].dtype, device=t[k][0].device)
            for o, n, i in rows:
                buf[o:o + n] = t[k][i]
            bufs[k] = buf
        out = grades.masked_adamw_(bufs["p"], bufs["g"], bufs["m"], bufs["v"], self.frozen, segments=rows,
                                   num_matrices=len(SIZES), max_exp_avg_sqs=bufs.get("x"), backend=backend, **hp)
        for k in self.keys:
            for o, n, i in rows:
                t[k][i].copy_(bufs[k][o:o + n])
            assert (bufs[k][:3] == 7).all(), f"{backend} wrote outside the segments of {k}"
        return out


def _compare(got: Opt, want: Opt, dtype) -> None:
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    mtol = 1e-12 if dtype == torch.float64 else 1e-5
    for k in got.keys:
        for a, b in zip(got.t[k], want.t[k]):
            t = tol if k == "p" else mtol
            torch.testing.assert_close(a.double(), b.double(), rtol=t, atol=t)


def _run_variant(device, backend, kind, dtype, maximize, amsgrad):
    st = Opt(dtype, amsgrad, device)
    ref, before = st.clone(), st.clone()
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=maximize,
              grad_scale=torch.tensor(2.0, device=device))
    for s in range(1, 4):
        st.new_grads(s)
        ref.new_grads(s)
        got = st.step(backend, kind, step=s, **hp)
        want = ref.step("reference", kind, step=s, **hp)
        assert torch.equal(got[:, 2], want[:, 2])
        torch.testing.assert_close(got, want, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-12)
        # the statistics are those of the gradient as given, whatever maximize
        ref_plain = grades.grad_stats(st.t["g"], frozen=st.frozen, backend="reference")
        torch.testing.assert_close(ref_plain / torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64, device=device),
                                   want, rtol=1e-12, atol=0)
    _compare(st, ref, dtype)
    for i, fz in enumerate(FROZEN):
        for k in st.keys.replace("g", ""):
            if fz:  # frozen: every buffer bitwise untouched, amsgrad's maximum included
                assert same_bits(st.t[k][i], before.t[k][i]), (k, i)
            elif SIZES[i] > 100:
                assert not torch.equal(st.t[k][i], before.t[k][i]), (k, i)


@pytest.mark.parametrize("maximize,amsgrad", VARIANTS)
@pytest.mark.parametrize("backend,kind,dtype", _cases("cpu"), ids=_id)
def test_variants_match_reference(backend, kind, dtype, maximize, amsgrad):
    _run_variant("cpu", backend, kind, dtype, maximize, amsgrad)


@pytest.mark.gpu
@pytest.mark.parametrize("maximize,amsgrad", VARIANTS)
@pytest.mark.parametrize("backend,kind,dtype", _cases("cuda") if torch.cuda.is_available() else [], ids=_id)
def test_variants_match_reference_cuda(backend, kind, dtype, maximize, amsgrad):
    _run_variant("cuda", backend, kind, dtype, maximize, amsgrad)


def test_every_backend_has_cases_per_claimed_dtype():
    """The parametrisation above is not empty by accident: the native CPU backend computes float64."""
    claims = kernel_dtypes()
    assert torch.float64 in claims["cpu"] and torch.float64 in claims["reference"]
    assert torch.float64 not in claims["triton"] and torch.float64 in claims["cuda"]
    if "cpu" in available_backends("cpu", "list"):
        assert ("cpu", "list", torch.float64) in _cases("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_id)
@pytest.mark.parametrize("maximize,amsgrad", VARIANTS)
@pytest.mark.parametrize("backend", [b for b in available_backends("cpu", "list") if b in ("cpu", "reference")])
def test_matches_torch_adamw(backend, maximize, amsgrad, dtype):
    """30 steps against ``torch.optim.AdamW(maximize=..., amsgrad=...)`` from zero moments."""
    sizes = [4097, 7, 1, 0, 300]
    gen = torch.Generator().manual_seed(5)
    p = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    tp = [x.clone().requires_grad_(True) for x in p]
    opt = torch.optim.AdamW(tp, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.1, maximize=maximize, amsgrad=amsgrad,
                            foreach=False)
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    x = [torch.zeros_like(y) for y in p] if amsgrad else None
    for s in range(1, 31):
        g = [torch.randn(n, generator=gen, dtype=dtype) * (1 + s % 3) for n in sizes]
        for t, gi in zip(tp, g):
            t.grad = gi.clone()
        opt.step()
        grades.masked_adamw_(p, g, m, v, step=s, lr=3e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
                             maximize=maximize, max_exp_avg_sqs=x, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for i in range(len(sizes)):
        torch.testing.assert_close(p[i], tp[i].detach(), rtol=tol, atol=tol)
        st = opt.state[tp[i]]
        torch.testing.assert_close(m[i], st["exp_avg"], rtol=tol, atol=tol)
        if amsgrad:
            torch.testing.assert_close(x[i], st["max_exp_avg_sq"], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,kind", [(b, k) for k in ("list", "flat") for b in available_backends("cpu", k)])
def test_float64_statistics(backend, kind):
    """float64 gradients: statistics summed in float64, non-finite values counted, values beyond
    float32's range finite (no float32 rounding on the way); refused with a TypeError where not claimed."""
    gs = [torch.randn(n, dtype=torch.float64) for n in (4097, 0, 5, 17)]
    gs[2][1] = 1e200
    gs[3][[0, 16]] = torch.tensor([math.nan, -math.inf], dtype=torch.float64)
    rows, off = [], 0
    for i, g in enumerate(gs):
        rows.append((off, g.numel(), i))
        off += g.numel()
    if kind == "list":
        def call():
            return grades.grad_stats(gs, backend=backend)
    else:
        def call():
            return grades.grad_stats(torch.cat(gs), segments=rows, backend=backend)
    if torch.float64 not in backends.get(backend).dtypes:
        with pytest.raises(TypeError, match=f"backend '{backend}' does not compute"):
            call()
        return
    got = call()
    want = torch.tensor([[float((g * g).sum()), float(g.abs().sum()), float((~torch.isfinite(g)).sum())] for g in gs],
                        dtype=torch.float64)
    assert got[:, 2].tolist() == [0, 0, 0, 2]
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0, equal_nan=True)


def test_triton_refuses_float64_updates():
    if "triton" not in available_backends("cpu", "flat"):
        pytest.skip("triton is not available in this process")
    st = Opt(torch.float64, False)
    before = st.clone()
    with pytest.raises(TypeError, match=r"params \(flat buffer\) has dtype float64, which backend 'triton' does not"):
        st.step("triton", "flat", step=1)
    for k in st.keys:
        assert all(same_bits(a, b) for a, b in zip(st.t[k], before.t[k]))


def test_empty_inputs():
    """No matrices at all, and matrices without elements, for every variant."""
    for b in available_backends("cpu", "list"):
        out = grades.masked_adamw_([], [], [], [], step=1, maximize=True, max_exp_avg_sqs=[], backend=b)
        assert out.shape == (0, 3)
        e = [torch.zeros(0, dtype=torch.float64 if torch.float64 in backends.get(b).dtypes else torch.float32)
             for _ in range(5)]
        out = grades.masked_adamw_(*([t] for t in e[:4]), step=1, max_exp_avg_sqs=[e[4]], backend=b)
        assert out.tolist() == [[0.0, 0.0, 0.0]]
    e = [torch.zeros(0) for _ in range(5)]
    out = grades.masked_adamw_(*e[:4], segments=[], num_matrices=2, step=1, max_exp_avg_sqs=e[4], maximize=True)
    assert out.tolist() == [[0.0, 0.0, 0.0]] * 2


def _lists(dtype=torch.float32, n=3):
    md = torch.float64 if dtype == torch.float64 else torch.float32
    return ([torch.randn(10, dtype=dtype) for _ in range(n)], [torch.randn(10, dtype=dtype) for _ in range(n)],
            [torch.zeros(10, dtype=md) for _ in range(n)], [torch.ones(10, dtype=md) for _ in range(n)])


BAD = {
    "step tensor 0": (dict(step=torch.tensor(0.0)), ValueError, "Invalid step value: 0.0"),
    "step tensor negative": (dict(step=torch.tensor(-2.0)), ValueError, "Invalid step value: -2.0"),
    "step tensor nan": (dict(step=torch.tensor(math.nan)), ValueError, "Invalid step value: nan"),
    "per-matrix step 0": (dict(step=torch.tensor([1.0, 0.0, 3.0])), ValueError, "Invalid step value: 0.0"),
    "lr tensor negative": (dict(step=1, lr=torch.tensor(-1e-3)), ValueError, "Invalid lr value: -0.001"),
    "lr tensor nan": (dict(step=1, lr=torch.tensor(math.nan)), ValueError, "Invalid lr value: nan"),
    "grad_scale 0": (dict(step=1, grad_scale=torch.tensor(0.0)), ValueError, "Invalid grad_scale value: 0.0"),
    "grad_scale nan": (dict(step=1, grad_scale=torch.tensor(math.nan)), ValueError, "Invalid grad_scale value: nan"),
    "maximize not bool": (dict(step=1, maximize=1), TypeError, "maximize must be a bool"),
}


@pytest.mark.parametrize("form", ["list", "flat"])
@pytest.mark.parametrize("case", list(BAD))
def test_tensor_hyperparameters_checked_like_numbers(case, form):
    kw, exc, msg = BAD[case]
    p, g, m, v = _lists()
    x = [torch.zeros(10) for _ in p]
    if form == "flat":
        p, g, m, v, x = (torch.cat(t) for t in (p, g, m, v, x))
        kw = dict(kw, segments=[(0, 10, 0), (10, 10, 1), (20, 10, 2)])
    every = [p, g, m, v, x] if form == "flat" else [t for ts in (p, g, m, v, x) for t in ts]
    before = [t.clone() for t in every]
    with pytest.raises(exc, match=msg):
        grades.masked_adamw_(p, g, m, v, max_exp_avg_sqs=x, **kw)
    assert all(same_bits(a, b) for a, b in zip(every, before))  # nothing written


def test_per_matrix_step_of_a_frozen_matrix_may_be_zero():
    p, g, m, v = _lists()
    grades.masked_adamw_(p, g, m, v, torch.tensor([False, True, False]), step=torch.tensor([1.0, 0.0, 2.0]))


DTYPE_BAD = {
    "float64 moments of float32 params": (lambda p, g, m, v: grades.masked_adamw_(
        p, g, [t.double() for t in m], v, step=1), TypeError, r"exp_avgs\[0\] has dtype float64; moments of float32"),
    "float32 moments of float64 params": (lambda p, g, m, v: grades.masked_adamw_(
        [t.double() for t in p], [t.double() for t in g], m, v, step=1), TypeError,
        r"exp_avgs\[0\] has dtype float32; moments of float64 params must be float64"),
    "float64 grads of float32 params": (lambda p, g, m, v: grades.masked_adamw_(
        p, [t.double() for t in g], m, v, step=1), TypeError,
        r"grads\[0\] has dtype float64 but params\[0\] has float32"),
    "amsgrad buffer dtype": (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, max_exp_avg_sqs=[t.double() for t in v]), TypeError,
        r"max_exp_avg_sqs\[0\] has dtype float64"),
    "amsgrad buffer length": (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, max_exp_avg_sqs=v[:2]), ValueError, "got 3 params and 2 max_exp_avg_sqs"),
    "amsgrad buffer shape": (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, max_exp_avg_sqs=[torch.zeros(9)] * 3), ValueError,
        r"max_exp_avg_sqs\[0\] has shape \(9,\)"),
    "amsgrad buffer aliases exp_avg_sq": (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, max_exp_avg_sqs=v), ValueError, "share memory"),
    "master of float64 params": (lambda p, g, m, v: grades.masked_adamw_(
        [t.double() for t in p], [t.double() for t in g], [t.double() for t in m], [t.double() for t in v], step=1,
        master_params=[torch.zeros(10), None, None]), TypeError, r"master_params\[0\] given for float64"),
    "flat float64 with float32 moments": (lambda p, g, m, v: grades.masked_adamw_(
        torch.cat(p).double(), torch.cat(g).double(), torch.cat(m), torch.cat(v), step=1, segments=[(0, 30, 0)]),
        TypeError, r"exp_avgs \(flat buffer\) has dtype float32; moments of float64"),
}


@pytest.mark.parametrize("case", list(DTYPE_BAD))
def test_dtype_family_and_amsgrad_buffer_errors(case):
    fn, exc, msg = DTYPE_BAD[case]
    with pytest.raises(exc, match=msg):
        fn(*_lists())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreted Triton kernels divide by 0 in numpy
@pytest.mark.parametrize("scale", [0.0, math.nan])
@pytest.mark.parametrize("backend,kind", [(b, k) for k in ("list", "flat") for b in available_backends("cpu", k)])
def test_backend_grad_scale_zero_or_nan_keeps_reference_statistics(backend, kind, scale):
    """Below the public checks (the optimizer calls backends directly): a GradScaler scale that has
    fallen to 0 (or NaN) gives the reference's statistics on every backend (Inf or NaN rows, every
    element counted once, none of a vector's padding lanes, a frozen row zero), maximize and amsgrad on."""
    st = Opt(torch.float32, True)
    ref = st.clone()
    hp = AdamWArgs(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1.0,
                   grad_scale=torch.tensor(scale), maximize=True)
    outs = []
    for s, b in ((st, backend), (ref, "reference")):
        out = torch.empty(len(SIZES), 3, dtype=torch.float64)
        t = s.t
        if kind == "list":
            backends.get(b).adamw_list(t["p"], t["g"], t["m"], t["v"], s.frozen, hp, out, max_exp_avg_sqs=t["x"])
        else:
            table = grades.SegmentTable.from_tensors(t["p"])
            flat = [torch.cat(t[k]) for k in "pgmvx"]
            backends.get(b).adamw_flat(*flat[:4], table, s.frozen, hp, out, max_exp_avg_sq=flat[4])
        outs.append(out)
    assert outs[0][:, 2].tolist() == [n if not f else 0 for n, f in zip(SIZES, FROZEN)]
    torch.testing.assert_close(outs[0], outs[1], equal_nan=True)
