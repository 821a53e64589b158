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
    if max_output is not None:
        torch._check(max_output >= 0, lambda: f"max_output must be None or >= 0, got {max_output}")
    count = boxes.shape[0]
    if max_output == 0 or (isinstance(count, int) and count == 0):
        return boxes.new_empty((0,), dtype=torch.int64)
    ctx = torch.library.get_ctx()
    if isinstance(count, int):  # a static bound helps the compiler
        kept = ctx.new_dynamic_size(max=count if max_output is None else min(count, max_output))
    else:
        kept = ctx.new_dynamic_size()
        torch._check(kept <= count)
        if max_output is not None:
            torch._check(kept <= max_output)
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
    try:
        batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError as error:
        raise RuntimeError(f"the batch dimensions of boxes1 {list(boxes1.shape)} and boxes2 "
                           f"{list(boxes2.shape)} do not broadcast") from error
    return boxes1.new_empty((*batch, boxes1.shape[-2], boxes2.shape[-2]), dtype=_compute_dtype(boxes1.dtype))
