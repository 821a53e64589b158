"""rpn_ops: fast, torchvision-exact Region Proposal Network operators for PyTorch (CPU and CUDA)."""
from ._library import build_info, set_cpu_isa
from .ops import batched_nms, box_iou, nms

__all__ = ["batched_nms", "box_iou", "build_info", "nms", "set_cpu_isa"]
__version__ = "0.1.0"
