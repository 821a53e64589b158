// The operator namespace of the files compiled into both modules: the schemas (csrc/*.cpp) and the CUDA kernels
// (csrc/cuda/). It is rpn_ops, except in the emulated build of the CUDA kernels (tests/emulator.py), which
// registers the same operators under rpn_ops_emulated so that both modules load side by side.
#pragma once

#include <torch/library.h>

#ifndef RPN_OPS_NAMESPACE
#define RPN_OPS_NAMESPACE rpn_ops
#endif

#define RPN_OPS_STRINGIFY_(x) #x
#define RPN_OPS_STRINGIFY(x) RPN_OPS_STRINGIFY_(x)
// "rpn_ops::name": an operator's qualified name, for Dispatcher lookups.
#define RPN_OPS_QUALIFIED(name) RPN_OPS_STRINGIFY(RPN_OPS_NAMESPACE) "::" name
