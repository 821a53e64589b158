// The CUDA execution model on the CPU: what csrc/cuda/ sees in place of the CUDA toolkit in the emulated build
// (tests/emulator.py builds it; it is never installed). Written for the tests, so that every CUDA kernel runs,
// and is compared with the CPU kernels, on every CI run.
//
// A launch runs its blocks one after the other on the calling thread. Each thread of a block is a fiber with a
// stack of its own; fibers run one at a time, each until it reaches a barrier, a warp collective or its end,
// in the order the emulator is set to (forward, reverse or seeded random, chosen again at every barrier).
// A result that changes with the order is a race. What a GPU would refuse, or leave undefined, is an error
// naming the kernel, the block and the threads: a launch beyond the device's limits, threads that exit or
// wait at another barrier while others wait at a __syncthreads, a warp collective whose lanes disagree on the
// mask or the intrinsic, or that waits for lanes that never come. Shared memory is allocated per block on the
// heap, filled with a garbage pattern (a GPU does not clear it), so that an AddressSanitizer build catches
// accesses past its end, as it catches them past the end of a tensor.
//
// Not emulated: timing, true concurrency between blocks, the device's own expf / logf bits (device_math.h),
// memory-ordering effects between threads that run between the same barriers.
#pragma once

#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <type_traits>

// ---------------------------------------------------------------------------------------------------------
// Built-in types, variables and qualifiers

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running thread's coordinates: set by the scheduler before it resumes a fiber.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Shared memory is declared through block_shared<T>() and dynamic_shared<T>() (csrc/cuda/runtime.cuh), which
// the emulator can allocate per block; a plain declaration would be one variable for every block.
#define __shared__ RPN_OPS_EMULATOR_declare_shared_memory_with_block_shared_or_dynamic_shared

namespace rpn_ops::emulator {

// ---------------------------------------------------------------------------------------------------------
// Barriers and warp collectives (the device side of the scheduler)

enum class BarrierKind : uint8_t { kSync, kOr, kAnd, kCount };
// Waits until every thread of the block reaches a barrier; returns the reduction of the predicates.
int block_barrier(BarrierKind kind, int predicate, const std::source_location& where);

enum class WarpOp : uint8_t {
  kSync, kShuffle, kBallot, kAny, kAll,
  kMaxU32, kMaxI32, kMinU32, kMinI32, kAddU32, kAndU32, kOrU32, kXorU32,
};
// The calling lane's part in a collective of the lanes of `mask`: it deposits `bits`, waits for the others,
// and gets its result: the bits deposited by `source_lane` (kShuffle; garbage if that lane is not in the
// mask), or the reduction over the mask.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int source_lane, const char* intrinsic,
                         const std::source_location& where);
// The calling thread's lane within its warp.
int lane_id();

// ---------------------------------------------------------------------------------------------------------
// Shared memory of the running block

// The block's object of a static shared type (one per `key`), allocated and filled with garbage on first use.
void* static_shared(const void* key, size_t size, size_t alignment, const char* type_name);
// The block's dynamic shared memory, of the size the launch gave.
void* dynamic_shared();

template <typename T>
inline const char type_key = 0;

// ---------------------------------------------------------------------------------------------------------
// Host side: launches, settings, sizing constants

struct LaunchLimits {
  static constexpr unsigned kMaxThreadsPerBlock = 1024;
  static constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
  static constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535, 65535};
  static constexpr size_t kStaticSharedBytes = 48 * 1024;     // static shared memory per block
  static constexpr size_t kOptInSharedBytes = 227 * 1024;     // static + dynamic, with the opt-in (sm_90)
};

// Runs body(context) once per thread of every block: the emulated kernel<<<grid, block, shared>>>.
void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*body)(const void*),
            const void* context);

// A sizing constant of csrc/cuda/ (RPN_OPS_SIZING): the value the calling thread set (control.h), else its
// default. Like every emulator setting, it belongs to the thread, so concurrent tests cannot change each other's.
class Sizing {
 public:
  Sizing(const char* file, const char* name, int64_t default_value);
  operator int64_t() const;

 private:
  size_t id_;
};

}  // namespace rpn_ops::emulator

// ---------------------------------------------------------------------------------------------------------
// Intrinsics, with CUDA's names and overloads (so that what compiles here compiles with nvcc)

inline void __syncthreads(const std::source_location& where = std::source_location::current()) {
  rpn_ops::emulator::block_barrier(rpn_ops::emulator::BarrierKind::kSync, 0, where);
}
inline int __syncthreads_or(int predicate, const std::source_location& where = std::source_location::current()) {
  return rpn_ops::emulator::block_barrier(rpn_ops::emulator::BarrierKind::kOr, predicate, where);
}
inline int __syncthreads_and(int predicate, const std::source_location& where = std::source_location::current()) {
  return rpn_ops::emulator::block_barrier(rpn_ops::emulator::BarrierKind::kAnd, predicate, where);
}
inline int __syncthreads_count(int predicate, const std::source_location& where = std::source_location::current()) {
  return rpn_ops::emulator::block_barrier(rpn_ops::emulator::BarrierKind::kCount, predicate, where);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location& where = std::source_location::current()) {
  rpn_ops::emulator::warp_collective(rpn_ops::emulator::WarpOp::kSync, mask, 0, 0, "__syncwarp", where);
}

namespace rpn_ops::emulator {

template <typename T>
uint64_t bits_of(T value) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  return bits;
}
template <typename T>
T value_of(uint64_t bits) {
  T value;
  memcpy(&value, &bits, sizeof(T));
  return value;
}
// Shuffles: `source` is the lane read, or the caller's own lane where CUDA returns the caller's value.
template <typename T>
T shuffle(unsigned mask, T var, int source, const char* intrinsic, const std::source_location& where) {
  return value_of<T>(warp_collective(WarpOp::kShuffle, mask, bits_of(var), source, intrinsic, where));
}
template <typename T>
T reduce(WarpOp op, unsigned mask, T value, const char* intrinsic, const std::source_location& where) {
  return value_of<T>(warp_collective(op, mask, bits_of(value), 0, intrinsic, where));
}

}  // namespace rpn_ops::emulator

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const std::source_location& where = std::source_location::current()) {
  const int lane = rpn_ops::emulator::lane_id();
  return rpn_ops::emulator::shuffle(mask, var, (lane & ~(width - 1)) + (src_lane & (width - 1)), "__shfl_sync", where);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const std::source_location& where = std::source_location::current()) {
  const int lane = rpn_ops::emulator::lane_id(), source = lane ^ lane_mask;
  const bool in_segment = source < ((lane / width) + 1) * width;
  return rpn_ops::emulator::shuffle(mask, var, in_segment ? source : lane, "__shfl_xor_sync", where);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const std::source_location& where = std::source_location::current()) {
  const int lane = rpn_ops::emulator::lane_id(), source = lane + static_cast<int>(delta);
  const bool in_segment = (source & ~(width - 1)) == (lane & ~(width - 1)) && source < warpSize;
  return rpn_ops::emulator::shuffle(mask, var, in_segment ? source : lane, "__shfl_down_sync", where);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const std::source_location& where = std::source_location::current()) {
  const int lane = rpn_ops::emulator::lane_id(), source = lane - static_cast<int>(delta);
  const bool in_segment = source >= (lane & ~(width - 1));
  return rpn_ops::emulator::shuffle(mask, var, in_segment ? source : lane, "__shfl_up_sync", where);
}

#define RPN_OPS_EMULATED_REDUCE(name, type, op)                                                           \
  inline type name(unsigned mask, type value,                                                             \
                   const std::source_location& where = std::source_location::current()) {                \
    return rpn_ops::emulator::reduce(rpn_ops::emulator::WarpOp::op, mask, value, #name, where);           \
  }
RPN_OPS_EMULATED_REDUCE(__reduce_max_sync, unsigned, kMaxU32)
RPN_OPS_EMULATED_REDUCE(__reduce_max_sync, int, kMaxI32)
RPN_OPS_EMULATED_REDUCE(__reduce_min_sync, unsigned, kMinU32)
RPN_OPS_EMULATED_REDUCE(__reduce_min_sync, int, kMinI32)
RPN_OPS_EMULATED_REDUCE(__reduce_add_sync, unsigned, kAddU32)
RPN_OPS_EMULATED_REDUCE(__reduce_add_sync, int, kAddU32)
RPN_OPS_EMULATED_REDUCE(__reduce_and_sync, unsigned, kAndU32)
RPN_OPS_EMULATED_REDUCE(__reduce_or_sync, unsigned, kOrU32)
RPN_OPS_EMULATED_REDUCE(__reduce_xor_sync, unsigned, kXorU32)
#undef RPN_OPS_EMULATED_REDUCE

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const std::source_location& where = std::source_location::current()) {
  return static_cast<unsigned>(rpn_ops::emulator::warp_collective(rpn_ops::emulator::WarpOp::kBallot, mask,
                                                                  predicate != 0, 0, "__ballot_sync", where));
}
inline int __any_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  return static_cast<int>(rpn_ops::emulator::warp_collective(rpn_ops::emulator::WarpOp::kAny, mask, predicate != 0, 0,
                                                             "__any_sync", where));
}
inline int __all_sync(unsigned mask, int predicate, const std::source_location& where = std::source_location::current()) {
  return static_cast<int>(rpn_ops::emulator::warp_collective(rpn_ops::emulator::WarpOp::kAll, mask, predicate != 0, 0,
                                                             "__all_sync", where));
}

// Bit manipulation.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

// Atomics: CUDA's overload set. Fibers never interleave within one, so these are atomic among the threads of a
// block; std::atomic_ref keeps them atomic if blocks ever run on several host threads.
#define RPN_OPS_EMULATED_ATOMIC(name, type, update)                              \
  inline type name(type* address, type value) {                                  \
    std::atomic_ref<type> target(*address);                                      \
    type old = target.load();                                                    \
    while (!target.compare_exchange_weak(old, static_cast<type>(update))) {      \
    }                                                                            \
    return old;                                                                  \
  }
RPN_OPS_EMULATED_ATOMIC(atomicAdd, int, old + value)
RPN_OPS_EMULATED_ATOMIC(atomicAdd, unsigned, old + value)
RPN_OPS_EMULATED_ATOMIC(atomicAdd, unsigned long long, old + value)
RPN_OPS_EMULATED_ATOMIC(atomicAdd, float, old + value)
RPN_OPS_EMULATED_ATOMIC(atomicAdd, double, old + value)
RPN_OPS_EMULATED_ATOMIC(atomicSub, int, old - value)
RPN_OPS_EMULATED_ATOMIC(atomicSub, unsigned, old - value)
RPN_OPS_EMULATED_ATOMIC(atomicMax, int, old > value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMax, unsigned, old > value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMax, long long, old > value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMax, unsigned long long, old > value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMin, int, old < value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMin, unsigned, old < value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMin, long long, old < value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicMin, unsigned long long, old < value ? old : value)
RPN_OPS_EMULATED_ATOMIC(atomicOr, int, old | value)
RPN_OPS_EMULATED_ATOMIC(atomicOr, unsigned, old | value)
RPN_OPS_EMULATED_ATOMIC(atomicOr, unsigned long long, old | value)
RPN_OPS_EMULATED_ATOMIC(atomicAnd, int, old & value)
RPN_OPS_EMULATED_ATOMIC(atomicAnd, unsigned, old & value)
RPN_OPS_EMULATED_ATOMIC(atomicAnd, unsigned long long, old & value)
RPN_OPS_EMULATED_ATOMIC(atomicXor, int, old ^ value)
RPN_OPS_EMULATED_ATOMIC(atomicXor, unsigned, old ^ value)
RPN_OPS_EMULATED_ATOMIC(atomicXor, unsigned long long, old ^ value)
RPN_OPS_EMULATED_ATOMIC(atomicExch, int, value)
RPN_OPS_EMULATED_ATOMIC(atomicExch, unsigned, value)
RPN_OPS_EMULATED_ATOMIC(atomicExch, unsigned long long, value)
RPN_OPS_EMULATED_ATOMIC(atomicExch, float, value)
#undef RPN_OPS_EMULATED_ATOMIC

#define RPN_OPS_EMULATED_CAS(type)                                         \
  inline type atomicCAS(type* address, type compare, type value) {         \
    std::atomic_ref<type>(*address).compare_exchange_strong(compare, value); \
    return compare;                                                        \
  }
RPN_OPS_EMULATED_CAS(int)
RPN_OPS_EMULATED_CAS(unsigned)
RPN_OPS_EMULATED_CAS(unsigned long long)
RPN_OPS_EMULATED_CAS(unsigned short)
#undef RPN_OPS_EMULATED_CAS

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldg(const T* address) {
  return *address;
}

using std::isfinite;
using std::isinf;
using std::isnan;
