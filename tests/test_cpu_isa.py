"""CPU instruction sets: the hot loops are compiled per instruction set and chosen at run time; every one this
CPU supports gives the same answer, bit for bit. (The `restore_cpu_isa` fixture puts the original back.)"""
import os
import subprocess
import sys

import pytest
import torch

import rpn_ops
from helpers import special_boxes, tv_batched_nms_per_class, tv_nms
from rpn_ops import workloads

KNOWN_ISAS = ["baseline", "avx2", "avx512"]
SUPPORTED_ISAS = rpn_ops.build_info()["cpu_isas_supported"]


def test_baseline_is_always_supported_and_everything_supported_is_compiled():
    info = rpn_ops.build_info()
    assert "baseline" in SUPPORTED_ISAS
    assert set(SUPPORTED_ISAS) <= set(info["cpu_isas_compiled"]) <= set(KNOWN_ISAS)
    assert info["cpu_isa"] in SUPPORTED_ISAS


def test_auto_chooses_the_widest_supported_instruction_set():
    rpn_ops.set_cpu_isa("baseline")
    rpn_ops.set_cpu_isa("auto")
    assert rpn_ops.build_info()["cpu_isa"] == [isa for isa in KNOWN_ISAS if isa in SUPPORTED_ISAS][-1]


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_set_cpu_isa_is_reported_by_build_info(isa):
    rpn_ops.set_cpu_isa(isa)
    assert rpn_ops.build_info()["cpu_isa"] == isa


def test_unknown_instruction_set_is_rejected():
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        rpn_ops.set_cpu_isa("sse9")


def test_unsupported_instruction_set_is_rejected():
    unsupported = [isa for isa in KNOWN_ISAS if isa not in SUPPORTED_ISAS]
    if not unsupported:
        pytest.skip("this CPU supports every instruction set rpn_ops knows")
    before = rpn_ops.build_info()["cpu_isa"]
    with pytest.raises(ValueError, match=f"'{unsupported[0]}' is not compiled into this build or not supported"):
        rpn_ops.set_cpu_isa(unsupported[0])
    assert rpn_ops.build_info()["cpu_isa"] == before


def test_environment_variable_chooses_the_initial_instruction_set():
    code = "import torch, rpn_ops; print(rpn_ops.build_info()['cpu_isa'])"
    env = dict(os.environ, RPN_OPS_CPU_ISA="baseline")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(rpn_ops.__file__)),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "baseline"


def _inputs():
    """Realistic, tied, special and negative-threshold cases: every branch of the greedy loop."""
    boxes, scores = workloads.rpn_like_boxes(6000, seed=1)
    yield "rpn_like", boxes, scores, 0.7
    yield "tied", boxes, workloads.tied_scores(scores), 0.5
    special, special_scores = special_boxes("all_mixed", n=1500, seed=2)
    yield "special", special, special_scores, 0.5
    yield "special_negative_threshold", special, special_scores, -0.5
    yield "threshold_zero", boxes[:3000], scores[:3000], 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_every_instruction_set_gives_the_same_nms(isa, dtype):
    for name, boxes, scores, iou_threshold in _inputs():
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        expected = tv_nms(boxes, scores, iou_threshold)
        rpn_ops.set_cpu_isa(isa)
        got = rpn_ops.nms(boxes, scores, iou_threshold)
        assert torch.equal(got, expected), (isa, name)
        assert torch.equal(rpn_ops.nms(boxes, scores, iou_threshold, max_output=50), expected[:50]), (isa, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_every_instruction_set_gives_the_same_batched_nms(isa, dtype):
    for name, boxes, scores, iou_threshold in _inputs():
        boxes, scores = boxes.to(dtype), scores.to(dtype)
        idxs = workloads.categories(len(boxes), 17, seed=3)
        expected = tv_batched_nms_per_class(boxes, scores, idxs, iou_threshold)
        rpn_ops.set_cpu_isa(isa)
        got = rpn_ops.batched_nms(boxes, scores, idxs, iou_threshold)
        assert torch.equal(got, expected), (isa, name)
        assert torch.equal(rpn_ops.batched_nms(boxes, scores, idxs, iou_threshold, max_output=50), expected[:50]), \
            (isa, name)


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_every_instruction_set_handles_sizes_around_the_block_and_group_widths(isa):
    rpn_ops.set_cpu_isa(isa)
    for n in (1, 2, 15, 16, 17, 255, 256, 257, 4095, 4096, 4097):
        boxes, scores = workloads.rpn_like_boxes(n, seed=n, per_cluster=8)
        for iou_threshold in (-0.5, 0.5):
            assert torch.equal(rpn_ops.nms(boxes, scores, iou_threshold), tv_nms(boxes, scores, iou_threshold)), n
