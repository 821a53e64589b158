// Greedy NMS over boxes laid out for SIMD and spatial pruning. The layout is built by cpu/nms.cpp; the
// greedy loop is compiled once per instruction set (nms_greedy_{baseline,avx2,avx512}.cpp).
#pragma once

#include <cstdint>

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
  int64_t groups;
  Bounds<T> block;
  Bounds<T> group;
};

// The score order: box index and its slot in SpatialBoxes for each rank (-1: the box neither suppresses nor
// can be suppressed, e.g. zero-area or NaN boxes with a non-negative threshold).
struct ScoreOrder {
  const int64_t* box;
  const int64_t* slot;
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

#define RPN_DECLARE_GREEDY_NMS(isa)                                                                         \
  namespace isa {                                                                                           \
  template <typename T>                                                                                     \
  int64_t greedy_nms(const SpatialBoxes<T>& boxes, const ScoreOrder& order, T threshold, bool prune,       \
                     int64_t max_output, uint32_t* suppressed, int64_t* keep);                              \
  }
RPN_DECLARE_GREEDY_NMS(baseline)
RPN_DECLARE_GREEDY_NMS(avx2)
RPN_DECLARE_GREEDY_NMS(avx512)
#undef RPN_DECLARE_GREEDY_NMS

}  // namespace rpn_ops::cpu
