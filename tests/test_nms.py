"""rpn_ops.nms: torchvision.ops.nms's answer (its CPU rules: stable descending score order, IoU > threshold
compared as a double), on realistic and on adversarial inputs, for every dtype, on every device."""
import math

import pytest
import torch
import torchvision

import rpn_ops
from helpers import (FLOAT_DTYPES, HALF_DTYPES, SPECIAL_KINDS, assert_indices, exact_half_iou_pair, float32_neighbours,
                     needs_cuda, non_contiguous, pair_with_float32_iou, special_boxes, stable_descending,
                     too_large_to_emulate, tv_nms, tv_nms_rpn_like)
from rpn_ops import reference, workloads

SIZES = [1, 2, 100, 1000, 5000, 20000]
THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.95, 1.0]


# --- parity on realistic inputs ---------------------------------------------------------------------------

@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_torchvision_on_rpn_like_boxes(device, n, iou_threshold):
    boxes, scores = workloads.rpn_like_boxes(n, device=device)
    expected = tv_nms_rpn_like(n, iou_threshold)
    assert_indices(rpn_ops.nms(boxes, scores, iou_threshold), expected, device)


@pytest.mark.parametrize("iou_threshold", THRESHOLDS)
@pytest.mark.parametrize("n", [1, 2, 100, 1000])
def test_matches_reference_on_rpn_like_boxes(device, n, iou_threshold):
    boxes, scores = workloads.rpn_like_boxes(n, seed=1, device=device)
    expected = reference.nms(boxes.cpu(), scores.cpu(), iou_threshold)
    assert_indices(rpn_ops.nms(boxes, scores, iou_threshold), expected, device)


def test_matches_reference_on_3000_boxes(device):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=2, device=device)
    expected = reference.nms(boxes.cpu(), scores.cpu(), 0.7)
    assert_indices(rpn_ops.nms(boxes, scores, 0.7), expected, device)


def test_rpn_like_workload_keeps_some_and_suppresses_some():
    """The parity tests above decide something: at 0.5 a realistic input loses most boxes, not all."""
    boxes, scores = workloads.rpn_like_boxes(1000)
    kept = len(rpn_ops.nms(boxes, scores, 0.5))
    assert 10 < kept < 500


def test_matches_torchvision_on_many_seeds(device):
    for seed in range(10):
        boxes, scores = workloads.rpn_like_boxes(3000, seed=seed, per_cluster=30)
        for iou_threshold in (0.5, 0.7):
            expected = tv_nms(boxes, scores, iou_threshold)
            assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


@pytest.mark.parametrize("iou_threshold", [-0.5, 0.5])
def test_sizes_around_kernel_block_widths(device, iou_threshold):
    """Box counts just below, at and above the SIMD, block, group and mask-word widths of the kernels."""
    for n in (3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 4095, 4096, 4097):
        boxes, scores = workloads.rpn_like_boxes(n, seed=n, per_cluster=8)
        expected = tv_nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


@needs_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_on_450k_boxes():
    """Past the sizes whose suppression bitset fits in shared memory, with many mask chunks."""
    boxes, scores = workloads.rpn_like_boxes(450_000, seed=20)
    expected = rpn_ops.nms(boxes, scores, 0.5)
    assert len(expected) > 10_000
    assert_indices(rpn_ops.nms(boxes.cuda(), scores.cuda(), 0.5), expected, "cuda")
    assert_indices(rpn_ops.nms(boxes.cuda(), scores.cuda(), 0.5, max_output=3000), expected[:3000], "cuda")


# --- score order ----------------------------------------------------------------------------------------

def test_tied_scores_are_visited_by_index(device):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=3)
    scores = workloads.tied_scores(scores)
    for iou_threshold in (0.3, 0.7):
        expected = tv_nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_all_scores_equal_keeps_in_index_order(device):
    boxes, _ = workloads.rpn_like_boxes(2000, seed=4)
    scores = torch.full((2000,), 0.25)
    kept = rpn_ops.nms(boxes.to(device), scores.to(device), 0.5)
    assert_indices(kept, tv_nms(boxes, scores, 0.5), device)
    assert 1 < len(kept) < 2000 and bool((kept.diff() > 0).all())


def test_negative_zero_score_ties_with_zero(device):
    # Three copies of one box: whichever is visited first is kept. -0.0 == 0.0, so the lowest index wins.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    for scores in ([-0.0, 0.0, 0.0], [0.0, -0.0, -0.0], [-0.0, -0.0, 0.0]):
        scores = torch.tensor(scores)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 0.5), torch.tensor([0]), device)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 1.0), torch.tensor([0, 1, 2]), device)


def test_nan_scores_come_first_as_in_torchvision(device):
    boxes, scores = workloads.rpn_like_boxes(1000, seed=5)
    scores = workloads.nan_to(scores, 0.1)
    # Negative NaNs too: torch.sort treats every NaN as the largest value.
    negative_nan = torch.tensor([-0x00400000], dtype=torch.int32).view(torch.float32)  # bits 0xffc00000
    assert torch.isnan(negative_nan).all() and torch.signbit(negative_nan).all()
    scores[::37] = negative_nan
    assert torch.isnan(scores).sum() > 50
    for iou_threshold in (0.0, 0.5, 1.0):
        expected = tv_nms(boxes, scores, iou_threshold)
        nan_first = torch.isnan(scores[expected])
        assert nan_first[0] and torch.equal(nan_first, nan_first.sort(descending=True, stable=True).values)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_extreme_scores_are_ordered_as_torch_sort_orders_them(device):
    boxes, scores = workloads.rpn_like_boxes(700, seed=6)
    specials = torch.tensor([math.inf, -math.inf, 3e38, -3e38, 1e-45, -1e-45, 1e-40, 0.0, -0.0, 1.0, -1.0])
    scores[::3] = specials[torch.arange(0, 700, 3) % len(specials)]
    for iou_threshold in (0.3, 0.7):
        expected = tv_nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 1.0), stable_descending(scores), device)


# --- the threshold --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_iou_equal_to_threshold_is_not_suppressed(device, dtype):
    boxes = exact_half_iou_pair(dtype, device)
    scores = torch.tensor([0.9, 0.8], dtype=dtype, device=device)
    assert_indices(rpn_ops.nms(boxes, scores, 0.5), torch.tensor([0, 1]), device)
    assert_indices(rpn_ops.nms(boxes, scores, 0.4999), torch.tensor([0]), device)
    assert_indices(rpn_ops.nms(boxes, scores, math.nextafter(0.5, 0.0)), torch.tensor([0]), device)


@pytest.mark.parametrize("iou_threshold", [0.1, 0.3, 1 / 3, 0.45, 0.7, 0.9])
def test_float32_iou_is_compared_with_the_threshold_as_a_double(device, iou_threshold):
    """float32(0.3) > 0.3, so a pair with IoU float32(0.3) is suppressed at threshold 0.3 (torchvision's CPU
    rule); float32(0.7) < 0.7, so IoU float32(0.7) is kept at 0.7; and the float32 neighbours likewise."""
    scores = torch.tensor([0.9, 0.8])
    decided = set()
    for iou in float32_neighbours(iou_threshold).values():
        boxes = pair_with_float32_iou(iou)
        suppressed = iou > iou_threshold  # the float32 IoU, exactly, as a double
        expected = torch.tensor([0] if suppressed else [0, 1])
        assert torch.equal(tv_nms(boxes, scores, iou_threshold), expected)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)
        decided.add(suppressed)
    assert decided == {True, False}


def test_float64_iou_is_compared_with_the_threshold_exactly(device):
    boxes = torch.tensor([[0.0, 0.0, 3.0, 7.0], [1.0, 0.0, 3.1, 7.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
    iou = torchvision.ops.box_iou(boxes, boxes)[0, 1].item()
    cases = {iou: [0, 1], math.nextafter(iou, 0.0): [0], math.nextafter(iou, 1.0): [0, 1]}
    for iou_threshold, expected in cases.items():
        expected = torch.tensor(expected)
        assert torch.equal(tv_nms(boxes, scores, iou_threshold), expected)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_duplicate_boxes_suppress_each_other_below_threshold_one(device):
    boxes, scores = workloads.rpn_like_boxes(300, seed=7)
    boxes = torch.cat([boxes, boxes, boxes])  # exact copies: IoU 1
    scores = torch.cat([scores, scores.flip(0), scores])
    for iou_threshold in (0.99, 1.0):
        expected = tv_nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)
    assert len(rpn_ops.nms(boxes.to(device), scores.to(device), 1.0)) == 900
    assert len(rpn_ops.nms(boxes.to(device), scores.to(device), 0.99)) <= 300


def test_broadcast_copies_of_one_box_keep_only_the_first(device):
    boxes = torch.tensor([[1.0, 2.0, 5.0, 9.0]], device=device).expand(50, 4)  # stride-0 rows
    scores = torch.ones(50, device=device)
    assert_indices(rpn_ops.nms(boxes, scores, 0.5), torch.tensor([0]), device)


@pytest.mark.parametrize("iou_threshold", [-0.5, -1e-30, -1e300])
def test_negative_threshold_suppresses_even_disjoint_boxes(device, iou_threshold):
    boxes, scores = workloads.rpn_like_boxes(1000, seed=8)
    expected = tv_nms(boxes, scores, iou_threshold)
    assert len(expected) == 1  # IoU 0 > negative threshold: the best box suppresses every other one
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


@pytest.mark.parametrize("iou_threshold", [1.0, 1.5, 1e300])
def test_threshold_of_one_or_more_keeps_every_box_by_score(device, iou_threshold):
    boxes, scores = workloads.rpn_like_boxes(1000, seed=9)
    boxes = torch.cat([boxes, boxes[:100]])
    scores = torch.cat([scores, scores[:100]])
    expected = stable_descending(scores)
    assert torch.equal(tv_nms(boxes, scores, iou_threshold), expected)
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


# --- special boxes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("iou_threshold", [-0.5, 0.0, 0.3, 0.7, 1.0, 1.5])
@pytest.mark.parametrize("kind", SPECIAL_KINDS)
def test_special_boxes_match_torchvision(device, kind, iou_threshold):
    """Zero-area, inverted (x2 < x1), negative, huge (1e30), NaN and infinite boxes among ordinary ones."""
    boxes, scores = special_boxes(kind)
    expected = tv_nms(boxes, scores, iou_threshold)
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


@pytest.mark.parametrize("kind", ["huge", "nan", "inf", "all_mixed"])
def test_special_boxes_match_torchvision_in_float64(device, kind):
    boxes, scores = special_boxes(kind, seed=1, dtype=torch.float64)
    for iou_threshold in (-0.5, 0.0, 0.5):
        expected = tv_nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_nan_box_is_kept_and_suppresses_nothing(device):
    boxes = torch.tensor([[0.0, 0.0, math.nan, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    for iou_threshold in (-0.5, 0.0, 0.5):
        expected = tv_nms(boxes, scores, iou_threshold)
        assert torch.equal(expected, torch.tensor([0, 1]))
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_zero_area_boxes_are_suppressed_only_by_a_negative_threshold(device):
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0], [9.0, 9.0, 5.0, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 0.0), torch.tensor([0, 1, 2, 3]), device)
    expected = tv_nms(boxes, scores, -0.5)
    assert len(expected) < 4
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), -0.5), expected, device)


# --- sizes ----------------------------------------------------------------------------------------------

def test_single_box_is_kept(device):
    for iou_threshold in (-1.0, 0.0, 0.5):
        kept = rpn_ops.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device), torch.tensor([0.3], device=device),
                           iou_threshold)
        assert_indices(kept, torch.tensor([0]), device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_empty_input_gives_empty_int64_output(device, dtype):
    for max_output in (None, 0, 5):
        kept = rpn_ops.nms(torch.zeros(0, 4, dtype=dtype, device=device), torch.zeros(0, dtype=dtype, device=device),
                           0.5, max_output)
        assert_indices(kept, torch.zeros(0), device)


@too_large_to_emulate
def test_100k_boxes_match_torchvision_at_threshold_zero(device):
    boxes, scores = workloads.rpn_like_boxes(100_000, seed=10)
    expected = tv_nms(boxes, scores, 0.0)  # few kept: fast for torchvision too
    assert len(expected) > 100
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 0.0), expected, device)


@too_large_to_emulate
def test_100k_boxes_max_output_is_a_prefix_of_the_full_result(device):
    boxes, scores = workloads.rpn_like_boxes(100_000, seed=11, device=device)
    full = rpn_ops.nms(boxes, scores, 0.7)
    assert len(full) > 20_000
    for k in (1, 1000, 5000):
        assert_indices(rpn_ops.nms(boxes, scores, 0.7, max_output=k), full[:k], device)
    if device != "cpu":
        assert_indices(full, rpn_ops.nms(boxes.cpu(), scores.cpu(), 0.7), device)


@too_large_to_emulate
def test_50k_boxes_match_torchvision(device):
    boxes, scores = workloads.rpn_like_boxes(50_000, seed=12, per_cluster=400)
    expected = tv_nms(boxes, scores, 0.5)
    assert len(expected) > 1000
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), 0.5), expected, device)


# --- dtypes and layouts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_equals_float32_on_the_rounded_inputs(device, dtype):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=13)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    for iou_threshold in (0.3, 0.5, 0.7):
        expected = rpn_ops.nms(boxes.float(), scores.float(), iou_threshold)
        assert torch.equal(expected, tv_nms(boxes.float(), scores.float(), iou_threshold))
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_float64_matches_torchvision_in_float64(device):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=14, dtype=torch.float64)
    for iou_threshold in (0.3, 0.5, 0.7):
        expected = torchvision.ops.nms(boxes, scores, iou_threshold)
        assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold), expected, device)


def test_float64_is_not_computed_in_float32(device):
    # Boxes 1e-9 apart: identical in float32 (IoU 1), distinct in float64 (IoU just below 1).
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0 + 1e-9]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8], dtype=torch.float64)
    threshold = 1.0 - 5e-10
    assert torch.equal(tv_nms(boxes, scores, threshold), torch.tensor([0, 1]))
    assert torch.equal(tv_nms(boxes.float(), scores.float(), threshold), torch.tensor([0]))
    assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), threshold), torch.tensor([0, 1]), device)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_non_contiguous_inputs_give_the_contiguous_result(device, dtype):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=15, dtype=dtype, device=device)
    expected = rpn_ops.nms(boxes, scores, 0.5)
    assert_indices(rpn_ops.nms(non_contiguous(boxes), non_contiguous(scores), 0.5), expected, device)
    # Every other box: a strided view of both.
    assert_indices(rpn_ops.nms(boxes[::2], scores[::2], 0.5), rpn_ops.nms(boxes[::2].contiguous(),
                                                                          scores[::2].contiguous(), 0.5), device)
    transposed = torch.randn(4, 500, dtype=torch.float64).abs().cumsum(0).to(dtype).to(device).t()
    assert_indices(rpn_ops.nms(transposed, scores[:500], 0.1),
                   rpn_ops.nms(transposed.contiguous(), scores[:500], 0.1), device)


# --- max_output -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_max_output_returns_the_first_k_of_the_full_result(device, dtype):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=16, dtype=dtype, device=device)
    scores[::11] = scores[5]  # some ties
    full = rpn_ops.nms(boxes, scores, 0.5)
    assert len(full) > 7
    for k in (0, 1, 7, len(full), len(full) + 5, 2000, 10**12):
        assert_indices(rpn_ops.nms(boxes, scores, 0.5, max_output=k), full[:k], device)


def test_max_output_with_nan_scores_and_negative_threshold(device):
    boxes, scores = special_boxes("all_mixed", seed=3)
    scores = workloads.nan_to(scores, 0.05)
    for iou_threshold in (-0.5, 0.0, 0.7):
        full = rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold)
        assert_indices(full, tv_nms(boxes, scores, iou_threshold), device)
        for k in (1, 3, len(full) - 1, len(full)):
            assert_indices(rpn_ops.nms(boxes.to(device), scores.to(device), iou_threshold, max_output=k), full[:k],
                           device)


def test_max_output_accepts_none_and_python_ints(device):
    boxes, scores = workloads.rpn_like_boxes(500, seed=17, device=device)
    full = rpn_ops.nms(boxes, scores, 0.5)
    assert_indices(rpn_ops.nms(boxes, scores, 0.5, None), full, device)
    assert_indices(rpn_ops.nms(boxes, scores, 0.5, max_output=torch.tensor(3)), full[:3], device)


# --- the operator ---------------------------------------------------------------------------------------

def test_wrapper_is_the_registered_operator(device):
    boxes, scores = workloads.rpn_like_boxes(500, seed=18, device=device)
    assert_indices(torch.ops.rpn_ops.nms(boxes, scores, 0.5), rpn_ops.nms(boxes, scores, 0.5), device)
    assert_indices(torch.ops.rpn_ops.nms(boxes, scores, 0.5, 4), rpn_ops.nms(boxes, scores, 0.5)[:4], device)


def test_inputs_are_not_modified(device):
    boxes, scores = workloads.rpn_like_boxes(500, seed=19, device=device)
    boxes_before, scores_before = boxes.clone(), scores.clone()
    rpn_ops.nms(boxes, scores, 0.5)
    assert torch.equal(boxes, boxes_before) and torch.equal(scores, scores_before)


@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*deprecated")  # torch >= 2.14
@pytest.mark.parametrize("scale, zero_point", [(1.0, 1), (0.05, 3)])
def test_quantized_boxes_are_compared_dequantized_as_in_torchvision(scale, zero_point):
    """torchvision's quantized NMS keeps what its NMS keeps on the dequantized inputs (its test_qnms)."""
    boxes, scores = workloads.rpn_like_boxes(300, seed=9, image_size=(12, 12))
    qboxes = torch.quantize_per_tensor(boxes.clamp(min=0), scale=scale, zero_point=zero_point, dtype=torch.quint8)
    qscores = torch.quantize_per_tensor(scores * 10, scale=scale, zero_point=zero_point, dtype=torch.quint8)
    expected = torchvision.ops.nms(qboxes, qscores, 0.5)
    assert_indices(rpn_ops.nms(qboxes, qscores, 0.5), expected, "cpu")
    assert_indices(rpn_ops.nms(qboxes.dequantize(), qscores.dequantize(), 0.5), expected, "cpu")
