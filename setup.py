"""Build script.

A plain ``pip install .`` installs the Python package and ships the C++/CUDA sources inside it
(``grades/_csrc``); the native backends are compiled with ninja on first use and cached (see
``grades/_build.py``), so no ``--no-build-isolation`` is needed. ``GRADES_BUILD_EXT=1`` with
``pip install --no-build-isolation .`` compiles them ahead of time instead (``grades._C_cpu``, and
``grades._C_cuda`` when torch has CUDA and nvcc is found).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as grades/_csrc so JIT builds work from an install."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "grades" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("GRADES_BUILD_EXT", "0") == "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
    ext_modules.append(CppExtension("grades._C_cpu", sorted(str(p) for p in (ROOT / "csrc/cpu").glob("*.cpp")),
                                    extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]))
    if torch.version.cuda is not None and CUDA_HOME is not None:
        cu = sorted(str(p) for p in (ROOT / "csrc/cuda").glob("*.c*"))
        ext_modules.append(CUDAExtension("grades._C_cuda", cu, include_dirs=[str(ROOT / "csrc/cuda")],
                                         extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                                             "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]}))
    cmdclass["build_ext"] = BuildExtension

setup(cmdclass=cmdclass, ext_modules=ext_modules)
