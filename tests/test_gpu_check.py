"""The GPU check (.ci/gpu) cannot rot: its dry run goes through every step on a copy of this checkout and writes
the files a device call brings back; and its reading of compute-sanitizer's output, which only a GPU machine
produces, is pinned on examples of that output."""
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import rpn_ops

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = {"summary.md", "environment.json", "results.json", "results.md", "plots.tar.gz", "sanitizer.md",
           "logs.tar.gz"}
NOT_COPIED = shutil.ignore_patterns(".git", "build", "gpu-check-out", "bench-out", ".hypothesis", ".pytest_cache",
                                    ".benchmarks", "__pycache__", "*.egg-info")
DRY_RUN_TESTS = "tests/test_nms.py -k empty_input"  # 4 CPU tests, and their 4 CUDA twins that skip without a GPU
NO_GPU = dict(CUDA_VISIBLE_DEVICES="")  # the same dry run on a GPU machine too


def load_gpu_check():
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(REPO_ROOT / ".ci" / "gpu"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    """This checkout's files in a temporary folder, with the library the tests run on, newer than every source:
    the dry run reuses it instead of compiling (minutes on two cores) and leaves this checkout's build alone."""
    copy = tmp_path_factory.mktemp("gpu-check") / "checkout"
    shutil.copytree(REPO_ROOT, copy, ignore=NOT_COPIED)
    library = Path(rpn_ops.library_path())
    shutil.copyfile(library, copy / "rpn_ops" / library.name)
    return copy


def run_gpu_check(copy, out, *args):
    return subprocess.run([sys.executable, str(copy / ".ci" / "gpu"), *args], cwd=copy, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, OUT=str(out), **NO_GPU))


@pytest.fixture(scope="module")
def dry_run(checkout_copy):
    out = checkout_copy.parent / "out"
    done = run_gpu_check(checkout_copy, out, "--dry-run", "--tests", DRY_RUN_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def packed(archive):
    with tarfile.open(archive) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def test_the_dry_run_goes_through_every_step(dry_run):
    out, stdout = dry_run
    steps = {s["name"]: s["status"] for s in json.loads(packed(out / "logs.tar.gz")["logs/steps.json"])}
    assert steps == dict(environment="ok", build="ok", tests="ok", benchmarks="ok", sanitizer="unavailable")
    assert all(any(line.startswith(name) for line in stdout.splitlines()) for name in steps)  # a line per step
    assert "dry run: reused the in-place library" in stdout and "GPU check: every step passed" in stdout


def test_the_results_fit_what_a_device_call_brings_back(dry_run):
    out, _ = dry_run
    assert {path.name for path in out.iterdir()} == OUTPUTS  # at most 8 files, no folder
    assert all(path.is_file() and path.stat().st_size < 16 * 2**20 for path in out.iterdir())


def test_the_summary_has_every_step_the_cuda_test_counts_and_the_benchmark(dry_run):
    out, _ = dry_run
    summary = (out / "summary.md").read_text()
    for row in ("| environment | ok |", "| build | ok |", "| tests | ok |", "| benchmarks | ok |",
                "| sanitizer | unavailable |"):
        assert row in summary
    assert "CUDA tests: 0 ran (0 failed)" in summary and "x 'needs a CUDA device'" in summary
    assert "| box_iou-2000x2000 |" in summary and "memcheck: unavailable" in summary


def test_the_logs_hold_every_steps_output(dry_run):
    out, _ = dry_run
    logs = packed(out / "logs.tar.gz")
    for name in ("environment.log", "build.log", "build-info.log", "tests.log", "tests.xml", "benchmarks.log",
                 "sanitizer-workload.log", "steps.json"):
        assert f"logs/{name}" in logs, sorted(logs)
    tally = json.loads(logs["logs/cuda-tally.json"])
    assert tally["cuda"]["ran"] == 0 and tally["cuda"]["skipped"] == tally["tests"]["passed"] > 0  # CUDA twins
    workload = logs["logs/sanitizer-workload.log"]
    ran = re.search(rb"\n(\d+) calls ran on cpu in", workload)
    assert ran and int(ran.group(1)) == workload.count(b"ran    ") > 20 and b"FAILED" not in workload, workload


def test_the_benchmark_results_and_plots_are_kept(dry_run, checkout_copy):
    out, _ = dry_run
    report = json.loads((out / "results.json").read_text())
    assert [r["workload"] for r in report["results"]] == ["box_iou-2000x2000"]
    assert packed(out / "plots.tar.gz")["plot-box_iou.png"].startswith(b"\x89PNG")
    environment = json.loads((out / "environment.json").read_text())
    assert environment["torch"] and environment["torchvision"] and environment["mode"] == "dry run"
    assert Path(environment["rpn_ops_build"]["path"]).is_relative_to(checkout_copy)  # the copy's rpn_ops


def test_without_a_gpu_the_real_check_stops_after_saying_so(checkout_copy):
    out = checkout_copy.parent / "out-no-gpu"
    done = run_gpu_check(checkout_copy, out, "--only", "tests")
    assert done.returncode == 1
    assert "no CUDA device is visible" in done.stdout and "FAILED: environment" in done.stdout
    assert "| environment | FAILED |" in (out / "summary.md").read_text()


CLEAN = """========= COMPUTE-SANITIZER
ran    nms float32
23 calls ran on cuda in 4.2 s
========= ERROR SUMMARY: 0 errors
"""
OUT_OF_BOUNDS = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at void rpn_ops::cuda::box_iou_kernel<float>(...)+0x1b0 in box_iou.cu:45
=========     by thread (3,0,0) in block (0,0,0)
FAILED box_iou 3000 x 20: RuntimeError: CUDA error: unspecified launch failure
22 calls ran on cuda in 9.0 s; 1 failed: box_iou 3000 x 20
========= ERROR SUMMARY: 1 error
"""
RACE = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at void rpn_ops::cuda::greedy_walk_kernel(...)+0x90 in nms.cu:120
=========     and Read access at void rpn_ops::cuda::greedy_walk_kernel(...)+0x1f0 in nms.cu:131 [512 hazards]
23 calls ran on cuda in 12.0 s
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
DEVICE_NOT_SUPPORTED = """========= COMPUTE-SANITIZER
========= Error: Device not supported. Please refer to the "Supported Devices" section of the sanitizer documentation
ran    nms float32
23 calls ran on cuda in 2.0 s
========= ERROR SUMMARY: 0 errors
"""
NOT_STARTED = """========= COMPUTE-SANITIZER
========= Error: Target application terminated before first instrumented API call
========= Error: couldn't find exit code.
"""
WORKLOAD_CRASHED = """========= COMPUTE-SANITIZER
Traceback (most recent call last):
ImportError: rpn_ops could not load its compiled operators (rpn_ops._C).
========= Error: Target application terminated before first instrumented API call
"""


@pytest.mark.parametrize("status, log, verdict, note", [
    (0, CLEAN, "clean", "ERROR SUMMARY: 0 errors"),
    (9, OUT_OF_BOUNDS, "FAILED", "ERROR SUMMARY: 1 error"),
    (9, RACE, "FAILED", "RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"),
    (0, DEVICE_NOT_SUPPORTED, "refused", "Error: Device not supported. Please refer"),
    (255, NOT_STARTED, "refused", "Error: Target application terminated before first instrumented API call"),
    (1, WORKLOAD_CRASHED, "FAILED", "exit status 1"),
    (None, "ran    nms float32\nran    nms torch.float16\n", "TIMED OUT", "last call done: nms torch.float16"),
], ids=["clean", "out-of-bounds", "race", "device-not-supported", "not-started", "workload-crashed", "timed-out"])
def test_compute_sanitizer_output_is_read_as_a_verdict(status, log, verdict, note):
    found = load_gpu_check().sanitizer_verdict(status, log)
    assert found["verdict"] == verdict and found["note"].startswith(note), found


def test_a_sanitizer_report_is_kept_without_its_details():
    reports = load_gpu_check().sanitizer_verdict(9, OUT_OF_BOUNDS)["reports"]
    assert reports == ["Invalid __global__ read of size 4 bytes"]
