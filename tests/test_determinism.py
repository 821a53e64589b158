"""Same inputs, same outputs: whatever the CPU thread count, whichever way the CPU kernels share their work
(on an idle machine through PyTorch's OpenMP threads, on a busy one with helpers from its inter-op pool:
csrc/cpu/parallel.h), call after call, and from several Python threads at once (box coding calls PyTorch's
exp / log from inside the threads)."""
import concurrent.futures

import pytest
import torch

import rpn_ops
from helpers import emulated, in_worker_threads
from rpn_ops import workloads


def every_op(seed, device="cpu", small=False):
    """One call of every op on RPN-sized inputs big enough to be split across threads; `small`: a tenth of the
    boxes and anchors, for the emulator, which runs a CUDA kernel's threads one after the other."""
    boxes_count, image_size = (2_000, (160, 200)) if small else (20_000, (512, 640))
    boxes, scores = workloads.rpn_like_boxes(boxes_count, seed=seed, device=device)
    idxs = workloads.categories(boxes_count, 7, seed=seed, device=device)
    gt = workloads.gt_boxes(40, seed=seed, device=device)
    images, features = workloads.fpn_batch(2, image_size, device=device)
    anchors = rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)(images, features)
    codes = workloads.box_deltas(len(anchors[0]), 2, seed=seed, device=device)
    targets_for = gt[torch.arange(len(anchors[0]), device=device) % len(gt)]
    num_anchors_per_level = [f.shape[-2] * f.shape[-1] * 3 for f in features]
    class_logits = workloads.box_deltas(2 * len(anchors[0]), 5, seed=seed, scale=3.0, device=device).view(2, -1, 20)
    labels = torch.arange(class_logits.shape[1], device=device).remainder(22).sub(2).expand(2, -1)
    detections = rpn_ops.dense_detections(class_logits - 3.0, codes[:, :4].expand(2, -1, -1), anchors,
                                          images.image_sizes, num_anchors_per_level, padded=True)
    return {
        "nms": rpn_ops.nms(boxes, scores, 0.7),
        "nms top": rpn_ops.nms(boxes, scores, 0.5, max_output=300),
        "batched_nms": rpn_ops.batched_nms(boxes, scores, idxs, 0.6),
        "box_iou": rpn_ops.box_iou(gt, boxes),
        "anchors": torch.stack(anchors),
        "decode": rpn_ops.decode_boxes(codes, anchors[0], (10.0, 10.0, 5.0, 5.0)),
        "decode half": rpn_ops.decode_boxes(codes.half(), anchors[0], (1.0, 1.0, 1.0, 1.0)),
        "encode": rpn_ops.encode_boxes(targets_for, anchors[0], (1.0, 1.0, 1.0, 1.0)),
        "match_anchors": torch.cat(rpn_ops.match_anchors([gt, gt[:7]], anchors)),
        **{f"assign_targets {i}": torch.cat(outputs) for i, outputs in enumerate(rpn_ops.assign_targets(
            anchors, [gt, gt[:0]]))},
        **{f"proposals {i}": torch.cat(outputs) for i, outputs in enumerate(rpn_ops.generate_proposals(
            workloads.box_deltas(2 * len(anchors[0]), 1, seed=seed, device=device)[:, :1], codes.reshape(-1, 4),
            anchors, images.image_sizes, num_anchors_per_level, 500, 300))},
        **{f"dense_detections {i}": output for i, output in enumerate(detections)},
        "dense_focal_loss": rpn_ops.dense_focal_loss(class_logits, labels),
        "dense_focal_loss backward": torch.ops.rpn_ops.dense_focal_loss_backward(
            torch.tensor([1.0, 0.5], device=device), class_logits, labels, 0.25, 2.0),
    }


def assert_same(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        same = (got[name] == expected[name]) | (got[name].isnan() & expected[name].isnan()) \
            if got[name].is_floating_point() else got[name] == expected[name]
        assert got[name].shape == expected[name].shape and bool(same.all()), name


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["idle", "busy"])
def machine(request):
    """The CPU kernels share their work as they do on an idle or on a busy machine, whatever this one is."""
    torch.ops.rpn_ops._set_cpu_threading(request.param)
    yield request.param
    torch.ops.rpn_ops._set_cpu_threading("auto")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_cpu_results_do_not_depend_on_the_thread_count(restore_threads, machine, threads):
    torch.set_num_threads(1)
    expected = every_op(seed=1)
    torch.set_num_threads(threads)
    assert_same(every_op(seed=1), expected)


def test_a_bad_box_found_by_the_threads_is_reported_and_leaves_them_working(restore_threads, machine):
    torch.set_num_threads(2)
    images, features = workloads.fpn_batch(2, (512, 640))
    anchors = rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)(images, features)
    gt = workloads.gt_boxes(40, seed=0)
    broken = [a.clone() for a in anchors]
    broken[1][-1, 2] = float("nan")  # in the last piece of the work
    with pytest.raises(ValueError, match="anchors has a box with an infinite or NaN coordinate"):
        rpn_ops.assign_targets(broken, [gt, gt])
    torch.set_num_threads(1)
    expected = rpn_ops.assign_targets(anchors, [gt, gt])
    torch.set_num_threads(2)
    for got, want in zip(rpn_ops.assign_targets(anchors, [gt, gt]), expected):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_the_threading_mode_is_checked():
    with pytest.raises(RuntimeError, match="mode must be 'auto' .* got 'fast'"):
        torch.ops.rpn_ops._set_cpu_threading("fast")


def test_repeated_calls_give_identical_results(device):
    first = every_op(seed=2, device=device, small=emulated())
    for _ in range(3):
        assert_same(every_op(seed=2, device=device, small=emulated()), first)


def test_every_op_from_several_python_threads_at_once(device, machine):
    small = emulated()
    sequential = [every_op(seed, device, small) for seed in range(4)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        concurrent_results = list(pool.map(in_worker_threads(lambda seed: every_op(seed, device, small)),
                                           list(range(4)) * 2))
    for k, result in enumerate(concurrent_results):
        assert_same(result, sequential[k % 4])
