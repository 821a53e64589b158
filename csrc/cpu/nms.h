// CPU NMS entry points, for other CPU kernels (proposal generation) to call directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rpn_ops::cpu {

at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
               std::optional<int64_t> max_output);
at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                       double iou_threshold, std::optional<int64_t> max_output);

}  // namespace rpn_ops::cpu
