// The CPU hot loops for the baseline instruction set (SSE2 on x86-64): 16-byte vectors.
#define RPN_ISA baseline
#define RPN_VECTOR_BYTES 16
#include "simd_isa.h"
