"""rpn_ops: fast, torchvision-exact Region Proposal Network operators for PyTorch (CPU and CUDA)."""
from ._library import build_info, library_path, set_cpu_isa
from .anchors import AnchorGenerator, cell_anchors
from .box_coder import BoxCoder
from .detections import dense_detections, detection_lists
from .losses import anchor_labels, dense_focal_loss
from .matching import BalancedPositiveNegativeSampler, assign_targets, match_anchors, match_fcos
from .ops import batched_nms, box_iou, decode_boxes, encode_boxes, grid_anchors, nms, score_candidates
from .proposals import AnchorGrid, generate_proposals

_TORCHVISION_PATCH = ("FCOS", "RegionProposalNetwork", "RetinaNet", "RoIHeads", "SSD", "patch_torchvision",
                      "patch_torchvision_ops", "unpatch_torchvision_ops")


def __getattr__(name):  # the torchvision patch imports torchvision: loaded on first use, not with rpn_ops
    if name in _TORCHVISION_PATCH:
        from . import torchvision_patch
        return getattr(torchvision_patch, name)
    raise AttributeError(f"module 'rpn_ops' has no attribute {name!r}")


__all__ = [
    "AnchorGenerator", "AnchorGrid", "FCOS", "BalancedPositiveNegativeSampler", "BoxCoder", "RegionProposalNetwork", "RetinaNet", "RoIHeads",
    "SSD", "anchor_labels", "assign_targets", "batched_nms", "box_iou", "build_info", "cell_anchors", "decode_boxes", "dense_detections",
    "dense_focal_loss", "detection_lists", "encode_boxes",
    "generate_proposals", "grid_anchors", "library_path", "match_anchors", "match_fcos", "nms", "patch_torchvision", "patch_torchvision_ops",
    "score_candidates", "set_cpu_isa", "unpatch_torchvision_ops",
]
__version__ = "0.1.0"
