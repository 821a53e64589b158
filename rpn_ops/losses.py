"""Losses of dense detectors without their one-hot targets: RetinaNet's sigmoid focal loss from one class label per
anchor, forward and backward in one pass each."""
from typing import List

import torch
from torch import Tensor

from . import _autograd, _meta, _portable  # noqa: F401  (the gradient and the fake kernel torch.compile uses)
from .ops import _number

IGNORED = -2  # torchvision's Matcher.BETWEEN_THRESHOLDS


def dense_focal_loss(class_logits: Tensor, anchor_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per image, torchvision's ``sigmoid_focal_loss(logits, one_hot_targets, alpha, gamma, reduction="sum")`` over
    the anchors that are not ignored, without the one-hot ``[A, C]`` target, the copies of the valid rows or the
    ten intermediate tensors: one pass over the logits forward, one backward, sums accumulated in float64.

    Args:
        class_logits: ``[B, A, C]`` class logits (RetinaNet's ``head_outputs["cls_logits"]``), any floating dtype.
        anchor_labels: ``[B, A]`` int64, per anchor its class ``c`` in ``[0, C)`` (target 1 at ``c``, 0 elsewhere),
            ``-1`` for background (target 0 everywhere) or ``-2`` to ignore it: :func:`anchor_labels` builds it
            from a matcher's indices.
        alpha: weight of the positive targets in ``[0, 1]`` (negatives: ``1 - alpha``), or ``-1`` for none.
        gamma: exponent of the modulating factor ``(1 - p_t)``.

    Returns:
        ``[B]`` loss sums, in the logits' dtype (float32 under autocast, as ``binary_cross_entropy_with_logits``).
        They equal torchvision's to float32 rounding: the summation order differs (float64 here). Differentiable
        with respect to ``class_logits`` (an analytic gradient; not differentiable twice). ``NaN`` or infinite
        logits give what torchvision gives: ``NaN`` or infinite sums.

    Example:
        >>> labels = rpn_ops.anchor_labels(matched_idxs, [t["labels"] for t in targets])
        >>> per_image = rpn_ops.dense_focal_loss(head_outputs["cls_logits"], labels)
        >>> loss = (per_image / (labels >= 0).sum(1).clamp(min=1)).mean()  # RetinaNet's classification loss
    """
    if not torch.jit.is_scripting():
        for value, name in ((class_logits, "class_logits"), (anchor_labels, "anchor_labels")):
            if not isinstance(value, Tensor):
                raise TypeError(f"dense_focal_loss: {name} must be a tensor, got {type(value).__name__}")
        alpha, gamma = _number(alpha, "alpha"), _number(gamma, "gamma")
        if _portable.exporting_to_onnx():
            raise RuntimeError("dense_focal_loss has no ONNX form: it is a training loss (export the model in eval "
                               "mode)")
    return torch.ops.rpn_ops.dense_focal_loss(class_logits, anchor_labels, float(alpha), float(gamma))


def anchor_labels(matched_idxs: List[Tensor], gt_labels: List[Tensor]) -> Tensor:
    """``[B, A]`` labels for :func:`dense_focal_loss` from a matcher's per-image indices (``>= 0``: the matched
    ground-truth box, ``-1`` below the low threshold, ``-2`` between the thresholds; torchvision's ``Matcher``) and
    each image's ground-truth class labels."""
    if len(matched_idxs) != len(gt_labels):
        raise ValueError(f"anchor_labels: one ground-truth label tensor per image is needed, got {len(gt_labels)} for "
                         f"{len(matched_idxs)} images")
    if not matched_idxs:
        return torch.zeros((0, 0), dtype=torch.int64)
    rows = []
    for matched, labels in zip(matched_idxs, gt_labels):
        matched = matched.to(torch.int64)
        if labels.numel() == 0:
            rows.append(matched)
        else:
            rows.append(torch.where(matched >= 0, labels.to(torch.int64)[matched.clamp(min=0)], matched))
    return torch.stack(rows)
