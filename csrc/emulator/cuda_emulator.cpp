// The CUDA emulator's scheduler: fibers, blocks, barriers, warp collectives, shared memory and its controls.
// See cuda_emulator.h for the model.
//
// A block runs in passes. A pass visits the threads in the chosen order and runs each runnable one until it
// blocks (at a barrier or a warp collective) or ends; a thread that blocks hands over directly to the next
// runnable thread of the pass, so a thread costs one context switch per blocking point. When no thread is
// runnable, the block settles: a barrier that every thread reached is released (the next pass reorders the
// threads), and anything else is an error.
#include "cuda_emulator.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "control.h"
#include "device_math.h"

#if defined(__SANITIZE_ADDRESS__)
#define RPN_OPS_EMULATOR_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RPN_OPS_EMULATOR_ASAN 1
#endif
#endif
#if defined(RPN_OPS_EMULATOR_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

#if defined(__x86_64__)
// switch_context(save, load): pushes the callee-saved registers, stores the stack pointer in *save, loads `load`
// and pops the same from there. (The fibers of a thread share its floating-point control state, which kernels
// never change, so it is not switched.) A new fiber's stack is prepared so that the first switch "returns" into
// fiber_start, which calls the entry function in r12 with the argument in rbx.
extern "C" void rpn_ops_emulator_switch_context(void** save, void* load);
extern "C" void rpn_ops_emulator_fiber_start();
asm(R"(
    .text
    .p2align 4
    .globl rpn_ops_emulator_switch_context
    .hidden rpn_ops_emulator_switch_context
    .type rpn_ops_emulator_switch_context, @function
rpn_ops_emulator_switch_context:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size rpn_ops_emulator_switch_context, .-rpn_ops_emulator_switch_context

    .p2align 4
    .globl rpn_ops_emulator_fiber_start
    .hidden rpn_ops_emulator_fiber_start
    .type rpn_ops_emulator_fiber_start, @function
rpn_ops_emulator_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %rbx, %rdi
    andq $-16, %rsp
    call *%r12
    ud2
    .cfi_endproc
    .size rpn_ops_emulator_fiber_start, .-rpn_ops_emulator_fiber_start
)");
#endif

namespace rpn_ops::emulator {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Settings and records

enum class Order { kForward, kReverse, kRandom };

// The calling thread's settings: threads that emulate at once (tests in a thread pool) each have their own.
struct Settings {
  Order order = Order::kForward;
  uint64_t seed = 0;
  uint64_t launches = 0;
  std::vector<int64_t> sizings;  // by Sizing id; 0: the default
};
thread_local Settings settings;

struct SizingEntry {
  std::string name;
  int64_t default_value;
};
// Registered by the Sizing constructors while the module loads, read-only after.
std::vector<SizingEntry>& sizing_registry() {
  static std::vector<SizingEntry> registry;
  return registry;
}

size_t sizing_id(const std::string& name) {
  const auto& registry = sizing_registry();
  const auto it = std::find_if(registry.begin(), registry.end(), [&](const SizingEntry& e) { return e.name == name; });
  TORCH_CHECK_VALUE(it != registry.end(), "no sizing constant named '", name, "'");
  return static_cast<size_t>(it - registry.begin());
}

std::mutex runs_mutex;
std::map<std::string, KernelRuns> runs;

// ---------------------------------------------------------------------------------------------------------
// Contexts: a stack each, switched by switch_context (x86-64) or swapcontext (elsewhere)

constexpr size_t kStackBytes = 256 * 1024;

struct Stack {
  char* base = nullptr;  // lowest usable byte; one guard page below it
  size_t size = kStackBytes;

  Stack() {
    void* memory = mmap(nullptr, size + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(memory != MAP_FAILED, "CUDA emulator: cannot map a fiber stack");
    mprotect(memory, page(), PROT_NONE);  // an overflow faults instead of corrupting the next stack
    base = static_cast<char*>(memory) + page();
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  ~Stack() { munmap(base - page(), size + page()); }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
};

// A context to switch to: a fiber's, or the scheduler's (the thread's own stack).
struct Context {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
  const void* stack_bottom = nullptr;  // for AddressSanitizer
  size_t stack_size = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's, while switched out
};

#if defined(__x86_64__)
// A stack pointer that the first switch to it starts entry(argument) from.
void* initial_stack(const Stack& stack, void (*entry)(void*), void* argument) {
  auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack.base + stack.size) & ~uintptr_t{15});
  *--sp = 0;  // fiber_start's return address: never used
  *--sp = reinterpret_cast<uint64_t>(&rpn_ops_emulator_fiber_start);
  *--sp = 0;                                     // rbp
  *--sp = reinterpret_cast<uint64_t>(argument);  // rbx
  *--sp = reinterpret_cast<uint64_t>(entry);     // r12
  for (int r = 0; r < 3; ++r) *--sp = 0;         // r13-r15
  return sp;
}
#else
thread_local void (*starting_entry)(void*) = nullptr;
thread_local void* starting_argument = nullptr;
void ucontext_entry() { starting_entry(starting_argument); }
#endif

void start(Context& context, const Stack& stack, void (*entry)(void*), void* argument) {
  context.stack_bottom = stack.base;
  context.stack_size = stack.size;
  context.fake_stack = nullptr;
#if defined(__x86_64__)
  context.sp = initial_stack(stack, entry, argument);
#else
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack.base;
  context.context.uc_stack.ss_size = stack.size;
  context.context.uc_link = nullptr;
  starting_entry = entry, starting_argument = argument;  // read by the first switch to it, before any other
  makecontext(&context.context, ucontext_entry, 0);
#endif
}

// Leaves `from` (for good when `from_ends`) for `to`; returns when something switches back to `from`.
void switch_to(Context& from, Context& to, bool from_ends) {
#if defined(RPN_OPS_EMULATOR_ASAN)
  __sanitizer_start_switch_fiber(from_ends ? nullptr : &from.fake_stack, to.stack_bottom, to.stack_size);
#else
  (void)from_ends;
#endif
#if defined(__x86_64__)
  rpn_ops_emulator_switch_context(&from.sp, to.sp);
#else
  swapcontext(&from.context, &to.context);
#endif
#if defined(RPN_OPS_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(from.fake_stack, nullptr, nullptr);
#endif
}

// The running thread's own stack, as AddressSanitizer wants it described (found once per thread: it is slow).
void describe_thread_stack(Context& context) {
#if defined(RPN_OPS_EMULATOR_ASAN)
  thread_local void* bottom = nullptr;
  thread_local size_t size = 0;
  if (size == 0) {
    pthread_attr_t attributes;
    if (pthread_getattr_np(pthread_self(), &attributes) == 0) {
      pthread_attr_getstack(&attributes, &bottom, &size);
      pthread_attr_destroy(&attributes);
    }
  }
  context.stack_bottom = bottom;
  context.stack_size = size;
#else
  (void)context;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Threads, warps and blocks

enum class State : uint8_t { kRunnable, kAtBarrier, kInCollective, kExited, kFailed };

struct Fiber {
  Context context;
  Stack stack;
  uint3 thread{};
  int linear = 0;
  State state = State::kRunnable;
  BarrierKind barrier_kind = BarrierKind::kSync;
  int predicate = 0, barrier_result = 0;
  std::source_location where;  // of the barrier or collective it waits at
  const char* intrinsic = "";
  uint64_t collective_result = 0;
};

struct Launch {
  const char* kernel;
  dim3 grid, block;
  size_t dynamic_shared_bytes;
  void (*body)(const void*);
  const void* context;
  Order order;
  std::mt19937_64 random;
  unsigned char garbage;  // the byte fresh shared memory holds
};

// A collective some lanes of a warp have reached.
struct Collective {
  unsigned mask = 0, arrived = 0;
  WarpOp op = WarpOp::kSync;
  const char* intrinsic = "";
  std::source_location where;
  uint64_t bits[32] = {};
  int source[32] = {};
};

// A warp's collectives in progress: lanes with disjoint masks may hold several at once.
struct Warp {
  static constexpr int kMaxPending = 32;
  Collective pending[kMaxPending];
  int count = 0;
};

struct SharedObject {
  const void* key;
  void* memory;
  size_t alignment;
};

std::string location(const std::source_location& where) {
  const std::string file = where.file_name();
  return file.substr(file.find_last_of('/') + 1) + ":" + std::to_string(where.line());
}

// Threads by linear index (x + y * blockDim.x + z * blockDim.x * blockDim.y), as ranges: "threads 0-31, 40" or
// "thread 7", followed by the verb for one or for several ("waits" / "wait").
std::string threads_that(const std::vector<int>& linear, const char* one, const char* several) {
  std::ostringstream out;
  out << (linear.size() == 1 ? "thread " : "threads ");
  for (size_t i = 0; i < linear.size();) {
    size_t j = i;
    while (j + 1 < linear.size() && linear[j + 1] == linear[j] + 1) ++j;
    out << (i ? ", " : "") << linear[i];
    if (j > i) out << "-" << linear[j];
    i = j + 1;
  }
  out << " " << (linear.size() == 1 ? one : several);
  return out.str();
}

struct BlockRun {
  Launch& launch;
  std::vector<std::unique_ptr<Fiber>>& fibers;
  int threads;
  uint3 index;
  std::vector<Warp> warps;
  std::vector<SharedObject> statics;
  size_t static_bytes = 0;
  std::unique_ptr<unsigned char[]> dynamic;
  Context scheduler;
  std::vector<int> order;  // of the current pass
  int position = -1;       // in `order` of the running thread
  Fiber* current = nullptr;
  std::string error;

  BlockRun(Launch& l, std::vector<std::unique_ptr<Fiber>>& pool, int count, uint3 block_index)
      : launch(l), fibers(pool), threads(count), index(block_index), warps((count + 31) / 32), order(count) {
    dynamic.reset(new unsigned char[std::max<size_t>(launch.dynamic_shared_bytes, 1)]);
    memset(dynamic.get(), launch.garbage, launch.dynamic_shared_bytes);
    describe_thread_stack(scheduler);
  }
  ~BlockRun() {
    for (const SharedObject& object : statics) ::operator delete(object.memory, std::align_val_t(object.alignment));
  }

  std::string where() const {
    std::ostringstream out;
    out << "CUDA emulator: kernel " << launch.kernel << ", block (" << index.x << ", " << index.y << ", " << index.z
        << ") of " << threads << " threads: ";
    return out.str();
  }
};

thread_local BlockRun* running = nullptr;
thread_local std::vector<std::unique_ptr<Fiber>> fiber_pool;

// From `from` (a thread that blocked or ended, or null: the scheduler starting a pass) to the next runnable
// thread of the pass, or back to the scheduler when the pass is over. Returns when `from` runs again.
void hand_over(BlockRun& block, Fiber* from) {
  Context& from_context = from ? from->context : block.scheduler;
  const bool from_ends = from && (from->state == State::kExited || from->state == State::kFailed);
  if (!from || from->state != State::kFailed) {
    while (++block.position < block.threads) {
      Fiber& next = *block.fibers[block.order[block.position]];
      if (next.state != State::kRunnable) continue;
      threadIdx = next.thread;
      block.current = &next;
      switch_to(from_context, next.context, from_ends);
      return;
    }
  }
  block.current = nullptr;
  switch_to(from_context, block.scheduler, from_ends);
}

BlockRun& running_block(const char* what) {
  TORCH_CHECK(running && running->current, "CUDA emulator: ", what, " called outside a kernel");
  return *running;
}

// Ends the running block with an error (from one of its threads): the scheduler raises it.
[[noreturn]] void fail(const std::string& message) {
  BlockRun& block = *running;
  Fiber& fiber = *block.current;
  if (block.error.empty()) block.error = block.where() + message;
  fiber.state = State::kFailed;
  hand_over(block, &fiber);
  __builtin_unreachable();
}

// A thread's life: the kernel's body, then away for good.
void run_thread(void* fiber_pointer) {
  Fiber& fiber = *static_cast<Fiber*>(fiber_pointer);
  BlockRun& block = *running;
#if defined(RPN_OPS_EMULATOR_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  try {
    block.launch.body(block.launch.context);
    fiber.state = State::kExited;
  } catch (const std::exception& error) {
    if (block.error.empty()) block.error = block.where() + "thread " + std::to_string(fiber.linear) + " threw: " + error.what();
    fiber.state = State::kFailed;
  } catch (...) {
    if (block.error.empty()) block.error = block.where() + "thread " + std::to_string(fiber.linear) + " threw";
    fiber.state = State::kFailed;
  }
  hand_over(block, &fiber);
  __builtin_unreachable();
}

// The threads of the next pass, in the launch's order.
void reorder(BlockRun& block) {
  std::iota(block.order.begin(), block.order.end(), 0);
  if (block.launch.order == Order::kReverse) std::reverse(block.order.begin(), block.order.end());
  if (block.launch.order == Order::kRandom) std::shuffle(block.order.begin(), block.order.end(), block.launch.random);
}

// Every lane's result of a completed collective.
void complete(BlockRun& block, int warp, const Collective& c) {
  const auto each_lane = [&](auto&& f) {
    for (unsigned lanes = c.mask; lanes; lanes &= lanes - 1) f(__builtin_ctz(lanes));
  };
  const auto u32 = [&](int l) { return static_cast<uint32_t>(c.bits[l]); };
  const auto i32 = [&](int l) { return static_cast<int32_t>(u32(l)); };
  uint64_t common = 0;  // the result of a reduction, the same for every lane
  switch (c.op) {
    case WarpOp::kSync: break;
    case WarpOp::kShuffle: break;
    case WarpOp::kBallot: each_lane([&](int l) { common |= uint64_t{c.bits[l] != 0} << l; }); break;
    case WarpOp::kAny: each_lane([&](int l) { common |= c.bits[l] != 0; }); break;
    case WarpOp::kAll: common = 1; each_lane([&](int l) { common &= c.bits[l] != 0; }); break;
    case WarpOp::kMaxU32: each_lane([&](int l) { common = std::max<uint64_t>(common, u32(l)); }); break;
    case WarpOp::kMinU32: common = UINT32_MAX; each_lane([&](int l) { common = std::min<uint64_t>(common, u32(l)); }); break;
    case WarpOp::kMaxI32: {
      int32_t v = INT32_MIN;
      each_lane([&](int l) { v = std::max(v, i32(l)); });
      common = static_cast<uint32_t>(v);
      break;
    }
    case WarpOp::kMinI32: {
      int32_t v = INT32_MAX;
      each_lane([&](int l) { v = std::min(v, i32(l)); });
      common = static_cast<uint32_t>(v);
      break;
    }
    case WarpOp::kAddU32: { uint32_t v = 0; each_lane([&](int l) { v += u32(l); }); common = v; break; }
    case WarpOp::kAndU32: { uint32_t v = UINT32_MAX; each_lane([&](int l) { v &= u32(l); }); common = v; break; }
    case WarpOp::kOrU32: { uint32_t v = 0; each_lane([&](int l) { v |= u32(l); }); common = v; break; }
    case WarpOp::kXorU32: { uint32_t v = 0; each_lane([&](int l) { v ^= u32(l); }); common = v; break; }
  }
  uint64_t garbage;
  memset(&garbage, block.launch.garbage, sizeof(garbage));  // what a lane reads from an inactive one: undefined
  each_lane([&](int l) {
    Fiber& member = *block.fibers[32 * warp + l];
    if (c.op == WarpOp::kShuffle) {
      const int source = c.source[l];
      member.collective_result = source >= 0 && source < 32 && ((c.mask >> source) & 1) ? c.bits[source] : garbage;
    } else {
      member.collective_result = common;
    }
    member.state = State::kRunnable;
  });
}

bool same_place(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || strcmp(a.file_name(), b.file_name()) == 0);
}

// What is wrong when no thread is runnable and the block cannot go on.
std::string stuck(const BlockRun& block) {
  std::vector<int> exited, waiting, in_collective;
  for (int t = 0; t < block.threads; ++t) {
    const State s = block.fibers[t]->state;
    (s == State::kExited ? exited : s == State::kAtBarrier ? waiting : in_collective).push_back(t);
  }
  std::ostringstream out;
  if (!in_collective.empty()) {
    const Fiber& first = *block.fibers[in_collective[0]];
    out << "deadlock: " << threads_that(in_collective, "waits", "wait") << " at " << first.intrinsic << " ("
        << location(first.where) << ") for lanes that never come";
    if (!exited.empty()) out << "; " << threads_that(exited, "has exited", "have exited");
    if (!waiting.empty()) {
      out << "; " << threads_that(waiting, "waits", "wait") << " at __syncthreads ("
          << location(block.fibers[waiting[0]]->where) << ")";
    }
  } else if (!exited.empty()) {
    out << "barrier divergence: " << threads_that(waiting, "waits", "wait") << " at __syncthreads ("
        << location(block.fibers[waiting[0]]->where) << ") but " << threads_that(exited, "has exited", "have exited");
  } else {
    const Fiber& first = *block.fibers[waiting[0]];
    std::vector<int> here, elsewhere;
    for (int t : waiting) {
      const Fiber& f = *block.fibers[t];
      (same_place(f.where, first.where) && f.barrier_kind == first.barrier_kind ? here : elsewhere).push_back(t);
    }
    out << "barrier divergence: " << threads_that(here, "waits", "wait") << " at " << location(first.where) << ", "
        << threads_that(elsewhere, "waits", "wait") << " at " << location(block.fibers[elsewhere[0]]->where);
  }
  return block.where() + out.str();
}

// No thread is runnable: release the barrier that every thread reached, or say what is wrong. Returns false when
// the block has ended (or failed).
bool settle(BlockRun& block) {
  const Fiber* first = nullptr;
  bool all_waiting = true, all_exited = true;
  for (int t = 0; t < block.threads; ++t) {
    const Fiber& f = *block.fibers[t];
    all_exited &= f.state == State::kExited;
    if (f.state != State::kAtBarrier) {
      all_waiting = false;
    } else if (!first) {
      first = &f;
    } else if (!same_place(f.where, first->where) || f.barrier_kind != first->barrier_kind) {
      all_waiting = false;
    }
  }
  if (all_exited) return false;
  if (!all_waiting) {
    block.error = stuck(block);
    return false;
  }
  int result = first->barrier_kind == BarrierKind::kAnd ? 1 : 0;
  for (int t = 0; t < block.threads; ++t) {
    const int p = block.fibers[t]->predicate != 0;
    switch (first->barrier_kind) {
      case BarrierKind::kSync: break;
      case BarrierKind::kOr: result |= p; break;
      case BarrierKind::kAnd: result &= p; break;
      case BarrierKind::kCount: result += p; break;
    }
  }
  for (int t = 0; t < block.threads; ++t) {
    block.fibers[t]->barrier_result = result;
    block.fibers[t]->state = State::kRunnable;
  }
  return true;
}

void run_block(Launch& launch, uint3 block_index) {
  const int threads = static_cast<int>(launch.block.x * launch.block.y * launch.block.z);
  while (fiber_pool.size() < static_cast<size_t>(threads)) fiber_pool.push_back(std::make_unique<Fiber>());
  BlockRun block(launch, fiber_pool, threads, block_index);
  for (int t = 0; t < threads; ++t) {
    Fiber& fiber = *fiber_pool[t];
    fiber.linear = t;
    fiber.thread = {t % launch.block.x, t / launch.block.x % launch.block.y, t / (launch.block.x * launch.block.y)};
    fiber.state = State::kRunnable;
    start(fiber.context, fiber.stack, run_thread, &fiber);
  }
  blockIdx = block_index;
  BlockRun* const outer = running;
  running = &block;
  for (bool more = true; more && block.error.empty();) {
    reorder(block);
    while (block.error.empty() && std::any_of(fiber_pool.begin(), fiber_pool.begin() + threads,
                                              [](const auto& f) { return f->state == State::kRunnable; })) {
      block.position = -1;
      hand_over(block, nullptr);  // runs one pass
    }
    if (block.error.empty()) more = settle(block);
  }
  running = outer;
  if (!block.error.empty()) {
#if defined(RPN_OPS_EMULATOR_ASAN)
    for (int t = 0; t < threads; ++t) {  // abandoned frames must not leave poisoned stack behind
      __asan_unpoison_memory_region(fiber_pool[t]->stack.base, fiber_pool[t]->stack.size);
    }
#endif
    TORCH_CHECK(false, block.error);
  }
}

uint64_t gcd(uint64_t a, uint64_t b) { return b == 0 ? a : gcd(b, a % b); }

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// Device side

int block_barrier(BarrierKind kind, int predicate, const std::source_location& where) {
  BlockRun& block = running_block("__syncthreads");
  Fiber& fiber = *block.current;
  fiber.state = State::kAtBarrier;
  fiber.barrier_kind = kind;
  fiber.predicate = predicate;
  fiber.where = where;
  fiber.intrinsic = "__syncthreads";
  hand_over(block, &fiber);
  return fiber.barrier_result;
}

int lane_id() { return running_block("a warp intrinsic").current->linear % 32; }

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t bits, int source_lane, const char* intrinsic,
                         const std::source_location& where) {
  BlockRun& block = running_block(intrinsic);
  Fiber& fiber = *block.current;
  const int lane = fiber.linear % 32, warp_index = fiber.linear / 32;
  const unsigned lane_bit = 1u << lane;
  const int lanes_in_warp = std::min(32, block.threads - 32 * warp_index);
  const unsigned existing = lanes_in_warp == 32 ? 0xffffffffu : (1u << lanes_in_warp) - 1;
  const auto call = [&](const char* name, unsigned m, const std::source_location& at) {
    std::ostringstream out;
    out << name << "(mask 0x" << std::hex << m << std::dec << ") at " << location(at);
    return out.str();
  };
  const auto thread = [&] { return "thread " + std::to_string(fiber.linear); };
  if (!(mask & lane_bit)) {
    fail(thread() + " calls " + call(intrinsic, mask, where) + ", whose mask leaves out its own lane " +
         std::to_string(lane));
  }
  if (mask & ~existing) {
    fail(thread() + " calls " + call(intrinsic, mask, where) + ", whose mask names lanes that do not exist (warp " +
         std::to_string(warp_index) + " has " + std::to_string(lanes_in_warp) + ")");
  }
  Warp& warp = block.warps[warp_index];
  Collective* c = std::find_if(warp.pending, warp.pending + warp.count, [&](const Collective& p) { return p.mask & mask; });
  if (c != warp.pending + warp.count && (c->mask != mask || c->op != op)) {
    fail("lanes of warp " + std::to_string(warp_index) + " disagree: some wait in " +
         call(c->intrinsic, c->mask, c->where) + ", " + thread() + " calls " + call(intrinsic, mask, where));
  }
  if (c == warp.pending + warp.count) {
    TORCH_INTERNAL_ASSERT(warp.count < Warp::kMaxPending);
    c = &warp.pending[warp.count++];
    c->mask = mask, c->arrived = 0, c->op = op, c->intrinsic = intrinsic, c->where = where;
  }
  c->bits[lane] = bits;
  c->source[lane] = source_lane;
  c->arrived |= lane_bit;
  if (c->arrived != mask) {  // wait for the other lanes
    fiber.state = State::kInCollective;
    fiber.where = where;
    fiber.intrinsic = intrinsic;
    hand_over(block, &fiber);
    return fiber.collective_result;
  }
  complete(block, warp_index, *c);
  if (c != &warp.pending[warp.count - 1]) *c = warp.pending[warp.count - 1];  // the last pending one takes its place
  --warp.count;
  return fiber.collective_result;
}

void* static_shared(const void* key, size_t size, size_t alignment, const char* type_name) {
  BlockRun& block = running_block("block_shared");
  for (const SharedObject& object : block.statics) {
    if (object.key == key) return object.memory;
  }
  // Static and dynamic shared memory together get 48 KiB, or the opt-in limit where the launch opted in, which
  // launch() does for more than 48 KiB of dynamic shared memory.
  const size_t dynamic = block.launch.dynamic_shared_bytes;
  const size_t together = dynamic > LaunchLimits::kStaticSharedBytes ? LaunchLimits::kOptInSharedBytes
                                                                     : LaunchLimits::kStaticSharedBytes;
  if (block.static_bytes + size > LaunchLimits::kStaticSharedBytes || block.static_bytes + size + dynamic > together) {
    fail("shared memory exceeds the device's limit: " + std::to_string(block.static_bytes + size) +
         " bytes of static shared memory (at most " + std::to_string(LaunchLimits::kStaticSharedBytes) + ") and " +
         std::to_string(dynamic) + " dynamic (together at most " + std::to_string(together) + "), at " + type_name);
  }
  void* memory = ::operator new(size, std::align_val_t(alignment));
  memset(memory, block.launch.garbage, size);
  block.statics.push_back({key, memory, alignment});
  block.static_bytes += size;
  return memory;
}

void* dynamic_shared() { return running_block("dynamic_shared").dynamic.get(); }

// ---------------------------------------------------------------------------------------------------------
// Host side

void launch(const char* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, void (*body)(const void*),
            const void* context) {
  Launch run{kernel, grid, block, dynamic_shared_bytes, body, context, settings.order, {}, 0};
  run.random.seed(settings.seed * 0x9e3779b97f4a7c15ull + ++settings.launches);
  run.garbage = run.order == Order::kForward   ? 0xa5
                : run.order == Order::kReverse ? 0x5a
                                               : static_cast<unsigned char>(run.random());
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  {
    const std::lock_guard<std::mutex> lock(runs_mutex);
    KernelRuns& r = runs[kernel];
    r.launches += 1;
    r.blocks += static_cast<int64_t>(blocks);
    r.threads += static_cast<int64_t>(blocks * threads);
  }
  // Blocks in order, reversed, or in the order of a random stride coprime with their count.
  uint64_t stride = 1, offset = 0;
  if (run.order == Order::kRandom && blocks > 1) {
    do stride = run.random() % blocks; while (gcd(stride, blocks) != 1);
    offset = run.random() % blocks;
  }
  const dim3 saved_grid = gridDim, saved_block = blockDim;
  gridDim = grid;
  blockDim = block;
  try {
    for (uint64_t k = 0; k < blocks; ++k) {
      const uint64_t b = run.order == Order::kForward   ? k
                         : run.order == Order::kReverse ? blocks - 1 - k
                                                        : (k * stride + offset) % blocks;
      run_block(run, {static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))});
    }
  } catch (...) {
    gridDim = saved_grid, blockDim = saved_block;
    throw;
  }
  gridDim = saved_grid, blockDim = saved_block;
}

Sizing::Sizing(const char* file, const char* name, int64_t default_value) {
  const std::string path = file;
  auto& registry = sizing_registry();
  id_ = registry.size();
  registry.push_back({path.substr(path.find_last_of('/') + 1) + ":" + name, default_value});
}

Sizing::operator int64_t() const {
  return id_ < settings.sizings.size() && settings.sizings[id_] != 0 ? settings.sizings[id_]
                                                                      : sizing_registry()[id_].default_value;
}

// ---------------------------------------------------------------------------------------------------------
// Device math: PyTorch's CPU exp / log (device_math.h says why)

float device_exp(float x) { return at::exp(at::scalar_tensor(x, at::kFloat)).item<float>(); }
double device_exp(double x) { return at::exp(at::scalar_tensor(x, at::kDouble)).item<double>(); }
float device_log(float x) { return at::log(at::scalar_tensor(x, at::kFloat)).item<float>(); }
double device_log(double x) { return at::log(at::scalar_tensor(x, at::kDouble)).item<double>(); }

// ---------------------------------------------------------------------------------------------------------
// Controls

void set_thread_order(const std::string& order, uint64_t seed) {
  if (order == "forward") {
    settings.order = Order::kForward;
  } else if (order == "reverse") {
    settings.order = Order::kReverse;
  } else if (order == "random") {
    settings.order = Order::kRandom;
  } else {
    TORCH_CHECK_VALUE(false, "thread order must be 'forward', 'reverse' or 'random', got '", order, "'");
  }
  settings.seed = seed;
}

std::string thread_order() {
  switch (settings.order) {
    case Order::kForward: return "forward";
    case Order::kReverse: return "reverse";
    case Order::kRandom: return "random";
  }
  return "";
}

std::map<std::string, int64_t> sizings() {
  std::map<std::string, int64_t> out;
  const auto& registry = sizing_registry();
  for (size_t id = 0; id < registry.size(); ++id) {
    out[registry[id].name] = id < settings.sizings.size() && settings.sizings[id] ? settings.sizings[id]
                                                                                  : registry[id].default_value;
  }
  return out;
}

std::map<std::string, int64_t> default_sizings() {
  std::map<std::string, int64_t> out;
  for (const SizingEntry& entry : sizing_registry()) out[entry.name] = entry.default_value;
  return out;
}

void set_sizing(const std::string& name, int64_t value) {
  const size_t id = sizing_id(name);
  const int64_t default_value = sizing_registry()[id].default_value;
  TORCH_CHECK_VALUE(value >= 1 && value <= default_value, "sizing constant ", name, " must be between 1 and its default ",
                    default_value, ", got ", value);
  settings.sizings.resize(sizing_registry().size());
  settings.sizings[id] = value;
}

void reset_sizings() { settings.sizings.clear(); }

std::map<std::string, KernelRuns> kernel_runs() {
  const std::lock_guard<std::mutex> lock(runs_mutex);
  return runs;
}

void reset_kernel_runs() {
  const std::lock_guard<std::mutex> lock(runs_mutex);
  runs.clear();
}

namespace {

// Ping-pong between this thread and a context that only switches back: through the emulator's switch, or
// through swapcontext.
struct PingPong {
  void* main_sp = nullptr;
  void* other_sp = nullptr;
  ucontext_t main_context, other_context;
  Stack stack;
};
thread_local PingPong* ping_pong = nullptr;

#if defined(__x86_64__)
[[noreturn]] void switch_back_forever(void*) {
  for (;;) rpn_ops_emulator_switch_context(&ping_pong->other_sp, ping_pong->main_sp);
}
#endif

[[noreturn]] void swapcontext_back_forever() {
  for (;;) swapcontext(&ping_pong->other_context, &ping_pong->main_context);
}

}  // namespace

double switch_nanoseconds(int64_t rounds, bool with_swapcontext) {
  TORCH_CHECK_VALUE(rounds > 0, "rounds must be positive, got ", rounds);
#if !defined(__x86_64__)
  TORCH_CHECK(with_swapcontext, "the emulator's own context switch exists on x86-64 only (elsewhere it uses swapcontext)");
#endif
  auto pp = std::make_unique<PingPong>();
  ping_pong = pp.get();
  if (with_swapcontext) {
    getcontext(&pp->other_context);
    pp->other_context.uc_stack.ss_sp = pp->stack.base;
    pp->other_context.uc_stack.ss_size = pp->stack.size;
    pp->other_context.uc_link = nullptr;
    makecontext(&pp->other_context, swapcontext_back_forever, 0);
  } else {
#if defined(__x86_64__)
    pp->other_sp = initial_stack(pp->stack, switch_back_forever, nullptr);
#endif
  }
  const auto begin = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < rounds; ++i) {
    if (with_swapcontext) {
      swapcontext(&pp->main_context, &pp->other_context);
    } else {
#if defined(__x86_64__)
      rpn_ops_emulator_switch_context(&pp->main_sp, pp->other_sp);
#endif
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  ping_pong = nullptr;
  return seconds * 1e9 / (2.0 * static_cast<double>(rounds));
}

}  // namespace rpn_ops::emulator
