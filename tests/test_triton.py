"""Triton backend against the torch reference (and torch.optim.AdamW).

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py), so sizes are kept small. Every comparison is
parametrised over the device: the ``cuda`` cases carry the ``gpu`` mark and run only on a GPU,
where the CPU cases skip (the kernels are compiled, not interpreted, there).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from grades import ops  # noqa: E402
from grades._validate import SegmentTable  # noqa: E402
from grades.backends import triton_backend as tb  # noqa: E402
from grades.backends._triton_kernels import _bf16_rne  # noqa: E402

triton = pytest.importorskip("triton")
tl = triton.language

NAN, INF = float("nan"), float("inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _device_params():
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not tb._interpreting(),
                                                     reason="CPU tensors need TRITON_INTERPRET=1")),
        pytest.param("cuda", marks=pytest.mark.gpu),
    ]


@pytest.fixture(params=_device_params())
def dev(request):
    return torch.device(request.param)


def _kern():
    return tb._kernels()


def stats(buf, segs, frozen=None, backend="triton", num_matrices=None):
    return ops.grad_stats(buf, segments=segs, frozen=frozen, backend=backend, num_matrices=num_matrices)


def check_stats(got, want, rtol=1e-5):
    """Sums agree to float32-accumulation accuracy (NaN/Inf where the reference has them); counts exactly."""
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got[:, :2].cpu(), want[:, :2].cpu(), rtol=rtol, atol=1e-6, equal_nan=True)
    assert torch.equal(got[:, 2].cpu(), want[:, 2].cpu())


def sharded_segments(rng, num_matrices, pieces, piece_len, gap=(0, 40)):
    """Rows ``(offset, length, matrix_id)``: several pieces per matrix, shuffled, with gaps; returns
    the rows (in shuffled table order) and the buffer length."""
    ids = np.repeat(np.arange(num_matrices), pieces)
    rng.shuffle(ids)
    rows, off = [], int(rng.integers(0, 17))
    for mid in ids:
        n = int(rng.integers(piece_len[0], piece_len[1] + 1))
        rows.append((off, n, int(mid)))
        off += n + int(rng.integers(gap[0], gap[1] + 1))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], off


# ----------------------------------------------------------------------------------------------
# availability and host-side planning


def test_available_and_registered():
    from grades import backends
    ok, why = backends.get("triton").available()
    assert ok, why
    assert backends.get("triton").kinds == ("flat",)


def test_unavailable_reason_without_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("with a GPU the backend is available regardless of the interpreter")
    monkeypatch.setattr(_kern(), "INTERPRETED", False)
    ok, why = tb.TritonBackend().available()
    assert not ok and "TRITON_INTERPRET" in why
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tb._check_device(torch.device("cpu"))


def test_plan_groups_chunks_by_matrix_in_table_order():
    K = _kern()
    C = K.CHUNK
    rows = [(10 * C, C + 5, 1), (0, 2 * C, 0), (3 * C, 7, 1), (5 * C, 0, 2)]
    p = tb._Plan(SegmentTable(rows, num_matrices=4), C, 16)
    assert p.rows.tolist() == [[0, C, 0], [C, C, 0], [10 * C, C, 1], [11 * C, 5, 1], [3 * C, 7, 1]]
    assert p.ptr.tolist() == [0, 2, 5, 5, 5]
    assert p.aligned
    assert not tb._Plan(SegmentTable([(3, 10, 0)]), C, 16).aligned


# ----------------------------------------------------------------------------------------------
# grad_stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [0, 1, 7, 4097])
def test_stats_sizes(dev, dtype, size):
    g = torch.Generator().manual_seed(size)
    buf = torch.randn(size + 9, generator=g).to(dtype).to(dev)
    segs = [(5, size, 0), (0, 3, 1)]  # matrix 0 starts off any block boundary
    check_stats(stats(buf, segs), stats(buf, segs, backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stats_sharded_large_with_frozen(dev, dtype):
    """~1M elements; 12 matrices in 4 shuffled, unaligned, gapped pieces each; some pieces span
    several chunks; a random frozen mask whose matrices hold NaN (so a read would show)."""
    rng = np.random.default_rng(1)
    K = _kern()
    rows, n = sharded_segments(rng, 12, 4, (1, K.CHUNK // 2))
    rows.append((n + 3, K.CHUNK * 2 + 1234, 12))  # a multi-chunk piece with an odd start
    n += 3 + K.CHUNK * 2 + 1234
    buf = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(dtype)
    frozen = torch.from_numpy(rng.random(13) < 0.4)
    frozen[3], frozen[4] = True, False
    for off, length, mid in rows:
        if frozen[mid]:
            buf[off:off + length] = NAN
    buf, frozen = buf.to(dev), frozen.to(dev)
    got = stats(buf, rows, frozen)
    check_stats(got, stats(buf, rows, frozen, backend="reference"))
    assert torch.equal(got[frozen.cpu()].cpu(), torch.zeros(int(frozen.sum()), 3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_counted_exactly(dev, dtype):
    K = _kern()
    n = 2 * K.BLOCK + 300
    buf = torch.randn(n + 11, dtype=torch.float32)
    bad = {0: NAN, 1: INF, 7: -INF, K.BLOCK - 1: NAN, K.BLOCK: INF, 2 * K.BLOCK + 5: -INF, n - 1: NAN}
    for i, x in bad.items():
        buf[3 + i] = x
    buf[n + 5] = NAN  # outside every segment: must not count
    buf = buf.to(dtype).to(dev)
    segs = [(3, n, 0), (n + 3, 1, 1)]
    got = stats(buf, segs)
    check_stats(got, stats(buf, segs, backend="reference"))
    assert got[0, 2].item() == len(bad) and got[1, 2].item() == 0
    inf_only = torch.tensor([1.0, INF, -INF, 2.0], dtype=dtype, device=dev)
    s = stats(inf_only, [(0, 4, 0)])
    assert s[0, 0].item() == INF and s[0, 1].item() == INF and s[0, 2].item() == 2


def test_chunk_starts_off_block_boundaries(dev):
    """Segments whose every chunk starts off a BLOCK (and 16-element) boundary, lengths not
    multiples of BLOCK, one spanning two chunks."""
    K = _kern()
    n = K.CHUNK + 3 * K.BLOCK + 20
    buf = torch.randn(n + 2 * K.BLOCK, generator=torch.Generator().manual_seed(3)).to(dev)
    segs = [(1, K.CHUNK + 999, 0), (K.CHUNK + 1003, 2 * K.BLOCK + 1, 1), (n + 1, K.BLOCK - 1, 2)]
    assert not tb._Plan(SegmentTable(segs), K.CHUNK, 16).aligned
    check_stats(stats(buf, segs), stats(buf, segs, backend="reference"))
    # the same data placed on aligned starts gives the same sums
    segs_al = [(0, 5000, 0), (5008, 3000, 1)]
    assert tb._Plan(SegmentTable(segs_al), K.CHUNK, 16).aligned
    check_stats(stats(buf, segs_al), stats(buf, segs_al, backend="reference"))


def test_stats_deterministic_bitwise(dev):
    rng = np.random.default_rng(4)
    rows, n = sharded_segments(rng, 5, 3, (100, 30000))
    buf = torch.randn(n, generator=torch.Generator().manual_seed(5)).to(dev)
    a = stats(buf, rows)
    b = stats(buf, SegmentTable(rows))  # a fresh table rebuilds its plan
    out = torch.full((5, 3), 7.0, dtype=torch.float64, device=dev)
    c = ops.grad_stats(buf, segments=rows, out=out, backend="triton")
    assert c is out
    assert torch.equal(a, b) and torch.equal(a, c)


def test_stats_empty_and_unused_matrices(dev):
    buf = torch.randn(50, device=dev)
    got = stats(buf, [(0, 0, 0), (10, 0, 2)], num_matrices=4)
    assert torch.equal(got.cpu(), torch.zeros(4, 3, dtype=torch.float64))
    got = stats(buf, [(10, 20, 2)], num_matrices=4)
    assert torch.equal(got[[0, 1, 3]].cpu(), torch.zeros(3, 3, dtype=torch.float64))
    check_stats(got, stats(buf, [(10, 20, 2)], num_matrices=4, backend="reference"))


# ----------------------------------------------------------------------------------------------
# masked AdamW


def adamw_state(n, pdtype, gdtype, dev, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=g).to(pdtype)
    gr = torch.randn(n, generator=g).to(gdtype)
    m = torch.randn(n, generator=g) * 0.1
    v = torch.rand(n, generator=g) * 0.01
    return [t.to(dev) for t in (p, gr, m, v)]


def run_adamw(bufs, segs, backend, **kw):
    return ops.masked_adamw_(*bufs, segments=segs, backend=backend, **kw)


def assert_param_close(got, want):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    else:  # a float32 result one ulp apart may round to neighbouring low-precision values
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(got.dtype).eps, atol=1e-6)


def _scalar(x, dev):
    return torch.tensor(x, dtype=torch.float32, device=dev)


STEP_KINDS = ["int", "tensor0", "per_matrix", "lr_tensor"]


@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("step_kind", STEP_KINDS)
def test_adamw_matches_reference(dev, pdtype, gdtype, step_kind):
    K = _kern()
    rows = [(7, K.BLOCK + 33, 1), (0, 5, 0), (K.BLOCK + 50, 3 * K.BLOCK, 2), (4 * K.BLOCK + 60, 999, 1)]
    n = 4 * K.BLOCK + 60 + 999 + 4
    frozen = torch.tensor([False, False, True], device=dev)
    kw = dict(lr=2e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05, frozen=frozen,
              grad_scale=_scalar(4.0, dev))
    if step_kind == "int":
        kw["step"] = 3
    elif step_kind == "tensor0":
        kw["step"] = _scalar(5.0, dev)
    elif step_kind == "per_matrix":
        kw["step"] = torch.tensor([1.0, 7.0, 2.0], device=dev)
    else:
        kw["step"], kw["lr"] = 2, _scalar(3e-3, dev)
    a = adamw_state(n, pdtype, gdtype, dev, seed=6)
    b = [t.clone() for t in a]
    before = [t.clone() for t in a]
    sa = run_adamw(a, rows, "triton", **kw)
    sb = run_adamw(b, rows, "reference", **kw)
    check_stats(sa, sb)
    assert_param_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(a[3], b[3], rtol=1e-6, atol=1e-10)
    off, length, _ = rows[2]  # frozen matrix: bitwise untouched, and every gap too
    touched = torch.zeros(n, dtype=torch.bool)
    for o, ln, mid in rows:
        if mid != 2:
            touched[o:o + ln] = True
    for x, y in zip(a, before):
        assert torch.equal(x.cpu()[~touched], y.cpu()[~touched])


@triton.jit
def _bf16_cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, _bf16_rne(x), mask=offs < n)


def test_bf16_rounding_helper_matches_torch(dev):
    """The integer float32 -> bfloat16 rounding equals torch's cast bitwise: ties to even, values
    that round up into the next binade or to infinity, subnormals, +-0, +-Inf and NaN."""
    specials = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F8000,
                             0x00000001, 0x00018000, 0x80008000, 0x00000000, 0x80000000, 0x7F800000,
                             0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x3FFFFFFF],
                            dtype=torch.int64).to(torch.int32).view(torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.cat([specials, torch.randn(2000, generator=g) * 10.0 ** torch.randint(-30, 30, (2000,), generator=g)])
    y = torch.empty(x.numel(), dtype=torch.bfloat16, device=dev)
    _bf16_cast_kernel[(1,)](x.to(dev), y, x.numel(), BLOCK=4096)
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.isnan(y.cpu()[nan]).all()
    assert torch.equal(y.cpu()[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_adamw_bf16_params_bitwise_equal_reference(dev):
    """bfloat16 params are rounded exactly as torch rounds them: five steps stay bitwise equal."""
    n = 3 * _kern().BLOCK + 17
    a = adamw_state(n, torch.bfloat16, torch.bfloat16, dev, seed=12)
    b = [t.clone() for t in a]
    for step in range(1, 6):
        run_adamw(a, [(0, n, 0)], "triton", step=step, lr=1e-2, weight_decay=0.05)
        run_adamw(b, [(0, n, 0)], "reference", step=step, lr=1e-2, weight_decay=0.05)
    assert torch.equal(a[0].view(torch.int16), b[0].view(torch.int16))


def test_adamw_small_beta1_lerp_branch(dev):
    """beta1 < 0.5 takes torch.lerp's other formula."""
    rows = [(0, 1000, 0), (1003, 17, 1)]
    a = adamw_state(1020, torch.float32, torch.float32, dev, seed=7)
    b = [t.clone() for t in a]
    kw = dict(step=4, lr=1e-2, beta1=0.3, beta2=0.5, eps=1e-6, weight_decay=0.0)
    check_stats(run_adamw(a, rows, "triton", **kw), run_adamw(b, rows, "reference", **kw))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("beta1", [0.1, 0.3, 0.6, 0.9])
def test_adamw_first_moment_bitwise_equal_reference(dev, beta1):
    """exp_avg is torch.lerp bitwise: one fused multiply-add with the float32 weight, on either of
    lerp's two formulas (the weight 1 - beta1 below and above 0.5)."""
    rows = [(0, 3000, 0), (3001, 1100, 1)]
    a = adamw_state(4101, torch.float32, torch.float32, dev, seed=21)
    b = [t.clone() for t in a]
    for step in (1, 2, 3):
        kw = dict(step=step, lr=1e-2, beta1=beta1, beta2=0.99, weight_decay=0.01)
        run_adamw(a, rows, "triton", **kw)
        run_adamw(b, rows, "reference", **kw)
    assert torch.equal(a[2], b[2])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter divides by zero in numpy
@pytest.mark.parametrize("scale", [0.0, NAN])
def test_adamw_grad_scale_zero_or_nan(dev, scale):
    """A GradScaler scale of 0 or NaN: the statistics are the reference's (Inf/NaN where a gradient
    is divided by it, counted exactly), and a frozen matrix's row is still zero. Through the
    backends (the public op refuses such a CPU scale)."""
    from grades import backends
    from grades.backends.base import AdamWArgs
    table = SegmentTable([(0, 1000, 0), (1000, 3000, 1), (4000, 400, 2)])
    frozen = torch.tensor([False, True, False], device=dev)
    a = adamw_state(4400, torch.float32, torch.float32, dev, seed=22)
    b = [t.clone() for t in a]
    hp = AdamWArgs(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=1,
                   grad_scale=_scalar(scale, dev))
    got, want = (torch.empty(3, 3, dtype=torch.float64, device=dev) for _ in range(2))
    backends.get("triton").adamw_flat(*a, table, frozen, hp, got)
    backends.get("reference").adamw_flat(*b, table, frozen, hp, want)
    check_stats(got, want)
    assert torch.equal(got[1].cpu(), torch.zeros(3, dtype=torch.float64))
    for x, y in zip(a, b):
        assert torch.equal(x[1000:4000], y[1000:4000])


@pytest.mark.parametrize("size", [0, 1, 7, 4097])
def test_adamw_sizes(dev, size):
    rows = [(3, size, 0)]
    a = adamw_state(size + 3, torch.float32, torch.bfloat16, dev, seed=size)
    b = [t.clone() for t in a]
    kw = dict(step=1, lr=1e-3)
    check_stats(run_adamw(a, rows, "triton", **kw), run_adamw(b, rows, "reference", **kw))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-8)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter, masked lanes
def test_adamw_found_inf_skips_writes(dev):
    rows = [(0, 3000, 0), (3001, 2000, 1)]
    a = adamw_state(5001, torch.bfloat16, torch.float32, dev, seed=8)
    a[1][10] = INF
    before = [t.clone() for t in a]
    kw = dict(step=2, lr=1e-3, grad_scale=_scalar(2.0, dev))
    s = run_adamw(a, rows, "triton", found_inf=_scalar(1.0, dev), **kw)
    for x, y in zip(a, before):
        assert torch.equal(x, y)
    check_stats(s, ops.grad_stats(a[1] / 2.0, segments=rows, backend="reference"))
    assert s[0, 2].item() == 1
    s0 = run_adamw(a, rows, "triton", found_inf=_scalar(0.0, dev), **kw)  # zero: update happens
    assert torch.equal(s0, s)
    assert not torch.equal(a[0][3001:], before[0][3001:])


def test_adamw_deterministic_bitwise(dev):
    rng = np.random.default_rng(9)
    rows, n = sharded_segments(rng, 4, 3, (50, 6000))
    a = adamw_state(n, torch.float32, torch.bfloat16, dev, seed=10)
    b = [t.clone() for t in a]
    kw = dict(step=3, lr=1e-3, weight_decay=0.1)
    sa, sb = run_adamw(a, rows, "triton", **kw), run_adamw(b, rows, "triton", **kw)
    assert torch.equal(sa, sb)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(sa, ops.grad_stats(b[1], segments=rows, backend="triton"))


@pytest.mark.parametrize("steps", [30])
def test_masked_adamw_vs_torch_adamw(dev, steps):
    """Flat fp32 buffer with sharded matrices: the unfrozen ones follow torch.optim.AdamW for
    ``steps`` steps within 1e-6 relative; frozen ones (and their moments) stay bitwise the same."""
    rng = np.random.default_rng(11)
    rows, n = sharded_segments(rng, 3, 2, (10, 3000), gap=(0, 5))
    frozen = torch.tensor([False, True, False], device=dev)
    p = torch.randn(n, generator=torch.Generator().manual_seed(12)).to(dev)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    g = torch.zeros_like(p)
    p0 = p.clone()
    live = [(o, ln) for o, ln, mid in rows if not frozen[mid]]
    ref = [torch.nn.Parameter(p[o:o + ln].clone()) for o, ln in live]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = torch.optim.AdamW(ref, foreach=False, **hp)
    gen = torch.Generator().manual_seed(13)
    for t in range(1, steps + 1):
        g.copy_(torch.randn(n, generator=gen))
        for (o, ln), r in zip(live, ref):
            r.grad = g[o:o + ln].clone()
        opt.step()
        ops.masked_adamw_(p, g, m, v, frozen, step=t, lr=hp["lr"], beta1=0.9, beta2=0.95, eps=1e-8,
                          weight_decay=0.1, segments=rows, backend="triton")
    for (o, ln), r in zip(live, ref):
        torch.testing.assert_close(p[o:o + ln], r.detach(), rtol=1e-6, atol=1e-7)
    for o, ln, mid in rows:
        if frozen[mid]:
            assert torch.equal(p[o:o + ln], p0[o:o + ln])
            assert not m[o:o + ln].any() and not v[o:o + ln].any()


# ----------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
def test_cuda_no_host_sync():
    """After one warm-up call (which compiles and caches the device chunk table), neither op
    synchronises with the host, whatever form lr/step/grad_scale/found_inf take."""
    dev = torch.device("cuda")
    rng = np.random.default_rng(14)
    rows, n = sharded_segments(rng, 6, 3, (1000, 200000))
    table = SegmentTable(rows)
    bufs = adamw_state(n, torch.bfloat16, torch.bfloat16, dev, seed=15)
    frozen = torch.zeros(6, dtype=torch.bool, device=dev)
    frozen[2] = True
    variants = [
        dict(step=3, lr=1e-3),
        dict(step=_scalar(3.0, dev), lr=_scalar(1e-3, dev), grad_scale=_scalar(8.0, dev),
             found_inf=_scalar(0.0, dev)),
        dict(step=torch.arange(1, 7, dtype=torch.float32, device=dev), lr=1e-3),
    ]
    out = torch.empty(6, 3, dtype=torch.float64, device=dev)
    for kw in variants:  # warm-up: compile every specialisation used below
        run_adamw(bufs, table, "triton", frozen=frozen, **kw)
    ops.grad_stats(bufs[1], segments=table, frozen=frozen, backend="triton")
    ops.grad_stats(bufs[1], segments=table, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in variants:
            run_adamw(bufs, table, "triton", frozen=frozen, out=out, **kw)
        ops.grad_stats(bufs[1], segments=table, frozen=frozen, out=out, backend="triton")
        ops.grad_stats(bufs[1], segments=table, out=out, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cuda_offsets_past_int32():
    """A buffer longer than 2**31 elements: chunks past the int32 range are addressed correctly."""
    dev = torch.device("cuda")
    n = 2**31 + 5000
    try:
        buf = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2**31-element buffer")
    big = 2**31 + 17
    buf[big] = 3.0
    buf[2**31 - 2] = 2.0
    buf[n - 1] = NAN
    segs = [(2**31 - 100, 5100, 0), (5, 100, 1)]
    got = stats(buf, segs).cpu()
    assert got[0, 2].item() == 1 and torch.isnan(got[0, 0])
    buf[n - 1] = 0.0
    got = stats(buf, segs).cpu()
    assert got[0].tolist() == [13.0, 5.0, 0.0] and got[1].tolist() == [0.0, 0.0, 0.0]
    del buf
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_large_vs_reference(dtype):
    """A realistically sized sharded buffer (~50M elements) against the reference on the GPU."""
    dev = torch.device("cuda")
    rng = np.random.default_rng(16)
    rows, n = sharded_segments(rng, 40, 3, (1, 800000))
    buf = torch.randn(n, device=dev).to(dtype)
    frozen = torch.from_numpy(rng.random(40) < 0.3).to(dev)
    check_stats(stats(buf, rows, frozen), stats(buf, rows, frozen, backend="reference"))
    a = adamw_state(n, dtype, dtype, dev, seed=17)
    b = [t.clone() for t in a]
    kw = dict(step=_scalar(10.0, dev), lr=1e-3, frozen=frozen, grad_scale=_scalar(2.0, dev))
    check_stats(run_adamw(a, rows, "triton", **kw), run_adamw(b, rows, "reference", **kw))
    assert_param_close(a[0], b[0])
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(a[3], b[3], rtol=1e-6, atol=1e-10)
