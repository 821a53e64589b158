// CUDA NMS and batched NMS: exact greedy NMS in torchvision's order and arithmetic, all on the GPU.
//  1. Sort: integer keys built from the scores (NaN first, -0 == +0, as the CPU radix sort), stable-sorted
//     by at::sort, so equal scores keep the lower index first; boxes (and categories) gathered in that order.
//  2. Overlap mask in row chunks: bit j of word (r, cb) says that box r suppresses box 64 * cb + j (a later
//     box of the same category with IoU > threshold). Only the words at or right of a row's own 64-block
//     are computed; a chunk of rows is at most kMaskBudgetBytes, so memory stays bounded whatever N.
//  3. Greedy walk, one block per chunk: visits the chunk's rows in score order with a `removed` bitset that
//     lives across chunks, appends each kept box to the output, stops at max_output (later kernels see the
//     count and return at once).
// The only host synchronisation is the read of the kept count at the end.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../box_math.h"
#include "../checks.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

constexpr int kBlockBits = 64;  // boxes per mask word
constexpr int kWalkThreads = 512;
RPN_OPS_SIZING(kMaskBudgetBytes, int64_t{256} << 20);  // one chunk of mask rows
// The default shared memory limit (48 KiB, static and dynamic together) less the walk's `diagonal` words.
RPN_OPS_SIZING(kMaxSharedRemovedWords, 48 * 1024 / 8 - kBlockBits);

// descending_key (box_math.h) shifted into the signed range, since torch sorts signed integers.
__device__ int32_t signed_descending_key(float score) {
  return static_cast<int32_t>(descending_key(score) ^ 0x80000000u);
}
__device__ int64_t signed_descending_key(double score) {
  return static_cast<int64_t>(descending_key(score) ^ 0x8000000000000000ull);
}

template <typename T, typename Key>
__global__ void descending_keys_kernel(const T* __restrict__ scores, int64_t n, Key* __restrict__ keys) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) keys[i] = signed_descending_key(scores[i]);
}

// The 64 boxes of a column block, in shared memory.
template <typename T>
struct ColumnBoxes {
  T x1[kBlockBits], y1[kBlockBits], x2[kBlockBits], y2[kBlockBits], area[kBlockBits];
  int64_t category[kBlockBits];
};

// Block (cb, rb) of a chunk: 64 rows (one per thread) against the 64 boxes of column block cb, for cb >= rb.
// boxes and categories are in score order; categories is null for plain NMS.
template <typename T>
__global__ void overlap_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ categories,
                                    int64_t n, int64_t col_blocks, int64_t chunk_begin, int64_t chunk_rows,
                                    T threshold, const int64_t* __restrict__ kept_count, int64_t limit,
                                    uint64_t* __restrict__ mask) {
  if (*kept_count >= limit) return;  // an earlier chunk already kept enough
  const int64_t row_block = chunk_begin / kBlockBits + blockIdx.y;
  const int64_t col_block = chunk_begin / kBlockBits + blockIdx.x;
  if (col_block < row_block) return;  // below the diagonal: never read

  ColumnBoxes<T>& col = block_shared<ColumnBoxes<T>>();
  const int64_t col_begin = col_block * kBlockBits;
  const int columns = static_cast<int>(std::min<int64_t>(kBlockBits, n - col_begin));
  const int lane = static_cast<int>(threadIdx.x);
  if (lane < columns) {
    const T* b = boxes + 4 * (col_begin + lane);
    col.x1[lane] = b[0], col.y1[lane] = b[1], col.x2[lane] = b[2], col.y2[lane] = b[3];
    col.area[lane] = area_of(b[0], b[1], b[2], b[3]);
    col.category[lane] = categories ? categories[col_begin + lane] : 0;
  }
  __syncthreads();

  const int64_t row = row_block * kBlockBits + lane;
  if (row >= chunk_begin + chunk_rows) return;
  const T* a = boxes + 4 * row;
  const T area_a = area_of(a[0], a[1], a[2], a[3]);
  const int64_t category = categories ? categories[row] : 0;
  // On the diagonal only later boxes (j > own position) can be suppressed; the row never marks itself.
  const int first = col_block == row_block ? lane + 1 : 0;
  uint64_t bits = 0;
  for (int j = first; j < columns; ++j) {
    if (col.category[j] == category &&
        iou_of(a[0], a[1], a[2], a[3], area_a, col.x1[j], col.y1[j], col.x2[j], col.y2[j], col.area[j]) > threshold) {
      bits |= uint64_t{1} << j;
    }
  }
  mask[(row - chunk_begin) * col_blocks + col_block] = bits;
}

struct DiagonalWords {
  uint64_t word[kBlockBits];
};

// One block walks the chunk's rows in score order. removed (col_blocks words, all chunks) marks suppressed
// boxes; it is staged in shared memory when it fits. Every thread follows the same decisions (it reads the
// same words), so the loop bounds and __syncthreads are uniform. While visiting 64-block `block`, the
// threads OR kept rows into words > block only, each word by one thread, and the bits of `block` itself
// are tracked in the register `current`; the word `block + 1` is read after the closing __syncthreads.
__global__ void greedy_walk_kernel(const uint64_t* __restrict__ mask, const int64_t* __restrict__ order,
                                   int64_t col_blocks, int64_t chunk_begin, int64_t chunk_rows, int64_t limit,
                                   bool removed_in_shared, uint64_t* removed_global, int64_t* kept_count,
                                   int64_t* __restrict__ keep) {
  uint64_t* removed_shared = dynamic_shared<uint64_t>();
  uint64_t* diagonal = block_shared<DiagonalWords>().word;  // the chunk rows' own-block words, for the serial part
  int64_t count = *kept_count;
  if (count >= limit) return;

  const int64_t first_block = chunk_begin / kBlockBits;
  const int64_t words = col_blocks - first_block;  // words[w] is the bitset word first_block + w
  uint64_t* removed = removed_in_shared ? removed_shared : removed_global + first_block;
  if (removed_in_shared) {
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) removed[w] = removed_global[first_block + w];
  }

  const int64_t chunk_end = chunk_begin + chunk_rows;
  for (int64_t block = first_block; block * kBlockBits < chunk_end && count < limit; ++block) {
    const int64_t block_begin = block * kBlockBits;
    const int rows = static_cast<int>(std::min<int64_t>(kBlockBits, chunk_end - block_begin));
    const int lane = static_cast<int>(threadIdx.x);
    if (lane < rows) diagonal[lane] = mask[(block_begin + lane - chunk_begin) * col_blocks + block];
    __syncthreads();
    uint64_t current = removed[block - first_block];
    for (int bit = 0; bit < rows; ++bit) {
      if ((current >> bit) & 1) continue;
      const int64_t row = block_begin + bit;
      if (threadIdx.x == 0) keep[count] = order[row];
      if (++count == limit) break;
      current |= diagonal[bit];
      const uint64_t* row_mask = mask + (row - chunk_begin) * col_blocks;
      for (int64_t w = block + 1 + threadIdx.x; w < col_blocks; w += blockDim.x) {
        removed[w - first_block] |= row_mask[w];
      }
    }
    __syncthreads();
  }
  __syncthreads();  // every update to removed is done before the write-back
  if (removed_in_shared) {
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) removed_global[first_block + w] = removed[w];
  }
  if (threadIdx.x == 0) *kept_count = count;
}

// Greedy NMS of contiguous [n, 4] boxes and [n] scores of type T; categories: int64 per box, or undefined
// for plain NMS.
template <typename T>
at::Tensor greedy_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& categories,
                      double iou_threshold, int64_t max_output) {
  const int64_t n = boxes.size(0);
  using Key = std::conditional_t<std::is_same_v<T, double>, int64_t, int32_t>;
  at::Tensor keys = at::empty({n}, scores.options().dtype(std::is_same_v<T, double> ? at::kLong : at::kInt));
  launch<descending_keys_kernel<T, Key>>(static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0,
                                         scores.data_ptr<T>(), n, keys.data_ptr<Key>());
  const at::Tensor order = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor sorted_boxes = boxes.index_select(0, order);
  const at::Tensor sorted_categories = categories.defined() ? categories.index_select(0, order) : at::Tensor();

  const int64_t col_blocks = ceil_div(n, kBlockBits);
  const int64_t budget_rows = kMaskBudgetBytes / (col_blocks * 8) / kBlockBits * kBlockBits;
  const int64_t rows_per_chunk = std::min(std::max<int64_t>(budget_rows, kBlockBits), col_blocks * kBlockBits);
  at::Tensor mask = at::empty({rows_per_chunk * col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({col_blocks}, boxes.options().dtype(at::kLong));
  at::Tensor kept_count = at::zeros({1}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::empty({std::min(n, max_output)}, boxes.options().dtype(at::kLong));
  auto* mask_words = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  auto* removed_words = reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>());
  const T threshold = threshold_for<T>(iou_threshold);

  for (int64_t chunk_begin = 0; chunk_begin < n; chunk_begin += rows_per_chunk) {
    const int64_t chunk_rows = std::min(rows_per_chunk, n - chunk_begin);
    const int64_t first_block = chunk_begin / kBlockBits;
    // grid.y <= 724: rows_per_chunk * col_blocks words fit the budget and rows_per_chunk <= 64 * col_blocks.
    const dim3 mask_grid(static_cast<unsigned>(col_blocks - first_block),
                         static_cast<unsigned>(ceil_div(chunk_rows, kBlockBits)));
    launch<overlap_mask_kernel<T>>(
        mask_grid, kBlockBits, 0, sorted_boxes.data_ptr<T>(),
        categories.defined() ? sorted_categories.data_ptr<int64_t>() : nullptr, n, col_blocks, chunk_begin,
        chunk_rows, threshold, kept_count.data_ptr<int64_t>(), max_output, mask_words);
    const int64_t words = col_blocks - first_block;
    const bool removed_in_shared = words <= kMaxSharedRemovedWords;
    launch<greedy_walk_kernel>(1, kWalkThreads, removed_in_shared ? words * 8 : 0, mask_words,
                               order.data_ptr<int64_t>(), col_blocks, chunk_begin, chunk_rows, max_output,
                               removed_in_shared, removed_words, kept_count.data_ptr<int64_t>(),
                               keep.data_ptr<int64_t>());
  }
  return keep.narrow(0, 0, kept_count.item<int64_t>());  // the one host synchronisation
}

at::Tensor run_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& categories,
                   double iou_threshold, std::optional<int64_t> max_output) {
  const int64_t limit = max_output_or(max_output, boxes.size(0));
  if (boxes.size(0) == 0 || limit == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  const auto type = compute_type(boxes.scalar_type());
  const auto boxes_c = boxes.to(type).contiguous();
  const auto scores_c = scores.to(type).contiguous();
  at::Tensor keep;
  AT_DISPATCH_FLOATING_TYPES(type, "rpn_ops_nms_cuda", [&] {
    keep = greedy_nms<scalar_t>(boxes_c, scores_c, categories, iou_threshold, limit);
  });
  return keep;
}

}  // namespace

at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
               std::optional<int64_t> max_output) {
  check_nms_inputs(boxes, scores, iou_threshold, max_output);
  const DeviceGuard guard(boxes.device());
  return run_nms(boxes, scores, at::Tensor(), iou_threshold, max_output);
}

at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
                       double iou_threshold, std::optional<int64_t> max_output) {
  check_batched_nms_inputs(boxes, scores, idxs, iou_threshold, max_output);
  const DeviceGuard guard(boxes.device());
  return run_nms(boxes, scores, idxs.to(at::kLong).contiguous(), iou_threshold, max_output);
}

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("nms", TORCH_FN(nms));
  m.impl("batched_nms", TORCH_FN(batched_nms));
}

}  // namespace rpn_ops::cuda
