#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace rpn_ops {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_box_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a_name,
              " on ", a.device(), " and ", b_name, " on ", b.device());
}

void check_count(int64_t n, const char* name) {
  TORCH_CHECK(n <= kMaxBoxes, name, " holds ", n, " boxes; at most ", kMaxBoxes, " are supported");
}

}  // namespace

void check_boxes(const at::Tensor& boxes, const char* name) {
  TORCH_CHECK(boxes.dim() == 2, name, " must be a 2-D tensor of shape [N, 4], got ", boxes.dim(),
              "-D with shape ", boxes.sizes());
  TORCH_CHECK(boxes.size(1) == 4, name, " must have shape [N, 4] (x1, y1, x2, y2), got shape ", boxes.sizes());
  check_box_dtype(boxes, name);
  check_count(boxes.size(0), name);
}

void check_threshold(double threshold, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(threshold), name, " must be a finite number, got ", threshold);
}

int64_t max_output_or(const std::optional<int64_t>& max_output, int64_t no_limit) {
  if (!max_output.has_value()) return no_limit;
  TORCH_CHECK_VALUE(*max_output >= 0, "max_output must be None or >= 0, got ", *max_output);
  return std::min(*max_output, no_limit);
}

void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                      const std::optional<int64_t>& max_output) {
  check_boxes(boxes, "boxes");
  TORCH_CHECK(scores.dim() == 1, "scores must be a 1-D tensor of shape [N], got ", scores.dim(),
              "-D with shape ", scores.sizes());
  TORCH_CHECK(scores.size(0) == boxes.size(0), "scores must have one entry per box: boxes has ",
              boxes.size(0), " boxes but scores has ", scores.size(0), " entries");
  check_box_dtype(scores, "scores");
  TORCH_CHECK_TYPE(scores.scalar_type() == boxes.scalar_type(), "boxes and scores must have the same dtype, got ",
                   boxes.scalar_type(), " and ", scores.scalar_type());
  check_same_device(boxes, "boxes", scores, "scores");
  check_threshold(iou_threshold, "iou_threshold");
  max_output_or(max_output, 0);
}

void check_batched_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold, const std::optional<int64_t>& max_output) {
  check_nms_inputs(boxes, scores, iou_threshold, max_output);
  TORCH_CHECK(idxs.dim() == 1, "idxs must be a 1-D tensor of shape [N], got ", idxs.dim(), "-D with shape ",
              idxs.sizes());
  TORCH_CHECK(idxs.size(0) == boxes.size(0), "idxs must have one category per box: boxes has ", boxes.size(0),
              " boxes but idxs has ", idxs.size(0), " entries");
  TORCH_CHECK_TYPE(at::isIntegralType(idxs.scalar_type(), /*includeBool=*/false),
                   "idxs must be an integer tensor (int64, int32, ...), got ", idxs.scalar_type());
  check_same_device(boxes, "boxes", idxs, "idxs");
}

std::vector<int64_t> check_box_iou_inputs(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  for (const auto& [boxes, name] : {std::pair<const at::Tensor&, const char*>{boxes1, "boxes1"}, {boxes2, "boxes2"}}) {
    TORCH_CHECK(boxes.dim() >= 2, name, " must have shape [..., N, 4], got ", boxes.dim(), "-D with shape ",
                boxes.sizes());
    TORCH_CHECK(boxes.size(-1) == 4, name, " must have shape [..., N, 4] (x1, y1, x2, y2), got shape ",
                boxes.sizes());
    check_box_dtype(boxes, name);
  }
  TORCH_CHECK_TYPE(boxes1.scalar_type() == boxes2.scalar_type(), "boxes1 and boxes2 must have the same dtype, got ",
                   boxes1.scalar_type(), " and ", boxes2.scalar_type());
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  // Leading (batch) dimensions broadcast against each other, as in torchvision's box_iou.
  const int64_t batch_dims = std::max(boxes1.dim(), boxes2.dim()) - 2;
  std::vector<int64_t> batch(batch_dims, 1);
  for (int64_t d = 0; d < batch_dims; ++d) {
    const int64_t from_end = batch_dims - d;  // position counted from the last batch dimension
    const int64_t s1 = from_end <= boxes1.dim() - 2 ? boxes1.size(boxes1.dim() - 2 - from_end) : 1;
    const int64_t s2 = from_end <= boxes2.dim() - 2 ? boxes2.size(boxes2.dim() - 2 - from_end) : 1;
    TORCH_CHECK(s1 == s2 || s1 == 1 || s2 == 1, "the batch dimensions of boxes1 ", boxes1.sizes(),
                " and boxes2 ", boxes2.sizes(), " do not broadcast");
    batch[d] = s1 == 1 ? s2 : s1;
  }
  return batch;
}

at::Tensor as_batched_boxes(const at::Tensor& boxes, const std::vector<int64_t>& batch, at::ScalarType type) {
  std::vector<int64_t> shape = batch;
  shape.push_back(boxes.size(-2));
  shape.push_back(4);
  return boxes.to(type).expand(shape).reshape({-1, boxes.size(-2), 4}).contiguous();
}

at::ScalarType compute_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace rpn_ops
