// Autocast: float16 / bfloat16 arguments are cast to float32, then the op runs with autocast off.
// The kernels already compute half precision in float32, so this only matters for mixed inputs
// (float16 scores with float32 boxes, as an autocast model produces them), which are valid under autocast.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

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
                       .findSchemaOrThrow("rpn_ops::nms", "")
                       .typed<decltype(nms_autocast<key, device>)>();
  return op.call(to_float<device>(boxes), to_float<device>(scores), iou_threshold, max_output);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor batched_nms_autocast(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                                double iou_threshold, std::optional<int64_t> max_output) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rpn_ops::batched_nms", "")
                       .typed<decltype(batched_nms_autocast<key, device>)>();
  return op.call(to_float<device>(boxes), to_float<device>(scores), idxs, iou_threshold, max_output);
}

template <c10::DispatchKey key, c10::DeviceType device>
at::Tensor box_iou_autocast(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  NoAutocast<key> off;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("rpn_ops::box_iou", "")
                       .typed<decltype(box_iou_autocast<key, device>)>();
  return op.call(to_float<device>(boxes1), to_float<device>(boxes2));
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, AutocastCPU, m) {
  constexpr auto key = c10::DispatchKey::AutocastCPU;
  m.impl("nms", TORCH_FN((nms_autocast<key, c10::DeviceType::CPU>)));
  m.impl("batched_nms", TORCH_FN((batched_nms_autocast<key, c10::DeviceType::CPU>)));
  m.impl("box_iou", TORCH_FN((box_iou_autocast<key, c10::DeviceType::CPU>)));
}

TORCH_LIBRARY_IMPL(rpn_ops, AutocastCUDA, m) {
  constexpr auto key = c10::DispatchKey::AutocastCUDA;
  m.impl("nms", TORCH_FN((nms_autocast<key, c10::DeviceType::CUDA>)));
  m.impl("batched_nms", TORCH_FN((batched_nms_autocast<key, c10::DeviceType::CUDA>)));
  m.impl("box_iou", TORCH_FN((box_iou_autocast<key, c10::DeviceType::CUDA>)));
}

}  // namespace rpn_ops
