#include "cpu_isa.h"
#include "isa_targets.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace rpn_ops::cpu {

namespace {

bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::baseline:
      return true;
#if defined(RPN_OPS_X86_ISAS)
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

Isa best_isa() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::baseline;
}

Isa parse_isa(const std::string& name) {
  if (name == "auto" || name.empty()) return best_isa();
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (name == isa_name(isa)) {
      TORCH_CHECK_VALUE(cpu_supports(isa), "CPU instruction set '", name,
                        "' is not compiled into this build or not supported by this CPU");
      return isa;
    }
  }
  TORCH_CHECK_VALUE(false, "unknown CPU instruction set '", name, "'; expected auto, baseline, avx2 or avx512");
}

Isa initial_isa() {
  const char* forced = std::getenv("RPN_OPS_CPU_ISA");
  return parse_isa(forced == nullptr ? "" : forced);
}

std::atomic<Isa>& isa_in_use() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

Isa current_isa() { return isa_in_use().load(std::memory_order_relaxed); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx2:
      return "avx2";
    case Isa::avx512:
      return "avx512";
    default:
      return "baseline";
  }
}

std::vector<std::string> compiled_isas() {
#if defined(RPN_OPS_X86_ISAS)
  return {"baseline", "avx2", "avx512"};
#else
  return {"baseline"};
#endif
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (Isa isa : {Isa::baseline, Isa::avx2, Isa::avx512}) {
    if (cpu_supports(isa)) names.emplace_back(isa_name(isa));
  }
  return names;
}

void set_isa(const std::string& name) { isa_in_use().store(parse_isa(name), std::memory_order_relaxed); }

}  // namespace rpn_ops::cpu
