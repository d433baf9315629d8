"""Build script: the Python package, the Triton kernels and the optional compiled extension
``fisherlora._C`` (``csrc/``).

The Triton kernels are the package ``fisherlora.kernels``: its ``__init__.py`` lives in
``fisherlora/kernels/`` and its op modules in the repository's top-level ``kernels/``, which has
no ``__init__.py`` so that, from the repository root, it is never the top-level package
``kernels`` (that name is Hugging Face's, which bitsandbytes and transformers import). A wheel
gets the op modules copied beside the ``__init__.py`` (:class:`BuildPy`); a source tree or an
editable install finds them through the package's ``__path__`` (docs/DESIGN.md §5).

Environment variables:
  FISHERLORA_SKIP_EXT=1   build no extension at all (pure Python install)
  FISHERLORA_CUDA=1/0     force the CUDA part on/off (default: on when torch is a CUDA build and nvcc exists)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja builder)
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
#: the folder of the Triton op modules, installed into the package fisherlora.kernels
KERNEL_SOURCES = "kernels"
#: the extension's sources: always the C++ ones, the CUDA ones when built with CUDA
CPP_SOURCES = ["csrc/bindings.cpp", "csrc/cpu/curvature_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/kernels.cu", "csrc/cuda/curvature_cuda.cu", "csrc/cuda/gemm_cuda.cu"]


def _flag(name):
    """``True``/``False`` for an environment variable set to 1/0 (or yes/no), ``None`` when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _nvidia_wheel_includes():
    """Header folders of the ``nvidia-*`` wheels a CUDA build of torch depends on (cuBLAS, ...).

    torch's CUDA headers include e.g. ``cublas_v2.h``, which pip-installed CUDA torch ships in
    ``site-packages/nvidia/cu13/include`` (CUDA 13) or ``nvidia/<lib>/include`` (CUDA 12), not in
    the toolkit that ``nvcc`` comes from (docs/DESIGN.md §5).
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
    return [path for path in found if os.path.isdir(path)]


def _shared_libstdcxx_link_args():
    """``-l:libstdc++.so.6`` on Linux: link the shared libstdc++ that torch itself loads.

    On the H200 machine's image (Ubuntu g++ 13, torch 2.11+cu130) a plain build gave a ``_C`` with
    no ``libstdc++.so.6`` among its needed libraries and about 3,200 ``std::`` symbols of its own:
    a static copy of libstdc++ beside torch's shared one. The first TORCH_CHECK message holding an
    integer then crashed the process (SIGSEGV in ``ostream::_M_insert<long>``). Naming the
    runtime library first makes the linker resolve every libstdc++ symbol from it; where the
    shared library would have been linked anyway this changes nothing.
    """
    return ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


class BuildPy(build_py):
    """``build_py`` that installs the op modules of ``kernels/`` into ``fisherlora/kernels/``.

    ``kernels/`` is no package (no ``__init__.py``) and ``fisherlora.kernels`` already has its
    folder, so ``package_dir`` cannot map it; the modules are added to the package's own list.
    In an editable install ``build_py`` copies nothing and the package's ``__path__`` reaches
    ``kernels/`` instead.
    """

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "fisherlora.kernels":
            names = sorted(glob.glob("*.py", root_dir=os.path.join(HERE, KERNEL_SOURCES)))
            modules += [(package, name[: -len(".py")], f"{KERNEL_SOURCES}/{name}") for name in names]
        return modules


def extensions():
    """The compiled extension ``fisherlora._C`` (see csrc/README.md), or nothing when skipped.

    CPU kernels are always built (C++ with OpenMP); the CUDA kernels are added when torch is a
    CUDA build and nvcc is found (or ``FISHERLORA_CUDA=1``; ``FISHERLORA_CUDA=0`` turns them off).
    """
    if _flag("FISHERLORA_SKIP_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # an isolated build, or torch not installed yet
        raise RuntimeError(
            "building fisherlora's extension needs torch installed first; install torch, then "
            "`pip install --no-build-isolation .` (or set FISHERLORA_SKIP_EXT=1 for a pure-Python install)"
        ) from exc

    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    with_cuda = _flag("FISHERLORA_CUDA")
    if with_cuda is None:
        with_cuda = torch.version.cuda is not None and bool(nvcc) and os.path.exists(nvcc)

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp
    cxx_flags = ["-O3", *openmp]
    sources = list(CPP_SOURCES)
    kwargs = {
        "extra_compile_args": {"cxx": cxx_flags},
        "extra_link_args": openmp + _shared_libstdcxx_link_args(),
        "include_dirs": [os.path.join(HERE, "csrc")],
    }
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # no GPU to detect at build time
        sources += CUDA_SOURCES
        kwargs["include_dirs"] += _nvidia_wheel_includes()
        kwargs["define_macros"] = [("FISHERLORA_WITH_CUDA", None)]
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension("fisherlora._C", sources, **kwargs)
    else:
        ext = CppExtension("fisherlora._C", sources, **kwargs)
    # ninja builds the sources in parallel; torch's builder honours MAX_JOBS
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["fisherlora", "fisherlora.*"]),
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPy},
)
