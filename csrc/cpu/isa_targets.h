// Which instruction-set variants of the CPU hot loops this compiler can build.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(RPN_OPS_BASELINE_ONLY)
#define RPN_OPS_X86_ISAS 1
#endif
