// The CPU hot loops for AVX2: 32-byte vectors.
#include "isa_targets.h"
#if defined(RPN_OPS_X86_ISAS)
#define RPN_ISA avx2
#define RPN_VECTOR_BYTES 32
#define RPN_ISA_TARGET "avx2,fma"
#include "simd_isa.h"
#endif
