// Box coding on chunks of items, for the CPU kernels that encode or decode (box_coding.cpp, matching.cpp):
// a first loop computes everything up to the exponential / logarithm into small column buffers, PyTorch's
// exp / log runs on one of them, a second loop finishes. PyTorch's vectorised SLEEF/MKL exp and log are not
// correctly rounded, so only they give torchvision's last bit. Both loops are branch-free over contiguous
// columns, so the compiler vectorises them; they are compiled for each instruction set (IEEE products and
// quotients, no contraction: the same bits on every one) and the one in use (cpu_isa.h) runs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "../box_coding.h"
#include "cpu_isa.h"
#include "isa_targets.h"

namespace rpn_ops::cpu {

constexpr int64_t kChunkItems = 4096;    // items per call of PyTorch's exp / log: columns stay in cache

template <typename T>
at::Tensor wrap(T* data, int64_t count) {
  return at::from_blob(data, {count}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void exp_in_place(T* values, int64_t count) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  wrap(values, count).exp_();
}

template <typename T>
void log_in_place(T* values, int64_t count) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  wrap(values, count).log_();
}

template <typename T, typename S>
struct DecodeChunk {
  const T* codes;  // [count, 4] contiguous
  const T* boxes;  // [count, 4] contiguous: each item's reference box
  int64_t count;
  CpuCodeWeights<T> weights;
  T clip;
  T *ctr_x, *ctr_y, *width, *height;  // scratch columns of `count`
  S* exps;                            // scratch of 2 * count: dw, then dh
  S* out;                             // [count, 4]
};

// The loops take restrict parameters (restrict locals are not enough for the compiler): no store aliases a
// load, so they vectorise without run-time overlap checks.
template <typename T, typename S>
[[gnu::always_inline]] inline void decode_start_loop(const T* __restrict codes, const T* __restrict boxes,
                                                     int64_t count, const CpuCodeWeights<T> weights, T clip,
                                                     T* __restrict ctr_x, T* __restrict ctr_y, T* __restrict width,
                                                     T* __restrict height, S* __restrict exp_dw,
                                                     S* __restrict exp_dh) {
  for (int64_t i = 0; i < count; ++i) {
    const T code[4] = {codes[4 * i], codes[4 * i + 1], codes[4 * i + 2], codes[4 * i + 3]};
    const T box[4] = {boxes[4 * i], boxes[4 * i + 1], boxes[4 * i + 2], boxes[4 * i + 3]};
    const DecodeStart<T> start = decode_start(code, box, weights, clip);
    ctr_x[i] = start.ctr_x;
    ctr_y[i] = start.ctr_y;
    width[i] = start.width;
    height[i] = start.height;
    exp_dw[i] = to<S>(start.dw);
    exp_dh[i] = to<S>(start.dh);
  }
}

template <typename T, typename S>
[[gnu::always_inline]] inline void decode_finish_loop(const T* __restrict ctr_x, const T* __restrict ctr_y,
                                                      const T* __restrict width, const T* __restrict height,
                                                      const S* __restrict exp_dw, const S* __restrict exp_dh,
                                                      int64_t count, S* __restrict out) {
  for (int64_t i = 0; i < count; ++i) {
    const DecodeStart<T> start{ctr_x[i], ctr_y[i], width[i], height[i], T{}, T{}};
    decode_finish(start, exp_dw[i], exp_dh[i], out + 4 * i);
  }
}

template <typename T, typename S>
[[gnu::always_inline]] inline void decode_chunk(const DecodeChunk<T, S>& c) {
  decode_start_loop(c.codes, c.boxes, c.count, c.weights, c.clip, c.ctr_x, c.ctr_y, c.width, c.height, c.exps,
                    c.exps + c.count);
  exp_in_place(c.exps, 2 * c.count);
  decode_finish_loop(c.ctr_x, c.ctr_y, c.width, c.height, c.exps, c.exps + c.count, c.count, c.out);
}

template <typename R, typename P, typename L>
struct EncodeChunk {
  using M = promoted_t<R, P>;
  const R* reference;  // [count, 4] contiguous
  const P* proposals;  // [count, 4] contiguous
  int64_t count;
  R weights[4];
  M *dx, *dy;  // scratch columns of `count`
  L* logs;     // scratch of 2 * count: width ratios, then height ratios
  L* out;      // [count, 4]
};

template <typename R, typename P, typename L, typename M = promoted_t<R, P>>
[[gnu::always_inline]] inline void encode_start_loop(const R* __restrict reference, const P* __restrict proposals,
                                                     int64_t count, const R* __restrict weights, M* __restrict dx,
                                                     M* __restrict dy, L* __restrict width_ratio,
                                                     L* __restrict height_ratio) {
  const R w[4] = {weights[0], weights[1], weights[2], weights[3]};
  for (int64_t i = 0; i < count; ++i) {
    const R ref[4] = {reference[4 * i], reference[4 * i + 1], reference[4 * i + 2], reference[4 * i + 3]};
    const P proposal[4] = {proposals[4 * i], proposals[4 * i + 1], proposals[4 * i + 2], proposals[4 * i + 3]};
    const EncodeStart<R, P, L> start = encode_start<L>(ref, proposal, w);
    dx[i] = start.dx;
    dy[i] = start.dy;
    width_ratio[i] = start.width_ratio;
    height_ratio[i] = start.height_ratio;
  }
}

template <typename R, typename P, typename L, typename M = promoted_t<R, P>>
[[gnu::always_inline]] inline void encode_finish_loop(const M* __restrict dx, const M* __restrict dy,
                                                      const L* __restrict log_width, const L* __restrict log_height,
                                                      int64_t count, const R* __restrict weights, L* __restrict out) {
  const R w[4] = {weights[0], weights[1], weights[2], weights[3]};
  for (int64_t i = 0; i < count; ++i) {
    const EncodeStart<R, P, L> start{dx[i], dy[i], L{}, L{}};
    encode_finish(start, log_width[i], log_height[i], w, out + 4 * i);
  }
}

template <typename R, typename P, typename L>
[[gnu::always_inline]] inline void encode_chunk(const EncodeChunk<R, P, L>& c) {
  encode_start_loop<R, P, L>(c.reference, c.proposals, c.count, c.weights, c.dx, c.dy, c.logs, c.logs + c.count);
  log_in_place(c.logs, 2 * c.count);
  encode_finish_loop<R, P, L>(c.dx, c.dy, c.logs, c.logs + c.count, c.count, c.weights, c.out);
}

// chunk_for<Chunk>(isa): the chunk function compiled for that instruction set.
template <typename Chunk>
void run_chunk_baseline(const Chunk& c) {
  if constexpr (requires { c.exps; }) decode_chunk(c); else encode_chunk(c);
}
#if defined(RPN_OPS_X86_ISAS)
template <typename Chunk>
__attribute__((target("avx2,fma"))) void run_chunk_avx2(const Chunk& c) {
  if constexpr (requires { c.exps; }) decode_chunk(c); else encode_chunk(c);
}
template <typename Chunk>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void run_chunk_avx512(const Chunk& c) {
  if constexpr (requires { c.exps; }) decode_chunk(c); else encode_chunk(c);
}
#endif

template <typename Chunk>
auto chunk_for(Isa isa) -> void (*)(const Chunk&) {
#if defined(RPN_OPS_X86_ISAS)
  if (isa == Isa::avx512) return run_chunk_avx512<Chunk>;
  if (isa == Isa::avx2) return run_chunk_avx2<Chunk>;
#endif
  return run_chunk_baseline<Chunk>;
}

}  // namespace rpn_ops::cpu
