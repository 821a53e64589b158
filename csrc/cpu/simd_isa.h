// The CPU hot loops (simd_kernels.h) compiled for one instruction set. Each simd_<isa>.cpp defines
// RPN_ISA (its namespace), RPN_VECTOR_BYTES (its register width) and, except the baseline, RPN_ISA_TARGET
// (the compiler's target features), then includes this file; kernels_for() chooses among them at run time.
//
// Library headers come first, outside the target pragma; box_math.h after it, so its (internal-linkage)
// functions are compiled for this instruction set too, vector operations included, and no library code is.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "isa_targets.h"
#include "simd_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Vectors wider than the baseline registers only live inside inlined code; no ABI crosses this file.
#pragma GCC diagnostic ignored "-Wpsabi"

#define RPN_PRAGMA_TEXT(text) _Pragma(#text)
#define RPN_PRAGMA(text) RPN_PRAGMA_TEXT(text)  // expands the macros in `text` first
#if defined(RPN_ISA_TARGET)
#if !defined(RPN_OPS_X86_ISAS)
#error "instruction-set variants are only built for x86-64 with GCC or clang"
#endif
#if defined(__clang__)
RPN_PRAGMA(clang attribute push(__attribute__((target(RPN_ISA_TARGET))), apply_to = function))
#else
RPN_PRAGMA(GCC target(RPN_ISA_TARGET))
#endif
#endif

#include "../box_math.h"
#include "../focal_math.h"

namespace rpn_ops::cpu::RPN_ISA {
constexpr int kVectorBytes = RPN_VECTOR_BYTES;
#include "simd_vectors.h"
#include "nms_greedy_impl.h"
#include "box_iou_impl.h"
#include "match_impl.h"
#include "score_impl.h"
#include "focal_impl.h"
}  // namespace rpn_ops::cpu::RPN_ISA

#if defined(RPN_ISA_TARGET) && defined(__clang__)
#pragma clang attribute pop
#endif
