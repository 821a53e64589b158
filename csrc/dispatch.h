// Calls f(std::type_identity<T>{}) with the C++ type T of a floating dtype (float16, bfloat16, float32,
// float64): a dtype switch for kernels that take several dtypes at once (mixed-dtype box coding), and the
// type triples of box coding, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <type_traits>

#include "box_coding.h"

namespace rpn_ops {

template <typename F>
decltype(auto) visit_float_type(c10::ScalarType type, F&& f) {
  switch (type) {
    case c10::ScalarType::Half: return f(std::type_identity<c10::Half>{});
    case c10::ScalarType::BFloat16: return f(std::type_identity<c10::BFloat16>{});
    case c10::ScalarType::Float: return f(std::type_identity<float>{});
    case c10::ScalarType::Double: return f(std::type_identity<double>{});
    default: TORCH_CHECK_TYPE(false, "expected float16, bfloat16, float32 or float64, got ", type);
  }
}

// Calls f.template operator()<A, B>() with the C++ types of two floating dtypes (target assignment's ground
// truth and anchors).
template <typename F>
void visit_float_types(c10::ScalarType a, c10::ScalarType b, F&& f) {
  visit_float_type(a, [&](auto a_tag) {
    visit_float_type(b, [&](auto b_tag) {
      f.template operator()<typename decltype(a_tag)::type, typename decltype(b_tag)::type>();
    });
  });
}

// The types of box coding, decided by the output tensor both backends allocate (coding_output_type):
// decode reads codes of type T and writes S (T, or float32 where the exponential runs in float32);
// encode reads reference boxes R and proposals P and writes L (promote(R, P), or float32 where the logarithm
// runs in float32). Calls f.template operator()<T, S>() / <R, P, L>(): f is a template lambda.
template <typename F>
void visit_decode_types(c10::ScalarType codes, c10::ScalarType output, F&& f) {
  visit_float_type(codes, [&](auto code_tag) {
    using T = typename decltype(code_tag)::type;
    if (output == codes) {
      f.template operator()<T, T>();
    } else if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, double>) {
      f.template operator()<T, float>();
    }
  });
}

template <typename F>
void visit_encode_types(c10::ScalarType reference, c10::ScalarType proposals, c10::ScalarType output, F&& f) {
  visit_float_type(reference, [&](auto reference_tag) {
    using R = typename decltype(reference_tag)::type;
    visit_float_type(proposals, [&](auto proposal_tag) {
      using P = typename decltype(proposal_tag)::type;
      using M = promoted_t<R, P>;
      if (output == c10::CppTypeToScalarType<M>::value) {
        f.template operator()<R, P, M>();
      } else if constexpr (!std::is_same_v<M, float> && !std::is_same_v<M, double>) {
        f.template operator()<R, P, float>();
      }
    });
  });
}

}  // namespace rpn_ops
