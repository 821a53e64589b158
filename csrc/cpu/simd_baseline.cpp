// The CPU hot loops (simd_kernels.h) compiled for the baseline instruction set (16-byte vectors); chosen at run time by
// cpu/nms.cpp. Library headers come first, outside the target pragma; box_math.h after it, so its
// (internal-linkage) functions are compiled for this instruction set too, vector operations included.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "isa_targets.h"
#include "simd_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Vectors wider than the baseline registers only live inside inlined code; no ABI crosses this file.
#pragma GCC diagnostic ignored "-Wpsabi"

#define RPN_VECTOR_BYTES 16
#include "../box_math.h"

namespace rpn_ops::cpu::baseline {
constexpr int kVectorBytes = RPN_VECTOR_BYTES;
#include "simd_vectors.h"
#include "nms_greedy_impl.h"
#include "box_iou_impl.h"
}  // namespace rpn_ops::cpu::baseline
