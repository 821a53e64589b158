"""Target assignment: match_anchors equals torchvision's Matcher(box_iou(gt, anchors)) index for index,
assign_targets equals RegionProposalNetwork.assign_targets_to_anchors + box_coder.encode bit for bit, on random
and adversarial scenes, every dtype, batches of images with different ground-truth counts; CUDA equals CPU;
the memory stays O(anchors + ground truth); non-finite boxes are refused (the other bad input: test_bad_input.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import rpn_ops
from conftest import REPO_ROOT
from helpers import FLOAT_DTYPES, HALF_DTYPES, compiles, cpu_kernels, needs_cuda, non_contiguous
from rpn_ops import reference, workloads

SMALL_IMAGE = (320, 416)  # 33 255 FPN anchors: big enough for every code path, small enough for torchvision
SUPPORTED_ISAS = rpn_ops.build_info()["cpu_isas_supported"]


# ---------------------------------------------------------------------------------------------------------
# Scenes and torchvision's answers
# ---------------------------------------------------------------------------------------------------------

def fpn_anchors(num_images=1, image_size=SMALL_IMAGE, dtype=torch.float32, device="cpu"):
    images, features = workloads.fpn_batch(num_images, image_size, device=device)
    generator = TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)
    return [a.to(dtype) for a in generator(images, features)]


def _tied_pairs(anchors, count, g):
    """Pairs of boxes shifted by +-d from an anchor: exactly equal IoU with it (integer coordinates)."""
    picked = anchors[torch.randint(0, len(anchors), (count,), generator=g)]
    shift = torch.randint(1, 12, (count, 1), generator=g).float() * torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    return torch.stack([picked + shift, picked - shift], 1).reshape(-1, 4)


def scene(kind, anchors, seed=0, image_size=SMALL_IMAGE):
    """Ground-truth boxes of one image: `kind` names what makes the scene hard."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return workloads.gt_boxes(12, seed=seed, image_size=image_size)
    if kind == "single":
        return workloads.gt_boxes(1, seed=seed, image_size=image_size)
    if kind == "crowded":  # hundreds of boxes, a third of them exact duplicates
        base = workloads.gt_boxes(200, seed=seed, image_size=image_size)
        boxes = torch.cat([base, base[torch.randint(0, 200, (100,), generator=g)]])
        return boxes[torch.randperm(len(boxes), generator=g)]
    if kind == "ties":  # boxes tying for an anchor, and duplicates tying everywhere
        return torch.cat([_tied_pairs(anchors, 40, g), workloads.gt_boxes(10, seed=seed, image_size=image_size)])
    if kind == "tiny":  # smaller than every anchor: only low-quality matches
        corner = torch.rand(30, 2, generator=g) * torch.tensor([image_size[1] - 4.0, image_size[0] - 4.0])
        return torch.cat([corner, corner + 1 + 3 * torch.rand(30, 2, generator=g)], 1)
    if kind == "degenerate":  # zero area, inverted, far from every anchor, larger than the image
        normal = workloads.gt_boxes(8, seed=seed, image_size=image_size)
        point, line = normal[:2].clone(), normal[2:4].clone()
        point[:, 2:] = point[:, :2]
        line[:, 3] = line[:, 1]
        inverted = normal[4:6][:, [2, 3, 0, 1]]
        far_away = normal[6:7] - 10_000
        huge = torch.tensor([[-500.0, -400.0, 2000.0, 1500.0]])
        return torch.cat([normal, point, line, inverted, far_away, huge, normal[:1]])
    raise ValueError(kind)


SCENES = ["random", "single", "crowded", "ties", "tiny", "degenerate"]


def with_degenerate_anchors(anchors, seed=0):
    """A copy of the anchors where about 2% are points, lines or inverted: 0 / 0 = NaN IoUs with point boxes."""
    g = torch.Generator().manual_seed(seed)
    out = anchors.clone()
    rows = torch.randperm(len(out), generator=g)[: len(out) // 50]
    thirds = torch.chunk(rows, 3)
    out[thirds[0], 2:] = out[thirds[0], :2]
    out[thirds[1], 3] = out[thirds[1], 1]
    out[thirds[2]] = out[thirds[2]][:, [2, 3, 0, 1]]
    return out


def tv_match(gt, anchors, high=0.7, low=0.3, allow=True):
    return det_utils.Matcher(high, low, allow)(torchvision.ops.box_iou(gt, anchors))


def tv_rpn(fg=0.7, bg=0.3, allow=True, weights=(1.0, 1.0, 1.0, 1.0)):
    rpn = RegionProposalNetwork(TorchvisionAnchorGenerator(), RPNHead(1, 3), fg, bg, 256, 0.5,
                                dict(training=2000, testing=1000), dict(training=2000, testing=1000), 0.7)
    rpn.proposal_matcher.allow_low_quality_matches = allow
    rpn.box_coder = det_utils.BoxCoder(weights)
    return rpn


def tv_assign(anchors, gt_boxes, fg=0.7, bg=0.3, allow=True, weights=(1.0, 1.0, 1.0, 1.0)):
    rpn = tv_rpn(fg, bg, allow, weights)
    labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": g} for g in gt_boxes])
    return labels, matched, list(rpn.box_coder.encode(matched, anchors))


def assert_same_matches(got, expected):
    assert got.dtype == torch.int64 and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    differ = torch.nonzero(got.cpu() != expected.cpu()).flatten()
    assert len(differ) == 0, (f"{len(differ)} of {len(got)} anchors differ, e.g. anchor {differ[0].item()}: got "
                              f"{got[differ[0]].item()}, expected {expected[differ[0]].item()}")


def assert_bits_equal(got, expected):
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def assert_same_targets(got, expected):
    for name, got_list, expected_list in zip(("labels", "matched_gt_boxes", "regression_targets"), got, expected):
        assert len(got_list) == len(expected_list), name
        for image, (a, b) in enumerate(zip(got_list, expected_list)):
            try:
                assert_bits_equal(a, b)
            except AssertionError as error:
                raise AssertionError(f"{name} of image {image}: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# match_anchors
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SCENES)
@pytest.mark.parametrize("allow", [True, False])
def test_match_anchors_equals_torchvision(device, kind, allow):
    anchors = fpn_anchors(device=device)[0]
    gt = scene(kind, anchors.cpu(), seed=SCENES.index(kind)).to(device)
    assert_same_matches(rpn_ops.match_anchors(gt, anchors, 0.7, 0.3, allow), tv_match(gt, anchors, 0.7, 0.3, allow))


@pytest.mark.parametrize("kind", ["random", "ties", "degenerate"])
def test_match_anchors_with_nan_ious_equals_torchvision(device, kind):
    """Point anchors against point boxes: IoU 0 / 0 = NaN, which torch.max takes as the largest value."""
    anchors = with_degenerate_anchors(fpn_anchors()[0], seed=3)
    gt = scene(kind, anchors, seed=4)
    anchors[:5] = gt[:5]  # some anchors equal to the boxes, degenerate ones included
    expected = tv_match(gt, anchors)
    assert torch.isnan(torchvision.ops.box_iou(gt, anchors)).any() or kind != "degenerate"
    assert_same_matches(rpn_ops.match_anchors(gt.to(device), anchors.to(device)), expected)


def test_match_anchors_covers_every_outcome():
    """The scenes reach every branch of the decision: a test of the tests."""
    anchors = fpn_anchors()[0]
    outcomes = set()
    for kind in SCENES:
        gt = scene(kind, anchors, seed=SCENES.index(kind))
        with_low, without_low = tv_match(gt, anchors, allow=True), tv_match(gt, anchors, allow=False)
        outcomes |= {"background" if (with_low == -1).any() else None, "between" if (with_low == -2).any() else None,
                     "low-quality" if ((with_low >= 0) & (without_low < 0)).any() else None}
        if (torchvision.ops.box_iou(gt, anchors).max(dim=1).values == 0).any():
            outcomes.add("box overlapping no anchor")  # its highest IoU, 0, makes every 0-IoU anchor a match
    assert outcomes >= {"background", "between", "low-quality", "box overlapping no anchor"}, outcomes
    # ties for an anchor do occur in the "ties" scene, and are broken towards the lower index
    gt = scene("ties", anchors, seed=SCENES.index("ties"))
    iou = torchvision.ops.box_iou(gt, anchors)
    assert ((iou == iou.max(dim=0).values).sum(dim=0) > 1).any()


@pytest.mark.parametrize("high, low", [(0.7, 0.3), (0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.3, 0.1), (1.5, 1.2)])
def test_match_anchors_thresholds_equal_torchvision(device, high, low):
    anchors = fpn_anchors(device=device)[0]
    gt = scene("ties", anchors.cpu(), seed=7).to(device)
    for allow in (True, False):
        assert_same_matches(rpn_ops.match_anchors(gt, anchors, high, low, allow), tv_match(gt, anchors, high, low, allow))


def test_thresholds_are_compared_in_the_iou_dtype(device):
    """Matcher compares the float32 IoU with a Python float, which rounds the threshold to float32 first: an
    IoU of exactly float32(0.7) is foreground, even though it is below the double 0.7."""
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]], device=device)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 7.0]], device=device)  # IoU float32(0.7) < 0.7
    assert torchvision.ops.box_iou(gt, anchors).item() == torch.tensor(0.7).item()
    assert torch.tensor(0.7).item() < 0.7  # a comparison in double would call this anchor "between"
    assert tv_match(gt, anchors, 0.7, 0.3, False).tolist() == [0]
    assert rpn_ops.match_anchors(gt, anchors, 0.7, 0.3, False).tolist() == [0]


@pytest.mark.parametrize("gt_dtype, anchor_dtype", [(d, d) for d in FLOAT_DTYPES] + [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
    (torch.float16, torch.bfloat16), (torch.float64, torch.float32)])
def test_match_anchors_of_every_dtype_equals_torchvision(device, gt_dtype, anchor_dtype):
    """box_iou's dtype rules: corners in the promoted dtype, extents rounded there (float16 pairs), IoU upcast."""
    anchors = fpn_anchors(dtype=anchor_dtype, device=device)[0]
    for kind in ("crowded", "ties", "degenerate"):
        gt = scene(kind, anchors.float().cpu(), seed=11).to(device, gt_dtype)
        expected = tv_match(gt, anchors)
        assert_same_matches(rpn_ops.match_anchors(gt, anchors), expected)


def test_match_anchors_reads_non_contiguous_inputs(device):
    anchors = fpn_anchors(device=device)[0]
    gt = scene("crowded", anchors.cpu()).to(device)
    assert_same_matches(rpn_ops.match_anchors(non_contiguous(gt), non_contiguous(anchors)), tv_match(gt, anchors))
    assert_same_matches(rpn_ops.match_anchors(gt[::2], anchors[1::3]), tv_match(gt[::2], anchors[1::3]))


def test_match_anchors_of_a_batch_equals_each_image_alone(device):
    anchors = fpn_anchors(3, device=device)
    gts = [scene(kind, anchors[0].cpu(), seed=i).to(device) for i, kind in enumerate(["crowded", "single", "tiny"])]
    got = rpn_ops.match_anchors(gts, anchors)
    assert isinstance(got, list) and len(got) == 3
    for g, a, m in zip(gts, anchors, got):
        assert_same_matches(m, tv_match(g, a))


@pytest.mark.parametrize("anchor_count", [1, 7, 129, 2047, 2049, 5000])
def test_match_anchors_of_any_anchor_count(device, anchor_count):
    """Chunk and block edges of the CPU kernel, partial blocks of the CUDA one."""
    anchors = workloads.random_boxes(anchor_count, seed=anchor_count, device=device)
    gt = workloads.random_boxes(300, seed=1, device=device)
    assert_same_matches(rpn_ops.match_anchors(gt, anchors), tv_match(gt, anchors))


def test_reference_matches_torchvision():
    anchors = fpn_anchors()[0]
    for kind in SCENES:
        gt = scene(kind, anchors, seed=5)
        for dtype in (torch.float16, torch.float64):
            assert_same_matches(reference.match_anchors(gt.to(dtype), anchors), tv_match(gt.to(dtype), anchors))


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
def test_every_cpu_instruction_set_gives_the_same_matches(isa):
    rpn_ops.set_cpu_isa(isa)
    anchors = with_degenerate_anchors(fpn_anchors()[0])
    for kind in SCENES:
        gt = scene(kind, anchors, seed=9)
        for dtype in (torch.float32, torch.float64):
            assert_same_matches(rpn_ops.match_anchors(gt.to(dtype), anchors.to(dtype)),
                                tv_match(gt.to(dtype), anchors.to(dtype)))
        labels, matched, targets = rpn_ops.assign_targets([anchors], [gt])
        assert_same_targets((labels, matched, targets), tv_assign([anchors], [gt]))


def test_match_anchors_is_deterministic_across_thread_counts():
    anchors = fpn_anchors(2, image_size=(800, 1216))
    gts = [scene("crowded", anchors[0], seed=1), scene("ties", anchors[1], seed=2)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, threads, 2 * threads):
            torch.set_num_threads(n)
            results.append(torch.cat(rpn_ops.match_anchors(gts, anchors)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    assert_same_matches(results[0], torch.cat([tv_match(g, a) for g, a in zip(gts, anchors)]))


# ---------------------------------------------------------------------------------------------------------
# assign_targets
# ---------------------------------------------------------------------------------------------------------

def batch_scene(device, dtype=torch.float32, anchor_dtype=None, kinds=("crowded", "random", "empty", "tiny")):
    anchors = fpn_anchors(len(kinds), dtype=anchor_dtype or dtype, device=device)
    gts = [torch.zeros(0, 4) if kind == "empty" else scene(kind, anchors[0].float().cpu(), seed=i)
           for i, kind in enumerate(kinds)]
    return anchors, [g.to(device, dtype) for g in gts]


def test_assign_targets_equals_torchvision(device):
    """A batch of images with different ground-truth counts, one without any."""
    anchors, gts = batch_scene(device)
    assert_same_targets(rpn_ops.assign_targets(anchors, gts), tv_assign(anchors, gts))


@pytest.mark.parametrize("kind", SCENES)
def test_assign_targets_of_every_scene_equals_torchvision(device, kind):
    anchors = fpn_anchors(device=device)
    gts = [scene(kind, anchors[0].cpu(), seed=2).to(device)]
    for allow in (True, False):
        assert_same_targets(rpn_ops.assign_targets(anchors, gts, allow_low_quality_matches=allow),
                            tv_assign(anchors, gts, allow=allow))


@pytest.mark.parametrize("fg, bg, weights", [(0.7, 0.3, (1.0, 1.0, 1.0, 1.0)), (0.5, 0.4, (10.0, 10.0, 5.0, 5.0)),
                                             (0.6, 0.6, (1.0, 2.0, 0.5, 3.0))])
def test_assign_targets_options_equal_torchvision(device, fg, bg, weights):
    anchors, gts = batch_scene(device, kinds=("ties", "empty", "degenerate"))
    assert_same_targets(rpn_ops.assign_targets(anchors, gts, fg, bg, True, weights),
                        tv_assign(anchors, gts, fg, bg, True, weights))


@pytest.mark.parametrize("gt_dtype, anchor_dtype", [(d, d) for d in FLOAT_DTYPES] + [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.float64, torch.bfloat16)])
def test_assign_targets_of_every_dtype_equals_torchvision(device, gt_dtype, anchor_dtype):
    """Labels float32, matched boxes in the ground truth's dtype (float32 zeros for an image without any, which
    promote the targets of the whole batch as torch.cat does in torchvision), targets as encode's promotion."""
    for kinds in (("crowded", "random"), ("crowded", "empty")):
        anchors, gts = batch_scene(device, gt_dtype, anchor_dtype, kinds)
        expected = tv_assign(anchors, gts)
        assert_same_targets(rpn_ops.assign_targets(anchors, gts), expected)


def test_assign_targets_without_any_ground_truth_is_all_background(device):
    anchors = fpn_anchors(2, device=device)
    gts = [torch.zeros(0, 4, device=device), torch.zeros((0,), device=device)]
    labels, matched, targets = rpn_ops.assign_targets(anchors, gts)
    assert all(torch.equal(l, torch.zeros(len(a), device=device)) for l, a in zip(labels, anchors))
    assert_same_targets((labels, matched, targets), tv_assign(anchors, [torch.zeros(0, 4, device=device)] * 2))


def test_assign_targets_takes_target_dicts_and_non_contiguous_inputs(device):
    anchors, gts = batch_scene(device, kinds=("crowded", "ties"))
    expected = tv_assign(anchors, gts)
    targets = [{"boxes": non_contiguous(g), "labels": torch.ones(len(g), dtype=torch.int64)} for g in gts]
    assert_same_targets(rpn_ops.assign_targets([non_contiguous(a) for a in anchors], targets), expected)


def test_assign_targets_of_no_image_and_of_images_without_anchors(device):
    assert rpn_ops.assign_targets([], []) == ([], [], [])
    labels, matched, targets = rpn_ops.assign_targets([torch.zeros(0, 4, device=device)],
                                                      [torch.zeros(0, 4, device=device)])
    assert labels[0].shape == (0,) and matched[0].shape == (0, 4) and targets[0].shape == (0, 4)


def test_reference_assign_targets_equals_torchvision():
    anchors, gts = batch_scene("cpu")
    assert_same_targets(reference.assign_targets(anchors, gts), tv_assign(anchors, gts))


def test_assign_targets_at_full_size_equals_torchvision():
    """243k anchors of two 800 x 1216 images (several chunks per image, every level) with 50 boxes each."""
    anchors = fpn_anchors(2, image_size=workloads.IMAGE_SIZE)
    gts = [workloads.gt_boxes(50, seed=i) for i in range(2)]
    assert_same_targets(rpn_ops.assign_targets(anchors, gts), tv_assign(anchors, gts))


# ---------------------------------------------------------------------------------------------------------
# The balanced sampler
# ---------------------------------------------------------------------------------------------------------

def sampled_labels():
    labels, _, _ = rpn_ops.assign_targets(*batch_scene("cpu", kinds=("crowded", "random", "empty")))
    return labels


def test_sampler_draws_what_torchvision_draws():
    labels = sampled_labels()
    for batch_size, fraction in [(256, 0.5), (512, 0.25), (10, 1.0), (7, 0.0)]:
        torch.manual_seed(batch_size)
        expected = det_utils.BalancedPositiveNegativeSampler(batch_size, fraction)(labels)
        torch.manual_seed(batch_size)
        got = rpn_ops.BalancedPositiveNegativeSampler(batch_size, fraction)(labels)
        for e, o in zip(expected, got):
            assert all(torch.equal(a, b) and a.dtype == b.dtype == torch.uint8 for a, b in zip(e, o))


def test_sampler_counts_and_label_rules():
    labels = sampled_labels()
    positives, negatives = rpn_ops.BalancedPositiveNegativeSampler(256, 0.5)(labels)
    for l, pos, neg in zip(labels, positives, negatives):
        num_pos = min(int((l >= 1).sum()), 128)
        assert int(pos.sum()) == num_pos and int(neg.sum()) == min(int((l == 0).sum()), 256 - num_pos)
        assert bool((l[pos.bool()] >= 1).all()) and bool((l[neg.bool()] == 0).all())
    assert sum(int(p.sum()) for p in positives) > 0


def test_sampler_generator_makes_draws_reproducible():
    labels = sampled_labels()
    draw = lambda seed: rpn_ops.BalancedPositiveNegativeSampler(  # noqa: E731
        64, 0.5, generator=torch.Generator().manual_seed(seed))(labels)
    first, again, other = draw(1), draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], again[0] + again[1]))
    assert not all(torch.equal(a, b) for a, b in zip(first[1], other[1]))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size_per_image must be an int >= 0"):
        rpn_ops.BalancedPositiveNegativeSampler(-1, 0.5)
    with pytest.raises(ValueError, match=r"positive_fraction must be in \[0, 1\]"):
        rpn_ops.BalancedPositiveNegativeSampler(16, 1.5)
    with pytest.raises(ValueError, match="each image's labels must be a 1-D tensor"):
        rpn_ops.BalancedPositiveNegativeSampler(16, 0.5)([torch.zeros(3, 4)])


# ---------------------------------------------------------------------------------------------------------
# Memory, PyTorch integration, bad input
# ---------------------------------------------------------------------------------------------------------

MEMORY_PROBE = """
import json, torch, rpn_ops
from benchmarks.run import peak_extra_mib
from rpn_ops import workloads
images, features = workloads.fpn_batch(1)
anchors = [a.clone() for a in rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)(images, features)]
gt = [workloads.gt_boxes(500, seed=1)]
device = torch.device("cpu")
print(json.dumps(dict(
    anchors=len(anchors[0]),
    ours=peak_extra_mib(rpn_ops.assign_targets, (anchors, gt), device),
    iou_matrix=peak_extra_mib(rpn_ops.box_iou, (gt[0], anchors[0]), device))))
"""

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident memory from /proc")
def test_assign_targets_of_243k_anchors_and_500_boxes_needs_no_iou_matrix():
    """In a fresh process: the peak extra memory of the call is about its outputs (labels 4 B, matched boxes
    16 B, targets 16 B per anchor: 8.8 MiB) plus O(anchors + boxes) scratch, while the [500, 243k] IoU matrix
    alone would be 464 MiB. The same probe sees that matrix where it is built (as the output of box_iou)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    matrix_mib = 500 * peaks["anchors"] * 4 / 2**20
    assert peaks["anchors"] == 242_991
    assert peaks["iou_matrix"] >= 0.9 * matrix_mib, peaks  # the probe can see such a buffer
    assert peaks["ours"] < 64, peaks  # outputs 8.8 MiB, scratch a few MiB: far below one G x A buffer


def test_opcheck(device):
    anchors, gts = batch_scene(device, kinds=("crowded", "random"))
    gt_rows, anchor_rows = torch.cat(gts), torch.cat(anchors)
    counts = ([len(g) for g in gts], [len(a) for a in anchors])
    torch.library.opcheck(torch.ops.rpn_ops.match_anchors.default, (gt_rows, anchor_rows, *counts, 0.7, 0.3, True))
    torch.library.opcheck(torch.ops.rpn_ops.match_anchors.default,
                          (gt_rows, anchor_rows, *counts, 0.5, 0.5, False, True))
    levels = [len(anchors[0]) - 700, 500, 200]
    torch.library.opcheck(torch.ops.rpn_ops.match_fcos.default, (gt_rows, anchor_rows, *counts, levels, 1.5))
    torch.library.opcheck(torch.ops.rpn_ops.assign_targets.default,
                          (gt_rows.half(), anchor_rows, *counts, 0.7, 0.3, True, [1.0, 1.0, 2.0, 2.0]))
    torch.library.opcheck(torch.ops.rpn_ops.assign_targets.default,
                          (gt_rows[:0], anchor_rows, [0, 0], counts[1], 0.7, 0.3, False, [1.0, 1.0, 1.0, 1.0], True))


@compiles
def test_torch_compile_traces_without_graph_breaks(device):
    @torch.compile(fullgraph=True)
    def training_targets(anchors, gts):
        matches = rpn_ops.match_anchors(gts[0], anchors[0])
        labels, matched, targets = rpn_ops.assign_targets(anchors, gts)
        forced = rpn_ops.match_anchors(gts, anchors, 0.5, 0.5, False, force_best_anchors=True)
        fcos = rpn_ops.match_fcos(gts, anchors, [len(anchors[0]) - 700, 700])
        return matches, labels, matched, targets, forced, fcos

    torch._dynamo.reset()
    anchors, gts = batch_scene(device, kinds=("crowded", "random"))
    matches, *got, forced, fcos = training_targets(anchors, gts)
    assert_same_matches(matches, tv_match(gts[0], anchors[0]))
    for g, a, f, m in zip(gts, anchors, forced, fcos):
        assert torch.equal(f, rpn_ops.match_anchors(g, a, 0.5, 0.5, False, force_best_anchors=True))
        assert torch.equal(m, rpn_ops.match_fcos(g, a, [len(a) - 700, 700]))
    assert_same_targets(got, tv_assign(anchors, gts))


@needs_cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cuda_autocast_matches_torchvision_under_autocast(dtype):
    """Under CUDA autocast torchvision's encode takes the logarithm in float32: targets of float16 / bfloat16
    anchors come out float32."""
    anchors, gts = batch_scene("cuda", torch.float32, dtype, kinds=("crowded", "empty"))
    with torch.autocast("cuda", dtype=dtype):
        expected = tv_assign(anchors, gts)
        got = rpn_ops.assign_targets(anchors, gts)
    assert_same_targets(got, expected)


@pytest.mark.parametrize("gt_dtype, anchor_dtype", [(d, d) for d in FLOAT_DTYPES] + [(torch.float32, torch.float16)])
def test_cuda_kernels_match_cpu(gpu, gt_dtype, anchor_dtype):
    """Matches, labels and matched boxes equal; targets equal to float rounding (the device's logf vs the CPU's
    log, as torchvision's own two devices differ)."""
    anchors, gts = batch_scene("cpu", gt_dtype, anchor_dtype, kinds=("crowded", "ties", "empty", "degenerate"))
    nonempty = [i for i, g in enumerate(gts) if len(g)]
    with cpu_kernels():
        cpu_matches = rpn_ops.match_anchors([gts[i] for i in nonempty], [anchors[i] for i in nonempty])
        cpu = rpn_ops.assign_targets(anchors, gts)
    gpu_matches = rpn_ops.match_anchors([gts[i].to(gpu) for i in nonempty], [anchors[i].to(gpu) for i in nonempty])
    for a, b in zip(cpu_matches, gpu_matches):
        assert_same_matches(b.cpu(), a)
    cuda = rpn_ops.assign_targets([a.to(gpu) for a in anchors], [g.to(gpu) for g in gts])
    for a, b in zip(cpu[0] + cpu[1], cuda[0] + cuda[1]):
        assert_bits_equal(b.cpu(), a)
    for a, b in zip(cpu[2], cuda[2]):
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(b.cpu(), a, rtol=4 * eps, atol=4 * eps, equal_nan=True)


@needs_cuda
def test_cuda_batch_of_many_images_and_many_boxes():
    """More images than one grid row, more boxes than one shared-memory tile."""
    anchors = [workloads.random_boxes(300, seed=i, device="cuda") for i in range(70_000 // 300 + 3)]
    gts = [workloads.random_boxes(1 + i % 600, seed=i + 1, device="cuda") for i in range(len(anchors))]
    got = rpn_ops.match_anchors(gts, anchors)
    for g, a, m in list(zip(gts, anchors, got))[::25]:
        assert_same_matches(m, tv_match(g, a))


@pytest.mark.parametrize("where", ["anchors", "gt_boxes"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_boxes_are_refused(device, where, value):
    """torchvision would match a NaN anchor as foreground with NaN targets; we say what is wrong instead."""
    anchors, gts = batch_scene(device, kinds=("crowded", "random"))
    broken = (anchors if where == "anchors" else gts)[1]
    broken[len(broken) // 2, 2] = value
    with pytest.raises(ValueError, match=f"^{where} has a box with an infinite or NaN coordinate"):
        rpn_ops.match_anchors(gts, anchors)
    with pytest.raises(ValueError, match="infinite or NaN coordinate"):
        rpn_ops.assign_targets(anchors, gts)


def test_assign_targets_gradients_equal_torchvision(device):
    """Matched boxes and regression targets are differentiable in the ground truth and the anchors, as
    torchvision's gathered boxes and encode are (to float32 rounding: a ground-truth box's gradient sums thousands
    of terms over its matched anchors, in another order)."""
    anchors, gts = batch_scene(device, kinds=("crowded", "empty", "random"))
    gradients = []
    for assign in (rpn_ops.assign_targets, tv_assign):
        leaves = [t.detach().clone().requires_grad_() for t in anchors + gts]
        _, matched, targets = assign(leaves[:len(anchors)], leaves[len(anchors):])
        weights = torch.linspace(-1.0, 1.0, 4, device=device)
        loss = sum((m * weights).sum() + (t * weights.flip(0)).sum() for m, t in zip(matched, targets))
        gradients.append(torch.autograd.grad(loss, [leaf for leaf in leaves if leaf.numel() > 0]))
    for got, expected in zip(*gradients):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, equal_nan=True)  # NaN: zero-width anchors
