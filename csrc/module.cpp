// The Python extension module rpn_ops._C: loading it registers every operator (static initialisers of the
// schema and kernel files); it also reports what this build contains.
#include <torch/extension.h>

#include "cpu/cpu_isa.h"

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

py::dict build_info() {
  py::dict info;
#if defined(RPN_OPS_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_version"] = RPN_OPS_CUDA_VERSION;
  info["cuda_archs"] = RPN_OPS_CUDA_ARCHS;
  info["built_with_torch"] = RPN_OPS_TORCH_VERSION;
  info["cpu_isas_compiled"] = rpn_ops::cpu::compiled_isas();
  info["cpu_isas_supported"] = rpn_ops::cpu::supported_isas();
  info["cpu_isa"] = rpn_ops::cpu::isa_name(rpn_ops::cpu::current_isa());
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rpn_ops compiled kernels; the operators are under torch.ops.rpn_ops";
  m.def("build_info", &build_info, "What this build of rpn_ops contains (CUDA, archs, CPU instruction sets).");
  m.def("set_cpu_isa", &rpn_ops::cpu::set_isa, py::arg("name"),
        "Force the CPU instruction set of the hot loops ('auto', 'baseline', 'avx2', 'avx512').");
}
