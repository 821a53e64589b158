"""PNG plots of a benchmark report: per op, median time against problem size (log-log), ours against
torchvision and the plain-PyTorch reference, one line per series (e.g. class count) and implementation."""
from collections import defaultdict
from pathlib import Path
from typing import List

STYLE = {"ours": ("rpn_ops", "tab:blue"), "torchvision": ("torchvision", "tab:orange"),
         "reference": ("plain PyTorch", "tab:gray")}
SERIES_LINES = ["-", "--", ":", "-."]


def machine_name(environment: dict) -> str:
    return environment.get("gpu") or f"{environment.get('cpu')}, {environment.get('torch_threads')} threads"


def write_plots(report: dict, out_dir: Path) -> List[Path]:
    """One ``plot-<op>.png`` per op of the report, in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")  # 20,000, not 2x10^4

    by_op = defaultdict(list)
    for result in report["results"]:
        if result.get("size"):
            by_op[result["op"]].append(result)
    paths = []
    for op, results in by_op.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        series_names = sorted({r.get("series", "") for r in results})
        for line, series in zip(SERIES_LINES * 4, series_names):
            members = sorted((r for r in results if r.get("series", "") == series), key=lambda r: r["size"])
            for impl, (name, color) in STYLE.items():
                points = [(r["size"], r["timings"][impl]["median_ms"]) for r in members
                          if r["timings"].get(impl) and "median_ms" in r["timings"][impl]]
                if not points:
                    continue
                xs, ys = zip(*points)
                label = f"{name}, {series}" if series else name
                ax.plot(xs, ys, line, marker="o", color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["size"] for r in results}))  # the measured sizes, labelled in full
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))
        ax.set_xlabel(f"problem size ({results[0].get('size_unit') or 'items'}, log scale)")
        ax.set_ylabel("median time per call (ms, log scale)")
        ax.set_title(f"{op} on {report['settings']['device']}: {machine_name(report['environment'])}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / f"plot-{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
