// Calls f(std::type_identity<T>{}) with the C++ type T of a floating dtype (float16, bfloat16, float32,
// float64): a dtype switch for kernels that take several dtypes at once (mixed-dtype box coding).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <type_traits>

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

}  // namespace rpn_ops
