// Schemas of the NMS family. Kernels: cpu/nms.cpp, cuda/nms.cu; autocast: autocast.cpp; fake: rpn_ops/_meta.py.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold, int? max_output=None) -> Tensor");
  m.def(
      "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, int? max_output=None) "
      "-> Tensor");
}
