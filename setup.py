"""Builds the host-memory extension `spin_kernels._swap_ext` (csrc/swap.cpp).

CUDAExtension when torch has CUDA and a CUDA toolkit is present, else a CPU-only CppExtension
with the same functions. SPIN_KERNELS_NO_EXT=1 skips it (spin_kernels.swap then uses torch).
"""
import os

from setuptools import setup


def extension_modules():
    if os.environ.get("SPIN_KERNELS_NO_EXT") == "1":
        return [], {}
    from torch.utils import cpp_extension
    import torch

    sources = ["csrc/swap.cpp"]
    cxx_flags = ["-O3", "-std=c++17"]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        ext = cpp_extension.CUDAExtension(
            "spin_kernels._swap_ext", sources, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags})
    else:
        ext = cpp_extension.CppExtension("spin_kernels._swap_ext", sources,
                                         extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
