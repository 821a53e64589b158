"""rpn_ops.match_fcos against torchvision's FCOS.compute_loss matching (centre sampling, scale ranges, smallest
area), and rpn_ops.patch_torchvision on FCOS: the same detections, order of equal scores included, the same
training losses and gradients, parameters and state_dict kept, and the patched model scripts."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import fcos_resnet50_fpn

import rpn_ops
from rpn_ops import workloads
from rpn_ops.torchvision_patch import _centered_candidates
from test_one_stage_patch import assert_same_training_steps, torchvision_on_the_device
from test_torchvision_patch import _images, assert_equal_detections, assert_same_detections_up_to_ties


def torchvision_matches(gt_list, anchor_list, num_anchors_per_level, radius=1.5):
    """The matched_idxs FCOS.compute_loss computes, taken where it hands them to its head."""
    head = SimpleNamespace(compute_loss=lambda targets, head_outputs, anchors, matched_idxs: matched_idxs)
    model = SimpleNamespace(center_sampling_radius=radius, head=head)
    return tv_fcos.FCOS.compute_loss(model, [{"boxes": g} for g in gt_list], {}, anchor_list, num_anchors_per_level)


def fcos_anchors(image_size=(160, 224), num_images=1, device="cpu", dtype=torch.float32):
    """FCOS's anchors (one square per location, 8 to 128 pixels, strides 8 to 128) and the level sizes."""
    images, features = workloads.fpn_batch(num_images, image_size, device=device, strides=(8, 16, 32, 64, 128))
    generator = rpn_ops.AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)
    anchors = [a.to(dtype) for a in generator(images, features)]
    return anchors, [f.shape[-2] * f.shape[-1] for f in features]


def _boxes_for_fcos(n, seed, image_size=(160, 224), dtype=torch.float32):
    """Boxes of every scale, duplicates (equal areas: the first wins), nested boxes, boxes of equal area, a box
    sharing an anchor's centre on its border, huge boxes (area beyond 1e8: never matched), tiny ones."""
    g = workloads.gt_boxes(n, seed=seed, image_size=image_size).to(dtype)
    extra = torch.tensor([[0.0, 0.0, 224.0, 160.0], [20.0, 20.0, 60.0, 60.0], [30.0, 10.0, 70.0, 50.0],
                          [4.0, 4.0, 20.0, 20.0], [-20000.0, -20000.0, 20000.0, 20000.0], [50.0, 50.0, 51.0, 51.0],
                          [12.0, 12.0, 100.0, 36.0]], dtype=dtype)
    return torch.cat([g, g[:3], extra, g[5:6] * 0.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_are_torchvisions(device, dtype):
    anchors, levels = fcos_anchors(dtype=dtype)
    gt = _boxes_for_fcos(30, 3, dtype=dtype)
    for radius in (1.5, 0.5, 3.0, 0.0):
        expected = torchvision_matches([gt], anchors, levels, radius)[0]
        got = rpn_ops.match_fcos(gt.to(device), anchors[0].to(device), levels, radius)
        assert torch.equal(got.cpu(), expected), radius
        assert (expected >= 0).sum() > (20 if radius > 0 else -1) and (expected == -1).sum() > 50


@pytest.mark.parametrize("seed", range(5))
def test_batches_with_images_without_boxes_are_torchvisions(device, seed):
    anchors, levels = fcos_anchors(num_images=3)
    gts = [_boxes_for_fcos(5 + 20 * seed, seed), torch.zeros(0, 4), workloads.gt_boxes(300, seed=seed + 9,
                                                                                      image_size=(160, 224))]
    expected = [torchvision_matches([g], [a], levels)[0] if g.numel() else torch.full((len(a),), -1)
                for g, a in zip(gts, anchors)]
    got = rpn_ops.match_fcos([g.to(device) for g in gts], [a.to(device) for a in anchors], levels)
    for e, m in zip(expected, got):
        assert torch.equal(m.cpu(), e)


def test_level_edge_cases_follow_torchvision():
    """One level (no lower and no upper bound), and a last level of 0 anchors (torchvision's slice [-0:] lifts the
    upper bound of every anchor)."""
    anchors, levels = fcos_anchors()
    gt = _boxes_for_fcos(20, 4)
    for level_split in ([sum(levels)], [levels[0], sum(levels) - levels[0], 0]):
        expected = torchvision_matches([gt], anchors, level_split)[0]
        assert torch.equal(rpn_ops.match_fcos(gt, anchors[0], level_split), expected)


def test_bad_input_is_refused():
    anchors, levels = fcos_anchors()
    gt = _boxes_for_fcos(5, 1)
    with pytest.raises(ValueError, match="sum"):
        rpn_ops.match_fcos(gt, anchors[0], levels[:-1])
    with pytest.raises(TypeError, match="dtype"):
        rpn_ops.match_fcos(gt.double(), anchors[0], levels)
    with pytest.raises(ValueError, match="infinite or NaN"):
        rpn_ops.match_fcos(torch.tensor([[0.0, 0.0, float("nan"), 5.0]]), anchors[0], levels)
    with pytest.raises(TypeError, match="num_anchors_per_level"):
        rpn_ops.match_fcos(gt, anchors[0], [1.5])


def _fcos(device="cpu", seed=0, peaked=False):
    torch.manual_seed(seed)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=240,
                              score_thresh=0.05)
    if peaked:  # class 1 and the centerness saturated: thousands of scores exactly 1.0
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias[1] += 40.0
            model.head.regression_head.bbox_ctrness.bias += 40.0
    return model.to(device).eval()


def _pair(device="cpu", peaked=False, **patch_options):
    model = _fcos(device, peaked=peaked)
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model), **patch_options)


@pytest.mark.parametrize("peaked", [False, True])
def test_detections_are_torchvisions_to_the_bit(device, peaked):
    """Scores found by score_candidates from the threshold's square (no product of every pair), on the emulated
    device with the sigmoid and sqrt of CUDA for both models, as on a GPU."""
    model, patched = _pair(device, peaked)
    images = _images(device, sizes=((160, 220), (150, 200)))
    with torch.no_grad(), torchvision_on_the_device():
        expected, got = model(images), patched(images)
    assert all(len(d["boxes"]) > 20 for d in expected)
    if peaked:
        assert all((d["scores"] == 1.0).sum() > 10 for d in expected)
    assert_equal_detections(expected, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_centered_candidates_are_torchvisions_steps(device, dtype):
    """The patched FCOS's candidates (class scores above the threshold's square first) are torchvision's kept scores
    and indices to the bit, for every dtype (half precision rounds each step coarsely) and threshold: one at an
    exact score, 0, below 0, 1."""
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(3000, 7, generator=g) * 2 - 2).to(dtype).to(device)
    centerness = (torch.randn(3000, 1, generator=g) * 2).to(dtype).to(device)
    with torchvision_on_the_device():
        scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(centerness)).flatten()
        for thresh in (0.2, 0.05, float(scores.sort().values[-100]), 0.0, -1.0, 1.0):
            keep = scores > thresh
            got = _centered_candidates(logits, centerness, thresh)
            assert torch.equal(got[1], torch.where(keep)[0]) and torch.equal(got[0], scores[keep]), thresh
            assert len(got[0]) > 50 or thresh == 1.0


def test_the_fused_form_gives_the_same_detections_up_to_the_order_of_ties(device):
    """rpn_ops.dense_detections (centerness scores, BoxLinearCoder's decode), on a random model's distinct scores;
    where overlapping boxes tie, tests/test_dense_detections.py checks the op's order of ties against the
    reference."""
    model, patched = _pair(device, torchvision_tie_order=False)
    images = _images(device, sizes=((160, 220),))
    with torch.no_grad(), torchvision_on_the_device():
        expected = model(images)
        assert sum(len(d["scores"]) for d in expected) > 20
        assert_same_detections_up_to_ties(expected, patched(images))


def test_training_losses_and_gradients_are_torchvisions(device):
    model, patched = _pair(device)
    model.train(), patched.train()
    for net in (model, patched):
        net.backbone.body.requires_grad_(False)
    assert_same_training_steps(model, patched, _images(device, sizes=((160, 220), (150, 200))),
                               [(3, 12), (0, 5), (0, 0), (50, 50)], device)


def test_patch_keeps_parameters_state_dict_and_configuration():
    model = _fcos()
    original = copy.deepcopy(model)
    head, keys = model.head, list(model.state_dict())
    assert rpn_ops.patch_torchvision(model) is model
    assert isinstance(model, rpn_ops.FCOS) and isinstance(model, tv_fcos.FCOS)
    assert model.head is head and model.torchvision_tie_order
    assert type(model.anchor_generator) is rpn_ops.AnchorGenerator
    assert type(model.box_coder) is type(original.box_coder)
    for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "center_sampling_radius",
                 "training"):
        assert getattr(model, name) == getattr(original, name), name
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert rpn_ops.patch_torchvision(model) is model and model.head is head


def test_an_fcos_subclass_is_refused_and_left_as_it_is():
    class MyFCOS(tv_fcos.FCOS):
        pass

    model = _fcos()
    model.__class__ = MyFCOS
    with pytest.raises(TypeError, match="MyFCOS.*overrides would be lost"):
        rpn_ops.patch_torchvision(model)
    assert type(model) is MyFCOS


def test_the_patched_fcos_scripts_with_the_scripted_torchvision_models_detections():
    model, patched = _pair(peaked=True)
    images = _images("cpu", sizes=((160, 220), (150, 200)))
    with torch.no_grad():
        expected = torch.jit.script(model)(images)[1]
        assert_equal_detections(expected, torch.jit.script(patched)(images)[1])
