// Schema and checks of dense_focal_loss (what it computes: focal_loss.h).
#include "focal_loss.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>

#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("dense_focal_loss(Tensor class_logits, Tensor anchor_labels, float alpha=0.25, float gamma=2.0) -> Tensor");
  m.def("dense_focal_loss_backward(Tensor grad, Tensor class_logits, Tensor anchor_labels, float alpha, "
        "float gamma) -> Tensor");
}

namespace rpn_ops {

void check_focal_loss_inputs(const at::Tensor& class_logits, const at::Tensor& anchor_labels, double alpha,
                             double gamma, const at::Tensor* grad) {
  constexpr const char* op = "dense_focal_loss: ";
  TORCH_CHECK(class_logits.dim() == 3, op, "class_logits must have shape [images, anchors, classes], got shape ",
              class_logits.sizes());
  const at::ScalarType type = class_logits.scalar_type();
  TORCH_CHECK_TYPE(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16, op,
                   "class_logits must be float16, bfloat16, float32 or float64, got ", type);
  TORCH_CHECK_TYPE(anchor_labels.scalar_type() == at::kLong, op, "anchor_labels must be int64 (a class per anchor, ",
                   kBackground, " background, ", kIgnored, " ignored), got ", anchor_labels.scalar_type());
  TORCH_CHECK(anchor_labels.dim() == 2 && anchor_labels.size(0) == class_logits.size(0) &&
                  anchor_labels.size(1) == class_logits.size(1),
              op, "anchor_labels must have shape [images, anchors] = [", class_logits.size(0), ", ",
              class_logits.size(1), "] (one label per anchor of class_logits), got shape ", anchor_labels.sizes());
  TORCH_CHECK(anchor_labels.device() == class_logits.device(), op,
              "class_logits and anchor_labels must be on the same device, got ", class_logits.device(), " and ",
              anchor_labels.device());
  TORCH_CHECK_VALUE((alpha >= 0.0 && alpha <= 1.0) || alpha == -1.0, op,
                    "alpha must be in [0, 1], or -1 for no weighting, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(gamma), op, "gamma must be a finite number, got ", gamma);
  if (grad != nullptr) {
    TORCH_CHECK(grad->dim() == 1 && grad->size(0) == class_logits.size(0), op,
                "the gradient must have shape [images] = [", class_logits.size(0), "], got ", grad->sizes());
    TORCH_CHECK(grad->device() == class_logits.device(), op, "the gradient must be on ", class_logits.device(),
                " (the logits' device), got ", grad->device());
    TORCH_CHECK_TYPE(at::isFloatingType(grad->scalar_type()), op, "the gradient must be a floating tensor, got ",
                     grad->scalar_type());
  }
  if (anchor_labels.numel() > 0) {  // one device-to-host copy of two numbers on CUDA
    const auto [lowest, highest] = at::aminmax(anchor_labels);
    const at::Tensor range = at::stack({lowest, highest}).cpu();
    const int64_t low = range[0].item<int64_t>(), high = range[1].item<int64_t>();
    const int64_t classes = class_logits.size(2);
    TORCH_CHECK_VALUE(low >= kIgnored && high < classes, op, "anchor_labels must be a class in [0, ", classes,
                      "), ", kBackground, " (background) or ", kIgnored, " (ignored), got values in [", low, ", ",
                      high, "]");
  }
}

}  // namespace rpn_ops
