// What the CUDA kernels share: the runtime (runtime.cuh), the launch shape of grid-stride loops and the vector
// store of an item's four values.
#pragma once

#include <algorithm>
#include <cstdint>

#include "runtime.cuh"

namespace rpn_ops::cuda {

constexpr int kThreads = 256;
RPN_OPS_SIZING(kMaxBlocks, 65535 * 8);  // grid-stride loops cover the rest

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kThreads for a grid-stride loop over `items`.
inline unsigned blocks_for(int64_t items) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(items, kThreads), kMaxBlocks));
}

// Four values of T stored at once: one 16-byte store for float, 8 bytes for float16 / bfloat16, two 16-byte
// stores for double.
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <typename T>
bool aligned_for_vec4(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Vec4<T>) == 0;
}

template <typename T>
__device__ __forceinline__ void store4(T* dst, const T (&v)[4], bool vectorized) {
  if (vectorized) {
    Vec4<T> packed;
    packed.v[0] = v[0];
    packed.v[1] = v[1];
    packed.v[2] = v[2];
    packed.v[3] = v[3];
    *reinterpret_cast<Vec4<T>*>(dst) = packed;
  } else {
    dst[0] = v[0];
    dst[1] = v[1];
    dst[2] = v[2];
    dst[3] = v[3];
  }
}

// The box coder's weights rounded to the reference boxes' dtype R (encode), passed by value.
template <typename R>
struct EncodeWeights {
  R w[4];
};

}  // namespace rpn_ops::cuda
