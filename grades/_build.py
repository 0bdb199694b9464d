"""Build and load the native extensions (``cpu``: C++/OpenMP, ``cuda``: CUDA C++).

Order of preference:

1. an ahead-of-time module built by ``setup.py`` (``GRADES_BUILD_EXT=1 pip install ...``):
   ``grades._C_cpu`` / ``grades._C_cuda``;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja), cached under
   ``$GRADES_CACHE`` (default ``~/.cache/grades``) in a folder keyed by everything that changes the
   binary (sources, flags, the torch build and where it is installed, the Python ABI and headers,
   the compiler, the CPU for ``-march=native``), so environments sharing a cache never rebuild each
   other's module; a file lock serialises processes building the same one, and a build says so.

Any failure is captured and reported as the backend's "not available" reason (``grades env``).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_cache: dict[str, tuple[ModuleType | None, str]] = {}

#: compiler flags per extension (host C++ flags, nvcc flags, linker flags)
CXX_FLAGS = {
    "cpu": ["-O3", "-fopenmp", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17"],
    "cuda": ["-O3", "-std=c++17"],
}
# No --use_fast_math: the AdamW update must match torch.optim.AdamW (IEEE division and square root,
# no flush of denormals). -lineinfo lets compute-sanitizer name source lines.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
LD_FLAGS = {"cpu": ["-fopenmp"], "cuda": []}


def csrc_dir() -> Path:
    """The C++/CUDA sources: shipped inside the package when installed, at the repo root otherwise."""
    for cand in (_HERE / "_csrc", _HERE.parent / "csrc"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("grades C++ sources not found (looked for grades/_csrc and ./csrc)")


def sources(kind: str) -> list[Path]:
    root = csrc_dir()
    if kind == "cpu":
        return sorted((root / "cpu").glob("*.cpp"))
    if kind == "cuda":
        return sorted((root / "cuda").glob("*.cpp")) + sorted((root / "cuda").glob("*.cu"))
    raise ValueError(f"unknown extension kind {kind!r}")


def _host_id() -> str:
    """The CPU model and its feature flags: ``-march=native`` code must not move to another CPU."""
    keep = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    keep.append(line.strip())
                elif not line.strip() and keep:
                    break  # the first processor describes them all
    except OSError:
        pass
    return platform.machine() + "|" + platform.processor() + "|" + "|".join(keep)


def _compiler_id(exe: str) -> str:
    """Path and ``--version`` banner of a compiler (``exe`` as torch would call it)."""
    path = shutil.which(exe)
    if path is None:
        return f"{exe}: not found"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        out = type(e).__name__
    return f"{os.path.realpath(path)}: {out.strip()}"


def _inputs(kind: str) -> tuple:
    """Everything besides the sources that changes the binary torch builds for ``kind``."""
    import torch
    from torch.utils import cpp_extension
    toolchain = [_compiler_id(os.environ.get("CXX", "c++"))]
    if kind == "cuda":
        home = cpp_extension.CUDA_HOME
        toolchain.append(_compiler_id(os.path.join(home, "bin", "nvcc")) if home else "no CUDA_HOME")
    env = {k: os.environ.get(k) for k in ("CFLAGS", "CXXFLAGS", "LDFLAGS", "TORCH_CUDA_ARCH_LIST")}
    return (CXX_FLAGS.get(kind), NVCC_FLAGS if kind == "cuda" else None, LD_FLAGS.get(kind),
            torch.__version__, torch.version.git_version, torch.version.cuda,
            os.path.dirname(os.path.realpath(torch.__file__)), sys.implementation.cache_tag,
            sysconfig.get_paths()["include"], toolchain, env, _host_id() if kind == "cpu" else None)


def _digest(kind: str, files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files + sorted((csrc_dir() / kind).glob("*.h")) + sorted((csrc_dir() / kind).glob("*.cuh")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    h.update(repr(_inputs(kind)).encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("GRADES_CACHE", Path.home() / ".cache" / "grades"))


def _jit(kind: str) -> ModuleType:
    from filelock import FileLock  # a torch dependency
    files = sources(kind)
    if not files:
        raise FileNotFoundError(f"no {kind} sources under {csrc_dir() / kind}")
    name = f"grades_{kind}_{_digest(kind, files)}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # one builder per module across processes; the others wait, then load what it built
    with FileLock(str(build_dir) + ".lock"):
        return _load_or_build(kind, name, files, build_dir)


def _load_or_build(kind: str, name: str, files: list[Path], build_dir: Path) -> ModuleType:
    from torch.utils import cpp_extension
    kwargs = dict(name=name, sources=[str(f) for f in files], extra_cflags=CXX_FLAGS[kind],
                  extra_ldflags=LD_FLAGS[kind], build_directory=str(build_dir),
                  extra_include_paths=[str(csrc_dir() / kind)],
                  verbose=os.environ.get("GRADES_BUILD_VERBOSE", "0") == "1")
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = NVCC_FLAGS
    building = not any(build_dir.glob(f"{name}*.so"))
    if building:
        # the first use in an environment compiles for a minute or more: say so instead of going quiet
        print(f"grades: compiling the native {kind} backend once for this environment (a minute or "
              f"more); cached in {build_dir}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    mod = cpp_extension.load(**kwargs)
    if building:
        print(f"grades: built the native {kind} backend in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return mod


def load(kind: str) -> tuple[ModuleType | None, str]:
    """Return ``(module, detail)`` or ``(None, reason)``; cached for the process."""
    with _lock:
        if kind in _cache:
            return _cache[kind]
        result: tuple[ModuleType | None, str]
        try:
            mod = importlib.import_module(f"grades._C_{kind}")
            result = (mod, "prebuilt (setup.py)")
        except ImportError:
            if kind == "cuda":
                import torch
                from torch.utils import cpp_extension
                if torch.version.cuda is None:
                    result = (None, "this torch build has no CUDA")
                    _cache[kind] = result
                    return result
                if cpp_extension.CUDA_HOME is None:
                    result = (None, "nvcc / CUDA_HOME not found")
                    _cache[kind] = result
                    return result
            try:
                mod = _jit(kind)
                result = (mod, f"JIT-built ({Path(mod.__file__).parent.name})")
            except Exception as e:  # compiler missing, compile error, ...
                msg = str(e).strip().splitlines()
                result = (None, f"build failed: {type(e).__name__}: {msg[-1] if msg else ''}"[:400])
        _cache[kind] = result
        return result
