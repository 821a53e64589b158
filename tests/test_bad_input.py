"""Bad input raises a Python error that says what was wrong and names the argument, on every device; it never
crashes the process (the whole matrix also runs in a subprocess, where a segfault fails the test). The matrix
covers every public function: the NMS family, box_iou, box coding, anchors and target assignment."""
import os
import re
import subprocess
import sys
from typing import Callable, List, NamedTuple

import pytest
import torch

import rpn_ops
from helpers import needs_cuda


class Case(NamedTuple):
    name: str
    call: Callable[[str], object]  # device -> runs the op
    error: type
    match: str
    cuda_only: bool = False


def _boxes(device, n=6, dtype=torch.float32):
    return torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=dtype, device=device).repeat(n, 1)


def _scores(device, n=6, dtype=torch.float32):
    return torch.linspace(1.0, 0.1, n, device=device).to(dtype)


def _idxs(device, n=6, dtype=torch.int64):
    return torch.zeros(n, dtype=dtype, device=device)


def _other(device):
    """A device that is not `device` (only meaningful with CUDA)."""
    return "cpu" if device == "cuda" else "cuda"


def nms_cases() -> List[Case]:
    nms = rpn_ops.nms
    b, s = _boxes, _scores
    return [
        Case("nms_boxes_1d", lambda d: nms(torch.rand(8, device=d), s(d), 0.5), RuntimeError,
             r"boxes must be a 2-D tensor of shape \[N, 4\], got 1-D"),
        Case("nms_boxes_3d", lambda d: nms(torch.rand(2, 6, 4, device=d), s(d), 0.5), RuntimeError,
             r"boxes must be a 2-D tensor of shape \[N, 4\], got 3-D"),
        Case("nms_boxes_0d", lambda d: nms(torch.tensor(1.0, device=d), s(d), 0.5), RuntimeError,
             r"boxes must be a 2-D tensor"),
        Case("nms_boxes_width_5", lambda d: nms(torch.rand(6, 5, device=d), s(d), 0.5), RuntimeError,
             r"boxes must have shape \[N, 4\].*got shape \[6, 5\]"),
        Case("nms_boxes_width_0", lambda d: nms(torch.rand(6, 0, device=d), s(d), 0.5), RuntimeError,
             r"boxes must have shape \[N, 4\]"),
        Case("nms_boxes_int32", lambda d: nms(b(d).int(), s(d), 0.5), TypeError,
             r"boxes must be float16, bfloat16, float32 or float64, got Int"),
        Case("nms_boxes_int64", lambda d: nms(b(d).long(), s(d), 0.5), TypeError, r"boxes must be .*got Long"),
        Case("nms_boxes_uint8", lambda d: nms(b(d).to(torch.uint8), s(d), 0.5), TypeError, r"boxes must be .*got Byte"),
        Case("nms_boxes_bool", lambda d: nms(b(d).bool(), s(d), 0.5), TypeError, r"boxes must be .*got Bool"),
        Case("nms_boxes_complex", lambda d: nms(b(d).to(torch.complex64), s(d), 0.5), TypeError,
             r"boxes must be .*got ComplexFloat"),
        Case("nms_boxes_not_a_tensor", lambda d: nms([[0.0, 0.0, 1.0, 1.0]], s(d, 1), 0.5), RuntimeError,
             r"argument 'boxes'"),
        Case("nms_scores_too_short", lambda d: nms(b(d), s(d, 5), 0.5), RuntimeError,
             r"scores must have one entry per box: boxes has 6 boxes but scores has 5 entries"),
        Case("nms_scores_too_long", lambda d: nms(b(d), s(d, 7), 0.5), RuntimeError,
             r"scores must have one entry per box: boxes has 6 boxes but scores has 7 entries"),
        Case("nms_scores_2d", lambda d: nms(b(d), s(d).view(6, 1), 0.5), RuntimeError,
             r"scores must be a 1-D tensor of shape \[N\], got 2-D"),
        Case("nms_scores_0d", lambda d: nms(b(d, 1), s(d, 1)[0], 0.5), RuntimeError, r"scores must be a 1-D tensor"),
        Case("nms_scores_int", lambda d: nms(b(d), s(d).long(), 0.5), TypeError, r"scores must be .*got Long"),
        Case("nms_scores_float64_boxes_float32", lambda d: nms(b(d), s(d).double(), 0.5), TypeError,
             r"boxes and scores must have the same dtype, got Float and Double"),
        Case("nms_scores_float32_boxes_float16", lambda d: nms(b(d).half(), s(d), 0.5), TypeError,
             r"boxes and scores must have the same dtype, got Half and Float"),
        Case("nms_threshold_nan", lambda d: nms(b(d), s(d), float("nan")), ValueError,
             r"iou_threshold must be a finite number, got nan"),
        Case("nms_threshold_inf", lambda d: nms(b(d), s(d), float("inf")), ValueError,
             r"iou_threshold must be a finite number, got inf"),
        Case("nms_threshold_minus_inf", lambda d: nms(b(d), s(d), float("-inf")), ValueError,
             r"iou_threshold must be a finite number, got -inf"),
        Case("nms_threshold_none", lambda d: nms(b(d), s(d), None), TypeError, r"iou_threshold"),
        Case("nms_max_output_negative", lambda d: nms(b(d), s(d), 0.5, -1), ValueError,
             r"max_output must be None or >= 0, got -1"),
        Case("nms_max_output_negative_on_empty", lambda d: nms(b(d, 0), s(d, 0), 0.5, -3), ValueError,
             r"max_output must be None or >= 0, got -3"),
        Case("nms_max_output_bool", lambda d: nms(b(d), s(d), 0.5, True), TypeError,
             r"max_output must be None or an int, got bool"),
        Case("nms_max_output_float", lambda d: nms(b(d), s(d), 0.5, 2.5), TypeError,
             r"max_output must be None or an int, got float"),
        Case("nms_scores_on_other_device", lambda d: nms(b(d), s(_other(d)), 0.5), RuntimeError,
             r"boxes and scores must be on the same device", cuda_only=True),
        Case("nms_boxes_on_other_device", lambda d: nms(b(_other(d)), s(d), 0.5), RuntimeError,
             r"boxes and scores must be on the same device", cuda_only=True),
    ]


def batched_nms_cases() -> List[Case]:
    bnms = rpn_ops.batched_nms
    b, s, i = _boxes, _scores, _idxs
    return [
        Case("batched_boxes_1d", lambda d: bnms(torch.rand(8, device=d), s(d), i(d), 0.5), RuntimeError,
             r"boxes must be a 2-D tensor of shape \[N, 4\], got 1-D"),
        Case("batched_boxes_3d", lambda d: bnms(torch.rand(1, 6, 4, device=d), s(d), i(d), 0.5), RuntimeError,
             r"boxes must be a 2-D tensor of shape \[N, 4\], got 3-D"),
        Case("batched_boxes_width_3", lambda d: bnms(torch.rand(6, 3, device=d), s(d), i(d), 0.5), RuntimeError,
             r"boxes must have shape \[N, 4\].*got shape \[6, 3\]"),
        Case("batched_boxes_int", lambda d: bnms(b(d).int(), s(d), i(d), 0.5), TypeError, r"boxes must be .*got Int"),
        Case("batched_scores_too_short", lambda d: bnms(b(d), s(d, 4), i(d), 0.5), RuntimeError,
             r"scores must have one entry per box: boxes has 6 boxes but scores has 4 entries"),
        Case("batched_scores_2d", lambda d: bnms(b(d), s(d).view(2, 3), i(d), 0.5), RuntimeError,
             r"scores must be a 1-D tensor"),
        Case("batched_scores_dtype_mismatch", lambda d: bnms(b(d).double(), s(d), i(d), 0.5), TypeError,
             r"boxes and scores must have the same dtype, got Double and Float"),
        Case("batched_idxs_too_short", lambda d: bnms(b(d), s(d), i(d, 5), 0.5), RuntimeError,
             r"idxs must have one category per box: boxes has 6 boxes but idxs has 5 entries"),
        Case("batched_idxs_too_long", lambda d: bnms(b(d), s(d), i(d, 9), 0.5), RuntimeError,
             r"idxs must have one category per box: boxes has 6 boxes but idxs has 9 entries"),
        Case("batched_idxs_2d", lambda d: bnms(b(d), s(d), i(d).view(6, 1), 0.5), RuntimeError,
             r"idxs must be a 1-D tensor of shape \[N\], got 2-D"),
        Case("batched_idxs_0d", lambda d: bnms(b(d, 1), s(d, 1), i(d, 1)[0], 0.5), RuntimeError,
             r"idxs must be a 1-D tensor"),
        Case("batched_idxs_complex", lambda d: bnms(b(d), s(d), i(d).to(torch.complex64), 0.5), TypeError,
             r"idxs must be an integer tensor \(int64, int32, ...\), got ComplexFloat"),
        Case("batched_idxs_bool", lambda d: bnms(b(d), s(d), i(d).bool(), 0.5), TypeError,
             r"idxs must be an integer tensor .*got Bool"),
        Case("batched_threshold_nan", lambda d: bnms(b(d), s(d), i(d), float("nan")), ValueError,
             r"iou_threshold must be a finite number, got nan"),
        Case("batched_threshold_inf", lambda d: bnms(b(d), s(d), i(d), float("inf")), ValueError,
             r"iou_threshold must be a finite number, got inf"),
        Case("batched_max_output_negative", lambda d: bnms(b(d), s(d), i(d), 0.5, -2), ValueError,
             r"max_output must be None or >= 0, got -2"),
        Case("batched_max_output_bool", lambda d: bnms(b(d), s(d), i(d), 0.5, False), TypeError,
             r"max_output must be None or an int, got bool"),
        Case("batched_idxs_on_other_device", lambda d: bnms(b(d), s(d), i(_other(d)), 0.5), RuntimeError,
             r"boxes and idxs must be on the same device", cuda_only=True),
        Case("batched_scores_on_other_device", lambda d: bnms(b(d), s(_other(d)), i(d), 0.5), RuntimeError,
             r"boxes and scores must be on the same device", cuda_only=True),
    ]


def box_iou_cases() -> List[Case]:
    iou = rpn_ops.box_iou
    b = _boxes
    return [
        Case("iou_boxes1_1d", lambda d: iou(torch.rand(4, device=d), b(d)), RuntimeError,
             r"boxes1 must have shape \[\.\.\., N, 4\], got 1-D"),
        Case("iou_boxes2_0d", lambda d: iou(b(d), torch.tensor(1.0, device=d)), RuntimeError,
             r"boxes2 must have shape \[\.\.\., N, 4\], got 0-D"),
        Case("iou_boxes1_width_5", lambda d: iou(torch.rand(3, 5, device=d), b(d)), RuntimeError,
             r"boxes1 must have shape \[\.\.\., N, 4\] \(x1, y1, x2, y2\), got shape \[3, 5\]"),
        Case("iou_boxes2_width_3", lambda d: iou(b(d), torch.rand(2, 7, 3, device=d)), RuntimeError,
             r"boxes2 must have shape \[\.\.\., N, 4\].*got shape \[2, 7, 3\]"),
        Case("iou_boxes1_complex", lambda d: iou(b(d).to(torch.complex64), b(d)), TypeError,
             r"boxes1 must be .*got ComplexFloat"),
        Case("iou_boxes2_bool", lambda d: iou(b(d), b(d).bool()), TypeError, r"boxes2 must be .*got Bool"),
        Case("iou_batch_not_broadcastable", lambda d: iou(torch.rand(2, 5, 4, device=d), torch.rand(3, 6, 4, device=d)),
             RuntimeError, r"the batch dimensions of boxes1 \[2, 5, 4\] and boxes2 \[3, 6, 4\] do not broadcast"),
        Case("iou_batch_not_broadcastable_inner", lambda d: iou(torch.rand(4, 2, 5, 4, device=d),
                                                                torch.rand(4, 3, 6, 4, device=d)),
             RuntimeError, r"the batch dimensions of boxes1 \[4, 2, 5, 4\] and boxes2 \[4, 3, 6, 4\] do not broadcast"),
        Case("iou_boxes2_on_other_device", lambda d: iou(b(d), b(_other(d))), RuntimeError,
             r"boxes1 and boxes2 must be on the same device", cuda_only=True),
    ]


def _codes(device, n=6, classes=1, dtype=torch.float32):
    return torch.zeros(n, 4 * classes, dtype=dtype, device=device)


def _gt(device, n=6, dtype=torch.float32):
    return torch.tensor([[1.0, 1.0, 3.0, 4.0]], dtype=dtype, device=device).repeat(n, 1)


W = (1.0, 1.0, 1.0, 1.0)


def box_coding_cases() -> List[Case]:
    dec, enc, c, b = rpn_ops.decode_boxes, rpn_ops.encode_boxes, _codes, _boxes
    return [
        Case("decode_codes_1d", lambda d: dec(torch.zeros(24, device=d), b(d), W), RuntimeError,
             r"rel_codes must have shape \[N, 4 \* K\].*got shape \[24\]"),
        Case("decode_codes_width_6", lambda d: dec(torch.zeros(6, 6, device=d), b(d), W), RuntimeError,
             r"rel_codes must have shape \[N, 4 \* K\].*got shape \[6, 6\]"),
        Case("decode_codes_3d", lambda d: dec(torch.zeros(2, 3, 4, device=d), b(d), W), RuntimeError,
             r"rel_codes must have shape \[N, 4 \* K\]"),
        Case("decode_codes_int", lambda d: dec(c(d).int(), b(d), W), TypeError, r"rel_codes must be .*got Int"),
        Case("decode_codes_bool", lambda d: dec(c(d).bool(), b(d), W), TypeError, r"rel_codes must be .*got Bool"),
        Case("decode_boxes_width_5", lambda d: dec(c(d), torch.zeros(6, 5, device=d), W), RuntimeError,
             r"boxes must have shape \[N, 4\]"),
        Case("decode_boxes_bool", lambda d: dec(c(d), b(d).bool(), W), TypeError, r"boxes must be .*got Bool"),
        Case("decode_length_mismatch", lambda d: dec(c(d, 5), b(d), W), RuntimeError,
             r"boxes has 6 boxes but rel_codes has 5 rows"),
        Case("decode_three_weights", lambda d: dec(c(d), b(d), (1.0, 1.0, 1.0)), ValueError,
             r"weights must hold 4 numbers"),
        Case("decode_zero_weight", lambda d: dec(c(d), b(d), (1.0, 0.0, 1.0, 1.0)), ValueError,
             r"weights must be finite and > 0"),
        Case("decode_negative_weight", lambda d: dec(c(d), b(d), (1.0, 1.0, -5.0, 1.0)), ValueError,
             r"weights must be finite and > 0"),
        Case("decode_inf_weight", lambda d: dec(c(d), b(d), (float("inf"),) * 4), ValueError,
             r"weights must be finite and > 0"),
        Case("decode_weight_string", lambda d: dec(c(d), b(d), ("1", 1, 1, 1)), TypeError,
             r"each weight must be a number"),
        Case("decode_nan_clip", lambda d: dec(c(d), b(d), W, float("nan")), ValueError,
             r"bbox_xform_clip must be a number, got NaN"),
        Case("decode_clip_none", lambda d: dec(c(d), b(d), W, None), TypeError, r"bbox_xform_clip must be a number"),
        Case("decode_codes_list", lambda d: dec([[0.0] * 4] * 6, b(d), W), RuntimeError,
             r"Expected a value of type 'Tensor' for argument 'rel_codes' but instead found type 'list'"),
        Case("decode_boxes_on_other_device", lambda d: dec(c(d), b(_other(d)), W), RuntimeError,
             r"rel_codes and boxes must be on the same device", cuda_only=True),
        Case("coder_decode_boxes_not_a_list", lambda d: rpn_ops.BoxCoder(W).decode(c(d), b(d)), TypeError,
             r"boxes must be a list or tuple of tensors"),
        Case("encode_length_mismatch", lambda d: enc(_gt(d), b(d, 4), W), RuntimeError,
             r"reference_boxes and proposals must have the same number of boxes, got 6 and 4"),
        Case("encode_reference_width_3", lambda d: enc(_gt(d)[:, :3], b(d), W), RuntimeError,
             r"reference_boxes must have shape \[N, 4\]"),
        Case("encode_proposals_1d", lambda d: enc(_gt(d), torch.zeros(24, device=d), W), RuntimeError,
             r"proposals must be a 2-D tensor"),
        Case("encode_proposals_int", lambda d: enc(_gt(d), b(d).int(), W), TypeError, r"proposals must be .*got Int"),
        Case("encode_weights_tensor_of_3", lambda d: enc(_gt(d), b(d), torch.ones(3)), ValueError,
             r"weights must hold 4 numbers \(wx, wy, ww, wh\), got shape \(3,\)"),
        Case("encode_nan_weight", lambda d: enc(_gt(d), b(d), (1.0, float("nan"), 1.0, 1.0)), ValueError,
             r"weights must be finite and > 0"),
        Case("encode_on_other_device", lambda d: enc(_gt(d), b(_other(d)), W), RuntimeError,
             r"reference_boxes and proposals must be on the same device", cuda_only=True),
    ]


def _cells(device, dtype=torch.float32):
    return [rpn_ops.cell_anchors((16, 32), (0.5, 1.0), dtype, device)]


def anchor_cases() -> List[Case]:
    grid = rpn_ops.grid_anchors
    return [
        Case("anchors_no_level", lambda d: grid([], [], []), ValueError, r"cell_anchors must hold at least one level"),
        Case("anchors_missing_grid", lambda d: grid(_cells(d), [], [(4, 4)]), ValueError,
             r"one grid size and one stride per level are needed"),
        Case("anchors_grid_not_pair", lambda d: grid(_cells(d), [(4, 4, 4)], [(4, 4)]), ValueError,
             r"grid_sizes\[0\] must be a pair"),
        Case("anchors_negative_grid", lambda d: grid(_cells(d), [(-1, 4)], [(4, 4)]), ValueError,
             r"the grid size of level 0 must be >= 0"),
        Case("anchors_negative_stride", lambda d: grid(_cells(d), [(2, 4)], [(4, -8)]), ValueError,
             r"the strides of level 0 must be >= 0"),
        Case("anchors_float_grid", lambda d: grid(_cells(d), [(2.5, 4)], [(4, 4)]), TypeError,
             r"grid_sizes\[0\] must be an int"),
        Case("anchors_negative_images", lambda d: grid(_cells(d), [(2, 4)], [(4, 4)], num_images=-1), ValueError,
             r"num_images must be >= 0"),
        Case("anchors_cells_int", lambda d: grid([_cells(d)[0].int()], [(2, 4)], [(4, 4)]), TypeError,
             r"cell_anchors must be .*got Int"),
        Case("anchors_cells_width_3", lambda d: grid([_cells(d)[0][:, :3]], [(2, 4)], [(4, 4)]), RuntimeError,
             r"cell_anchors must have shape \[cells, 4\]"),
        Case("anchors_cells_not_tensor", lambda d: grid([[[0, 0, 1, 1]]], [(2, 4)], [(4, 4)]), TypeError,
             r"cell_anchors\[0\] must be a tensor"),
        Case("anchors_too_many", lambda d: grid(_cells(d), [(40_000, 40_000)], [(4, 4)]), ValueError,
             r"the anchors of all levels pass 2147483647 per image"),
        Case("anchors_cells_on_two_devices", lambda d: grid(_cells(d) + _cells(_other(d)), [(2, 2)] * 2, [(4, 4)] * 2),
             RuntimeError, r"(?i)device", cuda_only=True),
        Case("anchor_generator_wrong_level_count", lambda d: rpn_ops.AnchorGenerator(((16,), (32,)), ((1.0,),) * 2)(
             _image_list(d), [torch.zeros(1, 1, 4, 4, device=d)]), ValueError,
             r"sizes and aspect ratios for 2 feature maps but got 1"),
        Case("anchor_generator_empty_feature_map", lambda d: rpn_ops.AnchorGenerator(((16,),), ((1.0,),))(
             _image_list(d), [torch.zeros(1, 1, 0, 4, device=d)]), ValueError, r"feature map 0 has an empty grid"),
        Case("anchor_generator_mismatched_config", lambda d: rpn_ops.AnchorGenerator(((16,), (32,)), ((1.0,),) * 3),
             ValueError, r"sizes and aspect_ratios need one entry per feature map, got 2 sizes and 3 aspect ratios"),
    ]


def _image_list(device):
    from rpn_ops.workloads import ImageBatch

    return ImageBatch(torch.zeros(1, 3, 32, 32, device=device), [(32, 32)])


def matching_cases() -> List[Case]:
    match, assign, op, g, a = rpn_ops.match_anchors, rpn_ops.assign_targets, torch.ops.rpn_ops.match_anchors, _gt, _boxes

    def broken(tensor, value):
        tensor[3, 2] = value
        return tensor

    return [
        Case("match_low_above_high", lambda d: match(g(d), a(d), 0.3, 0.7), ValueError,
             "low_threshold must be <= high_threshold, got low 0.7 and high 0.3"),
        Case("match_negative_low", lambda d: match(g(d), a(d), 0.7, -0.1), ValueError,
             "low_threshold must be a finite number >= 0, got -0.1"),
        Case("match_nan_high", lambda d: match(g(d), a(d), float("nan"), 0.3), ValueError,
             "high_threshold must be a finite number >= 0, got nan"),
        Case("assign_inf_fg", lambda d: assign([a(d)], [g(d)], float("inf"), 0.3), ValueError,
             "high_threshold must be a finite number >= 0, got inf"),
        Case("match_string_threshold", lambda d: match(g(d), a(d), "0.7"), TypeError, "high_threshold must be a number"),
        Case("match_no_gt", lambda d: match(g(d)[:0], a(d)), ValueError, "image 0 has no ground-truth boxes"),
        Case("match_no_anchors", lambda d: match(g(d), a(d)[:0]), ValueError,
             "image 0 has 6 ground-truth boxes but no anchors to match them to"),
        Case("match_gt_width_3", lambda d: match(g(d)[:, :3], a(d)), ValueError,
             r"gt_boxes must have shape \[N, 4\], got \(6, 3\)"),
        Case("assign_anchors_1d", lambda d: assign([a(d).flatten()], [g(d)]), ValueError,
             r"anchors\[0\] must have shape \[N, 4\], got \(24,\)"),
        Case("match_anchors_int", lambda d: match(g(d), a(d).int()), TypeError,
             "anchors must be float16, bfloat16, float32 or float64, got Int"),
        Case("match_nan_anchor", lambda d: match(g(d), broken(a(d), float("nan"))), ValueError,
             "anchors has a box with an infinite or NaN coordinate|gt_boxes or anchors has a box"),
        Case("assign_inf_gt", lambda d: assign([a(d)], [broken(g(d), float("inf"))]), ValueError,
             "gt_boxes has a box with an infinite or NaN coordinate|gt_boxes or anchors has a box"),
        Case("match_tensor_and_list", lambda d: match([g(d)], a(d)), TypeError, "both be tensors or both be lists"),
        Case("match_list_lengths", lambda d: match([g(d), g(d)], [a(d)]), ValueError,
             "one entry of ground truth per image of anchors is needed: 1 images of anchors, 2 of ground truth"),
        Case("assign_list_lengths", lambda d: assign([a(d), a(d)], [g(d)]), ValueError,
             "one entry of ground truth per image"),
        Case("assign_dict_without_boxes", lambda d: assign([a(d)], [{"labels": g(d)}]), KeyError, "'boxes'"),
        Case("assign_gt_as_list", lambda d: assign([a(d)], [g(d).tolist()]), TypeError,
             "ground-truth boxes must be a tensor or a dict with 'boxes'"),
        Case("assign_gt_dtypes_differ", lambda d: assign([a(d), a(d)], [g(d), g(d).double()]), TypeError,
             "ground-truth boxes of all images must have one dtype"),
        Case("assign_zero_weight", lambda d: assign([a(d)], [g(d)], weights=(1.0, 0.0, 1.0, 1.0)), ValueError,
             "weights must be finite and > 0"),
        Case("match_counts_sum", lambda d: op(g(d), a(d), [6], [5], 0.7, 0.3, True), ValueError,
             "the anchor counts per image sum to 5 but anchors has 6 boxes"),
        Case("match_counts_lengths", lambda d: op(g(d), a(d), [2, 4], [6], 0.7, 0.3, True), ValueError,
             "one ground-truth count and one anchor count per image are needed, got 2 and 1"),
        Case("match_negative_count", lambda d: op(g(d), a(d), [7, -1], [3, 3], 0.7, 0.3, True), ValueError,
             "image 1 has a negative box count"),
        Case("match_devices_differ", lambda d: match(g(d), a(_other(d))), RuntimeError,
             "gt_boxes and anchors must be on the same device", cuda_only=True),
        Case("assign_devices_differ", lambda d: assign([a(_other(d))], [g(d)]), RuntimeError,
             "gt_boxes and anchors must be on the same device", cuda_only=True),
    ]


CASES = nms_cases() + batched_nms_cases() + box_iou_cases() + box_coding_cases() + anchor_cases() + matching_cases()


def check_case(case: Case, device: str) -> None:
    """Raises AssertionError unless the op raises `case.error` with a message matching `case.match`."""
    try:
        case.call(device)
    except case.error as error:
        if not re.search(case.match, str(error)):
            raise AssertionError(f"{case.name} on {device}: message {str(error)!r} does not match {case.match!r}")
        return
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{case.name} on {device}: expected {case.error.__name__}, got "
                             f"{type(error).__name__}: {error}") from error
    raise AssertionError(f"{case.name} on {device}: no error raised")


def run_matrix() -> int:
    """Every case on every device here; prints each failure. The exit status of the subprocess test."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    for device in devices:
        for case in CASES:
            if case.cuda_only and device == "cpu" and not torch.cuda.is_available():
                continue
            try:
                check_case(case, device)
            except AssertionError as error:
                failures += 1
                print(f"FAIL {error}", flush=True)
        # The library still works after all those errors.
        assert rpn_ops.nms(_boxes(device), _scores(device), 0.5).tolist() == [0]
    print(f"checked {len(CASES)} cases on {devices}, {failures} failures", flush=True)
    return 1 if failures else 0


ONE_DEVICE_CASES = [case for case in CASES if not case.cuda_only]
TWO_DEVICE_CASES = [case for case in CASES if case.cuda_only]


@pytest.mark.parametrize("case", ONE_DEVICE_CASES, ids=[case.name for case in ONE_DEVICE_CASES])
def test_bad_input_raises_a_message_naming_the_argument(device, case):
    check_case(case, device)


@needs_cuda
@pytest.mark.parametrize("first_device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", TWO_DEVICE_CASES, ids=[case.name for case in TWO_DEVICE_CASES])
def test_inputs_on_two_devices_raise_a_message_naming_the_argument(first_device, case):
    check_case(case, first_device)


def test_bad_input_never_crashes_the_process():
    """The whole matrix in a fresh interpreter: a crash (segfault, abort) fails here instead of killing pytest.
    Mismatched messages are reported by the test above; here only the exit status of the process counts."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rpn_ops.__file__)))
    code = (f"import sys; sys.path[:0] = [{tests_dir!r}, {package_root!r}]; import torch; import test_bad_input; "
            "sys.exit(test_bad_input.run_matrix())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode >= 0, f"crashed with signal {-result.returncode}:\n{result.stdout}\n{result.stderr}"
    assert "checked" in result.stdout, result.stdout + result.stderr


def _narrow_boxes(b, s):
    return rpn_ops.nms(b[:, :3], s, 0.5)


def _short_scores(b, s):
    return rpn_ops.nms(b, s[:4], 0.5)


def _nan_threshold(b, s):
    return rpn_ops.nms(b, s, float("nan"))


def _negative_max_output(b, s):
    return rpn_ops.batched_nms(b, s, torch.zeros(len(b), dtype=torch.int64), 0.5, -1)


def _unbroadcastable_batches(b, s):
    return rpn_ops.box_iou(b.view(2, 3, 4), b.view(3, 2, 4))


@pytest.mark.parametrize("fn, match", [
    (_narrow_boxes, r"boxes must have shape \[N, 4\]"),
    (_short_scores, r"scores must have"),
    (_nan_threshold, r"iou_threshold must be a finite number"),
    (_negative_max_output, r"max_output must be None or >= 0"),
    (_unbroadcastable_batches, r"boxes1 .*boxes2 .*broadcast"),
], ids=["narrow_boxes", "short_scores", "nan_threshold", "negative_max_output", "unbroadcastable_batches"])
def test_bad_input_under_torch_compile_names_the_argument(fn, match):
    """Traced by the fake kernels, bad input still gets a message naming the argument."""
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(fn, backend="aot_eager", fullgraph=True)(_boxes("cpu"), _scores("cpu"))
    message = str(info.value).split("from user code:")[0]  # not the quoted source line
    assert re.search(match, message), message
