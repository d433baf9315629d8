"""Compile every CUDA source with nvcc (compile-only, sm_80 and sm_90), no GPU needed.

A syntax or type error in csrc/**/*.cu fails CI on machines that have nvcc but no GPU and a CPU
build of torch. How the includes are found (csrc/README.md):

- ``cuda/kernels.cu`` needs only the CUDA toolkit (the kernels take plain pointers, launch.h);
- ``cuda/curvature_cuda.cu`` (the ATen glue) needs torch's headers. A CPU wheel of torch ships
  the ``c10/cuda`` headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``; the test
  supplies a one-line stand-in for it when it is missing. The glue includes only the ATen headers
  it uses (not ``ATen/ATen.h``, nor ``ATen/cuda/CUDAContext.h``, which needs cuBLAS headers).

Every file compiles concurrently, each once for both architectures (about 30 s on 2 idle cores;
`cuda/gemm_cuda.cu`, the tensor-core glue, needs torch's headers like `curvature_cuda.cu`).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setup_list(name: str) -> list[str]:
    """A list constant of setup.py, read without running it."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


SOURCES = _setup_list("CUDA_SOURCES")  # exactly what setup.py builds with CUDA
ARCHS = ("80", "90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME or /usr/local/cuda)")


def _include_dirs(shim: Path) -> list[str]:
    spec = importlib.util.find_spec("torch")
    torch_inc = Path(spec.origin).parent / "include"
    dirs = [torch_inc, torch_inc / "torch" / "csrc" / "api" / "include", ROOT / "csrc"]
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():  # CPU wheel of torch
        header = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, shim)
    nvidia = importlib.util.find_spec("nvidia")  # headers of a CUDA torch's nvidia-* wheels, if any
    for root in (nvidia.submodule_search_locations if nvidia else []) or []:
        dirs += sorted(Path(root).glob("*/include"))
    return [str(d) for d in dirs]


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Start every nvcc compile at once; each test waits for its own file."""
    tmp = tmp_path_factory.mktemp("nvcc")
    includes = [f"-I{d}" for d in _include_dirs(tmp / "shim")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    flags = ["-std=c++20", "-O1", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-DFISHERLORA_WITH_CUDA",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    procs = {}
    for n, src in enumerate(SOURCES):
        cmd = [NVCC, "-c", str(ROOT / src), "-o", str(tmp / f"{n}.o"), *gencode, *flags, *includes]
        procs[src] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    yield procs
    for _, proc in procs.values():
        if proc.poll() is None:
            proc.kill()


def test_setup_builds_every_source_in_csrc():
    """A .cu/.cpp file that setup.py does not list would never be compiled (nor tested here)."""
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cu", ".cpp"))
    assert sorted(_setup_list("CPP_SOURCES") + SOURCES) == on_disk


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES)
def test_cuda_source_compiles_for_sm80_and_sm90(src, compiles):
    cmd, proc = compiles[src]
    output, _ = proc.communicate(timeout=300)
    errors = [line for line in output.splitlines() if "error" in line]
    shown = "\n".join(errors[:40] or output.splitlines()[-40:])
    assert proc.returncode == 0, f"nvcc failed on {src}:\n{shown}\ncommand: {' '.join(cmd)}"
