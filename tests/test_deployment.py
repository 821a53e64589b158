"""Deployment, for the ops and for patched torchvision models: TorchScript (script, save, load in a fresh process
with the library alone), torch.jit.trace, torch.export (strict and non-strict) and AOTInductor packages. Each gives
the eager results. ONNX: test_onnx.py."""
import os
import subprocess
import sys
from collections import OrderedDict
from typing import Dict, List, Tuple

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import rpn_ops
from rpn_ops import workloads
from test_torchvision_patch import BUILDERS, assert_equal_detections

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning", "ignore:.*RCNN always returns")


class TwoLevels(nn.Module):
    """A backbone of two small feature maps (strides 4 and 8): the multi-level paths of the RPN and the ROI
    pooling, at a fraction of a real backbone's compile and run time."""

    out_channels = 8

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.coarse = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        fine = torch.relu(self.fine(images))
        return OrderedDict([("0", fine), ("1", torch.relu(self.coarse(fine)))])


def tiny_faster_rcnn(patched=True, box_score_thresh=0.0):
    """A randomly initialised Faster R-CNN on TwoLevels, its class scores spread out (a random predictor scores
    every class alike, and near-ties would leave the detections' order to rounding)."""
    torch.manual_seed(0)
    model = FasterRCNN(TwoLevels(), num_classes=3, min_size=128, max_size=160, representation_size=32,
                       rpn_anchor_generator=TorchvisionAnchorGenerator(((16,), (48,)), ((0.5, 1.0, 2.0),) * 2),
                       box_roi_pool=torchvision.ops.MultiScaleRoIAlign(["0", "1"], 7, 2),
                       rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=60, box_score_thresh=box_score_thresh,
                       box_detections_per_img=30)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(20.0)
    model.eval()
    return rpn_ops.patch_torchvision(model) if patched else model


def images_of(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


class Detections(nn.Module):
    """A detection model on a batch tensor, returning (boxes, scores, labels) per image: the form torch.export,
    AOTInductor and ONNX take."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tuple[Tuple[Tensor, Tensor, Tensor], ...]:
        return tuple((d["boxes"], d["scores"], d["labels"]) for d in self.model(list(images.unbind(0))))


def assert_same_outputs(got, expected):
    flat_got, flat_expected = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    assert len(flat_got) == len(flat_expected)
    for g, e in zip(flat_got, flat_expected):
        assert torch.equal(g, e), (g, e)


# ---------------------------------------------------------------------------------------------------------
# TorchScript
# ---------------------------------------------------------------------------------------------------------

class EveryOp(nn.Module):
    """Every public op and module of rpn_ops, scripted together."""

    def __init__(self):
        super().__init__()
        self.anchor_generator = rpn_ops.AnchorGenerator(((16,), (32, 64)), ((0.5, 1.0), (1.0,)))
        self.box_coder = rpn_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))
        self.sampler = rpn_ops.BalancedPositiveNegativeSampler(16, 0.25)

    def forward(self, boxes: Tensor, scores: Tensor, idxs: Tensor, gt: Tensor, codes: Tensor,
                images: Tensor, features: List[Tensor]) -> List[Tensor]:
        anchors = self.anchor_generator(ImageList(images, [(60, 70)]), features)
        labels, matched, targets = rpn_ops.assign_targets(anchors, [gt])
        positive, negative = self.sampler(labels)
        proposals = rpn_ops.generate_proposals(scores[:, None], codes, boxes, [(100, 120)], [boxes.shape[0]], 40, 10)
        assert torch.jit.isinstance(proposals, Tuple[List[Tensor], List[Tensor]])
        matches = rpn_ops.match_anchors(gt, boxes)
        assert isinstance(matches, Tensor)
        return [rpn_ops.box_iou(boxes, gt), rpn_ops.box_iou(gt.int(), boxes, "xywh"), rpn_ops.nms(boxes, scores, 0.5),
                rpn_ops.nms(boxes, scores, 0.5, 3), rpn_ops.batched_nms(boxes, scores, idxs, 0.5),
                rpn_ops.encode_boxes(boxes, boxes.flip(0), (1.0, 2.0, 1.0, 2.0)),
                rpn_ops.decode_boxes(codes, boxes, (1.0, 1.0, 1.0, 1.0)),
                self.box_coder.decode(codes, [boxes]), self.box_coder.encode([boxes], [boxes.flip(0)])[0],
                matches, anchors[0], labels[0], matched[0], targets[0], positive[0],
                negative[0], rpn_ops.grid_anchors([rpn_ops.cell_anchors([16.0], [0.5, 2.0])], [[3, 4]], [[8, 8]]),
                proposals[0][0], proposals[1][0]]


def every_op_inputs():
    boxes, scores = workloads.rpn_like_boxes(50, seed=4, image_size=(100, 120))
    g = torch.Generator().manual_seed(4)
    idxs, codes = torch.randint(0, 3, (50,), generator=g), 0.1 * torch.randn(50, 4, generator=g)
    features = [torch.rand(1, 2, 15, 18, generator=g), torch.rand(1, 2, 8, 9, generator=g)]
    return boxes, scores, idxs, boxes[::7] + 2.0, codes, torch.rand(1, 3, 60, 70, generator=g), features


def test_every_op_and_module_scripts_and_gives_the_eager_results():
    module, inputs = EveryOp(), every_op_inputs()
    scripted = torch.jit.script(module)
    torch.manual_seed(1)
    expected = module(*inputs)
    torch.manual_seed(1)
    assert_same_outputs(scripted(*inputs), expected)


LOAD_IN_A_FRESH_PROCESS = """
import sys
import torch
library, ops_file, model_file, data_file, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the test's: a convolution's sums depend on the thread count
torch.ops.load_library(library)  # what a C++ program does: the operators, without rpn_ops' Python
inputs, expected, images, detections = torch.load(data_file)
torch.manual_seed(1)
got = torch.jit.load(ops_file)(*inputs)
differ = [i for i, (g, e) in enumerate(zip(got, expected)) if not torch.equal(g, e)]
assert not differ, f"outputs {differ} differ"
import rpn_ops, torchvision  # a scripted model holds torchvision's ROI align
got = torch.jit.load(model_file)(images)[1]
assert all(torch.equal(g[k], e[k]) for g, e in zip(got, detections) for k in e), "detections differ"
print("loaded")
"""


def test_scripted_ops_and_models_save_and_load_in_a_fresh_process(tmp_path):
    module, inputs = EveryOp(), every_op_inputs()
    torch.manual_seed(1)
    expected = module(*inputs)
    torch.jit.script(module).save(str(tmp_path / "ops.pt"))
    model = torch.jit.script(tiny_faster_rcnn())
    images = images_of((100, 120))
    with torch.no_grad():
        detections = model(images)[1]
    model.save(str(tmp_path / "model.pt"))
    torch.save((inputs, expected, images, detections), tmp_path / "data.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, rpn_ops.library_path(),
                             str(tmp_path / "ops.pt"), str(tmp_path / "model.pt"), str(tmp_path / "data.pt"),
                             str(torch.get_num_threads())],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["resnet50_fpn", "resnet50_fpn_v2", "mobilenet_320", "own_backbone", "maskrcnn",
                                  "keypointrcnn"])
def test_every_patched_rcnn_scripts_with_the_scripted_torchvision_models_detections(name):
    """Scripted, torchvision's models resize images slightly differently from eager mode; the scripted patched
    model gives the scripted torchvision model's detections, to the bit."""
    torch.manual_seed(0)
    model = BUILDERS[name](num_classes=2 if name == "keypointrcnn" else 5, box_score_thresh=0.0,
                           box_detections_per_img=10, rpn_post_nms_top_n_test=200).eval()
    images = images_of((200, 260))
    with torch.no_grad(), torch.jit.optimized_execution(False):
        expected = torch.jit.script(model)(images)[1]
        got = torch.jit.script(rpn_ops.patch_torchvision(model))(images)[1]
    assert_equal_detections(expected, got)


def test_traced_patched_model_gives_the_eager_detections_for_other_image_sizes():
    """The trace records the anchors from the traced feature-map sizes, as torchvision's does, so it holds for
    images of another size than the traced one."""
    model = Detections(rpn_ops.patch_torchvision(BUILDERS["mobilenet_320"](num_classes=5).eval()))
    traced = torch.jit.trace(model, torch.stack(images_of((240, 320))), check_trace=False)
    for size in ((240, 320), (300, 260)):
        images = torch.stack(images_of(size, seed=3))
        with torch.no_grad():
            assert_same_outputs(traced(images), model(images))


# ---------------------------------------------------------------------------------------------------------
# torch.export and AOTInductor
# ---------------------------------------------------------------------------------------------------------

class ProposalsOf(nn.Module):
    def __init__(self, rpn):
        super().__init__()
        self.rpn = rpn

    def forward(self, images: Tensor, features: Dict[str, Tensor]) -> List[Tensor]:
        return self.rpn(ImageList(images, [tuple(images.shape[-2:])] * images.shape[0]), features)[0]


def rpn_inputs(model):
    images = torch.stack(images_of((128, 160), (128, 160)))
    with torch.no_grad():
        return images, model.backbone(images)


@pytest.mark.parametrize("strict", [False, True])
def test_patched_rpn_exports_where_torchvisions_does_not(strict):
    """torchvision's RPN branches on data-dependent sizes (batched_nms' switch point), which torch.export cannot
    trace; the patched RPN exports, and the exported program gives the eager proposals."""
    model = tiny_faster_rcnn(patched=False)
    images, features = rpn_inputs(model)
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(ProposalsOf(model.rpn), (images, features), strict=strict)
    proposals = ProposalsOf(rpn_ops.patch_torchvision(model).rpn)
    exported = torch.export.export(proposals, (images, features), strict=strict).module()
    other_features = OrderedDict((k, torch.rand_like(v)) for k, v in features.items())
    for inputs in ((images, features), (images, other_features)):
        with torch.no_grad():
            assert_same_outputs(exported(*inputs), proposals(*inputs))


class HeadsOf(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.roi_heads = model.roi_heads

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor]) -> List[Tuple[Tensor, Tensor, Tensor]]:
        detections = self.roi_heads(features, proposals, [(128, 160)] * len(proposals))[0]
        return [(d["boxes"], d["scores"], d["labels"]) for d in detections]


@pytest.mark.parametrize("strict", [False, True])
def test_patched_roi_heads_export(strict):
    model = tiny_faster_rcnn()
    images, features = rpn_inputs(model)
    with torch.no_grad():
        proposals = [p[:50] for p in ProposalsOf(model.rpn)(images, features)]  # a fixed number per image
    heads = HeadsOf(model)
    exported = torch.export.export(heads, (features, proposals), strict=strict).module()
    with torch.no_grad():
        assert_same_outputs(exported(features, proposals), heads(features, proposals))


@pytest.fixture(scope="module")
def exported_faster_rcnn():
    """The whole patched model, exported (strict) for a batch of two 128 x 160 images: non-strict export stops in
    torchvision's MultiScaleRoIAlign (len() of the data-dependent number of proposals)."""
    model = Detections(tiny_faster_rcnn())
    images = torch.stack(images_of((128, 160), (128, 160)))
    return model, images, torch.export.export(model, (images,), strict=True)


def test_whole_patched_faster_rcnn_exports(exported_faster_rcnn):
    model, images, exported = exported_faster_rcnn
    for batch in (images, torch.rand_like(images)):
        with torch.no_grad():
            assert_same_outputs(exported.module()(batch), model(batch))


def test_aoti_package_of_the_patched_faster_rcnn_gives_the_eager_detections(exported_faster_rcnn, tmp_path):
    """Boxes and labels to the bit; scores to float32 rounding (Inductor fuses the ROI heads' softmax)."""
    model, images, exported = exported_faster_rcnn
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(package)
    with torch.no_grad():
        for got, expected in zip(loaded(images), model(images)):
            assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
            torch.testing.assert_close(got[1], expected[1])
