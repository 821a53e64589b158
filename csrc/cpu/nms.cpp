// CPU NMS and batched NMS: exact greedy NMS in torchvision's order and arithmetic, made fast by
//  - a linear-time stable sort of the scores (radix sort),
//  - spatial pruning: the boxes that can suppress anything are laid out in Morton order of their centres
//    (within each category for batched NMS) in blocks and groups with bounds, so a kept box is compared
//    only with the boxes near it (and of its category) instead of with every box after it,
//  - a branch-free SIMD comparison loop compiled per instruction set (simd_*.cpp),
//  - an early exit once max_output boxes are kept.
#include "nms.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../box_math.h"
#include "../checks.h"
#include "parallel.h"
#include "radix_sort.h"
#include "simd_kernels.h"

namespace rpn_ops::cpu {
namespace {

// Box indices by descending score, ties by ascending index: torch.sort(descending=True, stable=True).
template <typename T>
std::vector<int64_t> score_order(const T* scores, int64_t n) {
  std::vector<decltype(descending_key(T{}))> keys(n);
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) {
    keys[i] = descending_key(scores[i]);
    order[i] = i;
  }
  radix_sort_pairs(keys, order);
  return order;
}

uint32_t spread_16_bits(uint32_t v) {
  v = (v | (v << 8)) & 0x00ff00ffu;
  v = (v | (v << 4)) & 0x0f0f0f0fu;
  v = (v | (v << 2)) & 0x33333333u;
  v = (v | (v << 1)) & 0x55555555u;
  return v;
}

// Cell of a centre coordinate on a grid of kGridCells over [lo, hi]; only locality matters, not exactness.
// 2048 x 2048 cells make a 22-bit Morton code: three radix-sort passes.
constexpr double kGridCells = 2048.0;
uint32_t grid_cell(double c, double lo, double hi) {
  const double t = hi > lo ? (c - lo) / (hi - lo) * (kGridCells - 1) : 0.0;
  if (!(t > 0.0)) return 0;  // also NaN
  return t >= kGridCells - 1 ? static_cast<uint32_t>(kGridCells - 1) : static_cast<uint32_t>(t);
}

// Dense category ids (0, 1, ... at most a few times the box count) preserving order, from any integer idxs.
std::vector<int32_t> dense_categories(const at::Tensor& idxs) {
  const auto values = idxs.to(at::kLong).contiguous();
  const int64_t* v = values.data_ptr<int64_t>();
  const int64_t n = values.numel();
  std::vector<int32_t> dense(n);
  if (n == 0) return dense;
  const auto [lo, hi] = std::minmax_element(v, v + n);
  const int64_t low = *lo;
  if (static_cast<uint64_t>(*hi) - static_cast<uint64_t>(low) <= static_cast<uint64_t>(4 * n + 65536)) {
    for (int64_t i = 0; i < n; ++i) dense[i] = static_cast<int32_t>(v[i] - low);
    return dense;
  }
  std::vector<int64_t> distinct(v, v + n);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  for (int64_t i = 0; i < n; ++i) {
    dense[i] = static_cast<int32_t>(std::lower_bound(distinct.begin(), distinct.end(), v[i]) - distinct.begin());
  }
  return dense;
}

template <typename T>
struct BoundsStore {
  std::vector<T> x1, y1, x2, y2;
  std::vector<int32_t> category_min, category_max;

  explicit BoundsStore(int64_t n)
      : x1(n, std::numeric_limits<T>::infinity()),
        y1(n, std::numeric_limits<T>::infinity()),
        x2(n, -std::numeric_limits<T>::infinity()),
        y2(n, -std::numeric_limits<T>::infinity()),
        category_min(n + kCategoryPadding, std::numeric_limits<int32_t>::max()),
        category_max(n + kCategoryPadding, std::numeric_limits<int32_t>::min()) {}

  void include(int64_t e, T bx1, T by1, T bx2, T by2, int32_t category) {
    x1[e] = smaller(x1[e], bx1);
    y1[e] = smaller(y1[e], by1);
    x2[e] = larger(x2[e], bx2);
    y2[e] = larger(y2[e], by2);
    category_min[e] = std::min(category_min[e], category);
    category_max[e] = std::max(category_max[e], category);
  }

  void include(int64_t e, const BoundsStore& other, int64_t k) {
    include(e, other.x1[k], other.y1[k], other.x2[k], other.y2[k], other.category_min[k]);
    category_max[e] = std::max(category_max[e], other.category_max[k]);
  }

  Bounds<T> view(bool with_categories) const {
    return {x1.data(), y1.data(), x2.data(), y2.data(), with_categories ? category_min.data() : nullptr,
            with_categories ? category_max.data() : nullptr};
  }
};

// The boxes that take part in suppression, laid out for nms_greedy (see SpatialBoxes), and each box's slot.
// Reads the boxes in index order except for one gather.
template <typename T>
struct SpatialLayout {
  std::vector<T> x1, y1, x2, y2, area;
  std::vector<int32_t> category;
  std::vector<int64_t> group_range;
  std::vector<int64_t> slot_of_box;
  BoundsStore<T> block_bounds{0}, group_bounds{0};
  int64_t groups = 0;

  SpatialLayout() = default;
  // prune: only boxes with a positive extent take part (valid for a non-negative threshold: any other box
  // has zero intersection with everything). categories: one dense id per box, or empty.
  SpatialLayout(const T* box, int64_t n, const std::vector<int32_t>& categories, bool prune) {
    const bool with_categories = !categories.empty();
    auto takes_part = [&](int64_t i) {
      const T* b = box + 4 * i;
      return !prune || has_positive_extent(b[0], b[1], b[2], b[3]);
    };
    double lo_x = std::numeric_limits<double>::infinity(), hi_x = -lo_x, lo_y = lo_x, hi_y = -lo_x;
    int64_t members = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!takes_part(i)) continue;
      ++members;
      const T* b = box + 4 * i;
      const double cx = 0.5 * b[0] + 0.5 * b[2], cy = 0.5 * b[1] + 0.5 * b[3];
      if (std::isfinite(cx)) lo_x = std::min(lo_x, cx), hi_x = std::max(hi_x, cx);
      if (std::isfinite(cy)) lo_y = std::min(lo_y, cy), hi_y = std::max(hi_y, cy);
    }

    // Spatial order: category first, then the Morton code of the centre.
    std::vector<uint64_t> spatial_key;
    std::vector<int64_t> box_of_slot;
    spatial_key.reserve(members);
    box_of_slot.reserve(members);
    for (int64_t i = 0; i < n; ++i) {
      if (!takes_part(i)) continue;
      const T* b = box + 4 * i;
      const uint32_t morton = spread_16_bits(grid_cell(0.5 * b[0] + 0.5 * b[2], lo_x, hi_x)) |
                              (spread_16_bits(grid_cell(0.5 * b[1] + 0.5 * b[3], lo_y, hi_y)) << 1);
      const uint64_t c = with_categories ? static_cast<uint64_t>(categories[i]) : 0;
      spatial_key.push_back((c << 32) | morton);
      box_of_slot.push_back(i);
    }
    radix_sort_pairs(spatial_key, box_of_slot);

    constexpr int64_t kGroupSize = kBlockSize * kGroupBlocks;
    groups = (members + kGroupSize - 1) / kGroupSize;
    const int64_t slots = groups * kGroupSize;
    for (auto* v : {&x1, &y1, &x2, &y2, &area}) v->assign(slots, T(0));
    category.assign(with_categories ? slots + kCategoryPadding : 0, -1);
    if (with_categories) {
      group_range.assign(2 * static_cast<size_t>(*std::max_element(categories.begin(), categories.end()) + 1), 0);
    }
    block_bounds = BoundsStore<T>(groups * kGroupBlocks);
    group_bounds = BoundsStore<T>((groups + kBlockSize - 1) / kBlockSize * kBlockSize);
    slot_of_box.assign(n, -1);
    for (int64_t s = 0; s < members; ++s) {
      const int64_t i = box_of_slot[s];
      const T* b = box + 4 * i;
      x1[s] = b[0], y1[s] = b[1], x2[s] = b[2], y2[s] = b[3];
      area[s] = area_of(b[0], b[1], b[2], b[3]);
      const int32_t c = with_categories ? categories[i] : 0;
      if (with_categories) {
        category[s] = c;
        if (s == 0 || category[s - 1] != c) group_range[2 * c] = s / kGroupSize;
        group_range[2 * c + 1] = s / kGroupSize + 1;
      }
      block_bounds.include(s / kBlockSize, b[0], b[1], b[2], b[3], c);
      slot_of_box[i] = s;
    }
    for (int64_t block = 0; block < groups * kGroupBlocks; ++block) {
      group_bounds.include(block / kGroupBlocks, block_bounds, block);
    }
  }

  SpatialBoxes<T> view() const {
    const bool with_categories = !category.empty();
    return {x1.data(),
            y1.data(),
            x2.data(),
            y2.data(),
            area.data(),
            with_categories ? category.data() : nullptr,
            with_categories ? group_range.data() : nullptr,
            groups,
            block_bounds.view(with_categories),
            group_bounds.view(with_categories)};
  }
};

// The greedy loop over a layout, visiting the boxes in the order box_of_rank (n entries).
template <typename T>
int64_t greedy_walk(const SpatialLayout<T>& layout, const int64_t* box_of_rank, int64_t n, double iou_threshold,
                    int64_t max_output, int64_t* keep) {
  const ScoreOrder order{box_of_rank, layout.slot_of_box.data(), n};
  std::vector<uint32_t> suppressed(layout.groups * kGroupBlocks, 0);
  return kernels_for<T>(current_isa()).greedy_nms(layout.view(), order, threshold_for<T>(iou_threshold),
                                                  iou_threshold >= 0.0, max_output, suppressed.data(), keep);
}

// Single-threaded cost per box of the score sort and the spatial layout together, measured on a 2-core Intel
// Xeon (AVX-512) with RPN-like boxes.
constexpr double kSortAndLayoutNanoseconds = 40;

// Greedy NMS of contiguous [n, 4] boxes and [n] scores of type T; categories: one dense id per box, or
// empty for plain NMS. The score sort and the spatial layout are independent: two pieces of work for
// parallel_for, which runs them on two threads only when they are big enough and a core is idle.
template <typename T>
at::Tensor greedy_nms(const at::Tensor& boxes, const at::Tensor& scores, const std::vector<int32_t>& categories,
                      double iou_threshold, int64_t max_output) {
  const int64_t n = boxes.size(0);
  // With a negative threshold even disjoint boxes suppress each other, so every box takes part and nothing
  // is pruned.
  const bool prune = iou_threshold >= 0.0;
  std::vector<int64_t> order;
  SpatialLayout<T> layout;
  parallel_for(2, grain_for_tasks(2, n * kSortAndLayoutNanoseconds), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      if (task == 0) {
        order = score_order(scores.data_ptr<T>(), n);
      } else {
        layout = SpatialLayout<T>(boxes.data_ptr<T>(), n, categories, prune);
      }
    }
  });
  at::Tensor keep = at::empty({std::min(n, max_output)}, boxes.options().dtype(at::kLong));
  const int64_t kept = greedy_walk(layout, order.data(), n, iou_threshold, max_output, keep.data_ptr<int64_t>());
  return keep.narrow(0, 0, kept);
}

at::Tensor run_nms(const at::Tensor& boxes, const at::Tensor& scores, const std::vector<int32_t>& categories,
                   double iou_threshold, std::optional<int64_t> max_output) {
  const int64_t limit = max_output_or(max_output, boxes.size(0));
  if (boxes.size(0) == 0 || limit == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto type = compute_type(boxes.scalar_type());
  const auto boxes_c = boxes.to(type).contiguous();
  const auto scores_c = scores.to(type).contiguous();
  return type == at::kDouble ? greedy_nms<double>(boxes_c, scores_c, categories, iou_threshold, limit)
                             : greedy_nms<float>(boxes_c, scores_c, categories, iou_threshold, limit);
}

}  // namespace

template <typename T>
int64_t nms_in_order(const T* boxes, int64_t n, const int64_t* box_of_rank, double iou_threshold,
                     int64_t max_output, int64_t* keep) {
  if (n == 0 || max_output == 0) return 0;
  const SpatialLayout<T> layout(boxes, n, {}, /*prune=*/iou_threshold >= 0.0);
  return greedy_walk(layout, box_of_rank, n, iou_threshold, max_output, keep);
}
template int64_t nms_in_order<float>(const float*, int64_t, const int64_t*, double, int64_t, int64_t*);
template int64_t nms_in_order<double>(const double*, int64_t, const int64_t*, double, int64_t, int64_t*);

at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
               std::optional<int64_t> max_output) {
  check_nms_inputs(boxes, scores, iou_threshold, max_output);
  return run_nms(boxes, scores, {}, iou_threshold, max_output);
}

at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                       double iou_threshold, std::optional<int64_t> max_output) {
  check_batched_nms_inputs(boxes, scores, idxs, iou_threshold, max_output);
  return run_nms(boxes, scores, dense_categories(idxs), iou_threshold, max_output);
}

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("nms", TORCH_FN(nms));
  m.impl("batched_nms", TORCH_FN(batched_nms));
}

}  // namespace rpn_ops::cpu
