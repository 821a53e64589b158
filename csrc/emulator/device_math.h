// The emulated device's exponential and logarithm (box_coding.h's exp_as / log_as in the emulated build).
//
// A real GPU computes expf / logf with its own instructions, whose last bits no CPU function reproduces. The
// emulator uses PyTorch's CPU exp / log instead, the very functions the CPU kernels call, so that emulated
// CUDA kernels can be held to the CPU kernels' bits everywhere; the device's own bits are what emulation
// cannot prove.
#pragma once

namespace rpn_ops::emulator {

float device_exp(float x);
double device_exp(double x);
float device_log(float x);
double device_log(double x);

}  // namespace rpn_ops::emulator
