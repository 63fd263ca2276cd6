"""Builds the optional compiled backends next to the pure-Python package.

* ``alphadpo_kernels._C``: CPU epilogues (C++17, OpenMP) for the chunked torch backend. Built whenever a C++
  compiler is present.
* ``alphadpo_kernels._C_cuda``: CUDA epilogues for ``backend="cublas"``. Built when ``nvcc`` is found and
  either torch with CUDA or an NVIDIA driver is present, or when ``ALPHADPO_BUILD_CUDA=1`` (``=0`` never).
  ``ALPHADPO_CUDA_ARCHS`` picks the SM targets (default ``80;90``).

Neither needs torch to build: both bind raw pointers through pybind11. A failed build of either only prints
a warning (``pip install`` never fails because of them) unless ``ALPHADPO_REQUIRE_EXTENSIONS=1``, which CI sets.
``alphadpo_kernels.backends()`` tells at run time what was built.

pybind11 is needed to *compile* the extensions, never to build the package's metadata: this file must run, and
``pip install --no-build-isolation -e .`` succeed, where pybind11 is absent (an offline GPU box: no network, no
pybind11, so no build isolation either). If setup.py imported pybind11 while it is loaded, as it once did to fill
``include_dirs``, pip's metadata step (``egg_info``) would fail with ``ModuleNotFoundError: No module named
'pybind11'`` / ``metadata-generation-failed`` and take the pure-Python package down with the optional parts. So
pybind11 is looked up only when an extension is built; without it each extension is skipped with one warning
line, or the build fails under ``ALPHADPO_REQUIRE_EXTENSIONS=1``. pyproject.toml's ``build-system.requires``
keeps pybind11, so an ordinary (isolated) ``pip install`` has it and builds the extensions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _require_extensions() -> bool:
    return os.environ.get("ALPHADPO_REQUIRE_EXTENSIONS") == "1"


class MissingPybind11(RuntimeError):
    pass


def _pybind11_include() -> str:
    """pybind11's header directory; called only when an extension is compiled (see the module docstring)."""
    try:
        import pybind11
    except ImportError as exc:
        raise MissingPybind11(f"pybind11 is not installed ({exc}); `pip install pybind11`, or install without "
                              "--no-build-isolation") from None
    return pybind11.get_include()


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isdir(os.path.join(home, "lib64")) or os.path.isdir(os.path.join(home, "lib")):
            return home
        if os.path.isdir("/usr/local/cuda"):
            return "/usr/local/cuda"
    return None


def _want_cuda() -> bool:
    flag = os.environ.get("ALPHADPO_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    if _cuda_home() is None:
        return False
    try:
        import torch

        if torch.version.cuda:
            return True
    except ImportError:
        pass
    return os.path.exists("/proc/driver/nvidia/version")


class CudaExtension(Extension):
    pass


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            include = _pybind11_include()
            if isinstance(ext, CudaExtension):
                self._build_cuda(ext, include)
            else:
                if include not in ext.include_dirs:
                    ext.include_dirs.append(include)
                super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - optional: never fail the install
            if _require_extensions():
                if isinstance(exc, MissingPybind11):
                    raise RuntimeError(f"ALPHADPO_REQUIRE_EXTENSIONS=1 but {ext.name} cannot be built: {exc}") from None
                raise
            print(f"warning: optional extension {ext.name} not built ({exc}); the pure-Python backends still "
                  "work", file=sys.stderr)

    def _build_cuda(self, ext, pybind11_include):
        home = _cuda_home()
        if home is None:
            raise RuntimeError("nvcc not found (set CUDA_HOME)")
        nvcc = os.path.join(home, "bin", "nvcc")
        archs = os.environ.get("ALPHADPO_CUDA_ARCHS", "80;90").split(";")
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer cards
        os.makedirs(self.build_temp, exist_ok=True)
        obj = os.path.join(self.build_temp, "cuda_epilogue.o")
        cmd = [nvcc, "-c", ext.sources[0], "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
               "-I" + pybind11_include, "-I" + sysconfig.get_paths()["include"], "-I" + CSRC, *gencode]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        candidates = [os.path.join(home, "lib64"), os.path.join(home, "lib"), "/usr/local/cuda/lib64",
                      os.path.join(home, "targets", "x86_64-linux", "lib"), "/usr/local/cuda/targets/x86_64-linux/lib"]
        libdir = next((d for d in candidates if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
        if libdir is None:
            raise RuntimeError(f"libcudart_static.a not found under {home}")
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self.compiler.link_shared_object([obj], out, library_dirs=[libdir],
                                         libraries=["cudart_static", "dl", "rt", "pthread"],
                                         target_lang="c++")


def extensions() -> list[Extension]:
    # No pybind11 here: its include dir is added by OptionalBuildExt when the extension is built. `optional`
    # lets setuptools skip copying a module that was not built (editable installs copy each one into the tree).
    optional = not _require_extensions()
    exts: list[Extension] = [
        Extension("alphadpo_kernels._C", [os.path.join(CSRC, "cpu_epilogue.cpp")],
                  include_dirs=[CSRC], language="c++", optional=optional,
                  extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-semantic-interposition", "-fvisibility=hidden"],
                  extra_link_args=["-fopenmp"], libraries=["mvec", "m"])
    ]
    if _want_cuda():
        exts.append(CudaExtension("alphadpo_kernels._C_cuda", [os.path.join(CSRC, "cuda_epilogue.cu")],
                                  optional=optional))
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
