"""rpn_ops.patch_torchvision on torchvision's SSD (SSDlite320 MobileNetV3 and SSD300 VGG16): the same detections,
order of equal scores included, the same training losses and gradients, SSDMatcher's matches without its [G, A]
IoU matrix (match_anchors' force_best_anchors), parameters and state_dict kept, and the patched model scripts."""
import copy

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd as tv_ssd
from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large
from torchvision.ops import boxes as box_ops

import rpn_ops
from rpn_ops import reference, workloads
from rpn_ops.torchvision_patch import _class_candidates
from test_one_stage_patch import assert_same_training_steps
from test_torchvision_patch import (_images, _targets, assert_equal_detections, assert_equal_losses,
                                    assert_same_detections_up_to_ties)


def _ssdlite(device="cpu", seed=0, peaked=False, num_classes=91):
    """A random SSDlite320: with 91 classes its softmax scores sit around 1/91, just above the 0.01 threshold, so
    most anchors are candidates of most classes (tens of thousands per image). `peaked`: class 1's logits pushed
    far up, so that softmax rounds every anchor's class-1 score to exactly 1.0 (ties in its top-k and NMS)."""
    torch.manual_seed(seed)
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    if peaked:
        with torch.no_grad():
            for layer in model.head.classification_head.module_list:
                layer[1].bias.view(-1, num_classes)[:, 1] += 40.0
    return model.to(device).eval()


def _pair(device="cpu", peaked=False, **patch_options):
    model = _ssdlite(device, peaked=peaked)
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model), **patch_options)


def _ssd_matches(gt, anchors, threshold):
    return det_utils.SSDMatcher(threshold)(box_ops.box_iou(gt, anchors))


@pytest.mark.parametrize("peaked", [False, True])
def test_detections_are_torchvisions_to_the_bit(device, peaked):
    model, patched = _pair(device, peaked)
    images = _images(device, sizes=((160, 220), (150, 200)))
    with torch.no_grad():
        expected, got = model(images), patched(images)
    assert all(len(d["boxes"]) > 30 for d in expected)
    if peaked:
        assert all((d["scores"] == 1.0).sum() > 10 for d in expected)
    assert_equal_detections(expected, got)


@pytest.mark.not_emulated("SSD300's VGG16 backbone takes a minute on the emulated device; SSDlite covers it")
def test_ssd300_detections_and_losses_are_torchvisions(device):
    torch.manual_seed(0)
    model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=7).to(device).eval()
    patched = rpn_ops.patch_torchvision(copy.deepcopy(model))
    images = _images(device, sizes=((200, 260),))
    with torch.no_grad():
        assert_equal_detections(model(images), patched(images))
    model.train(), patched.train()
    targets = _targets((9,), device, image_size=(200, 260), num_classes=7)
    assert_equal_losses(model(images, targets), patched(images, targets))


def test_the_fused_form_gives_the_same_detections_up_to_the_order_of_ties(device):
    """rpn_ops.dense_detections, on head outputs whose scores spread out (a random SSDlite's are uniform: greedy NMS
    of overlapping tied boxes keeps what the order of its visits decides, which torchvision leaves to torch.topk;
    tests/test_dense_detections.py checks the op's own order of ties against the reference)."""
    model, patched = _pair(device, torchvision_tie_order=False)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3000, 91, generator=g) * 3
    logits[..., 0] += 6.0
    deltas = torch.randn(2, 3000, 4, generator=g) * 0.3
    head_outputs = {"cls_logits": logits.to(device), "bbox_regression": deltas.to(device)}
    anchors = [workloads.rpn_like_boxes(3000, seed=seed, image_size=(320, 320))[0].to(device) for seed in (1, 2)]
    with torch.no_grad():
        expected = model.postprocess_detections(head_outputs, anchors, [(320, 320), (300, 310)])
        assert all(len(d["scores"]) == model.detections_per_img for d in expected)
        assert_same_detections_up_to_ties(expected, patched.postprocess_detections(head_outputs, anchors,
                                                                                  [(320, 320), (300, 310)]))


def test_training_losses_and_gradients_are_torchvisions(device):
    """Ground truth, an image without any, a batch without any, crowded images: the same losses (hard negative
    mining included) and, after backward, the same head gradients."""
    model, patched = _pair(device)
    model.train(), patched.train()
    for net in (model, patched):
        net.backbone.requires_grad_(False)
    assert_same_training_steps(model, patched, _images(device, sizes=((160, 220), (150, 200))),
                               [(3, 12), (0, 5), (0, 0), (60, 60)], device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forced_matches_are_ssd_matchers_on_adversarial_boxes(device, dtype):
    """Duplicated boxes (the last takes the shared best anchor), boxes equal to an anchor, a box overlapping no
    anchor (its best anchor: the first, at IoU 0), duplicated anchors (the first of equal IoUs), thresholds at an
    IoU, and a batch of images in one call."""
    anchors = workloads.rpn_like_boxes(3000, seed=4)[0].to(dtype)
    anchors = torch.cat([anchors, anchors[:500]])
    gt = workloads.gt_boxes(25, seed=6).to(dtype)
    far = torch.tensor([[5000.0, 5000.0, 5010.0, 5010.0]], dtype=dtype)
    gt = torch.cat([gt, gt[:3], anchors[[7, 7, 2100]], anchors[40:41] * 1.01, far, gt[5:6]])
    iou = box_ops.box_iou(gt, anchors)
    for threshold in (0.5, float(iou[0].max()), 0.0, 1.0):
        expected = _ssd_matches(gt, anchors, threshold)
        assert torch.equal(reference.match_anchors(gt, anchors, threshold, threshold, False, True), expected)
        got = rpn_ops.match_anchors(gt.to(device), anchors.to(device), threshold, threshold, False,
                                    force_best_anchors=True)
        assert torch.equal(got.cpu(), expected), threshold
    # Threshold 1.0: of equal boxes (0 and 25, 5 and 33) the last takes the forced anchor. Boxes 28 and 29 equal
    # anchors 7 and 3007 (a duplicate): the first of those is forced to 29, the other matches box 28 by IoU 1.0.
    assert not (expected == 0).any() and (expected == 25).sum() == 1
    assert not (expected == 5).any() and (expected == len(gt) - 1).sum() == 1
    assert expected[7] == 29 and expected[3007] == 28
    images = [(gt, anchors), (gt[3:9], anchors[:700]), (far, anchors[:300])]
    got = rpn_ops.match_anchors([g.to(device) for g, _ in images], [a.to(device) for _, a in images], 0.5, 0.5,
                                False, force_best_anchors=True)
    for (g, a), matches in zip(images, got):
        assert torch.equal(matches.cpu(), _ssd_matches(g, a, 0.5))


def test_forced_matches_of_zero_area_boxes_follow_torch_max():
    """Point boxes against point anchors: IoU 0 / 0 = NaN, which torch.max takes as the highest (first NaN)."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5], [1, 1, 1, 1], [0, 0, 2, 2]])
    gt = torch.tensor([[5.0, 5, 5, 5], [1, 1, 1, 1], [0, 0, 3, 3], [20, 20, 20, 20]])
    for low_quality in (False, True):
        expected = reference.match_anchors(gt, anchors, 0.5, 0.4, low_quality, True)
        got = rpn_ops.match_anchors(gt, anchors, 0.5, 0.4, low_quality, force_best_anchors=True)
        assert torch.equal(got, expected)
    assert torch.equal(rpn_ops.match_anchors(gt, anchors, 0.5, 0.5, False, force_best_anchors=True),
                       _ssd_matches(gt, anchors, 0.5))


@pytest.mark.parametrize("seed", range(6))
def test_forced_matches_on_random_batches(device, seed):
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(3):
        anchors = workloads.rpn_like_boxes(int(torch.randint(1, 4000, (), generator=g)), seed=seed)[0]
        if seed % 2:
            anchors = anchors.round()
        gt = workloads.gt_boxes(int(torch.randint(1, 40, (), generator=g)), seed=seed + 10)
        images.append((gt, anchors))
    threshold = float(torch.rand((), generator=g))
    got = rpn_ops.match_anchors([gt.to(device) for gt, _ in images], [a.to(device) for _, a in images], threshold,
                                threshold, False, force_best_anchors=True)
    for (gt, anchors), matches in zip(images, got):
        assert torch.equal(matches.cpu(), _ssd_matches(gt, anchors, threshold))


def test_the_candidates_pass_is_torchvisions_class_loop_and_traces():
    """_class_candidates against torchvision's loop over classes, run by the traced form (which is that loop)."""
    model = _ssdlite(peaked=True, num_classes=12)
    scores = torch.softmax(torch.randn(3234, 12, generator=torch.Generator().manual_seed(2)) * 3, -1)
    scores[100:400, 5] = scores[100:400, 5].max()  # ties
    boxes = workloads.rpn_like_boxes(3234, seed=2)[0]
    fast = _class_candidates(boxes, scores, model.score_thresh, model.topk_candidates)
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(lambda b, s: _class_candidates(b, s, model.score_thresh, model.topk_candidates),
                                 (boxes, scores), check_trace=False)
    for a, b in zip(fast, traced(boxes, scores)):
        assert torch.equal(a, b)
    assert fast[0].shape[0] > 11 * 200


def test_another_matcher_keeps_its_own_rule():
    """A proposal matcher other than SSDMatcher / Matcher is called on torchvision's IoU matrix; torchvision's
    Matcher is matched by match_anchors without forced anchors."""
    class HalfMatcher(det_utils.SSDMatcher):
        pass

    for matcher in (HalfMatcher(0.4), det_utils.Matcher(0.5, 0.4, True)):
        model, patched = _pair()
        for net in (model, patched):
            net.proposal_matcher = matcher
            net.train()
        images = _images("cpu", sizes=((160, 220), (150, 200)))  # batch norm trains on 2 images at least
        targets = _targets((6, 2), "cpu", image_size=(150, 200))
        assert_equal_losses(model(images, targets), patched(images, targets))


def test_patch_keeps_parameters_state_dict_and_configuration():
    model = _ssdlite()
    original = copy.deepcopy(model)
    head, keys = model.head, list(model.state_dict())
    assert rpn_ops.patch_torchvision(model) is model
    assert isinstance(model, rpn_ops.SSD) and isinstance(model, tv_ssd.SSD)
    assert model.head is head and model.torchvision_tie_order
    assert type(model.anchor_generator) is type(original.anchor_generator)  # DefaultBoxGenerator, kept
    assert type(model.box_coder) is rpn_ops.BoxCoder and model.box_coder.weights == original.box_coder.weights
    for name in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "neg_to_pos_ratio",
                 "training"):
        assert getattr(model, name) == getattr(original, name), name
    assert type(model.proposal_matcher) is det_utils.SSDMatcher
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert rpn_ops.patch_torchvision(model) is model and model.head is head
    rpn_ops.patch_torchvision(model, torchvision_tie_order=False)
    assert not model.torchvision_tie_order


def test_an_ssd_subclass_is_refused_and_left_as_it_is():
    class MySSD(tv_ssd.SSD):
        pass

    model = _ssdlite()
    model.__class__ = MySSD
    with pytest.raises(TypeError, match="MySSD.*overrides would be lost"):
        rpn_ops.patch_torchvision(model)
    assert type(model) is MySSD and type(model.box_coder) is det_utils.BoxCoder


def test_the_patched_ssd_scripts_with_the_scripted_torchvision_models_detections():
    model, patched = _pair(peaked=True)
    images = _images("cpu", sizes=((160, 220), (150, 200)))
    with torch.no_grad():
        expected = torch.jit.script(model)(images)[1]
        assert_equal_detections(expected, torch.jit.script(patched)(images)[1])
