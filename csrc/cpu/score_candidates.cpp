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
#include "score_scan.h"
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

  // Per index (ascending), whether it takes the scalar path: past the last whole unrolled block of its chunk.
  std::vector<uint8_t> scalar(const int64_t* indices, int64_t count) const {
    std::vector<uint8_t> flags(count);
    int64_t chunk_end = 0, vector_end = 0;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t i = indices[j];
      if (i >= chunk_end) {
        const int64_t begin = i / chunk * chunk;
        chunk_end = std::min(numel, begin + chunk);
        vector_end = chunk_end - (chunk_end - begin) % unroll;
      }
      flags[j] = i >= vector_end;
    }
    return flags;
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

// The scores above the threshold among `candidates` (indices into x[0, paths.numel), ascending), each computed as
// torch.sigmoid of those logits computes it there: (scores, indices).
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> kept_scores(const scalar_t* x, const SigmoidPaths& paths, const int64_t* candidates,
                                               int64_t count, double score_thresh, const at::TensorOptions& options) {
  const std::vector<uint8_t> on_scalar_path = paths.scalar(candidates, count);
  std::vector<scalar_t> vector_values, scalar_values;
  for (int64_t j = 0; j < count; ++j) (on_scalar_path[j] ? scalar_values : vector_values).push_back(x[candidates[j]]);
  const at::Tensor vector_scores =
      vector_sigmoid(at::from_blob(vector_values.data(), {static_cast<int64_t>(vector_values.size())}, options));
  const at::Tensor scalar_scores =
      scalar_sigmoid(at::from_blob(scalar_values.data(), {static_cast<int64_t>(scalar_values.size())}, options));
  // In index order again, keeping the scores above the threshold (compared in scalar_t, as torch compares).
  at::Tensor scores = at::empty({count}, options);
  at::Tensor indices = at::empty({count}, options.dtype(at::kLong));
  scalar_t* s = scores.data_ptr<scalar_t>();
  int64_t* idx = indices.data_ptr<int64_t>();
  const scalar_t* vector_next = vector_scores.data_ptr<scalar_t>();
  const scalar_t* scalar_next = scalar_scores.data_ptr<scalar_t>();
  const scalar_t threshold = static_cast<scalar_t>(score_thresh);
  int64_t kept = 0;
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t score = on_scalar_path[j] ? *scalar_next++ : *vector_next++;
    if (score > threshold) {
      s[kept] = score;
      idx[kept++] = candidates[j];
    }
  }
  return std::make_tuple(scores.narrow(0, 0, kept), indices.narrow(0, 0, kept));
}

std::tuple<at::Tensor, at::Tensor> score_candidates(const at::Tensor& logits, double score_thresh) {
  check_score_candidates_input(logits, score_thresh);
  return segment_candidates(logits.contiguous().view(-1), {0}, score_thresh)[0];
}

}  // namespace

std::vector<std::tuple<at::Tensor, at::Tensor>> segment_candidates(const at::Tensor& flat,
                                                                   const std::vector<int64_t>& starts,
                                                                   double score_thresh) {
  const int64_t segments = static_cast<int64_t>(starts.size());
  const auto end_of = [&](int64_t i) { return i + 1 < segments ? starts[i + 1] : flat.numel(); };
  std::vector<std::tuple<at::Tensor, at::Tensor>> results;
  const CandidateBound bound = candidate_bound(flat.scalar_type(), score_thresh);
  const std::optional<int64_t> unroll = vector_unroll(flat.scalar_type());
  if (!bound.fast || !unroll) {
    for (int64_t i = 0; i < segments; ++i) {
      results.push_back(score_candidates_by_sigmoid(flat.narrow(0, starts[i], end_of(i) - starts[i]), score_thresh));
    }
    return results;
  }
  results.resize(segments);
  AT_DISPATCH_FLOATING_TYPES(flat.scalar_type(), "rpn_ops_score_candidates", [&] {
    const scalar_t* x = flat.data_ptr<scalar_t>();
    std::vector<int64_t> candidates = indices_above<scalar_t>(x, flat.numel(), static_cast<scalar_t>(bound.lower));
    // Each segment's candidates, as indices within it, and the paths torch.sigmoid of it alone would take
    // (decided here, outside the parallel region below, as for a call of its own).
    std::vector<int64_t> first(segments + 1, 0);
    std::vector<SigmoidPaths> paths;
    int64_t next = 0;
    for (int64_t i = 0; i < segments; ++i) {
      first[i] = next;
      for (; next < static_cast<int64_t>(candidates.size()) && candidates[next] < end_of(i); ++next) {
        candidates[next] -= starts[i];
      }
      paths.push_back(sigmoid_paths(end_of(i) - starts[i], *unroll));
    }
    first[segments] = next;
    parallel_for(segments, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        results[i] = kept_scores<scalar_t>(x + starts[i], paths[i], candidates.data() + first[i],
                                           first[i + 1] - first[i], score_thresh, flat.options());
      }
    });
  });
  return results;
}

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("score_candidates", TORCH_FN(score_candidates));
}

}  // namespace rpn_ops::cpu
