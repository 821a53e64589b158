// The emulator's controls, for the emulated module (module.cpp) and through it the tests: the thread order,
// the sizing constants, what ran, and the cost of a context switch. The settings belong to the calling thread.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace rpn_ops::emulator {

// "forward", "reverse" or "random" (seeded): the order in which a block's threads run between barriers, and
// the order of the blocks. Also picks the garbage that fresh shared memory holds.
void set_thread_order(const std::string& order, uint64_t seed);
std::string thread_order();

// Sizing constants by "file:name" (e.g. "nms.cu:kMaskBudgetBytes"): current and default values.
std::map<std::string, int64_t> sizings();
std::map<std::string, int64_t> default_sizings();
void set_sizing(const std::string& name, int64_t value);
void reset_sizings();

// Per kernel: launches, blocks and threads run since the last reset.
struct KernelRuns {
  int64_t launches = 0, blocks = 0, threads = 0;
};
std::map<std::string, KernelRuns> kernel_runs();
void reset_kernel_runs();

// Nanoseconds per switch between two contexts, measured over `rounds` round trips: the emulator's own switch
// and, for comparison, swapcontext.
double switch_nanoseconds(int64_t rounds, bool with_swapcontext);

}  // namespace rpn_ops::emulator
