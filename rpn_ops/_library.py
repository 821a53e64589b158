"""Loads the compiled operators (the shared library rpn_ops/_C), keeping the original error if that fails.

The library is plain C++ on libtorch, with no Python in it: ``torch.ops.load_library(rpn_ops.library_path())``
loads it into any process (a TorchScript or AOTInductor model that uses the operators), as C++ programs load it
with ``dlopen`` or by linking."""
import glob
import importlib.machinery
import importlib.util
import json
import os

import torch


def _find_library() -> str:
    """rpn_ops/_C's newest build: a folder rebuilt in place can still hold an older build under another name
    (``_C.cpython-311-x86_64-linux-gnu.so`` from before the library became ``_C.abi3.so``), which Python's
    import order would prefer."""
    spec = importlib.util.find_spec("rpn_ops._C")
    if spec is None or spec.origin is None:
        raise ImportError("no compiled library rpn_ops/_C*.so next to the rpn_ops package")
    builds = [path for suffix in importlib.machinery.EXTENSION_SUFFIXES
              for path in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C" + suffix))]
    return max(builds, key=os.path.getmtime, default=spec.origin)


def _load() -> str:
    try:
        path = _find_library()
        torch.ops.load_library(path)
    except (ImportError, OSError) as error:  # keep the real cause: a missing build, an ABI mismatch, a missing library
        cause = f"{error}: {error.__cause__}" if error.__cause__ is not None else str(error)  # load_library wraps it
        raise ImportError(
            "rpn_ops could not load its compiled operators (rpn_ops._C). Build them against the torch you run with "
            "`pip install --no-build-isolation -e .` in the rpn_ops source folder (a plain `pip install .` works "
            "too, but then run Python outside the source folder, whose rpn_ops/ has no compiled library). "
            f"torch here is {torch.__version__}. Cause: {cause}"
        ) from error
    return path


LIBRARY_PATH = _load()


def library_path() -> str:
    """The file of rpn_ops' compiled operators, for ``torch.ops.load_library`` (a process that runs a scripted or
    AOTInductor-compiled model without ``import rpn_ops``) or for a C++ program to ``dlopen``."""
    return LIBRARY_PATH


def build_info() -> dict:
    """What this build contains: ``cuda`` (CUDA kernels compiled), ``cuda_version``, ``cuda_archs``,
    ``built_with_torch``, and the CPU instruction sets compiled, supported here and in use (``cpu_isa``)."""
    return json.loads(torch.ops.rpn_ops._build_info())


def set_cpu_isa(name: str) -> None:
    """Force the instruction set of the CPU hot loops: ``"auto"`` (the best this CPU supports, the default),
    ``"baseline"``, ``"avx2"`` or ``"avx512"``. Results are identical; only speed changes."""
    torch.ops.rpn_ops._set_cpu_isa(name)
