"""CUDA-device tests of the native CUDA backend (and Triton's flat path when it is available).

Every check compares against the torch reference backend run on the same CUDA tensors. These tests
are skipped without a GPU (see conftest.py).
"""
from __future__ import annotations

import pytest
import torch

import grades
from grades import backends
from grades.ops import grad_stats, masked_adamw_

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEV = "cuda"
STATS_RTOL = 1e-4  # float32 partials per chunk vs the reference's float64 sums


def _names(kind: str) -> list[str]:
    """Non-reference backends usable for ``kind`` inputs on CUDA; the CUDA one must be among them."""
    avail = backends.availability()
    assert avail["cuda"][0], f"cuda backend not available: {avail['cuda'][1]}"
    out = []
    for name, (ok, _) in avail.items():
        if name != "reference" and ok and backends.get(name).supports(torch.device(DEV), kind):
            out.append(name)
    return out


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _randn(n: int, dtype=torch.float32, gen=None, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(n, device=DEV, generator=gen) * scale).to(dtype)


def _check_stats(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == torch.float64 and got.shape == ref.shape and got.device == ref.device
    torch.testing.assert_close(got[:, :2], ref[:, :2], rtol=STATS_RTOL, atol=1e-30, equal_nan=True)
    assert torch.equal(got[:, 2], ref[:, 2]), (got[:, 2], ref[:, 2])


def _odd_views(sizes, dtype, offset: int, gen) -> list[torch.Tensor]:
    """Contiguous tensors that are slices at odd element offsets of one larger buffer."""
    base = _randn(sum(sizes) + offset * (len(sizes) + 1), dtype, gen)
    out, pos = [], offset
    for n in sizes:
        out.append(base[pos:pos + n])
        pos += n + offset
    return out


# ------------------------------------------------------------------ grad_stats, list form

@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_list_sizes(dtype):
    g = _gen(1)
    sizes = [0, 1, 7, 4097, 32768, 32769, 3_000_001]
    grads = [_randn(n, dtype, g) for n in sizes]
    ref = grad_stats(grads, backend="reference")
    for name in _names("list"):
        _check_stats(grad_stats(grads, backend=name), ref)


def test_stats_list_mixed_dtypes_and_shapes():
    g = _gen(2)
    grads = [_randn(n, dt, g).reshape(-1, 1) for n, dt in
             zip([5, 64 * 64, 1 << 20, 123_457, 9, 2_500_000], [torch.float32, torch.bfloat16, torch.float16] * 2)]
    ref = grad_stats(grads, backend="reference")
    for name in _names("list"):
        _check_stats(grad_stats(grads, backend=name), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [1, 3, 5])
def test_stats_list_misaligned_views(dtype, offset):
    grads = _odd_views([1, 7, 33, 4097, 70_001, 1_000_003], dtype, offset, _gen(3))
    assert all(t.is_contiguous() for t in grads)
    ref = grad_stats(grads, backend="reference")
    for name in _names("list"):
        _check_stats(grad_stats(grads, backend=name), ref)


def test_stats_list_all_empty_and_out():
    grads = [torch.empty(0, device=DEV), torch.empty(0, 3, device=DEV)]
    out = torch.full((2, 3), 7.0, dtype=torch.float64, device=DEV)
    for name in _names("list"):
        got = grad_stats(grads, out=out, backend=name)
        assert got is out and torch.equal(out, torch.zeros_like(out))


def test_stats_frozen_rows_zero_and_unread():
    g = _gen(4)
    grads = [_randn(n, torch.float32, g) for n in (100, 50_000, 7, 40_000)]
    grads[1][17] = float("nan")  # frozen: must neither be counted nor poison the sums
    grads[3][:] = float("inf")
    frozen = torch.tensor([False, True, False, True], device=DEV)
    ref = grad_stats(grads, frozen=frozen, backend="reference")
    for name in _names("list"):
        got = grad_stats(grads, frozen=frozen, backend=name)
        _check_stats(got, ref)
        assert torch.equal(got[1], torch.zeros(3, dtype=torch.float64, device=DEV))
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_nonfinite_count_exact(dtype):
    g = _gen(5)
    grads = [_randn(n, dtype, g) for n in (1, 9, 4097, 300_001)]
    counts = []
    for t in grads:
        k = max(1, t.numel() // 997)
        idx = torch.randperm(t.numel(), device=DEV, generator=g)[:k]
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")], device=DEV).to(dtype)
        t[idx] = vals[torch.arange(k, device=DEV) % 3]
        counts.append(k)
    for name in _names("list"):
        got = grad_stats(grads, backend=name)
        assert got[:, 2].tolist() == [float(c) for c in counts]
        assert torch.isnan(got[:, 0]).all() == (min(counts) > 0)


def test_stats_deterministic_bitwise():
    g = _gen(6)
    grads = [_randn(n, dt, g, scale=3.0) for n, dt in
             zip([4_000_037, 1, 65_536, 999_999], [torch.float32, torch.bfloat16, torch.float16, torch.float32])]
    buf = torch.cat([t.float() for t in grads])
    table = grades.SegmentTable.from_tensors(grads)
    for name in _names("list"):
        first = grad_stats(grads, backend=name)
        for _ in range(3):
            assert torch.equal(grad_stats(grads, backend=name), first)
    for name in _names("flat"):
        first = grad_stats(buf, segments=table, backend=name)
        for _ in range(3):
            assert torch.equal(grad_stats(buf, segments=table, backend=name), first)


# ------------------------------------------------------------------ grad_stats, flat form

@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_flat_sharded_segments(dtype):
    g = _gen(7)
    buf = _randn(5_000_000, dtype, g)
    # odd offsets, gaps, a matrix split into several segments, LoRA-style pairs, an unused id
    segs = [(3, 4097, 0), (4101, 1, 2), (5000, 1_200_001, 1), (1_300_000, 7, 2), (2_000_001, 2_999_990, 0),
            (1_250_000, 0, 4), (4_999_999, 1, 3)]
    for frozen in (None, torch.tensor([False, False, True, False, False, False], device=DEV)):
        ref = grad_stats(buf, segments=segs, num_matrices=6, frozen=frozen, backend="reference")
        for name in _names("flat"):
            got = grad_stats(buf, segments=segs, num_matrices=6, frozen=frozen, backend=name)
            _check_stats(got, ref)
            assert torch.equal(got[5], torch.zeros(3, dtype=torch.float64, device=DEV))


def test_stats_flat_misaligned_buffer_view():
    g = _gen(8)
    big = _randn(2_000_011, torch.bfloat16, g)
    buf = big[3:]  # a contiguous 1-D view starting at an odd element
    table = grades.SegmentTable([(1, 99_999, 0), (100_003, 1_000_000, 1), (1_100_005, 5, 0)])
    ref = grad_stats(buf, segments=table, backend="reference")
    for name in _names("flat"):
        _check_stats(grad_stats(buf, segments=table, backend=name), ref)


# ------------------------------------------------------------------ masked AdamW

def _adamw_inputs(sizes, pdt, gdt, seed, offset=0):
    g = _gen(seed)
    if offset:
        params = _odd_views(sizes, pdt, offset, g)
        grads = _odd_views(sizes, gdt, offset + 2, g)
        m = _odd_views(sizes, torch.float32, offset + 1, g)
        v = [t.abs_() for t in _odd_views(sizes, torch.float32, offset, g)]
    else:
        params = [_randn(n, pdt, g) for n in sizes]
        grads = [_randn(n, gdt, g, scale=0.1) for n in sizes]
        m = [_randn(n, torch.float32, g, scale=0.01) for n in sizes]
        v = [_randn(n, torch.float32, g, scale=0.01).abs_() for n in sizes]
    return params, grads, m, v


def _clone_like(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` at the same 16-byte alignment phase (a plain clone would realign views)."""
    off = t.storage_offset() % 8
    buf = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
    return buf[off:off + t.numel()].view(t.shape).copy_(t)


def _clone(lists):
    return [[_clone_like(t) for t in lst] for lst in lists]


def _assert_adamw_close(got, ref, pdt):
    names = ("param", "exp_avg", "exp_avg_sq")
    for name, a_list, b_list in zip(names, got, ref):
        for a, b in zip(a_list, b_list):
            if name == "param" and pdt != torch.float32:
                # one rounding of the float32 result to 16 bits may land on the neighbour
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if pdt == torch.bfloat16 else 2e-3,
                                           atol=1e-5, equal_nan=True)
                if a.numel():
                    assert (a != b).float().mean().item() < 0.01
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("pdt", DTYPES)
@pytest.mark.parametrize("gdt", DTYPES)
def test_adamw_list_dtype_combos(pdt, gdt):
    sizes = [0, 1, 7, 4097, 70_001, 1_000_003]
    base = _adamw_inputs(sizes, pdt, gdt, seed=10)
    frozen = torch.tensor([False, False, True, False, False, True], device=DEV)
    hp = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    ref_in = _clone(base)
    ref_p, ref_g, ref_m, ref_v = ref_in
    ref_stats = masked_adamw_(ref_p, ref_g, ref_m, ref_v, frozen, backend="reference", **hp)
    for name in _names("list"):
        p, gr, m, v = _clone(base)
        stats = masked_adamw_(p, gr, m, v, frozen, backend=name, **hp)
        _check_stats(stats, ref_stats)
        _assert_adamw_close((p, m, v), (ref_p, ref_m, ref_v), pdt)
        for i in (2, 5):  # frozen: bitwise untouched
            assert torch.equal(p[i], base[0][i]) and torch.equal(m[i], base[2][i]) and torch.equal(v[i], base[3][i])
        assert all(torch.equal(a, b) for a, b in zip(gr, base[1]))  # grads are never written


@pytest.mark.parametrize("pdt", DTYPES)
@pytest.mark.parametrize("offset", [1, 3])
def test_adamw_list_misaligned(pdt, offset):
    sizes = [1, 7, 33, 4097, 100_003]
    base = _adamw_inputs(sizes, pdt, torch.bfloat16, seed=11, offset=offset)
    hp = dict(step=5, lr=3e-3, weight_decay=0.01)
    ref = _clone(base)
    ref_stats = masked_adamw_(*ref, backend="reference", **hp)
    for name in _names("list"):
        got = _clone(base)
        _check_stats(masked_adamw_(*got, backend=name, **hp), ref_stats)
        _assert_adamw_close((got[0], got[2], got[3]), (ref[0], ref[2], ref[3]), pdt)


@pytest.mark.parametrize("pdt,gdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
def test_adamw_flat_sharded(pdt, gdt):
    g = _gen(12)
    n = 3_000_017
    base = [_randn(n, pdt, g), _randn(n, gdt, g, scale=0.1), _randn(n, torch.float32, g, scale=0.01),
            _randn(n, torch.float32, g, scale=0.01).abs_()]
    segs = [(1, 4097, 0), (4099, 1_000_000, 1), (1_004_100, 3, 0), (1_100_001, 1_900_000, 2), (3_000_005, 12, 3)]
    frozen = torch.tensor([False, False, True, False], device=DEV)
    step = torch.tensor([2.0, 7.0, 1.0, 100.0], device=DEV)
    hp = dict(step=step, lr=torch.tensor(1e-2, device=DEV), weight_decay=0.05)
    ref = [t.clone() for t in base]
    ref_stats = masked_adamw_(*ref, frozen, segments=segs, backend="reference", **hp)
    for name in _names("flat"):
        got = [t.clone() for t in base]
        _check_stats(masked_adamw_(*got, frozen, segments=segs, backend=name, **hp), ref_stats)
        _assert_adamw_close(([got[0]], [got[2]], [got[3]]), ([ref[0]], [ref[2]], [ref[3]]), pdt)
        for t, b in zip(got, base):  # frozen segment and the gaps are bitwise untouched
            for lo, hi in ((1_100_001, 3_000_001), (0, 1), (4098, 4099), (3_000_001, 3_000_005)):
                assert torch.equal(t[lo:hi], b[lo:hi])


def _run_adamw(kind, tensors, name, **hp):
    """Run masked_adamw_ on lists, or on flat copies of them that are split back afterwards."""
    if kind == "list":
        return masked_adamw_(*tensors, backend=name, **hp)
    sizes = [t.numel() for t in tensors[0]]
    flat = [torch.cat(lst) for lst in tensors]
    stats = masked_adamw_(*flat, segments=grades.SegmentTable.from_tensors(tensors[0]), backend=name, **hp)
    for lst, f in zip(tensors, flat):
        for t, piece in zip(lst, f.split(sizes)):
            t.copy_(piece)
    return stats


@pytest.mark.parametrize("kind", ["list", "flat"])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_adamw_grad_scale_and_found_inf(kind, found):
    base = _adamw_inputs([4097, 200_001, 3], torch.float32, torch.float16, seed=13)
    base[1][0][5] = float("inf")
    hp = dict(step=torch.tensor(4.0, device=DEV), lr=1e-3, grad_scale=torch.tensor(1024.0, device=DEV),
              found_inf=torch.tensor(found, device=DEV))
    ref = _clone(base)
    ref_stats = _run_adamw(kind, ref, "reference", **hp)
    for name in _names(kind):
        got = _clone(base)
        stats = _run_adamw(kind, got, name, **hp)
        _check_stats(stats, ref_stats)
        assert stats[:, 2].tolist() == [1.0, 0.0, 0.0]
        if found:
            for a, b in zip(got, base):
                assert all(torch.equal(x, y) for x, y in zip(a, b))
        else:
            _assert_adamw_close((got[0], got[2], got[3]), (ref[0], ref[2], ref[3]), torch.float32)


def test_adamw_matches_torch_adamw_50_steps():
    g = _gen(14)
    shapes = [(64, 64), (1000, 37), (7,), (1,), (4097,), (512, 2048)]
    hps = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
           dict(lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.3)]
    for name in _names("list"):
        for hp in hps:
            ref = [torch.randn(s, device=DEV, generator=g) for s in shapes]
            mine = [t.clone() for t in ref]
            ref_params = [torch.nn.Parameter(t) for t in ref]
            opt = torch.optim.AdamW(ref_params, **hp)
            m = [torch.zeros_like(t) for t in mine]
            v = [torch.zeros_like(t) for t in mine]
            for step in range(1, 51):
                grads = [torch.randn(s, device=DEV, generator=g) * 0.1 for s in shapes]
                for p, gr in zip(ref_params, grads):
                    p.grad = gr.clone()
                opt.step()
                masked_adamw_(mine, grads, m, v, step=step, lr=hp["lr"], beta1=hp["betas"][0],
                              beta2=hp["betas"][1], eps=hp["eps"], weight_decay=hp["weight_decay"], backend=name)
            for a, b in zip(mine, ref_params):
                torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
            for a, p in zip(m, ref_params):
                torch.testing.assert_close(a, opt.state[p]["exp_avg"], rtol=1e-5, atol=1e-8)


def test_adamw_deterministic_bitwise():
    sizes = [3_000_001, 4097, 1]
    base = _adamw_inputs(sizes, torch.bfloat16, torch.float32, seed=15)
    for name in _names("list"):
        runs = []
        for _ in range(2):
            t = _clone(base)
            stats = masked_adamw_(*t, step=2, lr=1e-3, backend=name)
            runs.append((stats, t))
        assert torch.equal(runs[0][0], runs[1][0])
        for a, b in zip(runs[0][1], runs[1][1]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ no host synchronisation

def test_no_host_sync():
    g = _gen(16)
    sizes = [4097, 100_001, 9]
    grads = [_randn(n, torch.bfloat16, g) for n in sizes]
    params, _, m, v = _adamw_inputs(sizes, torch.float32, torch.bfloat16, seed=17)
    buf = torch.cat([t.float() for t in grads])
    flat = [torch.cat(p) for p in (params, grads, m, v)]
    frozen = torch.tensor([False, True, False], device=DEV)
    lr = torch.tensor(1e-3, device=DEV)
    step = torch.tensor([1.0, 2.0, 3.0], device=DEV)
    scale = torch.tensor(2.0, device=DEV)
    found = torch.zeros((), device=DEV)

    def calls(name, segs):
        grad_stats(grads, frozen=frozen, backend=name)
        grad_stats(buf, segments=segs, frozen=frozen, backend=name)
        masked_adamw_(params, grads, m, v, frozen, step=step, lr=lr, grad_scale=scale, found_inf=found,
                      backend=name)
        masked_adamw_(*flat, frozen, segments=segs, step=3, lr=1e-3, backend=name)

    table = grades.SegmentTable.from_tensors(grads)
    for name in _names("list"):
        calls(name, table)  # warm: build, layouts, device tables
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            calls(name, table)  # cached layouts
            calls(name, [(0, 4097, 0), (4097, 100_001, 1), (104_098, 9, 2)])  # a fresh table
            grad_stats([t[:-1] for t in grads], backend=name)  # a fresh list layout
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_cached_tables_shared_across_streams():
    """A segment table's plan and a list layout's tables, first uploaded on one stream, are used at
    once from another stream (which must wait for the upload, not read a half-copied plan)."""
    g = _gen(18)
    sizes = [4097, 300_001, 9]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for name in _names("flat"):
        torch.cuda.synchronize()
        buf = _randn(sum(sizes), gen=g)
        table = grades.SegmentTable.from_tensors([buf[:n] for n in sizes])  # fresh: nothing cached
        ref = grad_stats(buf, segments=table, backend="reference")
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            a = grad_stats(buf, segments=table, backend=name)
        with torch.cuda.stream(s2):
            b = grad_stats(buf, segments=table, backend=name)
        torch.cuda.synchronize()
        _check_stats(a, ref)
        _check_stats(b, ref)
    for name in _names("list"):
        grads = [_randn(n, gen=g) for n in [n + 1 for n in sizes]]  # sizes no other test uses
        others = [_randn(t.numel(), gen=g) for t in grads]  # the same layout, other pointers
        ref_a, ref_b = (grad_stats(x, backend="reference") for x in (grads, others))
        torch.cuda.synchronize()
        with torch.cuda.stream(s1):
            a = grad_stats(grads, backend=name)
        with torch.cuda.stream(s2):
            b = grad_stats(others, backend=name)  # replaces the layout's slot table
        with torch.cuda.stream(s1):
            a2 = grad_stats(grads, backend=name)
        torch.cuda.synchronize()
        for got, ref in ((a, ref_a), (b, ref_b), (a2, ref_a)):
            _check_stats(got, ref)


def test_two_kernel_launches_per_op():
    from torch.profiler import ProfilerActivity, profile
    grads = [torch.randn(n, device=DEV) for n in [10, 100_000, 5, 1_000_000] * 25]
    params = [torch.randn_like(t) for t in grads]
    m = [torch.zeros_like(t) for t in grads]
    v = [torch.zeros_like(t) for t in grads]
    grad_stats(grads, backend="cuda")
    masked_adamw_(params, grads, m, v, step=1, backend="cuda")
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            grad_stats(grads, backend="cuda")
            masked_adamw_(params, grads, m, v, step=2, backend="cuda")
            torch.cuda.synchronize()
    except Exception as e:  # profiler unavailable in this environment
        pytest.skip(f"profiler unavailable: {e}")
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [n for n in names if "grades_cuda" in n or n.split("(")[0].endswith(("stats_kernel", "adamw_kernel",
                                                                                 "finish_kernel"))]
    if not names:
        pytest.skip("profiler recorded no CUDA activity")
    assert sum("stats_kernel" in n for n in ours) == 1, names
    assert sum("adamw_kernel" in n for n in ours) == 1, names
    assert sum("finish_kernel" in n for n in ours) == 2, names


@pytest.mark.parametrize("kind", ["list", "flat"])
@pytest.mark.parametrize("pdt", [torch.bfloat16, torch.float16])
def test_adamw_master_weights(kind, pdt):
    """float32 masters: masters as the reference computes them, each param its master rounded,
    frozen matrices (params and masters) bitwise untouched."""
    sizes = [4097, 200_001, 3, 70_000]
    base = _adamw_inputs(sizes, pdt, torch.bfloat16, seed=21)
    masters = [p.float() * (1 + 1e-3 * torch.rand(p.shape, device=DEV, generator=_gen(22))) for p in base[0]]
    frozen = torch.tensor([False, False, False, True], device=DEV)
    hp = dict(step=3, lr=1e-3, weight_decay=0.05)

    def run(name, tensors, ms):
        if kind == "list":
            return masked_adamw_(*tensors, frozen, master_params=ms, backend=name, **hp)
        flat = [torch.cat(lst) for lst in tensors]
        fm = torch.cat(ms)
        stats = masked_adamw_(*flat, frozen, master_params=fm, segments=grades.SegmentTable.from_tensors(tensors[0]),
                              backend=name, **hp)
        for lst, f in zip(tensors + [ms], flat + [fm]):
            for t, piece in zip(lst, f.split(sizes)):
                t.copy_(piece)
        return stats

    ref, ref_m = _clone(base), [m.clone() for m in masters]
    ref_stats = run("reference", ref, ref_m)
    for name in _names(kind):
        got, got_m = _clone(base), [m.clone() for m in masters]
        _check_stats(run(name, got, got_m), ref_stats)
        for i in range(len(sizes)):
            if frozen[i]:
                assert torch.equal(got[0][i], base[0][i]) and torch.equal(got_m[i], masters[i])
                continue
            torch.testing.assert_close(got_m[i], ref_m[i], rtol=1e-6, atol=1e-7)
            assert torch.equal(got[0][i], got_m[i].to(pdt))
            torch.testing.assert_close(got[2][i], ref[2][i], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("master_weights", [False, True])
def test_optimizer_step_no_sync_across_freezes(master_weights):
    """FrozenAwareAdamW.step() stays sync-free on the steps right after freezes the host learns of
    (plans are rebuilt then: index and participation tensors go up through pinned memory)."""
    gen = _gen(7)
    dt = torch.bfloat16 if master_weights else torch.float32
    params = [torch.nn.Parameter(_randn(n, dt, gen=gen)) for n in (4097, 33, 100_001, 5, 777)]
    opt = grades.FrozenAwareAdamW(params, lr=1e-3, master_weights=master_weights)

    def fill_grads(skip=()):
        for i, p in enumerate(params):
            p.grad = None if i in skip else _randn(p.numel(), dt, gen=gen)

    fill_grads()
    opt.step()  # lazy state and the first plan are built outside the guarded region
    torch.cuda.synchronize()
    mask = torch.zeros(len(params), dtype=torch.bool, device=DEV)
    mask[3] = True
    host_mask = [False, False, False, True, False]  # what a completed non-blocking copy would hold
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.freeze(params[1])  # host-known freeze: the next step rebuilds its plan
        fill_grads()
        opt.step()
        opt.freeze_mask_(mask)  # device decision, then the host learns it from its own copy
        opt.sync_frozen_state(host_mask)
        fill_grads(skip=(4,))  # and a parameter without a gradient this step
        opt.step()
        fill_grads()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert opt.frozen.tolist() == [False, True, False, True, False]
    assert opt.last_participation.tolist() == [True, False, True, False, True]
    if master_weights:
        for i, p in enumerate(params):
            assert i in (1, 3) or torch.equal(p, opt.state[p]["master_param"].to(dt))
