"""Every backend against the reference backend and float64 torch: ``grad_stats`` and
``masked_adamw_`` over lists and flat buffers, all dtypes, frozen masks, sharded segment tables,
non-finite values, GradScaler arguments, determinism, and input validation through the public API.

Backends are the ones usable on CPU tensors in this process (``conftest.available_backends``): the
native ``cpu`` extension, ``triton`` under ``TRITON_INTERPRET=1``, and ``reference`` itself.
Sizes stay small except in one test per form, so the Triton interpreter stays quick
(``GRADES_FULL=1`` uses bigger sizes there).
"""
from __future__ import annotations


import pytest
import torch

import grades
from conftest import FULL, available_backends
from grades import backends

LIST_BACKENDS = available_backends("cpu", "list")
FLAT_BACKENDS = available_backends("cpu", "flat")
CASES = [(b, "list") for b in LIST_BACKENDS] + [(b, "flat") for b in FLAT_BACKENDS]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 7, 4097, 33, 130]
BIG = 20_000_000 if FULL else 2_500_000


def _id(v):
    return str(v).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def truth(gs, scale=None):
    """float64 ``[M, 3]`` statistics of a list of gradients (optionally divided by ``scale`` in fp32)."""
    rows = []
    for g in gs:
        g32 = g.float() if scale is None else g.float() / scale
        g64 = g32.double()
        rows.append([float((g64 * g64).sum()), float(g64.abs().sum()), float((~torch.isfinite(g32)).sum())])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(gs), 3)


def bits(t):
    """Bit pattern of a tensor, for bitwise comparisons (NaN == NaN)."""
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def flatten(tensors, gap=0, dtype=None):
    """Lay tensors out in one buffer, ``gap`` unused elements before each; returns (buf, rows)."""
    dtype = dtype or tensors[0].dtype
    total = sum(t.numel() + gap for t in tensors)
    buf = torch.full((total,), 7.0, dtype=dtype)  # gap filler that would spoil any sum that read it
    rows, off = [], 0
    for i, t in enumerate(tensors):
        off += gap
        buf[off:off + t.numel()] = t.flatten().to(dtype)
        rows.append((off, t.numel(), i))
        off += t.numel()
    return buf, rows


def run_stats(backend, kind, gs, frozen=None):
    if kind == "list":
        return grades.grad_stats(gs, frozen=frozen, backend=backend)
    buf, rows = flatten(gs, gap=3)
    return grades.grad_stats(buf, segments=rows, frozen=frozen, backend=backend)


def check_stats(got, want, frozen=None, rtol=1e-5):
    assert got.dtype == torch.float64 and got.shape == want.shape
    if frozen is not None:
        want = want.clone()
        want[frozen] = 0
    torch.testing.assert_close(got[:, 2], want[:, 2], rtol=0, atol=0)
    torch.testing.assert_close(got[:, :2], want[:, :2], rtol=rtol, atol=1e-12, equal_nan=True)


class State:
    """params/grads/moments as lists, plus the flat-buffer view of the same data when ``kind == 'flat'``."""

    def __init__(self, sizes, pdtype=torch.float32, gdtype=torch.float32, seed=0, kind="list", masters=False):
        gen = torch.Generator().manual_seed(seed)
        self.kind = kind
        self.p = [torch.randn(n, generator=gen).to(pdtype) for n in sizes]
        self.g = [torch.randn(n, generator=gen).to(gdtype) for n in sizes]
        self.m = [0.1 * torch.randn(n, generator=gen) for n in sizes]
        self.v = [torch.rand(n, generator=gen) for n in sizes]
        # float32 master weights: the params plus a little more precision than they hold
        self.keys = "pgmvw" if masters else "pgmv"
        if masters:
            self.w = [p.float() * (1 + 1e-3 * torch.rand(p.shape, generator=gen)) for p in self.p]

    def clone(self):
        c = object.__new__(State)
        c.kind, c.keys = self.kind, self.keys
        for k in self.keys:
            setattr(c, k, [None if t is None else t.clone() for t in getattr(self, k)])
        return c

    def step(self, backend, frozen=None, **hp):
        if self.kind == "list":
            if "w" in self.keys:
                hp["master_params"] = self.w
            return grades.masked_adamw_(self.p, self.g, self.m, self.v, frozen, backend=backend, **hp)
        # a sharded layout: matrix i in two pieces, pieces in reverse order, a gap before each
        pieces = {k: [] for k in self.keys}
        owner = []
        for i in range(len(self.p)):
            h = self.p[i].numel() // 2
            for sl in (slice(0, h), slice(h, None)):
                owner.append(i)
                for k in self.keys:
                    pieces[k].append(getattr(self, k)[i][sl])
        order = list(range(len(owner)))[::-1]
        bufs, rows = [], []
        for k in self.keys:
            dtype = getattr(self, k)[0].dtype if self.p else torch.float32
            buf, r = flatten([pieces[k][j] for j in order], gap=5, dtype=dtype)
            bufs.append(buf)
            rows = [(o, n, owner[j]) for (o, n, _), j in zip(r, order)]
        outside = torch.ones(bufs[0].numel(), dtype=torch.bool)
        for o, n, _ in rows:
            outside[o:o + n] = False
        if "w" in self.keys:
            hp["master_params"] = bufs[4]
        out = grades.masked_adamw_(*bufs[:4], frozen, segments=rows, num_matrices=len(self.p), backend=backend,
                                   **hp)
        for k, buf in zip(self.keys, bufs):
            assert (buf[outside] == 7).all(), f"{backend} wrote outside the segments of {k}"
            for (o, n, _), j in zip(rows, order):
                pieces[k][j].copy_(buf[o:o + n])  # back into the list tensors (views)
        return out


# ------------------------------------------------------------------------------------------------
# grad_stats
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("backend,kind", CASES)
def test_grad_stats_sizes_and_dtypes(backend, kind, dtype):
    gen = torch.Generator().manual_seed(1)
    gs = [(3 * torch.randn(n, generator=gen)).to(dtype) for n in SIZES]
    got = run_stats(backend, kind, gs)
    check_stats(got, truth(gs))
    check_stats(got, run_stats("reference", kind, gs))


@pytest.mark.parametrize("backend,kind", CASES)
def test_grad_stats_many_mixed_tensors_frozen(backend, kind):
    gen = torch.Generator().manual_seed(2)
    sizes = torch.randint(0, 3000, (40,), generator=gen).tolist()
    gs = [torch.randn(n, generator=gen).to(DTYPES[i % 3]) if kind == "list" else torch.randn(n, generator=gen)
          for i, n in enumerate(sizes)]
    frozen = torch.rand(len(gs), generator=gen) < 0.4
    got = run_stats(backend, kind, gs, frozen)
    check_stats(got, truth(gs), frozen)
    assert (got[frozen] == 0).all()


@pytest.mark.parametrize("backend,kind", CASES)
def test_grad_stats_large(backend, kind):
    gen = torch.Generator().manual_seed(3)
    gs = [torch.randn(BIG, generator=gen), torch.randn(4097, generator=gen).bfloat16()]
    if kind == "flat":
        gs[1] = gs[1].float()
    check_stats(run_stats(backend, kind, gs), truth(gs))


@pytest.mark.parametrize("backend", FLAT_BACKENDS)
def test_grad_stats_sharded_segments(backend):
    """Several segments per matrix, unsorted, gaps between them, an unused matrix id."""
    gen = torch.Generator().manual_seed(4)
    buf = torch.randn(20000, generator=gen)
    rows = [(15000, 4000, 2), (0, 10, 0), (300, 5000, 1), (12000, 2500, 0), (100, 7, 2), (9000, 1, 1)]
    want = torch.zeros(4, 3, dtype=torch.float64)
    for o, n, i in rows:
        want[i] += truth([buf[o:o + n]])[0]
    table = grades.SegmentTable(rows, num_matrices=4)
    got = grades.grad_stats(buf, segments=table, backend=backend)
    check_stats(got, want)
    assert (got[3] == 0).all()
    frozen = torch.tensor([False, True, False, False])
    check_stats(grades.grad_stats(buf, segments=table, frozen=frozen, backend=backend), want, frozen)


@pytest.mark.parametrize("backend,kind", CASES)
def test_nonfinite_counted_exactly(backend, kind):
    gen = torch.Generator().manual_seed(5)
    sizes = [5000, 70, 9000, 1, 4096]
    gs = [torch.randn(n, generator=gen) for n in sizes]
    plants = {0: [float("nan")] * 3 + [float("inf")], 2: [-float("inf")] * 2, 3: [float("nan")],
              4: [float("inf"), -float("inf")]}
    for i, vals in plants.items():
        idx = torch.randperm(sizes[i], generator=gen)[:len(vals)]
        gs[i][idx] = torch.tensor(vals)
    for dtype in ([torch.float32, torch.bfloat16, torch.float16] if kind == "list" else [torch.float32]):
        g = [t.to(dtype) for t in gs]
        got = run_stats(backend, kind, g)
        assert got[:, 2].tolist() == [4.0, 0.0, 2.0, 1.0, 2.0]
        assert got[0, :2].isnan().all() and got[3, :2].isnan().all()
        assert got[2, :2].isinf().all() and got[4, :2].isinf().all()
        check_stats(got, truth(g))


def test_nonfinite_from_grad_scale_division():
    """A finite fp32 gradient divided by a small grad_scale overflows: counted after unscaling."""
    for b in LIST_BACKENDS:
        s = State([64], kind="list")
        s.g[0][3] = 3e38
        out = s.step(b, step=1, grad_scale=torch.tensor(0.5), found_inf=torch.tensor(1.0))
        assert out[0, 2].item() == 1.0, b


@pytest.mark.parametrize("backend,kind", CASES)
def test_stats_deterministic(backend, kind):
    gen = torch.Generator().manual_seed(6)
    gs = [torch.randn(n, generator=gen) for n in (300_000, 5, 70_001)]
    first = run_stats(backend, kind, gs)
    for _ in range(3):
        assert same_bits(run_stats(backend, kind, gs), first)


@pytest.mark.skipif("cpu" not in LIST_BACKENDS, reason="native CPU backend not available")
@pytest.mark.parametrize("kind", ["list", "flat"])
def test_cpu_bitwise_across_thread_counts(kind):
    gen = torch.Generator().manual_seed(7)
    gs = [torch.randn(n, generator=gen) for n in (400_000, 17, 123_457)]
    old = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            st = State([400_000, 17, 123_457], seed=8, kind=kind)
            adam = st.step("cpu", step=3, lr=1e-2)
            results.append((run_stats("cpu", kind, gs), adam, [p.clone() for p in st.p], [m.clone() for m in st.m]))
    finally:
        torch.set_num_threads(old)
    for r in results[1:]:
        assert same_bits(r[0], results[0][0]) and same_bits(r[1], results[0][1])
        assert all(same_bits(a, b) for a, b in zip(r[2] + r[3], results[0][2] + results[0][3]))


# ------------------------------------------------------------------------------------------------
# masked_adamw_
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_matches_torch_adamw_50_steps(backend, kind):
    sizes = [4097, 7, 1, 0, 640]
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    st = State(sizes, seed=9, kind=kind)
    ref = [p.clone().requires_grad_(True) for p in st.p]
    opt = torch.optim.AdamW(ref, foreach=False, **hp)
    for i in range(len(sizes)):  # start torch from the same moments
        opt.state[ref[i]] = dict(step=torch.tensor(0.0), exp_avg=st.m[i].clone(), exp_avg_sq=st.v[i].clone())
    gen = torch.Generator().manual_seed(10)
    for step in range(1, 51):
        gs = [torch.randn(n, generator=gen) for n in sizes]
        for i, g in enumerate(gs):
            st.g[i].copy_(g)
            ref[i].grad = g.clone()
        out = st.step(backend, step=step, lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1], eps=hp["eps"],
                      weight_decay=hp["weight_decay"])
        opt.step()
        check_stats(out, truth(gs))
    for i in range(len(sizes)):
        for got, want in ((st.p[i], ref[i].detach()), (st.m[i], opt.state[ref[i]]["exp_avg"]),
                          (st.v[i], opt.state[ref[i]]["exp_avg_sq"])):
            scale = want.abs().max().item() if want.numel() else 1.0
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)


TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("gdtype", DTYPES, ids=_id)
@pytest.mark.parametrize("pdtype", DTYPES, ids=_id)
@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_dtypes_and_frozen(backend, kind, pdtype, gdtype):
    sizes = [4097, 7, 1, 0, 300, 2049]
    frozen = torch.tensor([False, True, False, True, False, True])
    st = State(sizes, pdtype, gdtype, seed=11, kind=kind)
    ref = st.clone()
    before = st.clone()
    hp = dict(step=4, lr=1e-2, weight_decay=0.05)
    for _ in range(3):
        out = st.step(backend, frozen, **hp)
        want = ref.step("reference", frozen, **hp)
        check_stats(out, want, frozen)
    for i in range(len(sizes)):
        if frozen[i]:
            for k in "pmv":  # frozen: bitwise untouched
                assert same_bits(getattr(st, k)[i], getattr(before, k)[i]), (k, i)
            continue
        tol = TOL[pdtype]
        torch.testing.assert_close(st.p[i].float(), ref.p[i].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(st.m[i], ref.m[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.v[i], ref.v[i], rtol=1e-5, atol=1e-7)
        if st.p[i].numel() > 100:
            assert not torch.equal(st.p[i], before.p[i])  # the update did happen
    for k in "g":
        assert all(same_bits(a, b) for a, b in zip(getattr(st, k), getattr(before, k)))  # grads read only


@pytest.mark.parametrize("pdtype", DTYPES, ids=_id)
@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_master_weights(backend, kind, pdtype):
    """float32 masters: updated like float32 params (and like the reference), the param is its
    master rounded and is never read; frozen matrices and found_inf steps change nothing; a list
    entry without a master is updated in place."""
    sizes = [4097, 7, 1, 0, 300, 2049]
    frozen = torch.tensor([False, True, False, True, False, False])
    st = State(sizes, pdtype, torch.bfloat16, seed=15, kind=kind, masters=True)
    if kind == "list":
        st.w[2] = None  # mixed: this one is a plain in-place param
    for i, p in enumerate(st.p):
        if st.w[i] is not None and not frozen[i]:
            p.fill_(float("nan"))  # a param with a master is written, not read
    ref, before = st.clone(), st.clone()
    hp = dict(lr=1e-3, weight_decay=0.05)
    for step in range(1, 4):
        out = st.step(backend, frozen, step=step, **hp)
        want = ref.step("reference", frozen, step=step, **hp)
        check_stats(out, want, frozen)
    for i in range(len(sizes)):
        if frozen[i]:
            for k in "pmvw":
                assert same_bits(getattr(st, k)[i], getattr(before, k)[i]), (k, i)
            continue
        torch.testing.assert_close(st.m[i], ref.m[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.v[i], ref.v[i], rtol=1e-5, atol=1e-7)
        if st.w[i] is None:
            torch.testing.assert_close(st.p[i].float(), ref.p[i].float(), rtol=TOL[pdtype], atol=TOL[pdtype])
            continue
        torch.testing.assert_close(st.w[i], ref.w[i], rtol=1e-6, atol=1e-7)
        assert same_bits(st.p[i], st.w[i].to(pdtype)), i
        assert same_bits(ref.p[i], ref.w[i].to(pdtype)), i
        if st.p[i].numel() > 100:
            assert not torch.equal(st.w[i], before.w[i])
    # found_inf: statistics only, no master, param or moment changes
    snap = st.clone()
    st.step(backend, frozen, step=4, found_inf=torch.tensor(1.0), **hp)
    for k in "pmvw":
        for a, b in zip(getattr(st, k), getattr(snap, k)):
            assert (a is None and b is None) or same_bits(a, b), k


@pytest.mark.parametrize("found", [None, 0.0, 1.0])
@pytest.mark.parametrize("kind", ["list", "flat"])
def test_master_weights_update_then_copy(kind, found):
    """The update-then-copy form of master weights (what the CUDA C++ backend runs), driven here
    through the reference backend: bitwise what the fused form gives, including frozen matrices
    and found_inf steps whose params do not equal their masters rounded."""
    sizes = [300, 7, 1, 4097]
    frozen = torch.tensor([False, True, False, False])
    ref = backends.get("reference")
    hp = backends.AdamWArgs(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3,
                            found_inf=None if found is None else torch.tensor(found))
    fused, split = (State(sizes, torch.bfloat16, torch.bfloat16, seed=16, masters=True) for _ in range(2))
    for st in (fused, split):
        st.w[1].add_(0.25)  # the frozen matrix: a master its param is not the rounding of
    in_sync = State(sizes, torch.bfloat16, torch.bfloat16, seed=16, masters=True)
    for i, p in enumerate(in_sync.p):
        p.copy_(in_sync.w[i])  # params equal their masters rounded: the optimizer's invariant
    in_sync_fused = in_sync.clone()
    out_a, out_b = (torch.zeros(len(sizes), 3, dtype=torch.float64) for _ in range(2))
    if kind == "list":
        ref.adamw_list(fused.p, fused.g, fused.m, fused.v, frozen, hp, out_a, masters=fused.w)
        ref.adamw_list_via_masters(split.p, split.g, split.m, split.v, frozen, hp, out_b, split.w)
        ref.adamw_list(in_sync_fused.p, in_sync_fused.g, in_sync_fused.m, in_sync_fused.v, frozen, hp, out_a,
                       masters=in_sync_fused.w)
        ref.adamw_list_via_masters(in_sync.p, in_sync.g, in_sync.m, in_sync.v, frozen, hp, out_b, in_sync.w,
                                   masters_in_sync=True)
        pairs = [(fused, split), (in_sync_fused, in_sync)]
    else:
        table = grades.SegmentTable.from_tensors(fused.p)
        flat = [[torch.cat(getattr(st, k)) for k in "pgmvw"] for st in (fused, split)]
        ref.adamw_flat(*flat[0][:4], table, frozen, hp, out_a, master=flat[0][4])
        ref.adamw_flat_via_masters(*flat[1][:4], table, frozen, hp, out_b, flat[1][4])
        pairs = [(flat[0], flat[1])]
    assert same_bits(out_a, out_b)
    for a, b in pairs:
        for k in range(5):
            x, y = (list(getattr(t, "pgmvw"[k])) if isinstance(t, State) else [t[k]] for t in (a, b))
            assert all(same_bits(u, w) for u, w in zip(x, y)), "pgmvw"[k]
    if kind == "list" and found != 1.0:
        assert not same_bits(split.p[1], split.w[1].to(torch.bfloat16))  # frozen kept, although out of sync


@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_grad_scale_and_found_inf(backend, kind):
    sizes = [4097, 33]
    st = State(sizes, seed=12, kind=kind)
    ref = st.clone()
    scale = torch.tensor(1024.0)
    for t in st.g + ref.g:
        t.mul_(1024.0)
    out = st.step(backend, step=2, grad_scale=scale)
    want = ref.step("reference", step=2, grad_scale=scale)
    check_stats(out, want)
    check_stats(out, truth(st.g, scale))
    for k in "pmv":
        for a, b in zip(getattr(st, k), getattr(ref, k)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # found_inf: statistics written, nothing else changes
    before = st.clone()
    out = st.step(backend, step=3, grad_scale=scale, found_inf=torch.tensor(1.0))
    check_stats(out, truth(st.g, scale))
    for k in "pmv":
        assert all(same_bits(a, b) for a, b in zip(getattr(st, k), getattr(before, k)))
    # found_inf == 0 updates as usual
    st.step(backend, step=3, grad_scale=scale, found_inf=torch.tensor(0.0))
    assert not torch.equal(st.p[0], before.p[0])


@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_hyperparameter_forms(backend, kind):
    """lr as a tensor, step as a 0-dim or per-matrix tensor, and beta1 < 0.5 (the other lerp branch)."""
    sizes = [513, 2000, 9]
    forms = [dict(lr=torch.tensor(2e-3), step=torch.tensor(5.0)),
             dict(lr=1e-3, step=torch.tensor([1.0, 7.0, 300.0])),
             dict(lr=1e-2, step=2, beta1=0.3, beta2=0.5, eps=1e-6, weight_decay=0.0)]
    for hp in forms:
        st = State(sizes, seed=13, kind=kind)
        ref = st.clone()
        check_stats(st.step(backend, **hp), ref.step("reference", **hp))
        for k in "pmv":
            for a, b in zip(getattr(st, k), getattr(ref, k)):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,kind", CASES)
def test_adamw_deterministic(backend, kind):
    outs = []
    for _ in range(2):
        st = State([70_000, 3, 4097], seed=14, kind=kind)
        out = st.step(backend, step=3)
        outs.append((out, st.p + st.m + st.v))
    assert same_bits(outs[0][0], outs[1][0])
    assert all(same_bits(a, b) for a, b in zip(outs[0][1], outs[1][1]))


# ------------------------------------------------------------------------------------------------
# bad inputs through the public API: an error naming the problem, and nothing written
# ------------------------------------------------------------------------------------------------

def _lists(n=3, size=10):
    return [[torch.randn(size) for _ in range(n)] for _ in range(4)]


def _flat(size=30):
    return [torch.randn(size) for _ in range(4)]


ROWS = [(0, 10, 0), (10, 10, 1), (20, 10, 2)]


def negbit(x):
    """``x``'s values in a contiguous tensor with the neg bit set (what ``.conj().imag`` of a
    one-element complex tensor gives; longer ones are strided views)."""
    t = torch._neg_view(-x)
    assert t.is_neg() and t.is_contiguous() and torch.equal(t, x)
    return t


def inference(x):
    with torch.inference_mode():
        return x.clone()


class Wrapped(torch.Tensor):
    """A wrapper tensor subclass (the DTensor / FakeTensor kind): its own storage is empty and
    every op is redirected to the tensor it wraps."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(), dtype=inner.dtype,
                                                   device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.inner if isinstance(x, Wrapped) else x
        out = func(*torch.utils._pytree.tree_map(unwrap, args),
                   **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return torch.utils._pytree.tree_map(lambda x: Wrapped(x) if isinstance(x, torch.Tensor) else x, out)

BAD = {
    # name: (builder returning (fn, tensors-to-watch), exception, message regex)
    "length mismatch": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g[:2], m, v, step=1), _lists()),
                        ValueError, "same length"),
    "moment dtype": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g, m[:2] + [m[2].bfloat16()], v, step=1),
                              _lists()), TypeError, r"exp_avgs\[2\] has dtype bfloat16"),
    "float64 grad": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g[:2] + [g[2].double()], m, v, step=1),
                              _lists()), TypeError, r"grads\[2\] has dtype float64"),
    "complex grad": (lambda: (lambda p, g, m, v: grades.grad_stats(g[:2] + [torch.randn(10, dtype=torch.cfloat)]),
                              _lists()), TypeError, "complex"),
    "sparse grad": (lambda: (lambda p, g, m, v: grades.grad_stats(g[:2] + [g[2].to_sparse()]), _lists()),
                    TypeError, "dense"),
    "non-contiguous": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p[:2] + [torch.randn(10, 2)[:, 0]], g, m, v, step=1), _lists()), ValueError, "not contiguous"),
    "device mismatch": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g[:2] + [torch.empty(10, device="meta")], m, v, step=1), _lists()), ValueError, r"grads\[2\] is on (the )?meta"),
    "shape mismatch": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g[:2] + [torch.randn(11)], m, v, step=1),
                                _lists()), ValueError, r"grads\[2\] has shape"),
    "frozen shape": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, torch.zeros(2, dtype=torch.bool), step=1), _lists()), ValueError, "frozen must have shape"),
    "frozen dtype": (lambda: (lambda p, g, m, v: grades.grad_stats(g, frozen=torch.zeros(3)), _lists()),
                     TypeError, "frozen must have dtype bool"),
    "bad lr": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g, m, v, step=1, lr=-1.0), _lists()),
               ValueError, "lr"),
    "segment overrun": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=ROWS[:2] + [(20, 11, 2)]), _flat()), ValueError, "overruns"),
    "segment overlap": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=[(0, 10, 0), (5, 10, 1)]), _flat()), ValueError, "overlap"),
    "flat length": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g[:29].clone(), m, v, step=1, segments=ROWS[:2]), _flat()), ValueError, "equal length"),
    "flat 2-D": (lambda: (lambda p, g, m, v: grades.grad_stats(g.view(3, 10), segments=ROWS), _flat()),
                 ValueError, "1-D"),
    "flat device": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, torch.empty(30, device="meta"), step=1, segments=ROWS), _flat()), ValueError, "meta"),
    "segment end past int64": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=[(2 ** 63 - 8, 8, 0)]), _flat()), ValueError, r"beyond 2\*\*63"),
    "negative segment length": (lambda: (lambda p, g, m, v: grades.grad_stats(g, segments=[(0, -1, 0)]), _flat()),
                                ValueError, "negative length"),
    "num_matrices too small": (lambda: (lambda p, g, m, v: grades.grad_stats(g, segments=ROWS, num_matrices=2),
                                        _flat()), ValueError, "out of range"),
    "num_matrices with a list": (lambda: (lambda p, g, m, v: grades.grad_stats(g, num_matrices=7), _lists()),
                                 ValueError, "num_matrices=7"),
    "step below 1": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g, m, v, step=0), _lists()),
                     ValueError, "step"),
    "step tensor shape": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, g, m, v, step=torch.ones(2)),
                                   _lists()), ValueError, "step must have shape"),
    "integer grad_scale": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, grad_scale=torch.tensor(2)), _lists()), TypeError, "grad_scale"),
    "out shape": (lambda: (lambda p, g, m, v: grades.grad_stats(g, out=torch.zeros(2, 3, dtype=torch.float64)),
                           _lists()), ValueError, "out must be"),
    "complex param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p[:2] + [torch.randn(10, dtype=torch.cfloat)], g, m, v, step=1), _lists()), TypeError, "complex"),
    "sparse param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p[:2] + [p[2].to_sparse()], g, m, v, step=1),
                              _lists()), TypeError, "dense"),
    "master dtype": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, master_params=[None, None, torch.zeros(10, dtype=torch.bfloat16)]), _lists()),
        TypeError, r"master_params\[2\] has dtype bfloat16"),
    "master shape": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, master_params=[torch.zeros(10), None, torch.zeros(11)]), _lists()),
        ValueError, r"master_params\[2\] has shape"),
    "master count": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, master_params=[torch.zeros(10)]), _lists()), ValueError, "one entry per param"),
    "master tensor with lists": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, master_params=torch.zeros(30)), _lists()), TypeError, "must be a list"),
    "master is the param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, master_params=[p[0], None, None]), _lists()), ValueError, "share memory"),
    "flat master length": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=ROWS, master_params=torch.zeros(29)), _flat()), ValueError, "30 elements"),
    "flat master list": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=ROWS, master_params=[torch.zeros(30)]), _flat()), TypeError, "one flat"),
    "flat master dtype": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=ROWS, master_params=torch.zeros(30, dtype=torch.float16)), _flat()),
        TypeError, "float16"),
    "overlapping views (list)": (lambda: (lambda base: grades.masked_adamw_(
        [base[0:10]], [base[5:15]], [torch.zeros(10)], [torch.zeros(10)], step=1), [torch.randn(20)]),
        ValueError, "share memory"),
    "overlapping views (flat)": (lambda: (lambda base, p, g: grades.masked_adamw_(
        p, g, base[0:30], base[10:40], step=1, segments=ROWS), [torch.rand(40), torch.randn(30), torch.randn(30)]),
        ValueError, "share memory"),
    "out aliases a moment": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, out=m[0][:18].view(torch.float64).view(3, 3)), _lists(size=20)),
        ValueError, r"(out and exp_avgs\[0\]|exp_avgs\[0\] and out) share memory"),
    "grad_scale is a param element": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, segments=ROWS, grad_scale=p[0]), _flat()), ValueError, "share memory"),
    "stats out aliases a gradient": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, out=g[1][:18].view(torch.float64).view(3, 3)), _lists(size=20)), ValueError, "share memory"),
    "segments not [S, 3]": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=[[0, 8], [8, 8], [0, 1]]), _flat()), ValueError, r"shape \[S, 3\]"),
    "segments of floats": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=[(0.5, 10, 0)]), _flat()), TypeError, "three integers"),
    "num_matrices a bool": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=ROWS, num_matrices=True), _flat()), TypeError, "num_matrices must be an int"),
    "matrix id beyond 2**31": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=[(0, 10, 10 ** 12)]), _flat()), ValueError, r"num_matrices must be in"),
    # tensors without plain storage: a wrapper subclass (used to crash the native kernels) or meta
    "wrapper subclass grad": (lambda: (lambda p, g, m, v: grades.grad_stats(g[:1] + [Wrapped(g[1])]), _lists()),
                              TypeError, r"grads\[1\] is a Wrapped, a tensor subclass without plain storage"),
    "wrapper subclass param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        [Wrapped(p[0])] + p[1:], g, m, v, step=1), _lists()), TypeError, r"params\[0\] is a Wrapped"),
    "wrapper subclass flat moment": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, Wrapped(m), v, step=1, segments=ROWS), _flat()), TypeError, r"exp_avgs \(flat buffer\) is a Wrapped"),
    "wrapper subclass lr": (lambda: (lambda p, g, m, v: grades.masked_adamw_(
        p, g, m, v, step=1, lr=Wrapped(torch.tensor(0.1))), _lists()), TypeError, "lr is a Wrapped"),
    "wrapper subclass frozen": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, frozen=Wrapped(torch.zeros(3, dtype=torch.bool))), _lists()), TypeError, "frozen is a Wrapped"),
    "wrapper subclass out": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, out=Wrapped(torch.zeros(3, 3, dtype=torch.float64))), _lists()), TypeError, "out is a Wrapped"),
    "meta grads": (lambda: (lambda p, g, m, v: grades.grad_stats([torch.empty(5, device="meta")]), _lists()),
                   ValueError, r"grads\[0\] is on the meta device"),
    # a lazily negated view (neg bit) where the sign matters, read raw, gave the opposite update
    "neg-bit grad": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p, [negbit(g[0])] + g[1:], m, v, step=1),
                              _lists()), ValueError, r"grads\[0\] has its negative bit set"),
    "neg-bit flat param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(negbit(p), g, m, v, step=1, segments=ROWS),
                                    _flat()), ValueError, r"params \(flat buffer\) has its negative bit set"),
    "neg-bit out": (lambda: (lambda p, g, m, v: grades.grad_stats(g, out=negbit(torch.zeros(3, 3, dtype=torch.float64))),
                             _lists()), ValueError, "out has its negative bit set"),
    # tensors made under inference mode cannot be written outside it (as torch's in-place ops say)
    "inference param": (lambda: (lambda p, g, m, v: grades.masked_adamw_(p[:2] + [inference(p[2])], g, m, v, step=1),
                                 _lists()), ValueError, r"params\[2\] was made under torch.inference_mode"),
    "inference out": (lambda: (lambda p, g, m, v: grades.grad_stats(
        g, segments=ROWS, out=inference(torch.zeros(3, 3, dtype=torch.float64))), _flat()),
        ValueError, "out was made under torch.inference_mode"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_and_write_nothing(case):
    build, exc, msg = BAD[case]
    fn, tensors = build()
    flat = [t for group in tensors for t in (group if isinstance(group, list) else [group])]
    snapshot = [t.clone() for t in flat]
    with pytest.raises(exc, match=msg):
        fn(*tensors)
    assert all(same_bits(a, b) for a, b in zip(flat, snapshot))


def test_cpu_extension_rejects_rows_past_its_tensor():
    """The extension's own bounds check survives int64 overflow of start + length."""
    ok, why = backends.get("cpu").available()
    if not ok:
        pytest.skip(f"native CPU backend not available: {why}")
    ext, buf = backends.get("cpu")._ext(), torch.zeros(100)
    out = torch.zeros(1, 3, dtype=torch.float64)
    for row in ((2 ** 63 - 8, 8, 0), (96, 8, 0), (-1, 2, 0)):
        with pytest.raises(RuntimeError, match="outside its tensor"):
            ext.grad_stats_flat(buf, torch.tensor([row]), None, out)
    assert not out.any()


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_writes_bump_version_counters_and_found_inf_is_any_nonzero(backend):
    """In-place writes through raw pointers bump the autograd version counters (a stale graph then
    refuses to backpropagate, as after torch's in-place ops); a neg-bit gradient is fine for the
    statistics (magnitudes only); a float64 found_inf of 1e-300 skips the update (no rounding to 0)."""
    w = torch.nn.Parameter(torch.randn(6))
    y = (w * w).sum()
    m, v = torch.zeros(6), torch.zeros(6)
    out = torch.zeros(1, 3, dtype=torch.float64)
    versions = [t._version for t in (w, m, v, out)]
    grades.masked_adamw_([w], [torch.ones(6)], [m], [v], step=1, lr=0.1, out=out, backend=backend)
    assert all(t._version > old for t, old in zip((w, m, v, out), versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    out = torch.zeros(1, 3, dtype=torch.float64)
    grades.grad_stats([torch.ones(3)], out=out, backend=backend)
    assert out._version > 0
    g = torch.randn(7)
    assert torch.equal(grades.grad_stats([negbit(g)], backend=backend), grades.grad_stats([g], backend=backend))
    p, before = torch.ones(4), torch.ones(4)
    grades.masked_adamw_([p], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], step=1, lr=0.1,
                         found_inf=torch.tensor(1e-300, dtype=torch.float64), backend=backend)
    assert torch.equal(p, before)


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_adamw_on_leaf_parameters(backend):
    """Leaf parameters that require grad are updated in place (no autograd error, no partial write)."""
    params = [torch.nn.Parameter(torch.randn(17)), torch.nn.Parameter(torch.randn(4, 5))]
    want = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    grades.masked_adamw_(params, grads, ms, vs, step=1, lr=0.1, backend=backend)
    grades.masked_adamw_(want, grads, [torch.zeros_like(p) for p in want], [torch.zeros_like(p) for p in want],
                         step=1, lr=0.1, backend="reference")
    for p, w in zip(params, want):
        assert p.requires_grad
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)


def test_grades_backend_switch_applies_where_supported(monkeypatch):
    """GRADES_BACKEND=triton steers flat inputs; list inputs (no Triton path) keep the auto choice."""
    monkeypatch.setenv("GRADES_BACKEND", "triton")
    cpu = torch.device("cpu")
    assert backends.select(cpu, "list").name == backends.select(cpu, "list", "auto").name != "triton"
    if backends.get("triton").available()[0]:
        assert backends.select(cpu, "flat").name == "triton"
    with pytest.raises(ValueError, match="does not support list"):
        backends.select(cpu, "list", "triton")  # asked for by name: an error, not a silent switch
    monkeypatch.setenv("GRADES_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        backends.select(cpu, "list")


def test_strict_selects_native_cpu(monkeypatch):
    ok, why = backends.get("cpu").available()
    if not ok:
        if backends.strict():
            pytest.fail(f"GRADES_STRICT=1 but the native CPU backend is not available: {why}")
        pytest.skip(f"native CPU backend not available: {why}")
    monkeypatch.setenv("GRADES_STRICT", "1")
    monkeypatch.delenv("GRADES_BACKEND", raising=False)
    for kind in ("list", "flat"):
        assert backends.select(torch.device("cpu"), kind).name == "cpu"
    out = grades.grad_stats([torch.ones(5)])  # and the public op runs through it
    assert out.tolist() == [[5.0, 5.0, 0.0]]


def test_cuda_backend_device_tables_from_host_data():
    """The CUDA backend's cached plans and slot tables are built on the host and uploaded once; the
    meta device takes the same host-side path without a GPU. (A plan built as a device tensor and
    uploaded again once made every flat call fail on a GPU: pinning a device tensor raises.)"""
    from grades._validate import upload
    from grades.backends.cuda import CHUNK, CudaBackend
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="host data"):
        upload(torch.zeros(2, device=meta), meta)
    be = CudaBackend()
    n0, n1 = 2 * CHUNK + 17, 5
    table = grades.SegmentTable([(0, n0, 0), (n0, n1, 1)])
    lay = be._flat_layout(table, meta, "stats")
    assert be._flat_layout(table, meta, "adamw").plan is lay.plan  # one plan per table and device
    chunks = 3 + 1
    slots, plan = lay.tables(torch.zeros(1, 8, dtype=torch.int64), meta)
    assert plan.device == meta and plan.shape == (4 * chunks + 3 + chunks,) and slots.shape == (1, 8)
    host = torch.zeros(2, 8, dtype=torch.int64)
    host[:, 6] = torch.tensor([n0, n1])
    lst = be._list_layout(host, meta, "stats")
    assert be._list_layout(host.clone(), meta, "stats") is lst  # keyed by sizes
    s1, p1 = lst.tables(host, meta)
    s2, p2 = lst.tables(host.clone(), meta)
    assert s2 is s1 and p2 is p1  # same pointers: nothing uploaded again
    moved = host.clone()
    moved[0, 0] = 64
    assert lst.tables(moved, meta)[0] is not s1


def test_segment_table_is_read_only():
    """Cached chunk lists and device plans derive from the rows, so the rows cannot change."""
    table = grades.SegmentTable([(0, 10, 0), (10, 5, 1)])
    with pytest.raises(ValueError, match="read-only"):
        table.array[0, 1] = 12
    assert grades.SegmentTable(table).array.tolist() == [[0, 10, 0], [10, 5, 1]]
