"""The benchmark suite as a tool: its quickest run on the CPU writes every promised file, well-formed, and
--compare reports changes. (A test of the tool, not of speed.)"""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `benchmarks` is a folder of the checkout, not part of the installed package
    sys.path.insert(0, REPO_ROOT)

from benchmarks.cases import select  # noqa: E402
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_suite(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = run_suite("--quick", "--device", "cpu", "--budget", "0.02", "--repeat", "2", "--rotate", "2",
                     "--out", str(out), "--strict")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_quick_run_writes_a_complete_json_report(quick_run):
    out, _ = quick_run
    report = json.loads((out / "results.json").read_text())
    assert {"date", "cpu", "torch", "torchvision", "rpn_ops_build", "git_commit"} <= set(report["environment"])
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] is True
    expected = [w.name for w in select(quick=True)]
    assert [r["workload"] for r in report["results"]] == expected
    for result in report["results"]:
        assert result["size"] > 0 and result["size_unit"]
        for impl in ("ours", "torchvision"):
            timing = result["timings"][impl]
            assert timing["median_ms"] > 0 and timing["runs"] >= 1 and len(timing["samples_ms"]) == timing["runs"]
            assert timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]
            assert timing["peak_extra_mib"] is None or timing["peak_extra_mib"] >= 0
        assert result["parity"]["torchvision"] != "MISMATCH"
        assert result["speedup"]["torchvision"] > 0


def test_quick_run_writes_the_markdown_table_and_one_plot_per_op(quick_run):
    out, stdout = quick_run
    report = json.loads((out / "results.json").read_text())
    ops = sorted({r["op"] for r in report["results"]})
    assert sorted(report["plots"]) == sorted(f"plot-{op}.png" for op in ops)
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, name
    markdown = (out / "results.md").read_text()
    assert "| op " in markdown and "vs torchvision" in markdown and "peak MiB" in markdown
    assert all(f"({name})" in markdown for name in report["plots"])
    assert all(r["label"] in markdown for r in report["results"])
    assert "vs torchvision" in stdout and "results.json" in stdout


def test_compare_reports_no_change_against_itself_and_flags_a_regression(quick_run, tmp_path):
    out, _ = quick_run
    same = run_suite("--compare", str(out / "results.json"), str(out / "results.json"), "--strict")
    assert same.returncode == 0, same.stderr
    assert "+0.0%" in same.stdout and "0 slower by more than 10%" in same.stdout

    report = json.loads((out / "results.json").read_text())
    report["results"][0]["timings"]["ours"]["median_ms"] *= 2
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(report))
    flagged = run_suite("--compare", str(out / "results.json"), str(slower), "--strict")
    assert flagged.returncode == 1
    assert "!! slower" in flagged.stdout and "+100.0%" in flagged.stdout and "1 slower" in flagged.stdout


def test_compare_rejects_a_file_that_is_not_a_report(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[1, 2]")
    done = run_suite("--compare", str(bogus), str(bogus))
    assert done.returncode != 0 and "is not a benchmark report" in done.stderr


def test_the_readme_table_is_the_recorded_run_it_names():
    """The README's results table is exactly what `--readme-table` makes of the results.json it points to."""
    from benchmarks.compare import load, readme_table

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme[readme.index("## Measured results"):]
    folder = section.split("benchmarks/results/", 1)[1].split("/", 1)[0]
    report = load(os.path.join(REPO_ROOT, "benchmarks", "results", folder, "results.json"))
    assert readme_table(report) in section
    assert report["environment"]["cpu"] in section  # the README names the machine


def test_the_readme_busy_machine_table_is_the_two_recorded_runs_it_names():
    """The busy-machine table is what `--readme-table QUIET LOADED` makes of the two runs the section names, and
    the second one was timed next to busy processes."""
    from benchmarks.compare import load, readme_load_table

    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    section = readme[readme.index("### On a busy machine"):]
    quiet_folder, loaded_folder = [part.split("/", 1)[0] for part in section.split("benchmarks/results/")[1:3]]
    quiet, loaded = (load(os.path.join(REPO_ROOT, "benchmarks", "results", folder, "results.json"))
                     for folder in (quiet_folder, loaded_folder))
    assert loaded["settings"]["load"] >= 1 and not quiet["settings"].get("load")
    assert readme_load_table(quiet, loaded) in section


def test_replot_and_readme_table_read_a_recorded_run(quick_run, tmp_path):
    out, _ = quick_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    done = run_suite("--replot", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "results.json").read_text())
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    table = run_suite("--readme-table", str(tmp_path / "results.json"))
    assert table.returncode == 0 and table.stdout.count("\n") == len(report["results"]) + 2
