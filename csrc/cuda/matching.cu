// CUDA target assignment without the [G, A] IoU matrix: two kernels for the whole batch, O(anchors + ground
// truth) memory, one host synchronisation at the end (the finiteness check).
//
// Grid: blockIdx.y walks the images, blockIdx.x the anchors of an image, one anchor per thread. The image's
// ground-truth boxes go through shared memory in tiles.
// best_match_kernel: each anchor's best IoU and box in torch.max's order; each box's highest IoU, reduced per
// warp, then per block in shared memory, then across blocks with atomicMax on order-preserving keys.
// decide_kernel: the anchors below the high threshold look for a box whose highest IoU they reach (only boxes
// with highest <= their best can qualify); then Matcher's decision (matching.h), and for assign_targets the
// labels, the matched boxes and their encoding (box_coding.h, with the device's logf as PyTorch's CUDA log).
// SSDMatcher's forced matches: first_best_anchor_kernel finds each box's first anchor of highest IoU (atomicMin
// over the anchors reaching it), force_best_anchors_kernel writes them over the decisions, box by box.
// match_fcos: fcos_match_kernel, one pass, the same grid and ground-truth tiles (matching.h's FCOS rule).
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "../matching.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

constexpr int kTileCapacity = 256;                // ground-truth boxes a shared-memory tile holds
RPN_OPS_SIZING(kTileBoxes, kTileCapacity);        // ground-truth boxes per tile
RPN_OPS_SIZING(kMaxImagesPerGrid, 65535);         // grid.y; blocks loop over the images beyond
constexpr unsigned kFullWarp = 0xffffffffu;
// Bits of the non-finite flag: which input holds a box with an infinite or NaN coordinate.
constexpr int kNonFiniteGt = 1, kNonFiniteAnchor = 2;

// One image's slice of the batch; the table lives on the device.
struct ImageSpan {
  int64_t first_anchor, anchors, first_gt, gts;
};

template <typename U>
using key_t = std::conditional_t<std::is_same_v<U, double>, unsigned long long, uint32_t>;

template <typename K>
__device__ __forceinline__ K warp_max(K key) {
#if RPN_OPS_DEVICE_ARCH >= 800
  if constexpr (sizeof(K) == 4) {
    return __reduce_max_sync(kFullWarp, key);
  } else
#endif
  {
    for (int offset = 16; offset > 0; offset /= 2) {
      const K other = __shfl_xor_sync(kFullWarp, key, offset);
      key = other > key ? other : key;
    }
    return key;
  }
}

template <typename U>
__device__ __forceinline__ bool is_finite_box(const MatchBox<U>& box) {
  return isfinite(box.x1) && isfinite(box.y1) && isfinite(box.x2) && isfinite(box.y2);
}

// Loops over the images of the grid's y dimension and, within each, over blocks of blockDim.x anchors; every
// thread of a block takes every step (the shared-memory tiles need them all), `body(image, anchor, in_range)`.
template <typename F>
__device__ __forceinline__ void for_each_anchor_block(const ImageSpan* images, int64_t image_count, const F& body) {
  for (int64_t image = blockIdx.y; image < image_count; image += gridDim.y) {
    const ImageSpan span = images[image];
    for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x; first < span.anchors;
         first += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const int64_t anchor = first + threadIdx.x;
      body(span, anchor, anchor < span.anchors);
    }
  }
}

// A tile of ground-truth boxes and, per box, H: its highest IoU (as a key while it is being reduced).
template <typename U, typename H>
struct GtTile {
  MatchBox<U> box[kTileCapacity];
  H highest[kTileCapacity];
};

// Tile `first` of the image's ground-truth boxes into shared memory, flagging non-finite ones.
template <typename G, typename U>
__device__ __forceinline__ int load_gt_tile(const G* gt_boxes, const ImageSpan& span, int64_t first,
                                            MatchBox<U>* tile, int* non_finite) {
  const int count = static_cast<int>(span.gts - first < kTileBoxes ? span.gts - first : kTileBoxes);
  for (int t = threadIdx.x; t < count; t += blockDim.x) {
    tile[t] = match_box<U>(gt_boxes + 4 * (span.first_gt + first + t));
    if (!is_finite_box(tile[t])) atomicOr(non_finite, kNonFiniteGt);
  }
  return count;
}

template <typename G, typename A, typename C, typename U>
__global__ void best_match_kernel(const G* __restrict__ gt_boxes, const A* __restrict__ anchors,
                                  const ImageSpan* __restrict__ images, int64_t image_count, U* __restrict__ best_iou,
                                  int32_t* __restrict__ best_gt, key_t<U>* __restrict__ gt_highest,
                                  int* __restrict__ non_finite) {
  GtTile<U, key_t<U>>& tile = block_shared<GtTile<U, key_t<U>>>();
  const bool warp_leader = threadIdx.x % 32 == 0;
  for_each_anchor_block(images, image_count, [&](const ImageSpan& span, int64_t j, bool in_range) {
    if (span.gts == 0) return;
    const int64_t index = span.first_anchor + j;
    const MatchBox<U> anchor = in_range ? match_box<U>(anchors + 4 * index) : MatchBox<U>{};
    if (in_range && !is_finite_box(anchor)) atomicOr(non_finite, kNonFiniteAnchor);
    U best = U(0);  // torch.max of all +-0 IoUs: box 0
    int32_t best_index = 0;
    for (int64_t first = 0; first < span.gts; first += kTileBoxes) {
      __syncthreads();
      const int count = load_gt_tile(gt_boxes, span, first, tile.box, non_finite);
      for (int t = threadIdx.x; t < count; t += blockDim.x) tile.highest[t] = 0;
      __syncthreads();
      for (int t = 0; t < count; ++t) {
        const U iou = match_iou<C>(tile.box[t], anchor);
        if (better_match(iou, best)) best = iou, best_index = static_cast<int32_t>(first + t);
        const key_t<U> highest = warp_max(in_range ? key_of(iou) : key_t<U>{0});
        if (warp_leader && highest != 0) atomicMax(&tile.highest[t], highest);
      }
      __syncthreads();
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        if (tile.highest[t] != 0) atomicMax(&gt_highest[span.first_gt + first + t], tile.highest[t]);
      }
    }
    if (in_range) best_iou[index] = best, best_gt[index] = best_index;
  });
}

// What decide_kernel writes per anchor: the match (match_anchors) ...
struct MatchWriter {
  int64_t* matches;
  __device__ void operator()(const ImageSpan&, int64_t index, int64_t match) const {
    matches[index] = match;
  }
};

// ... or the label, the matched ground truth (zeros for an image without any) and its encoding against the
// anchor (assign_targets).
template <typename G, typename A, typename L>
struct TargetWriter {
  const G* gt_boxes;
  const A* anchors;
  EncodeWeights<G> weights;
  float* labels;
  G* matched_gt;
  L* targets;
  bool vectorized;

  __device__ void operator()(const ImageSpan& span, int64_t index, int64_t match) const {
    G matched[4] = {G(0), G(0), G(0), G(0)};
    if (span.gts > 0) {
      const G* box = gt_boxes + 4 * (span.first_gt + (match > 0 ? match : 0));
      for (int i = 0; i < 4; ++i) matched[i] = box[i];
    }
    labels[index] = span.gts > 0 ? label_of(match) : 0.0f;
    store4(matched_gt + 4 * index, matched, vectorized);
    const A* a = anchors + 4 * index;
    const A anchor[4] = {a[0], a[1], a[2], a[3]};
    const EncodeStart<G, A, L> start = encode_start<L>(matched, anchor, weights.w);
    L encoded[4];
    encode_finish(start, log_as<L>(start.width_ratio), log_as<L>(start.height_ratio), weights.w, encoded);
    store4(targets + 4 * index, encoded, vectorized);
  }
};

template <typename G, typename A, typename C, typename U, typename Writer>
__global__ void decide_kernel(const G* __restrict__ gt_boxes, const A* __restrict__ anchors,
                              const ImageSpan* __restrict__ images, int64_t image_count,
                              const U* __restrict__ best_iou, const int32_t* __restrict__ best_gt,
                              const key_t<U>* __restrict__ gt_highest, const MatchThresholds<U> thresholds,
                              int* __restrict__ non_finite, const Writer writer) {
  GtTile<U, U>& tile = block_shared<GtTile<U, U>>();
  for_each_anchor_block(images, image_count, [&](const ImageSpan& span, int64_t j, bool in_range) {
    const int64_t index = span.first_anchor + j;
    if (span.gts == 0) {
      if (in_range) writer(span, index, kBelowLowThreshold);
      return;
    }
    const U best = in_range ? best_iou[index] : U(0);
    // Only an anchor that the thresholds would not make foreground can change through a low-quality match.
    const bool looks = in_range && thresholds.allow_low_quality_matches && best < thresholds.high;
    bool reaches_gt_highest = false;
    if (__syncthreads_or(looks)) {
      const MatchBox<U> anchor = looks ? match_box<U>(anchors + 4 * index) : MatchBox<U>{};
      for (int64_t first = 0; first < span.gts; first += kTileBoxes) {
        __syncthreads();
        const int count = load_gt_tile(gt_boxes, span, first, tile.box, non_finite);
        for (int t = threadIdx.x; t < count; t += blockDim.x) {
          tile.highest[t] = value_of_key<U>(gt_highest[span.first_gt + first + t]);
        }
        __syncthreads();
        for (int t = 0; looks && !reaches_gt_highest && t < count; ++t) {
          // IoU(box, anchor) <= best: a box whose highest IoU is above it (or NaN) cannot be reached.
          reaches_gt_highest = tile.highest[t] <= best && match_iou<C>(tile.box[t], anchor) == tile.highest[t];
        }
      }
    }
    if (in_range) {
      writer(span, index, match_decision(best, static_cast<int64_t>(best_gt[index]), reaches_gt_highest, thresholds));
    }
  });
}

template <typename G, typename A, typename C, typename U>
__global__ void first_best_anchor_kernel(const G* __restrict__ gt_boxes, const A* __restrict__ anchors,
                                         const ImageSpan* __restrict__ images, int64_t image_count,
                                         const U* __restrict__ best_iou, const key_t<U>* __restrict__ gt_highest,
                                         unsigned long long* __restrict__ first_anchor, int* __restrict__ non_finite) {
  GtTile<U, U>& tile = block_shared<GtTile<U, U>>();
  for_each_anchor_block(images, image_count, [&](const ImageSpan& span, int64_t j, bool in_range) {
    if (span.gts == 0) return;
    const int64_t index = span.first_anchor + j;
    const U best = in_range ? best_iou[index] : U(0);
    const MatchBox<U> anchor = in_range ? match_box<U>(anchors + 4 * index) : MatchBox<U>{};
    for (int64_t first = 0; first < span.gts; first += kTileBoxes) {
      __syncthreads();
      const int count = load_gt_tile(gt_boxes, span, first, tile.box, non_finite);
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        tile.highest[t] = value_of_key<U>(gt_highest[span.first_gt + first + t]);
      }
      __syncthreads();
      for (int t = 0; in_range && t < count; ++t) {
        // IoU(box, anchor) <= best: only a box whose highest IoU is at most that (or both NaN) can be reached.
        const U highest = tile.highest[t];
        if ((highest <= best || is_highest(best, highest)) &&
            is_highest(match_iou<C>(tile.box[t], anchor), highest)) {
          atomicMin(&first_anchor[span.first_gt + first + t], static_cast<unsigned long long>(j));
        }
      }
    }
  });
}

// One thread per image writes its boxes' forced matches in box order: of boxes sharing an anchor, the last wins.
template <typename Writer>
__global__ void force_best_anchors_kernel(const ImageSpan* __restrict__ images, int64_t image_count,
                                          const unsigned long long* __restrict__ first_anchor, const Writer writer) {
  for (int64_t image = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; image < image_count;
       image += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const ImageSpan span = images[image];
    for (int64_t g = 0; g < span.gts; ++g) {
      writer(span, span.first_anchor + static_cast<int64_t>(first_anchor[span.first_gt + g]), g);
    }
  }
}

// FCOS's assignment: each thread an anchor point, against every box of its image through shared-memory tiles.
template <typename T>
struct FcosTile {
  FcosBox<T> box[kTileCapacity];
};

template <typename T>
__global__ void fcos_match_kernel(const T* __restrict__ gt_boxes, const T* __restrict__ anchors,
                                  const ImageSpan* __restrict__ images, int64_t image_count, FcosLevels levels,
                                  T radius, int64_t* __restrict__ matches, int* __restrict__ non_finite) {
  FcosBox<T>* tile = block_shared<FcosTile<T>>().box;
  for_each_anchor_block(images, image_count, [&](const ImageSpan& span, int64_t j, bool in_range) {
    const int64_t index = span.first_anchor + j;
    FcosPoint<T> point{};
    if (in_range) {
      const T* anchor = anchors + 4 * index;
      if (!(isfinite(anchor[0]) && isfinite(anchor[1]) && isfinite(anchor[2]) && isfinite(anchor[3]))) {
        atomicOr(non_finite, kNonFiniteAnchor);
      }
      point = fcos_point(anchor, radius, j < levels.first_level_end, j >= levels.last_level_begin);
    }
    T best = T(0);
    int64_t best_box = -1;
    for (int64_t first = 0; first < span.gts; first += kTileBoxes) {
      __syncthreads();
      const int count = static_cast<int>(span.gts - first < kTileBoxes ? span.gts - first : kTileBoxes);
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        const T* box = gt_boxes + 4 * (span.first_gt + first + t);
        if (!(isfinite(box[0]) && isfinite(box[1]) && isfinite(box[2]) && isfinite(box[3]))) {
          atomicOr(non_finite, kNonFiniteGt);
        }
        tile[t] = fcos_box(box);
      }
      __syncthreads();
      for (int t = 0; in_range && t < count; ++t) {
        if (fcos_takes(point, tile[t]) && tile[t].priority > best) best = tile[t].priority, best_box = first + t;
      }
    }
    if (in_range) matches[index] = fcos_decision(best, best_box);
  });
}

// The images of a batch as the device's ImageSpan table; `max_anchors`: the most anchors of one image.
at::Tensor image_table(const at::Tensor& anchors, at::IntArrayRef gt_per_image, at::IntArrayRef anchors_per_image,
                       int64_t& max_anchors) {
  std::vector<int64_t> table;
  int64_t first_anchor = 0, first_gt = 0;
  max_anchors = 0;
  for (size_t i = 0; i < gt_per_image.size(); ++i) {
    table.insert(table.end(), {first_anchor, anchors_per_image[i], first_gt, gt_per_image[i]});
    first_anchor += anchors_per_image[i];
    first_gt += gt_per_image[i];
    max_anchors = std::max(max_anchors, anchors_per_image[i]);
  }
  static_assert(sizeof(ImageSpan) == 4 * sizeof(int64_t));
  return at::tensor(table, at::TensorOptions(at::kLong)).to(anchors.device());
}

dim3 grid_of(int64_t max_anchors, int64_t image_count) {
  return dim3(blocks_for(max_anchors), static_cast<unsigned>(std::min<int64_t>(image_count, kMaxImagesPerGrid)));
}

// The device buffers of one call: the image table, the per-anchor best IoU and box, the per-box highest IoU
// keys (zero: below every IoU) and the non-finite flags.
template <typename U>
struct MatchBuffers {
  at::Tensor images, best_iou, best_gt, gt_highest, non_finite;
  int64_t image_count = 0, max_anchors = 0;

  MatchBuffers(const at::Tensor& anchors, int64_t gt_count, at::IntArrayRef gt_per_image,
               at::IntArrayRef anchors_per_image) {
    image_count = static_cast<int64_t>(gt_per_image.size());
    images = image_table(anchors, gt_per_image, anchors_per_image, max_anchors);
    const auto options = anchors.options();
    best_iou = at::empty({anchors.size(0)}, options.dtype(c10::CppTypeToScalarType<U>::value));
    best_gt = at::empty({anchors.size(0)}, options.dtype(at::kInt));
    gt_highest = at::zeros({gt_count}, options.dtype(sizeof(key_t<U>) == 4 ? at::kInt : at::kLong));
    non_finite = at::zeros({1}, options.dtype(at::kInt));
  }

  dim3 grid() const { return grid_of(max_anchors, image_count); }
  const ImageSpan* spans() const { return reinterpret_cast<const ImageSpan*>(images.data_ptr<int64_t>()); }
  key_t<U>* highest_keys() const { return reinterpret_cast<key_t<U>*>(gt_highest.data_ptr()); }
};

template <typename G, typename A, typename Writer>
void match_batch(const at::Tensor& gt, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                 at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                 bool allow_low_quality_matches, bool force_best_anchors, const Writer& writer) {
  using U = iou_t<G, A>;
  using C = corner_t<G, A>;
  const MatchBuffers<U> buffers(anchors, gt.size(0), gt_per_image, anchors_per_image);
  const MatchThresholds<U> thresholds{static_cast<U>(high_threshold), static_cast<U>(low_threshold),
                                      allow_low_quality_matches, force_best_anchors};
  const G* gt_data = gt.numel() > 0 ? gt.data_ptr<G>() : nullptr;
  int* non_finite = buffers.non_finite.template data_ptr<int>();
  launch<best_match_kernel<G, A, C, U>>(buffers.grid(), kThreads, 0, gt_data, anchors.data_ptr<A>(), buffers.spans(),
                                        buffers.image_count, buffers.best_iou.template data_ptr<U>(),
                                        buffers.best_gt.template data_ptr<int32_t>(), buffers.highest_keys(),
                                        non_finite);
  launch<decide_kernel<G, A, C, U, Writer>>(buffers.grid(), kThreads, 0, gt_data, anchors.data_ptr<A>(),
                                            buffers.spans(), buffers.image_count,
                                            buffers.best_iou.template data_ptr<U>(),
                                            buffers.best_gt.template data_ptr<int32_t>(), buffers.highest_keys(),
                                            thresholds, non_finite, writer);
  if (force_best_anchors) {
    const at::Tensor first_anchor = at::full({gt.size(0)}, -1, anchors.options().dtype(at::kLong));  // no anchor yet
    auto* first = reinterpret_cast<unsigned long long*>(first_anchor.data_ptr<int64_t>());
    launch<first_best_anchor_kernel<G, A, C, U>>(buffers.grid(), kThreads, 0, gt_data, anchors.data_ptr<A>(),
                                                 buffers.spans(), buffers.image_count,
                                                 buffers.best_iou.template data_ptr<U>(), buffers.highest_keys(),
                                                 first, non_finite);
    launch<force_best_anchors_kernel<Writer>>(blocks_for(buffers.image_count), kThreads, 0, buffers.spans(),
                                              buffers.image_count, first, writer);
  }
  const int non_finite_inputs = buffers.non_finite.template item<int>();  // the one host synchronisation
  if (non_finite_inputs & kNonFiniteGt) fail_non_finite_boxes("gt_boxes");  // the CPU kernel's order
  if (non_finite_inputs & kNonFiniteAnchor) fail_non_finite_boxes("anchors");
}

at::Tensor match_anchors(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                         at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                         bool allow_low_quality_matches, bool force_best_anchors) {
  const DeviceGuard guard(anchors.device());
  check_matching_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                        /*empty_gt_allowed=*/false);
  at::Tensor out = at::empty({anchors.size(0)}, anchors.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  visit_float_types(gt.scalar_type(), anchor.scalar_type(), [&]<typename G, typename A>() {
    match_batch<G, A>(gt, anchor, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                      allow_low_quality_matches, force_best_anchors, MatchWriter{out.data_ptr<int64_t>()});
  });
  return out;
}

at::Tensor match_fcos(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                      at::IntArrayRef anchors_per_image, at::IntArrayRef anchors_per_level, double radius) {
  const DeviceGuard guard(anchors.device());
  check_fcos_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, anchors_per_level, radius);
  at::Tensor out = at::empty({anchors.size(0)}, anchors.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  int64_t max_anchors = 0;
  const at::Tensor images = image_table(anchor, gt_per_image, anchors_per_image, max_anchors);
  const int64_t image_count = static_cast<int64_t>(gt_per_image.size());
  const at::Tensor non_finite = at::zeros({1}, anchor.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "rpn_ops_match_fcos_cuda", [&] {
    launch<fcos_match_kernel<scalar_t>>(grid_of(max_anchors, image_count), kThreads, 0,
                                        gt.numel() > 0 ? gt.data_ptr<scalar_t>() : nullptr,
                                        anchor.data_ptr<scalar_t>(),
                                        reinterpret_cast<const ImageSpan*>(images.data_ptr<int64_t>()), image_count,
                                        fcos_levels(anchors_per_level), static_cast<scalar_t>(radius),
                                        out.data_ptr<int64_t>(), non_finite.data_ptr<int>());
  });
  const int non_finite_inputs = non_finite.item<int>();  // the one host synchronisation
  if (non_finite_inputs & kNonFiniteGt) fail_non_finite_boxes("gt_boxes");
  if (non_finite_inputs & kNonFiniteAnchor) fail_non_finite_boxes("anchors");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_targets(
    const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
    at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold, bool allow_low_quality_matches,
    at::ArrayRef<double> weights, bool float32_log) {
  const DeviceGuard guard(anchors.device());
  check_assign_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold, weights);
  at::Tensor labels, matched_gt, targets;
  std::tie(labels, matched_gt, targets) = empty_assign_outputs(gt_boxes, anchors, float32_log);
  if (labels.numel() == 0) return {labels, matched_gt, targets};
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  const auto fill = [&]<typename G, typename A, typename L>() {
    const EncodeWeights<G> w{{to<G>(weights[0]), to<G>(weights[1]), to<G>(weights[2]), to<G>(weights[3])}};
    G* matched = matched_gt.data_ptr<G>();
    L* encoded = targets.data_ptr<L>();
    const TargetWriter<G, A, L> writer{gt.numel() > 0 ? gt.data_ptr<G>() : nullptr, anchor.data_ptr<A>(), w,
                                       labels.data_ptr<float>(), matched, encoded,
                                       aligned_for_vec4(matched) && aligned_for_vec4(encoded)};
    match_batch<G, A>(gt, anchor, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                      allow_low_quality_matches, /*force_best_anchors=*/false, writer);
  };
  visit_encode_types(gt.scalar_type(), anchor.scalar_type(), targets.scalar_type(), fill);  // ground truth as reference
  return {labels, matched_gt, targets};
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("match_anchors", TORCH_FN(match_anchors));
  m.impl("match_fcos", TORCH_FN(match_fcos));
  m.impl("assign_targets", TORCH_FN(assign_targets));
}

}  // namespace rpn_ops::cuda
