// dense_detections: the detections of a one-stage detector (RetinaNet, FCOS, SSD, and any head of class logits and
// box deltas over anchors), as torchvision's postprocess_detections computes them, for a batch in one call:
//  1. scores: sigmoid of every class logit (with centerness logits: FCOS's sqrt(sigmoid(class) *
//     sigmoid(centerness))), or softmax over the classes with class 0 the background (never kept);
//  2. candidates: the (anchor, class) pairs scoring above score_thresh, in groups (per level over anchors x classes,
//     or per class over all anchors), each group's best topk_candidates by descending score, equal scores lower
//     position first (position: anchor * classes + class within the level, or the anchor);
//  3. the candidates' deltas decoded against their anchors (torchvision's BoxCoder, or FCOS's BoxLinearCoder) and
//     clipped to the image;
//  4. per-class greedy NMS by descending score (equal scores in candidate order: groups in order, then rank), the
//     first detections_per_img kept.
// The outputs are padded: [B, D, 4] boxes, [B, D] scores and int64 labels (zeros past each image's count) and the
// [B] counts; CUDA computes them without a host synchronisation. Schema and checks: detections.cpp; kernels:
// cpu/detections.cpp, cuda/detections.cu; fake: rpn_ops/_meta.py; wrapper: rpn_ops/detections.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "box_coding.h"

namespace rpn_ops {

enum class Activation { kSigmoid, kSoftmax };
enum class BoxCoding { kDeltas, kLinear };  // BoxCoder(weights, bbox_xform_clip); BoxLinearCoder(normalize_by_size)

// The product under FCOS's score sqrt(sigmoid(class logit) * sigmoid(centerness logit)), from the two sigmoids,
// rounded to S as torchvision's tensor is. The square root is the device's: correctly rounded on CUDA; on the CPU
// PyTorch's vectorised sqrt (SLEEF's, within half an ulp and a little), which the CPU kernel calls.
template <typename S>
RPN_HD S centered_product(S class_score, S center_score) {
  using A = opmath_t<S>;
  return static_cast<S>(static_cast<A>(class_score) * static_cast<A>(center_score));
}

struct DetectionLayout {
  int64_t images = 0, anchors = 0, classes = 0;  // anchors and classes per image
  std::vector<int64_t> first_anchor, level_anchors;
  std::vector<int64_t> heights, widths;
  std::vector<AnchorLevel> anchor_grid;  // the anchor specification's levels, when anchors are computed
  Activation activation = Activation::kSigmoid;
  bool centered = false;   // sigmoid scores times the centerness' sigmoid, square-rooted (FCOS)
  BoxCoding coding = BoxCoding::kDeltas;
  bool per_class = false;  // groups: one per class (over all anchors), else one per level
  int64_t topk = 0, detections = 0;

  int64_t levels() const { return static_cast<int64_t>(level_anchors.size()); }
  // Softmax's class 0 is the background: never a candidate.
  int64_t first_class() const { return activation == Activation::kSoftmax ? 1 : 0; }
  int64_t groups() const { return per_class ? std::max<int64_t>(classes - first_class(), 0) : levels(); }
  // The positions of a group: a level's anchors x classes, or every anchor.
  int64_t group_positions(int64_t group) const { return per_class ? anchors : level_anchors[group] * classes; }
  // At most this many of a group's candidates are kept.
  int64_t group_limit(int64_t group) const { return std::min(topk, group_positions(group)); }
};

DetectionLayout check_detection_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                                       at::TensorList anchors, at::IntArrayRef image_sizes,
                                       at::IntArrayRef num_anchors_per_level, double score_thresh,
                                       int64_t topk_candidates, double nms_thresh, int64_t detections_per_img,
                                       at::ArrayRef<double> weights, double bbox_xform_clip,
                                       c10::string_view activation, c10::string_view topk_per,
                                       const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level,
                                       at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                       const std::optional<at::Tensor>& centerness, c10::string_view box_coding);

// The [B, A] centerness logits of a [B, A] or [B, A, 1] tensor, contiguous.
at::Tensor centerness_logits(const at::Tensor& centerness);

// The padded outputs, zero-filled: boxes [B, D, 4] of decode's dtype, scores [B, D] of the logits', labels [B, D]
// and counts [B] int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_detections(const at::Tensor& class_logits,
                                                                            const at::Tensor& box_regression,
                                                                            const DetectionLayout& layout);

// rel_codes decoded against boxes (of the codes' dtype) as torchvision's BoxCoder(weights, bbox_xform_clip), through
// the decode_boxes operator of their device.
at::Tensor decode_detections(const at::Tensor& codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                             double bbox_xform_clip);

}  // namespace rpn_ops
