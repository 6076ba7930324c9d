"""Build of saferlhf-fast: the Python package, the Triton kernels (kernels/, shipped as saferlhf_fast.kernels) and the
compiled extension saferlhf_fast._C (C++ CPU kernels always; CUDA kernels when torch has CUDA and nvcc exists).

Install against the torch you already have: ``pip install --no-build-isolation -e .``
Environment knobs: SAFERLHF_NO_EXT=1 (pure Python), SAFERLHF_NO_CUDA=1 (CPU kernels only),
SAFERLHF_FORCE_CUDA=1 (compile CUDA kernels even without a GPU, e.g. `make cuda-check`),
SAFERLHF_PORTABLE=1 (no -march=native), TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
"""
import glob
import os

from setuptools import setup

CPU_SOURCES = ["csrc/binding.cpp"] + sorted(glob.glob("csrc/*_cpu.cpp")) + sorted(glob.glob("csrc/*_ops.cpp"))
CUDA_SOURCES = sorted(glob.glob("csrc/*_cuda.cu"))


def _cxx_flags():
    # no -std: torch's build adds the standard it needs (C++20 from torch 2.14).  -fopenmp: at::parallel_for is a
    # header template whose `#pragma omp parallel` is compiled here; without the flag every kernel's parallel_for
    # silently runs on one thread.  The extension then needs libgomp.so.1, which resolves to the one torch has
    # already loaded (torch/lib/libgomp.so.1): one OpenMP runtime, one thread pool.
    flags = ["-O3", "-fopenmp"]
    if os.environ.get("SAFERLHF_PORTABLE") != "1":
        flags.append("-march=native")  # AVX2 / AVX-512 exp and reductions; the build is local (editable install)
    return flags


def extensions():
    if os.environ.get("SAFERLHF_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda = bool(CUDA_SOURCES) and os.environ.get("SAFERLHF_NO_CUDA") != "1" and torch.version.cuda is not None
    cuda = cuda and cpp_extension.CUDA_HOME is not None
    cuda = cuda and (torch.cuda.is_available() or os.environ.get("SAFERLHF_FORCE_CUDA") == "1")
    define = []
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define = [("SAFERLHF_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension(
            "saferlhf_fast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=define,
            extra_link_args=["-fopenmp"],
            extra_compile_args={
                "cxx": _cxx_flags(),
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"],
            },
        )
    else:
        ext = cpp_extension.CppExtension(
            "saferlhf_fast._C", CPU_SOURCES, extra_compile_args={"cxx": _cxx_flags()}, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    # saferlhf_fast/kernels is a symlink to the top-level kernels/ folder, so the Triton kernels ship as
    # saferlhf_fast.kernels and also import from a plain source checkout (PYTHONPATH=.).  kernels/ has no
    # __init__.py (a namespace package), so it is never a top-level `kernels` that would shadow Hugging Face's.
    packages=[
        "saferlhf_fast",
        "saferlhf_fast.kernels",
        *[p.rstrip("/").replace("/", ".") for p in sorted(glob.glob("saferlhf_fast/*/"))
          if os.path.exists(p + "__init__.py")],
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
