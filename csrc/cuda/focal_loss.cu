// dense_focal_loss on CUDA (what it computes: ../focal_loss.h). Forward: each block sums its share of an
// image's logits in float64 (grid-stride, then the warps, then the block), and one thread per image adds the
// blocks' sums in block order: the same result on every run. Backward: one gradient per logit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "../focal_loss.h"
#include "launch.cuh"

namespace rpn_ops::cuda {
namespace {

constexpr int kWarps = kThreads / 32;
RPN_OPS_SIZING(kMaxBlocksPerImage, 512);
constexpr int64_t kLogitsPerThread = 16;  // a block's minimum share: 4096 logits
RPN_OPS_SIZING(kMaxImagesPerGrid, 65535);  // grid.y's limit; the kernels loop over the rest

struct WarpSums {
  double sum[kWarps];
};

// A thread's grid-stride walk over an image's [anchors, classes] logits, with each logit's anchor and class
// advanced by the stride's quotient and remainder instead of a 64-bit division per logit.
struct LogitWalk {
  int64_t at, anchor, cls;
  int64_t stride, stride_anchors, stride_classes, classes;

  __device__ explicit LogitWalk(int64_t classes_)
      : at(blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x), anchor(at / classes_), cls(at % classes_),
        stride(static_cast<int64_t>(blockDim.x) * gridDim.x), stride_anchors(stride / classes_),
        stride_classes(stride % classes_), classes(classes_) {}

  __device__ void next() {
    at += stride;
    anchor += stride_anchors;
    cls += stride_classes;
    if (cls >= classes) {
      cls -= classes;
      ++anchor;
    }
  }
};

template <typename S>
__global__ void focal_block_sums_kernel(const S* __restrict__ logits, const int64_t* __restrict__ labels,
                                        int64_t images, int64_t anchors, int64_t classes,
                                        typename FocalTypes<S>::S alpha, typename FocalTypes<S>::S gamma,
                                        double* __restrict__ block_sums) {
  using T = typename FocalTypes<S>::S;
  using I = typename FocalTypes<S>::I;
  const int64_t count = anchors * classes;
  WarpSums& warps = block_shared<WarpSums>();
  for (int64_t image = blockIdx.y; image < images; image += gridDim.y) {
    const S* x = logits + image * count;
    const int64_t* label_of = labels + image * anchors;
    double total = 0.0;
    if (count > 0) {  // then classes > 0
      for (LogitWalk walk(classes); walk.at < count; walk.next()) {
        const int64_t label = label_of[walk.anchor];
        if (label != kIgnored) {
          total += focal_loss_of<T, I>(static_cast<T>(x[walk.at]), T(walk.cls == label), alpha, gamma);
        }
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
    if (threadIdx.x % 32 == 0) warps.sum[threadIdx.x / 32] = total;
    __syncthreads();
    if (threadIdx.x == 0) {
      double block_total = 0.0;
      for (int w = 0; w < kWarps; ++w) block_total += warps.sum[w];
      block_sums[image * gridDim.x + blockIdx.x] = block_total;
    }
    __syncthreads();  // warps.sum is rewritten for the next image
  }
}

template <typename S>
__global__ void image_sums_kernel(const double* __restrict__ block_sums, int64_t images, int64_t blocks,
                                  S* __restrict__ sums) {
  for (int64_t image = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; image < images;
       image += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    double total = 0.0;
    for (int64_t block = 0; block < blocks; ++block) total += block_sums[image * blocks + block];
    sums[image] = static_cast<S>(total);
  }
}

template <typename S>
__global__ void focal_gradient_kernel(const double* __restrict__ grad, const S* __restrict__ logits,
                                      const int64_t* __restrict__ labels, int64_t images, int64_t anchors,
                                      int64_t classes, typename FocalTypes<S>::S alpha,
                                      typename FocalTypes<S>::S gamma, S* __restrict__ grad_logits) {
  using T = typename FocalTypes<S>::S;
  using I = typename FocalTypes<S>::I;
  const int64_t count = anchors * classes;
  for (int64_t image = blockIdx.y; image < images; image += gridDim.y) {
    const T scale = static_cast<T>(grad[image]);
    const S* x = logits + image * count;
    const int64_t* label_of = labels + image * anchors;
    S* out = grad_logits + image * count;
    for (LogitWalk walk(classes); walk.at < count; walk.next()) {  // launched for count > 0: classes > 0
      const int64_t label = label_of[walk.anchor];
      const T x_at = static_cast<T>(x[walk.at]), t(walk.cls == label);
      out[walk.at] = label == kIgnored ? S(0) : static_cast<S>(scale * focal_gradient_of<T, I>(x_at, t, alpha, gamma));
    }
  }
}

dim3 grid_for(int64_t images, int64_t count) {
  const int64_t blocks = std::clamp<int64_t>(ceil_div(count, kThreads * kLogitsPerThread), 1, kMaxBlocksPerImage);
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min<int64_t>(images, kMaxImagesPerGrid)));
}

at::Tensor dense_focal_loss(const at::Tensor& class_logits, const at::Tensor& anchor_labels, double alpha,
                            double gamma) {
  check_focal_loss_inputs(class_logits, anchor_labels, alpha, gamma);
  const DeviceGuard guard(class_logits.device());
  const at::Tensor logits = class_logits.contiguous(), labels = anchor_labels.contiguous();
  const int64_t images = logits.size(0), anchors = logits.size(1), classes = logits.size(2);
  at::Tensor sums = at::empty({images}, logits.options());
  if (images == 0) return sums;
  const dim3 grid = grid_for(images, anchors * classes);
  at::Tensor block_sums = at::empty({images, grid.x}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rpn_ops_dense_focal_loss_cuda", [&] {
    launch<focal_block_sums_kernel<scalar_t>>(grid, kThreads, 0, logits.const_data_ptr<scalar_t>(),
                                              labels.const_data_ptr<int64_t>(), images, anchors, classes,
                                              static_cast<typename FocalTypes<scalar_t>::S>(alpha),
                                              static_cast<typename FocalTypes<scalar_t>::S>(gamma),
                                              block_sums.mutable_data_ptr<double>());
    launch<image_sums_kernel<scalar_t>>(blocks_for(images), kThreads, 0, block_sums.const_data_ptr<double>(), images,
                                        static_cast<int64_t>(grid.x), sums.mutable_data_ptr<scalar_t>());
  });
  return sums;
}

at::Tensor dense_focal_loss_backward(const at::Tensor& grad, const at::Tensor& class_logits,
                                     const at::Tensor& anchor_labels, double alpha, double gamma) {
  check_focal_loss_inputs(class_logits, anchor_labels, alpha, gamma, &grad);
  const DeviceGuard guard(class_logits.device());
  const at::Tensor logits = class_logits.contiguous(), labels = anchor_labels.contiguous();
  const at::Tensor grad_of_image = grad.to(at::kDouble).contiguous();
  const int64_t images = logits.size(0), anchors = logits.size(1), classes = logits.size(2);
  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (grad_logits.numel() == 0) return grad_logits;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "rpn_ops_dense_focal_loss_backward_cuda", [&] {
    launch<focal_gradient_kernel<scalar_t>>(grid_for(images, anchors * classes), kThreads, 0,
                                            grad_of_image.const_data_ptr<double>(), logits.const_data_ptr<scalar_t>(),
                                            labels.const_data_ptr<int64_t>(), images, anchors, classes,
                                            static_cast<typename FocalTypes<scalar_t>::S>(alpha),
                                            static_cast<typename FocalTypes<scalar_t>::S>(gamma),
                                            grad_logits.mutable_data_ptr<scalar_t>());
  });
  return grad_logits;
}

}  // namespace

RPN_OPS_CUDA_KERNELS(m) {
  m.impl("dense_focal_loss", TORCH_FN(dense_focal_loss));
  m.impl("dense_focal_loss_backward", TORCH_FN(dense_focal_loss_backward));
}

}  // namespace rpn_ops::cuda
