// Autocast. NMS family and box_iou: float16 / bfloat16 arguments are cast to float32, then the op runs with
// autocast off. The kernels already compute half precision in float32, so this only matters for mixed inputs
// (float16 scores with float32 boxes, as an autocast model produces them), which are valid under autocast.
// Box coding, target assignment and the focal loss: see below.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include "library.h"

namespace rpn_ops {
namespace {

template <c10::DeviceType device>
at::Tensor to_float(const at::Tensor& t) {
  return at::autocast::cached_cast(at::kFloat, t, device);
}

template <c10::DispatchKey key>
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{key};
};

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                        std::optional<int64_t> max_output) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("nms"), "")
                       .typed<decltype(nms_autocast<key, device>)>();
  return op.call(to_float<device>(boxes), to_float<device>(scores), iou_threshold, max_output);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor batched_nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                double iou_threshold, std::optional<int64_t> max_output) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("batched_nms"), "")
                       .typed<decltype(batched_nms_autocast<key, device>)>();
  return op.call(to_float<device>(boxes), to_float<device>(scores), idxs, iou_threshold, max_output);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor box_iou_autocast(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("box_iou"), "")
                       .typed<decltype(box_iou_autocast<key, device>)>();
  return op.call(to_float<device>(boxes1), to_float<device>(boxes2));
}

// Box coding casts nothing: it follows what CUDA autocast does to torchvision's plain-tensor arithmetic, which
// runs only torch.exp / torch.log in float32 (their float16 / bfloat16 inputs are cast, the results are
// float32). CPU autocast leaves exp / log alone, so the coding ops have no AutocastCPU kernel.
at::Tensor decode_boxes_autocast_cuda(const at::Tensor& rel_codes, const at::Tensor& boxes,
                                      at::ArrayRef<double> weights, double bbox_xform_clip, bool /*float32_exp*/) {
  NoAutocast<c10::DispatchKey::AutocastCUDA> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("decode_boxes"), "")
                       .typed<decltype(decode_boxes_autocast_cuda)>();
  return op.call(rel_codes, boxes, weights, bbox_xform_clip, /*float32_exp=*/true);
}

at::Tensor encode_boxes_autocast_cuda(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                                      at::ArrayRef<double> weights, bool /*float32_log*/) {
  NoAutocast<c10::DispatchKey::AutocastCUDA> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("encode_boxes"), "")
                       .typed<decltype(encode_boxes_autocast_cuda)>();
  return op.call(reference_boxes, proposals, weights, /*float32_log=*/true);
}

// Target assignment encodes as box coding does (the matching itself runs no autocast op in torchvision).
std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_targets_autocast_cuda(
    const at::Tensor& gt_boxes, const at::Tensor& anchors, c10::SymIntArrayRef gt_per_image,
    c10::SymIntArrayRef anchors_per_image, double high_threshold, double low_threshold, bool allow_low_quality_matches,
    at::ArrayRef<double> weights, bool /*float32_log*/) {
  NoAutocast<c10::DispatchKey::AutocastCUDA> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("assign_targets"), "")
                       .typed<decltype(assign_targets_autocast_cuda)>();
  return op.call(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                 allow_low_quality_matches, weights, /*float32_log=*/true);
}

// The focal loss runs in float32, as binary_cross_entropy_with_logits does under autocast (on both devices): the
// loss of float16 / bfloat16 logits is float32, and its gradient flows back through the cast.
template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor dense_focal_loss_autocast(const at::Tensor& class_logits, const at::Tensor& anchor_labels, double alpha,
                                     double gamma) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("dense_focal_loss"), "")
                       .typed<decltype(dense_focal_loss_autocast<key, device>)>();
  return op.call(to_float<device>(class_logits), anchor_labels, alpha, gamma);
}

}  // namespace

TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl("nms", TORCH_FN((nms_autocast<key, c10::DeviceType::CPU>)));
  m.impl("batched_nms", TORCH_FN((batched_nms_autocast<key, c10::DeviceType::CPU>)));
  m.impl("box_iou", TORCH_FN((box_iou_autocast<key, c10::DeviceType::CPU>)));
  m.impl("dense_focal_loss", TORCH_FN((dense_focal_loss_autocast<key, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl("nms", TORCH_FN((nms_autocast<key, c10::DeviceType::CUDA>)));
  m.impl("batched_nms", TORCH_FN((batched_nms_autocast<key, c10::DeviceType::CUDA>)));
  m.impl("box_iou", TORCH_FN((box_iou_autocast<key, c10::DeviceType::CUDA>)));
  m.impl("decode_boxes", TORCH_FN(decode_boxes_autocast_cuda));
  m.impl("encode_boxes", TORCH_FN(encode_boxes_autocast_cuda));
  m.impl("assign_targets", TORCH_FN(assign_targets_autocast_cuda));
  m.impl("dense_focal_loss", TORCH_FN((dense_focal_loss_autocast<key, c10::DeviceType::CUDA>)));
}

}  // namespace rpn_ops
