// Box arithmetic shared by the CPU and CUDA kernels, written once so both backends give the same bits.
//
// The functions are templates over the number type T, which may also be a SIMD vector of lanes (GCC vector
// extensions): the CPU NMS runs the very same arithmetic on 16 boxes at a time.
//
// Every function is `static inline` on purpose: the CPU kernels include this header in translation units
// compiled for different instruction sets (baseline, AVX2, AVX-512). Internal linkage keeps each unit's copy
// private, so the linker can never hand an AVX-512 instance to baseline code.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define RPN_INLINE static __forceinline__ __host__ __device__
#elif defined(__GNUC__) || defined(__clang__)
// Always inlined: the CPU NMS calls these on SIMD vectors, which must never cross a function call.
#define RPN_INLINE static inline __attribute__((always_inline))
#else
#define RPN_INLINE static inline
#endif

namespace rpn_ops {

// a > b ? a : b, in that order: the comparison torchvision's C++ code uses (std::max), which maps to a single
// max instruction when vectorised. NaN never reaches a decision through it: a NaN coordinate makes the box's
// area NaN, and every IoU with a NaN area is NaN (see iou_of).
template <typename T>
RPN_INLINE T larger(T a, T b) { return a > b ? a : b; }
template <typename T>
RPN_INLINE T smaller(T a, T b) { return a < b ? a : b; }

// (x2 - x1) * (y2 - y1): torchvision's box_area, in the same operation order.
template <typename T>
RPN_INLINE T area_of(T x1, T y1, T x2, T y2) { return (x2 - x1) * (y2 - y1); }

// Intersection over union in torchvision's operation order:
//   inter = clamp(min(ax2, bx2) - max(ax1, bx1), 0) * clamp(min(ay2, by2) - max(ay1, by1), 0)
//   iou   = inter / ((area_a + area_b) - inter)
// Symmetric in (a, b) whenever no coordinate is NaN, which the greedy NMS relies on. The build turns off
// floating-point contraction, so `area_a + area_b - w * h` is never fused into an FMA that would change bits.
template <typename T>
RPN_INLINE T iou_of(T ax1, T ay1, T ax2, T ay2, T area_a, T bx1, T by1, T bx2, T by2, T area_b) {
  const T w = larger(smaller(ax2, bx2) - larger(ax1, bx1), T{});
  const T h = larger(smaller(ay2, by2) - larger(ay1, by1), T{});
  const T inter = w * h;
  return inter / (area_a + area_b - inter);
}

// torch.max's order: NaN above everything, the first of equal values kept. `value` replaces `best` (seen
// earlier) only when it is strictly better. For numbers; target assignment reduces IoUs with it.
template <typename T>
RPN_INLINE bool better_match(T value, T best) {
  return value > best || (value != value && best == best);
}

// Two boxes can only reach a positive intersection when they overlap strictly on both axes. With a
// non-negative threshold, every pair failing this test has IoU 0, -0 or NaN and never suppresses.
// (bool for numbers, a lane mask for vectors.)
template <typename T>
RPN_INLINE auto may_overlap(T ax1, T ay1, T ax2, T ay2, T bx1, T by1, T bx2, T by2) {
  return (bx1 < ax2) & (bx2 > ax1) & (by1 < ay2) & (by2 > ay1);  // no short circuit: vectorises
}

// A box with x1 < x2 and y1 < y2 (so no NaN). Any other box has zero intersection with every box.
template <typename T>
RPN_INLINE auto has_positive_extent(T x1, T y1, T x2, T y2) { return (x1 < x2) & (y1 < y2); }

// NMS compares the IoU with the threshold as a double (torchvision's CPU rule). For an IoU held as T,
// `double(iou) > threshold` is the same test as `iou > threshold_for<T>(threshold)`: the largest T not above
// the threshold. This lets float kernels compare in float, lane for lane, with no conversion.
template <typename T>
RPN_INLINE T threshold_for(double threshold) {
  if constexpr (std::is_same_v<T, double>) {
    return threshold;
  } else {
    static_assert(std::is_same_v<T, float>, "kernels compute in float or double");
    if (threshold >= static_cast<double>(FLT_MAX)) return FLT_MAX;
    if (threshold < -static_cast<double>(FLT_MAX)) return -INFINITY;
    float t = static_cast<float>(threshold);  // rounds to nearest, which may land above the threshold
    if (static_cast<double>(t) > threshold) t = ::nextafterf(t, -INFINITY);
    return t;
  }
}

// Unsigned keys whose ascending order is the order torch.sort(descending=True) gives the scores: NaN first
// (torch treats it as the largest value), then +inf ... -inf; -0.0 ties with +0.0. Sorting them stably is
// NMS's visiting order, on both backends.
RPN_INLINE uint32_t descending_key(float score) {
  if (score != score) return 0;  // NaN, of either sign
  if (score == 0.0f) score = 0.0f;
  uint32_t bits;
  memcpy(&bits, &score, sizeof(bits));
  const uint32_t ascending = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return ~ascending;  // at least 0x007fffff (+inf), so NaN's 0 comes first
}

RPN_INLINE uint64_t descending_key(double score) {
  if (score != score) return 0;
  if (score == 0.0) score = 0.0;
  uint64_t bits;
  memcpy(&bits, &score, sizeof(bits));
  const uint64_t ascending = (bits & 0x8000000000000000ull) ? ~bits : bits | 0x8000000000000000ull;
  return ~ascending;
}

}  // namespace rpn_ops
