"""rpn_ops.box_iou: torchvision.ops.box_iou on the inputs cast to float32 (float64 for float64), bit for bit,
with broadcast leading dimensions."""
import math

import pytest
import torch
import torchvision

import rpn_ops
from helpers import (FLOAT_DTYPES, HALF_DTYPES, SPECIAL_KINDS, assert_same_iou, needs_cuda, non_contiguous,
                     special_boxes)
from rpn_ops import reference, workloads


def tv_box_iou(boxes1, boxes2):
    dtype = torch.float64 if boxes1.dtype == torch.float64 else torch.float32
    return torchvision.ops.box_iou(boxes1.cpu().to(dtype), boxes2.cpu().to(dtype))


def iou_on(device, boxes1, boxes2):
    """rpn_ops.box_iou of the boxes on `device`; the result must be there too."""
    out = rpn_ops.box_iou(boxes1.to(device), boxes2.to(device))
    assert out.device.type == device, out.device
    return out


def generic_boxes(n, seed, dtype=torch.float32, device="cpu"):
    """Half clustered proposals, half uniform boxes: many partial overlaps, some disjoint pairs."""
    proposals, _ = workloads.rpn_like_boxes(n - n // 2, seed=seed, per_cluster=10)
    uniform = workloads.random_boxes(n // 2, seed=seed, scale=1200.0)
    return torch.cat([proposals, uniform]).to(dtype=dtype, device=device)


def near(boxes, m, seed):
    """`m` boxes of which half are jittered copies of `boxes` (so that the two sets overlap)."""
    g = torch.Generator().manual_seed(seed)
    copies = boxes[torch.randint(0, len(boxes), (m // 2,), generator=g)]
    copies = copies + torch.randn(copies.shape, generator=g) * 3.0
    return torch.cat([copies, generic_boxes(m - m // 2, seed=seed)])


@pytest.mark.parametrize("n, m", [(1, 1), (7, 13), (300, 50), (2000, 64), (64, 3000)])
def test_float32_matches_torchvision_bit_for_bit(device, n, m):
    boxes1 = generic_boxes(n, seed=1)
    boxes2 = near(boxes1, m, seed=2)
    expected = tv_box_iou(boxes1, boxes2)
    got = iou_on(device, boxes1, boxes2)
    assert got.device.type == device
    assert_same_iou(got, expected)
    assert ((expected > 0) & (expected < 1)).any() or n * m == 1


def test_ground_truth_against_anchors_matches_torchvision(device):
    gt = workloads.gt_boxes(50, seed=3)
    anchors, _ = workloads.rpn_like_boxes(20000, seed=4)
    assert_same_iou(iou_on(device, gt, anchors), tv_box_iou(gt, anchors))


def test_float64_matches_torchvision_in_float64(device):
    boxes1, boxes2 = generic_boxes(500, seed=5, dtype=torch.float64), generic_boxes(70, seed=6, dtype=torch.float64)
    got = iou_on(device, boxes1, boxes2)
    assert got.dtype == torch.float64
    assert_same_iou(got, torchvision.ops.box_iou(boxes1, boxes2))


def test_matches_reference(device):
    for dtype in FLOAT_DTYPES:
        boxes1, boxes2 = generic_boxes(200, seed=7, dtype=dtype), generic_boxes(30, seed=8, dtype=dtype)
        assert_same_iou(iou_on(device, boxes1, boxes2), reference.box_iou(boxes1, boxes2))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_is_computed_in_float32(device, dtype):
    boxes1, boxes2 = generic_boxes(400, seed=9, dtype=dtype), generic_boxes(60, seed=10, dtype=dtype)
    got = iou_on(device, boxes1, boxes2)
    assert got.dtype == torch.float32
    assert_same_iou(got, torchvision.ops.box_iou(boxes1.float(), boxes2.float()))
    assert_same_iou(got, iou_on(device, boxes1.float(), boxes2.float()))


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_output_dtype(device, dtype, out_dtype):
    boxes = torch.tensor([[0.0, 0.0, 4.0, 1.0]], dtype=dtype, device=device)
    assert iou_on(device, boxes, boxes).dtype == out_dtype


def test_exact_values(device):
    boxes1 = torch.tensor([[0.0, 0.0, 4.0, 1.0]], device=device)
    boxes2 = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0], [4.0, 0.0, 5.0, 1.0], [0.0, 0.0, 4.0, 1.0],
                           [-1.0, -1.0, 5.0, 2.0]], device=device)
    expected = torch.tensor([[0.5, 0.5, 0.0, 1.0, 4.0 / 18.0]])
    assert_same_iou(iou_on(device, boxes1, boxes2), expected)


# --- shapes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape1, shape2, out_shape", [
    ((5, 6, 4), (5, 7, 4), (5, 6, 7)),
    ((6, 4), (5, 7, 4), (5, 6, 7)),
    ((5, 6, 4), (7, 4), (5, 6, 7)),
    ((2, 1, 6, 4), (3, 7, 4), (2, 3, 6, 7)),
    ((1, 6, 4), (4, 7, 4), (4, 6, 7)),
    ((2, 3, 1, 6, 4), (3, 2, 7, 4), (2, 3, 2, 6, 7)),
])
def test_leading_dimensions_broadcast(device, shape1, shape2, out_shape):
    g = torch.Generator().manual_seed(11)
    boxes1 = generic_boxes(math.prod(shape1[:-1]), seed=12)[torch.randperm(math.prod(shape1[:-1]), generator=g)]
    boxes2 = near(boxes1, math.prod(shape2[:-1]), seed=13)
    boxes1, boxes2 = boxes1.reshape(shape1), boxes2.reshape(shape2)
    got = iou_on(device, boxes1, boxes2)
    assert got.shape == out_shape
    expected = tv_box_iou(boxes1, boxes2)
    assert ((expected > 0) & (expected < 1)).any()
    assert_same_iou(got, expected)
    # Every batch entry is the 2-D IoU of its (broadcast) pair of box sets.
    b1, b2 = torch.broadcast_tensors(boxes1[..., :, None, :], boxes2[..., None, :, :])
    flat1 = b1[..., :, 0, :].reshape(-1, shape1[-2], 4)
    flat2 = b2[..., 0, :, :].reshape(-1, shape2[-2], 4)
    for k in range(len(flat1)):
        assert_same_iou(got.reshape(-1, shape1[-2], shape2[-2])[k], torchvision.ops.box_iou(flat1[k], flat2[k]))


@pytest.mark.parametrize("shape1, shape2, out_shape", [
    ((0, 4), (5, 4), (0, 5)),
    ((5, 4), (0, 4), (5, 0)),
    ((0, 4), (0, 4), (0, 0)),
    ((3, 0, 4), (3, 5, 4), (3, 0, 5)),
    ((0, 6, 4), (7, 4), (0, 6, 7)),
    ((2, 1, 6, 4), (0, 7, 4), (2, 0, 6, 7)),
])
def test_empty_inputs_give_empty_outputs(device, shape1, shape2, out_shape):
    for dtype in FLOAT_DTYPES:
        got = rpn_ops.box_iou(torch.zeros(shape1, dtype=dtype, device=device),
                              torch.zeros(shape2, dtype=dtype, device=device))
        assert got.shape == out_shape and got.device.type == device
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_non_contiguous_inputs_give_the_contiguous_result(device):
    boxes1, boxes2 = generic_boxes(300, seed=14, device=device), generic_boxes(40, seed=15, device=device)
    expected = iou_on(device, boxes1, boxes2)
    assert_same_iou(iou_on(device, non_contiguous(boxes1), non_contiguous(boxes2)), expected)
    assert_same_iou(iou_on(device, boxes1[::2], boxes2[::3]), expected[::2, ::3])
    batched = torch.stack([boxes1[:40], boxes2], 1).transpose(0, 1)  # a [2, 40, 4] view of a [40, 2, 4] tensor
    assert not batched.is_contiguous()
    assert_same_iou(iou_on(device, batched, boxes2), tv_box_iou(batched, boxes2))
    expanded = boxes2[:1].expand(25, 4)  # stride-0 rows
    assert_same_iou(iou_on(device, boxes1, expanded), expected[:, :1].expand(300, 25))


def test_output_is_contiguous_and_inputs_unchanged(device):
    boxes1, boxes2 = generic_boxes(30, seed=16, device=device), generic_boxes(20, seed=17, device=device)
    before1, before2 = boxes1.clone(), boxes2.clone()
    out = rpn_ops.box_iou(boxes1.t().contiguous().t(), boxes2)
    assert out.is_contiguous()
    assert torch.equal(boxes1, before1) and torch.equal(boxes2, before2)


# --- special values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_boxes_match_torchvision(device, kind):
    """NaN where torchvision has NaN (NaN coordinates, 0/0 of zero-area pairs, inf - inf), the same numbers
    elsewhere; zero-area, inverted, negative, huge and infinite boxes."""
    boxes, _ = special_boxes(kind, n=300, seed=18)
    got = iou_on(device, boxes, boxes[:80])
    assert_same_iou(got, tv_box_iou(boxes, boxes[:80]))


@pytest.mark.parametrize("kind", ["huge", "nan", "inf", "all_mixed"])
def test_special_boxes_match_torchvision_in_float64(device, kind):
    boxes, _ = special_boxes(kind, n=300, seed=19, dtype=torch.float64)
    assert_same_iou(iou_on(device, boxes, boxes[:80]), tv_box_iou(boxes, boxes[:80]))


def test_nan_propagates_to_every_pair_with_a_nan_box(device):
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, math.nan, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    got = iou_on(device, boxes, boxes).cpu()
    expected = tv_box_iou(boxes, boxes)
    assert torch.isnan(expected[1]).all() and torch.isnan(expected[:, 1]).all()
    assert_same_iou(got, expected)


def test_zero_area_pairs_are_nan_as_in_torchvision(device):
    points = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    expected = tv_box_iou(points, points)
    assert torch.isnan(expected).all()  # 0 / 0
    assert_same_iou(iou_on(device, points, points), expected)


def test_wrapper_is_the_registered_operator(device):
    boxes1, boxes2 = generic_boxes(30, seed=20, device=device), generic_boxes(20, seed=21, device=device)
    assert_same_iou(torch.ops.rpn_ops.box_iou(boxes1, boxes2), rpn_ops.box_iou(boxes1, boxes2))


@needs_cuda
@pytest.mark.cuda
def test_cuda_output_beyond_2_31_elements():
    """An [N, M] output with more than 2**31 entries: indexing must be 64-bit (spot-checked at both ends)."""
    boxes1 = generic_boxes(48_000, seed=22)
    boxes2 = near(boxes1, 46_000, seed=23)
    assert len(boxes1) * len(boxes2) > 2**31
    got = rpn_ops.box_iou(boxes1.cuda(), boxes2.cuda())
    try:
        assert got.shape == (48_000, 46_000)
        for rows in (slice(0, 3), slice(23_000, 23_003), slice(-3, None)):
            assert_same_iou(got[rows], tv_box_iou(boxes1[rows], boxes2))
        assert_same_iou(got[:, -3:], tv_box_iou(boxes1, boxes2[-3:]))
    finally:
        del got
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------
# Gradients, and every input torchvision's box_iou takes
# ---------------------------------------------------------------------------------------------------------

def test_gradients_equal_torchvision(device):
    boxes1 = generic_boxes(40, seed=30, device=device).requires_grad_()
    boxes2 = near(boxes1.detach().cpu(), 30, seed=31).to(device).requires_grad_()
    grad = torch.randn(40, 30, device=device)
    ours = torch.autograd.grad(rpn_ops.box_iou(boxes1, boxes2), (boxes1, boxes2), grad)
    theirs = torch.autograd.grad(torchvision.ops.box_iou(boxes1, boxes2), (boxes1, boxes2), grad)
    for g, e in zip(ours, theirs):
        assert torch.equal(g, e)


def test_gradcheck_in_float64(device):
    boxes1 = generic_boxes(6, seed=32, dtype=torch.float64, device=device).requires_grad_()
    boxes2 = near(boxes1.detach().cpu(), 5, seed=33).double().to(device).requires_grad_()
    assert torch.autograd.gradcheck(rpn_ops.box_iou, (boxes1, boxes2))
    assert torch.autograd.gradgradcheck(rpn_ops.box_iou, (boxes1, boxes2))


def test_opcheck_with_inputs_that_require_grad(device):
    boxes = generic_boxes(12, seed=34, device=device)
    for args in [(boxes.requires_grad_(), boxes[:5].detach()), (boxes.double().requires_grad_(),
                                                                 boxes.double().detach().requires_grad_())]:
        torch.library.opcheck(torch.ops.rpn_ops.box_iou.default, args)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_boxes_give_torchvisions_float_iou(device, dtype):
    boxes1 = (generic_boxes(30, seed=35) / 6).to(dtype)  # within uint8's range
    boxes2 = near(boxes1.float(), 20, seed=36).clamp(0, 255).to(dtype)
    expected = torchvision.ops.box_iou(boxes1, boxes2)
    got = rpn_ops.box_iou(boxes1.to(device), boxes2.to(device))
    assert got.dtype == expected.dtype == torch.float32
    assert_same_iou(got.cpu(), expected)


@pytest.mark.parametrize("dtype1, dtype2", [(torch.float32, torch.float64), (torch.float64, torch.float16),
                                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.int32, torch.float32), (torch.float64, torch.int64)])
def test_mixed_dtypes_are_promoted_as_torchvision_promotes_them(device, dtype1, dtype2):
    boxes1, boxes2 = generic_boxes(25, seed=37).to(dtype1), generic_boxes(15, seed=38).to(dtype2)
    expected = torchvision.ops.box_iou(boxes1, boxes2)
    got = rpn_ops.box_iou(boxes1.to(device), boxes2.to(device))
    assert got.dtype == expected.dtype
    if torch.float16 in (dtype1, dtype2) and torch.float64 not in (dtype1, dtype2):
        torch.testing.assert_close(got.cpu(), expected)  # torchvision subtracts float16 corners in float16 too
    else:
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_formats_give_torchvisions_iou(device, fmt):
    boxes1 = torchvision.ops.box_convert(generic_boxes(30, seed=39), "xyxy", fmt)
    boxes2 = torchvision.ops.box_convert(generic_boxes(20, seed=40), "xyxy", fmt)
    expected = torchvision.ops.box_iou(boxes1, boxes2, fmt=fmt)
    assert torch.equal(rpn_ops.box_iou(boxes1.to(device), boxes2.to(device), fmt=fmt).cpu(), expected)


@pytest.mark.skipif(not hasattr(torch.ops.torchvision, "box_iou_rotated"), reason="torchvision < 0.29")
def test_rotated_box_formats_are_torchvisions():
    boxes = torch.tensor([[10.0, 10.0, 8.0, 4.0, 30.0], [12.0, 11.0, 6.0, 6.0, 0.0]])
    assert torch.equal(rpn_ops.box_iou(boxes, boxes, fmt="cxcywhr"), torchvision.ops.box_iou(boxes, boxes,
                                                                                              fmt="cxcywhr"))


def test_an_unknown_format_is_named():
    with pytest.raises(ValueError, match="fmt must be 'xyxy', 'xywh' or 'cxcywh', got 'yxyx'"):
        rpn_ops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4), fmt="yxyx")
