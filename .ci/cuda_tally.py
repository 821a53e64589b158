"""pytest plugin of the GPU check (.ci/gpu, `-p cuda_tally`): how many CUDA tests ran, failed and were skipped,
and why they were skipped, written as JSON to the file named by $CUDA_TALLY_JSON.

A CUDA test is one marked `cuda` (the `device` fixture's CUDA case), one skipped unless CUDA is available
(`helpers.needs_cuda`), or one that skips itself with a reason naming CUDA or a GPU.
"""
import json
import os
import re
from collections import Counter

import pytest

NAMES_A_GPU = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)
OUTCOME_RANK = {"passed": 0, "skipped": 1, "failed": 2}  # a test's outcome is the worst of its phases


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if any(NAMES_A_GPU.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif")):
            item.add_marker("cuda")  # lands in report.keywords, which xdist sends back from its workers


class Tally:
    def __init__(self, path):
        self.path = path
        self.outcomes = {}  # node id -> (outcome, is a CUDA test, skip reason)

    def pytest_runtest_logreport(self, report):
        if report.passed and report.when != "call":
            return  # a passed setup or teardown is no test run (an interrupted test gets no call report)
        outcome = "failed" if report.failed else report.outcome
        reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
        cuda = "cuda" in report.keywords or bool(NAMES_A_GPU.search(reason))
        previous = self.outcomes.get(report.nodeid)
        if previous is None or OUTCOME_RANK[outcome] > OUTCOME_RANK[previous[0]]:
            self.outcomes[report.nodeid] = (outcome, cuda or bool(previous and previous[1]), reason)

    def pytest_sessionfinish(self):
        everything = Counter(outcome for outcome, _, _ in self.outcomes.values())
        cuda = Counter(outcome for outcome, is_cuda, _ in self.outcomes.values() if is_cuda)
        reasons = Counter(reason.removeprefix("Skipped: ")
                          for outcome, is_cuda, reason in self.outcomes.values() if is_cuda and outcome == "skipped")
        tally = dict(
            tests=dict(everything, total=len(self.outcomes)),
            cuda=dict(ran=cuda["passed"] + cuda["failed"], passed=cuda["passed"], failed=cuda["failed"],
                      skipped=cuda["skipped"], skip_reasons=dict(reasons.most_common(10))),
            failed=sorted(node for node, (outcome, _, _) in self.outcomes.items() if outcome == "failed"),
        )
        with open(self.path, "w") as out:
            json.dump(tally, out, indent=1)


def pytest_configure(config):
    if os.environ.get("CUDA_TALLY_JSON") and not hasattr(config, "workerinput"):  # the xdist controller, or no xdist
        config.pluginmanager.register(Tally(os.environ["CUDA_TALLY_JSON"]), "cuda_tally_writer")
