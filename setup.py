"""Build script.

A plain ``pip install .`` installs the Python package and ships the C++/CUDA sources inside it
(``grades/_csrc``); the native backends are compiled with ninja on first use and cached (see
``grades/_build.py``), so no ``--no-build-isolation`` is needed. ``GRADES_BUILD_EXT=1`` with
``pip install --no-build-isolation .`` compiles them ahead of time instead (``grades._C_cpu``, and
``grades._C_cuda`` when torch has CUDA and nvcc is found), with the flags of the just-in-time build:
the CPU module is compiled with ``-march=native`` for the machine that builds it.
"""
import importlib.util
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

    # the same flags as the just-in-time build (grades/_build.py), read without importing the package
    spec = importlib.util.spec_from_file_location("_grades_build", ROOT / "grades" / "_build.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)
    os.chdir(ROOT)  # setuptools wants source paths relative to the project

    def sources(folder: str, pattern: str) -> list[str]:
        return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern))

    ext_modules.append(CppExtension("grades._C_cpu", sources("csrc/cpu", "*.cpp"),
                                    extra_compile_args={"cxx": flags.CXX_FLAGS["cpu"]},
                                    extra_link_args=flags.LD_FLAGS["cpu"]))
    if torch.version.cuda is not None and CUDA_HOME is not None:
        ext_modules.append(CUDAExtension("grades._C_cuda", sources("csrc/cuda", "*.c*"),
                                         include_dirs=[str(ROOT / "csrc/cuda")],
                                         extra_compile_args={"cxx": flags.CXX_FLAGS["cuda"],
                                                             "nvcc": flags.NVCC_FLAGS}))
    cmdclass["build_ext"] = BuildExtension

setup(cmdclass=cmdclass, ext_modules=ext_modules)
