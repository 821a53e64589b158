"""The operators in PyTorch operators (and torchvision's nms), for graphs that cannot hold rpn_ops' kernels.

During ONNX export (``torch.onnx.export``, with either exporter) the wrappers and modules record these instead of
rpn_ops' operators, so that the ONNX graph holds only standard ONNX operators (NonMaxSuppression, TopK,
elementwise) and runs without rpn_ops: the graph torchvision's own modules export, from the same steps.
``torch.jit.trace`` records the anchors from here too: it traces the feature maps' sizes as tensors, which the
anchor kernel takes as integers, so the traced model stays correct for other image sizes.

Results are torchvision's: the kernels' results, except the order of equal scores (ONNX's NonMaxSuppression decides
it) and float16 / bfloat16 IoU (torchvision subtracts corners in half precision, the kernels in float32).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference

try:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
except ImportError:  # torch < 2.7: sizes are never unknown where rpn_ops asks
    def guard_or_false(condition):
        return bool(condition)


try:  # torch >= 2.6: set while torch.onnx.export(dynamo=True) runs
    from torch.onnx._internal.exporter import _flags as _dynamo_onnx_export
except ImportError:
    _dynamo_onnx_export = None


def exporting_to_onnx() -> bool:
    """Whether torch.onnx.export is running, with either exporter. torch.export's strict capture (dynamo), which the
    default exporter falls back to, reads ``torch.onnx.is_in_onnx_export()`` as False, but reads the flag behind it."""
    if not torch.jit.is_scripting():
        return torch.onnx.is_in_onnx_export() or (
            _dynamo_onnx_export is not None and _dynamo_onnx_export._is_onnx_exporting)
    return False


def known_empty(t: Tensor) -> bool:
    """``t.numel() == 0``; where torch.export cannot tell (a size that depends on the data) False, which is right
    either way where it is asked: the code that follows handles empty tensors too."""
    return known_zero(t.numel())


def known_zero(count: int) -> bool:
    """``count == 0``, False where torch.export cannot tell (a count that depends on the data), as known_empty."""
    if not torch.jit.is_scripting():
        if not isinstance(count, Tensor):  # torch.jit.trace gives sizes as tensors
            return guard_or_false(count == 0)
    return bool(count == 0)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int]) -> Tensor:
    keep = torch.ops.torchvision.nms(boxes.float(), scores.float(), iou_threshold)
    if max_output is not None:
        keep = keep[:max_output]
    return keep


@torch.jit._script_if_tracing
def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_output: Optional[int]) -> Tensor:
    """torchvision's batched NMS for exporters (its coordinate trick: boxes offset per category, one NMS); scripted
    when traced, so that the emptiness check stays in the graph."""
    if known_empty(boxes):
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold, max_output)


def grid_anchors(cell_anchors: List[Tensor], grid_sizes, strides) -> Tensor:
    """All levels' anchors; sizes and strides may be traced 0-dim tensors."""
    return reference.grid_anchors(cell_anchors, grid_sizes, strides)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights: Tuple[float, float, float, float],
                 bbox_xform_clip: float) -> Tensor:
    return reference.decode_boxes(rel_codes, boxes, weights, bbox_xform_clip)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights: Tuple[float, float, float, float]) -> Tensor:
    return reference.encode_boxes(reference_boxes, proposals, weights)


def require_torchvision() -> None:
    """NMS is exported as torchvision's nms, which both ONNX exporters translate to ONNX's NonMaxSuppression."""
    try:
        import torchvision  # noqa: F401  (registers torchvision::nms and its ONNX translations)
    except ImportError as error:
        raise RuntimeError("ONNX export of rpn_ops' NMS needs torchvision installed: it is exported as torchvision's "
                           "nms, which the ONNX exporters translate to ONNX's NonMaxSuppression") from error
