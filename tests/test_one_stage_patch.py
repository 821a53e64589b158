"""rpn_ops.patch_torchvision on torchvision's one-stage detectors (RetinaNet v1 and v2): the same detections,
order of equal scores included, the same training losses and gradients, torchvision's matching without its
[G, A] IoU matrix, parameters and state_dict kept, and the patched model scripts."""
import contextlib
import copy

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.ops import boxes as box_ops

import emulator
import rpn_ops
from helpers import emulated
from rpn_ops import torchvision_patch, workloads
from rpn_ops.torchvision_patch import _matched_idxs
from test_torchvision_patch import (_images, _targets, assert_equal_detections, assert_equal_losses,
                                    assert_same_detections_up_to_ties)

RETINANETS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}


def _retinanet(version="v1", device="cpu", seed=0, peaked=False):
    """A random RetinaNet on small images keeping every detection above 0.005. `peaked`: class logits pushed
    far up for two classes, so that sigmoid rounds thousands of scores to exactly 1.0 (ties, as a trained
    model's confident detections give)."""
    torch.manual_seed(seed)
    model = RETINANETS[version](weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=240,
                                score_thresh=0.005)
    if peaked:
        with torch.no_grad():
            model.head.classification_head.cls_logits.bias.view(-1, 5)[:, 1:3] += 30.0
    return model.to(device).eval()


def torchvision_on_the_device():
    """torchvision's model as it computes on the device: on the emulated one, its sigmoid as on a GPU."""
    return emulator.scores_as_on_cuda() if emulated() else contextlib.nullcontext()


def _pair(version="v1", device="cpu", peaked=False, **patch_options):
    model = _retinanet(version, device, peaked=peaked)
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model), **patch_options)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("peaked", [False, True])
def test_detections_are_torchvisions_to_the_bit(device, version, peaked):
    model, patched = _pair(version, device, peaked)
    images = _images(device, sizes=((160, 220), (150, 200)))
    with torch.no_grad():
        with torchvision_on_the_device():
            expected = model(images)
        got = patched(images)
    assert sum(len(d["boxes"]) for d in expected) > 100
    if peaked:
        assert all((d["scores"] == 1.0).sum() > 10 for d in expected)
    assert_equal_detections(expected, got)


def test_the_fused_form_gives_the_same_detections_up_to_the_order_of_ties(device):
    """rpn_ops.dense_detections, on a random model's distinct scores. Where overlapping boxes tie (peaked logits),
    greedy NMS keeps what the order of its visits decides, which torchvision leaves to torch.topk: there
    tests/test_dense_detections.py checks the op's own order of ties against the reference."""
    model, patched = _pair("v1", device, torchvision_tie_order=False)
    images = _images(device, sizes=((160, 220),))
    with torch.no_grad():
        with torchvision_on_the_device():
            expected = model(images)
        assert sum(len(d["scores"]) for d in expected) > 100
        assert_same_detections_up_to_ties(expected, patched(images))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_training_losses_and_gradients_are_torchvisions(device, version):
    """Ground truth, an image without any, a batch without any, crowded images: the same losses and, after
    backward, the same head gradients (v2's GIoU loss backpropagates through the decoded boxes)."""
    model, patched = _pair(version, device)
    model.train(), patched.train()
    for net in (model, patched):
        net.backbone.body.requires_grad_(False)
    assert_same_training_steps(model, patched, _images(device, sizes=((160, 220), (150, 200))),
                               [(3, 12), (0, 5), (0, 0), (50, 50)], device)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_fused_form_gives_the_classification_loss_within_float32_rounding(device, version, monkeypatch):
    """torchvision_tie_order=False: rpn_ops.dense_focal_loss's float64 sums (one call per step) against torchvision's
    float32 ones, for the classification loss and the classification head's gradients; the regression loss and its
    head's gradients to the bit."""
    calls = []
    monkeypatch.setattr(torchvision_patch, "dense_focal_loss",
                        lambda *args: calls.append(args) or rpn_ops.dense_focal_loss(*args))
    model, patched = _pair(version, device, torchvision_tie_order=False)
    model.train(), patched.train()
    for net in (model, patched):
        net.backbone.body.requires_grad_(False)
    images = _images(device, sizes=((160, 220), (150, 200)))
    for counts in [(3, 12), (0, 5), (0, 0), (50, 50)]:
        targets = _targets(counts, device, image_size=(150, 200))
        for net in (model, patched):
            net.zero_grad()
        expected, got = model(images, targets), patched(images, targets)
        assert torch.equal(expected["bbox_regression"], got["bbox_regression"]), counts
        torch.testing.assert_close(got["classification"], expected["classification"], rtol=2e-6, atol=0)
        sum(expected.values()).backward()
        sum(got.values()).backward()
        theirs, ours = dict(model.named_parameters()), dict(patched.named_parameters())
        for n in [n for n in theirs if n.startswith("head.") and theirs[n].grad is not None]:
            if n.startswith("head.regression_head."):
                assert torch.equal(theirs[n].grad, ours[n].grad), (counts, n)
            else:
                scale = theirs[n].grad.abs().max()
                torch.testing.assert_close(ours[n].grad, theirs[n].grad, rtol=1e-4, atol=1e-5 * scale)
    assert len(calls) == 4


def assert_same_training_steps(model, patched, images, counts_per_step, device):
    """One training step per entry of ground-truth counts (one per image): the same losses and, after backward,
    the same head gradients."""
    for counts in counts_per_step:
        targets = _targets(counts, device, image_size=(150, 200))
        for net in (model, patched):
            net.zero_grad()
        expected, got = model(images, targets), patched(images, targets)
        assert_equal_losses(expected, got)
        sum(expected.values()).backward()
        sum(got.values()).backward()
        theirs, ours = dict(model.named_parameters()), dict(patched.named_parameters())
        checked = [n for n in theirs if n.startswith("head.") and theirs[n].grad is not None]
        assert len(checked) >= 4
        for n in checked:
            assert torch.equal(theirs[n].grad, ours[n].grad), (counts, n)


def _torchvision_matches(gt_list, anchor_list, matcher):
    return [matcher(box_ops.box_iou(gt, anchors)) if gt.numel() else
            torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
            for gt, anchors in zip(gt_list, anchor_list)]


@pytest.mark.parametrize("allow_low_quality_matches", [True, False])
def test_matching_is_torchvisions_matcher_on_adversarial_boxes(device, allow_low_quality_matches):
    """Duplicated and nested boxes, boxes equal to an anchor (IoU ties at the thresholds and at the best), an
    image without boxes: the matches of torchvision's Matcher(box_iou(...)), in one call for the batch."""
    images, features = workloads.fpn_batch(3, (160, 224), device=device)
    anchors = rpn_ops.AnchorGenerator(((32, 40, 50), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)(
        images, [f[:, :9] for f in features])
    gt = workloads.gt_boxes(20, seed=3, image_size=(160, 224), device=device)
    gt = torch.cat([gt, gt[:4], anchors[0][[7, 7, 100]], anchors[0][100:101] * 1.01])
    targets = [{"boxes": gt}, {"boxes": gt[:0]}, {"boxes": gt[5:9]}]
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=allow_low_quality_matches)
    expected = _torchvision_matches([t["boxes"] for t in targets], anchors, matcher)
    got = _matched_idxs(anchors, targets, matcher)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    assert (got[0] >= 0).any() and (got[0] == -2).any() and (got[1] == -1).all()


def test_another_matcher_keeps_its_own_rule():
    """A proposal matcher that is not torchvision's Matcher (here SSD's) is called on torchvision's IoU matrix."""
    model, patched = _pair("v1")
    for net in (model, patched):
        net.proposal_matcher = det_utils.SSDMatcher(0.5)
        net.train()
    images = _images("cpu", sizes=((160, 220),))
    targets = _targets((6,), "cpu", image_size=(150, 200))
    assert_equal_losses(model(images, targets), patched(images, targets))


def test_patch_keeps_parameters_state_dict_and_configuration():
    model = _retinanet("v2")
    original = copy.deepcopy(model)
    head, keys = model.head, list(model.state_dict())
    assert rpn_ops.patch_torchvision(model) is model
    assert isinstance(model, rpn_ops.RetinaNet) and isinstance(model, tv_retinanet.RetinaNet)
    assert model.head is head and model.torchvision_tie_order
    assert type(model.anchor_generator) is rpn_ops.AnchorGenerator
    assert model.anchor_generator.sizes == original.anchor_generator.sizes
    assert model.anchor_generator.aspect_ratios == original.anchor_generator.aspect_ratios
    assert type(model.box_coder) is rpn_ops.BoxCoder and model.box_coder.weights == original.box_coder.weights
    assert type(model.head.regression_head.box_coder) is det_utils.BoxCoder  # its loss backpropagates through it
    for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "training"):
        assert getattr(model, name) == getattr(original, name), name
    matcher = model.proposal_matcher
    assert (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches) == (0.5, 0.4, True)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert rpn_ops.patch_torchvision(model) is model and model.head is head
    rpn_ops.patch_torchvision(model, torchvision_tie_order=False)
    assert not model.torchvision_tie_order


def test_a_retinanet_subclass_is_refused_and_left_as_it_is():
    class MyRetinaNet(tv_retinanet.RetinaNet):
        pass

    model = _retinanet("v1")
    model.__class__ = MyRetinaNet
    with pytest.raises(TypeError, match="MyRetinaNet.*overrides would be lost"):
        rpn_ops.patch_torchvision(model)
    assert type(model) is MyRetinaNet and type(model.box_coder) is det_utils.BoxCoder


def test_the_patched_retinanet_scripts_with_the_scripted_torchvision_models_detections():
    model, patched = _pair("v1", peaked=True)
    images = _images("cpu", sizes=((160, 220), (150, 200)))
    with torch.no_grad():
        expected = torch.jit.script(model)(images)[1]
        scripted = torch.jit.script(patched)
        assert_equal_detections(expected, scripted(images)[1])
