"""Proposal generation: torchvision's ``RegionProposalNetwork.filter_proposals`` on decoded anchors, in one
operator call for the whole batch."""
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _meta, _portable  # noqa: F401  (the fake kernels torch.compile uses)
from .ops import _count_arg, _flat, _number, _pairs


class AnchorGrid(NamedTuple):
    """Anchors given by their specification instead of materialised: the kernels compute each selected anchor
    from its index, exactly as :func:`rpn_ops.grid_anchors` (and torchvision's ``AnchorGenerator``) would.

    Attributes:
        cell_anchors: per level, the ``[A_l, 4]`` zero-centred cell anchors (``AnchorGenerator.cell_anchors``),
            of the dtype the anchors would have (the feature maps').
        grid_sizes: per level, the feature map's ``(height, width)``.
        strides: per level, ``(stride_y, stride_x)``: the padded batch size integer-divided by the grid size.
    """

    cell_anchors: List[Tensor]
    grid_sizes: List[List[int]]
    strides: List[List[int]]

    @classmethod
    def from_generator(cls, generator, batch_size: Sequence[int], grid_sizes: Sequence[Sequence[int]],
                       dtype: torch.dtype = torch.float32, device=None) -> "AnchorGrid":
        """The grid ``generator(image_list, feature_maps)`` would materialise (an ``rpn_ops`` or torchvision
        ``AnchorGenerator``), for a padded batch of ``batch_size = (height, width)`` and feature maps of
        ``grid_sizes``."""
        height, width = (int(s) for s in batch_size)
        grids = [[int(h), int(w)] for h, w in grid_sizes]
        cells = [c.to(dtype=dtype, device=device) for c in generator.cell_anchors]
        return cls(cells, grids, [[height // h, width // w] for h, w in grids])


def generate_proposals(
    objectness: Tensor,
    pred_bbox_deltas: Tensor,
    anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]],
    num_anchors_per_level: List[int],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float = 0.7,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
    padded: bool = False,
) -> Union[Tuple[List[Tensor], List[Tensor]], Tuple[Tensor, Tensor, Tensor]]:
    """Region proposals of a batch, as torchvision's RPN computes them::

        proposals = rpn.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(B, -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, image_sizes, num_anchors_per_level)

    for a ``RegionProposalNetwork`` with these ``pre_nms_top_n``, ``post_nms_top_n``, ``nms_thresh``,
    ``score_thresh`` and ``min_size`` (and box coder weights ``(1, 1, 1, 1)``). Per image and level: the
    ``min(pre_nms_top_n, level size)`` anchors of largest objectness logit, decoded, scores = sigmoid(logit),
    clipped to the image, boxes narrower or lower than ``min_size`` and scores under ``score_thresh`` dropped,
    NMS (IoU > ``nms_thresh`` suppressed); then per image the ``post_nms_top_n`` best by descending score.
    Only the selected anchors are decoded, and the whole batch is one call.

    Ties, where torchvision leaves the order to its sort and top-k implementations: equal logits rank the lower
    anchor index first (top-k and NMS order); equal scores in the output come lower level first, then in
    NMS order. NaN logits rank first (as ``torch.topk``) and are then dropped with their NaN scores.

    Dtypes: boxes have decode's dtype (the deltas'; float32 for float16/bfloat16 deltas under CUDA autocast,
    where the exponential runs in float32), scores the objectness', each step rounded as torchvision rounds it.
    NMS compares float16/bfloat16 boxes in float32 (torchvision's CPU NMS rejects them).

    Args:
        objectness: ``[B * A, 1]`` (as ``concat_box_prediction_layers`` returns it), ``[B * A]`` or ``[B, A]``
            logits, ``A = sum(num_anchors_per_level)``.
        pred_bbox_deltas: ``[B * A, 4]`` or ``[B, A, 4]`` deltas ``(dx, dy, dw, dh)``; detached.
        anchors: per image ``[A, 4]`` anchors (a list, as ``AnchorGenerator`` returns them), one ``[A, 4]``
            tensor for every image, a ``[B, A, 4]`` tensor, or an :class:`AnchorGrid` (nothing materialised).
        image_sizes: per image, ``(height, width)`` to clip to.
        num_anchors_per_level: anchors per feature-map level, in order.
        pre_nms_top_n, post_nms_top_n: ints >= 0 (``rpn.pre_nms_top_n()`` / ``rpn.post_nms_top_n()``).
        nms_thresh, score_thresh, min_size: finite numbers.
        padded: return fixed-size outputs instead of lists (CUDA: no host synchronisation, CUDA-graph
            capturable).

    Returns:
        ``(boxes, scores)``: per image, ``[K_i, 4]`` boxes and ``[K_i]`` scores, ``K_i <= post_nms_top_n``, by
        descending score. With ``padded=True``: ``[B, post_nms_top_n, 4]`` boxes, ``[B, post_nms_top_n]``
        scores (zeros past each image's count) and the ``[B]`` int64 counts.
    """
    if padded:
        return torch.ops.rpn_ops.generate_proposals_padded(*_proposal_args(
            objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
            nms_thresh, score_thresh, min_size))
    return proposal_lists(objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n,
                          post_nms_top_n, nms_thresh, score_thresh, min_size)


def proposal_lists(
    objectness: Tensor, pred_bbox_deltas: Tensor, anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int], pre_nms_top_n: int, post_nms_top_n: int,
    nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3,
) -> Tuple[List[Tensor], List[Tensor]]:
    """``generate_proposals(..., padded=False)``, typed for TorchScript (one return type)."""
    boxes, scores = torch.ops.rpn_ops.generate_proposals(*_proposal_args(
        objectness, pred_bbox_deltas, anchors, image_sizes, num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
        nms_thresh, score_thresh, min_size))
    return list(boxes), list(scores)


def _proposal_args(
    objectness: Tensor, pred_bbox_deltas: Tensor, anchors: Union[Tensor, List[Tensor], AnchorGrid],
    image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int], pre_nms_top_n: int, post_nms_top_n: int,
    nms_thresh: float, score_thresh: float, min_size: float,
) -> Tuple[Tensor, Tensor, List[Tensor], List[int], List[int], int, int, float, float, float, Optional[Tensor], List[int],
           List[int], List[int]]:
    """The arguments of the generate_proposals operators (checked, when not scripted)."""
    if not torch.jit.is_scripting():
        anchors = _checked_anchors(objectness, pred_bbox_deltas, anchors)
        image_sizes = _pairs(image_sizes, "image_sizes")
        num_anchors_per_level = [_count_arg(n, f"num_anchors_per_level[{i}]")
                                 for i, n in enumerate(num_anchors_per_level)]
        pre_nms_top_n, post_nms_top_n = _count_arg(pre_nms_top_n, "pre_nms_top_n"), _count_arg(post_nms_top_n,
                                                                                                "post_nms_top_n")
        nms_thresh, score_thresh = _number(nms_thresh, "nms_thresh"), _number(score_thresh, "score_thresh")
        min_size = _number(min_size, "min_size")
        if _portable.exporting_to_onnx():
            raise RuntimeError("generate_proposals has no ONNX form; a model patched by rpn_ops.patch_torchvision "
                               "exports its proposals in torchvision's steps")
    anchor_list, table, cells_per_level, grid_sizes, strides = _anchor_args(anchors)
    return (objectness.detach(), pred_bbox_deltas.detach(), anchor_list,
            _flat([[size[0], size[1]] for size in image_sizes]), num_anchors_per_level, pre_nms_top_n, post_nms_top_n,
            nms_thresh, score_thresh, min_size, table, cells_per_level, grid_sizes, strides)


def _anchor_args(anchors: Union[Tensor, List[Tensor], AnchorGrid]
                 ) -> Tuple[List[Tensor], Optional[Tensor], List[int], List[int], List[int]]:
    """The operators' anchor arguments: the anchor tensors (none for an AnchorGrid), and the grid's cell anchor
    table, cells per level, grid sizes and strides (None and empty lists for tensors)."""
    table: Optional[Tensor] = None
    cells_per_level: List[int] = []
    grid_sizes: List[int] = []
    strides: List[int] = []
    if isinstance(anchors, Tensor):
        anchor_list = list(anchors.unbind(0)) if anchors.dim() == 3 else [anchors]
    elif isinstance(anchors, AnchorGrid):
        cells = anchors.cell_anchors
        table = cells[0] if len(cells) == 1 else torch.cat(cells)
        cells_per_level = [c.shape[0] for c in cells]
        grid_sizes, strides = _flat(anchors.grid_sizes), _flat(anchors.strides)
        anchor_list = []
    else:
        anchor_list = anchors
    return [a.detach() for a in anchor_list], table, cells_per_level, grid_sizes, strides


def _checked_anchors(objectness, pred_bbox_deltas, anchors, op: str = "generate_proposals",
                     names=("objectness", "pred_bbox_deltas")):
    """``anchors`` as a tensor, a list of tensors or an AnchorGrid of lists; raises for anything else."""
    for tensor, name in zip((objectness, pred_bbox_deltas), names):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if isinstance(anchors, AnchorGrid):
        cells = list(anchors.cell_anchors)
        if not cells or len(anchors.grid_sizes) != len(cells) or len(anchors.strides) != len(cells):
            raise ValueError(f"an AnchorGrid needs one grid size and one stride per level of cell anchors: "
                             f"{len(cells)} levels, {len(anchors.grid_sizes)} grid sizes, {len(anchors.strides)} "
                             "strides")
        anchors = AnchorGrid(cells, _pairs(anchors.grid_sizes, "grid_sizes"), _pairs(anchors.strides, "strides"))
        tensors = cells
    elif isinstance(anchors, Tensor):
        tensors = [anchors]
    elif isinstance(anchors, (list, tuple)) and all(isinstance(a, Tensor) for a in anchors):
        anchors = list(anchors)
        if len(anchors) > 1 and all(a is anchors[0] for a in anchors):
            anchors = anchors[:1]
        tensors = anchors
    else:
        raise TypeError(f"anchors must be a tensor, a list of tensors or an AnchorGrid, got {type(anchors).__name__}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise ValueError(f"{op} does not propagate gradients to the anchors (torchvision's decode does); detach "
                         "them, or decode with rpn_ops.decode_boxes")
    return anchors
