// Target-assignment arithmetic shared by the CPU and CUDA kernels: torchvision's
// Matcher(high, low, allow_low_quality_matches)(box_iou(gt_boxes, anchors)), decided anchor by anchor without
// the [G, A] IoU matrix.
//
// IoU types follow torchvision's box_iou on the two dtypes: the corners are compared in C = promote(G, A),
// `rb - lt` is computed in C and only then upcast (so float16 / bfloat16 pairs round the extent to half
// precision), areas are computed on each side's upcast boxes, and the IoU is U = upcast(C).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "box_coding.h"
#include "box_math.h"

namespace rpn_ops {

constexpr int64_t kBelowLowThreshold = -1;  // Matcher.BELOW_LOW_THRESHOLD
constexpr int64_t kBetweenThresholds = -2;  // Matcher.BETWEEN_THRESHOLDS

template <typename G, typename A>
using corner_t = promoted_t<G, A>;
template <typename G, typename A>
using iou_t = opmath_t<promoted_t<G, A>>;

// A box converted to the IoU type U, with torchvision's box_area of its upcast coordinates: the operands of
// the IoU, prepared once per box.
template <typename U>
struct MatchBox {
  U x1, y1, x2, y2, area;
};

template <typename U, typename B>
RPN_HD MatchBox<U> match_box(const B* box) {
  using O = opmath_t<B>;
  const O x1 = static_cast<O>(box[0]), y1 = static_cast<O>(box[1]), x2 = static_cast<O>(box[2]),
          y2 = static_cast<O>(box[3]);
  return {static_cast<U>(x1), static_cast<U>(y1), static_cast<U>(x2), static_cast<U>(y2),
          static_cast<U>(area_of(x1, y1, x2, y2))};
}

// One side of the intersection, clamp(min(a2, b2) - max(a1, b1), 0): the corners (exact in U) are selected,
// their difference rounded to C and upcast, as `_upcast(rb - lt)` does.
template <typename C, typename U>
RPN_HD U overlap_as(U a1, U a2, U b1, U b2) {
  U extent = smaller(a2, b2) - larger(a1, b1);
  if constexpr (!std::is_same_v<C, U>) extent = static_cast<U>(static_cast<C>(extent));
  return larger(extent, U{});
}

// box_iou(gt, anchor): inter / (area_gt + area_anchor - inter).
template <typename C, typename U>
RPN_HD U match_iou(const MatchBox<U>& gt, const MatchBox<U>& anchor) {
  const U inter = overlap_as<C>(gt.x1, gt.x2, anchor.x1, anchor.x2) * overlap_as<C>(gt.y1, gt.y2, anchor.y1, anchor.y2);
  return inter / (gt.area + anchor.area - inter);
}

// The larger under torch.max's order (better_match, box_math.h: NaN wins), for per-GT maxima.
template <typename U>
RPN_HD U max_propagating_nan(U a, U b) {
  return better_match(b, a) ? b : a;
}

// IoUs as unsigned keys in torch.max's order (NaN above everything, -0 equal to +0), for the GPU's atomicMax;
// key 0 is below every IoU. value_of_key undoes it (NaN for NaN).
RPN_HD uint32_t key_of(float iou) { return ~descending_key(iou); }
RPN_HD uint64_t key_of(double iou) { return ~descending_key(iou); }

template <typename U, typename Bits>
RPN_HD U value_of_key(Bits key) {
  constexpr Bits sign = Bits{1} << (8 * sizeof(Bits) - 1);
  if (key == ~Bits{0}) return static_cast<U>(NAN);
  const Bits bits = (key & sign) ? key & ~sign : ~key;
  U value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// A pair of boxes that do not overlap strictly on some axis has inter = 0, so its IoU is +-0 exactly when the
// union is not 0. Guaranteed when one area is positive and the other not negative; otherwise (0 / 0 = NaN is
// possible) the IoU has to be computed.
template <typename U>
RPN_HD bool union_is_nonzero(U area_a, U area_b) {
  return (area_a > U(0) && area_b >= U(0)) || (area_a >= U(0) && area_b > U(0));
}

// The thresholds as Matcher compares them: `iou < threshold` with a Python float, in the IoU's dtype; and
// SSDMatcher's rule, applied after Matcher's decisions: each box's first anchor of highest IoU is matched to it.
template <typename U>
struct MatchThresholds {
  U high, low;
  bool allow_low_quality_matches;
  bool force_best_anchors;
};

// Whether an IoU is a box's highest under torch.max's order (NaN, the highest of all, included).
template <typename U>
RPN_HD bool is_highest(U iou, U highest) {
  return iou == highest || (iou != iou && highest != highest);
}

// Matcher's decision for one anchor: its best IoU and GT (torch.max over the GT), and whether it reaches
// some GT's highest IoU (a low-quality match, which keeps its best GT when allowed).
template <typename U>
RPN_HD int64_t match_decision(U best, int64_t best_gt, bool is_gt_best, const MatchThresholds<U>& t) {
  if (t.allow_low_quality_matches && is_gt_best) return best_gt;
  if (best < t.low) return kBelowLowThreshold;
  if (best < t.high) return kBetweenThresholds;  // best >= low here; NaN falls through, as in Matcher
  return best_gt;
}

// RegionProposalNetwork.assign_targets_to_anchors' labels: 1 foreground, 0 background, -1 ignored.
RPN_HD float label_of(int64_t match) {
  return match >= 0 ? 1.0f : (match == kBelowLowThreshold ? 0.0f : -1.0f);
}

// FCOS.compute_loss' assignment, one anchor point and one box at a time in its operation order (instead of its
// [A, G, 4] tensors): the point takes the box when it lies inside it, within radius x anchor size of the box's
// centre on both axes, and its largest distance to the box's sides is in the level's scale range (above 4, below 8
// anchor sizes; no lower bound on the first level, no upper bound on the last). Of the boxes it takes, the largest
// `1e8 - area` wins (in the boxes' dtype: equal values keep the first box), and none below 1e-5.
template <typename T>
struct FcosPoint {
  T x, y, reach, lower, upper;  // centre, radius x size, scale range
};

template <typename T>
struct FcosBox {
  T x1, y1, x2, y2, cx, cy, priority;  // priority: 1e8 - area
};

template <typename T>
RPN_HD FcosPoint<T> fcos_point(const T* anchor, T radius, bool first_level, bool last_level) {
  const T size = anchor[2] - anchor[0];
  return {(anchor[0] + anchor[2]) / T(2), (anchor[1] + anchor[3]) / T(2), radius * size,
          first_level ? T(0) : size * T(4), last_level ? static_cast<T>(INFINITY) : size * T(8)};
}

template <typename T>
RPN_HD FcosBox<T> fcos_box(const T* box) {
  return {box[0], box[1], box[2], box[3], (box[0] + box[2]) / T(2), (box[1] + box[3]) / T(2),
          T(1e8) - area_of(box[0], box[1], box[2], box[3])};
}

template <typename T>
RPN_HD bool fcos_takes(const FcosPoint<T>& p, const FcosBox<T>& b) {
  const T left = p.x - b.x1, top = p.y - b.y1, right = b.x2 - p.x, bottom = b.y2 - p.y;
  const T nearest = smaller(smaller(left, top), smaller(right, bottom));
  const T farthest = larger(larger(left, top), larger(right, bottom));
  const T dx = p.x - b.cx, dy = p.y - b.cy;
  const T off_centre = larger(larger(dx, -dx), larger(dy, -dy));
  return (off_centre < p.reach) & (nearest > T(0)) & (farthest > p.lower) & (farthest < p.upper);
}

// After every box: the best box (best: its priority, compared strictly from 0), or -1 below 1e-5.
template <typename T>
RPN_HD int64_t fcos_decision(T best, int64_t best_box) {
  return best < static_cast<T>(1e-5) ? int64_t{-1} : best_box;
}

}  // namespace rpn_ops
