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
