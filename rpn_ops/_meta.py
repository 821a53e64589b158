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


@torch.library.register_fake("rpn_ops::batched_nms_torchvision_order")
def _batched_nms_torchvision_order_fake(boxes, scores, idxs, iou_threshold, per_class_above):
    return _nms_output(boxes, None)


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


def _coding_dtype(computed: torch.dtype, float32_math: bool) -> torch.dtype:
    return torch.float32 if float32_math and computed in (torch.float16, torch.bfloat16) else computed


@torch.library.register_fake("rpn_ops::grid_anchors")
def _grid_anchors_fake(cell_anchors, cells_per_level, grid_sizes, strides, num_images=1):
    torch._check(len(grid_sizes) == 2 * len(cells_per_level) and len(strides) == 2 * len(cells_per_level),
                 lambda: "grid_sizes and strides must hold two values per level")
    total = sum(grid_sizes[2 * level] * grid_sizes[2 * level + 1] * cells
                for level, cells in enumerate(cells_per_level))
    return cell_anchors.new_empty((num_images, total, 4))


@torch.library.register_fake("rpn_ops::decode_boxes")
def _decode_boxes_fake(rel_codes, boxes, weights, bbox_xform_clip, float32_exp=False):
    torch._check(rel_codes.dim() == 2 and rel_codes.shape[1] % 4 == 0,
                 lambda: f"rel_codes must have shape [N, 4 * K], got {tuple(rel_codes.shape)}")
    _check_boxes(boxes, "boxes")
    torch._check(rel_codes.shape[0] == boxes.shape[0], lambda: "rel_codes must have one row per box")
    return rel_codes.new_empty(rel_codes.shape, dtype=_coding_dtype(rel_codes.dtype, float32_exp))


@torch.library.register_fake("rpn_ops::encode_boxes")
def _encode_boxes_fake(reference_boxes, proposals, weights, float32_log=False):
    _check_boxes(reference_boxes, "reference_boxes")
    _check_boxes(proposals, "proposals")
    torch._check(reference_boxes.shape[0] == proposals.shape[0],
                 lambda: "reference_boxes and proposals must have the same number of boxes")
    dtype = _coding_dtype(torch.promote_types(reference_boxes.dtype, proposals.dtype), float32_log)
    return reference_boxes.new_empty((reference_boxes.shape[0], 4), dtype=dtype)


def _check_matching(gt_boxes, anchors, gt_per_image, anchors_per_image) -> None:
    _check_boxes(gt_boxes, "gt_boxes")
    _check_boxes(anchors, "anchors")
    torch._check(len(gt_per_image) == len(anchors_per_image),
                 lambda: "one ground-truth count and one anchor count per image are needed")


@torch.library.register_fake("rpn_ops::match_anchors")
def _match_anchors_fake(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                        allow_low_quality_matches, force_best_anchors=False):
    _check_matching(gt_boxes, anchors, gt_per_image, anchors_per_image)
    return anchors.new_empty((anchors.shape[0],), dtype=torch.int64)


@torch.library.register_fake("rpn_ops::match_fcos")
def _match_fcos_fake(gt_boxes, anchors, gt_per_image, anchors_per_image, anchors_per_level, center_sampling_radius):
    _check_matching(gt_boxes, anchors, gt_per_image, anchors_per_image)
    return anchors.new_empty((anchors.shape[0],), dtype=torch.int64)


@torch.library.register_fake("rpn_ops::assign_targets")
def _assign_targets_fake(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                         allow_low_quality_matches, weights, float32_log=False):
    _check_matching(gt_boxes, anchors, gt_per_image, anchors_per_image)
    count = anchors.shape[0]
    target_dtype = _coding_dtype(torch.promote_types(gt_boxes.dtype, anchors.dtype), float32_log)
    return (anchors.new_empty((count,), dtype=torch.float32), gt_boxes.new_empty((count, 4)),
            anchors.new_empty((count, 4), dtype=target_dtype))


def _proposal_dtypes(objectness, pred_bbox_deltas, image_sizes, float32_exp):
    torch._check(len(image_sizes) % 2 == 0, lambda: "image_sizes must hold (height, width) per image")
    return _coding_dtype(pred_bbox_deltas.dtype, float32_exp), objectness.dtype


@torch.library.register_fake("rpn_ops::generate_proposals")
def _generate_proposals_fake(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level,
                             pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size, cell_anchors=None,
                             cells_per_level=(), grid_sizes=(), strides=(), float32_exp=False):
    box_dtype, score_dtype = _proposal_dtypes(objectness, pred_bbox_deltas, image_sizes, float32_exp)
    ctx = torch.library.get_ctx()
    boxes, scores = [], []
    for _ in range(len(image_sizes) // 2):
        kept = ctx.new_dynamic_size(max=post_nms_top_n) if post_nms_top_n > 0 else 0
        boxes.append(pred_bbox_deltas.new_empty((kept, 4), dtype=box_dtype))
        scores.append(objectness.new_empty((kept,), dtype=score_dtype))
    return boxes, scores


@torch.library.register_fake("rpn_ops::generate_proposals_padded")
def _generate_proposals_padded_fake(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level,
                                    pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh, min_size,
                                    cell_anchors=None, cells_per_level=(), grid_sizes=(), strides=(),
                                    float32_exp=False):
    box_dtype, score_dtype = _proposal_dtypes(objectness, pred_bbox_deltas, image_sizes, float32_exp)
    images = len(image_sizes) // 2
    return (pred_bbox_deltas.new_empty((images, post_nms_top_n, 4), dtype=box_dtype),
            objectness.new_empty((images, post_nms_top_n), dtype=score_dtype),
            objectness.new_empty((images,), dtype=torch.int64))


@torch.library.register_fake("rpn_ops::score_candidates")
def _score_candidates_fake(logits, score_thresh):
    torch._check(logits.dtype.is_floating_point,
                 lambda: f"score_candidates: logits must be a floating tensor (class logits), got {logits.dtype}")
    kept = torch.library.get_ctx().new_dynamic_size(max=logits.numel())
    return logits.new_empty((kept,)), logits.new_empty((kept,), dtype=torch.int64)


@torch.library.register_fake("rpn_ops::dense_focal_loss")
def _dense_focal_loss_fake(class_logits, anchor_labels, alpha=0.25, gamma=2.0):
    torch._check(class_logits.dim() == 3,
                 lambda: f"dense_focal_loss: class_logits must have shape [images, anchors, classes], got "
                         f"{tuple(class_logits.shape)}")
    return class_logits.new_empty((class_logits.shape[0],))


@torch.library.register_fake("rpn_ops::dense_focal_loss_backward")
def _dense_focal_loss_backward_fake(grad, class_logits, anchor_labels, alpha, gamma):
    return torch.empty_like(class_logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("rpn_ops::dense_detections")
def _dense_detections_fake(class_logits, box_regression, anchors, image_sizes, num_anchors_per_level, score_thresh,
                           topk_candidates, nms_thresh, detections_per_img, weights, bbox_xform_clip, activation,
                           topk_per, cell_anchors=None, cells_per_level=(), grid_sizes=(), strides=(),
                           centerness=None, box_coding="deltas"):
    torch._check(len(image_sizes) % 2 == 0, lambda: "image_sizes must hold (height, width) per image")
    torch._check(detections_per_img >= 0, lambda: f"detections_per_img must be >= 0, got {detections_per_img}")
    images = len(image_sizes) // 2
    return (box_regression.new_empty((images, detections_per_img, 4)),
            class_logits.new_empty((images, detections_per_img)),
            class_logits.new_empty((images, detections_per_img), dtype=torch.int64),
            class_logits.new_empty((images,), dtype=torch.int64))
