// Anchor and box-coding arithmetic shared by the CPU and CUDA kernels, written once so both backends give
// the same bits as torchvision.
//
// torchvision computes these with separate tensor operations, each rounding its result to the tensor's dtype.
// The functions below do the same: every intermediate is held in the type torchvision's tensor would have
// (c10::Half / c10::BFloat16 arithmetic computes in float and rounds back, like the ATen kernels), and the
// build turns off FMA contraction. Where torchvision mixes dtypes (float32 ground truth with float16 anchors
// under autocast), the types follow PyTorch's promotion rules.
//
// The exponential and the logarithm are the exception: on the CPU, PyTorch's own vectorised exp/log (SLEEF or
// MKL, not correctly rounded) decide the last bit, so the CPU kernels call them on small buffers between the
// two halves of the computation (decode_start / decode_finish, encode_start / encode_finish). The CUDA kernels
// use the device's expf/logf, as PyTorch's CUDA kernels do.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(RPN_OPS_EMULATED_CUDA)
#include "emulator/device_math.h"
#endif

#if defined(__CUDACC__)
#define RPN_HD __host__ __device__ __forceinline__
#else
#define RPN_HD inline
#endif

namespace rpn_ops {

// PyTorch's "opmath" type: float16 / bfloat16 / float32 compute in float32, float64 in float64.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// The type of `a op b` for tensors of types A and B, by PyTorch's promotion rules: a type with itself stays,
// float64 wins, any other mix (float16 with bfloat16 too) gives float32.
template <typename A, typename B>
using promoted_t = std::conditional_t<
    std::is_same_v<A, B>, A, std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>>;

template <typename To, typename From>
RPN_HD To to(From x) {
  return static_cast<To>(static_cast<opmath_t<To>>(x));
}

// `python_scalar * tensor` for a tensor of type T: computed in opmath, rounded to T.
template <typename T>
RPN_HD T scaled(double scalar, T x) {
  return static_cast<T>(static_cast<opmath_t<T>>(scalar) * static_cast<opmath_t<T>>(x));
}

// exp / log of a value of type T computed as PyTorch's CUDA kernels do (in opmath, rounded to T).
template <typename T>
RPN_HD T exp_as(T x) {
#if defined(RPN_OPS_EMULATED_CUDA)
  using emulator::device_exp;
  return static_cast<T>(device_exp(static_cast<opmath_t<T>>(x)));
#else
  using std::exp;
  return static_cast<T>(exp(static_cast<opmath_t<T>>(x)));
#endif
}
template <typename T>
RPN_HD T log_as(T x) {
#if defined(RPN_OPS_EMULATED_CUDA)
  using emulator::device_log;
  return static_cast<T>(device_log(static_cast<opmath_t<T>>(x)));
#else
  using std::log;
  return static_cast<T>(log(static_cast<opmath_t<T>>(x)));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Anchors: torchvision's AnchorGenerator.grid_anchors. Within a level, anchors are ordered by row y, column x,
// then cell anchor; anchor = shift + cell with shift = (x * stride_x, y * stride_y, x * stride_x, y * stride_y).
// torchvision adds an integer shift tensor to the cell anchors of the feature map's dtype T: the shift is
// converted to T, the sum computed in opmath and rounded to T.

struct AnchorLevel {
  int64_t first_anchor;  // flat index of the level's first anchor among all levels
  int64_t grid_width;
  int64_t stride_y, stride_x;
  int64_t first_cell;  // row of the level's first cell anchor in the [cells, 4] table
  int64_t cells;       // cell anchors per position
};

template <typename T>
RPN_HD T shifted(int64_t shift, T cell) {
  using A = opmath_t<T>;
  return static_cast<T>(static_cast<A>(static_cast<T>(static_cast<A>(shift))) + static_cast<A>(cell));
}

// The anchor with flat index `index` (among all levels) of a level, from the [cells, 4] table of type T.
// The proposal kernels call this instead of reading materialised anchors.
template <typename T>
RPN_HD void anchor_at(const AnchorLevel& level, int64_t index, const T* cell_table, T out[4]) {
  const int64_t in_level = index - level.first_anchor;
  const int64_t position = in_level / level.cells;
  const T* cell = cell_table + 4 * (level.first_cell + in_level - position * level.cells);
  const int64_t shift_x = position % level.grid_width * level.stride_x;
  const int64_t shift_y = position / level.grid_width * level.stride_y;
  out[0] = shifted(shift_x, cell[0]);
  out[1] = shifted(shift_y, cell[1]);
  out[2] = shifted(shift_x, cell[2]);
  out[3] = shifted(shift_y, cell[3]);
}

// ---------------------------------------------------------------------------------------------------------
// Decode: torchvision's BoxCoder.decode_single. `rel_codes` of type T; the reference boxes are first
// converted to T (`boxes.to(rel_codes.dtype)`). S is the type of the exponential: T, or float32 where CUDA
// autocast runs torch.exp in float32 for float16 / bfloat16 codes (the output is then float32 too).

// `rel_codes / weight` for a Python-float weight. PyTorch's CPU kernel divides by the weight (in opmath);
// its CUDA kernel multiplies by the reciprocal `1 / weight` computed in opmath. The two differ by at most one
// unit in the last place for weights that are not powers of two; each backend matches its torchvision.
template <typename T, bool kByReciprocal>
struct CodeWeights {
  opmath_t<T> value[4];

  explicit CodeWeights(const double weights[4]) {
    using A = opmath_t<T>;
    for (int i = 0; i < 4; ++i) value[i] = kByReciprocal ? A(1) / static_cast<A>(weights[i]) : static_cast<A>(weights[i]);
  }
  RPN_HD T apply(T code, int i) const {
    using A = opmath_t<T>;
    if constexpr (kByReciprocal) {
      return static_cast<T>(static_cast<A>(code) * value[i]);
    } else {
      return static_cast<T>(static_cast<A>(code) / value[i]);
    }
  }
};
template <typename T>
using CpuCodeWeights = CodeWeights<T, false>;
template <typename T>
using CudaCodeWeights = CodeWeights<T, true>;

template <typename T>
struct DecodeStart {
  T ctr_x, ctr_y, width, height;  // the predicted centre, and the reference box's size
  T dw, dh;                       // clamped log-size deltas: the exponential's arguments
};

template <typename T, bool kByReciprocal>
RPN_HD DecodeStart<T> decode_start(const T code[4], const T box[4], const CodeWeights<T, kByReciprocal>& weights,
                                   T clip) {
  const T width = box[2] - box[0];
  const T height = box[3] - box[1];
  const T ctr_x = box[0] + scaled(0.5, width);
  const T ctr_y = box[1] + scaled(0.5, height);
  const T dx = weights.apply(code[0], 0);
  const T dy = weights.apply(code[1], 1);
  T dw = weights.apply(code[2], 2);
  T dh = weights.apply(code[3], 3);
  dw = dw > clip ? clip : dw;  // torch.clamp(max=): NaN stays NaN
  dh = dh > clip ? clip : dh;
  return {static_cast<T>(dx * width) + ctr_x, static_cast<T>(dy * height) + ctr_y, width, height, dw, dh};
}

// exp_dw, exp_dh: exp of the start's dw, dh, in S.
template <typename S, typename T>
RPN_HD void decode_finish(const DecodeStart<T>& start, S exp_dw, S exp_dh, S out[4]) {
  const S half_w = static_cast<S>(0.5f) * static_cast<S>(exp_dw * static_cast<S>(start.width));
  const S half_h = static_cast<S>(0.5f) * static_cast<S>(exp_dh * static_cast<S>(start.height));
  out[0] = static_cast<S>(start.ctr_x) - half_w;
  out[1] = static_cast<S>(start.ctr_y) - half_h;
  out[2] = static_cast<S>(start.ctr_x) + half_w;
  out[3] = static_cast<S>(start.ctr_y) + half_h;
}

// ---------------------------------------------------------------------------------------------------------
// Linear decode: torchvision's BoxLinearCoder(normalize_by_size=True).decode (FCOS's box coder): the codes are the
// distances from the reference box's centre to the sides, in units of its width and height. Each step rounded to
// T, as torchvision's tensors are.
template <typename T>
RPN_HD void decode_linear(const T code[4], const T box[4], T out[4]) {
  const T ctr_x = scaled(0.5, static_cast<T>(box[0] + box[2]));
  const T ctr_y = scaled(0.5, static_cast<T>(box[1] + box[3]));
  const T width = box[2] - box[0];
  const T height = box[3] - box[1];
  out[0] = ctr_x - static_cast<T>(code[0] * width);
  out[1] = ctr_y - static_cast<T>(code[1] * height);
  out[2] = ctr_x + static_cast<T>(code[2] * width);
  out[3] = ctr_y + static_cast<T>(code[3] * height);
}

// ---------------------------------------------------------------------------------------------------------
// Encode: torchvision's encode_boxes(reference_boxes, proposals, weights). Reference boxes of type R (the
// weights tensor has R too), proposals of type P, mixed terms in M = promote(R, P); L is the type of the
// logarithm: M, or float32 where CUDA autocast runs torch.log in float32. The output has type L.

template <typename R, typename P, typename L>
struct EncodeStart {
  using M = promoted_t<R, P>;
  M dx, dy;                 // the weighted centre offsets
  L width_ratio, height_ratio;  // the logarithm's arguments
};

template <typename L, typename R, typename P>
RPN_HD EncodeStart<R, P, L> encode_start(const R reference[4], const P proposal[4], const R weights[4]) {
  using M = promoted_t<R, P>;
  const P ex_width = proposal[2] - proposal[0];
  const P ex_height = proposal[3] - proposal[1];
  const P ex_ctr_x = proposal[0] + scaled(0.5, ex_width);
  const P ex_ctr_y = proposal[1] + scaled(0.5, ex_height);
  const R gt_width = reference[2] - reference[0];
  const R gt_height = reference[3] - reference[1];
  const R gt_ctr_x = reference[0] + scaled(0.5, gt_width);
  const R gt_ctr_y = reference[1] + scaled(0.5, gt_height);
  const M dx = static_cast<M>(to<M>(weights[0]) * static_cast<M>(to<M>(gt_ctr_x) - to<M>(ex_ctr_x))) / to<M>(ex_width);
  const M dy = static_cast<M>(to<M>(weights[1]) * static_cast<M>(to<M>(gt_ctr_y) - to<M>(ex_ctr_y))) / to<M>(ex_height);
  const M width_ratio = to<M>(gt_width) / to<M>(ex_width);
  const M height_ratio = to<M>(gt_height) / to<M>(ex_height);
  return {dx, dy, to<L>(width_ratio), to<L>(height_ratio)};
}

// log_width_ratio, log_height_ratio: log of the start's ratios, in L.
template <typename L, typename R, typename P>
RPN_HD void encode_finish(const EncodeStart<R, P, L>& start, L log_width_ratio, L log_height_ratio,
                          const R weights[4], L out[4]) {
  out[0] = to<L>(start.dx);
  out[1] = to<L>(start.dy);
  out[2] = to<L>(weights[2]) * log_width_ratio;
  out[3] = to<L>(weights[3]) * log_height_ratio;
}

}  // namespace rpn_ops
