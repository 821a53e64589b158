// Schema of box_iou. Kernels: cpu/box_iou.cpp, cuda/box_iou.cu; autocast: autocast.cpp; fake: rpn_ops/_meta.py.
#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
}
