"""rpn_ops.dense_detections: a one-stage detector's detections (torchvision's RetinaNet and SSD
postprocess_detections) for a batch in one call. The plain-PyTorch reference against torchvision itself; the
operator against the reference on every device (the spec's order among equal scores included), for every form of
its inputs, and against torchvision's models; bad input; opcheck and torch.compile."""
import math

import pytest
import torch
from torch import nn
from torchvision.models.detection import fcos as tv_fcos
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection import ssd as tv_ssd
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

import emulator
import rpn_ops
from helpers import compiles, cpu_kernels, emulated, needs_cuda
from rpn_ops import reference, workloads

# The arguments without a default in the reference, at the operator's defaults (RetinaNet's).
DEFAULTS = dict(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=300)
RETINANET_STRIDES = (8, 16, 32, 64, 128)
SSD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def one_by_one_sigmoid(logits):
    """torch.sigmoid as its CUDA kernel computes it: each element alone (emulator._cuda_sigmoid)."""
    return emulator._cuda_sigmoid(torch.ops.aten.sigmoid.default, logits)


def cuda_decode(rel_codes, boxes, weights, bbox_xform_clip):
    """decode_boxes as on CUDA: the codes divided by the weights by multiplying with their reciprocals."""
    return reference.decode_boxes(emulator.cuda_divided_codes(rel_codes, weights), boxes, (1.0,) * 4,
                                  bbox_xform_clip)


class Scene:
    """One-stage head outputs for a padded batch: [B, A, C] class logits and [B, A, 4] deltas (levels concatenated
    along A, as RetinaNet's and SSD's heads give them) over per-image [A, 4] anchors."""

    def __init__(self, anchors, num_anchors_per_level, image_sizes, num_classes, seed=0, dtype=torch.float32,
                 deltas_dtype=None, generator=None, grid_sizes=None, batch_size=None):
        self.anchors, self.num_anchors_per_level, self.image_sizes = anchors, num_anchors_per_level, image_sizes
        self.generator, self.grid_sizes, self.batch_size = generator, grid_sizes, batch_size
        device = anchors[0].device
        g = torch.Generator().manual_seed(seed)
        shape = (len(image_sizes), sum(num_anchors_per_level))
        self.logits = (torch.randn(*shape, num_classes, generator=g) * 2 - 3).to(dtype=dtype, device=device)
        self.deltas = (torch.randn(*shape, 4, generator=g) * 0.5).to(dtype=deltas_dtype or dtype, device=device)
        self.seed = seed
        self.softmax = False

    @property
    def device(self):
        return self.logits.device

    def grid(self, dtype=torch.float32):
        return rpn_ops.AnchorGrid.from_generator(self.generator, self.batch_size, self.grid_sizes, dtype=dtype,
                                                 device=self.device)

    def ours(self, anchors=None, padded=False, **settings):
        return rpn_ops.dense_detections(self.logits, self.deltas, self.anchors if anchors is None else anchors,
                                        self.image_sizes, self.num_anchors_per_level, padded=padded, **settings)

    def reference(self, **settings):
        """The reference's detections as the operator computes them on this device: on the emulated CUDA device,
        each sigmoid alone, the deltas divided by the weights as CUDA divides, square roots correctly rounded."""
        settings = dict(DEFAULTS, **settings)
        if emulated():
            settings.update(sigmoid=one_by_one_sigmoid, decode=cuda_decode, sqrt=emulator.cuda_sqrt)
        with cpu_kernels():
            return reference.dense_detections(self.logits, self.deltas, self.anchors, self.image_sizes,
                                              self.num_anchors_per_level, **settings)

    def without_candidates(self, b):
        """Image b's scores all near 0, also under softmax (whose background class takes all)."""
        self.logits[b] = -30.0
        self.logits[b, :, 0] = 30.0 if self.softmax else -30.0
        return self

    def scores(self, b, activation="sigmoid", sigmoid=torch.sigmoid):
        """Image b's [A, C] scores, in the reference's bits."""
        logits = self.logits[b]
        if activation == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.cat([sigmoid(part.contiguous()) for part in logits.split(self.num_anchors_per_level)])

    def break_ties(self, activation="sigmoid", score_thresh=0.05):
        """Logits of anchors redrawn until no two candidates of an image have the same score (torchvision orders
        equal scores as its sorts happen to: only the spec's order is deterministic)."""
        g = torch.Generator().manual_seed(self.seed + 1000)
        for _ in range(50):
            tied = torch.zeros(self.logits.shape[:2], dtype=torch.bool, device=self.device)
            for b in range(len(self.image_sizes)):
                for sigmoid in (torch.sigmoid, one_by_one_sigmoid):
                    scores = self.scores(b, activation, sigmoid)
                    candidate = scores > score_thresh
                    if activation == "softmax":
                        candidate[:, 0] = False
                    values, counts = torch.unique(scores[candidate], return_counts=True)
                    tied[b] |= (torch.isin(scores, values[counts > 1]) & candidate).any(1)
            if not tied.any():
                return self
            fresh = torch.randn(int(tied.sum()), self.logits.shape[2], generator=g) * 2 - 3
            self.logits[tied] = fresh.to(self.logits)
        raise AssertionError("could not draw logits without ties")

    def saturate(self, fraction=0.3, classes=(1, 2)):
        """Logits of 40 and 30 (sigmoid and softmax exactly 1.0) on a random `fraction` of anchors for `classes`,
        and repeated logit rows: many equal scores, at every step (top-k, NMS order, the detections_per_img cut)."""
        g = torch.Generator().manual_seed(self.seed + 2000)
        batch, anchors, num_classes = self.logits.shape
        for c in classes:
            if c < num_classes:
                chosen = torch.rand(batch, anchors, generator=g) < fraction
                value = torch.where(torch.rand(batch, anchors, generator=g) < 0.5, 40.0, 30.0)
                self.logits[..., c] = torch.where(chosen.to(self.device), value.to(self.logits), self.logits[..., c])
        self.logits[:, 1::5] = self.logits[:, :1]  # one logit row repeated on every fifth anchor
        return self


def grid_scene(batch=2, image_size=(48, 64), num_classes=4, strides=(8, 16, 32), sizes=None, generator=None,
               device="cpu", **options):
    """A scene over an AnchorGenerator's anchors of a padded batch (images slightly smaller, workloads.fpn_batch).
    By default 3 cell anchors per position: 192 anchors for a 48 x 64 batch."""
    if generator is None:
        sizes = sizes or tuple((32 * 2 ** level,) for level in range(len(strides)))
        generator = rpn_ops.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    images, features = workloads.fpn_batch(batch, image_size, device=device, strides=strides)
    anchors = generator(ImageList(images.tensors, images.image_sizes), features)
    grid_sizes = [tuple(f.shape[-2:]) for f in features]
    per_level = [h * w * len(cells) for (h, w), cells in zip(grid_sizes, generator.cell_anchors)]
    return Scene(list(anchors), per_level, images.image_sizes, num_classes, generator=generator,
                 grid_sizes=grid_sizes, batch_size=image_size, **options)


def ssd_scene(batch=2, image_size=(48, 64), num_classes=5, device="cpu", **options):
    """A scene over SSD's default boxes (DefaultBoxGenerator, 4 and 6 per position) of three feature maps."""
    generator = DefaultBoxGenerator([[2], [2, 3], [2, 3]])
    images, features = workloads.fpn_batch(batch, image_size, device=device, strides=(8, 16, 32))
    anchors = generator(ImageList(images.tensors, images.image_sizes), features)
    per_level = [f.shape[-2] * f.shape[-1] * k for f, k in zip(features, generator.num_anchors_per_location())]
    return Scene(list(anchors), per_level, images.image_sizes, num_classes, **options)


def odd_levels_scene(device="cpu", seed=0):
    """Random anchors in levels of small odd sizes (3 classes), on 64 x 96 images."""
    levels = [5, 3, 7, 1, 9, 2, 6, 4, 11, 3, 13, 1, 5, 8, 7, 2]
    anchors = workloads.random_boxes(sum(levels), seed=seed, scale=80.0, min_size=4.0).to(device)
    return Scene([anchors, anchors], levels, [(64, 96), (60, 90)], 3, seed=seed)


def assert_same_detections(got, expected):
    """The same boxes, scores and labels per image, equal value for value, in the same order, of the same dtypes
    and on the same device."""
    assert len(got) == 3 and len(expected) == 3
    for name, got_images, expected_images in zip(("boxes", "scores", "labels"), got, expected):
        assert len(got_images) == len(expected_images), name
        for image, (g, e) in enumerate(zip(got_images, expected_images)):
            assert g.dtype == e.dtype and g.device.type == e.device.type, (name, image, g.dtype, e.dtype, g.device)
            assert g.shape == e.shape, f"image {image}: {name} of shape {tuple(g.shape)}, expected {tuple(e.shape)}"
            if not torch.equal(g.cpu(), e.cpu()):
                differ = torch.nonzero((g.cpu() != e.cpu()).reshape(len(g), -1).any(1))[:, 0]
                first = int(differ[0])
                raise AssertionError(f"image {image}: {name} differ at {len(differ)} of {len(g)} rows, first at "
                                     f"{first}: got {g[first].tolist()}, expected {e[first].tolist()}")


def rows(boxes, scores, labels):
    """(score, label, x1, y1, x2, y2) rows sorted: the same set whatever the order among equal scores."""
    return sorted(map(tuple, torch.cat([scores.double()[:, None], labels.double()[:, None], boxes.double()], 1)
                      .cpu().tolist()))


def assert_same_detections_up_to_ties(got, expected):
    """The same score sequence per image, and the same detections in any order among equal scores."""
    for b, (boxes, scores, labels) in enumerate(zip(*got)):
        assert torch.equal(scores, expected[1][b]), f"image {b}: scores differ"
        assert rows(boxes, scores, labels) == rows(expected[0][b], expected[1][b], expected[2][b]), b


# ---------------------------------------------------------------------------------------------------------
# torchvision's models


class NoBackbone(nn.Module):
    """Stands for a backbone: postprocess_detections needs none, the models' constructors its channel counts."""

    out_channels = 8


def torchvision_retinanet(num_classes, **settings):
    """torchvision's RetinaNet (RetinaNet-ResNet50-FPN's anchors, box coder and settings, unless given)."""
    return tv_retinanet.RetinaNet(NoBackbone(), num_classes, head=nn.Identity(), **settings).eval()


def torchvision_fcos(num_classes, **settings):
    return tv_fcos.FCOS(NoBackbone(), num_classes, head=nn.Identity(), **settings).eval()


def torchvision_ssd(num_classes, **settings):
    backbone = NoBackbone()
    backbone.out_channels = [8, 8, 8]
    return tv_ssd.SSD(backbone, DefaultBoxGenerator([[2], [2, 3], [2, 3]]), (300, 300), num_classes,
                      head=nn.Identity(), **settings).eval()


def retinanet_detections(model, scene):
    """model.postprocess_detections on the scene's head outputs, split by level as RetinaNet.forward splits them."""
    levels = scene.num_anchors_per_level
    head_outputs = {"cls_logits": list(scene.logits.split(levels, dim=1)),
                    "bbox_regression": list(scene.deltas.split(levels, dim=1))}
    anchors = [list(a.split(levels)) for a in scene.anchors]
    with torch.no_grad(), torchvision_on_the_device():
        detections = model.postprocess_detections(head_outputs, anchors, scene.image_sizes)
    return [d["boxes"] for d in detections], [d["scores"] for d in detections], [d["labels"] for d in detections]


def fcos_detections(model, scene):
    """FCOS.postprocess_detections on the scene's head outputs (its centerness too), split by level."""
    levels = scene.num_anchors_per_level
    head_outputs = {"cls_logits": list(scene.logits.split(levels, dim=1)),
                    "bbox_regression": list(scene.deltas.split(levels, dim=1)),
                    "bbox_ctrness": list(scene.centerness.unsqueeze(2).split(levels, dim=1))}
    anchors = [list(a.split(levels)) for a in scene.anchors]
    with torch.no_grad(), torchvision_on_the_device():
        detections = model.postprocess_detections(head_outputs, anchors, scene.image_sizes)
    return [d["boxes"] for d in detections], [d["scores"] for d in detections], [d["labels"] for d in detections]


def with_centerness(scene, seed=0):
    """FCOS's head outputs: centerness logits per anchor, and distances to the sides as deltas."""
    g = torch.Generator().manual_seed(seed + 3000)
    scene.centerness = (torch.randn(scene.logits.shape[:2], generator=g) * 2).to(scene.logits)
    scene.deltas = scene.deltas.abs()
    return scene


def fcos_settings(model, scene):
    return dict(score_thresh=model.score_thresh, topk_candidates=model.topk_candidates, nms_thresh=model.nms_thresh,
                detections_per_img=model.detections_per_img, centerness=scene.centerness, box_coding="linear")


def ssd_detections(model, scene):
    head_outputs = {"cls_logits": scene.logits, "bbox_regression": scene.deltas}
    with torch.no_grad(), torchvision_on_the_device():
        detections = model.postprocess_detections(head_outputs, scene.anchors, scene.image_sizes)
    return [d["boxes"] for d in detections], [d["scores"] for d in detections], [d["labels"] for d in detections]


def torchvision_on_the_device():
    """torchvision as it computes on the device: on the emulated one, its sigmoid as on a GPU (its division by the
    box coder's weights follows CUDA there anyway)."""
    return emulator.scores_as_on_cuda() if emulated() else cpu_kernels()


def retinanet_settings(model):
    return dict(score_thresh=model.score_thresh, topk_candidates=model.topk_candidates, nms_thresh=model.nms_thresh,
                detections_per_img=model.detections_per_img, weights=model.box_coder.weights,
                bbox_xform_clip=model.box_coder.bbox_xform_clip)


def ssd_settings(model):
    return dict(retinanet_settings(model), activation="softmax", topk_per="class")


def retinanet_scene(model, num_classes, batch=2, image_size=(160, 224), device="cpu", seed=0):
    """A scene over the anchors of the model's generator, for RetinaNet's five levels."""
    return grid_scene(batch, image_size, num_classes, RETINANET_STRIDES, generator=model.anchor_generator,
                      device=device, seed=seed)


def spaced_ties(scene, activation, stride_anchors):
    """Saturated logits (score exactly 1.0) on anchors that overlap none of the others, with zero deltas, one class
    per anchor in turn: ties everywhere in the order, none of which NMS decides between, so that torchvision's
    detections are the reference's up to the order among equal scores."""
    first_class = 1 if activation == "softmax" else 0
    num_classes = scene.logits.shape[2]
    for b in range(len(scene.image_sizes)):
        anchors = scene.anchors[b]
        grown = anchors + torch.tensor([-4.0, -4.0, 4.0, 4.0], device=scene.device)  # a gap: rounding overlaps none
        chosen = []
        for a in range(0, len(anchors), stride_anchors):
            if not chosen or (reference.box_iou(grown[a:a + 1], grown[chosen]) == 0).all():
                chosen.append(a)
        for k, a in enumerate(chosen):
            scene.logits[b, a] = -30.0
            scene.logits[b, a, first_class + k % (num_classes - first_class)] = 40.0
            scene.deltas[b, a] = 0.0
        assert len(chosen) >= 6
    return scene


# ---------------------------------------------------------------------------------------------------------
# The reference is torchvision


@pytest.mark.parametrize("settings", ["defaults", "top_k", "detections", "threshold_at_a_score"])
def test_reference_is_torchvisions_retinanet_to_the_bit(settings):
    model = torchvision_retinanet(5, topk_candidates=20 if settings == "top_k" else 1000,
                                  detections_per_img=25 if settings == "detections" else 300)
    scene = retinanet_scene(model, 5).break_ties(score_thresh=model.score_thresh)
    if settings == "threshold_at_a_score":  # a score equal to the threshold is no candidate
        model.score_thresh = float(scene.scores(0).flatten().sort(descending=True).values[300])
    expected = retinanet_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **retinanet_settings(model))
    assert all(len(boxes) > 20 for boxes in expected[0])
    assert_same_detections(got, expected)


def test_reference_takes_the_sigmoid_per_level_as_torchvision():
    """torch.sigmoid's CPU kernel rounds the vectorised part of a tensor and its scalar tail differently: small
    levels of odd sizes (scalar only), every candidate kept, give the bits of torchvision's per-level calls."""
    model = torchvision_retinanet(3, nms_thresh=1.0, detections_per_img=10_000)
    scene = odd_levels_scene().break_ties()
    expected = retinanet_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **retinanet_settings(model))
    assert_same_detections(got, expected)
    whole = torch.sigmoid(scene.logits[0]).flatten()
    assert (whole[whole > 0.05] != scene.scores(0).flatten()[whole > 0.05]).any()  # the per-level bits matter


@pytest.mark.parametrize("settings", [{}, dict(topk_candidates=30, detections_per_img=40, score_thresh=0.2)],
                         ids=["defaults", "cuts"])
def test_reference_is_torchvisions_ssd_to_the_bit(settings):
    model = torchvision_ssd(6, **settings)
    scene = ssd_scene(image_size=(96, 128), num_classes=6)
    scene.logits *= 1.5  # scores from near 0 to near 1
    scene.break_ties("softmax", model.score_thresh)
    expected = ssd_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **ssd_settings(model))
    assert all(len(boxes) > 20 for boxes in expected[0])
    assert_same_detections(got, expected)


@pytest.mark.parametrize("settings", [{}, dict(topk_candidates=15, detections_per_img=20, score_thresh=0.3)],
                         ids=["defaults", "cuts"])
def test_reference_is_torchvisions_fcos_to_the_bit(settings):
    model = torchvision_fcos(4, **settings)
    scene = with_centerness(retinanet_scene(model, 4, image_size=(96, 128), seed=17), seed=17)
    expected = fcos_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **fcos_settings(model, scene))
    assert all(len(scores) > 10 and len(scores.unique()) == len(scores) for scores in expected[1])
    assert_same_detections(got, expected)


def test_reference_with_ties_is_torchvisions_up_to_their_order():
    model = torchvision_retinanet(5)
    scene = spaced_ties(retinanet_scene(model, 5), "sigmoid", 13)
    expected = retinanet_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **retinanet_settings(model))
    assert all((scores == 1.0).sum() >= 6 for scores in got[1])
    assert_same_detections_up_to_ties(got, expected)

    model = torchvision_ssd(6)
    scene = spaced_ties(ssd_scene(image_size=(96, 128), num_classes=6), "softmax", 7)
    expected = ssd_detections(model, scene)
    got = reference.dense_detections(scene.logits, scene.deltas, scene.anchors, scene.image_sizes,
                                     scene.num_anchors_per_level, **ssd_settings(model))
    assert all((scores == 1.0).sum() >= 6 for scores in got[1])
    assert_same_detections_up_to_ties(got, expected)


# ---------------------------------------------------------------------------------------------------------
# The operator is the reference


SETTINGS = {
    "defaults": {},
    "top_k_and_detections_cut": dict(topk_candidates=5, detections_per_img=4),
    "more_detections_than_candidates": dict(topk_candidates=100_000, detections_per_img=100_000),
    "every_score_passes": dict(score_thresh=0.0),
    "negative_threshold": dict(score_thresh=-1.0, topk_candidates=50),
    "no_score_passes": dict(score_thresh=1.0),
    "threshold_above_one": dict(score_thresh=2.0),
    "nms_suppresses_every_overlap": dict(nms_thresh=0.0),
    "nms_suppresses_nothing": dict(nms_thresh=1.0, detections_per_img=100_000),
    "no_candidates_kept": dict(topk_candidates=0),
    "no_detections_kept": dict(detections_per_img=0),
    "ssd_weights_and_clip": dict(weights=SSD_WEIGHTS, bbox_xform_clip=0.05),  # dw / 5, dh / 5 often above
}
KINDS = [("sigmoid", "level"), ("sigmoid", "class"), ("softmax", "class"), ("softmax", "level")]


@pytest.mark.parametrize("activation, topk_per", KINDS, ids=["-".join(kind) for kind in KINDS])
@pytest.mark.parametrize("peaked", [False, True], ids=["random", "peaked"])
def test_detections_are_the_references(device, activation, topk_per, peaked):
    """Every setting, on random logits and on peaked ones (hundreds of scores exactly 1.0 and repeated rows):
    the reference's detections, in its order among equal scores."""
    scene = grid_scene(device=device, seed=3)
    if peaked:
        scene.saturate()
    for name, settings in SETTINGS.items():
        settings = dict(settings, activation=activation, topk_per=topk_per)
        got = scene.ours(**settings)
        assert_same_detections(got, scene.reference(**settings))
        counts = [len(scores) for scores in got[1]]
        if name in ("no_score_passes", "threshold_above_one", "no_candidates_kept", "no_detections_kept"):
            assert counts == [0, 0], name
        elif name == "top_k_and_detections_cut":
            assert counts == [4, 4], name
        else:
            assert min(counts) > 4, (name, counts)
        if peaked and name == "defaults":
            assert all((scores == 1.0).sum() > 20 for scores in got[1])


@pytest.mark.parametrize("peaked", [False, True], ids=["random", "peaked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fcos_detections_are_the_references(device, peaked, dtype):
    """FCOS's scores sqrt(sigmoid(class) * sigmoid(centerness)) and BoxLinearCoder's decode, every setting (the
    threshold also at an exact score, whose square bounds the class scores' scan); peaked: scores exactly 1.0."""
    scene = with_centerness(grid_scene(device=device, seed=18, dtype=dtype), seed=18)
    if peaked:
        scene.saturate()
        scene.centerness[:, ::2] = 40.0
    at_a_score = float(scene.reference(score_thresh=0.0, centerness=scene.centerness)[1][0][40])
    for name, settings in dict(SETTINGS, threshold_at_a_score=dict(score_thresh=at_a_score)).items():
        if "weights" in settings:
            continue
        for coding in ("linear", "deltas"):
            settings = dict(settings, centerness=scene.centerness, box_coding=coding)
            got = scene.ours(**settings)
            assert_same_detections(got, scene.reference(**settings))
            if name == "defaults":
                assert min(len(scores) for scores in got[1]) > 20
                assert not peaked or all((scores == 1.0).sum() > 10 for scores in got[1])
    settings = dict(centerness=scene.centerness.unsqueeze(2), box_coding="linear")  # [B, A, 1], as FCOS's head
    assert_same_detections(scene.ours(**settings), scene.reference(**settings))


@pytest.mark.parametrize("activation, topk_per", KINDS[:3], ids=["-".join(kind) for kind in KINDS[:3]])
def test_nan_scores_are_never_candidates(device, activation, topk_per):
    """NaN logits (NaN scores; under softmax the whole anchor's) and infinite ones (sigmoid 0 and 1)."""
    scene = grid_scene(device=device, seed=16)
    scene.logits[:, ::7, 1] = float("nan")
    scene.logits[:, 3::11, 2] = float("inf")
    scene.logits[:, 5::13, 3] = -float("inf")
    settings = dict(activation=activation, topk_per=topk_per, score_thresh=-1.0, detections_per_img=1000)
    got = scene.ours(**settings)
    assert_same_detections(got, scene.reference(**settings))
    assert all(not scores.isnan().any() and len(scores) > 20 for scores in got[1])


def test_empty_levels_images_without_candidates_and_no_anchors(device):
    scene = grid_scene(batch=3, device=device, seed=4)
    levels = scene.num_anchors_per_level
    scene.num_anchors_per_level = [0, levels[0], 0, 0, levels[1], levels[2], 0]
    for settings in ({}, dict(activation="softmax", topk_per="class")):
        scene.softmax = bool(settings)
        scene.without_candidates(1)
        got = scene.ours(**settings)
        assert_same_detections(got, scene.reference(**settings))
        assert len(got[1][1]) == 0 and len(got[1][0]) > 0
    empty = Scene([scene.anchors[0][:0]] * 2, [0, 0], scene.image_sizes[:2], 4)
    got = empty.ours()
    assert [len(s) for s in got[1]] == [0, 0] and got[0][0].shape == (0, 4)
    assert_same_detections(got, empty.reference())


def test_softmax_of_one_class_has_no_candidates(device):
    scene = grid_scene(num_classes=1, device=device, seed=5)
    for topk_per in ("level", "class"):
        got = scene.ours(score_thresh=-1.0, activation="softmax", topk_per=topk_per)
        assert [len(s) for s in got[1]] == [0, 0]
        assert_same_detections(got, scene.reference(score_thresh=-1.0, activation="softmax", topk_per=topk_per))
    got = scene.ours(score_thresh=-1.0)  # sigmoid: every anchor's one class
    assert_same_detections(got, scene.reference(score_thresh=-1.0))


def test_a_batch_of_no_images(device):
    scene = grid_scene(device=device)
    logits, deltas = scene.logits[:0], scene.deltas[:0]
    boxes, scores, labels, counts = rpn_ops.dense_detections(logits, deltas, scene.anchors[0], [],
                                                             scene.num_anchors_per_level, padded=True)
    assert boxes.shape == (0, 300, 4) and scores.shape == (0, 300) and labels.shape == counts.shape[:1] + (300,)
    assert counts.shape == (0,) and counts.dtype == labels.dtype == torch.int64
    assert rpn_ops.dense_detections(logits, deltas, scene.anchors[0], [], scene.num_anchors_per_level) == (
        [], [], [])


@pytest.mark.parametrize("logits_dtype, deltas_dtype", [
    (torch.float64, torch.float64), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)],
    ids=lambda dtype: str(dtype).replace("torch.", ""))
def test_dtypes(device, logits_dtype, deltas_dtype):
    """Scores and boxes of the heads' dtype, each step as torchvision rounds it (the reference)."""
    scene = grid_scene(device=device, seed=6, dtype=logits_dtype, deltas_dtype=deltas_dtype)
    for settings in ({}, dict(activation="softmax", topk_per="class")):
        got = scene.ours(**settings)
        assert got[0][0].dtype == deltas_dtype and got[1][0].dtype == logits_dtype
        assert_same_detections(got, scene.reference(**settings))


def test_non_contiguous_inputs_give_the_same_detections(device):
    scene = grid_scene(device=device, seed=7)
    scene.saturate(fraction=0.1)
    for settings in ({}, dict(activation="softmax", topk_per="level")):
        expected = scene.ours(**settings)
        assert_same_detections(expected, scene.reference(**settings))
        layouts = Scene.__new__(Scene)
        layouts.__dict__.update(scene.__dict__)
        layouts.logits = scene.logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # classes outermost
        layouts.deltas = scene.deltas.transpose(0, 2).contiguous().transpose(0, 2)
        layouts.anchors = [a.t().contiguous().t() for a in scene.anchors]
        assert not layouts.logits.is_contiguous() and not layouts.deltas.is_contiguous()
        assert_same_detections(layouts.ours(**settings), expected)
        wide = torch.zeros(*scene.logits.shape[:2], 2 * scene.logits.shape[2], dtype=scene.logits.dtype,
                           device=scene.device)
        wide[..., ::2] = scene.logits  # every other element
        layouts.logits = wide[..., ::2]
        assert_same_detections(layouts.ours(**settings), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_form_of_anchors_gives_the_same_detections(device, dtype):
    """One [A, 4] tensor for all images, one per image, a [B, A, 4] tensor, or an AnchorGrid (nothing
    materialised)."""
    scene = grid_scene(device=device, seed=8, dtype=dtype)
    scene.anchors = [a.to(dtype) for a in scene.anchors]
    for settings in ({}, dict(activation="softmax", topk_per="class")):
        expected = scene.ours(**settings)
        assert_same_detections(expected, scene.reference(**settings))
        for anchors in (scene.anchors[0], torch.stack(scene.anchors), scene.grid(dtype),
                        torch.stack(scene.anchors).transpose(1, 2).contiguous().transpose(1, 2)):
            assert_same_detections(scene.ours(anchors=anchors, **settings), expected)


def test_an_anchor_grid_of_retinanets_generator_is_its_anchors(device):
    model = torchvision_retinanet(3)
    scene = retinanet_scene(model, 3, image_size=(64, 96), device=device, seed=9)
    assert_same_detections(scene.ours(anchors=scene.grid()), scene.ours())


@pytest.mark.parametrize("settings", [{}, dict(topk_candidates=6, detections_per_img=5, score_thresh=0.3),
                                      dict(activation="softmax", topk_per="class", detections_per_img=1000)],
                         ids=["defaults", "cuts", "softmax"])
def test_padded_outputs_hold_the_lists(device, settings):
    scene = grid_scene(batch=3, device=device, seed=10)
    scene.softmax = settings.get("activation") == "softmax"
    scene.without_candidates(2)
    boxes, scores, labels = scene.ours(**settings)
    padded_boxes, padded_scores, padded_labels, counts = scene.ours(padded=True, **settings)
    limit = settings.get("detections_per_img", DEFAULTS["detections_per_img"])
    assert padded_boxes.shape == (3, limit, 4) and padded_scores.shape == padded_labels.shape == (3, limit)
    assert counts.dtype == padded_labels.dtype == torch.int64 and padded_scores.dtype == scene.logits.dtype
    assert counts.tolist() == [len(s) for s in scores] and counts[2] == 0 and counts[0] > 0
    for b in range(3):
        n = len(scores[b])
        assert torch.equal(padded_boxes[b, :n], boxes[b]) and torch.equal(padded_scores[b, :n], scores[b])
        assert torch.equal(padded_labels[b, :n], labels[b])
        assert (padded_boxes[b, n:] == 0).all() and (padded_scores[b, n:] == 0).all()
        assert (padded_labels[b, n:] == 0).all()


def test_cuda_kernels_match_the_cpu_kernels(gpu):
    """On tie-free inputs the bits may differ between CPU and GPU only where torch's own kernels differ (sigmoid's
    rounding, the division by the weights): the CUDA kernels' detections are the reference's on the device."""
    scene = grid_scene(device=gpu, seed=11)
    scene.saturate()
    for settings in ({}, dict(activation="softmax", topk_per="class"), dict(weights=SSD_WEIGHTS)):
        assert_same_detections(scene.ours(**settings), scene.reference(**settings))


# ---------------------------------------------------------------------------------------------------------
# The operator is torchvision


def test_detections_are_torchvisions_retinanet(device):
    model = torchvision_retinanet(3)
    scene = retinanet_scene(model, 3, image_size=(64, 96), device=device, seed=12).break_ties()
    expected = retinanet_detections(model, scene)
    assert all(len(boxes) > 20 for boxes in expected[0])
    assert_same_detections(scene.ours(**retinanet_settings(model)), expected)
    model.topk_candidates, model.detections_per_img = 20, 15
    assert_same_detections(scene.ours(**retinanet_settings(model)), retinanet_detections(model, scene))


def test_detections_are_torchvisions_ssd(device):
    model = torchvision_ssd(5)
    scene = ssd_scene(device=device, seed=13)
    scene.logits *= 1.5
    scene.break_ties("softmax", model.score_thresh)
    expected = ssd_detections(model, scene)
    assert all(len(boxes) > 20 for boxes in expected[0])
    assert_same_detections(scene.ours(**ssd_settings(model)), expected)
    model.topk_candidates, model.detections_per_img, model.score_thresh = 10, 25, 0.2
    scene.break_ties("softmax", model.score_thresh)
    assert_same_detections(scene.ours(**ssd_settings(model)), ssd_detections(model, scene))


def test_detections_are_torchvisions_fcos(device):
    model = torchvision_fcos(3)
    scene = with_centerness(retinanet_scene(model, 3, image_size=(96, 128), device=device, seed=19), seed=19)
    expected = fcos_detections(model, scene)
    assert all(len(scores) > 10 and len(scores.unique()) == len(scores) for scores in expected[1])
    assert_same_detections(scene.ours(**fcos_settings(model, scene)), expected)
    model.topk_candidates, model.detections_per_img = 10, 12
    assert_same_detections(scene.ours(**fcos_settings(model, scene)), fcos_detections(model, scene))


def test_detections_take_the_sigmoid_per_level_as_torchvision(device):
    """Levels of small odd sizes, where torch.sigmoid's CPU bits differ from those of one call per image."""
    model = torchvision_retinanet(3, nms_thresh=1.0, detections_per_img=10_000)
    scene = odd_levels_scene(device).break_ties()
    expected = retinanet_detections(model, scene)
    assert_same_detections(scene.ours(**retinanet_settings(model)), expected)


# ---------------------------------------------------------------------------------------------------------
# PyTorch integration


def _op_args(scene, anchors=None, settings=()):
    settings = dict(dict(DEFAULTS, weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000 / 16),
                         activation="sigmoid", topk_per="level"), **dict(settings))
    head = (scene.logits, scene.deltas, scene.anchors if anchors is None else anchors,
            [s for size in scene.image_sizes for s in size], scene.num_anchors_per_level)
    return head + (settings["score_thresh"], settings["topk_candidates"], settings["nms_thresh"],
                   settings["detections_per_img"], list(settings["weights"]), settings["bbox_xform_clip"],
                   settings["activation"], settings["topk_per"])


def test_opcheck(device):
    scene = grid_scene(device=device, seed=14)
    scene.saturate(fraction=0.05)
    torch.library.opcheck(torch.ops.rpn_ops.dense_detections.default, _op_args(scene))
    torch.library.opcheck(torch.ops.rpn_ops.dense_detections.default,
                          _op_args(scene, [scene.anchors[0]], dict(activation="softmax", topk_per="class",
                                                                    detections_per_img=7)))
    grid = scene.grid()
    spec = (torch.cat(grid.cell_anchors), [len(c) for c in grid.cell_anchors],
            [s for size in grid.grid_sizes for s in size], [s for stride in grid.strides for s in stride])
    torch.library.opcheck(torch.ops.rpn_ops.dense_detections.default, _op_args(scene, []) + spec)
    torch.library.opcheck(torch.ops.rpn_ops.dense_detections.default, _op_args(scene),
                          dict(centerness=scene.logits[..., 0].clone(), box_coding="linear"))


@compiles
def test_torch_compile_fullgraph(device):
    scene = grid_scene(device=device, seed=15)

    def padded(logits, deltas, anchors):
        return rpn_ops.dense_detections(logits, deltas, anchors, scene.image_sizes, scene.num_anchors_per_level,
                                        detections_per_img=50, padded=True)

    for anchors in (scene.anchors, scene.grid()):
        torch._dynamo.reset()
        compiled = torch.compile(padded, fullgraph=True)
        got, expected = compiled(scene.logits, scene.deltas, anchors), padded(scene.logits, scene.deltas, anchors)
        assert expected[3].sum() > 0
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


def test_scripts():
    scene = grid_scene(seed=17)
    scene.saturate(fraction=0.1)
    scripted = torch.jit.script(rpn_ops.detections.detection_lists)
    for settings in ({}, dict(activation="softmax", topk_per="class", weights=SSD_WEIGHTS)):
        got = scripted(scene.logits, scene.deltas, scene.anchors, scene.image_sizes, scene.num_anchors_per_level,
                       **settings)
        assert_same_detections(got, scene.ours(**settings))


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error that names the argument


def _bad(scene, **change):
    args = dict(class_logits=scene.logits, box_regression=scene.deltas, anchors=scene.anchors,
                image_sizes=scene.image_sizes, num_anchors_per_level=scene.num_anchors_per_level)
    args.update(change)
    return rpn_ops.dense_detections(**args)


@pytest.mark.parametrize("change, error, message", [
    (lambda s: dict(class_logits=s.logits[0]), RuntimeError, r"class_logits must have shape \[B, A, C\]"),
    (lambda s: dict(class_logits=s.logits.int()), TypeError, "class_logits must be float16"),
    (lambda s: dict(box_regression=s.deltas.long()), TypeError, "box_regression must have the dtype of class_logits"),
    (lambda s: dict(box_regression=s.deltas.double()), TypeError, "box_regression must have the dtype of class_logits"),
    (lambda s: dict(class_logits=s.logits[:, 1:]), RuntimeError, "class_logits must have shape"),
    (lambda s: dict(num_anchors_per_level=s.num_anchors_per_level[:-1]), RuntimeError,
     "class_logits must have shape"),
    (lambda s: dict(image_sizes=s.image_sizes[:1]), RuntimeError, "B = 1 images"),
    (lambda s: dict(box_regression=s.deltas[:, :, :3]), RuntimeError, r"box_regression must have shape \[B, A, 4\]"),
    (lambda s: dict(box_regression=s.deltas[:1]), RuntimeError, "box_regression must have shape"),
    (lambda s: dict(num_anchors_per_level=[-1, s.num_anchors_per_level[0] + 1] + s.num_anchors_per_level[1:]),
     ValueError, r"num_anchors_per_level\[0\] must be >= 0"),
    (lambda s: dict(num_anchors_per_level=[]), ValueError, "num_anchors_per_level"),
    (lambda s: dict(score_thresh=float("nan")), ValueError, "score_thresh"),
    (lambda s: dict(nms_thresh=float("nan")), ValueError, "nms_thresh"),
    (lambda s: dict(topk_candidates=-1), ValueError, "topk_candidates must be >= 0"),
    (lambda s: dict(detections_per_img=-1), ValueError, "detections_per_img must be >= 0"),
    (lambda s: dict(activation="relu"), ValueError, "activation must be \"sigmoid\" or \"softmax\""),
    (lambda s: dict(topk_per="image"), ValueError, "topk_per must be \"level\" or \"class\""),
    (lambda s: dict(weights=(1.0, 1.0, 0.0, 1.0)), ValueError, "weights"),
    (lambda s: dict(weights=(1.0, 1.0, 1.0)), ValueError, "weights"),
    (lambda s: dict(bbox_xform_clip=float("nan")), ValueError, "bbox_xform_clip"),
    (lambda s: dict(anchors=[a[:-1] for a in s.anchors]), RuntimeError, r"anchors\[0\] must have shape"),
    (lambda s: dict(anchors=s.anchors * 2), ValueError, "one per image"),
    (lambda s: dict(anchors="anchors"), TypeError, "anchors must be a tensor"),
    (lambda s: dict(image_sizes=[(48, 64), (48,)]), ValueError, "must be a pair"),
    (lambda s: dict(box_coding="ltrb"), ValueError, "box_coding must be \"deltas\" or \"linear\""),
    (lambda s: dict(centerness=s.logits[..., 0], activation="softmax"), ValueError,
     "centerness goes with activation=\"sigmoid\""),
    (lambda s: dict(centerness=s.logits[:, 1:, 0]), RuntimeError, r"centerness must have shape \[B, A\] or"),
    (lambda s: dict(centerness=s.logits[..., :2]), RuntimeError, "centerness must have shape"),
    (lambda s: dict(centerness=s.logits[..., 0].double()), TypeError, "centerness must have the dtype of class_logits"),
    (lambda s: dict(centerness=[1.0]), TypeError, "centerness must be a tensor or None"),
])
def test_bad_input_raises_a_clear_error(device, change, error, message):
    scene = grid_scene(device=device)
    with pytest.raises(error, match=message):
        _bad(scene, **change(scene))


@needs_cuda
def test_inputs_on_another_device_are_rejected():
    scene = grid_scene()
    with pytest.raises(RuntimeError, match="box_regression must be on the same device as class_logits"):
        _bad(scene, box_regression=scene.deltas.cuda())
    with pytest.raises(RuntimeError, match="anchors"):
        _bad(scene, class_logits=scene.logits.cuda(), box_regression=scene.deltas.cuda())
