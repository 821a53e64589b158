// Schema of score_candidates and the steps its CPU and CUDA kernels share (score_candidates.h).
#include "score_candidates.h"

#include "library.h"

TORCH_LIBRARY_FRAGMENT(RPN_OPS_NAMESPACE, m) {
  m.def("score_candidates(Tensor logits, float score_thresh) -> (Tensor, Tensor)");
}

namespace rpn_ops {

void check_score_candidates_input(const at::Tensor& logits, double score_thresh) {
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()),
                   "score_candidates: logits must be a floating tensor (class logits), got ", logits.scalar_type());
  TORCH_CHECK_VALUE(!std::isnan(score_thresh), "score_candidates: score_thresh must be a number, got nan");
}

CandidateBound candidate_bound(c10::ScalarType type, double score_thresh) {
  if (type != at::kFloat && type != at::kDouble) return {false, 0.0};
  // The threshold as the comparison sees it: in the scores' dtype.
  const double t = type == at::kFloat ? static_cast<double>(static_cast<float>(score_thresh)) : score_thresh;
  if (!(t > 0.0 && t < 1.0)) return {false, 0.0};
  const double logit = std::log(t) - std::log1p(-t);
  // sigmoid(logit - margin) is about t - t (1 - t) margin: below t by far more than the sigmoid's rounding
  // (a few ulps of the score, relative `epsilon` each).
  const double epsilon = type == at::kFloat ? 1.2e-7 : 2.3e-16;
  const double margin = 1e-4 * (1.0 + std::abs(logit)) + 64.0 * epsilon / (1.0 - t);
  return {true, logit - margin};
}

std::tuple<at::Tensor, at::Tensor> above_threshold(const at::Tensor& scores, const at::Tensor& indices,
                                                   double score_thresh) {
  const at::Tensor kept = at::nonzero(scores > score_thresh).squeeze(1);
  return {scores.index_select(0, kept), indices.index_select(0, kept)};
}

std::tuple<at::Tensor, at::Tensor> score_candidates_by_sigmoid(const at::Tensor& logits, double score_thresh) {
  const at::Tensor scores = at::sigmoid(logits).flatten();
  const at::Tensor indices = at::nonzero(scores > score_thresh).squeeze(1);
  return {scores.index_select(0, indices), indices};
}

}  // namespace rpn_ops
