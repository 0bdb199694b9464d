"""CPU-side checks of the CUDA sources: framework-free, and compilable by plain nvcc."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import FULL

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh"))


def test_kernel_sources_do_not_include_torch():
    assert KERNEL_SOURCES, "no CUDA kernel sources found"
    pat = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    for f in KERNEL_SOURCES:
        bad = [line for line in f.read_text().splitlines() if pat.search(line)]
        assert not bad, f"{f.name} includes framework headers: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("src", sorted(CUDA_DIR.glob("*.cu")), ids=lambda p: p.name)
def test_nvcc_compiles(src, tmp_path):
    nvcc = shutil.which("nvcc") or (shutil.which("nvcc", path=os.path.join(os.environ.get("CUDA_HOME", ""), "bin")))
    if not nvcc:
        pytest.skip("nvcc not found (install the CUDA toolkit or set CUDA_HOME to compile the kernels)")
    for arch in (("80", "90") if FULL else ("90",)):
        cmd = [nvcc, "-c", "-std=c++17", "-O3", f"-I{CUDA_DIR}", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
               str(src), "-o", str(tmp_path / f"{src.stem}.sm{arch}.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"nvcc failed for {src.name} sm_{arch}:\n{r.stderr[-4000:]}"
