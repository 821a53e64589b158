"""Public operators: thin wrappers over ``torch.ops.rpn_ops``, with torchvision's signatures."""
from typing import Optional

import torch
from torch import Tensor

from . import _meta  # noqa: F401  (registers the fake kernels used by torch.compile)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union, as ``torchvision.ops.box_iou``.

    Args:
        boxes1: ``[..., N, 4]`` boxes ``(x1, y1, x2, y2)``.
        boxes2: ``[..., M, 4]`` boxes, same dtype and device; leading dimensions broadcast.

    Returns:
        ``[..., N, M]`` IoU, float32 for float16/bfloat16/float32 input (computed in float32), float64 for
        float64. Computed in one pass, with no ``[N, M, 2]`` temporaries.
    """
    return torch.ops.rpn_ops.box_iou.default(boxes1, boxes2)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None) -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Boxes are visited by descending score (equal scores: lower index first); a box is dropped when its IoU
    with an already kept box is greater than ``iou_threshold`` (compared as a double, torchvision's CPU rule).

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64.
        scores: ``[N]`` scores, same dtype and device as ``boxes``.
        iou_threshold: a finite number.
        max_output: if given, stop once this many boxes are kept; the result is exactly the first
            ``max_output`` indices of the full result.

    Returns:
        int64 indices of the kept boxes, by descending score.
    """
    return torch.ops.rpn_ops.nms.default(boxes, scores, _threshold(iou_threshold), _optional_int(max_output))


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_output: Optional[int] = None
) -> Tensor:
    """Per-category NMS, as ``torchvision.ops.batched_nms``: boxes of different ``idxs`` never suppress each
    other. True per-category NMS in one call (no coordinate-offset trick, whose rounding can leak across
    categories).

    Args:
        boxes: ``[N, 4]`` boxes, scores: ``[N]`` scores (same dtype), idxs: ``[N]`` integer category per box.
        iou_threshold: a finite number.
        max_output: if given, the first ``max_output`` indices of the full result, computed with early exit.

    Returns:
        int64 indices of the kept boxes, by descending score (equal scores: lower index first).
    """
    return torch.ops.rpn_ops.batched_nms.default(
        boxes, scores, idxs, _threshold(iou_threshold), _optional_int(max_output)
    )


def _threshold(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, Tensor) and value.numel() == 1
    ):
        raise TypeError(f"iou_threshold must be a number, got {type(value).__name__}")
    return float(value)


def _optional_int(value: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, Tensor) and value.numel() == 1):
        raise TypeError(f"max_output must be None or an int, got {type(value).__name__}")
    return int(value)
