"""Public operators: thin wrappers over ``torch.ops.rpn_ops``, with torchvision's signatures.

Each wrapper scripts with ``torch.jit.script`` (its Python-only argument checks sit in ``if not
torch.jit.is_scripting()`` blocks, which TorchScript leaves out) and, during ONNX export, records the portable form
of its operator instead (``_portable.py``)."""
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _autograd, _meta, _portable  # noqa: F401  (gradients, the fake kernels torch.compile uses, ONNX forms)

_DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)
_ROTATED_FORMATS = ("cxcywhr", "xywhr", "xyxyxyxy")


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Pairwise intersection over union, as ``torchvision.ops.box_iou``.

    Args:
        boxes1: ``[..., N, 4]`` boxes.
        boxes2: ``[..., M, 4]`` boxes, on the same device; leading dimensions broadcast.
        fmt: ``"xyxy"`` (``(x1, y1, x2, y2)``, the default), ``"xywh"`` or ``"cxcywh"``, as torchvision; its
            rotated formats (``"cxcywhr"``, ``"xywhr"``, ``"xyxyxyxy"``) are computed by torchvision's kernel.

    Returns:
        ``[..., N, M]`` IoU. float16/bfloat16/float32 boxes of one dtype (or mixed among these) are computed in
        float32 and give float32, float64 gives float64, in one pass with no ``[N, M, 2]`` temporaries, and
        differentiably (torchvision's gradients). Integer boxes, float64 mixed with another dtype and the other
        formats are computed with PyTorch's operators in torchvision's steps: its result and dtype (float32 for
        integers), to the bit.
    """
    if not torch.jit.is_scripting():
        if fmt in _ROTATED_FORMATS:
            return _box_iou_rotated(boxes1, boxes2, fmt)
    if fmt != "xyxy" or not _iou_kernel_takes(boxes1, boxes2) or (
            not torch.jit.is_scripting() and _portable.exporting_to_onnx()):
        return _box_iou_by_torch_ops(boxes1, boxes2, fmt)
    if boxes1.dtype != boxes2.dtype and boxes1.is_floating_point() and boxes2.is_floating_point():
        boxes1, boxes2 = boxes1.float(), boxes2.float()  # float16 / bfloat16 with float32: computed in float32 anyway
    return torch.ops.rpn_ops.box_iou(boxes1, boxes2)


def _box_iou_rotated(boxes1: Tensor, boxes2: Tensor, fmt: str) -> Tensor:
    from torchvision.ops.boxes import box_convert

    if not hasattr(torch.ops.torchvision, "box_iou_rotated"):
        raise ValueError(f"fmt='{fmt}' (rotated boxes) needs torchvision >= 0.29, whose kernel computes it")
    if fmt != "cxcywhr":
        boxes1, boxes2 = box_convert(boxes1, fmt, "cxcywhr"), box_convert(boxes2, fmt, "cxcywhr")
    return torch.ops.torchvision.box_iou_rotated(boxes1, boxes2)


def _iou_kernel_takes(boxes1: Tensor, boxes2: Tensor) -> bool:
    """Floating boxes of one dtype, or a mix of float16, bfloat16 and float32 (both computed in float32); anything
    else that is not floating the kernel refuses with an error naming it, except integers."""
    if _is_integer(boxes1) or _is_integer(boxes2):
        return False
    if boxes1.dtype == boxes2.dtype or not boxes1.is_floating_point() or not boxes2.is_floating_point():
        return True
    return boxes1.dtype != torch.float64 and boxes2.dtype != torch.float64


def _is_integer(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _box_iou_by_torch_ops(boxes1: Tensor, boxes2: Tensor, fmt: str) -> Tensor:
    """torchvision's box_iou step by step: areas and extents upcast (integers to int32 or int64, half precision to
    float32), the dtypes promoted as PyTorch promotes them, integer intersection and union divided as floats."""
    if fmt != "xyxy" and fmt != "xywh" and fmt != "cxcywh":
        raise ValueError(f"fmt must be 'xyxy', 'xywh' or 'cxcywh', got '{fmt}'")
    if fmt == "xyxy":
        lower1, upper1, lower2, upper2 = boxes1[..., :2], boxes1[..., 2:], boxes2[..., :2], boxes2[..., 2:]
    elif fmt == "xywh":
        lower1, lower2 = boxes1[..., :2], boxes2[..., :2]
        upper1, upper2 = lower1 + boxes1[..., 2:], lower2 + boxes2[..., 2:]
    else:
        lower1, upper1 = boxes1[..., :2] - boxes1[..., 2:] / 2, boxes1[..., :2] + boxes1[..., 2:] / 2
        lower2, upper2 = boxes2[..., :2] - boxes2[..., 2:] / 2, boxes2[..., :2] + boxes2[..., 2:] / 2
    area1, area2 = _area(boxes1, fmt), _area(boxes2, fmt)
    top_left = torch.max(lower1[..., :, None, :], lower2[..., None, :, :])
    bottom_right = torch.min(upper1[..., :, None, :], upper2[..., None, :, :])
    wh = _upcast(bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def _area(boxes: Tensor, fmt: str) -> Tensor:
    boxes = _upcast(boxes)
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def _upcast(t: Tensor) -> Tensor:
    """The type torchvision multiplies extents in, so that products do not overflow."""
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None) -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Boxes are visited by descending score (equal scores: lower index first); a box is dropped when its IoU
    with an already kept box is greater than ``iou_threshold`` (compared as a double, torchvision's CPU rule).

    Args:
        boxes: ``[N, 4]`` boxes ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64, or quantized (then
            dequantized, as torchvision's quantized NMS compares the dequantized boxes).
        scores: ``[N]`` scores, same dtype and device as ``boxes`` (quantized with quantized boxes).
        iou_threshold: a finite number.
        max_output: if given, stop once this many boxes are kept; the result is exactly the first
            ``max_output`` indices of the full result.

    Returns:
        int64 indices of the kept boxes, by descending score.
    """
    boxes, scores = _dequantized(boxes), _dequantized(scores)
    if not torch.jit.is_scripting():
        iou_threshold, max_output = _threshold(iou_threshold), _optional_int(max_output)
        if _portable.exporting_to_onnx():
            _portable.require_torchvision()
            return _portable.nms(boxes, scores, iou_threshold, max_output)
    return torch.ops.rpn_ops.nms(boxes, scores, iou_threshold, max_output)


def batched_nms(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_output: Optional[int] = None
) -> Tensor:
    """Per-category NMS, as ``torchvision.ops.batched_nms``: boxes of different ``idxs`` never suppress each
    other. True per-category NMS in one call (no coordinate-offset trick, whose rounding can leak across
    categories).

    Args:
        boxes: ``[N, 4]`` boxes, scores: ``[N]`` scores (same dtype), idxs: ``[N]`` category per box (integer;
            floating categories are taken by value, as torchvision). Zero boxes give an empty result whatever
            the other arguments, as in torchvision.
        iou_threshold: a finite number.
        max_output: if given, the first ``max_output`` indices of the full result, computed with early exit.

    Returns:
        int64 indices of the kept boxes, by descending score (equal scores: lower index first).
    """
    if _empty_before_other_checks(boxes):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    boxes, scores = _dequantized(boxes), _dequantized(scores)
    if not torch.jit.is_scripting():
        iou_threshold, max_output = _threshold(iou_threshold), _optional_int(max_output)
        if _portable.exporting_to_onnx():
            _portable.require_torchvision()
            return _portable.batched_nms(boxes, scores, idxs, iou_threshold, max_output)
    if idxs.is_floating_point():  # categories by value
        idxs = torch.unique(idxs, sorted=True, return_inverse=True)[1]
    return torch.ops.rpn_ops.batched_nms(boxes, scores, idxs, iou_threshold, max_output)


def _empty_before_other_checks(boxes: Tensor) -> bool:
    """Zero boxes give an empty result before the other arguments are looked at, as in torchvision. Not decided
    while tracing (torch.jit.trace, ONNX export): the traced graph must decide it for each input, and the
    operators return an empty result for zero boxes."""
    if not torch.jit.is_scripting():
        if torch.jit.is_tracing() or _portable.exporting_to_onnx():
            return False
    return _portable.known_empty(boxes)


def _dequantized(t: Tensor) -> Tensor:
    return t.dequantize() if isinstance(t, Tensor) and t.is_quantized else t


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


def score_candidates(logits: Tensor, score_thresh: float) -> Tuple[Tensor, Tensor]:
    """The sigmoid scores of class logits above ``score_thresh`` and their flat indices, in index order: exactly
    ``s = torch.sigmoid(logits).flatten(); keep = s > score_thresh; s[keep], torch.where(keep)[0]``, the step
    torchvision's RetinaNet and FCOS post-process run per image and level, scores to the bit.

    Only the logits that can pass the threshold get a sigmoid: one pass over ``[anchors, classes]`` logits instead
    of torch's sigmoid, comparison and ``where`` over all of them. On the CPU each score is computed by the path
    (vectorised or scalar, which round differently) that ``torch.sigmoid`` of the whole tensor takes at its
    position, for the thread count in use; on x86 CPUs and CUDA. Elsewhere, and for float16 / bfloat16 logits or
    a threshold outside (0, 1), torchvision's steps run. Differentiable (torchvision's gradients).

    Args:
        logits: class logits of any shape (contiguous, as a head's ``[anchors, classes]`` per image and level).
        score_thresh: the score a candidate must exceed, compared in the logits' dtype.

    Returns:
        (scores ``[K]`` of the logits' dtype, indices ``[K]`` int64 into ``logits.flatten()``).
    """
    if not torch.jit.is_scripting():
        if not isinstance(logits, Tensor):
            raise TypeError(f"score_candidates: logits must be a tensor, got {type(logits).__name__}")
        score_thresh = _number(score_thresh, "score_thresh")
        if _portable.exporting_to_onnx():
            scores = torch.sigmoid(logits).flatten()
            keep = scores > score_thresh
            return scores[keep], torch.where(keep)[0]
    return torch.ops.rpn_ops.score_candidates(logits, score_thresh)


def grid_anchors(
    cell_anchors: List[Tensor],
    grid_sizes: List[List[int]],
    strides: List[List[int]],
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
        Differentiable with respect to the cell anchors, as torchvision's sums.
    """
    if not torch.jit.is_scripting():
        _check_levels(cell_anchors, grid_sizes, strides)
        if _portable.exporting_to_onnx() or torch.jit.is_tracing():  # sizes may be traced tensors
            anchors = _portable.grid_anchors(cell_anchors, grid_sizes, strides)
            return anchors if num_images is None else anchors.expand(num_images, -1, -1)
        grid_sizes, strides = _pairs(grid_sizes, "grid_sizes"), _pairs(strides, "strides")
        num_images = None if num_images is None else _count_arg(num_images, "num_images")
    table = cell_anchors[0] if len(cell_anchors) == 1 else torch.cat(cell_anchors)
    anchors = torch.ops.rpn_ops.grid_anchors(table, [len(c) for c in cell_anchors], _flat(grid_sizes),
                                             _flat(strides), 1 if num_images is None else num_images)
    return anchors[0] if num_images is None else anchors


def _check_levels(cell_anchors: Sequence[Tensor], grid_sizes: Sequence, strides: Sequence) -> None:
    if len(grid_sizes) != len(cell_anchors) or len(strides) != len(cell_anchors):
        raise ValueError(f"one grid size and one stride per level are needed: {len(cell_anchors)} levels of cell "
                         f"anchors, {len(grid_sizes)} grid sizes, {len(strides)} strides")
    if not cell_anchors:
        raise ValueError("cell_anchors must hold at least one level")
    for level, c in enumerate(cell_anchors):
        if not isinstance(c, Tensor):
            raise TypeError(f"cell_anchors[{level}] must be a tensor, got {type(c).__name__}")


def _flat(pairs: List[List[int]]) -> List[int]:
    flat: List[int] = []
    for pair in pairs:
        flat.extend(pair)
    return flat


def decode_boxes(
    rel_codes: Tensor, boxes: Tensor, weights: Tuple[float, float, float, float],
    bbox_xform_clip: float = _DEFAULT_XFORM_CLIP,
) -> Tensor:
    """Decode box deltas, as torchvision's ``BoxCoder(weights, bbox_xform_clip).decode_single``.

    Args:
        rel_codes: ``[N, 4 * K]`` deltas ``(dx, dy, dw, dh)`` per box and class, float16/bfloat16/float32/float64.
        boxes: ``[N, 4]`` reference boxes (anchors or proposals; integer boxes too), converted to ``rel_codes``'
            dtype first.
        weights: ``(wx, wy, ww, wh)`` (a sequence or a 4-element tensor), finite and > 0; deltas are divided by
            them.
        bbox_xform_clip: ``dw`` and ``dh`` are clamped to at most this before the exponential.

    Returns:
        ``[N, 4 * K]`` boxes ``(x1, y1, x2, y2)`` of ``rel_codes``' dtype, equal to torchvision's to the bit on
        the same device (zero-size boxes give inf/NaN exactly as there). One fused pass; threads over rows.
        Differentiable (torchvision's gradients).
    """
    if not torch.jit.is_scripting():
        weights, bbox_xform_clip = _weights(weights), _number(bbox_xform_clip, "bbox_xform_clip")
        if _portable.exporting_to_onnx():
            return _portable.decode_boxes(rel_codes, boxes, weights, bbox_xform_clip)
    if _is_integer(boxes):
        boxes = boxes.to(rel_codes.dtype)
    return torch.ops.rpn_ops.decode_boxes(rel_codes, boxes, [weights[0], weights[1], weights[2], weights[3]],
                                          bbox_xform_clip)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: Tuple[float, float, float, float]) -> Tensor:
    """Regression targets of ``reference_boxes`` (e.g. matched ground truth) relative to ``proposals``
    (e.g. anchors), as torchvision's ``encode_boxes`` / ``BoxCoder.encode_single``.

    Args:
        reference_boxes: ``[N, 4]`` boxes; the weights are rounded to their dtype, as torchvision does.
        proposals: ``[N, 4]`` boxes; may have another floating dtype (PyTorch's promotion decides the result's).
        weights: ``(wx, wy, ww, wh)``: a sequence or a 4-element tensor, finite and > 0.

    Returns:
        ``[N, 4]`` targets ``(dx, dy, dw, dh)``, equal to torchvision's to the bit on the same device.
        Differentiable (torchvision's gradients).
    """
    if not torch.jit.is_scripting():
        weights = _weights(weights)
        if _portable.exporting_to_onnx():
            return _portable.encode_boxes(reference_boxes, proposals, weights)
    return torch.ops.rpn_ops.encode_boxes(reference_boxes, proposals, [weights[0], weights[1], weights[2], weights[3]])


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, Tensor) and value.numel() == 1
    ):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _weights(weights) -> Tuple[float, float, float, float]:
    if isinstance(weights, Tensor):
        if weights.numel() != 4:
            raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got shape {tuple(weights.shape)}")
        return tuple(float(w) for w in weights.reshape(-1).tolist())
    if not isinstance(weights, (list, tuple)) or len(weights) != 4:
        raise ValueError(f"weights must hold 4 numbers (wx, wy, ww, wh), got {weights!r}")
    return tuple(_number(w, "each weight") for w in weights)


def _count_arg(value, name: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _pairs(values, name: str) -> List[List[int]]:
    """(y, x) pairs of ints (or 0-dim integer tensors), checked and converted."""
    for level, pair in enumerate(values):
        if len(pair) != 2:
            raise ValueError(f"{name}[{level}] must be a pair (y, x), got {pair!r}")
    return [[_count_arg(v, f"{name}[{level}]") for v in pair] for level, pair in enumerate(values)]
