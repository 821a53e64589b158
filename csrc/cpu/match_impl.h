// Target assignment's inner loops (cpu/matching.cpp): one ground-truth box against a block of anchors, a
// register of anchors at a time, through the same iou_of as box_iou and NMS. Compiled once per instruction
// set: included by simd_isa.h after simd_vectors.h.

// Ground-truth indices, one per IoU lane.
template <typename T>
struct IndexVecOf;
template <>
struct IndexVecOf<float> {
  typedef int32_t type __attribute__((vector_size(kVectorBytes)));
};
template <>
struct IndexVecOf<double> {
  typedef int64_t type __attribute__((vector_size(kVectorBytes)));
};
template <typename T>
using IndexVec = typename IndexVecOf<T>::type;

// torch.max's order on lanes: `value` replaces `best` where strictly greater, or NaN over a number.
template <typename V>
inline auto better_lanes(const V& value, const V& best) {
  return (value > best) | ((value != value) & (best == best));
}

template <typename T>
T match_update(const ColumnBoxes<T>& anchors, const T* gt, MatchIndex<T> gt_index, T* best,
               MatchIndex<T>* best_gt) {
  using V = Vec<T>;
  using I = IndexVec<T>;
  const int64_t n = anchors.count, vector_end = n - n % kLanes<T>;
  const V gx1 = broadcast(gt[0]), gy1 = broadcast(gt[1]), gx2 = broadcast(gt[2]), gy2 = broadcast(gt[3]);
  const V garea = broadcast(gt[4]);
  const I index = I{} + gt_index;
  V block_max = broadcast(static_cast<T>(-INFINITY));
  for (int64_t j = 0; j < vector_end; j += kLanes<T>) {
    const V iou = iou_of(load<V>(anchors.x1 + j), load<V>(anchors.y1 + j), load<V>(anchors.x2 + j),
                         load<V>(anchors.y2 + j), load<V>(anchors.area + j), gx1, gy1, gx2, gy2, garea);
    V b = load<V>(best + j);
    I b_gt = load<I>(best_gt + j);
    const auto better = better_lanes(iou, b);
    b = better ? iou : b;
    b_gt = better ? index : b_gt;
    __builtin_memcpy(best + j, &b, sizeof(b));
    __builtin_memcpy(best_gt + j, &b_gt, sizeof(b_gt));
    block_max = better_lanes(iou, block_max) ? iou : block_max;
  }
  T result = -INFINITY;
  for (int64_t k = 0; k < kLanes<T>; ++k) result = better_match(block_max[k], result) ? block_max[k] : result;
  for (int64_t j = vector_end; j < n; ++j) {
    const T iou = iou_of(anchors.x1[j], anchors.y1[j], anchors.x2[j], anchors.y2[j], anchors.area[j], gt[0], gt[1],
                         gt[2], gt[3], gt[4]);
    if (better_match(iou, best[j])) best[j] = iou, best_gt[j] = gt_index;
    if (better_match(iou, result)) result = iou;
  }
  return result;
}

template <typename T>
void match_flag(const ColumnBoxes<T>& anchors, const T* gt, T target, uint8_t* flags) {
  using V = Vec<T>;
  const int64_t n = anchors.count, vector_end = n - n % kLanes<T>;
  const V gx1 = broadcast(gt[0]), gy1 = broadcast(gt[1]), gx2 = broadcast(gt[2]), gy2 = broadcast(gt[3]);
  const V garea = broadcast(gt[4]), wanted = broadcast(target);
  for (int64_t j = 0; j < vector_end; j += kLanes<T>) {
    const V iou = iou_of(load<V>(anchors.x1 + j), load<V>(anchors.y1 + j), load<V>(anchors.x2 + j),
                         load<V>(anchors.y2 + j), load<V>(anchors.area + j), gx1, gy1, gx2, gy2, garea);
    for (uint32_t hits = lane_bits(iou == wanted, kLanes<T>); hits != 0; hits &= hits - 1) {
      flags[j + __builtin_ctz(hits)] = 1;
    }
  }
  for (int64_t j = vector_end; j < n; ++j) {
    const T iou = iou_of(anchors.x1[j], anchors.y1[j], anchors.x2[j], anchors.y2[j], anchors.area[j], gt[0], gt[1],
                         gt[2], gt[3], gt[4]);
    if (iou == target) flags[j] = 1;
  }
}

template float match_update<float>(const ColumnBoxes<float>&, const float*, int32_t, float*, int32_t*);
template double match_update<double>(const ColumnBoxes<double>&, const double*, int64_t, double*, int64_t*);
template void match_flag<float>(const ColumnBoxes<float>&, const float*, float, uint8_t*);
template void match_flag<double>(const ColumnBoxes<double>&, const double*, double, uint8_t*);
