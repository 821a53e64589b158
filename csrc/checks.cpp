#include "checks.h"

#include <ATen/ops/empty.h>
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

std::vector<AnchorLevel> check_grid_anchors_inputs(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level,
                                                   at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                                   int64_t num_images, int64_t& total_anchors) {
  TORCH_CHECK(cell_anchors.dim() == 2 && cell_anchors.size(1) == 4,
              "cell_anchors must have shape [cells, 4] (x1, y1, x2, y2), got shape ", cell_anchors.sizes());
  check_box_dtype(cell_anchors, "cell_anchors");
  const int64_t levels = static_cast<int64_t>(cells_per_level.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grid_sizes.size()) == 2 * levels,
                    "grid_sizes must hold (height, width) for each of the ", levels, " levels, got ",
                    grid_sizes.size(), " values");
  TORCH_CHECK_VALUE(static_cast<int64_t>(strides.size()) == 2 * levels,
                    "strides must hold (stride_y, stride_x) for each of the ", levels, " levels, got ",
                    strides.size(), " values");
  TORCH_CHECK_VALUE(num_images >= 0, "num_images must be >= 0, got ", num_images);
  std::vector<AnchorLevel> layout;
  int64_t first_cell = 0;
  total_anchors = 0;
  for (int64_t l = 0; l < levels; ++l) {
    const int64_t cells = cells_per_level[l], height = grid_sizes[2 * l], width = grid_sizes[2 * l + 1];
    TORCH_CHECK_VALUE(cells >= 0, "cells_per_level[", l, "] must be >= 0, got ", cells);
    TORCH_CHECK_VALUE(height >= 0 && width >= 0, "the grid size of level ", l, " must be >= 0, got (", height,
                      ", ", width, ")");
    TORCH_CHECK_VALUE(strides[2 * l] >= 0 && strides[2 * l + 1] >= 0, "the strides of level ", l,
                      " must be >= 0, got (", strides[2 * l], ", ", strides[2 * l + 1], ")");
    const double level_anchors = static_cast<double>(height) * static_cast<double>(width) * cells;
    TORCH_CHECK_VALUE(static_cast<double>(total_anchors) + level_anchors <= static_cast<double>(kMaxBoxes),
                      "the anchors of all levels pass ", kMaxBoxes, " per image (level ", l, ": ", height, " x ",
                      width, " x ", cells, ")");
    layout.push_back({total_anchors, width, strides[2 * l], strides[2 * l + 1], first_cell, cells});
    total_anchors += height * width * cells;
    first_cell += cells;
  }
  TORCH_CHECK_VALUE(first_cell == cell_anchors.size(0), "cells_per_level sums to ", first_cell,
                    " but cell_anchors has ", cell_anchors.size(0), " rows");
  TORCH_CHECK_VALUE(num_images == 0 || static_cast<double>(total_anchors) * num_images * 4 < 9.2e18,
                    "num_images x anchors overflows");
  return layout;
}

void check_weights(at::ArrayRef<double> weights) {
  TORCH_CHECK_VALUE(weights.size() == 4, "weights must hold 4 numbers (wx, wy, ww, wh), got ", weights.size());
  for (double w : weights) {
    TORCH_CHECK_VALUE(std::isfinite(w) && w > 0, "weights must be finite and > 0, got ", weights);
  }
}

void check_decode_inputs(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                         double bbox_xform_clip) {
  TORCH_CHECK(rel_codes.dim() == 2 && rel_codes.size(1) % 4 == 0,
              "rel_codes must have shape [N, 4 * K] (dx, dy, dw, dh per class), got shape ", rel_codes.sizes());
  check_box_dtype(rel_codes, "rel_codes");
  check_boxes(boxes, "boxes");
  TORCH_CHECK(rel_codes.size(0) == boxes.size(0), "rel_codes must have one row per box: boxes has ",
              boxes.size(0), " boxes but rel_codes has ", rel_codes.size(0), " rows");
  check_same_device(rel_codes, "rel_codes", boxes, "boxes");
  check_weights(weights);
  TORCH_CHECK_VALUE(!std::isnan(bbox_xform_clip), "bbox_xform_clip must be a number, got NaN");
}

void check_encode_inputs(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                         at::ArrayRef<double> weights) {
  check_boxes(reference_boxes, "reference_boxes");
  check_boxes(proposals, "proposals");
  TORCH_CHECK(reference_boxes.size(0) == proposals.size(0), "reference_boxes and proposals must have the same ",
              "number of boxes, got ", reference_boxes.size(0), " and ", proposals.size(0));
  check_same_device(reference_boxes, "reference_boxes", proposals, "proposals");
  check_weights(weights);
}

void check_matching_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                           at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                           bool empty_gt_allowed) {
  check_boxes(gt_boxes, "gt_boxes");
  check_boxes(anchors, "anchors");
  check_same_device(gt_boxes, "gt_boxes", anchors, "anchors");
  for (const auto& [value, name] : {std::pair<double, const char*>{high_threshold, "high_threshold"},
                                    {low_threshold, "low_threshold"}}) {
    TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be a finite number >= 0, got ", value);
  }
  TORCH_CHECK_VALUE(low_threshold <= high_threshold, "low_threshold must be <= high_threshold, got low ",
                    low_threshold, " and high ", high_threshold);
  TORCH_CHECK_VALUE(gt_per_image.size() == anchors_per_image.size(), "one ground-truth count and one anchor count ",
                    "per image are needed, got ", gt_per_image.size(), " and ", anchors_per_image.size());
  int64_t gt_total = 0, anchor_total = 0;
  for (size_t image = 0; image < gt_per_image.size(); ++image) {
    const int64_t gts = gt_per_image[image], anchor_count = anchors_per_image[image];
    TORCH_CHECK_VALUE(gts >= 0 && anchor_count >= 0, "image ", image, " has a negative box count (", gts,
                      " ground-truth boxes, ", anchor_count, " anchors)");
    TORCH_CHECK_VALUE(empty_gt_allowed || gts > 0, "image ", image, " has no ground-truth boxes; torchvision's ",
                      "Matcher refuses that too (assign_targets gives such images all-background labels)");
    TORCH_CHECK_VALUE(gts == 0 || anchor_count > 0, "image ", image, " has ", gts,
                      " ground-truth boxes but no anchors to match them to");
    gt_total += gts;
    anchor_total += anchor_count;
  }
  TORCH_CHECK_VALUE(gt_total == gt_boxes.size(0), "the ground-truth counts per image sum to ", gt_total,
                    " but gt_boxes has ", gt_boxes.size(0), " boxes");
  TORCH_CHECK_VALUE(anchor_total == anchors.size(0), "the anchor counts per image sum to ", anchor_total,
                    " but anchors has ", anchors.size(0), " boxes");
}

void check_assign_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                         at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                         at::ArrayRef<double> weights) {
  check_matching_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                        /*empty_gt_allowed=*/true);
  check_weights(weights);
}

void check_fcos_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                       at::IntArrayRef anchors_per_image, at::IntArrayRef anchors_per_level, double radius) {
  check_matching_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, 0.0, 0.0, /*empty_gt_allowed=*/true);
  TORCH_CHECK_TYPE(gt_boxes.scalar_type() == anchors.scalar_type() &&
                       (anchors.scalar_type() == at::kFloat || anchors.scalar_type() == at::kDouble),
                   "match_fcos computes in the boxes' dtype: gt_boxes and anchors must both be float32 or both ",
                   "float64, got ", gt_boxes.scalar_type(), " and ", anchors.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(radius), "center_sampling_radius must be a finite number, got ", radius);
  TORCH_CHECK_VALUE(!anchors_per_level.empty(), "anchors_per_level needs one count per level, got none");
  int64_t level_total = 0;
  for (const int64_t count : anchors_per_level) {
    TORCH_CHECK_VALUE(count >= 0, "anchors_per_level must be counts >= 0, got ", anchors_per_level);
    level_total += count;
  }
  for (size_t image = 0; image < anchors_per_image.size(); ++image) {
    TORCH_CHECK_VALUE(anchors_per_image[image] == level_total, "the anchors per level ", anchors_per_level,
                      " sum to ", level_total, " but image ", image, " has ", anchors_per_image[image], " anchors");
  }
}

FcosLevels fcos_levels(at::IntArrayRef anchors_per_level) {
  int64_t total = 0;
  for (const int64_t count : anchors_per_level) total += count;
  return {anchors_per_level.front(), anchors_per_level.back() == 0 ? 0 : total - anchors_per_level.back()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_assign_outputs(const at::Tensor& gt_boxes,
                                                                    const at::Tensor& anchors, bool float32_log) {
  const int64_t n = anchors.size(0);
  const auto target_type =
      coding_output_type(at::promoteTypes(gt_boxes.scalar_type(), anchors.scalar_type()), float32_log);
  return {at::empty({n}, anchors.options().dtype(at::kFloat)), at::empty({n, 4}, gt_boxes.options()),
          at::empty({n, 4}, anchors.options().dtype(target_type))};
}

void fail_non_finite_boxes(const char* name) {
  TORCH_CHECK_VALUE(false, name, " has a box with an infinite or NaN coordinate; target assignment needs finite ",
                    "boxes (torchvision would silently match such an anchor as foreground with NaN targets)");
}

at::ScalarType coding_output_type(at::ScalarType computed, bool float32_math) {
  return float32_math && (computed == at::kHalf || computed == at::kBFloat16) ? at::kFloat : computed;
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
