// Input validation and the per-level layout of proposal generation, shared by the CPU and CUDA kernels so a
// bad input gets the same message on both devices. Defined in proposals.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "box_coding.h"

namespace rpn_ops {

// Where each image's selected anchors live: level l keeps `selected[l]` = min(pre_nms_top_n, anchors[l]) of
// its anchors, at columns [first_selected[l], first_selected[l] + selected[l]) of the [images, total_selected]
// selection, in torchvision's order (images, then levels, then descending objectness).
struct ProposalLayout {
  int64_t images = 0;
  int64_t total_anchors = 0;   // per image
  int64_t total_selected = 0;  // per image
  std::vector<int64_t> first_anchor, anchors, first_selected, selected;
  std::vector<int64_t> heights, widths;   // per image
  std::vector<AnchorLevel> anchor_grid;   // the anchor specification's levels, when anchors are computed
  int64_t levels() const { return static_cast<int64_t>(anchors.size()); }
};

// Checks every argument of generate_proposals / generate_proposals_padded and returns the layout.
// anchors: one [A, 4] tensor shared by all images, one per image, or none with an anchor specification
// (cell_anchors, cells_per_level, grid_sizes, strides as grid_anchors takes them).
ProposalLayout check_proposal_inputs(const at::Tensor& objectness, const at::Tensor& pred_bbox_deltas,
                                     at::TensorList anchors, at::IntArrayRef image_sizes,
                                     at::IntArrayRef num_anchors_per_level, int64_t pre_nms_top_n,
                                     int64_t post_nms_top_n, double nms_thresh, double score_thresh,
                                     double min_size, const std::optional<at::Tensor>& cell_anchors,
                                     at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                                     at::IntArrayRef strides);

// image_sizes as (height, width) pairs: the heights and the widths, each >= 0.
std::tuple<std::vector<int64_t>, std::vector<int64_t>> check_image_sizes(at::IntArrayRef image_sizes);

// num_anchors_per_level checked (at least one level, counts >= 0, at most kMaxBoxes anchors in all): each level's
// first anchor within an image.
std::vector<int64_t> check_levels(at::IntArrayRef num_anchors_per_level);

// Where the anchors of `images` images come from, checked against num_anchors_per_level (A per image in all):
// one [A, 4] tensor for all images, one per image, or no tensor and the specification (cell_anchors ... strides,
// as grid_anchors takes it), whose levels are returned (else none). Everything on `input`'s device.
std::vector<AnchorLevel> check_anchor_source(at::TensorList anchors, const std::optional<at::Tensor>& cell_anchors,
                                             at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                                             at::IntArrayRef strides, at::IntArrayRef num_anchors_per_level,
                                             int64_t images, const at::Tensor& input, const char* input_name);

// The dtype of the proposals: decode's output dtype for the deltas' dtype (coding_output_type).
at::ScalarType proposal_box_type(const at::Tensor& pred_bbox_deltas, bool float32_exp);

// The selected boxes decoded as the RPN's BoxCoder decodes them (weights 1, clip log(1000 / 16)), through the
// decode_boxes operator of the codes' device.
at::Tensor decode_proposals(const at::Tensor& codes, const at::Tensor& boxes, bool float32_exp);

}  // namespace rpn_ops
