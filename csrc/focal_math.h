// The sigmoid focal loss of one logit and its gradient (dense_focal_loss: focal_loss.h), shared by the CPU kernel
// (scalar, and on float32 lanes of a GCC vector: simd_isa.h includes this after its target pragma) and the CUDA
// kernel. float / float16 / bfloat16 logits compute in float with the exp and log1p below, written once for every
// device: the CPU's and the GPU's terms are the same bits. double uses std::exp and std::log1p.
#pragma once

#include "box_math.h"

namespace rpn_ops {

template <typename To, typename From>
RPN_INLINE To bits_as(From from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as reinterprets values of one size");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// exp(x) for float x <= 0 or NaN (T: float, or a vector of float lanes whose int32 lanes are I): Cephes' expf,
// x = n ln 2 + r with |r| <= ln 2 / 2, a degree-6 polynomial of r, times 2^n built in the exponent bits. 0 below
// -87 (where expf's results are subnormal). Within 2 ulps of the exact value.
template <typename I, typename T>
RPN_INLINE T exp_of_nonpositive(T x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  const T in_range = x < -87.0f ? T{} : x;
  const T shifted = in_range * 1.44269504088896341f + kRound;
  const T n = shifted - kRound;
  const T r = (in_range - n * 0.693359375f) - n * -2.12194440e-4f;
  T poly = r * 1.9875691500e-4f + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const T exp_r = (poly * (r * r) + r) + 1.0f;
  const I exponent = (bits_as<I>(shifted) - bits_as<int32_t>(kRound) + 127) << 23;
  const T result = exp_r * bits_as<T>(exponent);
  return x < -87.0f ? T{} : result;
}

// log(1 + e) for float e in [0, 1]: 2 atanh(u) with u = e / (2 + e) <= 1/3, by its series to u^15 (the rest is
// below 1e-8 of the value).
template <typename T>
RPN_INLINE T log1p_of_unit(T e) {
  const T u = e / (e + 2.0f);
  const T u2 = u * u;
  T series = u2 * (1.0f / 15.0f) + 1.0f / 13.0f;
  series = series * u2 + 1.0f / 11.0f;
  series = series * u2 + 1.0f / 9.0f;
  series = series * u2 + 1.0f / 7.0f;
  series = series * u2 + 1.0f / 5.0f;
  series = series * u2 + 1.0f / 3.0f;
  return (u * 2.0f) + (u * 2.0f) * (series * u2);
}

// One logit's terms in sigmoid_focal_loss's operation order, T the logit's opmath type (float, double, or float
// lanes with int32 lanes I), S its scalar type; t is 1 for the positive target, else 0:
//   p = sigmoid(x); ce = (1 - t) x - log_sigmoid(x), binary_cross_entropy_with_logits' formula, with
//   log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)); p_t = p t + (1 - p)(1 - t); q = 1 - p_t.
// One exp serves both: sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e) with e = exp(-|x|).
template <typename T>
struct FocalTerms {
  T q;   // the modulating base 1 - p_t
  T ce;  // the cross entropy
};

template <typename S, typename I, typename T>
RPN_INLINE FocalTerms<T> focal_terms(T x, S t) {
  const T zero{}, one = zero + S(1);
  const T minus_abs = x < zero ? x : -x;
  T e, log1p_e;
  if constexpr (sizeof(S) == sizeof(double)) {
    e = std::exp(minus_abs);
    log1p_e = std::log1p(e);
  } else {
    e = exp_of_nonpositive<I>(minus_abs);
    log1p_e = log1p_of_unit(e);
  }
  const T p = (x >= zero ? one : e) / (e + S(1));
  const T log_sigmoid = (x < zero ? x : zero) - log1p_e;
  const T ce = x * (S(1) - t) - log_sigmoid;
  const T p_t = p * t + (S(1) - p) * (S(1) - t);
  return {S(1) - p_t, ce};
}

// alpha * t + (1 - alpha) * (1 - t), or 1 for alpha < 0 (no weighting).
template <typename S>
RPN_INLINE S focal_alpha_t(S alpha, S t) {
  return alpha >= S(0) ? alpha * t + (S(1) - alpha) * (S(1) - t) : S(1);
}

// base ** gamma as torch.pow(tensor, python_float) computes it: its special exponents, then pow (scalars only).
template <typename S, typename T>
RPN_INLINE T focal_power(T base, S gamma) {
  if (gamma == S(2)) return base * base;
  if (gamma == S(3)) return base * base * base;
  if (gamma == S(1)) return base;
  if (gamma == S(0)) return T{} + S(1);
  if constexpr (std::is_same_v<T, S>) {
    return std::pow(base, gamma);
  } else {
    T result;
    constexpr int lanes = static_cast<int>(sizeof(T) / sizeof(S));
    for (int lane = 0; lane < lanes; ++lane) result[lane] = std::pow(base[lane], gamma);
    return result;
  }
}

// alpha_t * (ce * q ** gamma): the loss of one logit.
template <typename S, typename I, typename T>
RPN_INLINE T focal_loss_of(T x, S t, S alpha, S gamma) {
  const FocalTerms<T> f = focal_terms<S, I>(x, t);
  return (f.ce * focal_power(f.q, gamma)) * focal_alpha_t(alpha, t);
}

// d loss / d x = s alpha_t q^gamma (q + gamma ce (1 - q)), s = -1 for the positive target and +1 otherwise: from
// dce/dx = p - t = s q and dq/dx = s p (1 - p) = s q (1 - q). No q^(gamma - 1): finite at q = 0.
template <typename S, typename I, typename T>
RPN_INLINE T focal_gradient_of(T x, S t, S alpha, S gamma) {
  const FocalTerms<T> f = focal_terms<S, I>(x, t);
  const T magnitude = (focal_power(f.q, gamma) * (f.q + (f.ce * gamma) * (S(1) - f.q))) * focal_alpha_t(alpha, t);
  return t == S(1) ? -magnitude : magnitude;
}

}  // namespace rpn_ops
