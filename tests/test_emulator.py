"""The CUDA emulator itself: its intrinsics give CUDA's results, it reports what a GPU would refuse or leave
undefined (naming the kernel and the value), every CUDA kernel of every op runs on it, and an AddressSanitizer
build catches accesses past the end of tensors and shared memory."""
import os
import re
import subprocess
import sys

import pytest
import torch

import emulator
import rpn_ops
from rpn_ops import workloads

pytestmark = pytest.mark.emulated

ORDERS = [emulator.Run("forward"), emulator.Run("reverse"), emulator.Run("random", seed=7)]


def selftest(name, run=emulator.Run("forward")):
    with emulator.settings(run):
        return emulator.module().run_selftest(name)


@pytest.mark.parametrize("run", ORDERS, ids=str)
def test_intrinsics_give_cuda_results(run):
    got = selftest("intrinsics", run)
    for t in range(64):
        lane, warp = t % 32, t // 32
        first = 32 * warp
        expected = [
            sum(range(first, first + 32)),                                   # xor butterfly
            t + 1 if lane < 31 else t,                                       # shfl_down: own value past the end
            t - 2 if lane >= 2 else t,                                       # shfl_up: own value before the start
            first + 5,                                                       # broadcast of lane 5
            max((u * 7) % 32 for u in range(first, first + 32)),             # reduce_max
            torch.tensor(0xAAAAAAAA, dtype=torch.int64).to(torch.int32).item(),  # ballot of odd lanes
            int(warp == 0),                                                  # any(t == 9)
            int(warp == 0),                                                  # all(t < 32)
            sum(range(first + lane // 16 * 16, first + lane // 16 * 16 + 16)),  # width-16 butterfly
            1, 0, 1,                                                         # __syncthreads_or / _and / _count
        ]
        assert got[t].tolist() == expected, (t, got[t].tolist(), expected)


@pytest.mark.parametrize("run", ORDERS, ids=str)
def test_atomics_are_atomic(run):
    assert selftest("atomics", run).tolist() == [3 * 128, 3 * 128 - 1, -1]


def test_a_missing_barrier_shows_as_results_that_depend_on_the_thread_order():
    forward, reverse = selftest("race", ORDERS[0]), selftest("race", ORDERS[1])
    assert not torch.equal(forward, reverse)
    correct = (torch.arange(256, dtype=torch.int32) + 1) % 256 + 1
    for run in ORDERS:
        assert torch.equal(selftest("no_race", run), correct)


def test_fresh_shared_memory_holds_garbage_that_depends_on_the_order():
    forward, reverse = selftest("fresh_shared", ORDERS[0]), selftest("fresh_shared", ORDERS[1])
    assert forward[0].item() == torch.tensor([0xA5] * 8, dtype=torch.uint8).view(torch.int64).item()
    assert reverse[0].item() == torch.tensor([0x5A] * 8, dtype=torch.uint8).view(torch.int64).item()
    assert forward[1].item() & 0xFFFFFFFF == 0xA5A5A5A5


REFUSALS = [
    ("early_exit", r"early_exit_kernel, block \(0, 0, 0\) of 64 threads: barrier divergence: threads 16-63 wait at "
                   r"__syncthreads \(selftest.cpp:\d+\) but threads 0-15 have exited"),
    ("two_barriers", r"two_barriers_kernel.*barrier divergence: threads 0, 2, 4.* wait at selftest.cpp:\d+, threads 1, "
                     r"3, 5.* at selftest.cpp:\d+"),
    ("warp_deadlock", r"warp_deadlock_kernel.*deadlock: threads 1-31 wait at __shfl_xor_sync \(selftest.cpp:\d+\) for "
                      r"lanes that never come; thread 0 has exited"),
    ("mixed_collectives", r"lanes of warp 0 disagree: some wait in (__reduce_max_sync|__shfl_sync)\(mask 0xffffffff\)"),
    ("foreign_mask", r"thread (\d+) calls __shfl_sync\(mask 0xffff\) at selftest.cpp:\d+, whose mask leaves out its "
                     r"own lane \1"),
    ("static_shared_limit", r"static_shared_limit_kernel.*49153 bytes of static shared memory \(at most 49152\)"),
    ("static_and_dynamic_over_48k", r"shared_total_kernel.*1024 bytes of static shared memory \(at most 49152\) and "
                                    r"49152 dynamic \(together at most 49152\)"),
    ("block_of_2048", r"CUDA refuses to launch empty_kernel with block.x = 2048 \(from 1 to 1024\)"),
    ("block_z_of_65", r"CUDA refuses to launch empty_kernel with block.z = 65 \(from 1 to 64\)"),
    ("grid_y_of_65536", r"CUDA refuses to launch empty_kernel with grid.y = 65536 \(from 1 to 65535\)"),
    ("empty_grid", r"CUDA refuses to launch empty_kernel with grid.x = 0"),
    ("dynamic_shared_of_228k", r"CUDA refuses to launch empty_kernel with 233472 bytes of dynamic shared memory "
                               r"\(at most 232448\)"),
]


@pytest.mark.parametrize("name, message", REFUSALS, ids=[name for name, _ in REFUSALS])
@pytest.mark.parametrize("run", ORDERS[:2], ids=str)
def test_what_a_gpu_refuses_is_reported(name, message, run):
    with pytest.raises(RuntimeError, match=message):
        selftest(name, run)


def test_the_emulator_recovers_after_an_error():
    with pytest.raises(RuntimeError):
        selftest("warp_deadlock")
    assert selftest("no_race").sum().item() == sum(range(1, 257))


def test_every_self_test_is_exercised():
    exercised = {"intrinsics", "atomics", "race", "no_race", "fresh_shared", "early_exit", "two_barriers",
                 "warp_deadlock", "mixed_collectives", "foreign_mask", "static_shared_limit",
                 "static_and_dynamic_over_48k", "block_of_2048",
                 "block_z_of_65", "grid_y_of_65536", "empty_grid", "dynamic_shared_of_228k", "shared_overflow",
                 "global_overflow"}
    assert set(emulator.module().selftest_names()) == exercised


def every_op_once():
    """A small call of every op, in every form, through the emulated device."""
    boxes, scores = workloads.rpn_like_boxes(300, seed=3)
    idxs = workloads.categories(300, 4, seed=3)
    rpn_ops.nms(boxes, scores, 0.5)
    rpn_ops.nms(boxes.double(), scores.double(), 0.5, max_output=10)
    rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
    rpn_ops.box_iou(boxes[:70], boxes[:90])
    images, features = workloads.fpn_batch(2, (96, 128))
    generator = rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)
    anchors = generator(images, features)
    codes = workloads.box_deltas(len(anchors[0]), 1, seed=3)
    rpn_ops.decode_boxes(codes, anchors[0], (1.0, 1.0, 1.0, 1.0))
    rpn_ops.decode_boxes(codes.half(), anchors[0].half(), (10.0, 10.0, 5.0, 5.0))
    gt = [workloads.gt_boxes(7, seed=3), workloads.gt_boxes(5, seed=4)]
    rpn_ops.encode_boxes(gt[0][torch.arange(len(anchors[0])) % 7], anchors[0], (1.0, 1.0, 1.0, 1.0))
    rpn_ops.match_anchors(gt[0], anchors[0])
    rpn_ops.match_anchors(gt[0].double(), anchors[0].double())
    rpn_ops.match_anchors(gt, anchors, 0.5, 0.5, False, force_best_anchors=True)
    rpn_ops.match_fcos(gt, anchors, [f.shape[-2] * f.shape[-1] * 3 for f in features])
    rpn_ops.assign_targets(anchors, gt)
    num_anchors_per_level = [f.shape[-2] * f.shape[-1] * 3 for f in features]
    objectness = torch.randn(2 * len(anchors[0]), 1, generator=torch.Generator().manual_seed(3))
    deltas = workloads.box_deltas(2 * len(anchors[0]), 1, seed=4)
    for padded in (False, True):
        rpn_ops.generate_proposals(objectness, deltas, anchors, images.image_sizes, num_anchors_per_level, 50, 40,
                                   padded=padded)
    grid = rpn_ops.AnchorGrid.from_generator(generator, images.tensors.shape[-2:], [f.shape[-2:] for f in features])
    rpn_ops.generate_proposals(objectness.double(), deltas.double(), grid, images.image_sizes, num_anchors_per_level,
                               50, 40)
    logits = torch.randn(len(anchors[0]), 5, generator=torch.Generator().manual_seed(5)) * 2 - 3
    rpn_ops.score_candidates(logits, 0.05)
    class_logits, box_regression = logits.expand(2, -1, -1), deltas.view(2, -1, 4)
    rpn_ops.dense_detections(class_logits, box_regression, anchors, images.image_sizes, num_anchors_per_level,
                             topk_candidates=30, detections_per_img=20)
    rpn_ops.dense_detections(class_logits.double(), box_regression.double(), grid, images.image_sizes,
                             num_anchors_per_level, padded=True, activation="softmax", topk_per="class")
    rpn_ops.dense_detections(class_logits, box_regression.abs(), anchors, images.image_sizes, num_anchors_per_level,
                             centerness=class_logits[..., 0], box_coding="linear")
    labels = torch.randint(-2, 5, class_logits.shape[:2], generator=torch.Generator().manual_seed(6))
    rpn_ops.dense_focal_loss(class_logits, labels)
    torch.ops.rpn_ops.dense_focal_loss_backward(torch.tensor([1.0, 0.5]), class_logits.half(), labels, -1.0, 1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_paths_equal_the_cpu_kernels(dtype):
    """Under CUDA autocast the kernels take the exponential / logarithm of float16 / bfloat16 inputs in float32
    (float32_exp / float32_log; autocast itself needs a GPU): those paths on the emulator, each call checked against
    the CPU kernel's same path by the emulated device."""
    ops = torch.ops.rpn_ops
    anchors = workloads.rpn_like_boxes(500, seed=5)[0].to(dtype)
    codes = workloads.box_deltas(500, 2, seed=5, dtype=dtype)
    gt = workloads.gt_boxes(9, seed=5).to(dtype)
    with emulator.EmulatedCuda():
        assert ops.decode_boxes(codes, anchors, [1.0, 1.0, 1.0, 1.0], 4.0, True).dtype == torch.float32
        assert ops.encode_boxes(gt[torch.arange(500) % 9], anchors, [1.0, 2.0, 1.0, 1.0], True).dtype == torch.float32
        labels, matched, targets = ops.assign_targets(gt, anchors, [9], [500], 0.7, 0.3, True, [1.0] * 4, True)
        assert targets.dtype == torch.float32
        objectness = torch.randn(2 * 500, generator=torch.Generator().manual_seed(5)).to(dtype)
        boxes, _ = ops.generate_proposals(objectness, workloads.box_deltas(1000, 1, seed=6, dtype=dtype), [anchors],
                                          [100, 120, 90, 110], [500], 50, 30, 0.7, 0.0, 1e-3, float32_exp=True)
        assert boxes[0].dtype == torch.float32


def cuda_kernel_names():
    names = set()
    for path in sorted(os.listdir(os.path.join(emulator.CSRC, "cuda"))):
        if path.endswith(".cu"):
            source = open(os.path.join(emulator.CSRC, "cuda", path)).read()
            names |= set(re.findall(r"__global__ void (\w+)\(", source))
    return names


def test_every_cuda_kernel_runs_on_the_emulator():
    emulator.module().reset_kernel_runs()
    with emulator.EmulatedCuda():
        every_op_once()
    launched = {re.sub(r"<.*", "", name) for name in emulator.kernel_runs()}
    assert cuda_kernel_names() - launched == set()


def test_small_sizings_send_small_inputs_down_the_large_input_paths():
    """Under the reverse run's small sizing constants, NMS works in chunks of 64 rows (several walks), grid-stride
    loops wrap, ground truth comes in several tiles and anchors in several launches."""
    m = emulator.module()
    assert set(emulator.SMALL_SIZINGS) == set(m.sizings())  # every sizing constant has a small value
    m.reset_kernel_runs()
    with emulator.settings(emulator.Run("reverse", small_sizings=True)):
        boxes, scores = workloads.rpn_like_boxes(300, seed=3)
        torch.ops.rpn_ops_emulated.nms(boxes, scores, 0.5)
    runs = emulator.kernel_runs()
    assert runs["greedy_walk_kernel"][0] == 5  # ceil(300 / 64) chunks
    assert runs["overlap_mask_kernel<float>"][0] == 5


def test_a_context_switch_costs_nanoseconds():
    """The emulator's own switch, measured (the number is in the README); swapcontext, which also saves the
    signal mask with a system call, for comparison."""
    own, swap = emulator.module().switch_nanoseconds(200_000), emulator.module().switch_nanoseconds(20_000, True)
    print(f"context switch: {own:.1f} ns, swapcontext: {swap:.1f} ns")
    assert own > 0 and swap > 0


# ---------------------------------------------------------------------------------------------------------
# AddressSanitizer

# Every op's kernels, on random shapes and dtypes (test_fuzz.py), every kernel in every path (test_emulator.py),
# and the special inputs of each op's own tests (for target assignment the fuzz tests: its own are the slowest).
ASAN_FILES = ["test_fuzz.py", "test_emulator.py", "test_nms.py", "test_batched_nms.py", "test_box_iou.py",
              "test_anchors.py", "test_box_coder.py", "test_proposals.py", "test_bad_input.py"]


def run_under_asan(args, timeout):
    """`python args...` with the AddressSanitizer build of the emulated module, its runtime preloaded (it must come
    first), and libstdc++ with it (so that its exception interceptor finds the C++ runtime)."""
    def library(name):
        return subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()

    env = dict(os.environ, RPN_OPS_EMULATOR_ASAN="1", LD_PRELOAD=f"{library('libasan.so')} {library('libstdc++.so.6')}",
               ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1")
    return subprocess.run([sys.executable, *args], cwd=emulator.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def asan_build():
    """Builds the AddressSanitizer variant (in a subprocess: it cannot load into this process)."""
    done = run_under_asan(["-c", "import sys; sys.path.insert(0, 'tests'); import emulator; emulator.module()"], 1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.xdist_group("asan")
@pytest.mark.parametrize("name", ["shared_overflow", "global_overflow"])
def test_asan_catches_accesses_past_the_end(asan_build, name):
    """One thread writes an int past the end of the dynamic shared memory, or of a tensor."""
    script = f"import sys; sys.path.insert(0, 'tests'); import emulator; emulator.module().run_selftest({name!r})"
    done = run_under_asan(["-c", script], 600)
    assert done.returncode != 0 and "heap-buffer-overflow" in done.stderr, done.stderr[-3000:]
    assert re.search(r"WRITE of size 4 .*\n.*in .*overflow_kernel.*selftest.cpp", done.stderr), done.stderr[-3000:]


@pytest.mark.xdist_group("asan")
def test_the_emulated_tests_of_every_op_are_clean_under_asan(asan_build):
    """The emulated tests of every op again, with the AddressSanitizer build: no read or write past the end of a
    tensor or of shared memory, in any kernel."""
    # --capture=sys: AddressSanitizer writes its report to file descriptor 2, which must reach our stderr.
    done = run_under_asan(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", "--capture=sys", "-m",
                           "emulated", "-k", "not asan", *[os.path.join("tests", f) for f in ASAN_FILES]], 1800)
    assert done.returncode == 0 and "AddressSanitizer" not in done.stderr, (done.stdout[-4000:], done.stderr[-4000:])
