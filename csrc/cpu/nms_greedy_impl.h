// The greedy NMS loop, compiled once per instruction set: included by simd_isa.h after simd_vectors.h.
//
// A block of kBlockSize boxes is compared with a kept box a register at a time (GCC vector extensions), by
// the same iou_of the scalar and CUDA code use; lane masks become bit masks, walked with count-trailing-zeros.

namespace {

template <typename T>
struct KeptBox {
  Vec<T> x1, y1, x2, y2, area;
  int32_t category;
};

// Bits of the kBlockSize entries from `first` for which lane_test(first + lane) holds.
template <typename T, typename LaneTest>
inline uint32_t block_bits(int64_t first, LaneTest&& lane_test) {
  uint32_t bits = 0;
  for (int64_t lane = 0; lane < kBlockSize; lane += kLanes<T>) bits |= lane_test(first + lane) << lane;
  return bits;
}

template <typename T, bool kCategories>
inline uint32_t same_category_bits(const int32_t* categories, int64_t at, int32_t category) {
  if constexpr (!kCategories) return ~0u;
  return lane_bits(load<CategoryVec<T>>(categories + at) == category, kLanes<T>);
}

// Bounds entries (blocks or groups) from `first` that may hold a box overlapping `box`, of its category.
template <typename T, bool kCategories>
inline uint32_t bounds_hits(const Bounds<T>& bounds, int64_t first, const KeptBox<T>& box) {
  using V = Vec<T>;
  return block_bits<T>(first, [&](int64_t at) {
    uint32_t bits = lane_bits(may_overlap(box.x1, box.y1, box.x2, box.y2, load<V>(bounds.x1 + at),
                                          load<V>(bounds.y1 + at), load<V>(bounds.x2 + at), load<V>(bounds.y2 + at)),
                              kLanes<T>);
    if constexpr (kCategories) {
      bits &= lane_bits((load<CategoryVec<T>>(bounds.category_min + at) <= box.category) &
                            (load<CategoryVec<T>>(bounds.category_max + at) >= box.category),
                        kLanes<T>);
    }
    return bits;
  });
}

// Boxes of the block from `first` whose IoU with `box` exceeds the threshold (and of its category).
template <typename T, bool kCategories>
inline uint32_t suppressed_by(const SpatialBoxes<T>& boxes, int64_t first, const KeptBox<T>& box,
                              const Vec<T>& threshold) {
  using V = Vec<T>;
  return block_bits<T>(first, [&](int64_t at) {
    const V iou = iou_of(box.x1, box.y1, box.x2, box.y2, box.area, load<V>(boxes.x1 + at), load<V>(boxes.y1 + at),
                         load<V>(boxes.x2 + at), load<V>(boxes.y2 + at), load<V>(boxes.area + at));
    return lane_bits(iou > threshold, kLanes<T>) & same_category_bits<T, kCategories>(boxes.category, at, box.category);
  });
}

template <typename Visit>
inline void for_each_bit(uint32_t bits, int64_t first, Visit&& visit) {
  for (; bits != 0; bits &= bits - 1) visit(first + __builtin_ctz(bits));
}

template <typename T, bool kCategories>
int64_t greedy(const SpatialBoxes<T>& boxes, const ScoreOrder& order, T threshold, bool prune,
               int64_t max_output, uint32_t* __restrict suppressed, int64_t* __restrict keep) {
  const Vec<T> threshold_lanes = broadcast(threshold);
  const int64_t blocks = boxes.groups * kGroupBlocks;
  const int64_t* __restrict box_of_rank = order.box_of_rank;
  const int64_t* __restrict slot_of_box = order.slot_of_box;
  int64_t kept = 0;
  for (int64_t rank = 0; rank < order.count && kept < max_output; ++rank) {
    const int64_t box_index = box_of_rank[rank];
    const int64_t slot = slot_of_box[box_index];
    if (slot >= 0 && (suppressed[slot / kBlockSize] >> (slot % kBlockSize) & 1u)) continue;
    keep[kept++] = box_index;
    if (slot < 0 || kept == max_output) continue;
    const KeptBox<T> box{broadcast(boxes.x1[slot]), broadcast(boxes.y1[slot]), broadcast(boxes.x2[slot]),
                         broadcast(boxes.y2[slot]), broadcast(boxes.area[slot]),
                         kCategories ? boxes.category[slot] : 0};
    // No branch on the IoU test: its bits are or-ed into the block's mask, so the divisions of successive
    // blocks overlap in the pipeline.
    auto suppress_in_block = [&](int64_t block) {
      suppressed[block] |= suppressed_by<T, kCategories>(boxes, block * kBlockSize, box, threshold_lanes);
    };
    if (!prune) {
      for (int64_t block = 0; block < blocks; ++block) suppress_in_block(block);
      continue;
    }
    // Group bounds are padded to whole blocks of empty bounds, which never hit.
    int64_t group_begin = 0, group_end = boxes.groups;
    if constexpr (kCategories) {
      group_begin = boxes.group_range[2 * box.category];
      group_end = boxes.group_range[2 * box.category + 1];
    }
    for (int64_t first_group = group_begin - group_begin % kBlockSize; first_group < group_end;
         first_group += kBlockSize) {
      for_each_bit(bounds_hits<T, kCategories>(boxes.group, first_group, box), first_group, [&](int64_t group) {
        const int64_t first_block = group * kGroupBlocks;
        for_each_bit(bounds_hits<T, kCategories>(boxes.block, first_block, box), first_block, suppress_in_block);
      });
    }
  }
  return kept;
}

}  // namespace

template <typename T>
int64_t greedy_nms(const SpatialBoxes<T>& boxes, const ScoreOrder& order, T threshold, bool prune,
                   int64_t max_output, uint32_t* suppressed, int64_t* keep) {
  return boxes.category != nullptr ? greedy<T, true>(boxes, order, threshold, prune, max_output, suppressed, keep)
                                   : greedy<T, false>(boxes, order, threshold, prune, max_output, suppressed, keep);
}

template int64_t greedy_nms<float>(const SpatialBoxes<float>&, const ScoreOrder&, float, bool, int64_t, uint32_t*,
                                   int64_t*);
template int64_t greedy_nms<double>(const SpatialBoxes<double>&, const ScoreOrder&, double, bool, int64_t,
                                    uint32_t*, int64_t*);
