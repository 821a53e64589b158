// score_candidates on CUDA (what it computes: ../score_candidates.h): the logits above the candidate bound (all of
// them for a threshold outside (0, 1)), then the sigmoid of those alone, computed as torch.sigmoid's CUDA kernel
// computes every element (the same bits wherever the element lies), then the threshold. float16 / bfloat16:
// torchvision's steps.
#include <ATen/ATen.h>

#include "../score_candidates.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

template <typename T>
__global__ void sigmoid_at_kernel(const T* __restrict__ logits, const int64_t* __restrict__ indices, int64_t count,
                                  T* __restrict__ scores) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    scores[i] = sigmoid_of(logits[indices[i]]);
  }
}

std::tuple<at::Tensor, at::Tensor> score_candidates(const at::Tensor& logits, double score_thresh) {
  check_score_candidates_input(logits, score_thresh);
  const DeviceGuard guard(logits.device());
  const CandidateBound bound = candidate_bound(logits.scalar_type(), score_thresh);
  const bool computed_here = logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble;
  if (!computed_here) return score_candidates_by_sigmoid(logits, score_thresh);
  const at::Tensor flat = logits.contiguous().view(-1);
  // A threshold outside (0, 1) bounds nothing: every logit is a candidate.
  const at::Tensor indices = bound.fast ? at::nonzero(flat > bound.lower).squeeze(1)
                                        : at::arange(flat.numel(), flat.options().dtype(at::kLong));
  const int64_t count = indices.numel();
  at::Tensor scores = at::empty({count}, flat.options());
  if (count > 0) {
    AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "rpn_ops_score_candidates_cuda", [&] {
      launch<sigmoid_at_kernel<scalar_t>>(blocks_for(count), kThreads, 0, flat.data_ptr<scalar_t>(),
                                          indices.data_ptr<int64_t>(), count, scores.data_ptr<scalar_t>());
    });
  }
  return above_threshold(scores, indices, score_thresh);
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("score_candidates", TORCH_FN(score_candidates));
}

}  // namespace rpn_ops::cuda
