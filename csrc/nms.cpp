// Schemas of the NMS family. Kernels: cpu/nms.cpp, cuda/nms.cu; autocast: autocast.cpp; fake: rpn_ops/_meta.py.
// batched_nms_torchvision_order is composed of the others, for every device, here.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "library.h"

namespace rpn_ops {
namespace {

// torchvision.ops.batched_nms's result, to the order of equal scores, with rpn_ops' NMS inside: torchvision's
// result depends on how it gets there. Up to its switch point (per_class_above box coordinates, which depends on
// the device and torchvision's version) it runs one NMS on boxes offset per class (the offset's rounding can
// flip a decision at the threshold); above it, per-class NMS, then an unstable sort of the kept scores, whose
// order among equal scores only the same sort call reproduces. This takes the same branch and makes the same
// calls around rpn_ops' NMS, which keeps exactly what torchvision's CPU NMS keeps. One operator, so that compiled,
// exported and scripted models decide the branch at run time, as eager torchvision does.
at::Tensor batched_nms_torchvision_order(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                         double iou_threshold, int64_t per_class_above) {
  static auto nms = c10::Dispatcher::singleton()
                        .findSchemaOrThrow(RPN_OPS_QUALIFIED("nms"), "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, std::optional<int64_t>)>();
  static auto batched_nms =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(RPN_OPS_QUALIFIED("batched_nms"), "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, std::optional<int64_t>)>();
  if (boxes.numel() > per_class_above) {
    const at::Tensor kept = std::get<0>(batched_nms.call(boxes, scores, idxs, iou_threshold, std::nullopt).sort());
    return kept.index_select(0, std::get<1>(scores.index_select(0, kept).sort(0, /*descending=*/true)));
  }
  if (boxes.numel() == 0) {
    return at::empty({0}, boxes.options().dtype(at::kLong));
  }
  const at::Tensor offsets = idxs.to(boxes.scalar_type()) * (boxes.max() + 1);
  return nms.call(boxes + offsets.unsqueeze(1), scores, iou_threshold, std::nullopt);
}

}  // namespace
}  // namespace rpn_ops

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold, int? max_output=None) -> Tensor");
  m.def(
      "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, int? max_output=None) "
      "-> Tensor");
  m.def(
      "batched_nms_torchvision_order(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, "
      "int per_class_above) -> Tensor");
}

TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, CompositeExplicitAutograd, m) {
  m.impl("batched_nms_torchvision_order", TORCH_FN(rpn_ops::batched_nms_torchvision_order));
}
