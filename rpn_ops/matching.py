"""Target assignment for training an RPN: anchors matched to ground truth without the [G, A] IoU matrix,
labels and regression targets in one call per batch, and the balanced sampler of torchvision's RPN."""
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from .box_coder import _rows_of
from .ops import _number, _weights, encode_boxes


def match_anchors(
    gt_boxes: Union[Tensor, List[Tensor]],
    anchors: Union[Tensor, List[Tensor]],
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    allow_low_quality_matches: bool = True,
    force_best_anchors: bool = False,
) -> Union[Tensor, List[Tensor]]:
    """Each anchor's ground-truth box, exactly ``Matcher(high_threshold, low_threshold,
    allow_low_quality_matches)(box_iou(gt_boxes, anchors))`` of torchvision, in memory O(anchors + boxes); with
    ``force_best_anchors``, ``SSDMatcher(threshold)(box_iou(gt_boxes, anchors))`` for ``high_threshold =
    low_threshold = threshold`` and ``allow_low_quality_matches=False``.

    Args:
        gt_boxes: ``[G, 4]`` ground-truth boxes ``(x1, y1, x2, y2)`` (G >= 1, finite), or a list of them,
            one per image.
        anchors: ``[A, 4]`` anchors (A >= 1, finite; any floating dtype), or a list, one per image.
        high_threshold, low_threshold: ``0 <= low <= high``; compared with the IoU in its dtype, as Matcher.
        allow_low_quality_matches: every anchor reaching some box's highest IoU (ties included) keeps its own
            best box even below ``low_threshold``.
        force_best_anchors: then each box's first anchor of highest IoU (``iou.max(dim=1)``'s index) is matched
            to it, whatever the thresholds; where boxes share that anchor, the last box takes it (SSDMatcher's
            ``index_put`` on the CPU).

    Returns:
        int64 ``[A]`` (a list for lists): the best box's index (ties: the lowest index), -1 below
        ``low_threshold``, -2 between the thresholds. All images of a list are matched in one call.
    """
    if not torch.jit.is_scripting():
        batched = isinstance(gt_boxes, (list, tuple))
        if batched != isinstance(anchors, (list, tuple)):
            raise TypeError("gt_boxes and anchors must both be tensors or both be lists (one entry per image)")
        if batched:
            gt_boxes, anchors = list(gt_boxes), list(anchors)
        _check_lists(gt_boxes if batched else [gt_boxes], anchors if batched else [anchors], batched)
        high_threshold, low_threshold = _number(high_threshold, "high_threshold"), _number(low_threshold,
                                                                                           "low_threshold")
        allow_low_quality_matches, force_best_anchors = bool(allow_low_quality_matches), bool(force_best_anchors)
    if isinstance(gt_boxes, Tensor):
        assert isinstance(anchors, Tensor), "gt_boxes and anchors must both be tensors or both be lists"
        return torch.ops.rpn_ops.match_anchors(gt_boxes, anchors, [gt_boxes.shape[0]], [anchors.shape[0]],
                                               high_threshold, low_threshold, allow_low_quality_matches,
                                               force_best_anchors)
    assert not isinstance(anchors, Tensor), "gt_boxes and anchors must both be tensors or both be lists"
    anchor_counts = [a.shape[0] for a in anchors]
    matches = torch.ops.rpn_ops.match_anchors(
        _rows_of(gt_boxes), _rows_of(anchors), [g.shape[0] for g in gt_boxes], anchor_counts, high_threshold,
        low_threshold, allow_low_quality_matches, force_best_anchors)
    return list(matches.split(anchor_counts))


def match_fcos(
    gt_boxes: Union[Tensor, List[Tensor]],
    anchors: Union[Tensor, List[Tensor]],
    num_anchors_per_level: List[int],
    center_sampling_radius: float = 1.5,
) -> Union[Tensor, List[Tensor]]:
    """Each anchor's ground-truth box under FCOS's centre sampling, exactly the ``matched_idxs`` torchvision's
    ``FCOS.compute_loss`` computes, in memory O(anchors + boxes) (torchvision builds ``[A, G, 4]`` tensors).

    An anchor takes a box when its centre lies inside the box, within ``center_sampling_radius`` anchor sizes
    (``x2 - x1``) of the box's centre on both axes, and its largest distance to the box's sides is above 4 and below
    8 anchor sizes (no lower bound on the first level, no upper bound on the last). Of the boxes it takes, the
    smallest area wins, decided as torchvision decides it: the largest ``1e8 - area`` in the boxes' dtype (equal
    values: the lower index), and no box where that is below 1e-5.

    Args:
        gt_boxes: ``[G, 4]`` ground-truth boxes (finite; G may be 0), or a list of them, one per image.
        anchors: ``[A, 4]`` anchors of one image, the levels one after the other (finite; gt_boxes' dtype, float32
            or float64), or a list, one per image.
        num_anchors_per_level: anchors per level of each image (they sum to A). As in torchvision, a last level of
            0 anchors lifts the upper bound of every anchor (its slice ``[-0:]``).
        center_sampling_radius: FCOS's ``center_sampling_radius``.

    Returns:
        int64 ``[A]`` (a list for lists): the box's index, -1 for none. All images of a list in one call.
    """
    batched = isinstance(gt_boxes, (list, tuple))
    if not torch.jit.is_scripting():
        if batched != isinstance(anchors, (list, tuple)):
            raise TypeError("gt_boxes and anchors must both be tensors or both be lists (one entry per image)")
        if batched:
            gt_boxes, anchors = list(gt_boxes), list(anchors)
        _check_lists(gt_boxes if batched else [gt_boxes], anchors if batched else [anchors], batched)
        center_sampling_radius = _number(center_sampling_radius, "center_sampling_radius")
        num_anchors_per_level = _level_counts(num_anchors_per_level)
    gt_list = gt_boxes if isinstance(gt_boxes, list) else [gt_boxes]
    anchor_list = anchors if isinstance(anchors, list) else [anchors]
    anchor_counts = [a.shape[0] for a in anchor_list]
    last_level = num_anchors_per_level[-1] if len(num_anchors_per_level) > 0 else 0
    matches = torch.ops.rpn_ops.match_fcos(
        _rows_of([g.reshape(-1, 4) for g in gt_list]), _rows_of(anchor_list), [g.reshape(-1, 4).shape[0] for g in gt_list],
        anchor_counts, num_anchors_per_level, center_sampling_radius)
    if not batched:
        return matches
    return list(matches.split(anchor_counts))


def assign_targets(
    anchors: List[Tensor],
    gt_boxes: Union[List[Tensor], List[Dict[str, Tensor]]],
    fg_iou_thresh: float = 0.7,
    bg_iou_thresh: float = 0.3,
    allow_low_quality_matches: bool = True,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
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
        image without ground truth), regression targets ``[A_i, 4]``, to the bit as torchvision's. Matched boxes
        and targets are differentiable with respect to the ground truth and anchors (torchvision's gradients).
    """
    if torch.jit.is_scripting():
        if torch.jit.isinstance(gt_boxes, List[Dict[str, Tensor]]):
            gt_list = [target["boxes"] for target in gt_boxes]
        else:
            assert torch.jit.isinstance(gt_boxes, List[Tensor])
            gt_list = gt_boxes
    else:
        anchors, gt_list = list(anchors), [_boxes_of(g) for g in gt_boxes]
        _check_lists(gt_list, anchors)
        fg_iou_thresh, bg_iou_thresh = _number(fg_iou_thresh, "fg_iou_thresh"), _number(bg_iou_thresh,
                                                                                        "bg_iou_thresh")
        allow_low_quality_matches, weights = bool(allow_low_quality_matches), _weights(weights)
        _check_one_dtype(gt_list)
    empty: List[Tensor] = []
    if len(anchors) == 0:
        return empty, empty, empty
    nonempty: List[Tensor] = []
    for g in gt_list:
        if g.numel() > 0:
            nonempty.append(g)
    device = anchors[0].device
    gt_rows = _rows_of(nonempty) if len(nonempty) > 0 else torch.zeros(0, 4, device=device)
    anchor_rows, anchor_counts = _rows_of(anchors), [a.shape[0] for a in anchors]
    labels, matched, targets = torch.ops.rpn_ops.assign_targets(
        gt_rows, anchor_rows, [g.shape[0] if g.numel() > 0 else 0 for g in gt_list], anchor_counts, fg_iou_thresh,
        bg_iou_thresh, allow_low_quality_matches, [weights[0], weights[1], weights[2], weights[3]])
    matched_list = list(matched.split(anchor_counts))
    for i, g in enumerate(gt_list):
        if g.numel() == 0 and matched_list[i].dtype != torch.float32:  # torchvision's zeros are float32
            matched_list[i] = matched_list[i].float()
    if len(nonempty) < len(gt_list) and torch.promote_types(gt_rows.dtype, torch.float32) != gt_rows.dtype:
        # torchvision encodes the concatenation of the matched boxes, where the float32 zeros of an image without
        # ground truth promote the float16 / bfloat16 boxes of the others.
        targets = encode_boxes(torch.cat(matched_list), anchor_rows, weights)
    return list(labels.split(anchor_counts)), matched_list, list(targets.split(anchor_counts))


class BalancedPositiveNegativeSampler:
    """torchvision's ``BalancedPositiveNegativeSampler``: per image, up to ``batch_size_per_image *
    positive_fraction`` random positives (label >= 1) and negatives (label 0) to fill the rest.

    With the same random state it draws exactly the samples torchvision draws (the same ``torch.randperm``
    calls, in the same order), so a training step is reproducible across the two. ``generator`` (optional)
    is passed to ``torch.randperm``; it must be on the labels' device. It scripts, as a TorchScript class.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float,
                 generator: Optional[torch.Generator] = None) -> None:
        if not torch.jit.is_scripting():
            positive_fraction = _checked_sampler_settings(batch_size_per_image, positive_fraction)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.generator = generator

    def __call__(self, matched_idxs: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Args: per image, labels or matched indices ``[A_i]``. Returns per image uint8 masks ``[A_i]`` of
        the sampled positives and negatives."""
        positive_masks: List[Tensor] = []
        negative_masks: List[Tensor] = []
        for labels in matched_idxs:
            if not torch.jit.is_scripting():
                _check_labels(labels)
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


def _level_counts(num_anchors_per_level) -> List[int]:
    if not isinstance(num_anchors_per_level, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in num_anchors_per_level):
        raise TypeError(f"num_anchors_per_level must be a list of ints >= 0, got {num_anchors_per_level!r}")
    return list(num_anchors_per_level)


def _checked_sampler_settings(batch_size_per_image, positive_fraction) -> float:
    if isinstance(batch_size_per_image, bool) or not isinstance(batch_size_per_image, int) or batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be an int >= 0, got {batch_size_per_image!r}")
    positive_fraction = _number(positive_fraction, "positive_fraction")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    return positive_fraction


def _check_labels(labels) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ValueError("each image's labels must be a 1-D tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")


def _boxes_of(target: Union[Tensor, Mapping[str, Tensor]]) -> Tensor:
    if isinstance(target, Mapping):
        if "boxes" not in target:
            raise KeyError("a target dict must hold the ground-truth boxes under 'boxes'")
        target = target["boxes"]
    if not isinstance(target, Tensor):
        raise TypeError(f"ground-truth boxes must be a tensor or a dict with 'boxes', got {type(target).__name__}")
    return target


def _check_one_dtype(gt_list: List[Tensor]) -> None:
    dtypes = {g.dtype for g in gt_list if g.numel() > 0}
    if len(dtypes) > 1:
        raise TypeError(f"the ground-truth boxes of all images must have one dtype, got {sorted(map(str, dtypes))}")


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
