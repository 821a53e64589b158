// Run-time choice of the instruction set for the CPU hot loops. Each hot loop is compiled once per
// instruction set in its own translation unit (see simd_*.cpp); the best one this CPU supports runs.
#pragma once

#include <string>
#include <vector>

namespace rpn_ops::cpu {

enum class Isa { baseline = 0, avx2 = 1, avx512 = 2 };

// The instruction set the kernels use now: the best compiled one the CPU supports, unless overridden.
Isa current_isa();
const char* isa_name(Isa isa);
// Instruction sets compiled into this build / usable on this CPU.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();
// Force a (compiled and supported) instruction set by name, "auto" for the best one; for tests and
// benchmarks. Throws for an unknown or unsupported name. The environment variable RPN_OPS_CPU_ISA does the
// same at load time.
void set_isa(const std::string& name);

}  // namespace rpn_ops::cpu
