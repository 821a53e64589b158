"""torchvision detection models with rpn_ops inside: same parameters, same outputs and losses, less time.

``patch_torchvision(model)`` swaps a Faster / Mask / Keypoint R-CNN's region proposal network for
:class:`RegionProposalNetwork` (torchvision's class with rpn_ops' anchors, target assignment, sampler, decode and
NMS) and its ROI heads for :class:`RoIHeads` (rpn_ops' box coder and NMS). ``patch_torchvision_ops()`` swaps
``torchvision.ops.nms`` / ``batched_nms`` / ``box_iou`` process-wide instead (opt-in, reversible).
"""
import math
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
import torchvision.ops.boxes as tv_boxes
from torch import Tensor, nn
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection import ssd as tv_ssd
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads as TorchvisionRoIHeads

from . import _portable
from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .detections import dense_detections
from .losses import IGNORED, anchor_labels, dense_focal_loss
from .matching import BalancedPositiveNegativeSampler, assign_targets, match_anchors, match_fcos
from .ops import batched_nms, box_iou, nms, score_candidates
from .proposals import proposal_lists

_BOX_CODERS = (BoxCoder, tv_det_utils.BoxCoder)


def _our_anchor_generator(generator: nn.Module) -> nn.Module:
    """rpn_ops' AnchorGenerator for torchvision's (same sizes, ratios and cell anchors); any other kept."""
    if type(generator) is not TorchvisionAnchorGenerator:
        return generator
    ours = AnchorGenerator(generator.sizes, generator.aspect_ratios)
    ours.cell_anchors = list(generator.cell_anchors)  # the same tensors, in the dtype / device they were left in
    ours.train(generator.training)
    return ours


def _our_box_coder(coder):
    if type(coder) is tv_det_utils.BoxCoder:
        return BoxCoder(coder.weights, coder.bbox_xform_clip)
    return coder


def _our_sampler(sampler):
    if type(sampler) is tv_det_utils.BalancedPositiveNegativeSampler:
        return BalancedPositiveNegativeSampler(sampler.batch_size_per_image, sampler.positive_fraction)
    return sampler


# torchvision's batched_nms runs NMS per class above this many box coordinates (boxes.numel()), NMS on
# class-offset boxes up to it; off the CPU the switch point moved from 20k to 100k in 0.22 (pytorch/vision#8925).
# (Functions, not constants: TorchScript reads no Python globals.)
if tuple(int(part) for part in torchvision.__version__.split(".")[:2]) >= (0, 22):
    def _per_class_nms_above(device: torch.device) -> int:
        return 4_000 if device.type == "cpu" else 100_000
else:
    def _per_class_nms_above(device: torch.device) -> int:
        return 4_000 if device.type == "cpu" else 20_000


def _batched_nms_in_torchvision_order(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms``'s result to the order of equal scores, with rpn_ops' NMS inside (the operator
    rpn_ops::batched_nms_torchvision_order, csrc/nms.cpp, says how). Exported to ONNX: torchvision's coordinate
    trick, which is what torchvision's own modules export."""
    if not torch.jit.is_scripting() and _portable.exporting_to_onnx():
        return batched_nms(boxes, scores, idxs, iou_threshold)
    return torch.ops.rpn_ops.batched_nms_torchvision_order(boxes, scores, idxs, iou_threshold,
                                                          _per_class_nms_above(boxes.device))


def _class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, nms_thresh: float, detections_per_img: int,
               torchvision_tie_order: bool) -> Tensor:
    """The detection heads' per-class NMS and their best ``detections_per_img``: in torchvision's order of equal
    scores, or (``torchvision_tie_order`` False) one rpn_ops.batched_nms call with early exit."""
    if torchvision_tie_order:
        return _batched_nms_in_torchvision_order(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return batched_nms(boxes, scores, labels, nms_thresh, detections_per_img)


def _joined(parts: List[Tensor], dim: int) -> Tensor:
    """``torch.cat(parts, dim)``, without a copy where the parts are consecutive views of one tensor, as the
    detection heads' split by level leaves them."""
    first = parts[0]
    size = list(first.shape)
    size[dim] = sum(part.shape[dim] for part in parts)
    offset = first.storage_offset()
    for part in parts:
        if (part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or part.stride() != first.stride()
                or part.storage_offset() != offset or part.dtype != first.dtype):
            return torch.cat(parts, dim)
        offset += part.shape[dim] * first.stride(dim)
    return first.as_strided(size, first.stride(), first.storage_offset())


def _fused_detections(model: nn.Module, class_logits: Tensor, box_regression: Tensor, anchors: List[Tensor],
                      num_anchors_per_level: List[int], image_shapes: List[Tuple[int, int]], activation: str,
                      topk_per: str, centerness: Optional[Tensor] = None) -> List[Dict[str, Tensor]]:
    """A one-stage model's detections from one :func:`rpn_ops.dense_detections` call with its settings."""
    coder = model.box_coder
    linear = isinstance(coder, tv_det_utils.BoxLinearCoder)
    boxes, scores, labels = dense_detections(
        class_logits, box_regression, anchors, image_shapes, num_anchors_per_level, model.score_thresh,
        model.topk_candidates, model.nms_thresh, model.detections_per_img,
        (1.0, 1.0, 1.0, 1.0) if linear else coder.weights,
        math.log(1000.0 / 16) if linear else coder.bbox_xform_clip, activation, topk_per, centerness,
        "linear" if linear else "deltas")
    return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]


def _fusable(model: nn.Module) -> bool:
    """Whether the model's detections may come from rpn_ops.dense_detections: its fast form asked for
    (``torchvision_tie_order`` False), eager or compiled (not traced or exported: the op's outputs have data-dependent
    sizes), and a box coder it computes (BoxCoder, or FCOS's BoxLinearCoder(normalize_by_size=True))."""
    coder = model.box_coder
    known_coder = isinstance(coder, _BOX_CODERS) or (type(coder) is tv_det_utils.BoxLinearCoder
                                                     and coder.normalize_by_size)
    return (not model.torchvision_tie_order and known_coder and not torch.jit.is_tracing()
            and not _portable.exporting_to_onnx())


def _selected_levels(top_n_idx: Tensor, num_anchors_per_level: List[int]) -> Tensor:
    """The feature-map level of each selected anchor index. Traced or exported to ONNX, where the level sizes are
    traced tensors, as torchvision's filter_proposals computes it (a level per anchor, then indexed)."""
    device = top_n_idx.device
    if not torch.jit.is_scripting() and (torch.jit.is_tracing() or _portable.exporting_to_onnx()):
        levels = [torch.full((n,), level, dtype=torch.int64, device=device)
                  for level, n in enumerate(num_anchors_per_level)]
        return torch.cat(levels)[top_n_idx]
    level_ends = torch.tensor(num_anchors_per_level, device=device).cumsum(0)
    return torch.searchsorted(level_ends, top_n_idx, right=True)


class RegionProposalNetwork(tv_rpn.RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` (same constructor, parameters, ``state_dict`` keys, configuration,
    proposals and losses) running on rpn_ops:

    - a torchvision ``AnchorGenerator`` becomes :class:`rpn_ops.AnchorGenerator` (same sizes and aspect ratios),
      the box coder :class:`rpn_ops.BoxCoder`, the sampler :class:`rpn_ops.BalancedPositiveNegativeSampler`;
    - training targets: one :func:`rpn_ops.assign_targets` call for the batch gives labels and regression targets
      (no ``[G, A]`` IoU matrix, no separate encode), bit-equal to ``assign_targets_to_anchors`` +
      ``box_coder.encode``;
    - proposals, with ``torchvision_tie_order = True`` (the default): torchvision's top-k selection per level,
      then rpn_ops decodes only the selected anchors (torchvision decodes all of them) and runs rpn_ops' NMS inside
      the calls torchvision's ``batched_nms`` makes around its own. The very proposals torchvision returns, in its
      order, even among equal scores (sigmoid rounds nearby logits to one float32; zero padding and half-precision
      heads give equal logits): the ROI heads sample proposals by position, so this is what keeps the training
      losses bit-identical;
    - proposals, with ``torchvision_tie_order = False``: one fused :func:`rpn_ops.generate_proposals` call for the
      batch (rpn_ops' own top-k, decode, clip, filters and NMS with early exit), the fastest form. It returns the
      same proposals wherever the objectness logits are distinct; where they tie exactly, its order (lower anchor
      index first) replaces torch.topk's unspecified one, which can change which of the tied anchors are kept;
    - box coder weights other than ``(1, 1, 1, 1)`` or a non-default clip (never the case in torchvision's models)
      or an overridden ``filter_proposals``: torchvision's decode of every anchor and its ``filter_proposals``.

    ``from_torchvision(rpn)`` converts an existing torchvision RPN, sharing its head.
    """

    __annotations__ = {"box_coder": BoxCoder, "proposal_matcher": tv_det_utils.Matcher,
                       "fg_bg_sampler": BalancedPositiveNegativeSampler}
    torchvision_tie_order = True

    def __init__(self, anchor_generator, head: nn.Module, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float, pre_nms_top_n: Dict[str, int],
                 post_nms_top_n: Dict[str, int], nms_thresh: float, score_thresh: float = 0.0) -> None:
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        self.anchor_generator = _our_anchor_generator(self.anchor_generator)
        self.box_coder = _our_box_coder(self.box_coder)
        self.fg_bg_sampler = _our_sampler(self.fg_bg_sampler)
        self.box_similarity = box_iou

    @classmethod
    def from_torchvision(cls, rpn: tv_rpn.RegionProposalNetwork) -> "RegionProposalNetwork":
        """Ours, configured as ``rpn`` and sharing its head (so its parameters and ``state_dict`` keys): anchor
        generator, box coder and sampler converted with their settings, thresholds, top-n, matcher, training mode
        and any other attribute carried over. ``rpn`` itself is left unchanged. Given one of ours, returns it."""
        if isinstance(rpn, cls):
            return rpn
        if not isinstance(rpn, tv_rpn.RegionProposalNetwork):
            raise TypeError(f"from_torchvision needs a torchvision RegionProposalNetwork, got {type(rpn).__name__}")
        if type(rpn) is not tv_rpn.RegionProposalNetwork:
            raise TypeError(f"cannot convert {type(rpn).__qualname__}, a subclass of torchvision's "
                            "RegionProposalNetwork: its overrides would be lost; convert torchvision's own class")
        ours = cls.__new__(cls)
        nn.Module.__init__(ours)
        for name, value in vars(rpn).items():
            if name not in ("_parameters", "_buffers", "_modules"):  # hooks, settings, training mode
                ours.__dict__[name] = value.copy() if isinstance(value, dict) else value
        ours._parameters = dict(rpn._parameters)
        ours._buffers = dict(rpn._buffers)
        ours._modules = dict(rpn._modules)  # the same head module: same parameters, same state_dict keys
        ours.anchor_generator = _our_anchor_generator(rpn.anchor_generator)
        ours.box_coder = _our_box_coder(rpn.box_coder)
        ours.fg_bg_sampler = _our_sampler(rpn.fg_bg_sampler)
        if rpn.box_similarity is tv_boxes.box_iou or rpn.box_similarity is torchvision.ops.box_iou:
            ours.box_similarity = box_iou
        return ours

    def _proposals_by_selection(self) -> bool:
        """Whether decoding only the top-k selected anchors computes what decode + filter_proposals would."""
        if not torch.jit.is_scripting():
            if not isinstance(self.box_coder, _BOX_CODERS) or (
                    type(self).filter_proposals is not tv_rpn.RegionProposalNetwork.filter_proposals):
                return False
        weights = self.box_coder.weights
        return (weights[0] == 1.0 and weights[1] == 1.0 and weights[2] == 1.0 and weights[3] == 1.0
                and self.box_coder.bbox_xform_clip == math.log(1000.0 / 16))

    def _fused_targets(self) -> bool:
        """Whether rpn_ops.assign_targets computes what assign_targets_to_anchors + box_coder.encode would (scripted:
        the box coder is rpn_ops', as the class annotates it)."""
        if not torch.jit.is_scripting():
            return (isinstance(self.box_coder, _BOX_CODERS)
                    and type(self).assign_targets_to_anchors is RegionProposalNetwork.assign_targets_to_anchors
                    and "assign_targets_to_anchors" not in self.__dict__)
        return True

    def assign_targets_to_anchors(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]
                                  ) -> Tuple[List[Tensor], List[Tensor]]:
        """Labels and matched boxes per image, as torchvision's, from one :func:`rpn_ops.assign_targets` call."""
        matcher = self.proposal_matcher
        labels, matched_gt_boxes, _ = assign_targets(anchors, targets, matcher.high_threshold,
                                                     matcher.low_threshold, matcher.allow_low_quality_matches)
        return labels, matched_gt_boxes

    def _proposals_in_torchvision_order(self, objectness: Tensor, pred_bbox_deltas: Tensor, anchors: List[Tensor],
                                        image_shapes: List[Tuple[int, int]], num_anchors_per_level: List[int]
                                        ) -> Tuple[List[Tensor], List[Tensor]]:
        """``filter_proposals`` of the decoded anchors, step for step, but decoding only the anchors its top-k
        selects and with rpn_ops' NMS: torchvision's proposals in torchvision's order (see the class docstring)."""
        num_images, device = len(anchors), objectness.device
        objectness = objectness.detach().reshape(num_images, -1)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # torch.topk's order of equal logits
        levels = _selected_levels(top_n_idx, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[batch_idx, top_n_idx])
        deltas = pred_bbox_deltas.detach().reshape(num_images, -1, 4)[batch_idx, top_n_idx]
        selected_anchors = torch.stack([anchors[i][top_n_idx[i]] for i in range(num_images)])
        proposals = self.box_coder.decode_single(deltas.reshape(-1, 4), selected_anchors.reshape(-1, 4))
        final_boxes: List[Tensor] = []
        final_scores: List[Tensor] = []
        for boxes, image_scores, image_levels, image_shape in zip(
                proposals.view(num_images, -1, 4), scores, levels, image_shapes):
            boxes = tv_boxes.clip_boxes_to_image(boxes, image_shape)
            keep = tv_boxes.remove_small_boxes(boxes, self.min_size)
            keep = keep[image_scores[keep] >= self.score_thresh]
            boxes, image_scores, image_levels = boxes[keep], image_scores[keep], image_levels[keep]
            keep = _batched_nms_in_torchvision_order(boxes, image_scores, image_levels, self.nms_thresh)
            keep = keep[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(image_scores[keep])
        return final_boxes, final_scores

    def forward(self, images: ImageList, features: Dict[str, Tensor],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """As torchvision's ``forward``: ``(proposals per image, losses)``, losses empty in eval mode."""
        features_list = list(features.values())
        objectness, pred_bbox_deltas = self.head(features_list)
        anchors = self.anchor_generator(images, features_list)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = tv_rpn.concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # Faster R-CNN does not backpropagate through the proposals: the deltas are detached.
        if not self._proposals_by_selection():
            proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
            boxes, scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        elif self.torchvision_tie_order or _portable.exporting_to_onnx():  # generate_proposals has no ONNX form
            boxes, scores = self._proposals_in_torchvision_order(
                objectness, pred_bbox_deltas, anchors, images.image_sizes, num_anchors_per_level)
        else:
            boxes, scores = proposal_lists(
                objectness, pred_bbox_deltas.detach(), anchors, images.image_sizes, num_anchors_per_level,
                self.pre_nms_top_n(), self.post_nms_top_n(), self.nms_thresh, self.score_thresh, self.min_size)

        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            if self._fused_targets():
                matcher = self.proposal_matcher
                labels, _, regression_targets = assign_targets(
                    anchors, targets, matcher.high_threshold, matcher.low_threshold,
                    matcher.allow_low_quality_matches, self.box_coder.weights)
            else:
                labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
                regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses


class RoIHeads(TorchvisionRoIHeads):
    """torchvision's ``RoIHeads`` whose detections come from rpn_ops' box coder and NMS. ``patch_torchvision``
    switches a model's ``roi_heads`` to this class in place; parameters and ``state_dict`` keys are untouched.

    With ``torchvision_tie_order = True`` (the default) rpn_ops' NMS runs inside the calls torchvision's
    ``batched_nms`` makes around its own, so detections come in torchvision's order even among equal scores;
    with ``False``, one :func:`rpn_ops.batched_nms` call with early exit at ``detections_per_img`` (true per-class
    NMS, equal scores by lower index: the same detections, a deterministic order among equal scores)."""

    __annotations__ = {"box_coder": BoxCoder, "proposal_matcher": tv_det_utils.Matcher,
                       "fg_bg_sampler": tv_det_utils.BalancedPositiveNegativeSampler}
    torchvision_tie_order = True

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: List[Tensor],
                               image_shapes: List[Tuple[int, int]]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """torchvision's steps (decode, softmax, clip, one instance per non-background class, score and size
        filters, per-class NMS, the best ``detections_per_img``) with rpn_ops' decode and NMS."""
        num_classes = class_logits.shape[-1]
        boxes_per_image = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals)
        pred_scores = F.softmax(class_logits, -1)
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        for boxes, scores, image_shape in zip(pred_boxes.split(boxes_per_image, 0),
                                              pred_scores.split(boxes_per_image, 0), image_shapes):
            boxes = tv_boxes.clip_boxes_to_image(boxes, image_shape)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = tv_boxes.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = _class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img,
                              self.torchvision_tie_order)
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def _matched_idxs(anchors: List[Tensor], targets: List[Dict[str, Tensor]], matcher: tv_det_utils.Matcher,
                  force_best_anchors: bool = False) -> List[Tensor]:
    """Per image, ``matcher(box_iou(target boxes, anchors))`` as torchvision computes it (-1 everywhere for an
    image without boxes), from one :func:`rpn_ops.match_anchors` call for the batch: no ``[G, A]`` matrix.
    ``force_best_anchors``: the matcher is an ``SSDMatcher``."""
    matched: List[Tensor] = []
    gt_list: List[Tensor] = []
    anchor_list: List[Tensor] = []
    for anchors_per_image, targets_per_image in zip(anchors, targets):
        matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64, device=anchors_per_image.device))
        if targets_per_image["boxes"].numel() > 0:
            gt_list.append(targets_per_image["boxes"])
            anchor_list.append(anchors_per_image)
    if len(gt_list) == 0:
        return matched
    found = match_anchors(gt_list, anchor_list, matcher.high_threshold, matcher.low_threshold,
                          matcher.allow_low_quality_matches, force_best_anchors)
    assert isinstance(found, list)
    next_found = 0
    for image, targets_per_image in enumerate(targets):
        if targets_per_image["boxes"].numel() > 0:
            matched[image] = found[next_found]
            next_found += 1
    return matched


class RetinaNet(tv_retinanet.RetinaNet):
    """torchvision's ``RetinaNet`` (v1 and v2: same constructor, parameters, ``state_dict`` keys, settings,
    detections and losses) running on rpn_ops: its anchor generator and box coder become rpn_ops', the training
    targets come from one :func:`rpn_ops.match_anchors` call for the batch (torchvision's ``Matcher`` of a
    ``[G, A]`` IoU matrix per image, without the matrix), and the detections from
    :func:`rpn_ops.score_candidates` (no sigmoid of every class logit), rpn_ops' decode and NMS.
    ``patch_torchvision`` switches a model to this class in place.

    With ``torchvision_tie_order = True`` (the default) rpn_ops' NMS runs inside the calls torchvision's
    ``batched_nms`` makes around its own: the detections torchvision returns, in its order even among equal
    scores. With ``False``, one :func:`rpn_ops.dense_detections` call for the batch: the same detections, equal
    scores in a fixed order; and the classification loss from one :func:`rpn_ops.dense_focal_loss` call (no one-hot
    target), equal to torchvision's within float32 rounding (float64 sums instead of float32 ones). The regression
    head keeps torchvision's box coder: its loss backpropagates through it."""

    __annotations__ = {"box_coder": BoxCoder, "proposal_matcher": tv_det_utils.Matcher}
    torchvision_tie_order = True

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor]
                     ) -> Dict[str, Tensor]:
        if not torch.jit.is_scripting():
            if type(self.proposal_matcher) is not tv_det_utils.Matcher:  # another rule than Matcher's: torchvision's
                return tv_retinanet.RetinaNet.compute_loss(self, targets, head_outputs, anchors)
        matched_idxs = _matched_idxs(anchors, targets, self.proposal_matcher)
        if not torch.jit.is_scripting():
            if self._fused_loss():
                return {"classification": self._focal_loss(targets, head_outputs, matched_idxs),
                        "bbox_regression": self.head.regression_head.compute_loss(targets, head_outputs, anchors,
                                                                                  matched_idxs)}
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    @torch.jit.unused
    def _fused_loss(self) -> bool:
        """Whether the classification loss may come from rpn_ops.dense_focal_loss: the fast form asked for, on
        torchvision's classification head (not a subclass, whose loss may differ), not traced or exported."""
        head = self.head.classification_head
        return (not self.torchvision_tie_order and type(head) is tv_retinanet.RetinaNetClassificationHead
                and head.BETWEEN_THRESHOLDS == IGNORED and not torch.jit.is_tracing()
                and not _portable.exporting_to_onnx())

    @torch.jit.unused
    def _focal_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                    matched_idxs: List[Tensor]) -> Tensor:
        """RetinaNetClassificationHead.compute_loss with one dense_focal_loss call for the batch: per image, the focal
        loss summed over the anchors not between thresholds, divided by its foreground count (at least 1); then the
        mean over images."""
        labels = anchor_labels(matched_idxs, [t["labels"] for t in targets])
        per_image = dense_focal_loss(head_outputs["cls_logits"], labels)
        return (per_image / (labels >= 0).sum(1).clamp(min=1)).sum() / len(targets)

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """torchvision's steps per image and level (sigmoid scores above ``score_thresh``, the best
        ``topk_candidates``, decode of those, clip), then per-class NMS and the best ``detections_per_img``,
        with rpn_ops' decode and NMS; with ``torchvision_tie_order`` False, one :func:`rpn_ops.dense_detections`
        call."""
        class_logits = head_outputs["cls_logits"]
        box_regression = head_outputs["bbox_regression"]
        if not torch.jit.is_scripting():
            if _fusable(self):
                return self._dense_detections(class_logits, box_regression, anchors, image_shapes)
        detections: List[Dict[str, Tensor]] = []
        for index in range(len(image_shapes)):
            image_boxes: List[Tensor] = []
            image_scores: List[Tensor] = []
            image_labels: List[Tensor] = []
            for box_regression_per_level, logits_per_level, anchors_per_level in zip(
                    [br[index] for br in box_regression], [cl[index] for cl in class_logits], anchors[index]):
                num_classes = logits_per_level.shape[-1]
                scores_per_level, topk_idxs = score_candidates(logits_per_level, self.score_thresh)
                num_topk = tv_det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
                scores_per_level, idxs = scores_per_level.topk(num_topk)
                topk_idxs = topk_idxs[idxs]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                boxes_per_level = self.box_coder.decode_single(box_regression_per_level[anchor_idxs],
                                                               anchors_per_level[anchor_idxs])
                image_boxes.append(tv_boxes.clip_boxes_to_image(boxes_per_level, image_shapes[index]))
                image_scores.append(scores_per_level)
                image_labels.append(topk_idxs % num_classes)
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            keep = _class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img,
                              self.torchvision_tie_order)
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    @torch.jit.unused
    def _dense_detections(self, class_logits: List[Tensor], box_regression: List[Tensor],
                          anchors: List[List[Tensor]], image_shapes: List[Tuple[int, int]]
                          ) -> List[Dict[str, Tensor]]:
        per_level = [level.shape[1] for level in class_logits]
        return _fused_detections(self, _joined(class_logits, 1), _joined(box_regression, 1),
                                 [_joined(a, 0) for a in anchors], per_level, image_shapes, "sigmoid", "level")


def _centered_candidates(logits: Tensor, centerness: Tensor, score_thresh: float) -> Tuple[Tensor, Tensor]:
    """FCOS's candidates of one image's level as torchvision finds them: the scores of
    ``torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(centerness)).flatten()`` above ``score_thresh`` and their flat
    indices, the same tensors to the bit, without the product of every pair. ``sqrt(s * c) > t`` needs ``s > t^2``
    (``c <= 1``), so :func:`rpn_ops.score_candidates` finds the class scores above a bound under ``t^2`` (by more than
    the dtype's roundings), and only those are multiplied and rooted (PyTorch's sqrt computes each element alike)."""
    bound = score_thresh
    if score_thresh > 0.0 and score_thresh < 1.0:
        margin = 5e-2 if logits.element_size() == 2 else 1e-5
        bound = score_thresh * score_thresh * (1.0 - margin)
    class_scores, indices = score_candidates(logits, bound)
    center_scores = torch.sigmoid(centerness).flatten()
    scores = torch.sqrt(class_scores * center_scores[torch.div(indices, logits.shape[-1], rounding_mode="floor")])
    keep = scores > score_thresh
    return scores[keep], indices[keep]


def _class_candidates(boxes: Tensor, scores: Tensor, score_thresh: float, topk_candidates: int
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """SSD's candidates of one image, as torchvision's loop over the classes gives them: for each class from 1,
    its scores above ``score_thresh`` (anchor order), their best ``topk_candidates`` (torch.topk of that very
    tensor, so equal scores come in its order), with their boxes and labels, the classes one after the other.

    Here one comparison over the scores and one ``nonzero`` of its transpose find every class's candidates in
    that order; a top-k per class remains. Traced or exported to ONNX, where the per-class counts would become constants:
    torchvision's loop."""
    num_classes = scores.shape[-1]
    if not torch.jit.is_scripting() and (torch.jit.is_tracing() or _portable.exporting_to_onnx()):
        image_boxes: List[Tensor] = []
        image_scores: List[Tensor] = []
        image_labels: List[Tensor] = []
        for label in range(1, num_classes):
            score = scores[:, label]
            keep_idxs = score > score_thresh
            score, box = score[keep_idxs], boxes[keep_idxs]
            score, idxs = score.topk(tv_det_utils._topk_min(score, topk_candidates, 0))
            image_boxes.append(box[idxs])
            image_scores.append(score)
            image_labels.append(torch.full_like(score, fill_value=label, dtype=torch.int64))
        return torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
    above = (scores[:, 1:] > score_thresh).t().nonzero()  # (class - 1, anchor), class by class, anchors in order
    anchor_idxs = above[:, 1]
    candidates = scores[anchor_idxs, above[:, 0] + 1]
    counts: List[int] = torch.bincount(above[:, 0], minlength=num_classes - 1).tolist()
    selected_scores: List[Tensor] = []
    selected: List[Tensor] = []
    labels: List[Tensor] = []
    start = 0
    for label, count in enumerate(counts, 1):
        score, idxs = candidates[start:start + count].topk(min(topk_candidates, count))
        selected_scores.append(score)
        selected.append(idxs + start)
        labels.append(torch.full_like(score, fill_value=label, dtype=torch.int64))
        start += count
    return boxes[anchor_idxs[torch.cat(selected)]], torch.cat(selected_scores), torch.cat(labels)


class SSD(tv_ssd.SSD):
    """torchvision's ``SSD`` (``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large`` or ``SSD(backbone, ...)``: same
    constructor, parameters, ``state_dict`` keys, settings, detections and losses) running on rpn_ops: the training
    matches come from one :func:`rpn_ops.match_anchors` call for the batch (``SSDMatcher`` of a ``[G, A]`` IoU
    matrix per image, without the matrix: ``force_best_anchors``), the detections from rpn_ops' decode, one pass
    that finds every class's candidates, and rpn_ops' NMS. ``patch_torchvision`` switches a model to this class in
    place. ``torchvision_tie_order`` as for :class:`RetinaNet`.

    A ``proposal_matcher`` other than torchvision's ``SSDMatcher`` or ``Matcher`` keeps torchvision's IoU matrix
    and matcher."""

    __annotations__ = {"box_coder": BoxCoder, "proposal_matcher": tv_det_utils.Matcher}
    torchvision_tie_order = True

    def _matched_idxs(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]) -> List[Tensor]:
        force_best_anchors = True  # scripted: the matcher SSD builds
        if not torch.jit.is_scripting():
            if type(self.proposal_matcher) not in (tv_det_utils.SSDMatcher, tv_det_utils.Matcher):
                return self._torchvision_matched_idxs(anchors, targets)
            force_best_anchors = type(self.proposal_matcher) is tv_det_utils.SSDMatcher
        return _matched_idxs(anchors, targets, self.proposal_matcher, force_best_anchors)

    @torch.jit.unused
    def _torchvision_matched_idxs(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]) -> List[Tensor]:
        matched_idxs: List[Tensor] = []
        for anchors_per_image, targets_per_image in zip(anchors, targets):
            if targets_per_image["boxes"].numel() == 0:
                matched_idxs.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                               device=anchors_per_image.device))
            else:
                iou = tv_boxes.box_iou(targets_per_image["boxes"], anchors_per_image)
                matched_idxs.append(self.proposal_matcher(iou))
        return matched_idxs

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """torchvision's ``forward``, step for step, with the training matches of :meth:`_matched_idxs`."""
        if self.training:
            if targets is None:
                torch._assert(False, "targets should not be none when in training mode")
            else:
                for target in targets:
                    boxes = target["boxes"]
                    if isinstance(boxes, torch.Tensor):
                        torch._assert(len(boxes.shape) == 2 and boxes.shape[-1] == 4,
                                      f"Expected target boxes to be a tensor of shape [N, 4], got {boxes.shape}.")
                    else:
                        torch._assert(False, f"Expected target boxes to be of type Tensor, got {type(boxes)}.")
        original_image_sizes: List[Tuple[int, int]] = []
        for img in images:
            val = img.shape[-2:]
            torch._assert(len(val) == 2, "expecting the last two dimensions of the Tensor to be H and W instead "
                                         f"got {img.shape[-2:]}")
            original_image_sizes.append((val[0], val[1]))
        images, targets = self.transform(images, targets)
        if targets is not None:
            for target_idx, target in enumerate(targets):
                boxes = target["boxes"]
                degenerate_boxes = boxes[:, 2:] <= boxes[:, :2]
                if degenerate_boxes.any():
                    bb_idx = torch.where(degenerate_boxes.any(dim=1))[0][0]
                    degen_bb: List[float] = boxes[bb_idx].tolist()
                    torch._assert(False, "All bounding boxes should have positive height and width."
                                         f" Found invalid box {degen_bb} for target at index {target_idx}.")
        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchor_generator(images, features)

        losses: Dict[str, Tensor] = {}
        detections: List[Dict[str, Tensor]] = []
        if self.training:
            if targets is None:
                torch._assert(False, "targets should not be none when in training mode")
            else:
                losses = self.compute_loss(targets, head_outputs, anchors, self._matched_idxs(anchors, targets))
        else:
            detections = self.postprocess_detections(head_outputs, anchors, images.image_sizes)
            detections = self.transform.postprocess(detections, images.image_sizes, original_image_sizes)
        if torch.jit.is_scripting():
            if not self._has_warned:
                warnings.warn("SSD always returns a (Losses, Detections) tuple in scripting")
                self._has_warned = True
            return losses, detections
        return self.eager_outputs(losses, detections)

    def postprocess_detections(self, head_outputs: Dict[str, Tensor], image_anchors: List[Tensor],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """torchvision's steps per image (softmax scores, decode and clip, per class the scores above
        ``score_thresh`` and their best ``topk_candidates``, per-class NMS, the best ``detections_per_img``), with
        rpn_ops' decode and NMS and the candidates of :func:`_class_candidates`; with ``torchvision_tie_order``
        False, one :func:`rpn_ops.dense_detections` call."""
        bbox_regression = head_outputs["bbox_regression"]
        if not torch.jit.is_scripting():
            if _fusable(self):
                return self._dense_detections(head_outputs, image_anchors, image_shapes)
        pred_scores = F.softmax(head_outputs["cls_logits"], dim=-1)
        detections: List[Dict[str, Tensor]] = []
        for boxes, scores, anchors, image_shape in zip(bbox_regression, pred_scores, image_anchors, image_shapes):
            boxes = tv_boxes.clip_boxes_to_image(self.box_coder.decode_single(boxes, anchors), image_shape)
            boxes, scores, labels = _class_candidates(boxes, scores, self.score_thresh, self.topk_candidates)
            keep = _class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img,
                              self.torchvision_tie_order)
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    @torch.jit.unused
    def _dense_detections(self, head_outputs: Dict[str, Tensor], image_anchors: List[Tensor],
                          image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]
        return _fused_detections(self, class_logits, head_outputs["bbox_regression"], image_anchors,
                                 [class_logits.shape[1]], image_shapes, "softmax", "class")


class FCOS(tv_fcos.FCOS):
    """torchvision's ``FCOS`` (same constructor, parameters, ``state_dict`` keys, settings, detections and losses)
    running on rpn_ops: its anchor generator becomes rpn_ops', the training matches come from one
    :func:`rpn_ops.match_fcos` call for the batch (torchvision's centre sampling without its ``[A, G, 4]``
    tensors), and the detections from rpn_ops' NMS. The box coder stays torchvision's ``BoxLinearCoder``.
    ``patch_torchvision`` switches a model to this class in place. ``torchvision_tie_order`` as for
    :class:`RetinaNet`. Ground truth of another dtype than the anchors', or other than float32 / float64, keeps
    torchvision's matching."""

    torchvision_tie_order = True

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor],
                     num_anchors_per_level: List[int]) -> Dict[str, Tensor]:
        if not torch.jit.is_scripting():
            if any(t["boxes"].dtype != a.dtype or a.dtype not in (torch.float32, torch.float64)
                   for t, a in zip(targets, anchors)):
                return tv_fcos.FCOS.compute_loss(self, targets, head_outputs, anchors, num_anchors_per_level)
        gt_list = [t["boxes"] for t in targets]
        matched_idxs = match_fcos(gt_list, anchors, num_anchors_per_level, self.center_sampling_radius)
        assert isinstance(matched_idxs, list)
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """torchvision's steps per image and level (``sqrt(sigmoid(class) * sigmoid(centerness))`` above
        ``score_thresh``, the best ``topk_candidates``, decode of those, clip), then per-class NMS and the best
        ``detections_per_img``, with rpn_ops' NMS; with ``torchvision_tie_order`` False, one
        :func:`rpn_ops.dense_detections` call."""
        if not torch.jit.is_scripting():
            if _fusable(self):
                return self._dense_detections(head_outputs, anchors, image_shapes)
        detections: List[Dict[str, Tensor]] = []
        for index in range(len(image_shapes)):
            image_boxes: List[Tensor] = []
            image_scores: List[Tensor] = []
            image_labels: List[Tensor] = []
            for box_regression_per_level, logits_per_level, box_ctrness_per_level, anchors_per_level in zip(
                    [br[index] for br in head_outputs["bbox_regression"]],
                    [cl[index] for cl in head_outputs["cls_logits"]],
                    [bc[index] for bc in head_outputs["bbox_ctrness"]], anchors[index]):
                num_classes = logits_per_level.shape[-1]
                scores_per_level, topk_idxs = _centered_candidates(logits_per_level, box_ctrness_per_level,
                                                                   self.score_thresh)
                num_topk = tv_det_utils._topk_min(topk_idxs, self.topk_candidates, 0)
                scores_per_level, idxs = scores_per_level.topk(num_topk)
                topk_idxs = topk_idxs[idxs]
                anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
                boxes_per_level = self.box_coder.decode(box_regression_per_level[anchor_idxs],
                                                        anchors_per_level[anchor_idxs])
                image_boxes.append(tv_boxes.clip_boxes_to_image(boxes_per_level, image_shapes[index]))
                image_scores.append(scores_per_level)
                image_labels.append(topk_idxs % num_classes)
            boxes, scores, labels = torch.cat(image_boxes), torch.cat(image_scores), torch.cat(image_labels)
            keep = _class_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img,
                              self.torchvision_tie_order)
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return detections

    @torch.jit.unused
    def _dense_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                          image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        class_logits = head_outputs["cls_logits"]
        per_level = [level.shape[1] for level in class_logits]
        return _fused_detections(self, _joined(class_logits, 1), _joined(head_outputs["bbox_regression"], 1),
                                 [_joined(a, 0) for a in anchors], per_level, image_shapes, "sigmoid", "level",
                                 _joined(head_outputs["bbox_ctrness"], 1))


def patch_torchvision(model: nn.Module, torchvision_tie_order: bool = True) -> nn.Module:
    """Puts rpn_ops inside a torchvision detection model, in place, and returns the model.

    ``model`` is a ``GeneralizedRCNN``-style model: Faster R-CNN (v1, v2, MobileNet, or ``FasterRCNN(backbone,
    ...)``), Mask R-CNN, Keypoint R-CNN, or any module whose ``rpn`` is torchvision's ``RegionProposalNetwork``.
    ``model.rpn`` becomes :class:`rpn_ops.RegionProposalNetwork` (sharing the head; a custom anchor generator
    is kept as it is), and ``model.roi_heads``, when it is torchvision's ``RoIHeads``, becomes
    :class:`rpn_ops.RoIHeads` (rpn_ops' box coder and NMS). Or ``model`` is a one-stage detector: a RetinaNet (v1
    or v2), an FCOS or an SSD (SSD300, SSDlite), which becomes :class:`rpn_ops.RetinaNet`, :class:`rpn_ops.FCOS` or
    :class:`rpn_ops.SSD`. Parameters, ``state_dict`` keys, configuration and training mode are unchanged.
    Patching twice is harmless.

    Args:
        torchvision_tie_order: ``True`` (default): detections, proposals and training losses equal the
            unpatched model's to the bit, the order of equal scores included. ``False``: the fastest form (one
            fused proposal call per batch, NMS with early exit); the same results except where objectness logits
            or detection scores tie exactly, where rpn_ops' deterministic order replaces torchvision's
            unspecified one (see :class:`RegionProposalNetwork`), and RetinaNet's classification loss, a fused
            focal loss equal to torchvision's within float32 rounding.

    Raises:
        TypeError: ``model`` is neither a RetinaNet, FCOS or SSD nor a module whose ``rpn`` is torchvision's
            ``RegionProposalNetwork``, or it (a one-stage model) or its ``rpn`` / ``roi_heads`` is a subclass of
            torchvision's class, whose overrides would be lost, or ``torchvision_tie_order`` is not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_torchvision needs a torchvision detection model (an nn.Module), got "
                        f"{type(model).__name__}")
    if not isinstance(torchvision_tie_order, bool):
        raise TypeError(f"torchvision_tie_order must be True or False, got {torchvision_tie_order!r}")
    for torchvision_class, ours in ((tv_retinanet.RetinaNet, RetinaNet), (tv_ssd.SSD, SSD), (tv_fcos.FCOS, FCOS)):
        if isinstance(model, torchvision_class):
            if type(model) not in (torchvision_class, ours):
                raise TypeError(f"patch_torchvision supports torchvision's {torchvision_class.__name__} class only; "
                                f"this model is {type(model).__qualname__}, a subclass whose overrides would be lost")
            model.anchor_generator = _our_anchor_generator(model.anchor_generator)
            model.box_coder = _our_box_coder(model.box_coder)  # FCOS's BoxLinearCoder: kept
            model.__class__ = ours
            model.torchvision_tie_order = torchvision_tie_order
            return model
    rpn = getattr(model, "rpn", None)
    if not isinstance(rpn, tv_rpn.RegionProposalNetwork):
        raise TypeError(f"patch_torchvision needs a RetinaNet, FCOS or SSD or a model whose .rpn is torchvision's "
                        f"RegionProposalNetwork (Faster / Mask / Keypoint R-CNN); {type(model).__name__}.rpn is "
                        f"{type(rpn).__name__ if rpn is not None else 'missing'}")
    if type(rpn) not in (tv_rpn.RegionProposalNetwork, RegionProposalNetwork):
        raise TypeError(f"patch_torchvision supports torchvision's RegionProposalNetwork only; this model has "
                        f"{type(rpn).__qualname__}, whose overrides would be lost")
    roi_heads = getattr(model, "roi_heads", None)
    if isinstance(roi_heads, TorchvisionRoIHeads) and type(roi_heads) not in (TorchvisionRoIHeads, RoIHeads):
        raise TypeError(f"patch_torchvision supports torchvision's RoIHeads only; this model has "
                        f"{type(roi_heads).__qualname__}, whose overrides would be lost")
    model.rpn = RegionProposalNetwork.from_torchvision(rpn)
    model.rpn.torchvision_tie_order = torchvision_tie_order
    if isinstance(roi_heads, TorchvisionRoIHeads):
        roi_heads.box_coder = _our_box_coder(roi_heads.box_coder)
        roi_heads.__class__ = RoIHeads
        roi_heads.torchvision_tie_order = torchvision_tie_order
    return model


class _TorchvisionOpsPatch:
    """The handle ``patch_torchvision_ops`` returns: ``with rpn_ops.patch_torchvision_ops(): ...`` unpatches
    on exit."""

    def __enter__(self) -> "_TorchvisionOpsPatch":
        return self

    def __exit__(self, *exc) -> None:
        unpatch_torchvision_ops()


_PATCHED_NAMES = ("nms", "batched_nms", "box_iou")
_MODULES = (torchvision.ops, tv_boxes)
_originals: Dict[Tuple[str, str], object] = {}


def patch_torchvision_ops() -> _TorchvisionOpsPatch:
    """Process-wide, opt-in: ``torchvision.ops.nms``, ``batched_nms`` and ``box_iou`` (and the same names in
    ``torchvision.ops.boxes``, which torchvision's detection code calls through) become rpn_ops'. Undo with
    :func:`unpatch_torchvision_ops`, or use the returned handle as a context manager. Calling it twice is harmless.

    rpn_ops' versions take the inputs torchvision's take (integer and mixed-dtype boxes, ``fmt=``, quantized NMS)
    and order equal scores by index."""
    ours = {"nms": nms, "batched_nms": batched_nms, "box_iou": box_iou}
    for module in _MODULES:
        for name in _PATCHED_NAMES:
            _originals.setdefault((module.__name__, name), getattr(module, name))
            setattr(module, name, ours[name])
    return _TorchvisionOpsPatch()


def unpatch_torchvision_ops() -> None:
    """Restores what :func:`patch_torchvision_ops` replaced (nothing happens if it was not called)."""
    for module in _MODULES:
        for name in _PATCHED_NAMES:
            original = _originals.pop((module.__name__, name), None)
            if original is not None:
                setattr(module, name, original)
