// The CPU hot loops for AVX-512: 64-byte vectors.
#include "isa_targets.h"
#if defined(RPN_OPS_X86_ISAS)
#define RPN_ISA avx512
#define RPN_VECTOR_BYTES 64
#define RPN_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#include "simd_isa.h"
#endif
