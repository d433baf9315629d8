"""Build script: the Python package, the Triton kernels (``kernels/`` installed as
``fisherlora.kernels``) and the optional compiled extension ``fisherlora._C`` (``csrc/``).

Environment variables:
  FISHERLORA_SKIP_EXT=1   build no extension at all (pure Python install)
  FISHERLORA_CUDA=1/0     force the CUDA part on/off (default: on when torch is a CUDA build and nvcc exists)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (honoured by torch's ninja builder)
"""

from setuptools import find_packages, setup


def extensions():
    """The compiled extension modules; empty until ``csrc/`` has sources (see csrc/README.md)."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["fisherlora", "fisherlora.*"]) + ["fisherlora.kernels"],
    package_dir={"fisherlora.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
