// score_candidates on the CPU (what it computes: ../score_candidates.h). One pass over the logits finds the few
// that can pass the threshold; only those get a sigmoid, by PyTorch's own kernels, each by the path that
// torch.sigmoid of the whole tensor takes at its position (SigmoidPaths): torchvision's bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "../score_candidates.h"
#include "parallel.h"
#include "simd_kernels.h"

namespace rpn_ops::cpu {
namespace {

// How torch.sigmoid computes a contiguous tensor of `numel` elements. TensorIterator gives each of
// min(threads, ceil(numel / 32768)) threads an equal chunk (at::parallel_for; one chunk up to 32768 elements
// or with one thread); each chunk's loop runs the vectorised operator over whole blocks of two vectors
// (`unroll` elements) and the scalar operator over the rest. The two round differently: on AVX-512, 1 score
// in 100 among detection logits (SLEEF's exp against glibc's).
struct SigmoidPaths {
  int64_t numel, chunk, unroll;

  bool scalar(int64_t i) const {
    const int64_t begin = i / chunk * chunk, size = std::min(numel, begin + chunk) - begin;
    return i - begin >= size - size % unroll;
  }
};

// Elements per unrolled block of torch's vectorised loop at the instruction set it dispatches to, where we know
// it (x86; without AVX its vectors compute lane by lane with the scalar functions, so every split gives the
// same bits); elsewhere nullopt, and torchvision's steps run.
std::optional<int64_t> vector_unroll(c10::ScalarType type) {
#if defined(__x86_64__) || defined(_M_X64)
  const std::string capability = at::get_cpu_capability();
  const int64_t element_bytes = type == at::kDouble ? 8 : 4;
  if (capability == "AVX512") return 2 * 64 / element_bytes;
  if (capability == "AVX2" || capability == "DEFAULT" || capability == "NO AVX") return 2 * 32 / element_bytes;
#endif
  return std::nullopt;
}

SigmoidPaths sigmoid_paths(int64_t numel, int64_t unroll) {
  int64_t chunk = numel;
  const int64_t threads = at::get_num_threads();
  if (numel > at::internal::GRAIN_SIZE && threads > 1 && !at::in_parallel_region()) {
    const int64_t grain = at::internal::GRAIN_SIZE;
    const int64_t tasks = std::min<int64_t>(threads, (numel + grain - 1) / grain);
    chunk = (numel + tasks - 1) / tasks;
  }
  return {numel, std::max<int64_t>(chunk, 1), unroll};
}

constexpr double kScanNanoseconds = 0.25;  // per logit, measured single-threaded

// Flat indices of the logits above `lower`, in index order.
template <typename T>
std::vector<int64_t> indices_above(const T* logits, int64_t numel, T lower) {
  const IndicesAbove<T> scan = kernels_for<T>(current_isa()).indices_above;
  constexpr int64_t grain = grain_for(kScanNanoseconds, 64);  // whole vectors
  std::vector<std::vector<int64_t>> found((numel + grain - 1) / grain);  // one list per piece
  parallel_for(numel, grain, [&](int64_t begin, int64_t end) { scan(logits, begin, end, lower, found[begin / grain]); });
  std::vector<int64_t> all;
  for (const auto& piece : found) all.insert(all.end(), piece.begin(), piece.end());
  return all;
}

// torch.sigmoid of values packed contiguously: its vectorised path for every value (pieces far below the
// threading grain, each a whole number of unrolled blocks).
at::Tensor vector_sigmoid(const at::Tensor& values) {
  constexpr int64_t kPiece = 16384;
  const int64_t padded = (values.numel() + 63) / 64 * 64;
  at::Tensor buffer = at::empty({padded}, values.options());
  buffer.narrow(0, 0, values.numel()).copy_(values);
  buffer.narrow(0, values.numel(), padded - values.numel()).zero_();
  for (int64_t begin = 0; begin < padded; begin += kPiece) {
    buffer.narrow(0, begin, std::min(kPiece, padded - begin)).sigmoid_();
  }
  return buffer.narrow(0, 0, values.numel());
}

// torch.sigmoid of values at stride 2: not contiguous, so its scalar path for every value.
at::Tensor scalar_sigmoid(const at::Tensor& values) {
  at::Tensor buffer = at::zeros({2 * values.numel()}, values.options());
  at::Tensor strided = buffer.as_strided({values.numel()}, {2});
  strided.copy_(values);
  return at::sigmoid(strided);
}

std::tuple<at::Tensor, at::Tensor> score_candidates(const at::Tensor& logits, double score_thresh) {
  check_score_candidates_input(logits, score_thresh);
  const CandidateBound bound = candidate_bound(logits.scalar_type(), score_thresh);
  const std::optional<int64_t> unroll = vector_unroll(logits.scalar_type());
  if (!bound.fast || !unroll) return score_candidates_by_sigmoid(logits, score_thresh);
  const at::Tensor flat = logits.contiguous().view(-1);
  const SigmoidPaths paths = sigmoid_paths(flat.numel(), *unroll);
  return AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "rpn_ops_score_candidates", [&] {
    const scalar_t* x = flat.data_ptr<scalar_t>();
    const std::vector<int64_t> candidates =
        indices_above<scalar_t>(x, flat.numel(), static_cast<scalar_t>(bound.lower));
    std::vector<scalar_t> vector_values, scalar_values;
    for (const int64_t i : candidates) (paths.scalar(i) ? scalar_values : vector_values).push_back(x[i]);
    const auto options = flat.options();
    const at::Tensor vector_scores =
        vector_sigmoid(at::from_blob(vector_values.data(), {static_cast<int64_t>(vector_values.size())}, options));
    const at::Tensor scalar_scores =
        scalar_sigmoid(at::from_blob(scalar_values.data(), {static_cast<int64_t>(scalar_values.size())}, options));
    // In index order again, keeping the scores above the threshold (compared in scalar_t, as torch compares).
    at::Tensor scores = at::empty({static_cast<int64_t>(candidates.size())}, options);
    at::Tensor indices = at::empty({static_cast<int64_t>(candidates.size())}, options.dtype(at::kLong));
    scalar_t* s = scores.data_ptr<scalar_t>();
    int64_t* idx = indices.data_ptr<int64_t>();
    const scalar_t* vector_next = vector_scores.data_ptr<scalar_t>();
    const scalar_t* scalar_next = scalar_scores.data_ptr<scalar_t>();
    const scalar_t threshold = static_cast<scalar_t>(score_thresh);
    int64_t kept = 0;
    for (const int64_t i : candidates) {
      const scalar_t score = paths.scalar(i) ? *scalar_next++ : *vector_next++;
      if (score > threshold) {
        s[kept] = score;
        idx[kept++] = i;
      }
    }
    return std::make_tuple(scores.narrow(0, 0, kept), indices.narrow(0, 0, kept));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("score_candidates", TORCH_FN(score_candidates));
}

}  // namespace rpn_ops::cpu
