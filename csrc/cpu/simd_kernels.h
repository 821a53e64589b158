// The CPU hot loops, compiled once per instruction set (simd_{baseline,avx2,avx512}.cpp) and chosen at run
// time with kernels_for(current_isa()): the greedy NMS over boxes laid out for SIMD and spatial pruning
// (the layout is built by cpu/nms.cpp), rows of the IoU matrix (cpu/box_iou.cpp), target assignment's
// best-match and low-quality-match loops (cpu/matching.cpp), and the scan for score candidates
// (cpu/score_candidates.cpp).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "isa_targets.h"

namespace rpn_ops::cpu {

// Boxes per SIMD block, and blocks per group. A kept box is tested against group bounds first, then block
// bounds, and only then box by box, so it only touches the boxes near it.
constexpr int64_t kBlockSize = 16;  // at most 32: a block's suppressed flags are one uint32_t
constexpr int64_t kGroupBlocks = kBlockSize;  // a group's block bounds are tested as one block
// Category arrays carry this many extra entries, so a vector load at a block's last lanes stays in bounds.
constexpr int64_t kCategoryPadding = kBlockSize;

// Axis-aligned bounds, one entry per block or group, in structure-of-arrays form.
template <typename T>
struct Bounds {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const int32_t* category_min;  // null without categories
  const int32_t* category_max;
};

// The boxes that take part in suppression, in spatial order (Morton order of their centres, within each
// category), padded to whole groups with zero-area boxes that never suppress and are never visited.
// Group bounds are padded to a multiple of kBlockSize entries with empty bounds.
template <typename T>
struct SpatialBoxes {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
  const int32_t* category;  // null for plain NMS
  // Per category c: groups [group_range[2c], group_range[2c + 1]) hold its boxes (null for plain NMS).
  const int64_t* group_range;
  int64_t groups;
  Bounds<T> block;
  Bounds<T> group;
};

// The score order (box index for each rank) and each box's slot in SpatialBoxes (-1: the box neither
// suppresses nor can be suppressed, e.g. zero-area or NaN boxes with a non-negative threshold).
struct ScoreOrder {
  const int64_t* box_of_rank;
  const int64_t* slot_of_box;
  int64_t count;
};

// Runs greedy NMS in score order, writing kept box indices to `keep` (at most max_output of them) and
// returning how many. `suppressed` has one zeroed bit mask per block (bit k: slot block * kBlockSize + k).
// `prune` (threshold >= 0): only overlapping boxes can suppress each other, so groups and blocks whose bounds
// miss a kept box are skipped. A box is compared with its IoU > threshold exactly as torchvision's CPU loop
// does; suppression is symmetric, so a kept box may also mark boxes ranked above it, which is harmless.
template <typename T>
using GreedyNms = int64_t (*)(const SpatialBoxes<T>& boxes, const ScoreOrder& order, T threshold, bool prune,
                              int64_t max_output, uint32_t* suppressed, int64_t* keep);

// Boxes as structure of arrays with their areas: the columns of an IoU matrix.
template <typename T>
struct ColumnBoxes {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
  int64_t count;
};

// out[r, j] = IoU(rows[r], columns[j]) for row_count [*, 4] rows; out is [row_count, columns.count].
template <typename T>
using IouRows = void (*)(const T* rows, int64_t row_count, const ColumnBoxes<T>& columns, T* out);

// Target assignment (cpu/matching.cpp): the index of a ground-truth box, as wide as T so that index and IoU
// lanes line up.
template <typename T>
using MatchIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// IoU of one ground-truth box `gt` (x1, y1, x2, y2, area) with each anchor: where it is better (torch.max's
// order) than best[j], best[j] and best_gt[j] take it and gt_index. Returns the largest of these IoUs (NaN
// wins).
template <typename T>
using MatchUpdate = T (*)(const ColumnBoxes<T>& anchors, const T* gt, MatchIndex<T> gt_index, T* best,
                         MatchIndex<T>* best_gt);
// flags[j] = 1 where IoU(gt, anchor j) == target.
template <typename T>
using MatchFlag = void (*)(const ColumnBoxes<T>& anchors, const T* gt, T target, uint8_t* flags);

// Appends to `out` the indices i in [begin, end) with values[i] > lower, in order.
template <typename T>
using IndicesAbove = void (*)(const T* values, int64_t begin, int64_t end, T lower, std::vector<int64_t>& out);

template <typename T>
struct Kernels {
  GreedyNms<T> greedy_nms;
  IouRows<T> iou_rows;
  MatchUpdate<T> match_update;
  MatchFlag<T> match_flag;
  IndicesAbove<T> indices_above;
};

// The focal loss of negative targets over `count` float32 logits (dense_focal_loss, cpu/focal_loss.cpp): their
// float64 sum, or their gradients times `scale`.
constexpr int64_t kFocalSumLanes = 16;  // accumulators: a multiple of every instruction set's float lanes
struct FocalKernels {
  double (*negative_sum)(const float* x, int64_t count, float alpha, float gamma);
  void (*negative_gradients)(const float* x, int64_t count, float scale, float alpha, float gamma, float* out);
};

#define RPN_DECLARE_KERNELS(isa)                                                                            \
  namespace isa {                                                                                           \
  template <typename T>                                                                                     \
  int64_t greedy_nms(const SpatialBoxes<T>& boxes, const ScoreOrder& order, T threshold, bool prune,       \
                     int64_t max_output, uint32_t* suppressed, int64_t* keep);                              \
  template <typename T>                                                                                     \
  void iou_rows(const T* rows, int64_t row_count, const ColumnBoxes<T>& columns, T* out);                  \
  template <typename T>                                                                                     \
  T match_update(const ColumnBoxes<T>& anchors, const T* gt, MatchIndex<T> gt_index, T* best,              \
                 MatchIndex<T>* best_gt);                                                                   \
  template <typename T>                                                                                     \
  void match_flag(const ColumnBoxes<T>& anchors, const T* gt, T target, uint8_t* flags);                   \
  template <typename T>                                                                                     \
  void indices_above(const T* values, int64_t begin, int64_t end, T lower, std::vector<int64_t>& out);      \
  double focal_negative_sum(const float* x, int64_t count, float alpha, float gamma);                      \
  void focal_negative_gradients(const float* x, int64_t count, float scale, float alpha, float gamma,       \
                                float* out);                                                                \
  }
RPN_DECLARE_KERNELS(baseline)
RPN_DECLARE_KERNELS(avx2)
RPN_DECLARE_KERNELS(avx512)
#undef RPN_DECLARE_KERNELS

template <typename T>
Kernels<T> kernels_for(Isa isa) {
#if defined(RPN_OPS_X86_ISAS)
  if (isa == Isa::avx512) {
    return {&avx512::greedy_nms<T>, &avx512::iou_rows<T>, &avx512::match_update<T>, &avx512::match_flag<T>,
            &avx512::indices_above<T>};
  }
  if (isa == Isa::avx2) {
    return {&avx2::greedy_nms<T>, &avx2::iou_rows<T>, &avx2::match_update<T>, &avx2::match_flag<T>,
            &avx2::indices_above<T>};
  }
#endif
  return {&baseline::greedy_nms<T>, &baseline::iou_rows<T>, &baseline::match_update<T>, &baseline::match_flag<T>,
          &baseline::indices_above<T>};
}

inline FocalKernels focal_kernels_for(Isa isa) {
#if defined(RPN_OPS_X86_ISAS)
  if (isa == Isa::avx512) return {&avx512::focal_negative_sum, &avx512::focal_negative_gradients};
  if (isa == Isa::avx2) return {&avx2::focal_negative_sum, &avx2::focal_negative_gradients};
#endif
  return {&baseline::focal_negative_sum, &baseline::focal_negative_gradients};
}

}  // namespace rpn_ops::cpu
