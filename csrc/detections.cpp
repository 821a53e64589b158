// Schema of dense_detections and its checks (what it computes: detections.h).
#include "detections.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <string>

#include "checks.h"
#include "library.h"
#include "proposals_checks.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def(
      "dense_detections(Tensor class_logits, Tensor box_regression, Tensor[] anchors, int[] image_sizes, "
      "int[] num_anchors_per_level, float score_thresh, int topk_candidates, float nms_thresh, "
      "int detections_per_img, float[] weights, float bbox_xform_clip, str activation, str topk_per, "
      "Tensor? cell_anchors=None, int[] cells_per_level=[], int[] grid_sizes=[], int[] strides=[], "
      "Tensor? centerness=None, str box_coding=\"deltas\") -> (Tensor boxes, Tensor scores, Tensor labels, "
      "Tensor counts)");
}

namespace rpn_ops {
namespace {

void check_float(const at::Tensor& t, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, name,
                   " must be float16, bfloat16, float32 or float64, got ", type);
}

}  // namespace

DetectionLayout check_detection_inputs(const at::Tensor& class_logits, const at::Tensor& box_regression,
                                       at::TensorList anchors, at::IntArrayRef image_sizes,
                                       at::IntArrayRef num_anchors_per_level, double score_thresh,
                                       int64_t topk_candidates, double nms_thresh, int64_t detections_per_img,
                                       at::ArrayRef<double> weights, double bbox_xform_clip,
                                       c10::string_view activation, c10::string_view topk_per,
                                       const std::optional<at::Tensor>& cell_anchors, at::IntArrayRef cells_per_level,
                                       at::IntArrayRef grid_sizes, at::IntArrayRef strides,
                                       const std::optional<at::Tensor>& centerness, c10::string_view box_coding) {
  DetectionLayout layout;
  std::tie(layout.heights, layout.widths) = check_image_sizes(image_sizes);
  layout.images = static_cast<int64_t>(layout.heights.size());
  TORCH_CHECK_VALUE(activation == "sigmoid" || activation == "softmax",
                    "activation must be \"sigmoid\" or \"softmax\", got \"", std::string(activation), "\"");
  TORCH_CHECK_VALUE(topk_per == "level" || topk_per == "class", "topk_per must be \"level\" or \"class\", got \"",
                    std::string(topk_per), "\"");
  TORCH_CHECK_VALUE(box_coding == "deltas" || box_coding == "linear",
                    "box_coding must be \"deltas\" or \"linear\", got \"", std::string(box_coding), "\"");
  layout.activation = activation == "softmax" ? Activation::kSoftmax : Activation::kSigmoid;
  layout.per_class = topk_per == "class";
  layout.coding = box_coding == "linear" ? BoxCoding::kLinear : BoxCoding::kDeltas;
  layout.centered = centerness.has_value();
  TORCH_CHECK_VALUE(!layout.centered || layout.activation == Activation::kSigmoid,
                    "centerness goes with activation=\"sigmoid\" (FCOS's scores), got \"", std::string(activation),
                    "\"");
  layout.first_anchor = check_levels(num_anchors_per_level);
  layout.level_anchors.assign(num_anchors_per_level.begin(), num_anchors_per_level.end());
  for (const int64_t count : layout.level_anchors) layout.anchors += count;
  TORCH_CHECK_VALUE(topk_candidates >= 0, "topk_candidates must be >= 0, got ", topk_candidates);
  TORCH_CHECK_VALUE(detections_per_img >= 0, "detections_per_img must be >= 0, got ", detections_per_img);
  layout.topk = topk_candidates;
  layout.detections = detections_per_img;
  TORCH_CHECK_VALUE(!std::isnan(score_thresh), "score_thresh must be a number, got nan");
  check_threshold(nms_thresh, "nms_thresh");
  check_weights(weights);
  TORCH_CHECK_VALUE(!std::isnan(bbox_xform_clip), "bbox_xform_clip must be a number, got NaN");

  check_float(class_logits, "class_logits");
  TORCH_CHECK(class_logits.dim() == 3 && class_logits.size(0) == layout.images &&
                  class_logits.size(1) == layout.anchors,
              "class_logits must have shape [B, A, C] with B = ", layout.images, " images (image_sizes) and A = ",
              layout.anchors, " anchors per image (sum of num_anchors_per_level), got ", class_logits.sizes());
  layout.classes = class_logits.size(2);
  TORCH_CHECK_VALUE(static_cast<double>(layout.anchors) * layout.classes <= static_cast<double>(kMaxBoxes),
                    "more than ", kMaxBoxes, " scores (anchors x classes) per image are not supported, got ",
                    layout.anchors, " x ", layout.classes);
  TORCH_CHECK_TYPE(box_regression.scalar_type() == class_logits.scalar_type(), "box_regression must have the dtype ",
                   "of class_logits (", class_logits.scalar_type(), "), got ", box_regression.scalar_type());
  TORCH_CHECK(box_regression.device() == class_logits.device(), "box_regression must be on the same device as ",
              "class_logits (", class_logits.device(), "), got ", box_regression.device());
  TORCH_CHECK(box_regression.dim() == 3 && box_regression.size(0) == layout.images &&
                  box_regression.size(1) == layout.anchors && box_regression.size(2) == 4,
              "box_regression must have shape [B, A, 4] with B = ", layout.images, " and A = ", layout.anchors,
              ", got ", box_regression.sizes());
  if (layout.centered) {
    const at::Tensor& c = *centerness;
    TORCH_CHECK_TYPE(c.scalar_type() == class_logits.scalar_type(), "centerness must have the dtype of class_logits (",
                     class_logits.scalar_type(), "), got ", c.scalar_type());
    TORCH_CHECK(c.device() == class_logits.device(), "centerness must be on the same device as class_logits (",
                class_logits.device(), "), got ", c.device());
    TORCH_CHECK((c.dim() == 2 || (c.dim() == 3 && c.size(2) == 1)) && c.size(0) == layout.images &&
                    c.size(1) == layout.anchors,
                "centerness must have shape [B, A] or [B, A, 1] with B = ", layout.images, " and A = ",
                layout.anchors, ", got ", c.sizes());
  }
  layout.anchor_grid = check_anchor_source(anchors, cell_anchors, cells_per_level, grid_sizes, strides,
                                           num_anchors_per_level, layout.images, class_logits, "class_logits");
  return layout;
}

at::Tensor centerness_logits(const at::Tensor& centerness) {
  return centerness.reshape({centerness.size(0), centerness.size(1)}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_detections(const at::Tensor& class_logits,
                                                                            const at::Tensor& box_regression,
                                                                            const DetectionLayout& layout) {
  const auto box_type = coding_output_type(box_regression.scalar_type(), /*float32_math=*/false);
  const auto long_options = class_logits.options().dtype(at::kLong);
  return {at::zeros({layout.images, layout.detections, 4}, box_regression.options().dtype(box_type)),
          at::zeros({layout.images, layout.detections}, class_logits.options()),
          at::zeros({layout.images, layout.detections}, long_options), at::zeros({layout.images}, long_options)};
}

at::Tensor decode_detections(const at::Tensor& codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                             double bbox_xform_clip) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(RPN_OPS_QUALIFIED("decode_boxes"), "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, double, bool)>();
  return op.call(codes, boxes, weights, bbox_xform_clip, /*float32_exp=*/false);
}

}  // namespace rpn_ops
