"""ONNX export of the ops and of a patched Faster R-CNN, with torch.onnx.export's default (dynamo) exporter and the
legacy one torchvision's ONNX tests use: graphs of standard ONNX operators only (rpn_ops not needed to run them),
which onnxruntime runs with the eager results."""
from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

import rpn_ops
from rpn_ops import workloads
from test_deployment import images_of, tiny_faster_rcnn

onnx = pytest.importorskip("onnx", reason="a test dependency (requirements.txt)")
onnxruntime = pytest.importorskip("onnxruntime", reason="a test dependency (requirements.txt)")
pytest.importorskip("onnxscript", reason="a test dependency (requirements.txt): the default exporter's translations")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::torch.jit.TracerWarning")


def onnx_session(path):
    graph = onnx.load(path)
    domains = {node.domain for node in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators: {domains}"
    return onnxruntime.InferenceSession(path)


def run_onnx(session, *inputs):
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


class OpsForOnnx(nn.Module):
    def forward(self, boxes: Tensor, scores: Tensor, idxs: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        return (rpn_ops.nms(boxes, scores, 0.5), rpn_ops.batched_nms(boxes, scores, idxs, 0.5),
                rpn_ops.box_iou(boxes, boxes[:5]))


@pytest.mark.parametrize("dynamo", [False, True])
def test_ops_export_to_standard_onnx_operators(dynamo, tmp_path):
    boxes, scores = workloads.rpn_like_boxes(80, seed=6)
    idxs = workloads.categories(80, 3, seed=6)
    path = str(tmp_path / "ops.onnx")
    torch.onnx.export(OpsForOnnx(), (boxes, scores, idxs), path, dynamo=dynamo)
    got = run_onnx(onnx_session(path), boxes, scores, idxs)
    for g, e in zip(got, OpsForOnnx()(boxes, scores, idxs)):
        torch.testing.assert_close(torch.from_numpy(g), e)


def assert_onnx_detections(got, expected):
    """torchvision's ONNX tests' tolerance (rtol 1e-3, atol 1e-5); labels exactly."""
    boxes, labels, scores = (torch.from_numpy(g) for g in got)
    torch.testing.assert_close(boxes, expected["boxes"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(scores, expected["scores"], rtol=1e-3, atol=1e-5)
    assert torch.equal(labels, expected["labels"])


BLANK_IMAGE = [torch.full((3, 100, 100), 0.3)]  # no detection above the score threshold 0.7


@pytest.mark.parametrize("exported_with", ["image", "blank image"])
def test_patched_faster_rcnn_exports_to_onnx_with_the_legacy_exporter(exported_with, tmp_path):
    """As torchvision's ONNX tests export its models (dynamo=False, dynamic image sizes): exported with an image,
    then run on images of other sizes and on one without detections; and exported with that one, then run on
    images with detections."""
    model = tiny_faster_rcnn(box_score_thresh=0.7)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (images_of((120, 150)) if exported_with == "image" else BLANK_IMAGE,), path,
                      dynamo=False, opset_version=17, input_names=["images"], output_names=["boxes", "labels", "scores"],
                      dynamic_axes={"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0]})
    session = onnx_session(path)
    counts = []
    for images in (images_of((120, 150), seed=1), images_of((160, 110), seed=2), BLANK_IMAGE):
        with torch.no_grad():
            expected = model(images)[0]
        assert_onnx_detections(run_onnx(session, images[0]), expected)
        counts.append(len(expected["boxes"]))
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == 0


def test_patched_faster_rcnn_exports_to_onnx_with_the_default_exporter(tmp_path):
    """torch.onnx.export's default (dynamo) exporter, for one image size: torchvision's MultiScaleRoIAlign does not
    export with symbolic image sizes (its scales become symbolic floats, which its roi_align does not take)."""
    model = tiny_faster_rcnn()
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (images_of((120, 150)),), path, input_names=["images"],
                      output_names=["boxes", "labels", "scores"])
    session = onnx_session(path)
    for images in (images_of((120, 150), seed=1), images_of((120, 150), seed=2)):
        with torch.no_grad():
            expected = model(images)[0]
        assert_onnx_detections(run_onnx(session, images[0]), expected)


@pytest.mark.parametrize("name", ["retinanet", "fcos"])
def test_patched_one_stage_detectors_export_to_onnx_as_torchvisions_do(name, tmp_path):
    """The legacy exporter, as torchvision's ONNX tests use it: the patched RetinaNet / FCOS export to standard
    operators and onnxruntime gives the eager model's detections, for images of the exported size (torchvision's
    own RetinaNet graph keeps that size's anchor count, patched or not). SSD's export fails in torchvision's own
    code (a fixed-size resize), patched or not."""
    from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn
    torch.manual_seed(0)
    build, score_thresh = {"retinanet": (retinanet_resnet50_fpn, 0.005), "fcos": (fcos_resnet50_fpn, 0.05)}[name]
    model = rpn_ops.patch_torchvision(build(weights=None, weights_backbone=None, num_classes=5, min_size=160,
                                            max_size=240, score_thresh=score_thresh).eval())
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (images_of((160, 200)),), path, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=["boxes", "scores", "labels"],
                      dynamic_axes={"images": [1, 2], "boxes": [0], "labels": [0], "scores": [0]})
    session = onnx_session(path)
    for seed in (1, 2):
        images = images_of((160, 200), seed=seed)
        with torch.no_grad():
            expected = model(images)[0]
        assert len(expected["boxes"]) > 50
        boxes, scores, labels = run_onnx(session, images[0])
        assert_onnx_detections((boxes, labels, scores), expected)


class FocalLoss(nn.Module):
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return rpn_ops.dense_focal_loss(logits, labels)


class DenseDetections(nn.Module):
    def forward(self, logits: Tensor, deltas: Tensor, anchors: Tensor) -> Tensor:
        return rpn_ops.dense_detections(logits, deltas, anchors, [(64, 64)], [anchors.shape[0]])[0][0]


@pytest.mark.parametrize("dynamo", [False, True])
def test_ops_without_an_onnx_form_say_so(dynamo, tmp_path):
    """dense_focal_loss (a training loss) and dense_detections (the patched models export torchvision's steps)."""
    g = torch.Generator().manual_seed(7)
    logits, labels = torch.randn(1, 20, 3, generator=g), torch.randint(-2, 3, (1, 20), generator=g)
    deltas, anchors = 0.1 * torch.randn(1, 20, 4, generator=g), workloads.gt_boxes(20, seed=7)
    for module, inputs, name in ((FocalLoss(), (logits, labels), "dense_focal_loss"),
                                 (DenseDetections(), (logits, deltas, anchors), "dense_detections")):
        with pytest.raises(Exception, match=f"{name} has no ONNX form"):
            torch.onnx.export(module, inputs, str(tmp_path / "op.onnx"), dynamo=dynamo)
