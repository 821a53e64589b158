"""Box coding: a drop-in for torchvision's ``BoxCoder``, one fused kernel per call."""
import math
from typing import List, Tuple

import torch
from torch import Tensor

from . import _portable
from .ops import decode_boxes, encode_boxes


class BoxCoder:
    """Encodes boxes as regression targets and decodes deltas into boxes, as
    ``torchvision.models.detection._utils.BoxCoder``: same constructor, methods, output shapes and bits. It
    scripts, as a TorchScript class (torchvision's scripted models hold their box coder that way)."""

    def __init__(self, weights: Tuple[float, float, float, float], bbox_xform_clip: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: List[Tensor], proposals: List[Tensor]) -> List[Tensor]:
        boxes_per_image = [b.shape[0] for b in reference_boxes]
        targets = self.encode_single(_rows_of(reference_boxes), _rows_of(proposals))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
        if not torch.jit.is_scripting():
            if not isinstance(boxes, (list, tuple)):
                raise TypeError(f"boxes must be a list or tuple of tensors (one per image), got {type(boxes).__name__}")
            if not isinstance(rel_codes, Tensor):
                raise TypeError(f"rel_codes must be a tensor, got {type(rel_codes).__name__}")
        box_sum = 0
        for b in boxes:
            box_sum += b.shape[0]
        # torchvision reshapes unless there are no boxes; a box count that torch.export cannot know (proposals)
        # counts as not zero, and the reshape then also handles zero.
        nonempty = not _portable.known_zero(box_sum)
        if nonempty:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, _rows_of(boxes))
        if nonempty:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return decode_boxes(rel_codes, boxes, self.weights, self.bbox_xform_clip)


def _rows_of(tensors: List[Tensor]) -> Tensor:
    """torch.cat(tensors) without the copy when they already lie back to back in one buffer (the per-image
    anchors of rpn_ops.AnchorGenerator do)."""
    if len(tensors) == 1:
        return tensors[0]
    if not torch.jit.is_scripting():
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling() and _back_to_back(list(tensors)):
            first = tensors[0]
            return first.as_strided((sum(t.size(0) for t in tensors), first.size(1)), (first.size(1), 1))
    return torch.cat(tensors)


def _back_to_back(tensors: List[Tensor]) -> bool:
    if not tensors:
        return False
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
