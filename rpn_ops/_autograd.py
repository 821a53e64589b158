"""Gradients of the differentiable ops, torchvision's: box_iou (IoU losses), box coding (models that
backpropagate through decoded boxes or targets), grid_anchors (to the cell anchors), assign_targets (to the
ground truth and anchors through the matched boxes and targets) and dense_focal_loss (its own backward kernel,
not differentiable again). The others recompute torchvision's operation
sequence (reference.py) with autograd: exactly torchvision's gradient, at a cost paid only when a gradient is
needed. The other ops give integer indices, or proposals from detached inputs (see generate_proposals)."""
from typing import List

import torch
from torch import Tensor

from . import reference


def _setup_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])
    ctx.arguments = inputs[2:]


def _gradients_through(function, tensors, arguments, grad_outputs):
    """Gradients of `function(*tensors, *arguments)` (a tensor or a tuple of them) with respect to `tensors`;
    differentiable themselves when grad mode is on (a backward with create_graph=True: double backward)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = tensors if create_graph else [t.detach().requires_grad_(t.requires_grad) for t in tensors]
        outputs = function(*leaves, *arguments)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(outputs, wanted, [g.to(o.dtype) for g, o in zip(grad_outputs, outputs)],
                                         allow_unused=True, create_graph=create_graph))
    return tuple(next(grads) if leaf.requires_grad else None for leaf in leaves)


def _box_iou_backward(ctx, grad_output):
    return _gradients_through(reference.box_iou, ctx.saved_tensors, (), (grad_output,))


def _decode_backward(ctx, grad_output):
    weights, bbox_xform_clip, _float32_exp = ctx.arguments
    grads = _gradients_through(reference.decode_boxes, ctx.saved_tensors, (weights, bbox_xform_clip), (grad_output,))
    return (*grads, None, None, None)


def _encode_backward(ctx, grad_output):
    weights, _float32_log = ctx.arguments
    grads = _gradients_through(reference.encode_boxes, ctx.saved_tensors, (weights,), (grad_output,))
    return (*grads, None, None)


def _grid_anchors_setup(ctx, inputs, output):
    _table, ctx.cells_per_level, ctx.grid_sizes, _strides, _num_images = inputs


def _grid_anchors_backward(ctx, grad_output):
    """Each cell anchor is shifted to every position of its level in every image: its gradient is their sum."""
    grads, start = [], 0
    for level, cells in enumerate(ctx.cells_per_level):
        count = ctx.grid_sizes[2 * level] * ctx.grid_sizes[2 * level + 1] * cells
        grads.append(grad_output[:, start:start + count].reshape(-1, cells, 4).sum(0))
        start += count
    return torch.cat(grads), None, None, None, None


def _matched_and_targets(gt_boxes: Tensor, anchors: Tensor, gt_per_image: List[int], anchors_per_image: List[int],
                         high_threshold: float, low_threshold: float, allow_low_quality_matches: bool, weights,
                         matched_dtype: torch.dtype):
    """assign_targets' matched boxes and targets as torchvision computes them, from rpn_ops' matches: the boxes
    gathered by match index, the targets encoded from them."""
    matched, gt_start, anchor_start = [], 0, 0
    for gt_count, anchor_count in zip(gt_per_image, anchors_per_image):
        image_gt = gt_boxes[gt_start:gt_start + gt_count]
        if gt_count == 0:
            matched.append(torch.zeros((anchor_count, 4), dtype=matched_dtype, device=anchors.device))
        else:
            matches = torch.ops.rpn_ops.match_anchors(
                image_gt.detach(), anchors[anchor_start:anchor_start + anchor_count].detach(), [gt_count],
                [anchor_count], high_threshold, low_threshold, allow_low_quality_matches)
            matched.append(image_gt[matches.clamp(min=0)])
        gt_start, anchor_start = gt_start + gt_count, anchor_start + anchor_count
    matched_rows = torch.cat(matched)
    return matched_rows, reference.encode_boxes(matched_rows, anchors, weights)


def _assign_setup(ctx, inputs, output):
    _setup_inputs(ctx, inputs, output)
    ctx.matched_dtype = output[1].dtype


def _assign_backward(ctx, _grad_labels, grad_matched, grad_targets):
    gt_per_image, anchors_per_image, high, low, allow_low_quality_matches, weights, _float32_log = ctx.arguments
    arguments = (gt_per_image, anchors_per_image, high, low, allow_low_quality_matches, weights, ctx.matched_dtype)
    grads = _gradients_through(_matched_and_targets, ctx.saved_tensors, arguments, (grad_matched, grad_targets))
    return (*grads, None, None, None, None, None, None, None)


def _score_candidates_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.score_thresh = inputs[1]


def _score_candidates_backward(ctx, grad_scores, _grad_indices):
    def kept_scores(logits):  # torchvision's steps: the same kept set and scores as the forward
        scores = torch.sigmoid(logits).flatten()
        return scores[scores > ctx.score_thresh]
    return _gradients_through(kept_scores, ctx.saved_tensors, (), (grad_scores,))[0], None


def _focal_setup(ctx, inputs, output):
    class_logits, anchor_labels, ctx.alpha, ctx.gamma = inputs
    ctx.save_for_backward(class_logits, anchor_labels)


def _focal_backward(ctx, grad_sums):
    """The loss's analytic gradient, one kernel pass (the loss itself is not recomputed)."""
    class_logits, anchor_labels = ctx.saved_tensors
    return (torch.ops.rpn_ops.dense_focal_loss_backward(grad_sums, class_logits, anchor_labels, ctx.alpha, ctx.gamma),
            None, None, None)


torch.library.register_autograd("rpn_ops::box_iou", _box_iou_backward, setup_context=_setup_inputs)
torch.library.register_autograd("rpn_ops::decode_boxes", _decode_backward, setup_context=_setup_inputs)
torch.library.register_autograd("rpn_ops::encode_boxes", _encode_backward, setup_context=_setup_inputs)
torch.library.register_autograd("rpn_ops::grid_anchors", _grid_anchors_backward, setup_context=_grid_anchors_setup)
torch.library.register_autograd("rpn_ops::assign_targets", _assign_backward, setup_context=_assign_setup)
torch.library.register_autograd("rpn_ops::score_candidates", _score_candidates_backward,
                                setup_context=_score_candidates_setup)
torch.library.register_autograd("rpn_ops::dense_focal_loss", _focal_backward, setup_context=_focal_setup)
