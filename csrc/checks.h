// Input validation shared by every backend: the CPU and CUDA kernels call the same checks, so a bad input
// gets the same message on both devices.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#include <vector>

#include "box_coding.h"

namespace rpn_ops {

// The largest box count a kernel accepts; it keeps every index and count in int32 on the GPU.
constexpr int64_t kMaxBoxes = (int64_t{1} << 31) - 1;

// boxes: [N, 4] of float16 / bfloat16 / float32 / float64.
void check_boxes(const at::Tensor& boxes, const char* name);
// A finite threshold, as a double.
void check_threshold(double threshold, const char* name);
// max_output: absent or >= 0; returns the number of kept boxes the caller may stop at.
int64_t max_output_or(const std::optional<int64_t>& max_output, int64_t no_limit);

void check_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                      const std::optional<int64_t>& max_output);
void check_batched_nms_inputs(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                              double iou_threshold, const std::optional<int64_t>& max_output);
// Anchor generation: checks the specification and returns each level's layout (AnchorLevel, box_coding.h)
// and, last, the total anchor count per image.
std::vector<AnchorLevel> check_grid_anchors_inputs(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level,
                                                   at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                                   int64_t num_images, int64_t& total_anchors);
// Box coder weights: 4 finite numbers > 0.
void check_weights(at::ArrayRef<double> weights);
void check_decode_inputs(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                         double bbox_xform_clip);
void check_encode_inputs(const at::Tensor& reference_boxes, const at::Tensor& proposals,
                         at::ArrayRef<double> weights);
// The output dtype of decode (float32_exp) and encode (float32_log): float32 for float16 / bfloat16 when the
// exponential / logarithm runs in float32, else the computation's dtype.
at::ScalarType coding_output_type(at::ScalarType computed, bool float32_math);

// Target assignment: ground-truth boxes [sum G_i, 4] and anchors [sum A_i, 4] of a batch of images, with
// their per-image counts; finite thresholds 0 <= low <= high. match_anchors (empty_gt_allowed false) needs
// ground truth and anchors in every image, as torchvision's Matcher; assign_targets gives images without
// ground truth all-background labels. The boxes' values are checked by the kernels (non-finite: an error).
void check_matching_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                           at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                           bool empty_gt_allowed);
void check_assign_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                         at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                         at::ArrayRef<double> weights);
// match_fcos: boxes and anchors of one dtype (float32 or float64), laid out as for match_anchors (images without
// ground truth allowed), every image's anchors being the levels of anchors_per_level; a finite radius.
void check_fcos_inputs(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                       at::IntArrayRef anchors_per_image, at::IntArrayRef anchors_per_level, double radius);
// Where match_fcos' bounds change, in every image's anchors: the first level ends at `first_level_end` (no lower
// bound before), the last begins at `last_level_begin` (no upper bound from there; 0 when the last level has no
// anchors, as torchvision's slice [-0:] takes every anchor).
struct FcosLevels {
  int64_t first_level_end, last_level_begin;
};
FcosLevels fcos_levels(at::IntArrayRef anchors_per_level);
// assign_targets' outputs, uninitialised: labels float32 [A], matched ground truth [A, 4] of gt_boxes' dtype,
// regression targets [A, 4] of encode's dtype (the ground truth as reference boxes).
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_assign_outputs(const at::Tensor& gt_boxes,
                                                                    const at::Tensor& anchors, bool float32_log);
// What a kernel reports when a box has an infinite or NaN coordinate.
void fail_non_finite_boxes(const char* name);

// Returns the broadcast batch shape of the two [..., N, 4] and [..., M, 4] inputs.
std::vector<int64_t> check_box_iou_inputs(const at::Tensor& boxes1, const at::Tensor& boxes2);

// [..., count, 4] boxes broadcast to the batch shape from check_box_iou_inputs, as a contiguous
// [batch entries, count, 4] tensor of the compute type: what the box_iou kernels of both devices read.
at::Tensor as_batched_boxes(const at::Tensor& boxes, const std::vector<int64_t>& batch, at::ScalarType type);

// float16 / bfloat16 are computed in float32; float32 and float64 in their own type.
at::ScalarType compute_type(at::ScalarType input);

}  // namespace rpn_ops
