"""rpn_ops.BoxCoder, decode_boxes and encode_boxes: torchvision's BoxCoder to the bit on the same device, for
every dtype, class count and weight set, including the clamp, huge, tiny and zero-size boxes."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection._utils import encode_boxes as torchvision_encode_boxes

import rpn_ops
from emulator import cuda_divided_codes
from helpers import FLOAT_DTYPES, HALF_DTYPES, cpu_kernels, needs_cuda, non_contiguous
from rpn_ops import reference, workloads

WEIGHT_SETS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.1, 3.0, 7.0, 0.3)]
RPN_CLIP = math.log(1000.0 / 16)


def anchors_like(n, seed=0, dtype=torch.float32, device="cpu"):
    """RPN-like reference boxes: clustered proposals of all sizes."""
    return workloads.rpn_like_boxes(n, seed=seed)[0].to(dtype=dtype, device=device)


deltas = workloads.box_deltas


def assert_bits_equal(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape and got.device == expected.device, (
        got.dtype, expected.dtype, got.shape, expected.shape)
    same = (got == expected) | (got.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} differ, e.g. {got[~same][:4]} vs {expected[~same][:4]}"


@pytest.mark.parametrize("weights", WEIGHT_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_matches_torchvision(device, weights, dtype):
    anchors, codes = anchors_like(20_000, device=device), deltas(20_000, scale=2.0, dtype=dtype, device=device)
    expected = TorchvisionBoxCoder(weights).decode(codes, [anchors])
    assert_bits_equal(rpn_ops.BoxCoder(weights).decode(codes, [anchors]), expected)


@pytest.mark.parametrize("classes", [2, 3, 91])
def test_decode_of_several_classes_per_box_matches_torchvision(device, classes):
    boxes, codes = anchors_like(500, seed=1, device=device), deltas(500, classes, seed=1, device=device)
    coder = (10.0, 10.0, 5.0, 5.0)
    expected = TorchvisionBoxCoder(coder).decode_single(codes, boxes)
    assert_bits_equal(rpn_ops.BoxCoder(coder).decode_single(codes, boxes), expected)
    assert_bits_equal(rpn_ops.decode_boxes(codes, boxes, coder), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_of_a_single_box_with_several_classes(device, dtype):
    """Found by test_fuzz: for one box, the box repeated per class is a zero-stride view, not a copy."""
    boxes = anchors_like(1, device=device).to(dtype)
    codes = deltas(1, 2, scale=0.1, dtype=dtype, device=device)
    assert_bits_equal(rpn_ops.decode_boxes(codes, boxes, (1.0, 1.0, 1.0, 1.0)),
                      TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, boxes))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_of_extreme_deltas_and_boxes_matches_torchvision(device, dtype):
    """Deltas far past the clamp (both signs), huge and tiny boxes, zero-width and zero-height boxes (inf/NaN,
    as torchvision), NaN and infinite deltas."""
    n = 4000
    boxes = anchors_like(n, seed=2).double()
    boxes[: n // 4] *= 1e4  # huge
    boxes[n // 4: n // 2, 2:] = boxes[n // 4: n // 2, :2] + 1e-3  # tiny
    boxes[n // 2: n // 2 + 50, 2] = boxes[n // 2: n // 2 + 50, 0]  # zero width
    boxes[n // 2 + 50: n // 2 + 100, 3] = boxes[n // 2 + 50: n // 2 + 100, 1]  # zero height
    codes = deltas(n, seed=2, scale=30.0).double()
    codes[::7, 2:] = 1e4  # clamp active
    codes[1::7, 2:] = -1e4  # exp underflows to zero
    codes[2::97] = float("nan")
    codes[3::97, 0] = float("inf")
    boxes, codes = boxes.to(dtype=dtype, device=device), codes.to(dtype=dtype, device=device)
    for clip in (RPN_CLIP, 0.0, -1.5, float("inf")):
        expected = TorchvisionBoxCoder((1.0, 2.0, 1.0, 0.5), clip).decode_single(codes, boxes)
        assert_bits_equal(rpn_ops.decode_boxes(codes, boxes, (1.0, 2.0, 1.0, 0.5), clip), expected)


def test_decode_converts_the_boxes_to_the_codes_dtype_like_torchvision(device):
    boxes = anchors_like(3000, seed=3, dtype=torch.float64, device=device) + 0.123456789
    for dtype in (torch.float16, torch.float32):
        codes = deltas(3000, seed=3, dtype=dtype, device=device)
        expected = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, boxes)
        assert_bits_equal(rpn_ops.decode_boxes(codes, boxes, (1.0, 1.0, 1.0, 1.0)), expected)


def test_decode_reads_non_contiguous_inputs(device):
    boxes, codes = anchors_like(2000, seed=4, device=device), deltas(2000, 3, seed=4, device=device)
    expected = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(codes, boxes)
    got = rpn_ops.decode_boxes(non_contiguous(codes), non_contiguous(boxes), (10.0, 10.0, 5.0, 5.0))
    assert_bits_equal(got, expected)
    every_other = deltas(4000, 3, seed=4, device=device)[::2]
    assert_bits_equal(rpn_ops.decode_boxes(every_other, boxes, (1.0, 1.0, 1.0, 1.0)),
                      TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(every_other, boxes))


def test_decode_of_a_list_of_images_has_torchvision_shapes(device):
    coder, theirs = rpn_ops.BoxCoder((1.0, 1.0, 1.0, 1.0)), TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))
    per_image = [anchors_like(700, seed=5, device=device), anchors_like(300, seed=6, device=device)]
    for classes in (1, 2):
        codes = deltas(1000, classes, seed=7, device=device)
        assert_bits_equal(coder.decode(codes, per_image), theirs.decode(codes, per_image))
    empty = [per_image[0][:0]]
    assert_bits_equal(coder.decode(deltas(0, device=device), empty), theirs.decode(deltas(0, device=device), empty))


def test_decode_of_back_to_back_anchors_reads_them_in_place(device):
    """Per-image anchors from rpn_ops.AnchorGenerator share one buffer: decode uses it without concatenating,
    and gives exactly the concatenated result."""
    stacked = anchors_like(1000, seed=8, device=device).expand(3, 1000, 4).contiguous()
    per_image = list(stacked.unbind(0))
    codes = deltas(3000, seed=8, device=device)
    got = rpn_ops.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, per_image)
    assert_bits_equal(got, TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, [p.clone() for p in per_image]))
    shuffled = [per_image[1], per_image[0], per_image[2]]  # not back to back: concatenated as usual
    assert_bits_equal(rpn_ops.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, shuffled),
                      TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode(codes, shuffled))


@pytest.mark.parametrize("weights", WEIGHT_SETS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_encode_matches_torchvision(device, weights, dtype):
    proposals = anchors_like(20_000, seed=9, dtype=dtype, device=device)
    gt = workloads.gt_boxes(50, seed=9).to(dtype=dtype, device=device)[torch.arange(20_000, device=device) % 50]
    expected = TorchvisionBoxCoder(weights).encode_single(gt, proposals)
    assert_bits_equal(rpn_ops.BoxCoder(weights).encode_single(gt, proposals), expected)
    weights_tensor = torch.tensor(weights, dtype=dtype, device=device)
    assert_bits_equal(rpn_ops.encode_boxes(gt, proposals, weights_tensor),
                      torchvision_encode_boxes(gt, proposals, weights_tensor))


@pytest.mark.parametrize("reference_dtype, proposal_dtype", [
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
    (torch.float16, torch.bfloat16), (torch.float64, torch.float32), (torch.bfloat16, torch.float64)])
def test_encode_of_mixed_dtypes_follows_promotion_like_torchvision(device, reference_dtype, proposal_dtype):
    """Under autocast the RPN encodes float32 ground truth against float16 anchors."""
    proposals = anchors_like(5000, seed=10, dtype=proposal_dtype, device=device)
    gt = anchors_like(5000, seed=11, dtype=reference_dtype, device=device)
    expected = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, proposals)
    assert_bits_equal(rpn_ops.BoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, proposals), expected)


def test_encode_of_degenerate_boxes_matches_torchvision(device):
    proposals = anchors_like(400, seed=12, device=device)
    gt = anchors_like(400, seed=13, device=device)
    proposals[:50, 2] = proposals[:50, 0]  # zero-width anchors: inf / NaN targets
    gt[50:100, 3] = gt[50:100, 1]  # zero-height ground truth: log(0) = -inf
    gt[100:150] = gt[100:150, [2, 3, 0, 1]]  # inverted: log of a negative ratio = NaN
    gt[150:160] = float("nan")
    proposals[160:170] *= 1e30
    expected = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, proposals)
    assert_bits_equal(rpn_ops.encode_boxes(gt, proposals, (1.0, 1.0, 1.0, 1.0)), expected)


def test_encode_of_a_list_of_images_matches_torchvision(device):
    coder, theirs = rpn_ops.BoxCoder((1.0, 1.0, 1.0, 1.0)), TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0))
    gts = [anchors_like(300, seed=14, device=device), anchors_like(0, device=device), anchors_like(100, seed=15, device=device)]
    props = [anchors_like(300, seed=16, device=device), anchors_like(0, device=device), anchors_like(100, seed=17, device=device)]
    got, expected = coder.encode(gts, props), theirs.encode(gts, props)
    assert isinstance(got, tuple) and len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert_bits_equal(g, e)


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_decode_undoes_encode(device, weights):
    anchors = anchors_like(5000, seed=18, dtype=torch.float64, device=device)
    gt = anchors_like(5000, seed=19, dtype=torch.float64, device=device)
    targets = rpn_ops.encode_boxes(gt, anchors, weights)
    size_weights = torch.tensor(weights[2:], dtype=torch.float64, device=device)
    assert (targets[:, 2:] / size_weights).max() < RPN_CLIP  # the clamp is not active on this data
    torch.testing.assert_close(rpn_ops.decode_boxes(targets, anchors, weights), gt, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reference_follows_torchvision(dtype):
    """The plain-PyTorch reference (what the benchmarks also time) is torchvision's arithmetic."""
    anchors, codes = anchors_like(3000, seed=20, dtype=dtype), deltas(3000, 2, seed=20, scale=3.0, dtype=dtype)
    assert_bits_equal(reference.decode_boxes(codes, anchors, (10.0, 10.0, 5.0, 5.0)),
                      TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(codes, anchors))
    gt = anchors_like(3000, seed=21, dtype=dtype)
    assert_bits_equal(reference.encode_boxes(gt, anchors, (10.0, 10.0, 5.0, 5.0)),
                      TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).encode_single(gt, anchors))


def test_gradients_equal_torchvision(device):
    anchors = anchors_like(300, seed=22, device=device).requires_grad_()
    codes = deltas(300, 2, seed=22, device=device).requires_grad_()
    weights = (10.0, 10.0, 5.0, 5.0)
    grad = torch.randn(300, 8, device=device)
    ours = torch.autograd.grad(rpn_ops.decode_boxes(codes, anchors, weights), (codes, anchors), grad)
    theirs = torch.autograd.grad(TorchvisionBoxCoder(weights).decode_single(codes, anchors), (codes, anchors), grad)
    for g, e in zip(ours, theirs):
        assert_bits_equal(g, e)
    gt = anchors_like(300, seed=23, device=device).requires_grad_()
    grad = torch.randn(300, 4, device=device)
    ours = torch.autograd.grad(rpn_ops.encode_boxes(gt, anchors, weights), (gt, anchors), grad)
    theirs = torch.autograd.grad(TorchvisionBoxCoder(weights).encode_single(gt, anchors), (gt, anchors), grad)
    for g, e in zip(ours, theirs):
        assert_bits_equal(g, e)


def test_empty_inputs_give_empty_outputs(device):
    for dtype in FLOAT_DTYPES:
        boxes = torch.zeros(0, 4, dtype=dtype, device=device)
        assert rpn_ops.decode_boxes(torch.zeros(0, 8, dtype=dtype, device=device), boxes, (1, 1, 1, 1)).shape == (0, 8)
        assert rpn_ops.encode_boxes(boxes, boxes, (1, 1, 1, 1)).shape == (0, 4)
    assert rpn_ops.decode_boxes(torch.zeros(5, 0, device=device), anchors_like(5, device=device), (1, 1, 1, 1)).shape == (5, 0)


def test_bad_input_is_rejected_with_a_clear_message():
    boxes, codes = anchors_like(10), deltas(10)
    with pytest.raises(RuntimeError, match=r"rel_codes must have shape \[N, 4 \* K\]"):
        rpn_ops.decode_boxes(deltas(10)[:, :3], boxes, (1, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r"rel_codes must have shape \[N, 4 \* K\]"):
        rpn_ops.decode_boxes(codes.reshape(-1), boxes, (1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="boxes has 9 boxes but rel_codes has 10 rows"):
        rpn_ops.decode_boxes(codes, boxes[:9], (1, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r"boxes must have shape \[N, 4\]"):
        rpn_ops.decode_boxes(codes, boxes[:, :3], (1, 1, 1, 1))
    with pytest.raises(TypeError, match="rel_codes must be float16, bfloat16, float32 or float64, got Int"):
        rpn_ops.decode_boxes(codes.int(), boxes, (1, 1, 1, 1))
    with pytest.raises(TypeError, match="boxes must be float16, bfloat16, float32 or float64, got Bool"):
        rpn_ops.decode_boxes(codes, boxes.bool(), (1, 1, 1, 1))
    with pytest.raises(ValueError, match="weights must hold 4 numbers"):
        rpn_ops.decode_boxes(codes, boxes, (1, 1, 1))
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        rpn_ops.decode_boxes(codes, boxes, (1, 0, 1, 1))
    with pytest.raises(ValueError, match="weights must be finite and > 0"):
        rpn_ops.encode_boxes(boxes, boxes, (1, 1, float("nan"), 1))
    with pytest.raises(ValueError, match="bbox_xform_clip must be a number, got NaN"):
        rpn_ops.decode_boxes(codes, boxes, (1, 1, 1, 1), float("nan"))
    with pytest.raises(TypeError, match="bbox_xform_clip must be a number"):
        rpn_ops.decode_boxes(codes, boxes, (1, 1, 1, 1), "4")
    with pytest.raises(RuntimeError, match="reference_boxes and proposals must have the same number of boxes, got 10 and 9"):
        rpn_ops.encode_boxes(boxes, boxes[:9], (1, 1, 1, 1))
    with pytest.raises(TypeError, match="proposals must be float16, bfloat16, float32 or float64, got Bool"):
        rpn_ops.encode_boxes(boxes, boxes.bool(), (1, 1, 1, 1))
    with pytest.raises(TypeError, match="boxes must be a list or tuple"):
        rpn_ops.BoxCoder((1, 1, 1, 1)).decode(codes, boxes)


@needs_cuda
def test_inputs_on_different_devices_are_rejected():
    with pytest.raises(RuntimeError, match="rel_codes and boxes must be on the same device"):
        rpn_ops.decode_boxes(deltas(10, device="cuda"), anchors_like(10), (1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="reference_boxes and proposals must be on the same device"):
        rpn_ops.encode_boxes(anchors_like(10), anchors_like(10, device="cuda"), (1, 1, 1, 1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kernels_match_cpu(gpu, dtype):
    """The CPU kernel's results, where the CUDA kernel divides a code by a weight as PyTorch's CUDA kernel does (by
    multiplying with the reciprocal: the CPU kernel on codes divided that way, with weights of 1). Bit for bit on
    the emulator; on a GPU up to the device's exp and log (one unit in the last place of the exponential or
    logarithm, which x1 = ctr - w / 2 turns into an absolute error of that size)."""
    anchors, codes = anchors_like(20_000, seed=24, dtype=dtype), deltas(20_000, 2, seed=24, scale=2.0, dtype=dtype)
    gt = anchors_like(20_000, seed=25, dtype=dtype)
    eps = 0.0 if gpu != "cuda" else 4 * torch.finfo(dtype).eps

    def assert_matches(got, expected):
        finite = expected[expected.isfinite()].abs()
        atol = eps * float(finite.max()) if finite.numel() else 0.0
        torch.testing.assert_close(got.cpu(), expected, rtol=eps, atol=atol, equal_nan=True)

    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        with cpu_kernels():
            decoded = rpn_ops.decode_boxes(cuda_divided_codes(codes, weights), anchors, (1.0, 1.0, 1.0, 1.0))
            encoded = rpn_ops.encode_boxes(gt, anchors, weights)
        assert_matches(rpn_ops.decode_boxes(codes.to(gpu), anchors.to(gpu), weights), decoded)
        assert_matches(rpn_ops.encode_boxes(gt.to(gpu), anchors.to(gpu), weights), encoded)


@needs_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cuda_autocast_matches_torchvision_under_autocast(dtype):
    """CUDA autocast runs torch.exp / torch.log in float32: torchvision's decode and encode of float16 inputs
    then return float32, with the earlier steps rounded to float16. Ours does the same."""
    anchors = anchors_like(20_000, seed=26, dtype=dtype, device="cuda")
    codes = deltas(20_000, seed=26, dtype=dtype, device="cuda")
    gt = anchors_like(20_000, seed=27, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        expected = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, anchors)
        got = rpn_ops.decode_boxes(codes, anchors, (1.0, 1.0, 1.0, 1.0))
        expected_targets = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, anchors)
        got_targets = rpn_ops.encode_boxes(gt, anchors, (1.0, 1.0, 1.0, 1.0))
        half_targets = rpn_ops.encode_boxes(gt.to(dtype), anchors, (1.0, 1.0, 1.0, 1.0))
        expected_half_targets = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt.to(dtype), anchors)
    assert expected.dtype == torch.float32
    assert_bits_equal(got, expected)
    assert_bits_equal(got_targets, expected_targets)
    assert_bits_equal(half_targets, expected_half_targets)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cpu_autocast_matches_torchvision_under_autocast(dtype):
    anchors, codes = anchors_like(5000, seed=28, dtype=dtype), deltas(5000, seed=28, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        expected = TorchvisionBoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, anchors)
        got = rpn_ops.decode_boxes(codes, anchors, (1.0, 1.0, 1.0, 1.0))
    assert_bits_equal(got, expected)


def test_decode_of_integer_boxes_converts_them_as_torchvision(device):
    """decode_single converts the reference boxes to the codes' dtype first, integer boxes included."""
    boxes = anchors_like(200, seed=30).round().to(torch.int64)
    codes = deltas(200, 1, seed=30)
    expected = TorchvisionBoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(codes, boxes)
    got = rpn_ops.BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(codes.to(device), boxes.to(device))
    assert_bits_equal(got.cpu(), expected)
