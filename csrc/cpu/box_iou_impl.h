// Rows of the IoU matrix, a register of columns at a time, through the same iou_of the scalar and CUDA code
// use. Compiled once per instruction set: included by simd_isa.h after simd_vectors.h.

template <typename T>
void iou_rows(const T* rows, int64_t row_count, const ColumnBoxes<T>& columns, T* out) {
  using V = Vec<T>;
  const int64_t m = columns.count, vector_end = m - m % kLanes<T>;
  for (int64_t r = 0; r < row_count; ++r) {
    const T* a = rows + 4 * r;
    const T area = area_of(a[0], a[1], a[2], a[3]);
    const V x1 = broadcast(a[0]), y1 = broadcast(a[1]), x2 = broadcast(a[2]), y2 = broadcast(a[3]);
    const V area_lanes = broadcast(area);
    T* out_row = out + r * m;
    for (int64_t j = 0; j < vector_end; j += kLanes<T>) {
      const V iou = iou_of(x1, y1, x2, y2, area_lanes, load<V>(columns.x1 + j), load<V>(columns.y1 + j),
                           load<V>(columns.x2 + j), load<V>(columns.y2 + j), load<V>(columns.area + j));
      __builtin_memcpy(out_row + j, &iou, sizeof(iou));
    }
    for (int64_t j = vector_end; j < m; ++j) {
      out_row[j] = iou_of(a[0], a[1], a[2], a[3], area, columns.x1[j], columns.y1[j], columns.x2[j], columns.y2[j],
                          columns.area[j]);
    }
  }
}

template void iou_rows<float>(const float*, int64_t, const ColumnBoxes<float>&, float*);
template void iou_rows<double>(const double*, int64_t, const ColumnBoxes<double>&, double*);
