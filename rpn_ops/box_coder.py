"""Box coding: a drop-in for torchvision's ``BoxCoder``, one fused kernel per call."""
import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .ops import decode_boxes, encode_boxes


class BoxCoder:
    """Encodes boxes as regression targets and decodes deltas into boxes, as
    ``torchvision.models.detection._utils.BoxCoder``: same constructor, methods, output shapes and bits."""

    def __init__(self, weights: Tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: List[Tensor], proposals: List[Tensor]) -> Tuple[Tensor, ...]:
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(_rows_of(reference_boxes), _rows_of(proposals))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"boxes must be a list or tuple of tensors (one per image), got {type(boxes).__name__}")
        if not isinstance(rel_codes, Tensor):
            raise TypeError(f"rel_codes must be a tensor, got {type(rel_codes).__name__}")
        box_sum = sum(b.size(0) for b in boxes)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, _rows_of(boxes))
        if box_sum > 0:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return decode_boxes(rel_codes, boxes, self.weights, self.bbox_xform_clip)


def _rows_of(tensors: Sequence[Tensor]) -> Tensor:
    """torch.cat(tensors) without the copy when they already lie back to back in one buffer (the per-image
    anchors of rpn_ops.AnchorGenerator do)."""
    tensors = list(tensors)
    if len(tensors) == 1:
        return tensors[0]
    if not tensors or torch.compiler.is_compiling() or not _back_to_back(tensors):
        return torch.cat(tensors)
    first = tensors[0]
    return first.as_strided((sum(t.size(0) for t in tensors), first.size(1)), (first.size(1), 1))


def _back_to_back(tensors: List[Tensor]) -> bool:
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    expected = first.data_ptr()
    for t in tensors:
        if (t.dim() != 2 or t.requires_grad or not t.is_contiguous() or t.dtype != first.dtype
                or t.device != first.device or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != storage or t.data_ptr() != expected):
            return False
        expected += t.numel() * t.element_size()
    return True
