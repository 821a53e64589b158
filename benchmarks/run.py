"""Times rpn_ops against torchvision and the plain-PyTorch reference; checks that the answers agree.

    python -m benchmarks.run [--device auto|cpu|cuda] [--quick | --full] [--ops nms-20k,box_iou] [--load K]
                             [--repeat N] [--budget SECONDS] [--rotate K] [--out DIR] [--no-plots] [--strict]
    python -m benchmarks.run --compare OLD/results.json NEW/results.json [--threshold 0.1] [--strict]

Writes DIR/results.json (every sample and the environment), DIR/results.md and DIR/plot-<op>.png; prints the
table.
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

import rpn_ops
from benchmarks import compare
from benchmarks.cases import IMPLEMENTATIONS, parity, select
from benchmarks.plots import write_plots

REPO_ROOT = Path(__file__).resolve().parent.parent
WARMUP_CALLS = 3
ONE_THREAD = "ours_1_thread"  # ours with torch.set_num_threads(1), timed with --load
BUSY_LOOP = """
import os, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < deadline:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def busy_processes(count: int, max_seconds: float):
    """``count`` processes that keep a core busy each, as other work on a user's machine does. Each stops by
    itself after ``max_seconds`` or when this process is gone, and is killed when the block ends."""
    processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(os.getpid()), str(max_seconds)])
                 for _ in range(count)]
    try:
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def time_call(fn, inputs, device: torch.device):
    """(result, milliseconds) of one call; on CUDA, timed with events after the queue has drained."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = fn(*inputs)
        return result, (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn(*inputs)
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end)


def measure(fn, input_sets, device, repeat: int, budget_s: float, min_runs: int = 1):
    """(result of the first call, samples in ms). Up to WARMUP_CALLS untimed calls, then timed calls until
    ``repeat`` samples or ``budget_s`` seconds of samples. Successive calls take the input sets in turn (equal
    values, separate memory), so a call does not find its inputs in cache just because the previous call read
    them. A first call longer than the whole budget is the one sample (warm-up effects are negligible next to
    it, and the full suite stays minutes long), unless ``min_runs`` > 1: then it is a warm-up and ``min_runs``
    timed calls follow (whole-model steps, where one noisy sample could hide a small difference)."""
    budget_ms = budget_s * 1e3
    calls = 0

    def timed():
        nonlocal calls
        calls += 1
        return time_call(fn, input_sets[(calls - 1) % len(input_sets)], device)

    result, first_ms = timed()
    if first_ms >= budget_ms and min_runs <= 1:
        return result, [first_ms]
    warmup_ms = first_ms
    while calls < WARMUP_CALLS and warmup_ms < budget_ms / 4:
        warmup_ms += timed()[1]
    samples = []
    while len(samples) < max(1, min_runs, repeat) and (len(samples) < min_runs or sum(samples) < budget_ms):
        samples.append(timed()[1])
    return result, samples


def _proc_status_kib(field: str):
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def _release_free_memory():
    """Hands the C library's free memory back to the system, so that what a call allocates shows up as new
    resident memory instead of being served from pages already counted."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn, inputs, device):
    """Memory one call needs beyond what was in use before it, in MiB, output included. CUDA: the peak of
    torch's allocator. CPU (Linux): the peak resident memory of the process (VmHWM, reset first), so buffers
    inside the kernels count too (the C library's free memory is released first; what it still reuses is not
    seen, so small figures are lower bounds). None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = fn(*inputs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del output
        return peak / 2**20
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident size
    except OSError:
        return None
    before = _proc_status_kib("VmRSS")
    output = fn(*inputs)
    peak = _proc_status_kib("VmHWM")
    del output
    return None if before is None or peak is None else max(0, peak - before) / 1024


def summary(samples):
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return dict(median_ms=statistics.median(samples), min_ms=min(samples), q1_ms=q1, q3_ms=q3,
                max_ms=max(samples), runs=len(samples), samples_ms=samples)


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_workload(workload, device, repeat, budget_s, rotate=1, progress=None, one_thread_too=False):
    """Times every implementation of ``workload``; with ``one_thread_too`` also ours with one torch thread
    (timings["ours_1_thread"]), which shows what the threads give, or cost on a busy machine."""
    input_sets = [workload.make_inputs(device) for _ in range(max(1, rotate))]
    inputs = input_sets[0]
    outputs, timings = {}, {}
    runs = [(impl, getattr(workload, impl), contextlib.nullcontext) for impl in IMPLEMENTATIONS]
    if one_thread_too:
        runs.insert(1, (ONE_THREAD, workload.ours, lambda: torch_threads(1)))
    for impl, fn, threads in runs:
        if fn is None:
            timings[impl] = None
            continue
        if progress:
            progress.step(f"{workload.name}: {impl}")
        try:
            with threads():
                outputs[impl], samples = measure(fn, input_sets, device, repeat, budget_s, workload.min_runs)
                peak = peak_extra_mib(fn, inputs, device) if samples[0] < budget_s * 1e3 else None
        except Exception as error:  # an op missing on this device must not stop the suite
            timings[impl] = dict(error=f"{type(error).__name__}: {error}")
            continue
        timings[impl] = summary(samples)
        timings[impl]["peak_extra_mib"] = peak
    checks, speedups = {}, {}
    for other in ("torchvision", "reference", ONE_THREAD):
        if "ours" in outputs and other in outputs:
            checks[other] = parity(workload, outputs["ours"], outputs[other], inputs)
            if checks[other] != "MISMATCH":
                speedups[other] = timings[other]["median_ms"] / timings["ours"]["median_ms"]
    return dict(workload=workload.name, op=workload.op, label=workload.label, params=workload.params,
                size=workload.size, size_unit=workload.size_unit, series=workload.series,
                device=str(device), output_shape=_shape(outputs.get("ours")),
                timings=timings, parity=checks, speedup=speedups)


def _shape(output):
    """The output's shape; for a list of tensors (per-image outputs), the list of their shapes."""
    if output is None:
        return None
    if isinstance(output, (list, tuple)):
        return [list(t.shape) for t in output]
    return list(output.shape)


def environment(device):
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    cuda = device.type == "cuda"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        hostname=platform.node(), platform=platform.platform(), python=platform.python_version(),
        cpu=cpu_model(), cpu_count=os.cpu_count(), load_average=load_average(),
        torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
        torch=torch.__version__, torchvision=torchvision.__version__, torch_cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        gpu_capability=".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        rpn_ops=rpn_ops.__version__, rpn_ops_path=str(Path(rpn_ops.__file__).parent),
        rpn_ops_build=rpn_ops.build_info(),
        git_commit=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
    )


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None  # other work on the machine skews timings


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or None


def table(rows, header):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _ms(timing):
    if timing is None:
        return "-"
    return "error" if "error" in timing else f"{timing['median_ms']:.3g}" if timing["median_ms"] < 100 \
        else f"{timing['median_ms']:.0f}"


def _mib(timing):
    if not timing or timing.get("peak_extra_mib") is None:
        return "-"
    return f"{timing['peak_extra_mib']:.3g}"


def _speedup(result, other):
    if other in result["speedup"]:
        return f"{result['speedup'][other]:.1f}x"
    return "WRONG" if result["parity"].get(other) == "MISMATCH" else "-"


def _parity(result):
    return ", ".join(f"{other.replace('_', ' ')} {check}" for other, check in result["parity"].items()) \
        or "not checked"


def summary_table(results):
    one_thread = any(r["timings"].get(ONE_THREAD) for r in results)
    header = ["op", "workload", "device", "ours ms", *(["ours 1 thread ms"] if one_thread else []), "torchvision ms",
              "reference ms", "vs torchvision", "vs reference", *(["vs 1 thread"] if one_thread else []),
              "ours peak MiB", "torchvision peak MiB", "parity"]
    rows = [[r["op"], r["label"], r["device"], _ms(r["timings"]["ours"]),
             *([_ms(r["timings"].get(ONE_THREAD))] if one_thread else []),
             _ms(r["timings"]["torchvision"]), _ms(r["timings"]["reference"]), _speedup(r, "torchvision"),
             _speedup(r, "reference"), *([_speedup(r, ONE_THREAD)] if one_thread else []),
             _mib(r["timings"]["ours"]), _mib(r["timings"]["torchvision"]),
             ("!! " if "MISMATCH" in r["parity"].values() else "") + _parity(r)] for r in results]
    return table(rows, header)


def detail_table(results):
    header = ["workload", "implementation", "median ms", "min ms", "q1 ms", "q3 ms", "max ms", "runs"]
    rows = [[r["workload"], impl, *(f"{t[key]:.4g}" for key in ("median_ms", "min_ms", "q1_ms", "q3_ms", "max_ms")),
             t["runs"]]
            for r in results for impl, t in r["timings"].items() if t and "error" not in t]
    errors = [f"- {r['workload']} {impl}: {t['error']}" for r in results for impl, t in r["timings"].items()
              if t and "error" in t]
    return table(rows, header) + ("\n\nErrors:\n" + "\n".join(errors) if errors else "")


def _load(averages):
    return f"{averages[0]:.1f}" if averages else "?"


def markdown(report):
    env, settings = report["environment"], report["settings"]
    build = env["rpn_ops_build"]
    machine = env["gpu"] or f"{env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads"
    return "\n\n".join([
        f"# rpn_ops benchmarks: {settings['device']}",
        f"{machine}; torch {env['torch']}, torchvision {env['torchvision']}, CUDA {env['torch_cuda']}; "
        f"rpn_ops {env['rpn_ops']} (cpu_isa {build.get('cpu_isa')}, cuda {build.get('cuda')}), "
        f"commit {(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}; {env['date']}; "
        f"load average {_load(env['load_average'])} before, {_load(settings.get('load_average_after'))} after"
        + (f"; timed next to {settings['load']} busy processes (--load)" if settings.get("load") else ""),
        "Medians in milliseconds; speedup = their median / ours, given only where the outputs agree (vs 1 thread: "
        "ours with one torch thread / ours with the default count); peak MiB = memory one call needs beyond what "
        "was in use before it (output included; CPU: resident memory).",
        summary_table(report["results"]),
        *[f"![{Path(plot).stem}]({Path(plot).name})" for plot in report.get("plots", [])],
        "## Samples",
        detail_table(report["results"]),
    ]) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ladder = parser.add_mutually_exclusive_group()
    ladder.add_argument("--quick", action="store_true", help="the small ladder (CI, smoke tests)")
    ladder.add_argument("--full", action="store_true", help="the whole ladder: 100k boxes, batch 8, 500 GT boxes, "
                        "whole-model steps (the default run keeps the most telling rows)")
    parser.add_argument("--ops", help="comma-separated substrings of workload names, e.g. nms-20k,box_iou")
    parser.add_argument("--repeat", type=int, default=30, help="most timed calls per implementation")
    parser.add_argument("--budget", type=float, help="seconds of timed calls per implementation and workload "
                        "(default 2, 0.5 with --quick); a slower first call is the only sample")
    parser.add_argument("--load", type=int, default=0, metavar="K",
                        help="time next to K busy processes (other work on the machine), and time ours with one "
                        "torch thread too")
    parser.add_argument("--rotate", type=int, default=3, help="input sets (equal values, separate memory) that "
                        "successive calls take in turn, so caches do not flatter repeated calls (default 3)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for results.json, results.md and the plots")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 if an output differs or an op fails (with --compare: if a workload is slower)")
    parser.add_argument("--list", action="store_true", help="list the selected workloads and exit")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                        help="compare two results.json files instead of running")
    parser.add_argument("--readme-table", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="print the README's results table for a results.json and exit; given a quiet run "
                        "and a --load run, the README's busy-machine table of the two")
    parser.add_argument("--replot", type=Path, metavar="RESULTS_JSON",
                        help="redraw the plots of a results.json next to it and exit")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="with --compare: a change beyond this fraction is reported (default 0.1)")
    args = parser.parse_args(argv)
    if args.load < 0:
        parser.error(f"--load: a number of busy processes, 0 or more; got {args.load}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    args.budget = args.budget if args.budget is not None else 0.5 if args.quick else 2.0
    return args


class Progress:
    """A one-line progress bar on a terminal (a line per step otherwise), with the elapsed time."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.tty = sys.stdout.isatty()

    def step(self, what: str):
        self.done += 1
        width = 30
        filled = int(width * (self.done - 1) / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        text = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.started:5.0f} s  {what}"
        print(f"\r{text[:110]:<110}" if self.tty else text, end="" if self.tty else "\n", flush=True)

    def finish(self):
        if self.tty:
            print(f"\r{'':<110}\r", end="", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        for path in write_plots(compare.load(args.replot), args.replot.parent):
            print(f"wrote {path}")
        return 0
    if args.readme_table:
        reports = [compare.load(path) for path in args.readme_table]
        if len(reports) > 2 or len(reports) == 2 and not reports[1]["settings"].get("load"):
            raise SystemExit("--readme-table: a results.json, or a quiet run's and a --load run's")
        print(compare.readme_table(reports[0]) if len(reports) == 1 else compare.readme_load_table(*reports))
        return 0
    if args.compare:
        text, regressions = compare.report_text(*args.compare, args.threshold, table)
        print(text)
        return 1 if regressions and args.strict else 0
    device = torch.device("cuda" if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
                          else "cpu")
    workloads = select(args.ops, args.quick, device.type, full=args.full)
    if args.list or not workloads:
        print("\n".join(f"{w.name}: {w.op}, {w.label}" for w in workloads) or "no workload matches --ops")
        return 0
    report = dict(environment=environment(device),
                  settings=dict(device=str(device), quick=args.quick, full=args.full, ops=args.ops,
                                repeat=args.repeat, budget_s=args.budget, warmup_calls=WARMUP_CALLS, load=args.load),
                  results=[])
    report["settings"]["rotate"] = args.rotate
    started = time.perf_counter()
    progress = Progress(sum(1 for w in workloads for impl in IMPLEMENTATIONS if getattr(w, impl) is not None)
                        + (len(workloads) if args.load else 0))
    try:
        with busy_processes(args.load, max_seconds=4 * 3600):
            for workload in workloads:
                report["results"].append(run_workload(workload, device, args.repeat, args.budget, args.rotate,
                                                      progress, one_thread_too=args.load > 0))
                mismatch = "MISMATCH" in report["results"][-1]["parity"].values()
                if mismatch or not progress.tty:
                    print(f"{'!! ' if mismatch else ''}{workload.name}: {_parity(report['results'][-1])}", flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit (.ci/gpu): keep the workloads measured so far
        report["settings"]["interrupted"] = True
        print(f"\ninterrupted: {len(report['results'])} of {len(workloads)} workloads measured", flush=True)
    progress.finish()
    report["settings"].update(wall_s=time.perf_counter() - started, load_average_after=load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    report["plots"] = [] if args.no_plots else [p.name for p in write_plots(report, args.out)]
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print()
    print(summary_table(report["results"]))
    written = ["results.json", "results.md", *report["plots"]]
    print(f"\n{len(report['results'])} workloads in {report['settings']['wall_s']:.0f} s; wrote "
          + ", ".join(f"{args.out}/{name}" for name in written))
    failed = any("MISMATCH" in r["parity"].values() or any(t and "error" in t for t in r["timings"].values())
                 for r in report["results"])
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
