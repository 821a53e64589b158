// Threads for the CPU kernels that do not stall on a busy machine.
//
// at::parallel_for (OpenMP here) splits a range evenly over all its threads and returns when every one of them
// has finished its share. On a machine whose cores are busy with other work, a thread that has no core waits
// for one (a scheduler tick or more) before it starts its share, while the others spin at the end-of-region
// barrier. Measured on 2 cores next to 2 busy processes: an NMS of 5k boxes, 0.8 ms on one thread, took 7-16 ms
// on two; decode of 2 x 243k boxes 48 ms instead of 11.
//
// parallel_for below cuts the work into pieces of about kPieceNanoseconds (from each kernel's measured cost per
// item), which threads claim one at a time, so threads that start late find less to do. Small work (one
// piece) stays on the calling thread. Then it looks at the machine (cores_are_busy, parallel.cpp):
//  - cores idle: at::parallel_for's threads claim the pieces. They wait for work spinning and start at once;
//  - cores busy: the calling thread claims pieces together with helpers from torch's inter-op pool (threads
//    that sleep rather than spin) and waits only for pieces a helper has started, never for a helper that has
//    not shown up: without a free core it does all the work. Work of fewer than kBusySharingPieces pieces runs
//    on the calling thread: there a helper's late start or a wait costs more than it saves.
// A call inside a parallel region or inside a piece runs serially. Tests force either path with
// torch.ops.rpn_ops._set_cpu_threading("idle" | "busy" | "auto").
#pragma once

#include <c10/util/FunctionRef.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace rpn_ops::cpu {

// Work per piece: long enough that waking a helper (about 10-50 us) pays for itself, short enough to balance.
constexpr double kPieceNanoseconds = 100'000;

// Under load, the fewest pieces worth sharing with helpers (2 ms of work). A thread that waits for another on a
// busy machine may lose its core for a scheduler slice (measured: 4-8 ms here), so short work stays on the
// calling thread: box_iou of 2000 x 2000 boxes (16 pieces, 1.2 ms alone) took 2.6 ms shared.
constexpr int64_t kBusySharingPieces = 20;

// Items per piece for items costing ns_per_item each (measured single-threaded on the kernels' own loops),
// rounded up to a multiple of `multiple` (a kernel's inner chunk).
constexpr int64_t grain_for(double ns_per_item, int64_t multiple = 1) {
  const int64_t items = std::max<int64_t>(1, static_cast<int64_t>(kPieceNanoseconds / ns_per_item));
  return (items + multiple - 1) / multiple * multiple;
}

// Tasks per piece for `tasks` tasks of uneven cost that take about total_ns together: pieces of about
// kPieceNanoseconds on average.
constexpr int64_t grain_for_tasks(int64_t tasks, double total_ns) {
  const double pieces = std::max(1.0, total_ns / kPieceNanoseconds);
  return std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(tasks) / pieces));
}

// body(begin, end) over [0, count), in pieces of `grain` items (the last may be shorter), as described above.
// The first exception of a piece is rethrown here, after every started piece has finished; pieces not started
// yet are skipped.
void parallel_for(int64_t count, int64_t grain, c10::function_ref<void(int64_t, int64_t)> body);

// "auto" (look at the machine), or "idle" / "busy" to take that path whatever the machine: for tests.
void set_cpu_threading(const std::string& mode);

}  // namespace rpn_ops::cpu
