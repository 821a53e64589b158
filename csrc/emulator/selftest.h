// The emulator's self-tests (selftest.cpp), for the emulated module.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace rpn_ops::emulator {

// Runs the self-test kernel `name` under the current settings; returns what it wrote (or raises what the
// emulator reported).
at::Tensor run_selftest(const std::string& name);
std::vector<std::string> selftest_names();

}  // namespace rpn_ops::emulator
