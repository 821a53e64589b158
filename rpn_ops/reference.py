"""Plain-PyTorch reference implementations, written for clarity rather than speed.

They define what the kernels must compute (torchvision's semantics, DESIGN.md) and are what the tests and
benchmarks compare with, next to torchvision itself.
"""
import math
from typing import List, Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16/float32 are computed in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of [..., N, 4] and [..., M, 4] boxes in torchvision's operation order."""
    dtype = compute_dtype(boxes1.dtype)
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    top_left = torch.max(b1[..., :, None, :2], b2[..., None, :, :2])
    bottom_right = torch.min(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None) -> Tensor:
    """Greedy NMS: visit boxes by descending score (stable), keep a box unless an already kept box has
    IoU > iou_threshold with it (compared in float64)."""
    return batched_nms(boxes, scores, torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device),
                       iou_threshold, max_output)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                max_output: Optional[int] = None) -> Tensor:
    """Per-category greedy NMS; the kept indices in descending score order (stable)."""
    dtype = compute_dtype(boxes.dtype)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    order = torch.sort(scores, descending=True, stable=True).indices
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    limit = len(boxes) if max_output is None else max_output
    for i in order.tolist():
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        iou = box_iou(boxes[i : i + 1], boxes)[0]
        suppressed |= (iou.double() > iou_threshold) & (idxs == idxs[i])
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def grid_anchors(cell_anchors: List[Tensor], grid_sizes, strides) -> Tensor:
    """All levels' anchors: at each position (row-major) of each level, shift + every cell anchor."""
    levels = []
    for cells, (height, width), (stride_y, stride_x) in zip(cell_anchors, grid_sizes, strides):
        ys = torch.arange(height, dtype=torch.int32, device=cells.device) * stride_y
        xs = torch.arange(width, dtype=torch.int32, device=cells.device) * stride_x
        shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
        levels.append((shifts + cells.reshape(1, -1, 4)).reshape(-1, 4))
    return torch.cat(levels)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights, bbox_xform_clip: float = math.log(1000.0 / 16)) -> Tensor:
    """[N, 4K] deltas applied to [N, 4] boxes, step by step in torchvision's order and dtypes."""
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2:3] - boxes[:, 0:1]
    heights = boxes[:, 3:4] - boxes[:, 1:2]
    ctr_x = boxes[:, 0:1] + 0.5 * widths
    ctr_y = boxes[:, 1:2] + 0.5 * heights
    wx, wy, ww, wh = (float(w) for w in weights)
    dx, dy = rel_codes[:, 0::4] / wx, rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=bbox_xform_clip)
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=bbox_xform_clip)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    half_w = torch.tensor(0.5, dtype=pred_ctr_x.dtype, device=boxes.device) * (torch.exp(dw) * widths)
    half_h = torch.tensor(0.5, dtype=pred_ctr_y.dtype, device=boxes.device) * (torch.exp(dh) * heights)
    corners = (pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h)
    return torch.stack(corners, dim=2).flatten(1)


def decode_linear(rel_codes: Tensor, boxes: Tensor) -> Tensor:
    """torchvision's BoxLinearCoder(normalize_by_size=True).decode (FCOS): distances from the box's centre to its
    sides, in units of its size."""
    boxes = boxes.to(rel_codes.dtype)
    ctr_x, ctr_y = 0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    codes = rel_codes * torch.stack((width, height, width, height), dim=1)
    return torch.stack((ctr_x - codes[:, 0], ctr_y - codes[:, 1], ctr_x + codes[:, 2], ctr_y + codes[:, 3]), dim=1)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights) -> Tensor:
    """[N, 4] targets (dx, dy, dw, dh) of reference boxes relative to proposals, in torchvision's order; the
    weights take the reference boxes' dtype."""
    wx, wy, ww, wh = torch.as_tensor(weights, dtype=reference_boxes.dtype, device=reference_boxes.device)
    ex_widths = proposals[:, 2:3] - proposals[:, 0:1]
    ex_heights = proposals[:, 3:4] - proposals[:, 1:2]
    ex_ctr_x = proposals[:, 0:1] + 0.5 * ex_widths
    ex_ctr_y = proposals[:, 1:2] + 0.5 * ex_heights
    gt_widths = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
    gt_heights = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
    gt_ctr_x = reference_boxes[:, 0:1] + 0.5 * gt_widths
    gt_ctr_y = reference_boxes[:, 1:2] + 0.5 * gt_heights
    targets_dx = wx * (gt_ctr_x - ex_ctr_x) / ex_widths
    targets_dy = wy * (gt_ctr_y - ex_ctr_y) / ex_heights
    targets_dw = ww * torch.log(gt_widths / ex_widths)
    targets_dh = wh * torch.log(gt_heights / ex_heights)
    return torch.cat((targets_dx, targets_dy, targets_dw, targets_dh), dim=1)


def matching_iou(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """[G, A] IoU exactly as torchvision's box_iou computes it for any pair of dtypes: corners compared in the
    promoted dtype, each extent upcast (float16/bfloat16 -> float32) after the subtraction, areas of the upcast
    boxes."""
    def upcast(t: Tensor) -> Tensor:
        return t if t.dtype in (torch.float32, torch.float64) else t.float()

    gt, an = upcast(gt_boxes), upcast(anchors)
    area_gt = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    area_anchors = (an[:, 2] - an[:, 0]) * (an[:, 3] - an[:, 1])
    top_left = torch.max(gt_boxes[:, None, :2], anchors[None, :, :2])
    bottom_right = torch.min(gt_boxes[:, None, 2:], anchors[None, :, 2:])
    wh = upcast(bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_gt[:, None] + area_anchors[None, :] - inter)


def match_anchors(gt_boxes: Tensor, anchors: Tensor, high_threshold: float = 0.7, low_threshold: float = 0.3,
                  allow_low_quality_matches: bool = True, force_best_anchors: bool = False) -> Tensor:
    """Each anchor's best ground-truth box (first of ties; NaN wins), -1 below low, -2 between the thresholds;
    anchors reaching a box's highest IoU keep their best box when low-quality matches are allowed. Forced (SSD):
    then each box's first anchor of highest IoU is its, box by box (a later box takes a shared anchor)."""
    iou = matching_iou(gt_boxes, anchors)
    best, best_gt = iou.max(dim=0)
    matches = best_gt.clone()
    matches[best < low_threshold] = -1
    matches[(best >= low_threshold) & (best < high_threshold)] = -2
    if allow_low_quality_matches:
        reaches_highest = (iou == iou.max(dim=1).values[:, None]).any(dim=0)
        matches[reaches_highest] = best_gt[reaches_highest]
    if force_best_anchors:
        highest = iou.max(dim=1).values
        for g in range(len(gt_boxes)):
            reaching = (iou[g] == highest[g]) | (iou[g].isnan() & highest[g].isnan())
            matches[torch.where(reaching)[0][0]] = g
    return matches


def assign_targets(anchors: List[Tensor], gt_boxes: List[Tensor], fg_iou_thresh: float = 0.7,
                   bg_iou_thresh: float = 0.3, allow_low_quality_matches: bool = True, weights=(1.0, 1.0, 1.0, 1.0)):
    """Per image: labels (1 / 0 / -1, float32) and matched boxes (float32 zeros without ground truth), then the
    regression targets of all images encoded together, as RegionProposalNetwork does."""
    labels, matched = [], []
    for anchors_per_image, gt in zip(anchors, gt_boxes):
        if gt.numel() == 0:
            labels.append(torch.zeros(len(anchors_per_image), dtype=torch.float32, device=anchors_per_image.device))
            matched.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32, device=anchors_per_image.device))
            continue
        matches = match_anchors(gt, anchors_per_image, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)
        labels.append(torch.where(matches >= 0, 1.0, torch.where(matches == -1, 0.0, -1.0)).float())
        matched.append(gt[matches.clamp(min=0)])
    targets = encode_boxes(torch.cat(matched), torch.cat(list(anchors)), weights)
    return labels, matched, list(targets.split([len(a) for a in anchors]))


def generate_proposals(objectness: Tensor, pred_bbox_deltas: Tensor, anchors: List[Tensor], image_sizes,
                       num_anchors_per_level: List[int], pre_nms_top_n: int, post_nms_top_n: int,
                       nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3):
    """torchvision's RPN proposals (decode, then filter_proposals) step by step, with ties made deterministic:
    top-k by a stable descending sort (equal logits: lower index first, NaN first), NMS in float32 (float64 for
    float64 boxes) by descending score, stable over (level, rank). anchors: one [A, 4] tensor per image."""
    num_images = len(image_sizes)
    logits = objectness.detach().reshape(num_images, -1)
    deltas = pred_bbox_deltas.detach().reshape(num_images, -1, 4)
    top, levels, offset = [], [], 0
    for level, count in enumerate(num_anchors_per_level):
        order = torch.sort(logits[:, offset:offset + count], dim=1, descending=True, stable=True).indices
        top.append(order[:, :min(pre_nms_top_n, count)] + offset)
        levels += [level] * top[-1].shape[1]
        offset += count
    top_index = torch.cat(top, dim=1)
    scores = torch.sigmoid(torch.gather(logits, 1, top_index))  # the [B, K] layout torchvision has
    level_of = torch.tensor(levels, dtype=torch.int64, device=logits.device)
    final_boxes, final_scores = [], []
    for b, (height, width) in enumerate(image_sizes):
        boxes = decode_boxes(deltas[b, top_index[b]], anchors[b][top_index[b]], (1.0, 1.0, 1.0, 1.0))
        boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                             boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = (widths >= min_size) & (heights >= min_size) & (scores[b] >= score_thresh)
        kept_boxes, kept_scores, kept_levels = boxes[keep], scores[b][keep], level_of[keep]
        order = batched_nms(kept_boxes, kept_scores, kept_levels, nms_thresh)[:post_nms_top_n]
        final_boxes.append(kept_boxes[order])
        final_scores.append(kept_scores[order])
    return final_boxes, final_scores


def dense_detections(class_logits: Tensor, box_regression: Tensor, anchors: List[Tensor], image_sizes,
                     num_anchors_per_level: List[int], score_thresh: float, topk_candidates: int, nms_thresh: float,
                     detections_per_img: int, weights=(1.0, 1.0, 1.0, 1.0),
                     bbox_xform_clip: float = math.log(1000.0 / 16), activation: str = "sigmoid",
                     topk_per: str = "level", sigmoid=torch.sigmoid, decode=None, centerness=None,
                     box_coding: str = "deltas", sqrt=torch.sqrt):
    """torchvision's one-stage postprocess_detections (RetinaNet: sigmoid, top-k per level; FCOS: the same with
    sqrt(sigmoid(class) * sigmoid(centerness)) scores and BoxLinearCoder's decode; SSD: softmax with class 0 the
    background, top-k per class) step by step, with ties made deterministic: each group's top-k by a stable
    descending sort of its candidates in position order, NMS by a stable descending sort of all candidates.
    anchors: one [A, 4] tensor per image. `sigmoid` computes the scores of one image's level (torchvision calls
    torch.sigmoid per image and level, and the CPU's bits depend on where an element sits in the tensor); `sqrt`
    takes FCOS's square root;
    `decode(rel_codes, boxes, weights, bbox_xform_clip)` is decode_boxes unless given (box_coding "deltas").
    Returns per image the boxes [K, 4], scores [K] and int64 labels [K], by descending score."""
    decode = decode_boxes if decode is None else decode
    first_class = 1 if activation == "softmax" else 0  # softmax's class 0 is the background
    starts = [sum(num_anchors_per_level[:level]) for level in range(len(num_anchors_per_level))]
    all_boxes, all_scores, all_labels = [], [], []
    for b, (height, width) in enumerate(image_sizes):
        logits = class_logits[b].detach()
        if activation == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif centerness is not None:
            center = centerness[b].detach().reshape(-1, 1)
            scores = torch.cat([sqrt(sigmoid(logits[start:start + count].contiguous())
                                     * sigmoid(center[start:start + count].contiguous()))
                                for start, count in zip(starts, num_anchors_per_level)])
        else:
            scores = torch.cat([sigmoid(logits[start:start + count].contiguous())
                                for start, count in zip(starts, num_anchors_per_level)])
        passing = scores > score_thresh
        passing[:, :first_class] = False
        if topk_per == "level":  # positions: anchor * C + class within the level, the order of nonzero's rows
            groups = [torch.nonzero(passing[start:start + count]) + torch.tensor([start, 0], device=scores.device)
                      for start, count in zip(starts, num_anchors_per_level)]
        else:  # positions: the anchor, per class in ascending order
            groups = [torch.nonzero(passing[:, c:c + 1]) + torch.tensor([0, c], device=scores.device)
                      for c in range(first_class, scores.shape[1])]
        chosen = [torch.zeros(0, 2, dtype=torch.int64, device=scores.device)]
        for group in groups:
            order = torch.sort(scores[group[:, 0], group[:, 1]], descending=True, stable=True).indices
            chosen.append(group[order[:topk_candidates]])
        anchor_index, labels = torch.cat(chosen).unbind(1)
        candidate_scores = scores[anchor_index, labels]
        codes, reference_boxes = box_regression[b].detach()[anchor_index], anchors[b][anchor_index]
        if box_coding == "linear":
            boxes = decode_linear(codes, reference_boxes)
        else:
            boxes = decode(codes, reference_boxes, weights, bbox_xform_clip)
        clipped_x = boxes[:, 0::2].clamp(min=0, max=width)  # torchvision's clip_boxes_to_image
        clipped_y = boxes[:, 1::2].clamp(min=0, max=height)
        boxes = torch.stack((clipped_x, clipped_y), dim=2).reshape(boxes.shape)
        keep = batched_nms(boxes, candidate_scores, labels, nms_thresh, detections_per_img)
        all_boxes.append(boxes[keep])
        all_scores.append(candidate_scores[keep])
        all_labels.append(labels[keep])
    return all_boxes, all_scores, all_labels


def dense_focal_loss(class_logits: Tensor, anchor_labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Per image, torchvision's sigmoid_focal_loss(reduction="sum") over the anchors not ignored (label -2), with the
    one-hot target of RetinaNet's classification loss (label c >= 0: 1 at class c; -1: all 0), as its steps compute
    it: differentiable, in the logits' dtype. Returns [B]."""
    sums = []
    for logits, labels in zip(class_logits, anchor_labels):
        target = torch.zeros_like(logits)
        foreground = labels >= 0
        target[foreground, labels[foreground]] = 1.0
        valid = labels != -2
        inputs, targets = logits[valid], target[valid]
        p = torch.sigmoid(inputs)
        ce_loss = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
        p_t = p * targets + (1 - p) * (1 - targets)
        loss = ce_loss * ((1 - p_t) ** gamma)
        if alpha >= 0:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
        sums.append(loss.sum())
    return torch.stack(sums) if sums else class_logits.new_zeros((0,))
