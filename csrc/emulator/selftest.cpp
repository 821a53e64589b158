// Small kernels that exercise the CUDA emulator itself, right and wrong (tests/test_emulator.py runs them): the
// intrinsics' results, and the errors it reports for what a GPU would refuse or leave undefined.
#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <string>

#include "../cuda/launch.cuh"
#include "selftest.h"

namespace rpn_ops::emulator {
namespace {

using cuda::block_shared;
using cuda::dynamic_shared;
using cuda::launch;

struct Words {
  int value[256];
};

// Each thread writes its slot, then reads its neighbour's: correct with the barrier, a race without it.
template <bool kSynchronised>
__global__ void neighbour_kernel(int* out) {
  Words& shared = block_shared<Words>();
  const int t = static_cast<int>(threadIdx.x);
  shared.value[t] = t + 1;
  if (kSynchronised) __syncthreads();
  out[t] = shared.value[(t + 1) % blockDim.x];
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void warp_deadlock_kernel(int* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void mixed_collectives_kernel(int* out) {
  const unsigned v = threadIdx.x;
  out[threadIdx.x] = static_cast<int>(threadIdx.x < 16 ? __reduce_max_sync(0xffffffffu, v)
                                                       : __shfl_sync(0xffffffffu, v, 0));
}

__global__ void foreign_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 0);  // lanes 16-31 are not in it
}

// Per thread: [xor-butterfly sum, shfl_down by 1, shfl_up by 2, broadcast of lane 5, reduce_max, ballot of odd
// lanes, any, all (lane < 32), sum over the lower half-warp by width-16 xor shuffles, __syncthreads_or/and/count
// of (t == 3)].
__global__ void intrinsics_kernel(int* out) {
  const int t = static_cast<int>(threadIdx.x);
  const unsigned full = 0xffffffffu;
  int sum = t;
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(full, sum, offset);
  int half_sum = t;
  for (int offset = 8; offset > 0; offset /= 2) half_sum += __shfl_xor_sync(full, half_sum, offset, 16);
  int* row = out + 12 * t;
  row[0] = sum;
  row[1] = __shfl_down_sync(full, t, 1);
  row[2] = __shfl_up_sync(full, t, 2);
  row[3] = __shfl_sync(full, t, 5);
  row[4] = static_cast<int>(__reduce_max_sync(full, static_cast<unsigned>(t * 7 % 32)));
  row[5] = static_cast<int>(__ballot_sync(full, t % 2));
  row[6] = __any_sync(full, t == 9);
  row[7] = __all_sync(full, t < 32);
  row[8] = half_sum;
  row[9] = __syncthreads_or(t == 3);
  row[10] = __syncthreads_and(t == 3);
  row[11] = __syncthreads_count(t == 3);
}

__global__ void atomics_kernel(unsigned long long* out) {
  atomicAdd(out, 1ull);
  atomicMax(out + 1, static_cast<unsigned long long>(threadIdx.x + blockIdx.x * blockDim.x));
  atomicOr(out + 2, 1ull << (threadIdx.x % 64));
}

// What fresh shared memory holds: its first word, read before anything is written.
__global__ void fresh_shared_kernel(int64_t* out) {
  if (threadIdx.x == 0) out[0] = dynamic_shared<int64_t>()[0], out[1] = block_shared<Words>().value[0];
}

__global__ void shared_overflow_kernel(int* out) {
  int* shared = dynamic_shared<int>();
  shared[threadIdx.x + 1] = 1;  // one past the end for the last thread
  out[threadIdx.x] = shared[threadIdx.x];
}

__global__ void global_overflow_kernel(int* out) { out[threadIdx.x + 1] = 1; }

struct TooLarge {
  char bytes[48 * 1024 + 1];
};
__global__ void static_shared_limit_kernel(int* out) { out[threadIdx.x] = block_shared<TooLarge>().bytes[0]; }

// 1 KiB of static shared memory next to 48 KiB of dynamic: over the 48 KiB that a launch without the opt-in gets.
__global__ void shared_total_kernel(int* out) { out[threadIdx.x] = block_shared<Words>().value[0]; }

__global__ void empty_kernel() {}

at::Tensor ints(int64_t n) { return at::zeros({n}, at::kInt); }

const std::map<std::string, std::function<at::Tensor()>>& selftests() {
  static const std::map<std::string, std::function<at::Tensor()>> tests = {
      {"race", [] { auto out = ints(256); launch<neighbour_kernel<false>>(1, 256, 0, out.data_ptr<int>()); return out; }},
      {"no_race", [] { auto out = ints(256); launch<neighbour_kernel<true>>(1, 256, 0, out.data_ptr<int>()); return out; }},
      {"early_exit", [] { auto out = ints(64); launch<early_exit_kernel>(1, 64, 0, out.data_ptr<int>()); return out; }},
      {"two_barriers", [] { auto out = ints(64); launch<two_barriers_kernel>(1, 64, 0, out.data_ptr<int>()); return out; }},
      {"warp_deadlock", [] { auto out = ints(32); launch<warp_deadlock_kernel>(1, 32, 0, out.data_ptr<int>()); return out; }},
      {"mixed_collectives",
       [] { auto out = ints(32); launch<mixed_collectives_kernel>(1, 32, 0, out.data_ptr<int>()); return out; }},
      {"foreign_mask", [] { auto out = ints(32); launch<foreign_mask_kernel>(1, 32, 0, out.data_ptr<int>()); return out; }},
      {"intrinsics", [] { auto out = ints(64 * 12); launch<intrinsics_kernel>(1, 64, 0, out.data_ptr<int>()); return out.view({64, 12}); }},
      {"atomics",
       [] {
         auto out = at::zeros({3}, at::kLong);
         launch<atomics_kernel>(3, 128, 0, reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
         return out;
       }},
      {"fresh_shared",
       [] { auto out = at::zeros({2}, at::kLong); launch<fresh_shared_kernel>(1, 32, 64, out.data_ptr<int64_t>()); return out; }},
      {"shared_overflow",
       [] { auto out = ints(32); launch<shared_overflow_kernel>(1, 32, 32 * sizeof(int), out.data_ptr<int>()); return out; }},
      {"global_overflow", [] { auto out = ints(32); launch<global_overflow_kernel>(1, 32, 0, out.data_ptr<int>()); return out; }},
      {"static_shared_limit",
       [] { auto out = ints(32); launch<static_shared_limit_kernel>(1, 32, 0, out.data_ptr<int>()); return out; }},
      {"static_and_dynamic_over_48k",
       [] { auto out = ints(32); launch<shared_total_kernel>(1, 32, 48 * 1024, out.data_ptr<int>()); return out; }},
      {"block_of_2048", [] { launch<empty_kernel>(1, 2048, 0); return ints(0); }},
      {"block_z_of_65", [] { launch<empty_kernel>(1, dim3(1, 1, 65), 0); return ints(0); }},
      {"grid_y_of_65536", [] { launch<empty_kernel>(dim3(1, 65536), 32, 0); return ints(0); }},
      {"empty_grid", [] { launch<empty_kernel>(0, 32, 0); return ints(0); }},
      {"dynamic_shared_of_228k", [] { launch<empty_kernel>(1, 32, 228 * 1024); return ints(0); }},
  };
  return tests;
}

}  // namespace

at::Tensor run_selftest(const std::string& name) {
  const auto& tests = selftests();
  const auto it = tests.find(name);
  TORCH_CHECK_VALUE(it != tests.end(), "no emulator self-test named '", name, "'");
  return it->second();
}

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const auto& [name, test] : selftests()) names.push_back(name);
  return names;
}

}  // namespace rpn_ops::emulator
