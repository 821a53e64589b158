"""Target assignment for training an RPN: anchors matched to ground truth without the [G, A] IoU matrix,
labels and regression targets in one call per batch, and the balanced sampler of torchvision's RPN."""
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .box_coder import _rows_of
from .ops import _number, _weights, encode_boxes

GroundTruth = Union[Tensor, Mapping[str, Tensor]]


def match_anchors(
    gt_boxes: Union[Tensor, Sequence[Tensor]],
    anchors: Union[Tensor, Sequence[Tensor]],
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    allow_low_quality_matches: bool = True,
) -> Union[Tensor, List[Tensor]]:
    """Each anchor's ground-truth box, exactly ``Matcher(high_threshold, low_threshold,
    allow_low_quality_matches)(box_iou(gt_boxes, anchors))`` of torchvision, in memory O(anchors + boxes).

    Args:
        gt_boxes: ``[G, 4]`` ground-truth boxes ``(x1, y1, x2, y2)`` (G >= 1, finite), or a list of them,
            one per image.
        anchors: ``[A, 4]`` anchors (A >= 1, finite; any floating dtype), or a list, one per image.
        high_threshold, low_threshold: ``0 <= low <= high``; compared with the IoU in its dtype, as Matcher.
        allow_low_quality_matches: every anchor reaching some box's highest IoU (ties included) keeps its own
            best box even below ``low_threshold``.

    Returns:
        int64 ``[A]`` (a list for lists): the best box's index (ties: the lowest index), -1 below
        ``low_threshold``, -2 between the thresholds. All images of a list are matched in one call.
    """
    batched = isinstance(gt_boxes, (list, tuple))
    if batched != isinstance(anchors, (list, tuple)):
        raise TypeError("gt_boxes and anchors must both be tensors or both be lists (one entry per image)")
    gt_list, anchor_list = (list(gt_boxes), list(anchors)) if batched else ([gt_boxes], [anchors])
    _check_lists(gt_list, anchor_list, batched)
    anchor_counts = [a.shape[0] for a in anchor_list]
    matches = torch.ops.rpn_ops.match_anchors.default(
        _rows_of(gt_list), _rows_of(anchor_list), [g.shape[0] for g in gt_list], anchor_counts,
        _number(high_threshold, "high_threshold"), _number(low_threshold, "low_threshold"),
        bool(allow_low_quality_matches))
    return list(matches.split(anchor_counts)) if batched else matches


def assign_targets(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[GroundTruth],
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    allow_low_quality_matches: bool = True,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Labels, matched boxes and regression targets of every anchor of a batch, exactly as torchvision's
    ``RegionProposalNetwork.assign_targets_to_anchors`` followed by its ``box_coder.encode``, in one call.

    Args:
        anchors: per image, ``[A_i, 4]`` anchors (as ``AnchorGenerator`` returns them).
        gt_boxes: per image, ``[G_i, 4]`` ground-truth boxes, or a target dict with a ``"boxes"`` entry. An image
            may have none: its anchors are all background, as in torchvision.
        fg_iou_thresh, bg_iou_thresh: the Matcher's high and low thresholds.
        allow_low_quality_matches: as in :func:`match_anchors`.
        weights: the box coder's ``(wx, wy, ww, wh)``.

    Returns:
        ``(labels, matched_gt_boxes, regression_targets)``, lists with one tensor per image: labels float32
        ``[A_i]`` (1 foreground, 0 background, -1 ignored), matched boxes ``[A_i, 4]`` (float32 zeros for an
        image without ground truth), regression targets ``[A_i, 4]``, to the bit as torchvision's.
    """
    anchor_list, gt_list = list(anchors), [_boxes_of(g) for g in gt_boxes]
    _check_lists(gt_list, anchor_list)
    if not anchor_list:
        return [], [], []
    nonempty = [g for g in gt_list if g.numel() > 0]
    dtypes = {g.dtype for g in nonempty}
    if len(dtypes) > 1:
        raise TypeError(f"the ground-truth boxes of all images must have one dtype, got {sorted(map(str, dtypes))}")
    gt_dtype = nonempty[0].dtype if nonempty else torch.float32
    device = anchor_list[0].device
    gt_rows = _rows_of(nonempty) if nonempty else torch.zeros(0, 4, device=device)
    anchor_rows, anchor_counts = _rows_of(anchor_list), [a.shape[0] for a in anchor_list]
    weights = _weights(weights)
    labels, matched, targets = torch.ops.rpn_ops.assign_targets.default(
        gt_rows, anchor_rows, [g.shape[0] for g in gt_list], anchor_counts,
        _number(fg_iou_thresh, "fg_iou_thresh"), _number(bg_iou_thresh, "bg_iou_thresh"),
        bool(allow_low_quality_matches), weights)
    matched_list = [m if g.numel() > 0 or m.dtype == torch.float32 else m.float()  # torchvision's zeros: float32
                    for m, g in zip(matched.split(anchor_counts), gt_list)]
    if torch.promote_types(gt_dtype, torch.float32) != gt_dtype and len(nonempty) < len(gt_list):
        # torchvision encodes the concatenation of the matched boxes, where the float32 zeros of an image without
        # ground truth promote the float16 / bfloat16 boxes of the others.
        targets = encode_boxes(torch.cat(matched_list), anchor_rows, weights)
    return list(labels.split(anchor_counts)), matched_list, list(targets.split(anchor_counts))


class BalancedPositiveNegativeSampler:
    """torchvision's ``BalancedPositiveNegativeSampler``: per image, up to ``batch_size_per_image *
    positive_fraction`` random positives (label >= 1) and negatives (label 0) to fill the rest.

    With the same random state it draws exactly the samples torchvision draws (the same ``torch.randperm``
    calls, in the same order), so a training step is reproducible across the two. ``generator`` (optional)
    is passed to ``torch.randperm``; it must be on the labels' device.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float,
                 generator: Optional[torch.Generator] = None) -> None:
        if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) \
                or batch_size_per_image < 0:
            raise ValueError(f"batch_size_per_image must be an int >= 0, got {batch_size_per_image!r}")
        positive_fraction = _number(positive_fraction, "positive_fraction")
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.generator = generator

    def __call__(self, matched_idxs: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Args: per image, labels or matched indices ``[A_i]``. Returns per image uint8 masks ``[A_i]`` of
        the sampled positives and negatives."""
        positive_masks, negative_masks = [], []
        for labels in matched_idxs:
            if not isinstance(labels, Tensor) or labels.dim() != 1:
                raise ValueError("each image's labels must be a 1-D tensor, got "
                                 f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            positive_masks.append(self._mask(labels, positive, num_pos))
            negative_masks.append(self._mask(labels, negative, num_neg))
        return positive_masks, negative_masks

    def _mask(self, labels: Tensor, candidates: Tensor, count: int) -> Tensor:
        chosen = candidates[torch.randperm(candidates.numel(), device=candidates.device,
                                           generator=self.generator)[:count]]
        mask = torch.zeros_like(labels, dtype=torch.uint8)
        mask[chosen] = 1
        return mask


def _boxes_of(target: GroundTruth) -> Tensor:
    if isinstance(target, Mapping):
        if "boxes" not in target:
            raise KeyError("a target dict must hold the ground-truth boxes under 'boxes'")
        target = target["boxes"]
    if not isinstance(target, Tensor):
        raise TypeError(f"ground-truth boxes must be a tensor or a dict with 'boxes', got {type(target).__name__}")
    return target


def _check_lists(gt_list: List[Tensor], anchor_list: List[Tensor], batched: bool = True) -> None:
    if len(gt_list) != len(anchor_list):
        raise ValueError(f"one entry of ground truth per image of anchors is needed: {len(anchor_list)} images of "
                         f"anchors, {len(gt_list)} of ground truth")
    for name, tensors in (("gt_boxes", gt_list), ("anchors", anchor_list)):
        for i, t in enumerate(tensors):
            what = f"{name}[{i}]" if batched else name
            if not isinstance(t, Tensor):
                raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
            if t.dim() != 2 or t.shape[-1] != 4:
                if not (name == "gt_boxes" and t.numel() == 0):
                    raise ValueError(f"{what} must have shape [N, 4], got {tuple(t.shape)}")
