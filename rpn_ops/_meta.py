"""Fake (meta) kernels: output shapes and dtypes without computing, so torch.compile can trace the ops.

NMS output lengths depend on the data, so they are new dynamic sizes. The real kernels do all validation;
these check only what decides the output shape.
"""
import torch
from torch import Tensor


def _check_boxes(boxes: Tensor, name: str) -> None:
    torch._check(boxes.dim() == 2 and boxes.shape[-1] == 4,
                 lambda: f"{name} must have shape [N, 4], got {tuple(boxes.shape)}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nms_output(boxes: Tensor, max_output) -> Tensor:
    _check_boxes(boxes, "boxes")
    upper = boxes.shape[0] if max_output is None else min(boxes.shape[0], max_output)
    kept = torch.library.get_ctx().new_dynamic_size(max=upper) if not isinstance(upper, int) or upper > 0 else 0
    return boxes.new_empty((kept,), dtype=torch.int64)


@torch.library.register_fake("rpn_ops::nms")
def _nms_fake(boxes, scores, iou_threshold, max_output=None):
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: f"scores must have shape [N] matching boxes, got {tuple(scores.shape)}")
    return _nms_output(boxes, max_output)


@torch.library.register_fake("rpn_ops::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold, max_output=None):
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: f"scores must have shape [N] matching boxes, got {tuple(scores.shape)}")
    torch._check(idxs.dim() == 1 and idxs.shape[0] == boxes.shape[0],
                 lambda: f"idxs must have shape [N] matching boxes, got {tuple(idxs.shape)}")
    return _nms_output(boxes, max_output)


@torch.library.register_fake("rpn_ops::box_iou")
def _box_iou_fake(boxes1, boxes2):
    for boxes, name in ((boxes1, "boxes1"), (boxes2, "boxes2")):
        torch._check(boxes.dim() >= 2 and boxes.shape[-1] == 4,
                     lambda: f"{name} must have shape [..., N, 4], got {tuple(boxes.shape)}")
    batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    return boxes1.new_empty((*batch, boxes1.shape[-2], boxes2.shape[-2]), dtype=_compute_dtype(boxes1.dtype))
