"""The operators as PyTorch sees them: registrations that pass torch.library.opcheck, fake kernels that let
torch.compile trace them (data-dependent output sizes included), and autocast."""
import pytest
import torch

import rpn_ops
from helpers import assert_indices, assert_same_iou, compiles, needs_cuda
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


@compiles
def test_torch_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    compiled = torch.compile(_proposal_stage, fullgraph=True, dynamic=False)
    _check_compiled(compiled, [200], device)


@compiles
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


def test_opcheck_grid_anchors(device):
    cells = torch.cat([rpn_ops.cell_anchors((32, 64), (0.5, 1.0, 2.0), device=device),
                       rpn_ops.cell_anchors((128,), (1.0,), device=device)])
    for table, num_images in [(cells, 1), (cells.half(), 3), (cells.double(), 0), (cells.t().contiguous().t(), 2)]:
        torch.library.opcheck(torch.ops.rpn_ops.grid_anchors.default, (table, [6, 1], [5, 7, 2, 3], [8, 8, 20, 24],
                                                                       num_images))


def test_opcheck_box_coding(device):
    boxes, _ = workloads.rpn_like_boxes(200, seed=10, device=device)
    codes = torch.randn(200, 8, device=device)
    gt = workloads.rpn_like_boxes(200, seed=11, device=device)[0]
    for args in [(codes, boxes, [1.0, 1.0, 1.0, 1.0], 4.1, False), (codes.half(), boxes, [10.0, 10.0, 5.0, 5.0], 4.1, True),
                 (codes[:, :4].double(), boxes.double(), [1.0, 2.0, 3.0, 4.0], 1.0, False), (codes[:0], boxes[:0], [1.0] * 4, 4.1, False)]:
        torch.library.opcheck(torch.ops.rpn_ops.decode_boxes.default, args)
    for args in [(gt, boxes, [1.0, 1.0, 1.0, 1.0], False), (gt, boxes.half(), [10.0, 10.0, 5.0, 5.0], False),
                 (gt.bfloat16(), boxes.bfloat16(), [1.0, 1.0, 1.0, 1.0], True)]:
        torch.library.opcheck(torch.ops.rpn_ops.encode_boxes.default, args)


def _anchor_and_decode_stage(generator, coder, images, features, codes):
    anchors = generator(images, features)
    proposals = coder.decode(codes, anchors)
    targets = coder.encode_single(proposals.reshape(-1, 4), torch.cat(anchors))
    return anchors, proposals, targets


@compiles
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_of_anchors_and_box_coding_matches_eager(device, dynamic):
    from torchvision.models.detection.image_list import ImageList

    torch._dynamo.reset()
    generator, coder = rpn_ops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2), rpn_ops.BoxCoder((1., 1., 1., 1.))
    compiled = torch.compile(_anchor_and_decode_stage, fullgraph=True, dynamic=dynamic,
                             backend="aot_eager" if dynamic else "inductor")
    for height, width in [(128, 192), (160, 96)]:
        images = ImageList(torch.zeros(2, 3, height, width, device=device), [(height, width)] * 2)
        features = [torch.zeros(2, 4, height // s, width // s, device=device) for s in (8, 16)]
        codes = torch.randn(2 * (height * width // 64 + height * width // 256) * 3, 4, device=device)
        expected = _anchor_and_decode_stage(generator, coder, images, features, codes)
        got = compiled(generator, coder, images, features, codes)
        for g, e in zip(got[0], expected[0]):
            assert torch.equal(g, e)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
