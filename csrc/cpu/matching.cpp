// CPU target assignment without the [G, A] IoU matrix: O(anchors + ground truth) memory, threads over chunks
// of anchors of all images at once.
//
// Pass 1, per chunk: every ground-truth box against the chunk's anchors (SIMD, simd_kernels.h) keeps each
// anchor's best IoU and box in torch.max's order, and the chunk's largest IoU per box. Blocks of anchors whose
// bounding box the ground-truth box does not overlap have IoU +-0 with it and are skipped (exactly: only when
// their union cannot be 0, see union_is_nonzero).
// Between the passes, each box's highest IoU is the largest of its chunks'.
// Pass 2, per chunk: only where a chunk holds a box's highest IoU are the IoUs recomputed, to flag the anchors
// that reach it (low-quality matches). Then Matcher's decision per anchor (matching.h), SSDMatcher's forced
// matches (each box's first anchor of highest IoU, looked for in the first chunk holding it), and for
// assign_targets the labels, the matched boxes and their encoding (box_coding.h, with PyTorch's log).
// match_fcos: one pass per chunk, every box of the image against the chunk's points (matching.h's FCOS rule),
// skipping the boxes whose sides enclose none of the chunk's points.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dispatch.h"
#include "../matching.h"
#include "coding_chunks.h"
#include "parallel.h"
#include "simd_kernels.h"

namespace rpn_ops::cpu {
namespace {

constexpr int64_t kBlockAnchors = 128;      // anchors under one bounding box, tested before any IoU
constexpr int64_t kMinChunkAnchors = 2048;  // anchors per task at least
// Single-threaded cost of a pass per anchor, measured on a 2-core Intel Xeon (AVX-512), float32, with 10 to 500
// ground-truth boxes per image: assign_targets takes 19 ns + 0.27 ns per box of its image for the two passes.
constexpr double kPassNanoseconds = 9.5;
constexpr double kPassNanosecondsPerBox = 0.135;
// match_fcos per anchor, single-threaded, same machine, FCOS's 2 x 20k anchors at 800 x 1216 with 0 to 500 boxes per
// image: 16 ns + 1.5 ns per box of its image.
constexpr double kFcosNanoseconds = 16.0;
constexpr double kFcosNanosecondsPerBox = 1.5;

// One image's slice of the batch, and where its chunks' partial maxima start.
struct ImageSpan {
  int64_t first_anchor, anchors, first_gt, gts, first_partial;
};

// A task: consecutive anchors of one image. Its largest IoU per ground-truth box of the image is
// partials[first_partial + g].
struct Chunk {
  int64_t image, first_anchor, count, first_partial;
};

// Chunks hold at least as many anchors as the image has ground-truth boxes, so the partial maxima
// (chunks x boxes) never pass anchors + boxes.
std::vector<Chunk> chunks_of(std::vector<ImageSpan>& images, int64_t& partial_count) {
  std::vector<Chunk> chunks;
  partial_count = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(images.size()); ++i) {
    ImageSpan& image = images[i];
    image.first_partial = partial_count;
    const int64_t size = std::max(kMinChunkAnchors, (image.gts + kBlockAnchors - 1) / kBlockAnchors * kBlockAnchors);
    for (int64_t first = 0; first < image.anchors; first += size) {
      chunks.push_back({i, image.first_anchor + first, std::min(size, image.anchors - first), partial_count});
      partial_count += image.gts;
    }
  }
  return chunks;
}

std::vector<ImageSpan> spans_of(at::IntArrayRef gt_per_image, at::IntArrayRef anchors_per_image) {
  std::vector<ImageSpan> images;
  int64_t first_anchor = 0, first_gt = 0;
  for (size_t i = 0; i < gt_per_image.size(); ++i) {
    images.push_back({first_anchor, anchors_per_image[i], first_gt, gt_per_image[i], 0});
    first_anchor += anchors_per_image[i];
    first_gt += gt_per_image[i];
  }
  return images;
}

// Runs task(chunk index) for every chunk, threads taking the next piece of chunks as they finish (chunks differ
// in cost: large anchors overlap many boxes); `cost`: the estimated nanoseconds of all of them.
template <typename F>
void for_each_chunk(int64_t chunk_count, double cost, const F& task) {
  parallel_for(chunk_count, grain_for_tasks(chunk_count, cost),
               [&](int64_t begin, int64_t end) {
                 for (int64_t c = begin; c < end; ++c) task(c);
               });
}

// A chunk's anchors as IoU operands (structure of arrays of U), with each block's bounding box and smallest
// area; thread-local scratch reused from chunk to chunk.
template <typename U>
struct AnchorColumns {
  std::vector<U> x1, y1, x2, y2, area;
  std::vector<U> block_x1, block_y1, block_x2, block_y2, block_min_area;
  int64_t count = 0;

  // Returns false if a coordinate is not finite.
  template <typename A>
  bool load(const A* anchors, int64_t n) {
    count = n;
    for (auto* column : {&x1, &y1, &x2, &y2, &area}) column->resize(n);
    const int64_t blocks = (n + kBlockAnchors - 1) / kBlockAnchors;
    for (auto* column : {&block_x1, &block_y1, &block_x2, &block_y2, &block_min_area}) column->resize(blocks);
    bool finite = true;
    for (int64_t b = 0; b < blocks; ++b) {
      U bx1 = INFINITY, by1 = INFINITY, bx2 = -INFINITY, by2 = -INFINITY, min_area = INFINITY;
      for (int64_t j = b * kBlockAnchors; j < std::min(n, (b + 1) * kBlockAnchors); ++j) {
        const MatchBox<U> box = match_box<U>(anchors + 4 * j);
        finite &= std::isfinite(box.x1) & std::isfinite(box.y1) & std::isfinite(box.x2) & std::isfinite(box.y2);
        x1[j] = box.x1, y1[j] = box.y1, x2[j] = box.x2, y2[j] = box.y2, area[j] = box.area;
        bx1 = std::min(bx1, box.x1), by1 = std::min(by1, box.y1), bx2 = std::max(bx2, box.x2);
        by2 = std::max(by2, box.y2), min_area = std::min(min_area, box.area);
      }
      block_x1[b] = bx1, block_y1[b] = by1, block_x2[b] = bx2, block_y2[b] = by2, block_min_area[b] = min_area;
    }
    return finite;
  }

  int64_t blocks() const { return static_cast<int64_t>(block_x1.size()); }

  ColumnBoxes<U> block(int64_t b) const {
    const int64_t first = b * kBlockAnchors;
    return {x1.data() + first, y1.data() + first, x2.data() + first, y2.data() + first, area.data() + first,
            std::min(kBlockAnchors, count - first)};
  }

  // Whether every IoU of block b with `gt` (x1, y1, x2, y2, area) is +-0: no anchor can overlap it and no
  // union can be 0.
  bool all_zero(int64_t b, const U* gt) const {
    return !may_overlap(block_x1[b], block_y1[b], block_x2[b], block_y2[b], gt[0], gt[1], gt[2], gt[3]) &&
           union_is_nonzero(gt[4], block_min_area[b]);
  }
};

// The inner loops for corners compared in C and IoUs in U. C == U (float32 or float64 corners): the SIMD
// kernels of this CPU. Otherwise (float16 or bfloat16 boxes on both sides, whose intersection extents round to
// half precision as in torchvision): a plain loop over match_iou.
template <typename C, typename U>
U scalar_match_update(const ColumnBoxes<U>& anchors, const U* gt, MatchIndex<U> gt_index, U* best,
                      MatchIndex<U>* best_gt) {
  const MatchBox<U> g{gt[0], gt[1], gt[2], gt[3], gt[4]};
  U largest = -INFINITY;
  for (int64_t j = 0; j < anchors.count; ++j) {
    const MatchBox<U> a{anchors.x1[j], anchors.y1[j], anchors.x2[j], anchors.y2[j], anchors.area[j]};
    const U iou = match_iou<C>(g, a);
    if (better_match(iou, best[j])) best[j] = iou, best_gt[j] = gt_index;
    largest = max_propagating_nan(largest, iou);
  }
  return largest;
}

template <typename C, typename U>
void scalar_match_flag(const ColumnBoxes<U>& anchors, const U* gt, U target, uint8_t* flags) {
  const MatchBox<U> g{gt[0], gt[1], gt[2], gt[3], gt[4]};
  for (int64_t j = 0; j < anchors.count; ++j) {
    const MatchBox<U> a{anchors.x1[j], anchors.y1[j], anchors.x2[j], anchors.y2[j], anchors.area[j]};
    if (match_iou<C>(g, a) == target) flags[j] = 1;
  }
}

template <typename C, typename U>
Kernels<U> match_kernels() {
  if constexpr (std::is_same_v<C, U>) {
    return kernels_for<U>(current_isa());
  } else {
    return {nullptr, nullptr, &scalar_match_update<C, U>, &scalar_match_flag<C, U>};
  }
}

// The first anchor of `chunk` whose IoU with `gt` is `highest` (is_highest), as torch.max(dim=1) picks it.
template <typename C, typename U>
int64_t first_anchor_reaching(const Kernels<U>& kernels, const AnchorColumns<U>& columns, const U* gt, U highest) {
  const MatchBox<U> g{gt[0], gt[1], gt[2], gt[3], gt[4]};
  uint8_t flags[kBlockAnchors];
  for (int64_t b = 0; b < columns.blocks(); ++b) {
    const ColumnBoxes<U> block = columns.block(b);
    if (columns.all_zero(b, gt)) {  // IoUs +-0
      if (highest == U(0)) return b * kBlockAnchors;
      continue;
    }
    if (highest != highest) {  // 0 / 0, exact in any kernel
      for (int64_t j = 0; j < block.count; ++j) {
        const U iou = match_iou<C>(g, {block.x1[j], block.y1[j], block.x2[j], block.y2[j], block.area[j]});
        if (iou != iou) return b * kBlockAnchors + j;
      }
      continue;
    }
    std::fill(flags, flags + block.count, uint8_t{0});
    kernels.match_flag(block, gt, highest, flags);
    const uint8_t* first = std::find(flags, flags + block.count, uint8_t{1});
    if (first != flags + block.count) return b * kBlockAnchors + (first - flags);
  }
  return -1;
}

// SSDMatcher's anchor for each box of the batch (global index): its first anchor of highest IoU, in the first
// chunk of its image whose largest IoU for it is its highest.
template <typename C, typename U, typename A>
std::vector<int64_t> first_best_anchors(const Kernels<U>& kernels, const std::vector<ImageSpan>& images,
                                        const std::vector<Chunk>& chunks, const std::vector<U>& partials,
                                        const std::vector<U>& gt_highest, const std::vector<U>& gt_columns,
                                        const A* anchor_data, double pass_cost) {
  std::vector<int64_t> best_anchor(gt_highest.size(), -1);
  std::vector<std::vector<int64_t>> gts_of_chunk(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) {
    const ImageSpan& image = images[chunks[c].image];
    for (int64_t g = image.first_gt; g < image.first_gt + image.gts; ++g) {
      if (best_anchor[g] == -1 && is_highest(partials[chunks[c].first_partial + g - image.first_gt], gt_highest[g])) {
        best_anchor[g] = -2;  // claimed by this chunk
        gts_of_chunk[c].push_back(g);
      }
    }
  }
  for_each_chunk(static_cast<int64_t>(chunks.size()), pass_cost / 8, [&](int64_t c) {
    if (gts_of_chunk[c].empty()) return;
    thread_local AnchorColumns<U> columns;
    columns.load(anchor_data + 4 * chunks[c].first_anchor, chunks[c].count);
    for (const int64_t g : gts_of_chunk[c]) {
      const int64_t j = first_anchor_reaching<C>(kernels, columns, gt_columns.data() + 5 * g, gt_highest[g]);
      TORCH_INTERNAL_ASSERT(j >= 0, "no anchor reaches ground-truth box ", g, "'s highest IoU");
      best_anchor[g] = chunks[c].first_anchor + j;
    }
  });
  return best_anchor;
}

// What the matching passes leave for each anchor of the batch.
template <typename U>
struct AnchorMatches {
  std::vector<U> best;                  // largest IoU
  std::vector<MatchIndex<U>> best_gt;   // its ground-truth box, within the image
};

// Runs both passes over the batch and calls finish(chunk, anchors' decisions) for every chunk, in parallel.
// `decisions` holds Matcher's result for the chunk's anchors (unused for images without ground truth).
template <typename G, typename A, typename Finish>
void match_batch(const at::Tensor& gt_boxes, const at::Tensor& anchors, std::vector<ImageSpan> images,
                 double high_threshold, double low_threshold, bool allow_low_quality_matches,
                 bool force_best_anchors, const Finish& finish) {
  using U = iou_t<G, A>;
  using C = corner_t<G, A>;
  const Kernels<U> kernels = match_kernels<C, U>();
  const MatchThresholds<U> thresholds{static_cast<U>(high_threshold), static_cast<U>(low_threshold),
                                      allow_low_quality_matches, force_best_anchors};

  const int64_t gt_count = gt_boxes.size(0), anchor_count = anchors.size(0);
  const G* gt_data = gt_boxes.data_ptr<G>();
  std::vector<U> gt_columns(5 * gt_count);  // x1, y1, x2, y2, area per box
  for (int64_t g = 0; g < gt_count; ++g) {
    const MatchBox<U> box = match_box<U>(gt_data + 4 * g);
    if (!(std::isfinite(box.x1) && std::isfinite(box.y1) && std::isfinite(box.x2) && std::isfinite(box.y2))) {
      fail_non_finite_boxes("gt_boxes");
    }
    U* column = gt_columns.data() + 5 * g;
    column[0] = box.x1, column[1] = box.y1, column[2] = box.x2, column[3] = box.y2, column[4] = box.area;
  }

  int64_t partial_count = 0;
  const std::vector<Chunk> chunks = chunks_of(images, partial_count);
  const int64_t chunk_count = static_cast<int64_t>(chunks.size());
  const double gt_per_image = static_cast<double>(gt_count) / std::max<size_t>(1, images.size());
  const double pass_cost = anchor_count * (kPassNanoseconds + gt_per_image * kPassNanosecondsPerBox);
  AnchorMatches<U> matches{std::vector<U>(anchor_count), std::vector<MatchIndex<U>>(anchor_count)};
  std::vector<U> partials(partial_count);
  const A* anchor_data = anchors.data_ptr<A>();
  std::atomic<bool> non_finite{false};

  for_each_chunk(chunk_count, pass_cost, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const ImageSpan& image = images[chunk.image];
    if (image.gts == 0) return;
    thread_local AnchorColumns<U> columns;
    if (!columns.load(anchor_data + 4 * chunk.first_anchor, chunk.count)) {
      non_finite = true;
      return;
    }
    U* best = matches.best.data() + chunk.first_anchor;
    MatchIndex<U>* best_gt = matches.best_gt.data() + chunk.first_anchor;
    std::fill(best, best + chunk.count, U(0));  // torch.max of all +-0 IoUs: box 0
    std::fill(best_gt, best_gt + chunk.count, MatchIndex<U>(0));
    for (int64_t g = 0; g < image.gts; ++g) {
      const U* gt = gt_columns.data() + 5 * (image.first_gt + g);
      U largest = -INFINITY;
      for (int64_t b = 0; b < columns.blocks(); ++b) {
        const int64_t first = b * kBlockAnchors;
        const U block_largest = columns.all_zero(b, gt)
                                    ? U(0)
                                    : kernels.match_update(columns.block(b), gt, static_cast<MatchIndex<U>>(g),
                                                           best + first, best_gt + first);
        largest = max_propagating_nan(largest, block_largest);
      }
      partials[chunk.first_partial + g] = largest;
    }
  });
  if (non_finite) fail_non_finite_boxes("anchors");

  std::vector<U> gt_highest(gt_count);
  for (const ImageSpan& image : images) {
    for (int64_t g = 0; g < image.gts; ++g) gt_highest[image.first_gt + g] = -INFINITY;
  }
  for (const Chunk& chunk : chunks) {
    const ImageSpan& image = images[chunk.image];
    for (int64_t g = 0; g < image.gts; ++g) {
      U& highest = gt_highest[image.first_gt + g];
      highest = max_propagating_nan(highest, partials[chunk.first_partial + g]);
    }
  }
  const std::vector<int64_t> forced_anchor =
      force_best_anchors ? first_best_anchors<C>(kernels, images, chunks, partials, gt_highest, gt_columns,
                                                 anchor_data, pass_cost)
                         : std::vector<int64_t>();

  for_each_chunk(chunk_count, pass_cost, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const ImageSpan& image = images[chunk.image];
    thread_local std::vector<int64_t> decisions;
    decisions.assign(chunk.count, 0);
    if (image.gts > 0) {
      thread_local std::vector<uint8_t> reaches_gt_highest;
      reaches_gt_highest.assign(chunk.count, 0);
      if (allow_low_quality_matches) {
        thread_local AnchorColumns<U> columns;
        bool loaded = false;
        for (int64_t g = 0; g < image.gts; ++g) {
          const U highest = gt_highest[image.first_gt + g];
          if (!(partials[chunk.first_partial + g] == highest)) continue;  // not in this chunk (or NaN: nowhere)
          if (!loaded) {  // only chunks holding some box's highest IoU need their anchors again
            columns.load(anchor_data + 4 * chunk.first_anchor, chunk.count);
            loaded = true;
          }
          const U* gt = gt_columns.data() + 5 * (image.first_gt + g);
          for (int64_t b = 0; b < columns.blocks(); ++b) {
            uint8_t* flags = reaches_gt_highest.data() + b * kBlockAnchors;
            if (!columns.all_zero(b, gt)) {
              kernels.match_flag(columns.block(b), gt, highest, flags);
            } else if (highest == U(0)) {
              std::fill(flags, flags + columns.block(b).count, uint8_t{1});
            }
          }
        }
      }
      const U* best = matches.best.data() + chunk.first_anchor;
      const MatchIndex<U>* best_gt = matches.best_gt.data() + chunk.first_anchor;
      for (int64_t j = 0; j < chunk.count; ++j) {
        decisions[j] = match_decision(best[j], static_cast<int64_t>(best_gt[j]), reaches_gt_highest[j] != 0,
                                      thresholds);
      }
      for (int64_t g = 0; force_best_anchors && g < image.gts; ++g) {
        const int64_t j = forced_anchor[image.first_gt + g] - chunk.first_anchor;  // the last box wins
        if (j >= 0 && j < chunk.count) decisions[j] = g;
      }
    }
    finish(chunk, image, decisions.data());
  });
}

at::Tensor match_anchors(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                         at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                         bool allow_low_quality_matches, bool force_best_anchors) {
  check_matching_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                        /*empty_gt_allowed=*/false);
  at::Tensor out = at::empty({anchors.size(0)}, anchors.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  int64_t* matched = out.data_ptr<int64_t>();
  visit_float_types(gt.scalar_type(), anchor.scalar_type(), [&]<typename G, typename A>() {
    match_batch<G, A>(gt, anchor, spans_of(gt_per_image, anchors_per_image), high_threshold, low_threshold,
                      allow_low_quality_matches, force_best_anchors,
                      [&](const Chunk& chunk, const ImageSpan&, const int64_t* decisions) {
                        std::copy(decisions, decisions + chunk.count, matched + chunk.first_anchor);
                      });
  });
  return out;
}

// FCOS's assignment: threads over chunks of anchors, each chunk's points against every box of its image.
template <typename T>
void match_fcos_batch(const T* gt_data, const T* anchor_data, std::vector<ImageSpan> images, FcosLevels levels,
                      T radius, int64_t* matched) {
  std::vector<FcosBox<T>> boxes;
  for (const ImageSpan& image : images) {
    for (int64_t g = image.first_gt; g < image.first_gt + image.gts; ++g) {
      const T* box = gt_data + 4 * g;
      if (!(std::isfinite(box[0]) && std::isfinite(box[1]) && std::isfinite(box[2]) && std::isfinite(box[3]))) {
        fail_non_finite_boxes("gt_boxes");
      }
      boxes.push_back(fcos_box(box));
    }
  }
  int64_t partial_count = 0;
  const std::vector<Chunk> chunks = chunks_of(images, partial_count);
  const double gt_per_image = static_cast<double>(boxes.size()) / std::max<size_t>(1, images.size());
  const double anchor_count = images.empty() ? 0.0 : static_cast<double>(images.back().first_anchor + images.back().anchors);
  std::atomic<bool> non_finite{false};
  for_each_chunk(static_cast<int64_t>(chunks.size()), anchor_count * (kFcosNanoseconds + gt_per_image * kFcosNanosecondsPerBox),
                 [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const ImageSpan& image = images[chunk.image];
    thread_local std::vector<FcosPoint<T>> points;
    thread_local std::vector<T> best;
    thread_local std::vector<int64_t> best_box;
    points.resize(chunk.count);
    best.assign(chunk.count, T(0));
    best_box.assign(chunk.count, -1);
    for (int64_t j = 0; j < chunk.count; ++j) {
      const T* anchor = anchor_data + 4 * (chunk.first_anchor + j);
      if (!(std::isfinite(anchor[0]) && std::isfinite(anchor[1]) && std::isfinite(anchor[2]) &&
            std::isfinite(anchor[3]))) {
        non_finite = true;
      }
      const int64_t local = chunk.first_anchor - image.first_anchor + j;
      points[j] = fcos_point(anchor, radius, local < levels.first_level_end, local >= levels.last_level_begin);
    }
    T min_x = INFINITY, min_y = INFINITY, max_x = -INFINITY, max_y = -INFINITY;
    for (int64_t j = 0; j < chunk.count; ++j) {
      min_x = std::min(min_x, points[j].x), max_x = std::max(max_x, points[j].x);
      min_y = std::min(min_y, points[j].y), max_y = std::max(max_y, points[j].y);
    }
    for (int64_t g = 0; g < image.gts; ++g) {
      const FcosBox<T> box = boxes[image.first_gt + g];
      // A point inside a box (every distance to its sides > 0) lies strictly between its sides: a box without
      // any of the chunk's points between its sides is taken by none.
      if (!(box.x1 < max_x && box.x2 > min_x && box.y1 < max_y && box.y2 > min_y)) continue;
      for (int64_t j = 0; j < chunk.count; ++j) {
        if (fcos_takes(points[j], box) && box.priority > best[j]) best[j] = box.priority, best_box[j] = g;
      }
    }
    for (int64_t j = 0; j < chunk.count; ++j) matched[chunk.first_anchor + j] = fcos_decision(best[j], best_box[j]);
  });
  if (non_finite) fail_non_finite_boxes("anchors");
}

at::Tensor match_fcos(const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                      at::IntArrayRef anchors_per_image, at::IntArrayRef anchors_per_level, double radius) {
  check_fcos_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, anchors_per_level, radius);
  at::Tensor out = at::empty({anchors.size(0)}, anchors.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  AT_DISPATCH_FLOATING_TYPES(anchor.scalar_type(), "rpn_ops_match_fcos", [&] {
    match_fcos_batch<scalar_t>(gt.data_ptr<scalar_t>(), anchor.data_ptr<scalar_t>(),
                               spans_of(gt_per_image, anchors_per_image), fcos_levels(anchors_per_level),
                               static_cast<scalar_t>(radius), out.data_ptr<int64_t>());
  });
  return out;
}

// assign_targets' outputs: labels, matched ground truth (G) and its encoding against the anchors (L), with
// the ground truth as reference boxes.
template <typename G, typename A, typename L>
void fill_targets(const at::Tensor& gt, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
                  at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold,
                  bool allow_low_quality_matches, at::ArrayRef<double> weights, at::Tensor& labels,
                  at::Tensor& matched_gt, at::Tensor& targets) {
  using M = promoted_t<G, A>;
  const G* gt_data = gt.data_ptr<G>();
  const A* anchor_data = anchors.data_ptr<A>();
  float* label_data = labels.data_ptr<float>();
  G* matched_data = matched_gt.data_ptr<G>();
  L* target_data = targets.data_ptr<L>();
  const G encode_weights[4] = {to<G>(weights[0]), to<G>(weights[1]), to<G>(weights[2]), to<G>(weights[3])};
  const auto encode = chunk_for<EncodeChunk<G, A, L>>(current_isa());
  const auto finish = [&](const Chunk& chunk, const ImageSpan& image, const int64_t* decisions) {
    G* matched = matched_data + 4 * chunk.first_anchor;
    for (int64_t j = 0; j < chunk.count; ++j) {
      if (image.gts == 0) {
        label_data[chunk.first_anchor + j] = 0.0f;
        std::fill(matched + 4 * j, matched + 4 * j + 4, G(0));
      } else {
        label_data[chunk.first_anchor + j] = label_of(decisions[j]);
        std::memcpy(matched + 4 * j, gt_data + 4 * (image.first_gt + std::max<int64_t>(decisions[j], 0)),
                    4 * sizeof(G));
      }
    }
    thread_local std::vector<M> columns;
    thread_local std::vector<L> logs;
    columns.resize(2 * kChunkItems);
    logs.resize(2 * kChunkItems);
    for (int64_t first = 0; first < chunk.count; first += kChunkItems) {
      const int64_t count = std::min(chunk.count - first, kChunkItems);
      encode({matched + 4 * first, anchor_data + 4 * (chunk.first_anchor + first), count,
              {encode_weights[0], encode_weights[1], encode_weights[2], encode_weights[3]}, columns.data(),
              columns.data() + count, logs.data(), target_data + 4 * (chunk.first_anchor + first)});
    }
  };
  match_batch<G, A>(gt, anchors, spans_of(gt_per_image, anchors_per_image), high_threshold, low_threshold,
                    allow_low_quality_matches, /*force_best_anchors=*/false, finish);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> assign_targets(
    const at::Tensor& gt_boxes, const at::Tensor& anchors, at::IntArrayRef gt_per_image,
    at::IntArrayRef anchors_per_image, double high_threshold, double low_threshold, bool allow_low_quality_matches,
    at::ArrayRef<double> weights, bool float32_log) {
  check_assign_inputs(gt_boxes, anchors, gt_per_image, anchors_per_image, high_threshold, low_threshold, weights);
  at::Tensor labels, matched_gt, targets;
  std::tie(labels, matched_gt, targets) = empty_assign_outputs(gt_boxes, anchors, float32_log);
  if (labels.numel() == 0) return {labels, matched_gt, targets};
  const at::Tensor gt = gt_boxes.contiguous(), anchor = anchors.contiguous();
  // The targets' type: encode's, with the ground truth as reference boxes.
  visit_encode_types(gt.scalar_type(), anchor.scalar_type(), targets.scalar_type(), [&]<typename G, typename A, typename L>() {
    fill_targets<G, A, L>(gt, anchor, gt_per_image, anchors_per_image, high_threshold, low_threshold,
                          allow_low_quality_matches, weights, labels, matched_gt, targets);
  });
  return {labels, matched_gt, targets};
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("match_anchors", TORCH_FN(match_anchors));
  m.impl("match_fcos", TORCH_FN(match_fcos));
  m.impl("assign_targets", TORCH_FN(assign_targets));
}

}  // namespace rpn_ops::cpu
