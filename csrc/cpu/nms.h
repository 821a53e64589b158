// CPU NMS entry points, for other CPU kernels (proposal generation) to call directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rpn_ops::cpu {

at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
               std::optional<int64_t> max_output);
// Greedy NMS of n contiguous [n, 4] boxes of type T (float or double), visiting them in the order
// box_of_rank (n distinct indices) instead of by score; writes the first max_output kept indices to keep and
// returns how many. Single-threaded: callers run many of these in parallel (one per image and level).
template <typename T>
int64_t nms_in_order(const T* boxes, int64_t n, const int64_t* box_of_rank, double iou_threshold,
                     int64_t max_output, int64_t* keep);
at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                       double iou_threshold, std::optional<int64_t> max_output);

}  // namespace rpn_ops::cpu
