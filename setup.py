"""Build rpn_ops: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of torch exist.

    pip install --no-build-isolation .          # torch must already be installed

Environment: FORCE_CUDA=1 (build the CUDA kernels or fail), FORCE_ONLY_CPU=1 (never build them),
CUDA_HOME (the toolkit folder), TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"; default: the visible GPUs' archs, or
DEFAULT_CUDA_ARCHS when none is visible), MAX_JOBS (parallel compile jobs).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# Archs compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Turing to Hopper as machine code
# (CUDA 13 no longer builds for Volta), plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"
ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def toolkit_at(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, "include", "cuda_runtime.h")) and any(
        os.path.isfile(os.path.join(folder, "bin", exe)) for exe in ("nvcc", "nvcc.exe"))


def find_cuda_home():
    """CUDA_HOME if set; else the toolkit that torch would guess, if it is real; else the usual folders.

    torch guesses from the nvcc on PATH, which is wrong when that nvcc is a wrapper script in /usr/local/bin.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if toolkit_at(c)), None)


cuda_home = find_cuda_home()
if cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if env_flag("FORCE_CUDA") and env_flag("FORCE_ONLY_CPU"):
    sys.exit("rpn_ops: FORCE_CUDA and FORCE_ONLY_CPU are both set; choose one")
have_toolkit = toolkit_at(cuda_home)
if env_flag("FORCE_ONLY_CPU"):
    with_cuda, why = False, "FORCE_ONLY_CPU=1"
elif env_flag("FORCE_CUDA"):
    if not have_toolkit or torch.version.cuda is None:
        sys.exit(f"rpn_ops: FORCE_CUDA=1 but no usable CUDA toolkit (CUDA_HOME={cuda_home}) or torch "
                 f"{torch.__version__} is not a CUDA build")
    with_cuda, why = True, "FORCE_CUDA=1"
elif have_toolkit and torch.version.cuda is not None:
    with_cuda, why = True, f"CUDA toolkit at {cuda_home} and torch built with CUDA {torch.version.cuda}"
else:
    with_cuda = False
    why = ("torch is a CPU-only build" if torch.version.cuda is None
           else "no CUDA toolkit found (set CUDA_HOME)")

cuda_archs = ""
if with_cuda:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    cuda_archs = os.environ["TORCH_CUDA_ARCH_LIST"]

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
# rpn_ops/_C is a library of operators, not a Python module: no Python in it (py_limited_api also keeps
# libtorch_python out), so that torch.ops.load_library and C++ programs load it (rpn_ops/_library.py).
# C++20 named: the kernels use concepts and std::type_identity, and older torch (2.11 for one) builds extensions
# as C++17 unless a standard is given.
cxx_flags = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-std=c++20"]
if sys.platform == "win32":
    cxx_flags = ["/O2", "/fp:precise", "/std:c++20"]
# at::parallel_for is inlined into our code: without OpenMP it runs on one thread. Compile with OpenMP when
# torch uses it; the OpenMP calls then resolve to torch's own runtime, already loaded (torch_scatter does so).
uses_openmp = "OpenMP" in torch.__config__.parallel_info() and sys.platform != "darwin"
if uses_openmp:
    cxx_flags.append("/openmp" if sys.platform == "win32" else "-fopenmp")
macros = [("RPN_OPS_TORCH_VERSION", f'"{torch.__version__}"')]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    macros += [("RPN_OPS_WITH_CUDA", None), ("RPN_OPS_CUDA_VERSION", f'"{torch.version.cuda}"'),
               ("RPN_OPS_CUDA_ARCHS", f'"{cuda_archs}"')]
    # --fmad=false: no a*b+c contraction, so the CUDA kernels give the CPU kernels' (and torchvision's) bits.
    nvcc_flags = ["-O3", "--fmad=false", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++20"]
    extension = CUDAExtension("rpn_ops._C", sources, define_macros=macros, py_limited_api=True,
                              extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
else:
    extension = CppExtension("rpn_ops._C", sources, define_macros=macros, py_limited_api=True,
                             extra_compile_args={"cxx": cxx_flags})

print(f"rpn_ops: building {'CPU + CUDA' if with_cuda else 'CPU-only'} kernels ({why}); "
      f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}, archs {cuda_archs}" if with_cuda else "")
      + f"; {len(sources)} sources" + ("; OpenMP threads" if uses_openmp else "; single-threaded CPU loops"),
      flush=True)

setup(
    name="rpn_ops",
    version="0.1.0",
    description="Fast, torchvision-exact Region Proposal Network ops (NMS, IoU, ...) for PyTorch, CPU and CUDA",
    packages=find_packages(include=["rpn_ops", "rpn_ops.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
