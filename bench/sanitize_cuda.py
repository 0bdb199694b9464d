"""Small workload for ``compute-sanitizer``: every CUDA-backend entry point on odd sizes, odd
offsets and all dtype combinations, list and flat forms, with and without frozen matrices,
grad_scale, found_inf and device-side lr/step. Exits non-zero if a result differs from the
reference; memory errors are reported by the sanitizer itself.
"""
from __future__ import annotations

import sys

import torch

import grades
from grades.ops import grad_stats, masked_adamw_

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def views(sizes, dtype, offset, gen):
    base = torch.randn(sum(sizes) + offset * (len(sizes) + 1), device="cuda", generator=gen).to(dtype)
    out, pos = [], offset
    for n in sizes:
        out.append(base[pos:pos + n])
        pos += n + offset
    return out


def clone_like(t):
    """A copy of ``t`` at the same 16-byte alignment phase (a plain clone would realign views)."""
    off = t.storage_offset() % 8
    buf = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
    return buf[off:off + t.numel()].copy_(t)


def close(a, b, what, rtol=1e-4):
    if not torch.allclose(a, b, rtol=rtol, atol=1e-6, equal_nan=True):
        raise SystemExit(f"MISMATCH {what}: max abs diff {(a - b).abs().nan_to_num().max().item()}")


def main() -> int:
    ok, why = grades.backends.get("cuda").available()
    if not ok:
        print(f"cuda backend not available: {why}")
        return 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [0, 1, 7, 8, 9, 31, 4097, 32767, 32769, 70_001]
    frozen = torch.zeros(len(sizes), dtype=torch.bool, device="cuda")
    frozen[3] = frozen[7] = True
    n_checks = 0
    for offset in (0, 3):
        for gdt in DTYPES:
            grads = views(sizes, gdt, offset, gen)
            for fz in (None, frozen):
                close(grad_stats(grads, frozen=fz, backend="cuda"),
                      grad_stats(grads, frozen=fz, backend="reference"), f"stats list {gdt} +{offset}")
                n_checks += 1
            buf = torch.cat([torch.zeros(offset, device="cuda", dtype=gdt)] + grads)
            segs = [(offset + sum(sizes[:i]), n, i % 4) for i, n in enumerate(sizes)]
            close(grad_stats(buf, segments=segs, backend="cuda"),
                  grad_stats(buf, segments=segs, backend="reference"), f"stats flat {gdt} +{offset}")
            for pdt in DTYPES:
                params = views(sizes, pdt, offset + 1, gen)
                ms = views(sizes, torch.float32, offset, gen)
                vs = [t.abs() for t in views(sizes, torch.float32, offset + 2, gen)]
                variants = ({}, {"grad_scale": torch.tensor(8.0, device="cuda"),
                                   "found_inf": torch.tensor(0.0, device="cuda"),
                                   "lr": torch.tensor(1e-2, device="cuda"),
                                   "step": torch.arange(1, len(sizes) + 1, device="cuda", dtype=torch.float32)})
                for extra in variants[(DTYPES.index(pdt) + offset) % 2:][:1] if offset else variants:
                    hp = {"step": 3, "lr": 1e-3, **extra}
                    mine = [[clone_like(t) for t in lst] for lst in (params, grads, ms, vs)]
                    ref = [[clone_like(t) for t in lst] for lst in (params, grads, ms, vs)]
                    s1 = masked_adamw_(*mine, frozen, backend="cuda", **hp)
                    s2 = masked_adamw_(*ref, frozen, backend="reference", **hp)
                    close(s1, s2, f"adamw stats list {gdt}/{pdt} +{offset}")
                    for a, b in zip(mine[2], ref[2]):
                        close(a, b, f"adamw exp_avg list {gdt}/{pdt} +{offset}", rtol=1e-5)
                    flat = [torch.cat([torch.zeros(offset, device="cuda", dtype=lst[0].dtype)] + lst)
                            for lst in (params, grads, ms, vs)]
                    fref = [t.clone() for t in flat]
                    fsegs = [(offset + sum(sizes[:i]), n, i) for i, n in enumerate(sizes)]
                    s1 = masked_adamw_(*flat, frozen, segments=fsegs, backend="cuda", **hp)
                    s2 = masked_adamw_(*fref, frozen, segments=fsegs, backend="reference", **hp)
                    close(s1, s2, f"adamw stats flat {gdt}/{pdt} +{offset}")
                    close(flat[3], fref[3], f"adamw exp_avg_sq flat {gdt}/{pdt} +{offset}", rtol=1e-5)
                    n_checks += 2
    torch.cuda.synchronize()
    print(f"sanitize workload: {n_checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
