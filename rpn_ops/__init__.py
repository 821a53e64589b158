"""rpn_ops: fast, torchvision-exact Region Proposal Network operators for PyTorch (CPU and CUDA)."""
from ._library import build_info, set_cpu_isa
from .anchors import AnchorGenerator, cell_anchors
from .box_coder import BoxCoder
from .matching import BalancedPositiveNegativeSampler, assign_targets, match_anchors
from .ops import batched_nms, box_iou, decode_boxes, encode_boxes, grid_anchors, nms
from .proposals import AnchorGrid, generate_proposals

__all__ = [
    "AnchorGenerator", "AnchorGrid", "BalancedPositiveNegativeSampler", "BoxCoder", "assign_targets", "batched_nms", "box_iou",
    "build_info", "cell_anchors", "decode_boxes", "encode_boxes", "generate_proposals", "grid_anchors", "match_anchors", "nms",
    "set_cpu_isa",
]
__version__ = "0.1.0"
