"""Shared fixtures: the `device` parametrization (CPU always, CUDA when a GPU is visible) and the CPU
instruction-set guard. Input generators and comparison helpers live in helpers.py, next to this file."""
import importlib.util
import os
import sys

import pytest
import torch  # before rpn_ops: its extension links against torch's libraries

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:  # `import helpers` under any pytest import mode
    sys.path.insert(0, TESTS_DIR)
if importlib.util.find_spec("rpn_ops") is None:  # not installed: test the in-place build of this checkout
    sys.path.insert(0, REPO_ROOT)

import rpn_ops  # noqa: E402
from helpers import needs_cuda  # noqa: E402

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, needs_cuda])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test taking `device` runs on the CPU and, when a GPU is visible, on CUDA."""
    if request.param == "cuda":
        assert torch.cuda.is_available()  # never let a CUDA test quietly run somewhere else
    return request.param


@pytest.fixture(autouse=True)
def restore_cpu_isa():
    """Tests may force a CPU instruction set; every test leaves the one in use when the session started."""
    initial = rpn_ops.build_info()["cpu_isa"]
    try:
        yield
    finally:
        rpn_ops.set_cpu_isa(initial)
