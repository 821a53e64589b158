#include "parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <ATen/Config.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if AT_MKL_ENABLED()
extern "C" int MKL_Set_Num_Threads_Local(int threads);  // C interface; exported by libtorch_cpu (MKL linked in)
#endif

namespace rpn_ops::cpu {
namespace {

thread_local bool in_pieces = false;  // this thread is running a piece: nested calls stay serial

// While a thread runs pieces, the PyTorch operators it calls (the coding kernels' exp and log on chunks of 4096)
// stay on it, as they do inside at::parallel_for: neither ATen's OpenMP loops nor MKL's own threads start.
// Measured without it, decode of 2 x 243k boxes: 70 context switches per call on a quiet machine, slower than
// one thread; next to 2 busy processes, 968 ms instead of 8, each of its 120 exp calls waiting for OpenMP.
class SerialTorchOps {
 public:
  SerialTorchOps() {
#ifdef _OPENMP
    omp_threads_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
#if AT_MKL_ENABLED()
    mkl_threads_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SerialTorchOps() {
#ifdef _OPENMP
    omp_set_num_threads(omp_threads_);
#endif
#if AT_MKL_ENABLED()
    MKL_Set_Num_Threads_Local(mkl_threads_);
#endif
  }

 private:
  [[maybe_unused]] int omp_threads_ = 1, mkl_threads_ = 0;
};

// While a thread runs a piece: nested parallel_for calls and PyTorch operators stay on it.
class PieceScope {
 public:
  PieceScope() : outer_(!in_pieces) { in_pieces = true; }
  ~PieceScope() { in_pieces = !outer_; }

 private:
  bool outer_;
  SerialTorchOps serial_torch_ops_;
};

// One call's pieces. Shared with the helpers it asked for, which may start after the call has returned: they
// then find no piece left and never touch `body`, which lives only as long as the call.
struct Pieces {
  Pieces(int64_t count, int64_t grain, c10::function_ref<void(int64_t, int64_t)> body)
      : count(count), grain(grain), total((count + grain - 1) / grain), body(body) {}

  const int64_t count, grain, total;
  const c10::function_ref<void(int64_t, int64_t)> body;
  std::atomic<int64_t> next{0}, finished{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mutex;
  std::condition_variable all_finished;

  void work() {
    const PieceScope scope;
    for (int64_t piece = next++; piece < total; piece = next++) {
      if (!failed) {
        try {
          body(piece * grain, std::min(count, (piece + 1) * grain));
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::current_exception();
          failed = true;
        }
      }
      if (++finished == total) {
        std::lock_guard<std::mutex> lock(mutex);
        all_finished.notify_all();
      }
    }
  }

  // Returns once every piece has finished. A helper that is still busy with its last piece is usually
  // microseconds from done, so the caller spins briefly before it sleeps.
  void wait() {
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(20);
    while (finished < total && std::chrono::steady_clock::now() < spin_until) {
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex);
    all_finished.wait(lock, [&] { return finished == total; });
  }
};

// The whole range on the calling thread, as one piece.
void run_serially(int64_t count, c10::function_ref<void(int64_t, int64_t)> body) {
  const PieceScope scope;
  body(0, count);
}

enum class Machine { kLook, kIdle, kBusy };
std::atomic<Machine> assumed_machine{Machine::kLook};  // tests take each path with _set_cpu_threading

// Whether the machine has more runnable threads than cores (this one included), so that a thread we wake may
// have to wait for a core: the kernel's instantaneous count in /proc/loadavg, read at most once a millisecond.
bool cores_are_busy() {
  if (assumed_machine != Machine::kLook) return assumed_machine == Machine::kBusy;
  static std::atomic<int64_t> checked_at_us{-1000000};
  static std::atomic<bool> busy{false};
  const int64_t now_us = std::chrono::duration_cast<std::chrono::microseconds>(
                             std::chrono::steady_clock::now().time_since_epoch())
                             .count();
  if (now_us - checked_at_us.load(std::memory_order_relaxed) < 1000) return busy.load(std::memory_order_relaxed);
  checked_at_us.store(now_us, std::memory_order_relaxed);
  static const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  unsigned running = 0;
  if (FILE* loadavg = std::fopen("/proc/loadavg", "r")) {  // "0.08 0.92 2.37 2/82 6249": 2 runnable of 82
    if (std::fscanf(loadavg, "%*s %*s %*s %u", &running) != 1) running = 0;
    std::fclose(loadavg);
  }
  busy.store(running > cores, std::memory_order_relaxed);
  return running > cores;
}

}  // namespace

void parallel_for(int64_t count, int64_t grain, c10::function_ref<void(int64_t, int64_t)> body) {
  if (count <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t total = (count + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), total);
  if (threads <= 1 || in_pieces || at::in_parallel_region()) {
    run_serially(count, body);
    return;
  }
  const bool busy = cores_are_busy();
  if (busy && total < kBusySharingPieces) {
    run_serially(count, body);
    return;
  }
  auto pieces = std::make_shared<Pieces>(count, grain, body);
  if (!busy) {  // idle cores: at::parallel_for's threads (OpenMP here), which wait for work spinning, start at once
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { pieces->work(); });
  } else {
    for (int64_t helper = 1; helper < threads; ++helper) {
      at::launch([pieces] { pieces->work(); });
    }
    pieces->work();
    pieces->wait();
  }
  if (pieces->error) std::rethrow_exception(pieces->error);
}

void set_cpu_threading(const std::string& mode) {
  TORCH_CHECK(mode == "auto" || mode == "idle" || mode == "busy",
              "_set_cpu_threading: mode must be 'auto' (look at the machine), 'idle' or 'busy', got '", mode, "'");
  assumed_machine = mode == "idle" ? Machine::kIdle : mode == "busy" ? Machine::kBusy : Machine::kLook;
}

}  // namespace rpn_ops::cpu
