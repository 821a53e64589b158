"""Property-based tests (hypothesis): every op against torchvision and the plain-PyTorch reference on random
shapes (0 and 1 included), dtypes and boxes from realistic to pathological (zero-area, inverted, huge,
negative, NaN/Inf), tied scores and duplicate boxes; on every device (the emulated CUDA device included).

Hypothesis draws seeds and switches; the tensors come from torch generators, so a shrunk failure is a few
small numbers to paste into a named regression test. CI runs the bounded "ci" profile; for a long local run:
    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py
"""
import math
import os

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator

import rpn_ops
from helpers import (FLOAT_DTYPES, SPECIAL_KINDS, assert_indices, assert_same_iou, compute_dtype, special_boxes,
                     tv_nms)
from rpn_ops import reference, workloads

# `device` is a function-scoped fixture that every example of a test shares, as intended.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, suppress_health_check=_QUIET)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(FLOAT_DTYPES)
box_kinds = st.sampled_from(["realistic", *SPECIAL_KINDS])


def make_boxes(kind: str, n: int, seed: int, dtype, tie_levels: int):
    """n boxes of a kind (realistic clusters, or a quarter special) and scores; tie_levels > 0 draws the
    scores from that many values only (ties everywhere)."""
    if n == 0:
        return torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype)
    if kind == "realistic":
        boxes, scores = workloads.rpn_like_boxes(n, seed=seed, per_cluster=8, dtype=dtype)
    else:
        boxes, scores = special_boxes(kind, n=max(n, 64), fraction=0.5, seed=seed, dtype=dtype)
        rows = torch.randperm(len(boxes), generator=torch.Generator().manual_seed(seed))[:n]
        boxes, scores = boxes[rows], scores[rows]
    if tie_levels:
        g = torch.Generator().manual_seed(seed)
        scores = torch.randint(0, tie_levels, (n,), generator=g).to(dtype) / tie_levels
    return boxes, scores


@given(kind=box_kinds, n=st.integers(0, 80), seed=seeds, dtype=dtypes, ties=st.sampled_from([0, 0, 2, 5]),
       threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0, -0.5]), max_output=st.sampled_from([None, 0, 1, 7]))
def test_nms_equals_the_reference(device, kind, n, seed, dtype, ties, threshold, max_output):
    boxes, scores = make_boxes(kind, n, seed, dtype, ties)
    expected = reference.nms(boxes, scores, threshold, max_output)
    got = rpn_ops.nms(boxes.to(device), scores.to(device), threshold, max_output)
    assert_indices(got, expected, device)
    if max_output is None and len(torch.unique(scores)) == n:  # torchvision's order among equal scores is unstable
        assert_indices(got, tv_nms(boxes, scores, threshold), device)


@given(kind=box_kinds, n=st.integers(0, 80), seed=seeds, dtype=dtypes, ties=st.sampled_from([0, 3]),
       classes=st.integers(1, 6), threshold=st.sampled_from([0.0, 0.5, 0.7]), max_output=st.sampled_from([None, 3]))
def test_batched_nms_equals_the_reference(device, kind, n, seed, dtype, ties, classes, threshold, max_output):
    boxes, scores = make_boxes(kind, n, seed, dtype, ties)
    idxs = workloads.categories(n, classes, seed=seed)
    expected = reference.batched_nms(boxes, scores, idxs, threshold, max_output)
    got = rpn_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold, max_output)
    assert_indices(got, expected, device)


@given(kind=box_kinds, n=st.integers(0, 40), m=st.integers(0, 40), seed=seeds, dtype=dtypes)
def test_box_iou_equals_torchvision(device, kind, n, m, seed, dtype):
    boxes1, _ = make_boxes(kind, n, seed, dtype, 0)
    boxes2, _ = make_boxes("realistic" if seed % 2 else kind, m, seed + 1, dtype, 0)
    expected = torchvision.ops.box_iou(boxes1.to(compute_dtype(dtype)), boxes2.to(compute_dtype(dtype)))
    got = rpn_ops.box_iou(boxes1.to(device), boxes2.to(device))
    assert_same_iou(got, expected)
    assert_same_iou(got, reference.box_iou(boxes1, boxes2))


def assert_bits(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape, (got.dtype, expected.dtype, got.shape)
    same = (got == expected) | (got.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} differ: {got[~same][:3]} vs {expected[~same][:3]}"


weight_sets = st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (0.1, 3.0, 7.0, 0.3), (2.0, 0.5, 1.0, 4.0)])


@given(kind=box_kinds, n=st.integers(0, 60), classes=st.integers(1, 4), seed=seeds, dtype=dtypes,
       box_dtype=dtypes, weights=weight_sets, scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]),
       clip=st.sampled_from([math.log(1000.0 / 16), 0.0, -2.0, math.inf, 50.0]))
def test_decode_equals_torchvision(device, kind, n, classes, seed, dtype, box_dtype, weights, scale, clip):
    """torchvision's answer on the same device (on CUDA, codes are divided by multiplying with the reciprocal)."""
    boxes, _ = make_boxes(kind, n, seed, box_dtype, 0)
    codes = workloads.box_deltas(n, classes, seed=seed, scale=scale, dtype=dtype)
    boxes, codes = boxes.to(device), codes.to(device)
    expected = TorchvisionBoxCoder(weights, clip).decode_single(codes, boxes)
    assert_bits(rpn_ops.decode_boxes(codes, boxes, weights, clip), expected)
    assert_bits(reference.decode_boxes(codes, boxes, weights, clip), expected)


@given(kind=box_kinds, n=st.integers(0, 60), seed=seeds, reference_dtype=dtypes, proposal_dtype=dtypes,
       weights=weight_sets)
def test_encode_equals_torchvision(device, kind, n, seed, reference_dtype, proposal_dtype, weights):
    gt, _ = make_boxes(kind, n, seed, reference_dtype, 0)
    proposals, _ = make_boxes("realistic" if seed % 3 else kind, n, seed + 7, proposal_dtype, 0)
    gt, proposals = gt.to(device), proposals.to(device)
    expected = TorchvisionBoxCoder(weights).encode_single(gt, proposals)
    assert_bits(rpn_ops.encode_boxes(gt, proposals, weights), expected)
    assert_bits(reference.encode_boxes(gt, proposals, weights), expected)


@given(levels=st.integers(1, 4), per_level_sizes=st.integers(1, 3), ratios=st.lists(
       st.floats(0.1, 10.0, allow_nan=False), min_size=1, max_size=4), height=st.integers(1, 300),
       width=st.integers(1, 300), images=st.integers(0, 3), dtype=dtypes, seed=seeds)
def test_anchors_equal_torchvision(device, levels, per_level_sizes, ratios, height, width, images, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = tuple(tuple(int(s) for s in torch.randint(4, 700, (per_level_sizes,), generator=g)) for _ in range(levels))
    aspect_ratios = (tuple(ratios),) * levels
    image_list = torchvision.models.detection.image_list.ImageList(
        torch.zeros(images, 3, height, width, device=device), [(height, width)] * images)
    features = [torch.zeros(images, 1, max(1, height // 2 ** (l + 2)), max(1, width // 2 ** (l + 2)) + l, dtype=dtype,
                            device=device) for l in range(levels)]
    expected = TorchvisionAnchorGenerator(sizes, aspect_ratios)(image_list, features)
    got = rpn_ops.AnchorGenerator(sizes, aspect_ratios)(image_list, features)
    assert len(got) == len(expected)
    for o, e in zip(got, expected):
        assert_bits(o, e)


@given(gt_kind=box_kinds, anchor_kind=box_kinds, g=st.integers(1, 30), a=st.integers(1, 300), seed=seeds,
       gt_dtype=dtypes, anchor_dtype=dtypes, thresholds=st.sampled_from([(0.7, 0.3), (0.5, 0.5), (0.0, 0.0), (0.9, 0.1)]),
       allow=st.booleans())
def test_match_anchors_equals_torchvision(device, gt_kind, anchor_kind, g, a, seed, gt_dtype, anchor_dtype,
                                          thresholds, allow):
    """Finite boxes: torchvision's Matcher(box_iou) and the reference, index for index. Non-finite: refused."""
    gt, _ = make_boxes(gt_kind, g, seed, gt_dtype, 0)
    anchors, _ = make_boxes(anchor_kind, a, seed + 1, anchor_dtype, 0)
    if gt_kind == anchor_kind == "realistic":
        anchors[: min(g, a)] = gt[: min(g, a)].to(anchor_dtype)  # some exact hits and ties
    gt, anchors = gt.to(device), anchors.to(device)
    high, low = thresholds
    if not (torch.isfinite(gt).all() and torch.isfinite(anchors).all()):
        with pytest.raises(ValueError, match="infinite or NaN coordinate"):
            rpn_ops.match_anchors(gt, anchors, high, low, allow)
        return
    expected = Matcher(high, low, allow)(torchvision.ops.box_iou(gt, anchors))
    assert_indices(rpn_ops.match_anchors(gt, anchors, high, low, allow), expected, device)
    assert_indices(reference.match_anchors(gt, anchors, high, low, allow), expected, device)


@given(images=st.integers(1, 3), gt_kind=box_kinds, seed=seeds, gt_dtype=dtypes, anchor_dtype=dtypes,
       thresholds=st.sampled_from([(0.7, 0.3), (0.5, 0.4), (0.0, 0.0)]), allow=st.booleans(), weights=weight_sets)
def test_assign_targets_equals_the_reference(device, images, gt_kind, seed, gt_dtype, anchor_dtype, thresholds, allow,
                                             weights):
    """A batch of images with 0 to 20 ground-truth boxes and 1 to 150 anchors each: labels, matched boxes and
    targets of the plain-PyTorch reference (torchvision's Matcher and encode), bit for bit; non-finite: refused."""
    g = torch.Generator().manual_seed(seed)
    gt_counts = torch.randint(0, 21, (images,), generator=g).tolist()
    anchor_counts = torch.randint(1, 151, (images,), generator=g).tolist()
    gts = [make_boxes(gt_kind, n, seed + i, gt_dtype, 0)[0].to(device) for i, n in enumerate(gt_counts)]
    anchors = [make_boxes("realistic", n, seed + 10 + i, anchor_dtype, 0)[0].to(device)
               for i, n in enumerate(anchor_counts)]
    high, low = thresholds
    if not all(torch.isfinite(gt).all() for gt in gts):
        with pytest.raises(ValueError, match="gt_boxes has a box with an infinite or NaN coordinate"):
            rpn_ops.assign_targets(anchors, gts, high, low, allow, weights)
        return
    got = rpn_ops.assign_targets(anchors, gts, high, low, allow, weights)
    expected = reference.assign_targets(anchors, gts, high, low, allow, weights)
    for name, got_list, expected_list in zip(("labels", "matched boxes", "targets"), got, expected):
        for image, (o, e) in enumerate(zip(got_list, expected_list)):
            if device == "cuda" and name == "targets":  # the device's logf
                torch.testing.assert_close(o, e, rtol=4 * torch.finfo(e.dtype).eps, atol=1e-6, equal_nan=True)
            else:
                assert o.device.type == e.device.type, (name, image)
                assert_bits(o, e)
