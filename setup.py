"""Builds pyllm._C: the C++ CPU kernels always; the CUDA kernels when torch is a CUDA build and nvcc exists.

Install torch first, then: pip install --no-build-isolation .   (see README)
Environment: PYLLM_SKIP_CUDA_BUILD=1 skips the CUDA sources; PYLLM_CPU_KERNELS=0 builds the op schemas
without the C++ CPU kernels (a quick build for work on the Python layer, or a GPU-only build: the op schemas stay, the cpu
backend reports itself unavailable); PYLLM_CPU_ARCH sets -march (default: native, the build machine's own instruction
set; "" for none); TORCH_CUDA_ARCH_LIST (e.g. "9.0") picks the GPU architectures, as for any torch extension (default
here: sm_80 and sm_90); MAX_JOBS limits parallel compile jobs.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("pyllm: torch must be installed before building (pip install torch), "
             "then build with: pip install --no-build-isolation .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _cuda_plan():
    """(build CUDA?, reason) by what the machine has."""
    if os.environ.get("PYLLM_SKIP_CUDA_BUILD", "0") == "1":
        return False, "PYLLM_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if not _rel("csrc/cuda/*.cu"):
        return False, "no CUDA sources"
    return True, ""


arch = os.environ.get("PYLLM_CPU_ARCH", "native")
cxx = ["-O3", "-fopenmp", "-std=c++17"] + ([f"-march={arch}"] if arch else [])
sources = ["csrc/pyllm.cpp", "csrc/autograd.cpp", "csrc/small_calls.cpp"]  # schemas, C++ autograd, fast paths
if os.environ.get("PYLLM_CPU_KERNELS", "1") != "0":  # 0: schemas only, to work on the Python layer alone
    sources += _rel("csrc/cpu/*.cpp")
use_cuda, why = _cuda_plan()
if use_cuda:
    # torch's build adds -gencode flags for TORCH_CUDA_ARCH_LIST only when none are given here
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    print(f"pyllm: building the C++ {'CPU and ' if len(sources) > 1 else ''}CUDA kernels "
          f"({'TORCH_CUDA_ARCH_LIST=' + archs if archs else 'sm_80, sm_90'})")
    sources += _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "--threads=2"]
    if not archs:
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    ext = CUDAExtension("pyllm._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        extra_compile_args={"cxx": cxx + ["-DPYLLM_WITH_CUDA"], "nvcc": nvcc},
                        extra_link_args=["-fopenmp"])
else:
    print(f"pyllm: building the C++ CPU kernels only ({why})")
    ext = CppExtension("pyllm._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                       extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])

setup(
    packages=find_packages(include=["pyllm", "pyllm.*"]) + ["pyllm.kernels"],
    package_dir={"pyllm.kernels": "kernels"},
    package_data={"pyllm": ["verified.json"]},  # which backends passed benchmarks/gpu_check.sh on a GPU
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
