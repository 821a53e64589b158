// Schema of box_iou. Kernels: cpu/box_iou.cpp, cuda/box_iou.cu; autocast: autocast.cpp; fake: rpn_ops/_meta.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rpn_ops, m) {
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");
}
