// dense_focal_loss: RetinaNet's sigmoid focal loss (torchvision.ops.sigmoid_focal_loss, reduction "sum") of
// every image, from one class label per anchor instead of a one-hot [anchors, classes] target:
//   label c >= 0: a foreground anchor of class c (target 1 at class c, 0 at the others);
//   kBackground (-1): target 0 at every class;  kIgnored (-2): no loss (torchvision's BETWEEN_THRESHOLDS).
// Forward gives the per-image sums [B], accumulated in float64; backward the gradient of the logits. The math of
// one logit: focal_math.h.
// Schema and checks: focal_loss.cpp; kernels: cpu/focal_loss.cpp, cuda/focal_loss.cu; fake: rpn_ops/_meta.py.
#pragma once

#include <ATen/ATen.h>

#include "focal_math.h"

namespace rpn_ops {

constexpr int64_t kBackground = -1;
constexpr int64_t kIgnored = -2;

// The opmath type S of a logit type (float for float16 / bfloat16 / float32, double for double) and the integer
// lanes I of focal_math.h's float functions.
template <typename scalar_t>
struct FocalTypes {
  using S = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using I = std::conditional_t<std::is_same_v<scalar_t, double>, int64_t, int32_t>;
};

// Validates the inputs ([B, A, C] floating logits, [B, A] int64 labels in [-2, C) on the same device, alpha in
// [0, 1] or -1, a finite gamma) and, when given, the gradient: [B] floating, on the logits' device.
void check_focal_loss_inputs(const at::Tensor& class_logits, const at::Tensor& anchor_labels, double alpha,
                             double gamma, const at::Tensor* grad = nullptr);

}  // namespace rpn_ops
