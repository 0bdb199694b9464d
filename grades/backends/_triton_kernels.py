"""Triton kernels for flat-buffer gradient statistics and masked AdamW.

Layout shared by both ops. A flat buffer is described by a chunk list: ``[C, 3]`` int64 rows of
``(start, length, matrix_id)`` in elements, each chunk at most :data:`CHUNK` elements long, with the
chunks of one matrix stored next to each other in segment-table order. Work happens in two phases:

1. One program per chunk walks its chunk in :data:`BLOCK`-element steps (whole blocks unmasked,
   then one masked tail), accumulating float32 sums of squares and absolute values and an int32
   count of non-finite values in per-lane registers, and reduces them once at the end. It writes
   one float64 row ``(sumsq, sumabs, count)`` of a ``[C, 3]`` partials tensor. A chunk of a frozen
   matrix runs zero iterations: it loads nothing, stores nothing into the buffers, and writes a
   zero row. The AdamW kernel updates the parameter and both moments in the same pass.
2. One program per matrix adds its (contiguous) run of partial rows in float64, in order, and
   writes the matrix's row of the ``[M, 3]`` output.

Both phases use fixed shapes and fixed orders and no atomics, so results are bitwise reproducible
for a given device and compile. The backend launches them with ``enable_fp_fusion=False``: every
multiply and add is rounded on its own, as in the reference, except the explicit ``tl.fma`` of
the moment's lerp, which is how torch computes ``lerp``. The kernels compute in float32 only:
float64 buffers are refused by the backend (``TritonBackend.dtypes``). Offsets are int64 throughout (buffers may exceed 2**31 elements).

Importing this module defines the kernels: ``TRITON_INTERPRET=1`` must already be set if they are
to run on CPU tensors through Triton's interpreter.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

#: Elements per phase-1 program. Multiple of :data:`BLOCK`; fixed so results are reproducible.
CHUNK = 65536
#: Elements per inner step of a phase-1 program (power of two).
BLOCK = 2048
#: Partial rows summed per step of a phase-2 program (power of two).
RBLOCK = 128
#: Warps per phase-1 program (8 warps x 32 lanes x 8 elements = one BLOCK).
NUM_WARPS = 8
#: Element alignment promised to the compiler when every chunk start is a multiple of it.
ALIGN = tl.constexpr(16)
#: Largest finite float32; ``|g| <= FINITE_MAX`` is false exactly for NaN and +-Inf.
FINITE_MAX = tl.constexpr(3.4028234663852886e38)

#: Whether the kernels below were defined for Triton's interpreter (CPU tensors).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _bf16_rne(x):
    """float32 -> bfloat16 rounded to nearest even, NaN -> 0x7FC0, in integer arithmetic.

    What ``cvt.rn.bf16.f32`` does on the GPU and what torch's cast does. Used only under the
    interpreter, whose own float32 -> bfloat16 conversion truncates (and whose ``rtne`` mode
    does not carry into the exponent)."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) >> 16
    out = tl.where(x != x, 0x7FC0, rounded)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _grad_block(grad_ptr, offs, mask, acc_sq, acc_abs, acc_bad):
    """Load one block of gradient as float32 and fold it into the per-lane accumulators."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc_sq += g * g
    acc_abs += tl.abs(g)
    acc_bad += (~(tl.abs(g) <= FINITE_MAX)).to(tl.int32)
    return acc_sq, acc_abs, acc_bad


@triton.jit
def _chunk_header(chunks_ptr, frozen_ptr, HAS_FROZEN: tl.constexpr, ALIGNED: tl.constexpr):
    """``(start, n, matrix_id)`` of this program's chunk; ``n`` is 0 for a frozen matrix."""
    pid = tl.program_id(0).to(tl.int64)
    start = tl.load(chunks_ptr + pid * 3)
    length = tl.load(chunks_ptr + pid * 3 + 1)
    mid = tl.load(chunks_ptr + pid * 3 + 2)
    if ALIGNED:
        start = tl.multiple_of(start, ALIGN)
    if HAS_FROZEN:
        is_frozen = tl.load(frozen_ptr + mid) != 0
        length = tl.where(is_frozen, 0, length)
    return pid, start, length, mid


@triton.jit
def _store_partial(part_ptr, pid, acc_sq, acc_abs, acc_bad):
    """Reduce the ``[BLOCK]`` per-lane accumulators and write row ``pid`` of the float64 partials."""
    tl.store(part_ptr + pid * 3, tl.sum(acc_sq, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(acc_abs, axis=0).to(tl.float64))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(acc_bad, axis=0).to(tl.float64))


@triton.jit
def grad_stats_chunks_kernel(
    grad_ptr,      # [N] float32/bfloat16/float16 flat gradient buffer
    chunks_ptr,    # [C, 3] int64 (start, length, matrix_id)
    frozen_ptr,    # [M] uint8 (1 = frozen); unused unless HAS_FROZEN
    part_ptr,      # [C, 3] float64 out: per-chunk (sumsq, sumabs, non-finite count)
    HAS_FROZEN: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Phase 1 of ``grad_stats`` on a flat buffer: one program per chunk."""
    pid, start, n, mid = _chunk_header(chunks_ptr, frozen_ptr, HAS_FROZEN, ALIGNED)
    lane = tl.arange(0, BLOCK)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
    full = lane < BLOCK  # all true; keeps the whole-block loads unmasked in effect
    n_full = n // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + lane
        acc_sq, acc_abs, acc_bad = _grad_block(grad_ptr, offs, full, acc_sq, acc_abs, acc_bad)
    tail = n_full * BLOCK
    offs = start + tail + lane
    acc_sq, acc_abs, acc_bad = _grad_block(grad_ptr, offs, tail + lane < n, acc_sq, acc_abs, acc_bad)
    _store_partial(part_ptr, pid, acc_sq, acc_abs, acc_bad)


@triton.jit
def _adamw_block(param_ptr, copy_ptr, grad_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, upd, scale,
                 decay, step_size, bc2_sqrt, w1, beta2, one_minus_beta2, eps,
                 acc_sq, acc_abs, acc_bad,
                 HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, LERP_HI: tl.constexpr,
                 BF16_RNE: tl.constexpr, HAS_COPY: tl.constexpr, MAXIMIZE: tl.constexpr,
                 AMSGRAD: tl.constexpr):
    """Statistics plus one AdamW update of one block; parameter and moments written only where
    ``mask & upd``. Same operation order as the reference ``adamw_update``. With ``HAS_COPY`` the
    parameter is a float32 master and the result is also stored, rounded, at ``copy_ptr``
    (``BF16_RNE`` then applies to the copy). ``MAXIMIZE`` negates the gradient after the
    statistics; ``AMSGRAD`` keeps ``vmax = maximum(vmax, v)`` (NaN propagates) for the denominator."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # masked lanes stay 0 (0 / 0 would be NaN when a GradScaler's scale has fallen to 0)
        g = tl.where(mask, tl.div_rn(g, scale), 0.0)
    acc_sq += g * g
    acc_abs += tl.abs(g)
    acc_bad += (~(tl.abs(g) <= FINITE_MAX)).to(tl.int32)
    if MAXIMIZE:
        g = -g
    if HAS_FOUND_INF:
        wmask = tl.where(upd, mask, False)
    else:
        wmask = mask
    p_raw = tl.load(param_ptr + offs, mask=wmask, other=0.0)
    p = p_raw.to(tl.float32)
    m = tl.load(m_ptr + offs, mask=wmask, other=0.0)
    v = tl.load(v_ptr + offs, mask=wmask, other=0.0)
    p = p * decay
    # torch.lerp(m, g, w1), one fused multiply-add as torch computes it; the branch is chosen on
    # the host from the float32 weight (w1 - 1 is exact for w1 >= 0.5)
    if LERP_HI:
        m = tl.fma(w1 - 1.0, g - m, g)
    else:
        m = tl.fma(w1, g - m, m)
    v = v * beta2 + (one_minus_beta2 * g) * g
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=wmask, other=0.0), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, vmax, mask=wmask)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    if HAS_COPY:
        tl.store(param_ptr + offs, p, mask=wmask)
        if BF16_RNE:
            tl.store(copy_ptr + offs, _bf16_rne(p), mask=wmask)
        else:
            tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=wmask)
    else:
        if BF16_RNE:
            p_new = _bf16_rne(p)
        else:
            p_new = p.to(p_raw.dtype)
        tl.store(param_ptr + offs, p_new, mask=wmask)
    tl.store(m_ptr + offs, m, mask=wmask)
    tl.store(v_ptr + offs, v, mask=wmask)
    return acc_sq, acc_abs, acc_bad


@triton.jit
def adamw_chunks_kernel(
    param_ptr,     # [N] float32/bfloat16/float16, updated in place (float32 master if HAS_COPY)
    copy_ptr,      # [N] float32/bfloat16/float16 receiving the rounded master; unused unless HAS_COPY
    grad_ptr,      # [N] float32/bfloat16/float16
    m_ptr,         # [N] float32 exp_avg, updated in place
    v_ptr,         # [N] float32 exp_avg_sq, updated in place
    vmax_ptr,      # [N] float32 max_exp_avg_sq, updated in place; unused unless AMSGRAD
    chunks_ptr,    # [C, 3] int64 (start, length, matrix_id)
    frozen_ptr,    # [M] uint8 (1 = frozen); unused unless HAS_FROZEN
    part_ptr,      # [C, 3] float64 out: per-chunk (sumsq, sumabs, non-finite count)
    scale_ptr,     # [] float32 grad_scale; unused unless HAS_SCALE
    found_inf_ptr,  # [] float32 found_inf; unused unless HAS_FOUND_INF
    coef_ptr,      # [R, 3] float32 (decay, step_size, bc2_sqrt); unused unless COEF_FROM_PTR
    coef_stride,   # 0 (one row for all matrices) or 3 (one row per matrix)
    decay, step_size, bc2_sqrt,  # float32 scalars, used when not COEF_FROM_PTR
    w1, beta2, one_minus_beta2, eps,  # float32 scalars: 1-beta1, beta2, 1-beta2, eps
    HAS_FROZEN: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    COEF_FROM_PTR: tl.constexpr,
    LERP_HI: tl.constexpr,
    BF16_RNE: tl.constexpr,   # round bfloat16 params in integer arithmetic (interpreter only)
    HAS_COPY: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Fused statistics + masked AdamW on flat buffers: one program per chunk.

    ``decay = 1 - lr*weight_decay``, ``step_size = lr / (1 - beta1**step)`` and
    ``bc2_sqrt = sqrt(1 - beta2**step)`` come either as scalars or, when ``lr`` or ``step`` live on
    the device, from ``coef_ptr`` (row ``matrix_id * coef_stride / 3``)."""
    pid, start, n, mid = _chunk_header(chunks_ptr, frozen_ptr, HAS_FROZEN, ALIGNED)
    lane = tl.arange(0, BLOCK)
    if HAS_SCALE:
        scale = tl.load(scale_ptr)
    else:
        scale = 1.0
    if HAS_FOUND_INF:
        upd = tl.load(found_inf_ptr) == 0
    else:
        upd = 1
    if COEF_FROM_PTR:
        row = coef_ptr + mid * coef_stride
        decay = tl.load(row)
        step_size = tl.load(row + 1)
        bc2_sqrt = tl.load(row + 2)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_bad = tl.zeros([BLOCK], dtype=tl.int32)
    full = lane < BLOCK
    n_full = n // BLOCK
    for i in range(0, n_full):
        offs = start + i * BLOCK + lane
        acc_sq, acc_abs, acc_bad = _adamw_block(
            param_ptr, copy_ptr, grad_ptr, m_ptr, v_ptr, vmax_ptr, offs, full, upd, scale,
            decay, step_size, bc2_sqrt, w1, beta2, one_minus_beta2, eps,
            acc_sq, acc_abs, acc_bad, HAS_SCALE, HAS_FOUND_INF, LERP_HI, BF16_RNE, HAS_COPY, MAXIMIZE, AMSGRAD)
    tail = n_full * BLOCK
    offs = start + tail + lane
    acc_sq, acc_abs, acc_bad = _adamw_block(
        param_ptr, copy_ptr, grad_ptr, m_ptr, v_ptr, vmax_ptr, offs, tail + lane < n, upd, scale,
        decay, step_size, bc2_sqrt, w1, beta2, one_minus_beta2, eps,
        acc_sq, acc_abs, acc_bad, HAS_SCALE, HAS_FOUND_INF, LERP_HI, BF16_RNE, HAS_COPY, MAXIMIZE, AMSGRAD)
    _store_partial(part_ptr, pid, acc_sq, acc_abs, acc_bad)


@triton.jit
def reduce_partials_kernel(
    part_ptr,   # [C, 3] float64 per-chunk partials, chunks of a matrix contiguous
    ptr_ptr,    # [M + 1] int64: matrix m owns partial rows [ptr[m], ptr[m + 1])
    out_ptr,    # [M, 3] float64 out
    RBLOCK: tl.constexpr,
):
    """Phase 2: one program per matrix sums its partial rows in float64 in a fixed order."""
    mid = tl.program_id(0).to(tl.int64)
    lo = tl.load(ptr_ptr + mid)
    hi = tl.load(ptr_ptr + mid + 1)
    row = tl.arange(0, RBLOCK)[:, None]
    col = tl.arange(0, 4)[None, :]  # columns 0..2 used, padded to a power of two
    acc = tl.zeros([RBLOCK, 4], dtype=tl.float64)
    for base in range(lo, hi, RBLOCK):
        idx = base + row
        acc += tl.load(part_ptr + idx * 3 + col, mask=(idx < hi) & (col < 3), other=0.0)
    total = tl.sum(acc, axis=0)
    c = tl.arange(0, 4)
    tl.store(out_ptr + mid * 3 + c, total, mask=c < 3)
