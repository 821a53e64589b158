"""The workloads of `benchmarks.cases` through pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

One benchmark per workload, implementation (ours, torchvision) and device (cpu, and cuda when present),
grouped by workload and device so that ours and torchvision sit side by side. torchvision's CPU NMS on 100k
boxes takes tens of seconds: those cases are marked ``slow`` and timed once (deselect with -m "not slow").
The torchvision benchmarks also check that ours returns the same answer.
"""
import pytest
import torch

from benchmarks.cases import WORKLOADS, parity

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _slow(workload, impl, device):
    return device == "cpu" and impl == "torchvision" and workload.slow_torchvision_cpu


def _cases():
    for device in DEVICES:
        for workload in (w for w in WORKLOADS if device in w.devices):
            for impl in ("ours", "torchvision"):
                yield pytest.param(workload, impl, device, id=f"{workload.name}-{impl}-{device}",
                                   marks=[pytest.mark.slow] if _slow(workload, impl, device) else [])


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("workload, impl, device", _cases())
def test_bench(benchmark, inputs_cache, workload, impl, device):
    key = (workload.name, device)
    if key not in inputs_cache:
        inputs_cache.clear()  # keep one workload's inputs alive at a time
        inputs_cache[key] = workload.make_inputs(torch.device(device))
    inputs = inputs_cache[key]
    fn = getattr(workload, impl)
    call = (lambda: (fn(*inputs), torch.cuda.synchronize())[0]) if device == "cuda" else (lambda: fn(*inputs))

    benchmark.group = f"{workload.name} [{device}]"
    benchmark.extra_info.update(op=workload.op, label=workload.label, params=workload.params, device=device)
    if _slow(workload, impl, device):
        result = benchmark.pedantic(call, rounds=1, iterations=1)
    else:
        result = benchmark(call)

    if impl == "torchvision":
        assert parity(workload, workload.ours(*inputs), result, inputs) != "MISMATCH"
