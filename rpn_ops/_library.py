"""Loads the compiled operators (rpn_ops._C), keeping the original error if that fails."""
import importlib

import torch  # noqa: F401  (loads libtorch / libc10, which rpn_ops._C links against)

try:
    _C = importlib.import_module("rpn_ops._C")
except ImportError as error:  # keep the real cause: a missing build, an ABI mismatch, a missing CUDA library
    raise ImportError(
        "rpn_ops could not load its compiled operators (rpn_ops._C). Build them against the torch you run with "
        "`pip install --no-build-isolation -e .` in the rpn_ops source folder (a plain `pip install .` works too, "
        "but then run Python outside the source folder, whose rpn_ops/ has no compiled library). "
        f"torch here is {torch.__version__}. Cause: {error}"
    ) from error


def build_info() -> dict:
    """What this build contains: ``cuda`` (CUDA kernels compiled), ``cuda_version``, ``cuda_archs``,
    ``built_with_torch``, and the CPU instruction sets compiled, supported here and in use (``cpu_isa``)."""
    return dict(_C.build_info())


def set_cpu_isa(name: str) -> None:
    """Force the instruction set of the CPU hot loops: ``"auto"`` (the best this CPU supports, the default),
    ``"baseline"``, ``"avx2"`` or ``"avx512"``. Results are identical; only speed changes."""
    _C.set_cpu_isa(name)
