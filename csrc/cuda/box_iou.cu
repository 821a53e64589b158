// Pairwise IoU in one pass over the output: no [N, M, 2] temporaries, each output written once. A block
// fills a tile of 64 rows x 32 columns of one batch entry: a warp writes 32 consecutive outputs of a row
// (coalesced), each thread keeps its column's box in registers and reads the rows' boxes (the same address
// across the warp, a broadcast). 64-bit indices throughout: N * M may pass 2^31.
#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "../box_math.h"
#include "../checks.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

constexpr int kTileColumns = 32;  // blockDim.x
constexpr int kRowLanes = 8;      // blockDim.y
constexpr int kTileRows = 64;     // kTileRows / kRowLanes rows per thread
RPN_OPS_SIZING(kMaxTileBlocks, INT_MAX);  // blocks loop over the tiles beyond

// boxes1: [batch, n, 4], boxes2: [batch, m, 4], iou: [batch, n, m], all contiguous of type T.
template <typename T>
__global__ void box_iou_kernel(const T* __restrict__ boxes1, const T* __restrict__ boxes2, int64_t batch, int64_t n,
                               int64_t m, T* __restrict__ iou) {
  const int64_t column_tiles = ceil_div(m, kTileColumns), row_tiles = ceil_div(n, kTileRows);
  const int64_t tiles = batch * row_tiles * column_tiles;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {  // no __syncthreads: threads may leave
    const int64_t entry = tile / (row_tiles * column_tiles);
    const int64_t row_tile = tile / column_tiles % row_tiles;
    const int64_t col = tile % column_tiles * kTileColumns + threadIdx.x;
    if (col >= m) continue;
    const T* b = boxes2 + 4 * (entry * m + col);
    const T bx1 = b[0], by1 = b[1], bx2 = b[2], by2 = b[3];
    const T area_b = area_of(bx1, by1, bx2, by2);
    const int64_t row_end = std::min(n, (row_tile + 1) * kTileRows);
    for (int64_t row = row_tile * kTileRows + threadIdx.y; row < row_end; row += kRowLanes) {
      const T* a = boxes1 + 4 * (entry * n + row);
      const T ax1 = a[0], ay1 = a[1], ax2 = a[2], ay2 = a[3];
      iou[(entry * n + row) * m + col] =
          iou_of(ax1, ay1, ax2, ay2, area_of(ax1, ay1, ax2, ay2), bx1, by1, bx2, by2, area_b);
    }
  }
}

at::Tensor box_iou(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  std::vector<int64_t> batch = check_box_iou_inputs(boxes1, boxes2);
  const DeviceGuard guard(boxes1.device());
  const int64_t n = boxes1.size(-2), m = boxes2.size(-2);
  const auto type = compute_type(boxes1.scalar_type());
  std::vector<int64_t> out_shape = batch;
  out_shape.push_back(n);
  out_shape.push_back(m);
  at::Tensor out = at::empty(out_shape, boxes1.options().dtype(type));
  if (out.numel() == 0) return out;
  const auto b1 = as_batched_boxes(boxes1, batch, type), b2 = as_batched_boxes(boxes2, batch, type);
  const int64_t entries = b1.size(0);
  const int64_t tiles = entries * ceil_div(n, kTileRows) * ceil_div(m, kTileColumns);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, kMaxTileBlocks)));
  const dim3 threads(kTileColumns, kRowLanes);
  AT_DISPATCH_FLOATING_TYPES(type, "rpn_ops_box_iou_cuda", [&] {
    launch<box_iou_kernel<scalar_t>>(grid, threads, 0, b1.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(), entries, n,
                                     m, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("box_iou", TORCH_FN(box_iou));
}

}  // namespace rpn_ops::cuda
