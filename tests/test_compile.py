"""The operators as PyTorch sees them: registrations that pass torch.library.opcheck, fake kernels that let
torch.compile trace them (data-dependent output sizes included), and autocast."""
import pytest
import torch

import rpn_ops
from helpers import assert_indices, assert_same_iou, needs_cuda
from rpn_ops import workloads


def nms_samples(device):
    boxes, scores = workloads.rpn_like_boxes(300, seed=1, device=device)
    half_boxes, half_scores = boxes.half(), scores.half()
    return [
        (boxes, scores, 0.5, None),
        (boxes, scores, 0.7, 10),
        (boxes, scores, 0.7, 0),
        (boxes.double(), scores.double(), 0.3, None),
        (half_boxes, half_scores, 0.5, 1000),
        (boxes[:0], scores[:0], 0.5, None),
        (boxes.t().contiguous().t(), scores, -0.5, None),
    ]


def test_opcheck_nms(device):
    for args in nms_samples(device):
        torch.library.opcheck(torch.ops.rpn_ops.nms.default, args)


def test_opcheck_batched_nms(device):
    for i, (boxes, scores, iou_threshold, max_output) in enumerate(nms_samples(device)):
        idxs = workloads.categories(len(boxes), 1 + 3 * i, seed=i, device=device)
        torch.library.opcheck(torch.ops.rpn_ops.batched_nms.default, (boxes, scores, idxs, iou_threshold, max_output))
    boxes, scores = workloads.rpn_like_boxes(100, seed=2, device=device)
    idxs = torch.arange(100, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.rpn_ops.batched_nms.default, (boxes, scores, idxs, 0.5, 5))


def test_opcheck_box_iou(device):
    boxes, _ = workloads.rpn_like_boxes(60, seed=3, device=device)
    for args in [(boxes, boxes[:7]), (boxes.half(), boxes[:9].half()), (boxes.double(), boxes.double()),
                 (boxes.view(2, 30, 4), boxes[:5]), (boxes.view(3, 1, 20, 4), boxes.view(2, 30, 4)),
                 (boxes[:0], boxes)]:
        torch.library.opcheck(torch.ops.rpn_ops.box_iou.default, args)


def _proposal_stage(boxes, scores, idxs):
    keep = rpn_ops.nms(boxes, scores, 0.5)
    per_class = rpn_ops.batched_nms(boxes, scores, idxs, 0.5, max_output=20)
    iou = rpn_ops.box_iou(boxes[keep], boxes)
    return keep, per_class, iou.max(dim=0).values


def _check_compiled(compiled, sizes, device):
    for n in sizes:
        boxes, scores = workloads.rpn_like_boxes(n, seed=n, device=device)
        idxs = workloads.categories(n, 3, seed=n, device=device)
        expected = _proposal_stage(boxes, scores, idxs)
        got = compiled(boxes, scores, idxs)
        assert 0 < len(expected[0]) < n
        assert_indices(got[0], expected[0], device)
        assert_indices(got[1], expected[1], device)
        assert_same_iou(got[2], expected[2])


def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    compiled = torch.compile(_proposal_stage, fullgraph=True, dynamic=False)
    _check_compiled(compiled, [200], device)


def test_torch_compile_with_dynamic_box_counts_matches_eager(device):
    """The number of boxes varies from call to call (as it does between images): one graph, symbolic N."""
    torch._dynamo.reset()
    compiled = torch.compile(_proposal_stage, fullgraph=True, dynamic=True, backend="aot_eager")
    _check_compiled(compiled, [200, 350, 1000], device)


def test_autocast_cpu_with_float32_boxes_and_bfloat16_scores():
    boxes, scores = workloads.rpn_like_boxes(2000, seed=4)
    scores = scores.bfloat16()
    idxs = workloads.categories(2000, 5, seed=5)
    expected_nms = rpn_ops.nms(boxes, scores.float(), 0.5)
    expected_batched = rpn_ops.batched_nms(boxes, scores.float(), idxs, 0.5, max_output=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_nms = rpn_ops.nms(boxes, scores, 0.5)
        got_batched = rpn_ops.batched_nms(boxes, scores, idxs, 0.5, max_output=100)
        iou = rpn_ops.box_iou(boxes.bfloat16(), boxes[:10])
    assert_indices(got_nms, expected_nms, "cpu")
    assert_indices(got_batched, expected_batched, "cpu")
    assert iou.dtype == torch.float32
    assert_same_iou(iou, rpn_ops.box_iou(boxes.bfloat16().float(), boxes[:10]))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda_with_mixed_precision_inputs(dtype):
    device = "cuda"
    boxes, scores = workloads.rpn_like_boxes(2000, seed=6, device=device)
    idxs = workloads.categories(2000, 5, seed=7, device=device)
    low_scores = scores.to(dtype)
    with torch.autocast("cuda", dtype=dtype):
        got_nms = rpn_ops.nms(boxes, low_scores, 0.5)
        got_batched = rpn_ops.batched_nms(boxes.to(dtype), scores, idxs, 0.5)
        iou = rpn_ops.box_iou(boxes.to(dtype), boxes[:10])
    assert_indices(got_nms, rpn_ops.nms(boxes, low_scores.float(), 0.5), device)
    assert_indices(got_batched, rpn_ops.batched_nms(boxes.to(dtype).float(), scores, idxs, 0.5), device)
    assert iou.dtype == torch.float32
    assert_same_iou(iou, rpn_ops.box_iou(boxes.to(dtype).float(), boxes[:10]))


@needs_cuda
@pytest.mark.cuda
def test_ops_run_on_a_side_cuda_stream():
    device = "cuda"
    boxes, scores = workloads.rpn_like_boxes(20000, seed=8)
    idxs = workloads.categories(20000, 10, seed=9)
    expected = (rpn_ops.nms(boxes, scores, 0.7), rpn_ops.batched_nms(boxes, scores, idxs, 0.7),
                rpn_ops.box_iou(boxes[:100], boxes))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        # Inputs produced on the side stream immediately before the ops: they must run on the current stream.
        b, s, i = (boxes.to(device, non_blocking=True) * 1, scores.to(device, non_blocking=True) * 1,
                   idxs.to(device, non_blocking=True) + 0)
        got = (rpn_ops.nms(b, s, 0.7), rpn_ops.batched_nms(b, s, i, 0.7), rpn_ops.box_iou(b[:100], b))
    stream.synchronize()
    assert_indices(got[0], expected[0], device)
    assert_indices(got[1], expected[1], device)
    assert_same_iou(got[2], expected[2])
