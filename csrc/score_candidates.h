// score_candidates: the class scores of one-stage detectors (RetinaNet, FCOS) above a threshold, with their
// flat indices, as torchvision's postprocess_detections finds them (torch.sigmoid(logits).flatten(), then
// `scores > threshold`, then the kept scores and torch.where's indices), without the sigmoid of every logit.
// Schema and shared steps: score_candidates.cpp; kernels: cpu/score_candidates.cpp, cuda/score_candidates.cu;
// fake: rpn_ops/_meta.py.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

#include "box_math.h"

namespace rpn_ops {

// 1 / (1 + exp(-x)), in the order torch.sigmoid's scalar (CPU) and CUDA kernels compute it: the same bits.
template <typename T>
RPN_INLINE T sigmoid_of(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// Logits at or below `lower` cannot have a sigmoid above the threshold: only the others are looked at.
// `fast` is false where the threshold leaves nothing to skip (<= 0: every score may pass; >= 1: none can) or
// the dtype is not float32 / float64; the kernels then take torchvision's steps (score_candidates_by_sigmoid).
struct CandidateBound {
  bool fast;
  double lower;
};
CandidateBound candidate_bound(c10::ScalarType type, double score_thresh);

void check_score_candidates_input(const at::Tensor& logits, double score_thresh);

// torchvision's steps, on any device: sigmoid of every logit, threshold, the kept scores and their indices.
std::tuple<at::Tensor, at::Tensor> score_candidates_by_sigmoid(const at::Tensor& logits, double score_thresh);

// The kept (score > threshold, compared in the scores' dtype as torch compares a tensor with a Python float)
// among the CUDA kernel's candidates: scores [k] and indices [k] of the candidates, filtered together.
std::tuple<at::Tensor, at::Tensor> above_threshold(const at::Tensor& scores, const at::Tensor& indices,
                                                   double score_thresh);

}  // namespace rpn_ops
