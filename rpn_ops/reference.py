"""Plain-PyTorch reference implementations, written for clarity rather than speed.

They define what the kernels must compute (torchvision's semantics, DESIGN.md) and are what the tests and
benchmarks compare with, next to torchvision itself.
"""
import math
from typing import List, Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16/float32 are computed in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of [..., N, 4] and [..., M, 4] boxes in torchvision's operation order."""
    dtype = compute_dtype(boxes1.dtype)
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    top_left = torch.max(b1[..., :, None, :2], b2[..., None, :, :2])
    bottom_right = torch.min(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None) -> Tensor:
    """Greedy NMS: visit boxes by descending score (stable), keep a box unless an already kept box has
    IoU > iou_threshold with it (compared in float64)."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device),
                       iou_threshold, max_output)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                max_output: Optional[int] = None) -> Tensor:
    """Per-category greedy NMS; the kept indices in descending score order (stable)."""
    dtype = compute_dtype(boxes.dtype)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    limit = len(boxes) if max_output is None else max_output
    for i in order.tolist():
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        iou = box_iou(boxes[i : i + 1], boxes)[0]
        suppressed |= (iou.double() > iou_threshold) & (idxs == idxs[i])
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def grid_anchors(cell_anchors: List[Tensor], grid_sizes, strides) -> Tensor:
    """All levels' anchors: at each position (row-major) of each level, shift + every cell anchor."""
    levels = []
    for cells, (height, width), (stride_y, stride_x) in zip(cell_anchors, grid_sizes, strides):
        ys = torch.arange(height, dtype=torch.int32, device=cells.device) * int(stride_y)
        xs = torch.arange(width, dtype=torch.int32, device=cells.device) * int(stride_x)
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
        levels.append((shifts + cells.reshape(1, -1, 4)).reshape(-1, 4))
    return torch.cat(levels)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights, bbox_xform_clip: float = math.log(1000.0 / 16)) -> Tensor:
    """[N, 4K] deltas applied to [N, 4] boxes, step by step in torchvision's order and dtypes."""
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2:3] - boxes[:, 0:1]
    heights = boxes[:, 3:4] - boxes[:, 1:2]
    ctr_x = boxes[:, 0:1] + 0.5 * widths
    ctr_y = boxes[:, 1:2] + 0.5 * heights
    wx, wy, ww, wh = (float(w) for w in weights)
    dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=bbox_xform_clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = torch.tensor(0.5, dtype=pred_ctr_x.dtype, device=boxes.device) * (torch.exp(dw) * widths)
    half_h = torch.tensor(0.5, dtype=pred_ctr_y.dtype, device=boxes.device) * (torch.exp(dh) * heights)
    corners = (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h)
    return torch.stack(corners, dim=2).flatten(1)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights) -> Tensor:
    """[N, 4] targets (dx, dy, dw, dh) of reference boxes relative to proposals, in torchvision's order; the
    weights take the reference boxes' dtype."""
    wx, wy, ww, wh = torch.as_tensor(weights, dtype=reference_boxes.dtype, device=reference_boxes.device)
    ex_widths = proposals[:, 2:3] - proposals[:, 0:1]
    ex_heights = proposals[:, 3:4] - proposals[:, 1:2]
    ex_ctr_x = proposals[:, 0:1] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1:2] + 0.5 * ex_heights
    gt_widths = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
    gt_heights = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
    gt_ctr_x = reference_boxes[:, 0:1] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1:2] + 0.5 * gt_heights
    targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = ww * torch.log(gt_widths / ex_widths)
    targets_dh = wh * torch.log(gt_heights / ex_heights)
    return torch.cat((targets_dx, targets_dy, targets_dw, targets_dh), dim=1)
