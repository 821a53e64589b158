"""The package as users meet it: what the build reports, how it imports, what a failed load says."""
import concurrent.futures
import glob
import importlib.machinery
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rpn_ops
from helpers import needs_cuda
from rpn_ops import workloads

PACKAGE_DIR = os.path.dirname(os.path.abspath(rpn_ops.__file__))
PACKAGE_ROOT = os.path.dirname(PACKAGE_DIR)


def run_python(code, cwd, extra_path=()):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*extra_path, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_public_api():
    assert set(rpn_ops.__all__) >= {"nms", "batched_nms", "box_iou", "build_info", "set_cpu_isa", "AnchorGenerator",
                                    "BoxCoder", "cell_anchors", "grid_anchors", "decode_boxes", "encode_boxes",
                                    "match_anchors", "assign_targets", "BalancedPositiveNegativeSampler"}
    for name in ("nms", "batched_nms", "box_iou", "grid_anchors", "decode_boxes", "encode_boxes", "match_anchors",
                 "assign_targets"):
        assert hasattr(torch.ops.rpn_ops, name)
        assert callable(getattr(rpn_ops, name)) and getattr(rpn_ops, name).__doc__
    assert all(getattr(rpn_ops, name).__doc__
               for name in ("AnchorGenerator", "BoxCoder", "cell_anchors", "BalancedPositiveNegativeSampler"))


def _faster_rcnn_pair():
    """A randomly initialised torchvision Faster R-CNN and a copy whose anchor generator, box coders, target
    assignment and sampler are rpn_ops', configured from the original's."""
    import copy

    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=320, max_size=480).eval()
    swapped = copy.deepcopy(model)
    old = swapped.rpn.anchor_generator
    swapped.rpn.anchor_generator = rpn_ops.AnchorGenerator(old.sizes, old.aspect_ratios)
    swapped.rpn.box_coder = rpn_ops.BoxCoder(model.rpn.box_coder.weights, model.rpn.box_coder.bbox_xform_clip)
    swapped.roi_heads.box_coder = rpn_ops.BoxCoder(model.roi_heads.box_coder.weights,
                                                   model.roi_heads.box_coder.bbox_xform_clip)
    rpn, matcher = swapped.rpn, swapped.rpn.proposal_matcher  # the README's lines
    rpn.assign_targets_to_anchors = lambda anchors, targets: rpn_ops.assign_targets(
        anchors, targets, matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches)[:2]
    rpn.fg_bg_sampler = rpn_ops.BalancedPositiveNegativeSampler(rpn.fg_bg_sampler.batch_size_per_image,
                                                                rpn.fg_bg_sampler.positive_fraction)
    return model, swapped


def test_swapping_rpn_pieces_into_faster_rcnn_keeps_outputs_and_losses():
    model, swapped = _faster_rcnn_pair()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 300, 400, generator=g), torch.rand(3, 280, 350, generator=g)]
    with torch.no_grad():
        expected, got = model(images), swapped(images)
    for e, o in zip(expected, got):
        assert e.keys() == o.keys() and all(torch.equal(e[k], o[k]) for k in e)
    model.train(), swapped.train()
    for counts in [(3, 12), (0, 40)]:  # an image without ground truth, a crowded one
        targets = [{"boxes": workloads.gt_boxes(n, seed=n, image_size=(280, 350)).reshape(n, 4),
                    "labels": torch.randint(1, 91, (n,))} for n in counts]
        torch.manual_seed(2)
        expected_losses = model(images, targets)
        torch.manual_seed(2)
        got_losses = swapped(images, targets)
        assert expected_losses.keys() == got_losses.keys()
        for name in expected_losses:
            assert torch.equal(expected_losses[name], got_losses[name]), (counts, name)


def test_operator_schemas():
    assert str(torch.ops.rpn_ops.nms.default._schema) == (
        "rpn_ops::nms(Tensor boxes, Tensor scores, float iou_threshold, int? max_output=None) -> Tensor")
    assert str(torch.ops.rpn_ops.batched_nms.default._schema) == (
        "rpn_ops::batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, "
        "int? max_output=None) -> Tensor")
    assert str(torch.ops.rpn_ops.box_iou.default._schema) == "rpn_ops::box_iou(Tensor boxes1, Tensor boxes2) -> Tensor"


def test_build_info_reports_the_build():
    info = rpn_ops.build_info()
    assert {"cuda", "cuda_version", "cuda_archs", "built_with_torch", "cpu_isas_compiled", "cpu_isas_supported",
            "cpu_isa"} <= set(info)
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_version"], str) and isinstance(info["cuda_archs"], str)
    assert info["built_with_torch"] == torch.__version__
    assert info["cpu_isa"] in info["cpu_isas_supported"]
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"]
    else:
        assert info["cuda_version"] == "" and info["cuda_archs"] == ""


def test_build_info_is_a_fresh_dict():
    info = rpn_ops.build_info()
    info["cuda"] = "changed"
    assert rpn_ops.build_info()["cuda"] != "changed"


@needs_cuda
@pytest.mark.cuda
def test_cuda_kernels_are_built_where_cuda_is_available():
    """On a machine with a GPU the CUDA kernels must be in the build, for an arch this GPU can run."""
    info = rpn_ops.build_info()
    assert info["cuda"] is True
    assert info["cuda_version"]
    capability = torch.cuda.get_device_capability()
    archs = [(int(major), int(minor)) for major, minor in re.findall(r"(\d+)\.(\d+)", info["cuda_archs"])]
    assert archs and min(archs) <= capability, (info["cuda_archs"], capability)


def test_concurrent_calls_from_threads_give_the_sequential_results(device):
    inputs = []
    for seed in range(8):
        boxes, scores = workloads.rpn_like_boxes(3000, seed=seed, device=device)
        inputs.append((boxes, scores, workloads.categories(3000, 4, seed=seed, device=device)))

    def run(args):
        boxes, scores, idxs = args
        return (rpn_ops.nms(boxes, scores, 0.6).cpu(), rpn_ops.batched_nms(boxes, scores, idxs, 0.6, 500).cpu(),
                rpn_ops.box_iou(boxes[:50], boxes).cpu())

    sequential = [run(args) for args in inputs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        concurrent_results = list(pool.map(run, inputs * 3))
    for k, result in enumerate(concurrent_results):
        for got, expected in zip(result, sequential[k % len(inputs)]):
            assert torch.equal(got, expected), k


def test_import_without_importing_torch_first(tmp_path):
    """`import rpn_ops` is the first thing a user types: it must load torch's libraries itself."""
    result = run_python("import rpn_ops; print(rpn_ops.nms.__module__)", cwd=tmp_path, extra_path=[PACKAGE_ROOT])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rpn_ops.ops" in result.stdout


def test_a_failed_load_keeps_the_original_error(tmp_path):
    """A package whose compiled extension cannot load says so, and keeps the cause (here a corrupt library).

    The broken _C sits next to the package's own files, so it is found before any installed build (an
    editable install's finder would otherwise supply the real one)."""
    fake = tmp_path / "rpn_ops"
    fake.mkdir()
    for source in glob.glob(os.path.join(PACKAGE_DIR, "*.py")):
        shutil.copy(source, fake)
    (fake / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not a shared library")
    code = ("import torch\n"
            "try:\n"
            "    import rpn_ops\n"
            "except ImportError as error:\n"
            "    print('MESSAGE', error)\n"
            "    print('CAUSE', type(error.__cause__).__name__, error.__cause__)\n"
            "else:\n"
            "    raise SystemExit('imported a broken _C from ' + rpn_ops.__file__)\n")
    result = run_python(code, cwd=tmp_path, extra_path=[str(tmp_path)])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    message = result.stdout.split("CAUSE")[0]
    assert "rpn_ops could not load" in message
    assert "_C" in message and ("invalid ELF header" in message or "too short" in message)  # names the cause
    assert "CAUSE OSError" in result.stdout  # and chains it
