"""rpn_ops.patch_torchvision and friends: a torchvision detection model with rpn_ops inside gives the same
detections, proposals, losses and gradients, keeps its parameters and state_dict, and works under no_grad,
inference_mode, autocast, torch.compile and DistributedDataParallel."""
import copy
import os
import socket
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torchvision
import torchvision.ops.boxes
from torch import nn
from torchvision.models.detection import (FasterRCNN, fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_resnet50_fpn,
                                          fasterrcnn_resnet50_fpn_v2, keypointrcnn_resnet50_fpn,
                                          maskrcnn_resnet50_fpn)
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads as TorchvisionRoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork as TorchvisionRPN

import rpn_ops
from rpn_ops import workloads
from rpn_ops.torchvision_patch import _batched_nms_in_torchvision_order

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_IMAGES = dict(min_size=320, max_size=480)


def _tiny_backbone_faster_rcnn(**kwargs):
    """A user's own FasterRCNN(backbone, ...): one feature map of stride 8, their own anchor generator."""
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU())
    backbone.out_channels = 32
    anchors = TorchvisionAnchorGenerator(sizes=((16, 32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
    roi_pool = torchvision.ops.MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, rpn_anchor_generator=anchors, box_roi_pool=roi_pool, **kwargs)


BUILDERS = {
    "resnet50_fpn": lambda **kw: fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL_IMAGES, **kw),
    "resnet50_fpn_v2": lambda **kw: fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **SMALL_IMAGES,
                                                               **kw),
    "mobilenet_320": lambda **kw: fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, **kw),
    "own_backbone": lambda **kw: _tiny_backbone_faster_rcnn(min_size=240, max_size=360, **kw),
    "maskrcnn": lambda **kw: maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL_IMAGES, **kw),
    "keypointrcnn": lambda **kw: keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_keypoints=5,
                                                           **SMALL_IMAGES, **kw),
}
FASTER_RCNNS = ["resnet50_fpn", "resnet50_fpn_v2", "mobilenet_320", "own_backbone"]


def _model(name="resnet50_fpn", device="cpu", seed=0):
    """A randomly initialised detection model, small images; every detection kept (score threshold 0) so the
    ROI heads' NMS has real work on a random model."""
    torch.manual_seed(seed)
    num_classes = 2 if name == "keypointrcnn" else 5
    return BUILDERS[name](num_classes=num_classes, box_score_thresh=0.0).to(device).eval()


def _pair(name="resnet50_fpn", device="cpu", **patch_options):
    model = _model(name, device)
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model), **patch_options)


def _images(device, sizes=((300, 400), (280, 350)), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g).to(device) for h, w in sizes]


def _targets(counts, device, image_size=(280, 350), num_classes=5, keypoints=False):
    targets = []
    for n in counts:
        g = torch.Generator().manual_seed(n)
        boxes = workloads.gt_boxes(n, seed=n, image_size=image_size).reshape(n, 4)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), generator=g)}
        if keypoints:  # 5 visible keypoints inside each box
            corner, size = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2])
            xy = corner + size * torch.rand(n, 5, 2, generator=g)
            target["keypoints"] = torch.cat([xy, torch.ones(n, 5, 1)], 2)
        targets.append({k: v.to(device) for k, v in target.items()})
    return targets


def assert_equal_detections(expected, got):
    """Every key of every image's detections equal (torch.equal): same values in the same order."""
    assert len(expected) == len(got)
    for e, o in zip(expected, got):
        assert e.keys() == o.keys()
        for key in e:
            assert torch.equal(e[key], o[key]), key


def _same_up_to_ties(scores_a, scores_b, rows_a, rows_b) -> bool:
    """The same score sequence, and among equal scores the same rows in any order."""
    if not torch.equal(scores_a, scores_b) or rows_a.shape != rows_b.shape:
        return False
    order_a = sorted(map(tuple, torch.cat([scores_a[:, None].double(), rows_a.double()], 1).tolist()))
    order_b = sorted(map(tuple, torch.cat([scores_b[:, None].double(), rows_b.double()], 1).tolist()))
    return order_a == order_b


def assert_same_detections_up_to_ties(expected, got):
    """As assert_equal_detections, except that detections of equal score may come in another order."""
    assert len(expected) == len(got)
    for e, o in zip(expected, got):
        rows = lambda d: torch.cat([d["boxes"], d["labels"][:, None].to(d["boxes"])], 1)  # noqa: E731
        assert _same_up_to_ties(e["scores"].cpu(), o["scores"].cpu(), rows(e).cpu(), rows(o).cpu())


def assert_equal_losses(expected, got):
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), (name, expected[name], got[name])


def _rpn_inputs(model, device, sizes=((300, 400), (280, 350))):
    images, _ = model.transform(_images(device, sizes))
    with torch.no_grad():
        features = model.backbone(images.tensors)
    return images, features


def _run_rpn(rpn, images, features, targets=None, seed=0):
    torch.manual_seed(seed)  # the sampler's draws
    with torch.no_grad():
        return rpn(images, features, targets)


# ---------------------------------------------------------------------------------------------------------
# What patching does
# ---------------------------------------------------------------------------------------------------------

def test_patch_swaps_in_rpn_ops_and_keeps_parameters_state_dict_and_configuration():
    model = _model()
    original = copy.deepcopy(model)
    head, keys = model.rpn.head, list(model.state_dict())
    assert rpn_ops.patch_torchvision(model) is model
    rpn = model.rpn
    assert isinstance(rpn, rpn_ops.RegionProposalNetwork) and isinstance(rpn, type(original.rpn))
    assert rpn.head is head and rpn.torchvision_tie_order and model.roi_heads.torchvision_tie_order
    assert type(rpn.anchor_generator) is rpn_ops.AnchorGenerator
    assert rpn.anchor_generator.sizes == original.rpn.anchor_generator.sizes
    assert rpn.anchor_generator.aspect_ratios == original.rpn.anchor_generator.aspect_ratios
    assert type(rpn.box_coder) is rpn_ops.BoxCoder and rpn.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert isinstance(rpn.fg_bg_sampler, rpn_ops.BalancedPositiveNegativeSampler)
    assert (rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction) == (256, 0.5)
    for name in ("_pre_nms_top_n", "_post_nms_top_n", "nms_thresh", "score_thresh", "min_size", "training"):
        assert getattr(rpn, name) == getattr(original.rpn, name), name
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    assert isinstance(model.roi_heads, rpn_ops.RoIHeads) and type(model.roi_heads.box_coder) is rpn_ops.BoxCoder
    assert model.roi_heads.box_coder.weights == original.roi_heads.box_coder.weights
    assert list(model.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in original.named_parameters()]


def test_patching_twice_changes_nothing_but_the_tie_order_asked_for():
    model = rpn_ops.patch_torchvision(_model("mobilenet_320"))
    rpn, roi_heads = model.rpn, model.roi_heads
    assert rpn_ops.patch_torchvision(model) is model
    assert model.rpn is rpn and model.roi_heads is roi_heads and isinstance(roi_heads, rpn_ops.RoIHeads)
    rpn_ops.patch_torchvision(model, torchvision_tie_order=False)
    assert model.rpn is rpn and not rpn.torchvision_tie_order and not roi_heads.torchvision_tie_order


def test_from_torchvision_leaves_the_original_rpn_unchanged():
    model = _model("mobilenet_320")
    rpn = model.rpn
    ours = rpn_ops.RegionProposalNetwork.from_torchvision(rpn)
    assert type(rpn.anchor_generator) is TorchvisionAnchorGenerator and ours.head is rpn.head
    assert type(rpn) is TorchvisionRPN and type(rpn.box_coder) is not rpn_ops.BoxCoder
    assert rpn_ops.RegionProposalNetwork.from_torchvision(ours) is ours


def test_region_proposal_network_is_usable_directly_with_torchvisions_constructor(device):
    """rpn_ops.RegionProposalNetwork(...) with torchvision's arguments: same state_dict keys, rpn_ops inside,
    and the proposals and losses of torchvision's RPN built from the same arguments."""
    from torchvision.models.detection.rpn import RPNHead
    model = _model("resnet50_fpn", device)
    args = (TorchvisionAnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
            RPNHead(256, 3).to(device), 0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000),
            dict(training=2000, testing=1000), 0.7)
    theirs, ours = TorchvisionRPN(*args), rpn_ops.RegionProposalNetwork(*args)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert type(ours.anchor_generator) is rpn_ops.AnchorGenerator and type(ours.box_coder) is rpn_ops.BoxCoder
    images, features = _rpn_inputs(model, device)
    targets = _targets((4, 9), device)
    for training in (False, True):
        theirs.train(training), ours.train(training)
        (expected, expected_losses), (got, got_losses) = (
            _run_rpn(rpn, images, features, targets if training else None) for rpn in (theirs, ours))
        assert all(torch.equal(e, o) for e, o in zip(expected, got))
        assert_equal_losses(expected_losses, got_losses)


def test_a_custom_anchor_generator_is_kept_and_used():
    class ShiftedAnchors(TorchvisionAnchorGenerator):
        def forward(self, image_list, feature_maps):
            return [a + 1.0 for a in super().forward(image_list, feature_maps)]

    model = _model("mobilenet_320")
    generator = model.rpn.anchor_generator
    model.rpn.anchor_generator = ShiftedAnchors(generator.sizes, generator.aspect_ratios)
    patched = rpn_ops.patch_torchvision(copy.deepcopy(model))
    assert type(patched.rpn.anchor_generator) is ShiftedAnchors
    images = _images("cpu")
    with torch.no_grad():
        assert_equal_detections(model(images), patched(images))


# ---------------------------------------------------------------------------------------------------------
# Same detections, proposals, losses and gradients
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FASTER_RCNNS)
def test_eval_detections_are_torchvisions_to_the_bit(name, device):
    model, patched = _pair(name, device)
    images = _images(device, sizes=((300, 400), (240, 330), (320, 320)))
    with torch.no_grad():
        expected, got = model(images), patched(images)
    assert sum(len(e["boxes"]) for e in expected) > 0
    assert_equal_detections(expected, got)


def test_non_default_rpn_and_detection_settings_are_honoured(device):
    """Score threshold, top-n, NMS thresholds and detections per image taken from the model, in both modes."""
    settings = dict(rpn_score_thresh=0.5, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=40,
                    rpn_pre_nms_top_n_train=500, rpn_post_nms_top_n_train=90, rpn_nms_thresh=0.5,
                    box_nms_thresh=0.3, box_detections_per_img=7, box_batch_size_per_image=64)
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5,
                                                  box_score_thresh=0.0, **settings).to(device).eval()
    patched = rpn_ops.patch_torchvision(copy.deepcopy(model))
    images = _images(device)
    with torch.no_grad():
        expected = model(images)
        assert_equal_detections(expected, patched(images))
    assert all(len(e["boxes"]) == 7 for e in expected)
    model.train(), patched.train()
    targets = _targets((2, 5), device)
    torch.manual_seed(6)
    expected_losses = model(images, targets)
    torch.manual_seed(6)
    assert_equal_losses(expected_losses, patched(images, targets))


@pytest.mark.parametrize("name", ["maskrcnn", "keypointrcnn"])
def test_mask_and_keypoint_rcnn_detections_and_losses_are_torchvisions(name, device):
    model, patched = _pair(name, device)
    images = _images(device)
    with torch.no_grad():
        expected, got = model(images), patched(images)
    assert {"masks", "keypoints"} & expected[0].keys()
    assert_equal_detections(expected, got)
    model.train(), patched.train()
    targets = _targets((3, 6), device, num_classes=2, keypoints=name == "keypointrcnn")
    if name == "maskrcnn":
        for target, size in zip(targets, ((300, 400), (280, 350))):  # masks: the boxes, filled
            ys, xs = torch.arange(size[0], device=device)[:, None], torch.arange(size[1], device=device)
            target["masks"] = torch.stack([((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)).to(torch.uint8)
                                           for x1, y1, x2, y2 in target["boxes"].tolist()])
    torch.manual_seed(3)
    expected_losses = model(images, targets)
    torch.manual_seed(3)
    assert_equal_losses(expected_losses, patched(images, targets))


def test_rpn_proposals_are_torchvisions_in_order_in_eval_and_training(device):
    model, patched = _pair("resnet50_fpn", device)
    images, features = _rpn_inputs(model, device)
    for training in (False, True):
        model.rpn.train(training), patched.rpn.train(training)
        targets = _targets((3, 7), device) if training else None
        (expected, _), (got, _) = (_run_rpn(rpn, images, features, targets) for rpn in (model.rpn, patched.rpn))
        assert all(len(e) > 100 for e in expected)
        assert all(torch.equal(e, o) for e, o in zip(expected, got))


def test_tied_objectness_keeps_torchvisions_choice_and_order():
    """A head whose logits all tie (zero weights: every logit is the bias): which anchors make each level's
    top-k and the order of the proposals are torch.topk's and torch.sort's; the patched model keeps both, so
    its detections and training losses stay torchvision's to the bit."""
    model = _model("resnet50_fpn")
    with torch.no_grad():
        model.rpn.head.cls_logits.weight.zero_()
        model.roi_heads.box_predictor.cls_score.weight.zero_()  # every detection score ties too
    patched = rpn_ops.patch_torchvision(copy.deepcopy(model))
    images = _images("cpu")
    with torch.no_grad():
        assert_equal_detections(model(images), patched(images))
    model.train(), patched.train()
    targets = _targets((2, 11), "cpu")
    torch.manual_seed(4)
    expected = model(images, targets)
    torch.manual_seed(4)
    assert_equal_losses(expected, patched(images, targets))


@pytest.mark.parametrize("name, counts", [("resnet50_fpn", [(3, 12)]), ("mobilenet_320", [(0, 5), (0, 0), (50, 50)])])
def test_training_losses_and_gradients_are_torchvisions(name, counts, device):
    """With ground truth, an image without any, a batch without any, crowded images: same losses to the bit
    (same random draws), and after backward the same gradients."""
    model, patched = _pair(name, device)
    model.train(), patched.train()
    for net in (model, patched):  # a frozen backbone body keeps the backward cheap
        net.backbone.body.requires_grad_(False)
    images = _images(device)
    for count in counts:
        targets = _targets(count, device)
        for net in (model, patched):
            net.zero_grad()
        torch.manual_seed(2)
        expected = model(images, targets)
        torch.manual_seed(2)
        got = patched(images, targets)
        assert_equal_losses(expected, got)
        sum(expected.values()).backward()
        sum(got.values()).backward()
        theirs, ours = dict(model.named_parameters()), dict(patched.named_parameters())
        checked = [n for n in theirs if n.startswith(("rpn.head", "roi_heads.box_predictor")) and "bias" not in n]
        assert checked
        for n in checked:
            assert theirs[n].grad is not None and torch.equal(theirs[n].grad, ours[n].grad), (count, n)


def test_fused_form_gives_the_same_detections_up_to_the_order_of_ties(device):
    model, patched = _pair("resnet50_fpn", device, torchvision_tie_order=False)
    images = _images(device, sizes=((300, 400), (240, 330)))
    with torch.no_grad():
        assert_same_detections_up_to_ties(model(images), patched(images))
    rpn_images, features = _rpn_inputs(model, device)
    model.rpn.train(), patched.rpn.train()
    targets = _targets((3, 7), device)
    (expected, expected_losses), (got, got_losses) = (
        _run_rpn(rpn, rpn_images, features, targets) for rpn in (model.rpn, patched.rpn))
    for e, o in zip(expected, got):  # the RPN returns no scores: the same proposals as sets of rows
        assert e.shape == o.shape and torch.equal(e.unique(dim=0), o.unique(dim=0))
    assert_equal_losses(expected_losses, got_losses)  # the RPN's own losses do not depend on the proposals


def test_a_saved_state_dict_loads_into_a_fresh_patched_model(tmp_path):
    model = _model("mobilenet_320", seed=5)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh = rpn_ops.patch_torchvision(_model("mobilenet_320", seed=6))
    fresh.load_state_dict(torch.load(path))
    images = _images("cpu")
    with torch.no_grad():
        assert_equal_detections(model(images), fresh(images))
    torch.save(fresh.state_dict(), path)  # and back into an unpatched one
    plain = _model("mobilenet_320", seed=7)
    plain.load_state_dict(torch.load(path))
    with torch.no_grad():
        assert_equal_detections(plain(images), fresh(images))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_mode_and_autocast_give_torchvisions_detections(device, dtype):
    """Under autocast the head's half-precision logits tie in bulk: torchvision's top-k and tie order kept."""
    model, patched = _pair("mobilenet_320", device)
    images = _images(device)
    with torch.inference_mode():
        assert_equal_detections(model(images), patched(images))
    with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        assert_equal_detections(model(images), patched(images))


def test_other_box_coder_weights_fall_back_to_decode_and_filter(device):
    model, patched = _pair("mobilenet_320", device)
    for net in (model, patched):
        net.rpn.box_coder = type(net.rpn.box_coder)((2.0, 2.0, 1.0, 1.0))
    images = _images(device)
    with torch.no_grad():
        assert_equal_detections(model(images), patched(images))


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("torchvision_tie_order", [True, False])
def test_compiled_patched_rpn_gives_the_eager_detections(torchvision_tie_order):
    """The patched RPN's forward compiles as one graph (fullgraph=True) once dynamo may capture operators with
    data-dependent output sizes (generate_proposals', the filters' boolean indexing)."""
    model, patched = _pair("mobilenet_320", torchvision_tie_order=torchvision_tie_order)
    images = _images("cpu", sizes=((240, 320),))
    torch._dynamo.reset()
    patched.rpn.forward = torch.compile(patched.rpn.forward, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        expected, got = model(images), patched(images)
    (assert_equal_detections if torchvision_tie_order else assert_same_detections_up_to_ties)(expected, got)


def test_compiled_patched_model_trains_with_the_compiled_torchvision_models_losses():
    """A whole training step under torch.compile: the same losses as torchvision's model compiled alike (the
    compiler's decompositions may round a loss differently from eager mode, for both models), gradients flow."""
    model, patched = _pair("mobilenet_320")
    model.train(), patched.train()
    images, targets = _images("cpu", sizes=((240, 320),)), _targets((4,), "cpu", image_size=(240, 320))
    losses = []
    for net in (model, patched):
        torch._dynamo.reset()
        torch.manual_seed(5)
        losses.append(torch.compile(net, backend="aot_eager")(images, targets))
    assert_equal_losses(*losses)
    sum(losses[1].values()).backward()
    assert patched.rpn.head.cls_logits.weight.grad is not None


# ---------------------------------------------------------------------------------------------------------
# torchvision's batched_nms, order included, from rpn_ops' NMS
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 300, 1000, 1001, 6000, 25001])  # torchvision's switch: 1000 boxes on CPU, 25000 off it
def test_batched_nms_in_torchvision_order_is_torchvisions_result_with_ties(n, device):
    boxes, scores = workloads.rpn_like_boxes(n, seed=n, device=device)
    scores = workloads.tied_scores(scores, levels=6)  # many equal scores: the unstable sort's order shows
    levels = workloads.categories(n, 5, seed=n, device=device)
    expected = torchvision.ops.batched_nms(boxes, scores, levels, 0.7)  # its own branch for this device
    got = _batched_nms_in_torchvision_order(boxes, scores, levels, 0.7)
    assert got.dtype == torch.int64 and got.device == boxes.device
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------
# The global ops patch
# ---------------------------------------------------------------------------------------------------------

def test_global_ops_patch_and_unpatch_restore_torchvisions_functions():
    names = ("nms", "batched_nms", "box_iou")
    originals = {(m, n): getattr(m, n) for m in (torchvision.ops, torchvision.ops.boxes) for n in names}
    try:
        rpn_ops.patch_torchvision_ops()
        rpn_ops.patch_torchvision_ops()  # twice: unpatch still restores torchvision's
        for (module, name) in originals:
            assert getattr(module, name) is getattr(rpn_ops, name)
    finally:
        rpn_ops.unpatch_torchvision_ops()
    assert all(getattr(m, n) is f for (m, n), f in originals.items())
    with rpn_ops.patch_torchvision_ops():
        assert torchvision.ops.boxes.batched_nms is rpn_ops.batched_nms
    assert all(getattr(m, n) is f for (m, n), f in originals.items())


def test_global_ops_patch_keeps_detections():
    model = _model("mobilenet_320")
    images = _images("cpu")
    with torch.no_grad():
        expected = model(images)
        with rpn_ops.patch_torchvision_ops():
            got = model(images)
    assert_same_detections_up_to_ties(expected, got)


# ---------------------------------------------------------------------------------------------------------
# What it refuses
# ---------------------------------------------------------------------------------------------------------

def test_refuses_what_it_cannot_patch_and_leaves_the_model_as_it_was():
    with pytest.raises(TypeError, match="nn.Module"):
        rpn_ops.patch_torchvision("model")
    with pytest.raises(TypeError, match="RegionProposalNetwork"):
        rpn_ops.patch_torchvision(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="RegionProposalNetwork"):
        rpn_ops.RegionProposalNetwork.from_torchvision(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torchvision_tie_order must be True or False, got 'no'"):
        rpn_ops.patch_torchvision(_model("mobilenet_320"), torchvision_tie_order="no")

    class MyRPN(TorchvisionRPN):
        pass

    class MyRoIHeads(TorchvisionRoIHeads):
        pass

    model = _model("mobilenet_320")
    model.rpn.__class__ = MyRPN
    with pytest.raises(TypeError, match="MyRPN.*overrides would be lost"):
        rpn_ops.patch_torchvision(model)
    with pytest.raises(TypeError, match="MyRPN"):
        rpn_ops.RegionProposalNetwork.from_torchvision(model.rpn)
    model = _model("mobilenet_320")
    model.roi_heads.__class__ = MyRoIHeads
    with pytest.raises(TypeError, match="MyRoIHeads.*overrides would be lost"):
        rpn_ops.patch_torchvision(model)
    assert type(model.rpn) is TorchvisionRPN and type(model.roi_heads) is MyRoIHeads  # left unpatched


# ---------------------------------------------------------------------------------------------------------
# Distributed training and the example
# ---------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, results):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        outcome = OrderedDict()
        for patched in (False, True):
            model = _model("mobilenet_320").train()
            if patched:
                rpn_ops.patch_torchvision(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
            images = _images("cpu", sizes=((240, 320),), seed=10 + rank)
            torch.manual_seed(rank)
            loss_dict = ddp(images, _targets((3 + rank,), "cpu", image_size=(240, 320)))
            sum(loss_dict.values()).backward()
            optimizer.step()
            outcome[f"losses-{patched}"] = {k: v.item() for k, v in loss_dict.items()}
            outcome[f"weight-{patched}"] = model.rpn.head.conv[0][0].weight.detach().clone()
        results[rank] = outcome
    finally:
        dist.destroy_process_group()


def test_a_ddp_training_step_on_two_cpu_processes_matches_torchvision():
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        outcome = results[rank]
        assert all(torch.isfinite(torch.tensor(v)) for v in outcome["losses-True"].values())
        assert outcome["losses-True"] == outcome["losses-False"], rank
        assert torch.equal(outcome["weight-True"], outcome["weight-False"])  # the same all-reduced step
    assert torch.equal(results[0]["weight-True"], results[1]["weight-True"])


def test_the_training_example_runs_and_reports_equal_losses():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "examples", "train_tiny_faster_rcnn.py"), "--steps", "2",
         "--batch-size", "1", "--image-size", "160", "--threads", "1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchvision" in result.stdout and "rpn_ops" in result.stdout, result.stdout
    assert "same losses: True" in result.stdout, result.stdout
