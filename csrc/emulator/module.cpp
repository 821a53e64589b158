// The emulated module (tests only): loading it registers csrc/cuda/'s kernels, run by the emulator on CPU
// tensors, as torch.ops.rpn_ops_emulated.*; these functions steer the emulator.
#include <torch/extension.h>

#include "control.h"
#include "selftest.h"

namespace emulator = rpn_ops::emulator;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rpn_ops' CUDA kernels on the CUDA emulator; the operators are under torch.ops.rpn_ops_emulated";
  m.def("set_thread_order", &emulator::set_thread_order, py::arg("order"), py::arg("seed") = 0,
        "The order of threads between barriers, and of blocks: 'forward', 'reverse' or 'random' (seeded).");
  m.def("thread_order", &emulator::thread_order);
  m.def("sizings", &emulator::sizings, "Sizing constants of csrc/cuda/ by 'file:name', current values.");
  m.def("default_sizings", &emulator::default_sizings);
  m.def("set_sizing", &emulator::set_sizing, py::arg("name"), py::arg("value"),
        "Lower a sizing constant (1 to its default) so that small inputs take the large-input path.");
  m.def("reset_sizings", &emulator::reset_sizings);
  m.def("kernel_runs", [] {
    py::dict out;
    for (const auto& [kernel, runs] : emulator::kernel_runs()) {
      out[py::str(kernel)] = py::make_tuple(runs.launches, runs.blocks, runs.threads);
    }
    return out;
  }, "Per kernel: (launches, blocks, threads) since the last reset_kernel_runs().");
  m.def("reset_kernel_runs", &emulator::reset_kernel_runs);
  m.def("switch_nanoseconds", &emulator::switch_nanoseconds, py::arg("rounds"), py::arg("with_swapcontext") = false,
        "Nanoseconds per context switch: the emulator's own, or swapcontext's.");
  m.def("run_selftest", &emulator::run_selftest, py::arg("name"), "Run one of the emulator's self-test kernels.");
  m.def("selftest_names", &emulator::selftest_names);
}
