// Schemas of anchor generation and box coding. Kernels: cpu/box_coding.cpp, cuda/box_coding.cu; autocast:
// autocast.cpp; fake: rpn_ops/_meta.py; shared arithmetic: box_coding.h.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  // All levels' anchors of num_images identical images: [num_images, sum(h * w * cells), 4] of the cell
  // table's dtype. Level l has cells_per_level[l] rows of cell_anchors, grid (grid_sizes[2l], grid_sizes[2l+1])
  // = (height, width) and strides (strides[2l], strides[2l+1]) = (y, x).
  m.def(
      "grid_anchors(Tensor cell_anchors, int[] cells_per_level, SymInt[] grid_sizes, SymInt[] strides, "
      "int num_images=1) -> Tensor");
  // BoxCoder.decode_single: [N, 4K] codes and [N, 4] boxes -> [N, 4K] boxes. float32_exp: run the exponential
  // in float32 (and return float32) for float16 / bfloat16 codes, as CUDA autocast does.
  m.def(
      "decode_boxes(Tensor rel_codes, Tensor boxes, float[] weights, float bbox_xform_clip, "
      "bool float32_exp=False) -> Tensor");
  // encode_boxes: [N, 4] reference boxes and [N, 4] proposals -> [N, 4] targets. float32_log: as float32_exp.
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights, bool float32_log=False) -> Tensor");
}
