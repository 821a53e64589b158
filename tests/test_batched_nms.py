"""rpn_ops.batched_nms: true per-category NMS (boxes of different categories never suppress each other), the
result by descending score with ties by index; torchvision.ops.batched_nms's answer."""
import pytest
import torch
import torchvision

import rpn_ops
from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_indices, exact_half_iou_pair, needs_cuda, non_contiguous,
                     special_boxes, stable_descending, too_large_to_emulate, tv_batched_nms_per_class)
from rpn_ops import reference, workloads


def per_class_nms(boxes, scores, idxs, iou_threshold):
    """rpn_ops.nms run on each category alone, the kept boxes merged by descending score (stable)."""
    keep = []
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep.append(members[rpn_ops.nms(boxes[members], scores[members], iou_threshold)])
    keep = torch.cat(keep)
    keep = keep.sort().values  # ties by index
    return keep[torch.sort(scores[keep], descending=True, stable=True).indices]


# --- parity ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("num_classes", [1, 5, 80])
def test_matches_torchvision_batched_nms(device, num_classes, iou_threshold):
    boxes, _ = workloads.rpn_like_boxes(5000, seed=num_classes)
    # Distinct scores: torchvision's final sort is not stable, so only then is its order defined.
    scores = torch.randperm(5000, generator=torch.Generator().manual_seed(num_classes)).float() / 5000
    idxs = workloads.categories(5000, num_classes, seed=num_classes)
    expected = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)  # per-class path at this size
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
    assert_indices(got, expected, device)


@pytest.mark.parametrize("num_classes", [3, 20])
def test_matches_torchvision_per_class_nms_with_tied_scores(device, num_classes):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=1)
    scores = workloads.tied_scores(scores, levels=4)
    idxs = workloads.categories(3000, num_classes, seed=2)
    for iou_threshold in (0.3, 0.7):
        expected = tv_batched_nms_per_class(boxes, scores, idxs, iou_threshold)
        got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
        assert_indices(got, expected, device)
        # torchvision's own final sort is not stable: with ties it agrees as a set.
        tv = torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
        assert torch.equal(got.cpu().sort().values, tv.sort().values)


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 0.7, 1.0])
def test_matches_reference(device, iou_threshold):
    boxes, scores = workloads.rpn_like_boxes(1000, seed=3)
    scores = workloads.tied_scores(scores, levels=16)
    idxs = workloads.categories(1000, 7, seed=4)
    expected = reference.batched_nms(boxes, scores, idxs, iou_threshold)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
    assert_indices(got, expected, device)


@pytest.mark.parametrize("iou_threshold", [-0.5, 0.0, 0.5, 0.7])
def test_equals_per_class_nms_merged_by_score(device, iou_threshold):
    boxes, scores = special_boxes("all_mixed", n=2000, seed=5)
    scores = workloads.tied_scores(scores, levels=8)
    idxs = workloads.categories(len(boxes), 9, seed=6)
    expected = per_class_nms(boxes, scores, idxs, iou_threshold)
    assert len(expected) > 9
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
    assert_indices(got, expected, device)


def test_matches_torchvision_on_many_seeds(device):
    for seed in range(6):
        boxes, scores = workloads.rpn_like_boxes(4000, seed=seed, per_cluster=30)
        idxs = workloads.categories(4000, 1 + 7 * seed, seed=seed)
        expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.6)
        got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.6)
        assert_indices(got, expected, device)


@pytest.mark.parametrize("iou_threshold", [-0.5, 0.5])
def test_sizes_around_kernel_block_widths(device, iou_threshold):
    for n in (3, 16, 17, 63, 64, 65, 255, 256, 257, 4095, 4096, 4097):
        boxes, scores = workloads.rpn_like_boxes(n, seed=n, per_cluster=8)
        idxs = workloads.categories(n, 3, seed=n)
        expected = tv_batched_nms_per_class(boxes, scores, idxs, iou_threshold)
        got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), iou_threshold)
        assert_indices(got, expected, device)


@needs_cuda
@pytest.mark.cuda
def test_cuda_matches_cpu_on_450k_boxes():
    boxes, scores = workloads.rpn_like_boxes(450_000, seed=21)
    idxs = workloads.categories(450_000, 20, seed=22)
    expected = rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert_indices(rpn_ops.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5), expected, "cuda")


# --- categories -----------------------------------------------------------------------------------------

def test_one_category_equals_nms(device):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=7, device=device)
    for category in (0, -5, 10**12):
        idxs = torch.full((3000,), category, dtype=torch.int64, device=device)
        for iou_threshold in (-0.5, 0.0, 0.5, 0.7):
            expected = rpn_ops.nms(boxes, scores, iou_threshold)
            assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, iou_threshold), expected, device)


def test_identical_boxes_of_different_categories_are_all_kept(device):
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0]] * 4 + [[10.0, 10.0, 20.0, 20.5]], device=device)
    scores = torch.tensor([0.5, 0.9, 0.7, 0.6, 0.8], device=device)
    idxs = torch.tensor([0, 1, 2, 1, 0], device=device)
    # Category 1 keeps box 1 (0.9) over box 3; category 0 keeps box 4 (0.8) over box 0; category 2 keeps box 2.
    assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, 0.5), torch.tensor([1, 4, 2]), device)
    assert_indices(rpn_ops.batched_nms(boxes, scores, torch.arange(5, device=device), 0.5),
                   torch.tensor([1, 4, 2, 3, 0]), device)


def test_each_box_its_own_category_keeps_every_box_by_score(device):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=8)
    scores = workloads.tied_scores(scores)
    idxs = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.0)
    assert_indices(got, stable_descending(scores), device)


@pytest.mark.parametrize("ids", ["large", "negative", "int64_extremes", "sparse"])
def test_category_ids_are_only_labels(device, ids):
    """Any int64 ids give the result of the same partition labelled 0, 1, 2, ..."""
    boxes, scores = workloads.rpn_like_boxes(3000, seed=9)
    dense = workloads.categories(3000, 6, seed=10)
    labels = {
        "large": torch.tensor([10**12, 10**12 + 1, 3 * 10**15, 7, 2**62, 2**40]),
        "negative": torch.tensor([-1, -2, -10**12, 0, 5, -7]),
        "int64_extremes": torch.tensor([-2**63, 2**63 - 1, 0, -1, 2**62, -2**62]),
        "sparse": torch.tensor([0, 2**30, 2**31, 2**32, 3, 2**30 - 1]),
    }[ids]
    idxs = labels[dense]
    expected = rpn_ops.batched_nms(boxes, scores, dense, 0.5)
    assert_indices(expected, tv_batched_nms_per_class(boxes, scores, dense, 0.5), "cpu")
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
    assert_indices(got, expected, device)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_category_dtypes_agree(device, idx_dtype):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=11)
    idxs = workloads.categories(2000, 12, seed=12)
    expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.5)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(idx_dtype).to(device), 0.5)
    assert_indices(got, expected, device)


def test_negative_int8_categories(device):
    boxes, scores = workloads.rpn_like_boxes(1000, seed=13)
    idxs = workloads.categories(1000, 5, seed=14) - 2
    expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.5)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(torch.int8).to(device), 0.5)
    assert_indices(got, expected, device)


def test_categories_do_not_leak_through_rounding(device):
    """Far from the origin, torchvision's small-input coordinate-offset trick rounds IoUs differently per
    category; per-category NMS must give every category the answer it gets alone."""
    boxes, scores = workloads.rpn_like_boxes(800, seed=15)
    boxes = boxes + 3.0e5  # coordinates where float32 spacing is ~0.03
    idxs = workloads.categories(800, 40, seed=16)
    expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.5)
    leaky = torchvision.ops.boxes._batched_nms_coordinate_trick(boxes, scores, idxs, 0.5)
    assert not torch.equal(leaky, expected)  # the input does tell true per-category NMS from the trick
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
    assert_indices(got, expected, device)


# --- threshold, dtypes, layouts -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_iou_equal_to_threshold_is_not_suppressed(device, dtype):
    boxes = exact_half_iou_pair(dtype, device)
    scores = torch.tensor([0.9, 0.8], dtype=dtype, device=device)
    idxs = torch.tensor([3, 3], device=device)
    assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, 0.5), torch.tensor([0, 1]), device)
    assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, 0.4999), torch.tensor([0]), device)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_equals_float32_on_the_rounded_inputs(device, dtype):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=17)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    idxs = workloads.categories(3000, 10, seed=18)
    expected = rpn_ops.batched_nms(boxes.float(), scores.float(), idxs, 0.5)
    assert_indices(expected, tv_batched_nms_per_class(boxes, scores, idxs, 0.5), "cpu")
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
    assert_indices(got, expected, device)


def test_float64_matches_torchvision_in_float64(device):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=19, dtype=torch.float64)
    idxs = workloads.categories(3000, 10, seed=20)
    expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.7)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.7)
    assert_indices(got, expected, device)


def test_non_contiguous_inputs_give_the_contiguous_result(device):
    boxes, scores = workloads.rpn_like_boxes(3000, seed=21, device=device)
    idxs = workloads.categories(3000, 10, seed=22, device=device)
    expected = rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
    got = rpn_ops.batched_nms(non_contiguous(boxes), non_contiguous(scores), non_contiguous(idxs), 0.5)
    assert_indices(got, expected, device)
    assert_indices(rpn_ops.batched_nms(boxes[::3], scores[::3], idxs[::3], 0.5),
                   rpn_ops.batched_nms(boxes[::3].contiguous(), scores[::3].contiguous(), idxs[::3].contiguous(),
                                       0.5), device)


# --- max_output and sizes -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_max_output_returns_the_first_k_of_the_full_result(device, dtype):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=23, dtype=dtype, device=device)
    scores[::13] = scores[2]  # some ties
    idxs = workloads.categories(2000, 6, seed=24, device=device)
    full = rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert len(full) > 7
    for k in (0, 1, 7, len(full), len(full) + 5, 10**12):
        assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, 0.5, max_output=k), full[:k], device)


@too_large_to_emulate
def test_max_output_at_100k_boxes(device):
    boxes, scores = workloads.rpn_like_boxes(100_000, seed=25, device=device)
    idxs = workloads.categories(100_000, 91, seed=26, device=device)
    full = rpn_ops.batched_nms(boxes, scores, idxs, 0.7)
    assert len(full) > 20_000
    for k in (1, 1000):
        assert_indices(rpn_ops.batched_nms(boxes, scores, idxs, 0.7, max_output=k), full[:k], device)
    if device != "cpu":
        assert_indices(full, rpn_ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.7), device)


def test_empty_input_gives_empty_int64_output(device):
    for dtype in FLOAT_DTYPES:
        kept = rpn_ops.batched_nms(torch.zeros(0, 4, dtype=dtype, device=device),
                                   torch.zeros(0, dtype=dtype, device=device),
                                   torch.zeros(0, dtype=torch.int64, device=device), 0.5)
        assert_indices(kept, torch.zeros(0), device)


def test_single_box_is_kept(device):
    kept = rpn_ops.batched_nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device), torch.tensor([0.3], device=device),
                               torch.tensor([7], device=device), -1.0)
    assert_indices(kept, torch.tensor([0]), device)


def test_nan_scores_match_torchvision_per_class(device):
    boxes, scores = workloads.rpn_like_boxes(2000, seed=27)
    scores = workloads.nan_to(scores, 0.1)
    idxs = workloads.categories(2000, 4, seed=28)
    expected = tv_batched_nms_per_class(boxes, scores, idxs, 0.5)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5)
    assert_indices(got, expected, device)
    # NaN-scored boxes are visited first, so they come first in the output.
    nan_first = torch.isnan(scores[got.cpu()])
    assert nan_first[0] and torch.equal(nan_first, nan_first.sort(descending=True, stable=True).values)


def test_wrapper_is_the_registered_operator(device):
    boxes, scores = workloads.rpn_like_boxes(500, seed=29, device=device)
    idxs = workloads.categories(500, 3, seed=30, device=device)
    expected = rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
    assert_indices(torch.ops.rpn_ops.batched_nms(boxes, scores, idxs, 0.5), expected, device)
    assert_indices(torch.ops.rpn_ops.batched_nms(boxes, scores, idxs, 0.5, 3), expected[:3], device)


def test_zero_boxes_give_an_empty_result_whatever_the_other_arguments(device):
    """As torchvision's batched_nms, which returns before it looks at scores and categories."""
    boxes = torch.empty(0, 4, device=device)
    for scores, idxs in [(torch.empty(0, device=device), torch.empty(0, device=device)),
                         (torch.rand(3, device=device), torch.empty(0, dtype=torch.int64, device=device))]:
        keep = rpn_ops.batched_nms(boxes, scores, idxs, 0.5)
        assert keep.dtype == torch.int64 and keep.shape == (0,) and keep.device == boxes.device
        assert torchvision.ops.batched_nms(boxes, scores, idxs, 0.5).shape == (0,)


def test_float_categories_are_taken_by_value_as_in_torchvision(device):
    boxes, scores = workloads.rpn_like_boxes(400, seed=12, device=device)
    idxs = workloads.categories(400, 5, seed=12, device=device)
    for float_idxs in (idxs.float(), idxs.double() * 2 - 1):
        expected = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), float_idxs.cpu(), 0.5)
        assert_indices(rpn_ops.batched_nms(boxes, scores, float_idxs, 0.5), expected, device)
