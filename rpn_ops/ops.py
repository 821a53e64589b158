"""Public operators: thin wrappers over ``torch.ops.rpn_ops``, with torchvision's signatures."""
import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _autograd, _meta  # noqa: F401  (register gradients, and the fake kernels torch.compile uses)

_DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)


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


def grid_anchors(
    cell_anchors: Sequence[Tensor],
    grid_sizes: Sequence[Sequence[int]],
    strides: Sequence[Sequence[int]],
    num_images: Optional[int] = None,
) -> Tensor:
    """The anchors of every feature-map level, as ``torchvision``'s ``AnchorGenerator.grid_anchors``
    concatenated over levels, computed in one call.

    Args:
        cell_anchors: per level, a ``[A_l, 4]`` tensor of cell anchors (see :func:`rpn_ops.cell_anchors`), all
            of one dtype and device: the anchors' dtype and device.
        grid_sizes: per level, the feature map's ``(height, width)``.
        strides: per level, ``(stride_y, stride_x)`` in pixels (ints or 0-dim integer tensors).
        num_images: if given, return ``num_images`` copies stacked: ``[num_images, total, 4]``.

    Returns:
        ``[sum_l height_l * width_l * A_l, 4]`` anchors ``(x1, y1, x2, y2)``: level by level, then by row,
        column and cell anchor, ``anchor = (x * stride_x, y * stride_y) * 2 + cell`` rounded like torchvision.
    """
    cells = list(cell_anchors)
    if len(grid_sizes) != len(cells) or len(strides) != len(cells):
        raise ValueError(f"one grid size and one stride per level are needed: {len(cells)} levels of cell "
                         f"anchors, {len(grid_sizes)} grid sizes, {len(strides)} strides")
    if not cells:
        raise ValueError("cell_anchors must hold at least one level")
    for level, c in enumerate(cells):
        if not isinstance(c, Tensor):
            raise TypeError(f"cell_anchors[{level}] must be a tensor, got {type(c).__name__}")
    table = cells[0] if len(cells) == 1 else torch.cat(cells)
    anchors = torch.ops.rpn_ops.grid_anchors.default(
        table, [len(c) for c in cells], _pairs(grid_sizes, "grid_sizes"), _pairs(strides, "strides"),
        1 if num_images is None else _count_arg(num_images, "num_images"))
    return anchors[0] if num_images is None else anchors


def decode_boxes(
    rel_codes: Tensor, boxes: Tensor, weights: Sequence[float], bbox_xform_clip: float = _DEFAULT_XFORM_CLIP
) -> Tensor:
    """Decode box deltas, as torchvision's ``BoxCoder(weights, bbox_xform_clip).decode_single``.

    Args:
        rel_codes: ``[N, 4 * K]`` deltas ``(dx, dy, dw, dh)`` per box and class, float16/bfloat16/float32/float64.
        boxes: ``[N, 4]`` reference boxes (anchors or proposals), converted to ``rel_codes``' dtype first.
        weights: ``(wx, wy, ww, wh)``, finite and > 0; deltas are divided by them.
        bbox_xform_clip: ``dw`` and ``dh`` are clamped to at most this before the exponential.

    Returns:
        ``[N, 4 * K]`` boxes ``(x1, y1, x2, y2)`` of ``rel_codes``' dtype, equal to torchvision's to the bit on
        the same device (zero-size boxes give inf/NaN exactly as there). One fused pass; threads over rows.
    """
    return torch.ops.rpn_ops.decode_boxes.default(rel_codes, boxes, _weights(weights), _number(bbox_xform_clip,
                                                                                              "bbox_xform_clip"))


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: Sequence[float]) -> Tensor:
    """Regression targets of ``reference_boxes`` (e.g. matched ground truth) relative to ``proposals``
    (e.g. anchors), as torchvision's ``encode_boxes`` / ``BoxCoder.encode_single``.

    Args:
        reference_boxes: ``[N, 4]`` boxes; the weights are rounded to their dtype, as torchvision does.
        proposals: ``[N, 4]`` boxes; may have another floating dtype (PyTorch's promotion decides the result's).
        weights: ``(wx, wy, ww, wh)``: a sequence or a 4-element tensor, finite and > 0.

    Returns:
        ``[N, 4]`` targets ``(dx, dy, dw, dh)``, equal to torchvision's to the bit on the same device.
    """
    return torch.ops.rpn_ops.encode_boxes.default(reference_boxes, proposals, _weights(weights))


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, Tensor) and value.numel() == 1
    ):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _weights(weights) -> List[float]:
    if isinstance(weights, Tensor):
        if weights.numel() != 4:
            raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got shape {tuple(weights.shape)}")
        return [float(w) for w in weights.reshape(-1).tolist()]
    if not isinstance(weights, (list, tuple)) or len(weights) != 4:
        raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got {weights!r}")
    return [_number(w, "each weight") for w in weights]


def _count_arg(value, name: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _pairs(values, name: str) -> list:
    flat = []
    for level, pair in enumerate(values):
        if len(pair) != 2:
            raise ValueError(f"{name}[{level}] must be a pair (y, x), got {pair!r}")
        flat += [_count_arg(v, f"{name}[{level}]") for v in pair]
    return flat
