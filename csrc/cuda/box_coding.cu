// CUDA anchors and box coding: one thread per output item (anchor, (box, class) pair, box), grid-stride loops
// with 64-bit indices. The arithmetic is box_coding.h's, shared with the CPU; the exponential and logarithm
// are the device's (exp_as / log_as: expf / logf in opmath), as PyTorch's CUDA kernels compute them, so no
// buffers sit between the two halves of the computation. Outputs are fresh contiguous tensors; each item's
// four values go out in one vector store when the output is aligned for it (it always is, out of at::empty).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../box_coding.h"
#include "../checks.h"
#include "../dispatch.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

constexpr int kMaxLevels = 16;  // levels a LevelTable holds
RPN_OPS_SIZING(kLevelsPerLaunch, kMaxLevels);  // levels per grid_anchors launch; more levels take more launches

// ---------------------------------------------------------------------------------------------------------
// Anchors

// The layout of up to kMaxLevels consecutive levels, passed by value.
struct LevelTable {
  AnchorLevel level[kMaxLevels];
  int count;
};

// Anchors [begin, end) of image 0 (the levels of `table`), each written to all num_images copies.
template <typename T>
__global__ void grid_anchors_kernel(const T* __restrict__ cells, const LevelTable table, int64_t begin, int64_t end,
                                    int64_t total, int64_t num_images, bool vectorized, T* __restrict__ out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t index = begin + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; index < end;
       index += step) {
    // The last level that starts at or before the index: empty levels start where the next one does.
    int l = 0;
    while (l + 1 < table.count && table.level[l + 1].first_anchor <= index) ++l;
    T anchor[4];
    anchor_at(table.level[l], index, cells, anchor);
    T* dst = out + 4 * index;
    for (int64_t image = 0; image < num_images; ++image, dst += 4 * total) store4(dst, anchor, vectorized);
  }
}

at::Tensor grid_anchors(const at::Tensor& cell_anchors, at::IntArrayRef cells_per_level, at::IntArrayRef grid_sizes,
                        at::IntArrayRef strides, int64_t num_images) {
  const DeviceGuard guard(cell_anchors.device());
  int64_t total = 0;
  const auto levels =
      check_grid_anchors_inputs(cell_anchors, cells_per_level, grid_sizes, strides, num_images, total);
  at::Tensor out = at::empty({num_images, total, 4}, cell_anchors.options());
  if (out.numel() == 0) return out;
  const at::Tensor cells = cell_anchors.contiguous();
  const int64_t level_count = static_cast<int64_t>(levels.size());
  visit_float_type(cells.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* out_data = out.data_ptr<T>();
    const bool vectorized = aligned_for_vec4(out_data);
    for (int64_t first = 0; first < level_count; first += kLevelsPerLaunch) {
      LevelTable table{};
      table.count = static_cast<int>(std::min<int64_t>(kLevelsPerLaunch, level_count - first));
      for (int l = 0; l < table.count; ++l) table.level[l] = levels[first + l];
      const int64_t begin = levels[first].first_anchor;
      const int64_t end = first + table.count < level_count ? levels[first + table.count].first_anchor : total;
      if (begin == end) continue;
      launch<grid_anchors_kernel<T>>(blocks_for(end - begin), kThreads, 0, cells.data_ptr<T>(), table, begin, end,
                                     total, num_images, vectorized, out_data);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Decode

// One thread per (box, class) item; codes [n, 4 * classes] and boxes [n, 4] read through their strides.
template <typename T, typename S>
__global__ void decode_kernel(const T* __restrict__ codes, int64_t code_row, int64_t code_col,
                              const T* __restrict__ boxes, int64_t box_row, int64_t box_col, int64_t items,
                              int64_t classes, const CudaCodeWeights<T> weights, T clip, bool vectorized,
                              S* __restrict__ decoded) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < items; item += step) {
    const int64_t row = item / classes, k = item - row * classes;
    const T* b = boxes + row * box_row;
    const T box[4] = {b[0], b[box_col], b[2 * box_col], b[3 * box_col]};
    const T* c = codes + row * code_row + 4 * k * code_col;
    const T code[4] = {c[0], c[code_col], c[2 * code_col], c[3 * code_col]};
    const DecodeStart<T> start = decode_start(code, box, weights, clip);
    S result[4];
    decode_finish(start, exp_as<S>(to<S>(start.dw)), exp_as<S>(to<S>(start.dh)), result);
    store4(decoded + 4 * item, result, vectorized);
  }
}

template <typename T, typename S>
void fill_decoded(const at::Tensor& codes, const at::Tensor& boxes, const CudaCodeWeights<T>& weights, T clip,
                  at::Tensor& out) {
  const int64_t n = codes.size(0), classes = codes.size(1) / 4, items = n * classes;
  S* decoded = out.data_ptr<S>();
  launch<decode_kernel<T, S>>(blocks_for(items), kThreads, 0, codes.data_ptr<T>(), codes.stride(0), codes.stride(1),
                              boxes.data_ptr<T>(), boxes.stride(0), boxes.stride(1), items, classes, weights, clip,
                              aligned_for_vec4(decoded), decoded);
}

at::Tensor decode_boxes(const at::Tensor& rel_codes, const at::Tensor& boxes, at::ArrayRef<double> weights,
                        double bbox_xform_clip, bool float32_exp) {
  const DeviceGuard guard(rel_codes.device());
  check_decode_inputs(rel_codes, boxes, weights, bbox_xform_clip);
  const auto type = rel_codes.scalar_type();
  at::Tensor out = at::empty(rel_codes.sizes(), rel_codes.options().dtype(coding_output_type(type, float32_exp)));
  if (out.numel() == 0) return out;
  const at::Tensor reference = boxes.to(type);  // torchvision: boxes.to(rel_codes.dtype)
  visit_decode_types(type, out.scalar_type(), [&]<typename T, typename S>() {
    // PyTorch's CUDA `codes / weight` multiplies by the reciprocal computed in opmath.
    fill_decoded<T, S>(rel_codes, reference, CudaCodeWeights<T>(weights.data()), to<T>(bbox_xform_clip), out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// Encode

// One thread per box; reference_boxes and proposals [n, 4] read through their strides.
template <typename R, typename P, typename L>
__global__ void encode_kernel(const R* __restrict__ ref, int64_t ref_row, int64_t ref_col, const P* __restrict__ prop,
                              int64_t prop_row, int64_t prop_col, int64_t n, const EncodeWeights<R> weights,
                              bool vectorized, L* __restrict__ encoded) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; item < n; item += step) {
    const R* r = ref + item * ref_row;
    const P* p = prop + item * prop_row;
    const R reference[4] = {r[0], r[ref_col], r[2 * ref_col], r[3 * ref_col]};
    const P proposal[4] = {p[0], p[prop_col], p[2 * prop_col], p[3 * prop_col]};
    const EncodeStart<R, P, L> start = encode_start<L>(reference, proposal, weights.w);
    L result[4];
    encode_finish(start, log_as<L>(start.width_ratio), log_as<L>(start.height_ratio), weights.w, result);
    store4(encoded + 4 * item, result, vectorized);
  }
}

template <typename R, typename P, typename L>
void fill_encoded(const at::Tensor& reference_boxes, const at::Tensor& proposals, at::ArrayRef<double> weights,
                  at::Tensor& out) {
  const EncodeWeights<R> w{{to<R>(weights[0]), to<R>(weights[1]), to<R>(weights[2]), to<R>(weights[3])}};
  const int64_t n = reference_boxes.size(0);
  L* encoded = out.data_ptr<L>();
  launch<encode_kernel<R, P, L>>(blocks_for(n), kThreads, 0, reference_boxes.data_ptr<R>(), reference_boxes.stride(0),
                                 reference_boxes.stride(1), proposals.data_ptr<P>(), proposals.stride(0),
                                 proposals.stride(1), n, w, aligned_for_vec4(encoded), encoded);
}

at::Tensor encode_boxes(const at::Tensor& reference_boxes, const at::Tensor& proposals, at::ArrayRef<double> weights,
                        bool float32_log) {
  const DeviceGuard guard(reference_boxes.device());
  check_encode_inputs(reference_boxes, proposals, weights);
  const auto mixed = at::promoteTypes(reference_boxes.scalar_type(), proposals.scalar_type());
  at::Tensor out = at::empty({reference_boxes.size(0), 4},
                             reference_boxes.options().dtype(coding_output_type(mixed, float32_log)));
  if (out.numel() == 0) return out;
  const auto encode = [&]<typename R, typename P, typename L>() {
    fill_encoded<R, P, L>(reference_boxes, proposals, weights, out);
  };
  visit_encode_types(reference_boxes.scalar_type(), proposals.scalar_type(), out.scalar_type(), encode);
  return out;
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("grid_anchors", TORCH_FN(grid_anchors));
  m.impl("decode_boxes", TORCH_FN(decode_boxes));
  m.impl("encode_boxes", TORCH_FN(encode_boxes));
}

}  // namespace rpn_ops::cuda
