// What proposal generation and dense detections share on CUDA: image sizes as a kernel argument, the clip, and
// greedy NMS of many segments at once with no host synchronisation (the (image, level) segments of proposals, the
// images of detections). Each segment holds boxes in rank order (the order NMS visits them); segment_mask_kernel
// computes its overlap mask in 64-box blocks, segment_walk_kernel walks it, one block per segment, and stops at a
// limit of kept boxes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../box_math.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {  // each including file gets its own kernels

constexpr int kBlockBits = 64;  // boxes per mask word
constexpr int kMaxLevels = 16;
constexpr int kMaxImagesPerLaunch = 256;  // image sizes travel as kernel arguments

// Images [first_image, first_image + images) of a batch: their (height, width).
struct ImageSizes {
  int64_t first_image, images;
  int32_t height[kMaxImagesPerLaunch], width[kMaxImagesPerLaunch];
};

// The sizes of images [first, first + min(count, images - first)) of a batch, as a kernel argument.
inline ImageSizes image_sizes_from(const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                   int64_t first, int64_t count) {
  ImageSizes sizes{};
  sizes.first_image = first;
  sizes.images = std::min<int64_t>(count, static_cast<int64_t>(heights.size()) - first);
  for (int64_t b = 0; b < sizes.images; ++b) {
    sizes.height[b] = static_cast<int32_t>(heights[first + b]);
    sizes.width[b] = static_cast<int32_t>(widths[first + b]);
  }
  return sizes;
}

// Tensor.clamp(min=0, max=hi): NaN stays NaN.
template <typename S>
__device__ S clamp_to(S v, S hi) {
  v = v < S(0) ? S(0) : v;
  return v > hi ? hi : v;
}

// The segments' layout as a kernel argument (no host-to-device copy, so graph capture works): segment
// (image, level) holds rows [first_selected[level], + selected[level]) of the image's selected_per_image rows.
struct Levels {
  int count;
  int64_t selected_per_image;  // K
  int64_t first_selected[kMaxLevels], selected[kMaxLevels];
  int64_t mask_offset[kMaxLevels], col_blocks[kMaxLevels];
  int64_t mask_per_image;
};

// The 64 boxes of a column block, in shared memory.
template <typename C>
struct SegmentColumns {
  C x1[kBlockBits], y1[kBlockBits], x2[kBlockBits], y2[kBlockBits], area[kBlockBits];
  int64_t category[kBlockBits];
};

// Block (col_block, row_block) of segment (image, level) = first_segment + blockIdx.z: bit j of mask word
// (row, col_block) says that box `row` suppresses box 64 * col_block + j, for col_block >= row_block. Boxes are in
// rank order. categories (null: one category) restricts suppression to boxes of the same category; active (null:
// every row) gives each segment's count of leading rows that can be kept, so blocks past it have nothing to do.
template <typename C>
__global__ void segment_mask_kernel(const C* __restrict__ boxes, const int64_t* __restrict__ categories,
                                    const int64_t* __restrict__ active, Levels levels, C threshold,
                                    int64_t first_segment, uint64_t* __restrict__ mask) {
  const int64_t segment_index = first_segment + blockIdx.z;
  const int64_t image = segment_index / levels.count;
  const int level = static_cast<int>(segment_index % levels.count);
  const int64_t count = active ? std::min(levels.selected[level], active[segment_index]) : levels.selected[level];
  const int64_t col_blocks = levels.col_blocks[level];
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (col_block * kBlockBits >= count || row_block * kBlockBits >= count || col_block < row_block) return;
  const int64_t first = image * levels.selected_per_image + levels.first_selected[level];
  const C* segment = boxes + 4 * first;

  SegmentColumns<C>& col = block_shared<SegmentColumns<C>>();
  const int columns = static_cast<int>(std::min<int64_t>(kBlockBits, count - col_block * kBlockBits));
  const int lane = static_cast<int>(threadIdx.x);
  if (lane < columns) {
    const int64_t column = col_block * kBlockBits + lane;
    const C* b = segment + 4 * column;
    col.x1[lane] = b[0], col.y1[lane] = b[1], col.x2[lane] = b[2], col.y2[lane] = b[3];
    col.area[lane] = area_of(b[0], b[1], b[2], b[3]);
    col.category[lane] = categories ? categories[first + column] : 0;
  }
  __syncthreads();
  const int64_t row = row_block * kBlockBits + lane;
  if (row >= count) return;
  const C* a = segment + 4 * row;
  const C area_a = area_of(a[0], a[1], a[2], a[3]);
  const int64_t category = categories ? categories[first + row] : 0;
  uint64_t bits = 0;
  for (int j = col_block == row_block ? lane + 1 : 0; j < columns; ++j) {
    if (col.category[j] == category &&
        iou_of(a[0], a[1], a[2], a[3], area_a, col.x1[j], col.y1[j], col.x2[j], col.y2[j], col.area[j]) > threshold) {
      bits |= uint64_t{1} << j;
    }
  }
  mask[image * levels.mask_per_image + levels.mask_offset[level] + row * col_blocks + col_block] = bits;
}

// One block per segment walks its rows in rank order (the rows that are not `valid` start removed, as do those
// past `active`) and records the kept rows, at most `limit`. Every thread reads the same shared words, so all take
// the same branches.
__global__ void segment_walk_kernel(const uint64_t* __restrict__ mask, const bool* __restrict__ valid,
                                    const int64_t* __restrict__ active, Levels levels, int64_t limit,
                                    int64_t* __restrict__ kept, int64_t* __restrict__ kept_count) {
  uint64_t* removed = dynamic_shared<uint64_t>();
  const int64_t image = blockIdx.x / levels.count;
  const int level = blockIdx.x % levels.count;
  const int64_t count = active ? std::min(levels.selected[level], active[blockIdx.x]) : levels.selected[level];
  const int64_t col_blocks = levels.col_blocks[level];
  const int64_t first = image * levels.selected_per_image + levels.first_selected[level];
  for (int64_t w = threadIdx.x; w < col_blocks; w += blockDim.x) {
    uint64_t word = 0;
    for (int j = 0; j < kBlockBits; ++j) {
      const int64_t row = w * kBlockBits + j;
      if (row >= count || !valid[first + row]) word |= uint64_t{1} << j;
    }
    removed[w] = word;
  }
  __syncthreads();
  const uint64_t* segment_mask = mask + image * levels.mask_per_image + levels.mask_offset[level];
  int64_t kept_here = 0;
  for (int64_t row = 0; row < count && kept_here < limit; ++row) {
    if ((removed[row / kBlockBits] >> (row % kBlockBits)) & 1) continue;
    if (threadIdx.x == 0) kept[blockIdx.x * limit + kept_here] = row;
    ++kept_here;
    for (int64_t w = row / kBlockBits + threadIdx.x; w < col_blocks; w += blockDim.x) {
      removed[w] |= segment_mask[row * col_blocks + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) kept_count[blockIdx.x] = kept_here;
}

}  // namespace
}  // namespace rpn_ops::cuda
