// What csrc/cuda/ uses of the CUDA runtime, in one place: the real one under nvcc; the CUDA emulator
// (csrc/emulator/) in the emulated build, where the same kernels run on CPU tensors for the tests.
//   launch<kernel>(grid, block, shared_bytes, args...)  the only way kernels are launched: it checks what the
//                                                        device would refuse and names the kernel if so
//   DeviceGuard                                          the tensor's device made current (host code)
//   block_shared<T>(), dynamic_shared<T>()               the block's shared memory (device code)
//   RPN_OPS_SIZING(name, value)                          a size that selects a large-input path; the emulated
//                                                        build lets tests lower it so small inputs take it
//   RPN_OPS_DEVICE_ARCH                                  __CUDA_ARCH__, or the emulated device's (sm_90)
//   RPN_OPS_CUDA_KERNELS(m)                              TORCH_LIBRARY_IMPL for the CUDA kernels
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "../library.h"

#if defined(RPN_OPS_EMULATED_CUDA)
#include "../emulator/cuda_emulator.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <array>
#include <mutex>
#endif

#if defined(__CUDA_ARCH__)
#define RPN_OPS_DEVICE_ARCH __CUDA_ARCH__
#elif defined(RPN_OPS_EMULATED_CUDA)
#define RPN_OPS_DEVICE_ARCH 900
#else
#define RPN_OPS_DEVICE_ARCH 0
#endif

#if defined(RPN_OPS_EMULATED_CUDA)
#define RPN_OPS_SIZING(name, value) inline const ::rpn_ops::emulator::Sizing name(__FILE__, #name, value)
#define RPN_OPS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, CPU, m)
#else
#define RPN_OPS_SIZING(name, value) constexpr int64_t name = value
#define RPN_OPS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(RPN_OPS_NAMESPACE, CUDA, m)
#endif

namespace rpn_ops::cuda {

#if defined(RPN_OPS_EMULATED_CUDA)
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device& device) {
    TORCH_CHECK(device.is_cpu(), "the emulated CUDA kernels run on CPU tensors, got one on ", device);
  }
};
#else
using DeviceGuard = c10::cuda::CUDAGuard;
#endif

// The block's object of type T in static shared memory (one per type and kernel; T trivially constructible).
template <typename T>
__device__ __forceinline__ T& block_shared() {
#if defined(RPN_OPS_EMULATED_CUDA)
  return *static_cast<T*>(emulator::static_shared(&emulator::type_key<T>, sizeof(T), alignof(T), __PRETTY_FUNCTION__));
#else
  __shared__ T storage;
  return storage;
#endif
}

// The block's dynamic shared memory (the launch's shared_bytes), as T.
template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
#if defined(RPN_OPS_EMULATED_CUDA)
  return static_cast<T*>(emulator::dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char dynamic_shared_memory[];
  return reinterpret_cast<T*>(dynamic_shared_memory);
#endif
}

// "overlap_mask_kernel<float>" for Kernel = &rpn_ops::cuda::{anonymous}::overlap_mask_kernel<float>.
template <auto Kernel>
std::string kernel_name() {
  const std::string_view signature = __PRETTY_FUNCTION__;
  const size_t begin = signature.find("Kernel = ");
  if (begin == std::string_view::npos) return std::string(signature);
  std::string_view name = signature.substr(begin + 9);
  name = name.substr(0, name.find_first_of(";]"));
  const size_t scope = name.substr(0, name.find('<')).rfind("::");
  return std::string(scope == std::string_view::npos ? name : name.substr(scope + 2));
}

struct LaunchLimits {
  unsigned max_threads_per_block, max_block[3], max_grid[3];
  size_t max_dynamic_shared_bytes;
};

// The current device's limits (read once per device).
inline LaunchLimits device_limits() {
#if defined(RPN_OPS_EMULATED_CUDA)
  using L = emulator::LaunchLimits;
  return {L::kMaxThreadsPerBlock, {L::kMaxBlockDim[0], L::kMaxBlockDim[1], L::kMaxBlockDim[2]},
          {L::kMaxGridDim[0], L::kMaxGridDim[1], L::kMaxGridDim[2]}, L::kOptInSharedBytes};
#else
  constexpr int kMaxDevices = 64;
  static std::array<LaunchLimits, kMaxDevices> limits;
  static std::array<std::once_flag, kMaxDevices> read;
  const int device = c10::cuda::current_device();
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "rpn_ops supports CUDA devices 0 to ", kMaxDevices - 1);
  std::call_once(read[device], [&] {
    const auto attribute = [&](cudaDeviceAttr what) {
      int value = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, what, device));
      return static_cast<unsigned>(value);
    };
    limits[device] = {attribute(cudaDevAttrMaxThreadsPerBlock),
                      {attribute(cudaDevAttrMaxBlockDimX), attribute(cudaDevAttrMaxBlockDimY),
                       attribute(cudaDevAttrMaxBlockDimZ)},
                      {attribute(cudaDevAttrMaxGridDimX), attribute(cudaDevAttrMaxGridDimY),
                       attribute(cudaDevAttrMaxGridDimZ)},
                      attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)};
  });
  return limits[device];
#endif
}

// What the device refuses to launch, as an error that names the kernel and the value.
inline void check_launch(const std::string& kernel, dim3 grid, dim3 block, size_t shared_bytes,
                         const LaunchLimits& limits) {
  const unsigned grid_dims[3] = {grid.x, grid.y, grid.z}, block_dims[3] = {block.x, block.y, block.z};
  for (int d = 0; d < 3; ++d) {
    const char axis = "xyz"[d];
    TORCH_CHECK(grid_dims[d] >= 1 && grid_dims[d] <= limits.max_grid[d], "CUDA refuses to launch ", kernel,
                " with grid.", axis, " = ", grid_dims[d], " (from 1 to ", limits.max_grid[d], ")");
    TORCH_CHECK(block_dims[d] >= 1 && block_dims[d] <= limits.max_block[d], "CUDA refuses to launch ", kernel,
                " with block.", axis, " = ", block_dims[d], " (from 1 to ", limits.max_block[d], ")");
  }
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  TORCH_CHECK(threads <= limits.max_threads_per_block, "CUDA refuses to launch ", kernel, " with ", threads,
              " threads per block (at most ", limits.max_threads_per_block, ")");
  TORCH_CHECK(shared_bytes <= limits.max_dynamic_shared_bytes, "CUDA refuses to launch ", kernel, " with ",
              shared_bytes, " bytes of dynamic shared memory (at most ", limits.max_dynamic_shared_bytes, ")");
}

// Kernel<<<grid, block, shared_bytes, current stream>>>(args...), after check_launch.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, const Args&... args) {
  static const std::string name = kernel_name<Kernel>();
  check_launch(name, grid, block, shared_bytes, device_limits());
#if defined(RPN_OPS_EMULATED_CUDA)
  const auto run_thread = [&] { Kernel(args...); };
  emulator::launch(name.c_str(), grid, block, shared_bytes,
                   [](const void* body) { (*static_cast<const decltype(run_thread)*>(body))(); }, &run_thread);
#else
  constexpr size_t kSharedWithoutOptIn = 48 * 1024;
  if (shared_bytes > kSharedWithoutOptIn) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
  }
  Kernel<<<grid, block, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace rpn_ops::cuda
