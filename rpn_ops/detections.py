"""Detections of one-stage detectors (RetinaNet, FCOS, SSD, any head of class logits and box deltas over anchors):
torchvision's ``postprocess_detections`` for a whole batch in one operator call."""
import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _meta, _portable  # noqa: F401  (the fake kernels torch.compile uses)
from .ops import _count_arg, _flat, _number, _pairs, _weights
from .proposals import AnchorGrid, _anchor_args, _checked_anchors

_DEFAULT_XFORM_CLIP = math.log(1000.0 / 16)


def dense_detections(
    class_logits: Tensor,
    box_regression: Tensor,
    anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]],
    num_anchors_per_level: List[int],
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    bbox_xform_clip: float = _DEFAULT_XFORM_CLIP,
    activation: str = "sigmoid",
    topk_per: str = "level",
    centerness: Optional[Tensor] = None,
    box_coding: str = "deltas",
    padded: bool = False,
) -> Union[Tuple[List[Tensor], List[Tensor], List[Tensor]], Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Boxes, scores and labels of a batch, as a one-stage detector's ``postprocess_detections`` computes them,
    in one call (the counterpart of :func:`rpn_ops.generate_proposals` for detection heads). Per image:

    1. scores: ``sigmoid`` of every class logit (label = class index; with ``centerness`` logits, FCOS's
       ``sqrt(sigmoid(class) * sigmoid(centerness))``), or ``softmax`` over the classes with class 0 the background,
       never detected (labels 1 ... C - 1);
    2. candidates: the (anchor, class) pairs scoring above ``score_thresh``, grouped per level over anchors x classes
       (``topk_per="level"``) or per class over all anchors (``"class"``); each group's best ``topk_candidates``;
    3. the candidates' deltas decoded against their anchors (``box_coding="deltas"``: ``BoxCoder(weights,
       bbox_xform_clip)``; ``"linear"``: FCOS's ``BoxLinearCoder(normalize_by_size=True)``), clipped to the image;
    4. per-class NMS (IoU > ``nms_thresh`` suppressed), the best ``detections_per_img`` by descending score.

    ``torchvision``'s RetinaNet is ``activation="sigmoid", topk_per="level"`` with its head outputs, anchors and
    settings; FCOS adds ``centerness=head_outputs["bbox_ctrness"], box_coding="linear"``; SSD is
    ``activation="softmax", topk_per="class", weights=(10, 10, 5, 5)``. Each gives torchvision's detections to the
    bit. Where torchvision leaves the order of equal scores to ``torch.topk`` and its NMS sort,
    this op decides it: equal scores rank the lower position first within a group (position: ``anchor * C + class``
    within the level, or the anchor), and come out in group order, then rank. Only the candidates are decoded, and
    the sigmoid runs only where a score can pass the threshold (CPU).

    Args:
        class_logits: ``[B, A, C]`` logits, the levels' anchors one after the other (RetinaNet's
            ``head_outputs["cls_logits"]``), ``A = sum(num_anchors_per_level)``.
        box_regression: ``[B, A, 4]`` deltas ``(dx, dy, dw, dh)``.
        anchors: per image ``[A, 4]`` anchors (a list), one ``[A, 4]`` tensor for every image, a ``[B, A, 4]``
            tensor, or an :class:`AnchorGrid`.
        image_sizes: per image, ``(height, width)`` to clip to.
        num_anchors_per_level: anchors per level, in order.
        score_thresh: scores must be above it (compared in the logits' dtype); any number.
        topk_candidates, detections_per_img: ints >= 0.
        nms_thresh: a finite number.
        weights, bbox_xform_clip: the box coder's.
        activation: ``"sigmoid"`` or ``"softmax"``.
        topk_per: ``"level"`` or ``"class"``.
        centerness: ``[B, A]`` or ``[B, A, 1]`` centerness logits (FCOS), of the class logits' dtype; sigmoid only.
        box_coding: ``"deltas"`` or ``"linear"`` (``weights`` and ``bbox_xform_clip`` then play no part).
        padded: return fixed-size outputs (CUDA: no host synchronisation, CUDA-graph capturable).

    Returns:
        ``(boxes, scores, labels)``: per image ``[K_i, 4]`` boxes (the deltas' dtype), ``[K_i]`` scores (the
        logits'), ``[K_i]`` int64 labels, ``K_i <= detections_per_img``, by descending score. With ``padded=True``:
        ``[B, D, 4]`` boxes, ``[B, D]`` scores, ``[B, D]`` labels (zeros past each image's count) and the ``[B]``
        int64 counts, ``D = detections_per_img``.
    """
    outputs = torch.ops.rpn_ops.dense_detections(*_detection_args(
        class_logits, box_regression, anchors, image_sizes, num_anchors_per_level, score_thresh, topk_candidates,
        nms_thresh, detections_per_img, weights, bbox_xform_clip, activation, topk_per, centerness, box_coding))
    if padded:
        return outputs
    return _unpadded(*outputs)


def detection_lists(
    class_logits: Tensor, box_regression: Tensor, anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int], score_thresh: float = 0.05,
    topk_candidates: int = 1000, nms_thresh: float = 0.5, detections_per_img: int = 300,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = _DEFAULT_XFORM_CLIP,
    activation: str = "sigmoid", topk_per: str = "level", centerness: Optional[Tensor] = None,
    box_coding: str = "deltas",
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """``dense_detections(..., padded=False)``, typed for TorchScript (one return type)."""
    return _unpadded(*torch.ops.rpn_ops.dense_detections(*_detection_args(
        class_logits, box_regression, anchors, image_sizes, num_anchors_per_level, score_thresh, topk_candidates,
        nms_thresh, detections_per_img, weights, bbox_xform_clip, activation, topk_per, centerness, box_coding)))


def _unpadded(boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor
              ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    image_boxes: List[Tensor] = []
    image_scores: List[Tensor] = []
    image_labels: List[Tensor] = []
    counts_list: List[int] = counts.tolist()  # the one host synchronisation
    for image, count in enumerate(counts_list):
        image_boxes.append(boxes[image, :count])
        image_scores.append(scores[image, :count])
        image_labels.append(labels[image, :count])
    return image_boxes, image_scores, image_labels


def _detection_args(
    class_logits: Tensor, box_regression: Tensor, anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int], score_thresh: float, topk_candidates: int,
    nms_thresh: float, detections_per_img: int, weights: Tuple[float, float, float, float], bbox_xform_clip: float,
    activation: str, topk_per: str, centerness: Optional[Tensor], box_coding: str,
):
    """The arguments of the dense_detections operator (checked, when not scripted)."""
    if not torch.jit.is_scripting():
        anchors = _checked_anchors(class_logits, box_regression, anchors, "dense_detections",
                                   ("class_logits", "box_regression"))
        image_sizes = _pairs(image_sizes, "image_sizes")
        num_anchors_per_level = [_count_arg(n, f"num_anchors_per_level[{i}]")
                                 for i, n in enumerate(num_anchors_per_level)]
        topk_candidates = _count_arg(topk_candidates, "topk_candidates")
        detections_per_img = _count_arg(detections_per_img, "detections_per_img")
        score_thresh, nms_thresh = _number(score_thresh, "score_thresh"), _number(nms_thresh, "nms_thresh")
        bbox_xform_clip = _number(bbox_xform_clip, "bbox_xform_clip")
        weights = _weights(weights)
        for value, name in ((activation, "activation"), (topk_per, "topk_per"), (box_coding, "box_coding")):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string, got {type(value).__name__}")
        if centerness is not None and not isinstance(centerness, Tensor):
            raise TypeError(f"centerness must be a tensor or None, got {type(centerness).__name__}")
        if _portable.exporting_to_onnx():
            raise RuntimeError("dense_detections has no ONNX form; a model patched by rpn_ops.patch_torchvision "
                               "exports its detections in torchvision's steps")
    anchor_list, table, cells_per_level, grid_sizes, strides = _anchor_args(anchors)
    return (class_logits.detach(), box_regression.detach(), anchor_list,
            _flat([[size[0], size[1]] for size in image_sizes]), num_anchors_per_level, score_thresh, topk_candidates,
            nms_thresh, detections_per_img, [float(w) for w in weights], bbox_xform_clip, activation, topk_per, table,
            cells_per_level, grid_sizes, strides, None if centerness is None else centerness.detach(), box_coding)
