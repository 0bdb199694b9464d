"""The JIT build cache: keyed on every input of the binary, locked, and loud when it builds."""
from __future__ import annotations

import sys
import types

import pytest

from grades import _build


def test_key_changes_with_what_changes_the_binary(monkeypatch):
    files = _build.sources("cpu")
    base = _build._digest("cpu", files)
    assert _build._digest("cpu", files) == base  # stable
    monkeypatch.setenv("CXX", "a-compiler-that-does-not-exist")
    assert _build._digest("cpu", files) != base
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("CXXFLAGS", "-O0")
    assert _build._digest("cpu", files) != base
    monkeypatch.delenv("CXXFLAGS")
    import torch
    # another environment: the same torch version installed elsewhere
    monkeypatch.setattr(torch, "__file__", "/another/env/site-packages/torch/__init__.py")
    assert _build._digest("cpu", files) != base


def test_build_is_locked_and_announced(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension
    monkeypatch.setenv("GRADES_CACHE", str(tmp_path))
    calls = []

    def fake_load(name, build_directory, **kw):
        # the module's lock is held while torch builds
        with pytest.raises(RuntimeError, match="locked"):
            _try_lock_elsewhere(build_directory + ".lock")
        calls.append(name)
        open(f"{build_directory}/{name}.so", "w").close()
        return types.SimpleNamespace(__file__=f"{build_directory}/{name}.so")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    _build._jit("cpu")
    err = capsys.readouterr().err
    assert "compiling the native cpu backend" in err and "built the native cpu backend" in err
    _build._jit("cpu")  # built already: quiet
    assert capsys.readouterr().err == ""
    assert len(calls) == 2 and calls[0] == calls[1]


def _try_lock_elsewhere(path: str) -> None:
    """Try the lock from another process (flock locks are per open file, so use a child)."""
    import subprocess
    code = ("import sys; from filelock import FileLock, Timeout\n"
            f"try:\n    FileLock({path!r}).acquire(timeout=0)\nexcept Timeout:\n    sys.exit(3)\n")
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    if rc == 3:
        raise RuntimeError("locked")


# Outputs of the CPU kernels on fixed inputs (every dtype, odd sizes, a frozen matrix, grad scale,
# maximize, amsgrad, master weights), saved to argv[2]; argv[1] = "avx2" builds without AVX-512.
_KERNEL_OUTPUTS = r'''
import itertools, sys, torch
from grades import _build, ops
if sys.argv[1] == "avx2":
    _build.CXX_FLAGS["cpu"] = [f for f in _build.CXX_FLAGS["cpu"] if f != "-march=native"] + ["-march=haswell"]
res = []
sizes = [0, 1, 15, 17, 4097, 70_001]
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
for i, (pd, gd, scale, maximize, ams, master) in enumerate(itertools.product(
        [f32, bf16, f16], [f32, bf16, f16], [False, True], [False, True], [False, True], [False, True])):
    if master and pd == f32:
        continue
    gen = torch.Generator().manual_seed(i)
    ps = [(torch.randn(n, generator=gen) * 3).to(pd) for n in sizes]
    gs = [(torch.randn(n, generator=gen) * 100).to(gd) for n in sizes]
    gs[4][5] = float("nan")
    ms = [torch.randn(n, generator=gen) for n in sizes]
    vs = [torch.rand(n, generator=gen) for n in sizes]
    xs = [torch.rand(n, generator=gen) for n in sizes] if ams else None
    masters = [p.float() + 1e-3 for p in ps] if master else None
    frozen = torch.zeros(len(sizes), dtype=torch.bool)
    frozen[2] = True
    st = ops.grad_stats(gs, backend="cpu")
    out = ops.masked_adamw_(ps, gs, ms, vs, frozen, step=7, lr=1e-2, grad_scale=torch.tensor(64.0) if scale else None,
                            maximize=maximize, max_exp_avg_sqs=xs, master_params=masters, backend="cpu")
    res.append([st, out] + ps + ms + vs + (xs or []) + (masters or []))
torch.save(res, sys.argv[2])
'''


@pytest.mark.slow
def test_avx2_build_gives_the_native_avx512_build_s_bits(tmp_path):
    """The kernels use 16-wide vectors where the build targets AVX-512 and 8-wide ones otherwise;
    element i of a chunk always sums into lane i % 16, so both builds give the same bits."""
    import os
    import subprocess

    import torch
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f" not in flags or " avx2" not in flags:
        pytest.skip("needs an x86 CPU with AVX-512 (the native build) and AVX2")
    script = tmp_path / "outputs.py"
    script.write_text(_KERNEL_OUTPUTS)
    env = dict(os.environ, GRADES_CACHE=str(tmp_path / "cache"))
    for kind in ("native", "avx2"):
        env_k = env if kind == "avx2" else os.environ  # the native build: the session's cache
        subprocess.run([sys.executable, str(script), kind, str(tmp_path / f"{kind}.pt")], check=True, env=env_k)
    native, avx2 = torch.load(tmp_path / "native.pt"), torch.load(tmp_path / "avx2.pt")
    assert len(native) == len(avx2) == 120
    for case, (a, b) in enumerate(zip(native, avx2)):
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"case {case} differs"
