"""Build script: the Python package, with ``kernels/`` installed as ``gradproj.kernels``.

The compiled extension (``gradproj._C``) is added by ``get_extensions()``:

* the C++ (CPU) kernels always, when torch can be imported;
* the CUDA kernels too when ``torch.cuda.is_available()`` or ``GRADPROJ_FORCE_CUDA=1``
  (so CI can compile them on a machine without a GPU);
* nothing at all when ``GRADPROJ_SKIP_EXT=1``.

Install with ``pip install --no-build-isolation .``: the extension must build against
the torch already installed; pip's isolated build environment would fetch another
(multi-GB) torch. Without torch at build time the package installs without the
extension and ``gradproj`` falls back to its Triton / reference backends.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"gradproj setup.py: {msg}", file=sys.stderr)


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for OpenMP, which ``at::parallel_for`` is built on in torch."""
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; parallel_for then runs serially
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def get_extensions() -> list:
    if os.environ.get("GRADPROJ_SKIP_EXT", "0") == "1":
        _log("GRADPROJ_SKIP_EXT=1: building without the compiled extension")
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError as exc:
        _log(
            f"cannot import torch ({exc}): building without gradproj._C. Install torch first "
            "and build with `pip install --no-build-isolation .` to get the C++/CUDA kernels."
        )
        return []

    sources = [os.path.join("csrc", "ops.cpp"), *sorted(glob.glob("csrc/cpu/*.cpp"))]
    omp_compile, omp_link = _openmp_flags()
    # -fno-math-errno: std::sqrt never sets errno, so GCC can vectorize it (sqrtps /
    # vsqrtps in the AdamW update of csrc/cpu/adamw_kernels.h).
    extra_compile_args = {"cxx": ["-O3", "-fno-math-errno", *omp_compile]}
    force_cuda = os.environ.get("GRADPROJ_FORCE_CUDA", "0") == "1"
    with_cuda = force_cuda or torch.cuda.is_available()
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        # GRADPROJ_PTXAS_VERBOSE=1 (make cuda-compile-check): ptxas prints registers, spills
        # and static shared memory per kernel and arch, which
        # scripts/cuda_compile_report.py reads from the build log.
        if os.environ.get("GRADPROJ_PTXAS_VERBOSE", "0") == "1":
            extra_compile_args["nvcc"] += ["-Xptxas", "-v"]
        extension = CUDAExtension
        _log("building gradproj._C with CPU and CUDA kernels")
    else:
        extension = CppExtension
        _log("building gradproj._C with CPU kernels (no CUDA: set GRADPROJ_FORCE_CUDA=1 to force)")
    return [
        extension(
            name="gradproj._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=omp_link,
            # torch's C++ ABI is stable for one torch build, not across Python versions.
            py_limited_api=False,
        )
    ]


def _cmdclass() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}
    return {"build_ext": BuildExtension}


packages = [*find_packages(include=["gradproj", "gradproj.*"]), "gradproj.kernels"]

setup(
    packages=packages,
    package_dir={"gradproj.kernels": "kernels"},
    ext_modules=get_extensions(),
    cmdclass=_cmdclass(),
)
