"""Plain-PyTorch reference implementations, written for clarity rather than speed.

They define what the kernels must compute (torchvision's semantics, DESIGN.md) and are what the tests and
benchmarks compare with, next to torchvision itself.
"""
from typing import Optional

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
