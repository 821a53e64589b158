// dense_focal_loss on the CPU (what it computes: ../focal_loss.h). Each image's anchors fall into fixed blocks,
// walked in order: the logits of negative targets in spans between the positive ones and the ignored anchors,
// which float32 computes with the SIMD kernels (focal_impl.h); each block's float64 sum, then the blocks' in block
// order: the same result on any number of threads and any instruction set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../focal_loss.h"
#include "parallel.h"
#include "simd_kernels.h"

namespace rpn_ops::cpu {
namespace {

constexpr int64_t kAnchorsPerBlock = 64;
constexpr double kNanosecondsPerLogit = 1.0;  // measured single-threaded on AVX-512; a few times more without SIMD

struct Layout {
  int64_t images, anchors, classes, blocks_per_image;

  Layout(const at::Tensor& logits)
      : images(logits.size(0)), anchors(logits.size(1)), classes(logits.size(2)),
        blocks_per_image((anchors + kAnchorsPerBlock - 1) / kAnchorsPerBlock) {}

  int64_t grain() const { return grain_for(kNanosecondsPerLogit * kAnchorsPerBlock * std::max<int64_t>(classes, 1)); }
};

// Walks the anchors [first, last) (flat over the batch): negative(begin, end) for each span of logits whose
// targets are all 0, positive(at) for each anchor's positive logit, ignored(anchor) for each ignored anchor.
template <typename Negative, typename Positive, typename Ignored>
void walk(const int64_t* labels, int64_t first, int64_t last, int64_t classes, const Negative& negative,
          const Positive& positive, const Ignored& ignored) {
  int64_t pending = first * classes;
  for (int64_t anchor = first; anchor < last; ++anchor) {
    const int64_t label = labels[anchor];
    if (label == kIgnored) {
      if (pending < anchor * classes) negative(pending, anchor * classes);
      ignored(anchor);
      pending = (anchor + 1) * classes;
    } else if (label >= 0) {
      const int64_t at = anchor * classes + label;
      if (pending < at) negative(pending, at);
      positive(at);
      pending = at + 1;
    }
  }
  if (pending < last * classes) negative(pending, last * classes);
}

// Runs body(image, first_anchor, last_anchor, block) for every block, in parallel.
template <typename Body>
void for_each_block(const Layout& layout, const Body& body) {
  parallel_for(layout.images * layout.blocks_per_image, layout.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t image = block / layout.blocks_per_image;
      const int64_t first = image * layout.anchors + block % layout.blocks_per_image * kAnchorsPerBlock;
      body(image, first, std::min(first + kAnchorsPerBlock, (image + 1) * layout.anchors), block);
    }
  });
}

// Each block's float64 sum of its anchors' terms.
template <typename scalar_t>
std::vector<double> block_sums(const at::Tensor& logits, const at::Tensor& labels, const Layout& layout,
                               double alpha, double gamma) {
  using S = typename FocalTypes<scalar_t>::S;
  using I = typename FocalTypes<scalar_t>::I;
  const S a = static_cast<S>(alpha), g = static_cast<S>(gamma);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const FocalKernels simd = focal_kernels_for(current_isa());
  std::vector<double> sums(layout.images * layout.blocks_per_image, 0.0);
  for_each_block(layout, [&](int64_t, int64_t first, int64_t last, int64_t block) {
    double total = 0.0;
    const auto negative = [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        total += simd.negative_sum(x + begin, end - begin, a, g);
      } else {
        for (int64_t i = begin; i < end; ++i) total += focal_loss_of<S, I>(static_cast<S>(x[i]), S(0), a, g);
      }
    };
    const auto positive = [&](int64_t at) { total += focal_loss_of<S, I>(static_cast<S>(x[at]), S(1), a, g); };
    walk(labels.const_data_ptr<int64_t>(), first, last, layout.classes, negative, positive, [](int64_t) {});
    sums[block] = total;
  });
  return sums;
}

// The logits' gradients: grad[image] times each term's derivative, 0 for ignored anchors.
template <typename scalar_t>
void fill_gradients(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, const Layout& layout,
                    double alpha, double gamma, at::Tensor& grad_logits) {
  using S = typename FocalTypes<scalar_t>::S;
  using I = typename FocalTypes<scalar_t>::I;
  const S a = static_cast<S>(alpha), g = static_cast<S>(gamma);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
  const FocalKernels simd = focal_kernels_for(current_isa());
  for_each_block(layout, [&](int64_t image, int64_t first, int64_t last, int64_t) {
    const S scale = static_cast<S>(grad.const_data_ptr<double>()[image]);
    const auto negative = [&](int64_t begin, int64_t end) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        simd.negative_gradients(x + begin, end - begin, scale, a, g, out + begin);
      } else {
        for (int64_t i = begin; i < end; ++i) {
          out[i] = static_cast<scalar_t>(scale * focal_gradient_of<S, I>(static_cast<S>(x[i]), S(0), a, g));
        }
      }
    };
    const auto positive = [&](int64_t at) {
      out[at] = static_cast<scalar_t>(scale * focal_gradient_of<S, I>(static_cast<S>(x[at]), S(1), a, g));
    };
    const auto ignored = [&](int64_t anchor) {
      std::fill_n(out + anchor * layout.classes, layout.classes, scalar_t(0));
    };
    walk(labels.const_data_ptr<int64_t>(), first, last, layout.classes, negative, positive, ignored);
  });
}

at::Tensor dense_focal_loss(const at::Tensor& class_logits, const at::Tensor& anchor_labels, double alpha,
                            double gamma) {
  check_focal_loss_inputs(class_logits, anchor_labels, alpha, gamma);
  const at::Tensor logits = class_logits.contiguous(), labels = anchor_labels.contiguous();
  const Layout layout(logits);
  at::Tensor sums = at::empty({layout.images}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rpn_ops_dense_focal_loss", [&] {
    const std::vector<double> blocks = block_sums<scalar_t>(logits, labels, layout, alpha, gamma);
    scalar_t* out = sums.mutable_data_ptr<scalar_t>();
    for (int64_t image = 0; image < layout.images; ++image) {
      double total = 0.0;
      for (int64_t b = 0; b < layout.blocks_per_image; ++b) total += blocks[image * layout.blocks_per_image + b];
      out[image] = static_cast<scalar_t>(total);
    }
  });
  return sums;
}

at::Tensor dense_focal_loss_backward(const at::Tensor& grad, const at::Tensor& class_logits,
                                     const at::Tensor& anchor_labels, double alpha, double gamma) {
  check_focal_loss_inputs(class_logits, anchor_labels, alpha, gamma, &grad);
  const at::Tensor logits = class_logits.contiguous(), labels = anchor_labels.contiguous();
  const Layout layout(logits);
  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "rpn_ops_dense_focal_loss_backward",
                                  [&] {
    fill_gradients<scalar_t>(grad.to(at::kDouble).contiguous(), logits, labels, layout, alpha, gamma, grad_logits);
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(rpn_ops, CPU, m) {
  m.impl("dense_focal_loss", TORCH_FN(dense_focal_loss));
  m.impl("dense_focal_loss_backward", TORCH_FN(dense_focal_loss_backward));
}

}  // namespace rpn_ops::cpu
