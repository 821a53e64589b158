"""Shared fixtures: the `device` parametrization and the CPU instruction-set guard. Input generators and
comparison helpers live in helpers.py, next to this file; the emulated CUDA device in emulator.py.

Every test taking `device` runs on the CPU; on CUDA when a GPU is visible; and on "emulated": the CUDA kernels
run by the CUDA emulator on CPU tensors, each call checked against the CPU kernel (emulator.EmulatedCuda). A test
marked `not_emulated(reason)` runs on the CPU and CUDA only: inputs far beyond what the emulator runs in seconds
(their code paths run there on small inputs, with small sizing constants), or torch.compile, which refuses to
trace under the dispatch mode that routes the operators to the emulator."""
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

CPU = pytest.param("cpu", id="cpu")
CUDA = pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, needs_cuda])
EMULATED = pytest.param("emulated", id="emulated", marks=[pytest.mark.emulated])


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: runs the CUDA kernels on the CUDA emulator (tests/emulator.py)")
    if hasattr(config, "workerinput"):  # an xdist worker: share the cores with the others, do not oversubscribe
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(config.workerinput["workercount"])))
    config.addinivalue_line("markers", "not_emulated(reason): not run on the emulated CUDA device, for `reason`")


def pytest_collection_modifyitems(config, items):
    """The AddressSanitizer run of the emulated tests (xdist group "asan") is the longest: it starts first, so that
    the other tests run next to it."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        not_emulated = metafunc.definition.get_closest_marker("not_emulated")
        assert not_emulated is None or not_emulated.args, "not_emulated needs a reason"
        metafunc.parametrize("device", [CPU, CUDA] if not_emulated else [CPU, CUDA, EMULATED], indirect=True)
    if "gpu" in metafunc.fixturenames:
        metafunc.parametrize("gpu", [CUDA, EMULATED], indirect=True)


def _device(name):
    if name == "cuda":
        assert torch.cuda.is_available()  # never let a CUDA test quietly run somewhere else
    if name == "emulated":
        import emulator

        with emulator.EmulatedCuda():
            yield "cpu"
    else:
        yield name


@pytest.fixture
def device(request):
    """"cpu", "cuda" or, for "emulated", "cpu" with the rpn_ops operators running their emulated CUDA kernels."""
    yield from _device(request.param)


@pytest.fixture
def gpu(request):
    """For tests of the CUDA kernels alone: "cuda", or "cpu" with the emulated CUDA kernels (as `device`)."""
    yield from _device(request.param)


@pytest.fixture(autouse=True)
def restore_cpu_isa():
    """Tests may force a CPU instruction set; every test leaves the one in use when the session started."""
    initial = rpn_ops.build_info()["cpu_isa"]
    try:
        yield
    finally:
        rpn_ops.set_cpu_isa(initial)
