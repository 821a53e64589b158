"""Compare two benchmark reports (results.json): the change of our median per workload, and of the speedup
against torchvision, so a regression is visible.

    python -m benchmarks.run --compare OLD/results.json NEW/results.json [--threshold 0.1] [--strict]
"""
import json
from pathlib import Path
from typing import List, Tuple

from benchmarks.plots import machine_name


def load(path: Path) -> dict:
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict) or "results" not in report or "environment" not in report:
        raise ValueError(f"{path} is not a benchmark report (results.json of `python -m benchmarks.run`)")
    return report


def _median(result: dict, impl: str):
    timing = result["timings"].get(impl)
    return timing.get("median_ms") if timing else None


def compare(old: dict, new: dict, threshold: float) -> Tuple[List[List[str]], int]:
    """Rows (op, workload, device, old ms, new ms, change, old and new speedup vs torchvision, verdict) for
    the workloads in both reports, and the number of regressions (ours slower by more than ``threshold``)."""
    old_results = {(r["workload"], r["device"]): r for r in old["results"]}
    rows, regressions = [], 0
    for r in new["results"]:
        before = old_results.get((r["workload"], r["device"]))
        if before is None:
            continue
        old_ms, new_ms = _median(before, "ours"), _median(r, "ours")
        if old_ms is None or new_ms is None:
            change, verdict = "-", "not comparable"
        else:
            ratio = new_ms / old_ms
            change = f"{(ratio - 1) * 100:+.1f}%"
            verdict = "!! slower" if ratio > 1 + threshold else "faster" if ratio < 1 - threshold else "same"
            regressions += ratio > 1 + threshold
        speedups = [f"{x['speedup']['torchvision']:.1f}x" if "torchvision" in x.get("speedup", {}) else "-"
                    for x in (before, r)]
        rows.append([r["op"], r["label"], r["device"], _fmt(old_ms), _fmt(new_ms), change, *speedups, verdict])
    return rows, regressions


def _fmt(ms):
    return "-" if ms is None else f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def report_text(old_path: Path, new_path: Path, threshold: float, table) -> Tuple[str, int]:
    old, new = load(old_path), load(new_path)
    rows, regressions = compare(old, new, threshold)
    header = ["op", "workload", "device", "old ms", "new ms", "change", "old vs torchvision", "new vs torchvision",
              "verdict"]
    lines = [f"old: {old_path} ({machine_name(old['environment'])}, {old['environment'].get('date')})",
             f"new: {new_path} ({machine_name(new['environment'])}, {new['environment'].get('date')})"]
    if machine_name(old["environment"]) != machine_name(new["environment"]):
        lines.append("note: different machines; the change mixes code and machine")
    lines += ["", table(rows, header) if rows else "no workload in common", "",
              f"{len(rows)} workloads compared; {regressions} slower by more than {threshold:.0%}"]
    return "\n".join(lines), regressions


def _readme_ms(result, impl: str) -> str:
    """A median as the README's tables print it ("-" where it was not measured)."""
    median = None if result is None else _median(result, impl)
    return "-" if median is None else f"{median:.3g}" if median < 10 else f"{median:.1f}" if median < 100 \
        else f"{median:.0f}"


def readme_table(report: dict) -> str:
    """The README's results table for a report: op, workload, the three medians and the speedup."""
    rows = ["| op | workload | rpn_ops ms | torchvision ms | plain PyTorch ms | speedup vs torchvision |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        speedup = r.get("speedup", {}).get("torchvision")
        rows.append(f"| {r['op']} | {r['label']} | {_readme_ms(r, 'ours')} | {_readme_ms(r, 'torchvision')} | "
                    f"{_readme_ms(r, 'reference')} | "
                    + (f"**{speedup:.1f}x** |" if speedup else "- |"))
    return "\n".join(rows)


def readme_load_table(quiet: dict, loaded: dict) -> str:
    """The README's busy-machine table: per workload of the ``--load`` run, ours and torchvision on the quiet
    machine, then ours (default threads and one thread) and torchvision next to the busy processes."""
    def ratio(result, other):
        value = None if result is None else result.get("speedup", {}).get(other)
        return "-" if value is None else f"{value:.1f}x"

    load = loaded["settings"].get("load")
    quiet_results = {(r["workload"], r["device"]): r for r in quiet["results"]}
    rows = [f"| op | workload | quiet: rpn_ops ms | quiet: torchvision ms | {load} busy: rpn_ops ms | "
            f"{load} busy: rpn_ops 1 thread ms | {load} busy: torchvision ms | busy: vs torchvision | "
            "busy: 1 thread / default |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in loaded["results"]:
        q = quiet_results.get((r["workload"], r["device"]))
        rows.append(f"| {r['op']} | {r['label']} | {_readme_ms(q, 'ours')} | {_readme_ms(q, 'torchvision')} | "
                    f"{_readme_ms(r, 'ours')} | {_readme_ms(r, 'ours_1_thread')} | {_readme_ms(r, 'torchvision')} | "
                    f"{ratio(r, 'torchvision')} | "
                    f"{ratio(r, 'ours_1_thread')} |")
    return "\n".join(rows)
