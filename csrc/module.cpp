// What this build contains, and the CPU switches (instruction set, threading), as operators of the library: rpn_ops/_C is a plain
// shared library of operators (no Python in it), so that torch.ops.load_library and C++ programs (libtorch) load
// it as they load torchvision's.
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

#include "cpu/cpu_isa.h"
#include "cpu/parallel.h"

#ifndef RPN_OPS_CUDA_VERSION
#define RPN_OPS_CUDA_VERSION ""
#endif
#ifndef RPN_OPS_CUDA_ARCHS
#define RPN_OPS_CUDA_ARCHS ""
#endif
#ifndef RPN_OPS_TORCH_VERSION
#define RPN_OPS_TORCH_VERSION ""
#endif

namespace {

std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) out += (i ? ", \"" : "\"") + items[i] + "\"";
  return out + "]";
}

// A JSON object (the values are plain identifiers and version numbers; nothing to escape).
std::string build_info() {
#if defined(RPN_OPS_WITH_CUDA)
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
  std::ostringstream info;
  info << "{\"cuda\": " << (cuda ? "true" : "false") << ", \"cuda_version\": \"" << RPN_OPS_CUDA_VERSION
       << "\", \"cuda_archs\": \"" << RPN_OPS_CUDA_ARCHS << "\", \"built_with_torch\": \"" << RPN_OPS_TORCH_VERSION
       << "\", \"cpu_isas_compiled\": " << json_list(rpn_ops::cpu::compiled_isas())
       << ", \"cpu_isas_supported\": " << json_list(rpn_ops::cpu::supported_isas()) << ", \"cpu_isa\": \""
       << rpn_ops::cpu::isa_name(rpn_ops::cpu::current_isa()) << "\"}";
  return info.str();
}

void set_cpu_isa(std::string name) { rpn_ops::cpu::set_isa(name); }

void set_cpu_threading(std::string mode) { rpn_ops::cpu::set_cpu_threading(mode); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpn_ops, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_set_cpu_isa(str name) -> ()", &set_cpu_isa);
  m.def("_set_cpu_threading(str mode) -> ()", &set_cpu_threading);
}

#ifdef _WIN32
// setuptools links every extension with /EXPORT:PyInit__C; Python never calls it (the library is loaded with
// torch.ops.load_library).
extern "C" __declspec(dllexport) void* PyInit__C(void) { return nullptr; }
#endif
