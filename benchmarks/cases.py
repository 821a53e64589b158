"""The benchmark workloads, defined once for `benchmarks.run` and `test_bench_ops.py`.

Inputs come from `rpn_ops.workloads` (the generators the tests use too): clustered RPN-like proposals,
ground-truth-like boxes, random categories.
"""
import copy
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Callable, Dict, List, Optional, Tuple

import torch  # before rpn_ops: its extension links against torch's libraries
import torchvision
from torch import nn
from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

import rpn_ops
from rpn_ops import reference, workloads

IMPLEMENTATIONS = ("ours", "torchvision", "reference")
NMS_THRESHOLD = 0.7
REFERENCE_NMS_MAX_BOXES = 5_000  # the reference NMS is a Python loop per kept box


@dataclass(frozen=True)
class Workload:
    name: str  # unique id, used by --ops and as the pytest id: "nms-20k-top1000"
    op: str  # "nms", "batched_nms", "box_iou", "anchors", "decode", "encode", "assign_targets", "generate_proposals",
    #  "rpn" (torchvision's RegionProposalNetwork, patched or not), "model" (a whole Faster R-CNN, patched or not),
    #  "retinanet" / "fcos" (the model's post-process or training targets, patched or not), "ssd" (an SSD's
    #  post-process, training targets or whole model, patched or not), "dense_detections" (one-stage detections in
    #  one op against torchvision's postprocess_detections), "focal_loss" (RetinaNet's classification loss and
    #  its gradient against torchvision's)
    label: str  # what the sizes are, for tables: "20k boxes, max_output=1000"
    params: Dict[str, int]
    make_inputs: Callable[[torch.device], Tuple[torch.Tensor, ...]]
    ours: Callable
    torchvision: Callable
    reference: Optional[Callable]  # None where it would take too long
    quick: bool = False  # part of the --quick ladder
    full_only: bool = False  # part of the --full ladder only (the default run keeps the most telling rows)
    slow_torchvision_cpu: bool = False  # torchvision's CPU call takes seconds to a minute
    scores_arg: Optional[int] = None  # position of the scores among the inputs (NMS ops)
    size: int = 0  # the problem size: the x axis of the plots
    size_unit: str = ""  # what `size` counts: "boxes", "box pairs", "images"
    series: str = ""  # workloads of one op with the same series form one line of its plot ("80 classes")
    devices: Tuple[str, ...] = ("cpu", "cuda")  # the device types it runs on
    min_runs: int = 1  # timed calls even when one call takes the whole budget (whole-model steps)


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def _nms_inputs(n: int, device):
    return workloads.rpn_like_boxes(n, device=device)


def _batched_nms_inputs(n: int, num_classes: int, device):
    boxes, scores = workloads.rpn_like_boxes(n, device=device)
    return boxes, scores, workloads.categories(n, num_classes, device=device)


def _box_iou_inputs(n: int, m: int, device):
    return workloads.rpn_like_boxes(n, device=device)[0], workloads.gt_boxes(m, seed=1, device=device)


def _torchvision_nms_first(boxes, scores, max_output: int):
    return torchvision.ops.nms(boxes, scores, NMS_THRESHOLD)[:max_output]  # torchvision has no early exit


def nms_workload(n: int, max_output: Optional[int] = None, quick=False) -> Workload:
    name, label = f"nms-{_count(n)}", f"{_count(n)} boxes"
    if max_output is None:
        ours = partial(rpn_ops.nms, iou_threshold=NMS_THRESHOLD)
        theirs = partial(torchvision.ops.nms, iou_threshold=NMS_THRESHOLD)
    else:
        name, label = f"{name}-top{max_output}", f"{label}, max_output={max_output}"
        ours = partial(rpn_ops.nms, iou_threshold=NMS_THRESHOLD, max_output=max_output)
        theirs = partial(_torchvision_nms_first, max_output=max_output)
    return Workload(
        name, "nms", label, dict(boxes=n, max_output=max_output) if max_output else dict(boxes=n),
        partial(_nms_inputs, n), ours, theirs,
        reference=partial(reference.nms, iou_threshold=NMS_THRESHOLD, max_output=max_output)
        if n <= REFERENCE_NMS_MAX_BOXES else None,
        quick=quick, slow_torchvision_cpu=n >= 100_000, scores_arg=1, size=n, size_unit="boxes",
        series="" if max_output is None else f"max_output={max_output}")


def batched_nms_workload(n: int, num_classes: int, quick=False) -> Workload:
    return Workload(
        f"batched_nms-{_count(n)}-{num_classes}cls", "batched_nms", f"{_count(n)} boxes, {num_classes} classes",
        dict(boxes=n, classes=num_classes), partial(_batched_nms_inputs, n, num_classes),
        partial(rpn_ops.batched_nms, iou_threshold=NMS_THRESHOLD),
        partial(torchvision.ops.batched_nms, iou_threshold=NMS_THRESHOLD),
        reference=partial(reference.batched_nms, iou_threshold=NMS_THRESHOLD)
        if n <= REFERENCE_NMS_MAX_BOXES else None,
        quick=quick, slow_torchvision_cpu=n >= 100_000, scores_arg=1, size=n, size_unit="boxes",
        series=f"{num_classes} classes")


def box_iou_workload(n: int, m: int, quick=False) -> Workload:
    return Workload(
        f"box_iou-{n}x{m}", "box_iou", f"{n} x {m} boxes", dict(boxes1=n, boxes2=m), partial(_box_iou_inputs, n, m),
        rpn_ops.box_iou, torchvision.ops.box_iou, reference.box_iou, quick=quick, size=n * m,
        size_unit="box pairs (N x M)")


def _fpn_inputs(num_images: int, device):
    return workloads.fpn_batch(num_images, device=device)


def _reference_anchors(images, features):
    cells = [reference_cells.to(features[0]) for reference_cells in _FPN_CELLS]
    height, width = images.tensors.shape[-2:]
    grid_sizes = [f.shape[-2:] for f in features]
    strides = [(height // h, width // w) for h, w in grid_sizes]
    return [reference.grid_anchors(cells, grid_sizes, strides) for _ in images.image_sizes]


_FPN_CELLS = [rpn_ops.cell_anchors(s, r) for s, r in zip(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)]


def anchors_workload(num_images: int, quick=False) -> Workload:
    height, width = workloads.IMAGE_SIZE
    return Workload(
        f"anchors-{height}x{width}-b{num_images}", "anchors", f"FPN, {height}x{width}, batch {num_images}",
        dict(images=num_images), partial(_fpn_inputs, num_images),
        rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS),
        TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS),
        _reference_anchors, quick=quick, size=num_images, size_unit="images (800 x 1216, FPN)")


def _rpn_anchor_count() -> int:
    height, width = workloads.IMAGE_SIZE
    return sum(-(-height // s) * -(-width // s) * 3 for s in workloads.FPN_STRIDES)


def _decode_inputs(num_images: int, device):
    """The RPN's decode: deltas of every anchor of every image, and per-image anchors as torchvision's
    AnchorGenerator gives them (separate tensors: no zero-copy shortcut for us)."""
    images, features = workloads.fpn_batch(num_images, device=device)
    anchors = [a.clone() for a in rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)(
        images, features)]
    return workloads.box_deltas(num_images * len(anchors[0]), scale=0.5, device=device), anchors


def _encode_inputs(num_images: int, device):
    """The RPN's regression targets: matched ground truth (50 boxes per image) against every anchor."""
    _, anchors = _decode_inputs(num_images, device)
    anchors = torch.cat(anchors)
    gt = workloads.gt_boxes(50, seed=3, device=device)
    return gt[torch.arange(len(anchors), device=device) % 50], anchors


def _reference_decode(codes, anchors):
    return reference.decode_boxes(codes, torch.cat(anchors), (1.0, 1.0, 1.0, 1.0)).reshape(len(codes), -1, 4)


def _rpn_coding_workload(op: str, what: str, num_images: int, make_inputs, ours, theirs, reference_fn,
                         quick: bool) -> Workload:
    """A box-coding workload over every anchor of ``num_images`` 800 x 1216 images."""
    anchors = _rpn_anchor_count()
    return Workload(
        f"{op}-{num_images}x{_count(anchors // 1000 * 1000)}", op, f"{what}, {num_images} x {anchors} anchors",
        dict(images=num_images, boxes=num_images * anchors), partial(make_inputs, num_images), ours, theirs,
        reference_fn, quick=quick, size=num_images * anchors, size_unit="boxes")


def decode_workload(num_images: int, quick=False) -> Workload:
    weights = (1.0, 1.0, 1.0, 1.0)
    return _rpn_coding_workload("decode", "RPN deltas", num_images, _decode_inputs, rpn_ops.BoxCoder(weights).decode,
                                TorchvisionBoxCoder(weights).decode, _reference_decode, quick)


def encode_workload(num_images: int, quick=False) -> Workload:
    weights = (1.0, 1.0, 1.0, 1.0)
    return _rpn_coding_workload("encode", "RPN targets", num_images, _encode_inputs,
                                rpn_ops.BoxCoder(weights).encode_single, TorchvisionBoxCoder(weights).encode_single,
                                partial(reference.encode_boxes, weights=weights), quick)


def _assign_inputs(num_images: int, num_gt: int, device):
    """Training targets of the RPN: every anchor of every image against ``num_gt`` ground-truth boxes each."""
    _, anchors = _decode_inputs(num_images, device)
    return anchors, [workloads.gt_boxes(num_gt, seed=i, device=device) for i in range(num_images)]


def _flat(outputs) -> List[torch.Tensor]:
    """(labels, matched boxes, targets), each a list per image, as one list for the parity check."""
    return [t for per_image in outputs for t in per_image]


def _torchvision_rpn() -> RegionProposalNetwork:
    head = RPNHead(1, len(workloads.FPN_ASPECT_RATIOS[0]))
    return RegionProposalNetwork(TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS), head,
                                 0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000),
                                 dict(training=2000, testing=1000), 0.7)


def _torchvision_assign(rpn, anchors, gts):
    labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": g} for g in gts])
    return _flat((labels, matched, rpn.box_coder.encode(matched, anchors)))


def assign_workload(num_images: int, num_gt: int, quick=False) -> Workload:
    """torchvision: box_iou + Matcher per image, then the box coder's encode (what its RPN runs in training)."""
    anchors = _rpn_anchor_count()
    return Workload(
        f"assign-{num_images}x{_count(anchors // 1000 * 1000)}-{num_gt}gt", "assign_targets",
        f"{num_images} x {anchors} anchors, {num_gt} GT each", dict(images=num_images, gt=num_gt),
        partial(_assign_inputs, num_images, num_gt), lambda a, g: _flat(rpn_ops.assign_targets(a, g)),
        partial(_torchvision_assign, _torchvision_rpn()),
        (lambda a, g: _flat(reference.assign_targets(a, g))) if num_gt <= 50 else None,
        quick=quick, slow_torchvision_cpu=num_gt * num_images >= 1000, size=num_gt, size_unit="GT boxes per image",
        series=f"batch {num_images}")


def _proposal_inputs(num_images: int, device):
    """The RPN head's outputs for every anchor of ``num_images`` 800 x 1216 images, in the layout
    concat_box_prediction_layers gives them, with torchvision's per-image anchors."""
    images, features = workloads.fpn_batch(num_images, device=device)
    anchors = TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)(images, features)
    levels = [f.shape[-2] * f.shape[-1] * len(r) for f, r in zip(features, workloads.FPN_ASPECT_RATIOS)]
    objectness = torch.randn(num_images * sum(levels), 1, generator=torch.Generator().manual_seed(0)).to(device)
    deltas = workloads.box_deltas(num_images * sum(levels), scale=0.5, device=device)
    return objectness, deltas, anchors, images.image_sizes, levels


def proposals_workload(num_images: int, top_n: int, quick=False) -> Workload:
    """torchvision: the RPN's decode of every anchor, then filter_proposals (pre = post NMS top-n = top_n)."""
    setting = "test" if top_n == 1000 else "training"
    rpn = _torchvision_rpn().eval()
    rpn._pre_nms_top_n = rpn._post_nms_top_n = dict(training=top_n, testing=top_n)

    def theirs(objectness, deltas, anchors, image_sizes, levels):
        proposals = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
        return _flat(rpn.filter_proposals(proposals, objectness, image_sizes, levels))

    def ours(objectness, deltas, anchors, image_sizes, levels):
        return _flat(rpn_ops.generate_proposals(objectness, deltas, anchors, image_sizes, levels, top_n, top_n))

    def plain(objectness, deltas, anchors, image_sizes, levels):
        return _flat(reference.generate_proposals(objectness, deltas, anchors, image_sizes, levels, top_n, top_n))

    height, width = workloads.IMAGE_SIZE
    return Workload(
        f"proposals-{height}x{width}-b{num_images}-{setting}", "generate_proposals",
        f"FPN, {height}x{width}, batch {num_images}, {setting} (pre/post NMS top-n {top_n})",
        dict(images=num_images, top_n=top_n), partial(_proposal_inputs, num_images), ours, theirs,
        plain if num_images <= 2 else None, quick=quick, size=num_images, size_unit="images (800 x 1216, FPN)",
        series=f"{setting} settings")


@lru_cache(maxsize=None)
def _detection_models(device: torch.device):
    """A randomly initialised fasterrcnn_resnet50_fpn (built once per device) and a copy with
    rpn_ops.patch_torchvision applied: (torchvision's, ours), the same weights."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).to(device).eval()
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model))


class _PrecomputedHead(nn.Module):
    """Stands in for an RPN head: returns the outputs it was given, so that a timing covers what the RPN does
    after its convolutions (anchors, decode, selection, NMS, targets, losses) and nothing else."""

    outputs = None

    def forward(self, features):
        return self.outputs


@lru_cache(maxsize=None)
def _rpns(device: torch.device, with_head: bool, fused: bool = False):
    """(torchvision's RPN, ours) of the benchmark model, with its head or with a _PrecomputedHead; ours in the
    fused form (``torchvision_tie_order=False``) if ``fused``."""
    torchvision_model, our_model = _detection_models(device)
    pair = [torchvision_model.rpn, our_model.rpn]
    if not with_head or fused:
        pair = [copy.copy(rpn) for rpn in pair]
        pair[1].torchvision_tie_order = not fused
    if not with_head:
        for rpn in pair:
            rpn._modules = dict(rpn._modules, head=_PrecomputedHead())
    return pair


def _rpn_inputs(num_images: int, num_gt: int, device):
    """``num_images`` 800 x 1216 images through the model's transform and backbone once: the RPN's inputs, and
    the head's outputs for the runs that leave the head out; ``num_gt`` boxes per image as targets."""
    model = _detection_models(torch.device(device))[0]
    images, targets = _model_inputs(num_images, num_gt, device)
    images, _ = model.transform(images)
    with torch.no_grad():
        features = model.backbone(images.tensors)
        head_outputs = model.rpn.head(list(features.values()))
    return images, features, targets, head_outputs


def _run_rpn(which: int, training: bool, with_head: bool, fused: bool, images, features, targets, head_outputs
             ) -> List[torch.Tensor]:
    """Proposals per image (and in training the two losses, after the same random draws), as one flat list."""
    rpn = _rpns(features["0"].device, with_head, fused)[which]
    rpn.train(training)
    if not with_head:
        rpn.head.outputs = head_outputs
    torch.manual_seed(0)  # the sampler's draws
    with torch.no_grad():
        boxes, losses = rpn(images, features, targets if training else None)
    return list(boxes) + [losses[k] for k in sorted(losses)]


def rpn_workload(num_images: int, training: bool, with_head: bool = True, fused: bool = False, num_gt: int = 20,
                 devices=("cpu", "cuda")) -> Workload:
    """The RPN of fasterrcnn_resnet50_fpn as patch_torchvision makes it (ours) and as torchvision ships it, on
    800 x 1216 FPN features; training: with ``num_gt`` boxes per image, proposals and losses. Without the head:
    its convolutions' outputs precomputed, the part of the RPN rpn_ops replaces. ``fused``: ours patched with
    ``torchvision_tie_order=False``."""
    mode = "train" if training else "eval"
    height, width = workloads.IMAGE_SIZE
    part = "RPN" if with_head else "RPN after its head convolutions"
    return Workload(
        f"rpn-{height}x{width}-b{num_images}-{mode}" + ("" if with_head else "-nohead") + ("-fused" if fused else ""),
        "rpn", f"fasterrcnn_resnet50_fpn {part}, {height}x{width}, batch {num_images}, {mode}"
        + (f" ({num_gt} GT per image)" if training else "") + (", fused form" if fused else ""),
        dict(images=num_images, gt=num_gt if training else 0, fused=int(fused)),
        partial(_rpn_inputs, num_images, num_gt if training else 0), partial(_run_rpn, 1, training, with_head, fused),
        partial(_run_rpn, 0, training, with_head, fused), reference=None, size=num_images,
        size_unit="images (800 x 1216, FPN)",
        series=f"{mode}, {'with' if with_head else 'without'} head" + (", fused" if fused else ""), devices=devices)


def _model_inputs(num_images: int, num_gt: int, device):
    """``num_images`` random 800 x 1216 images and, if ``num_gt``, that many ground-truth boxes on each."""
    g = torch.Generator().manual_seed(0)
    height, width = workloads.IMAGE_SIZE
    images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(num_images)]
    targets = [{"boxes": workloads.gt_boxes(num_gt, seed=i, device=device),
                "labels": torch.randint(1, 91, (num_gt,), generator=g).to(device)} for i in range(num_images)]
    return images, targets if num_gt else None


def _run_model(models: Callable, which: int, training: bool, images, targets) -> List[torch.Tensor]:
    """``models(device)[which]`` (0: torchvision's, 1: patched). Eval: the detections (boxes, labels, scores per
    image) as one flat list. Training: one step's losses after forward and backward (gradients cleared first),
    same random draws for both models."""
    model = models(images[0].device)[which]
    model.train(training)
    if not training:
        with torch.no_grad():
            return [d[k] for d in model(images) for k in ("boxes", "labels", "scores")]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    losses = model(images, targets)
    sum(losses.values()).backward()
    return [losses[k].detach() for k in sorted(losses)]


def model_workload(num_images: int, training: bool, num_gt: int = 20, devices=("cpu", "cuda")) -> Workload:
    """A whole fasterrcnn_resnet50_fpn (randomly initialised), patched (ours) and as torchvision ships it, on
    800 x 1216 images: eval inference, or a training step (forward with ``num_gt`` GT boxes per image and
    backward)."""
    mode = "train" if training else "eval"
    height, width = workloads.IMAGE_SIZE
    step = f"training step, forward + backward ({num_gt} GT per image)" if training else "inference"
    return Workload(
        f"model-{height}x{width}-b{num_images}-{mode}", "model",
        f"fasterrcnn_resnet50_fpn {step}, {height}x{width}, batch {num_images}",
        dict(images=num_images, gt=num_gt if training else 0),
        partial(_model_inputs, num_images, num_gt if training else 0),
        partial(_run_model, _detection_models, 1, training), partial(_run_model, _detection_models, 0, training),
        reference=None, size=num_images, size_unit="images (800 x 1216)", series=mode, devices=devices, min_runs=3)


RETINANET_STRIDES = (8, 16, 32, 64, 128)  # P3-P7


@lru_cache(maxsize=None)
def _retinanets(device: torch.device):
    """A randomly initialised retinanet_resnet50_fpn (91 classes, torchvision's settings), built once per device,
    and a copy with rpn_ops.patch_torchvision applied: (torchvision's, ours)."""
    from torchvision.models.detection import retinanet_resnet50_fpn
    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).to(device).eval()
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model))


def _retinanet_anchors(num_images: int, device):
    images, features = workloads.fpn_batch(num_images, device=device, strides=RETINANET_STRIDES)
    model, _ = _retinanets(torch.device(device))
    return images, features, model.anchor_generator(images, features)


def _retinanet_head_inputs(num_images: int, device, saturated: int = 2_000):
    """Trained-like head outputs of 800 x 1216 images: class logits mostly far below the 0.05 score threshold
    (about 1 in 150 above it), `saturated` of them saturated (sigmoid exactly 1.0: ties); per-level lists as
    postprocess_detections takes them, with each image's anchors split by level."""
    images, features, anchors = _retinanet_anchors(num_images, device)
    generator = torch.Generator().manual_seed(0)
    per_level = [f.shape[-2] * f.shape[-1] * 9 for f in features]
    logits = torch.randn(num_images, sum(per_level), 91, generator=generator) * 1.5 - 7.0
    logits.view(-1)[torch.randint(0, logits.numel(), (saturated,), generator=generator)] = 30.0
    deltas = workloads.box_deltas(num_images * sum(per_level), scale=0.5).reshape(num_images, -1, 4)
    head_outputs = {"cls_logits": list(logits.to(device).split(per_level, 1)),
                    "bbox_regression": list(deltas.to(device).split(per_level, 1))}
    return head_outputs, [list(a.split(per_level)) for a in anchors], images.image_sizes


def retinanet_postprocess_workload(num_images: int) -> Workload:
    """torchvision: RetinaNet.postprocess_detections (per image and level: sigmoid, threshold, top-k, decode,
    clip; then batched_nms); ours: the patched model's."""
    height, width = workloads.IMAGE_SIZE

    def run(which, head_outputs, anchors, image_sizes):
        model = _retinanets(head_outputs["cls_logits"][0].device)[which]
        return [t for d in model.postprocess_detections(head_outputs, anchors, image_sizes) for t in d.values()]

    return Workload(
        f"retinanet-postprocess-{height}x{width}-b{num_images}", "retinanet",
        f"RetinaNet detections, {height}x{width}, batch {num_images}, 91 classes", dict(images=num_images),
        partial(_retinanet_head_inputs, num_images), partial(run, 1), partial(run, 0), None,
        size=num_images, size_unit="images (800 x 1216, FPN)", series="post-process")


def _retinanet_dense_inputs(num_images: int, device):
    """The inputs of _retinanet_head_inputs, without saturated logits (where overlapping boxes tie, greedy NMS keeps
    what its order of visits decides, and torchvision leaves that order to torch.topk), as RetinaNet's head returns
    them, before its split by level: [B, A, C] logits, [B, A, 4] deltas, the anchors of each image, the image
    sizes and the anchors per level."""
    head_outputs, anchors, image_sizes = _retinanet_head_inputs(num_images, device, saturated=0)
    per_level = [level.shape[1] for level in head_outputs["cls_logits"]]
    return (torch.cat(head_outputs["cls_logits"], 1), torch.cat(head_outputs["bbox_regression"], 1),
            [torch.cat(a) for a in anchors], image_sizes, per_level)


def _detections(per_image: List[Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    return [t for d in per_image for t in (d["boxes"], d["scores"], d["labels"])]


def _dense_detections(*args, **kwargs) -> List[torch.Tensor]:
    """rpn_ops.dense_detections' lists as one flat list, in _detections' order."""
    return [t for image in zip(*rpn_ops.dense_detections(*args, **kwargs)) for t in image]


def _postprocess_by_level(model, head_outputs: Dict[str, torch.Tensor], anchors, image_sizes, per_level):
    """model.postprocess_detections of [B, A, ...] head outputs split by level, as RetinaNet's and FCOS's forward
    split them, as one flat list."""
    split = {key: list(value.split(per_level, 1)) for key, value in head_outputs.items()}
    return _detections(model.postprocess_detections(split, [list(a.split(per_level)) for a in anchors], image_sizes))


def dense_retinanet_workload(num_images: int, devices=("cpu", "cuda")) -> Workload:
    """torchvision: RetinaNet.postprocess_detections (as shipped) on its head outputs, split by level as its forward
    splits them; ours: one rpn_ops.dense_detections call with the model's settings."""
    height, width = workloads.IMAGE_SIZE

    def ours(class_logits, box_regression, anchors, image_sizes, per_level):
        model = _retinanets(class_logits.device)[1]
        return _dense_detections(class_logits, box_regression, anchors, image_sizes, per_level, model.score_thresh,
                                 model.topk_candidates, model.nms_thresh, model.detections_per_img)

    def theirs(class_logits, box_regression, anchors, image_sizes, per_level):
        head_outputs = {"cls_logits": class_logits, "bbox_regression": box_regression}
        return _postprocess_by_level(_retinanets(class_logits.device)[0], head_outputs, anchors, image_sizes,
                                     per_level)

    return Workload(
        f"dense-retinanet-{height}x{width}-b{num_images}", "dense_detections",
        f"RetinaNet detections in one op, {height}x{width}, batch {num_images}, 91 classes", dict(images=num_images),
        partial(_retinanet_dense_inputs, num_images), ours, theirs, None, size=num_images,
        size_unit="images (800 x 1216, FPN)", series="retinanet", devices=devices)


def dense_ssd_workload(name: str, num_images: int, devices=("cpu", "cuda")) -> Workload:
    """torchvision: SSD.postprocess_detections (as shipped); ours: one rpn_ops.dense_detections call (softmax scores,
    top-k per class) with the model's settings. Inputs without saturated logits, as for dense_retinanet_workload."""

    def ours(head_outputs, anchors, image_sizes):
        model = _ssds(name, head_outputs["cls_logits"].device)[1]
        return _dense_detections(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, image_sizes,
            [anchors[0].shape[0]], model.score_thresh, model.topk_candidates, model.nms_thresh,
            model.detections_per_img, model.box_coder.weights, activation="softmax", topk_per="class")

    def theirs(head_outputs, anchors, image_sizes):
        return _detections(_ssds(name, head_outputs["cls_logits"].device)[0].postprocess_detections(
            head_outputs, anchors, image_sizes))

    return Workload(
        f"dense-{name}-b{num_images}", "dense_detections", f"{SSD_MODELS[name][0]} detections in one op, batch "
        f"{num_images}, 91 classes", dict(images=num_images),
        partial(_ssd_head_inputs, name, num_images, saturated=0),
        ours, theirs, None, size=num_images, size_unit="images", series=name, devices=devices)


@lru_cache(maxsize=None)
def _fused_retinanets(device: torch.device):
    """torchvision's RetinaNet of _retinanets, and a copy patched with torchvision_tie_order=False (the fused
    detections and classification loss)."""
    model = _retinanets(device)[0]
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model), torchvision_tie_order=False)


def retinanet_model_workload(num_images: int, training: bool, num_gt: int = 20, devices=("cpu", "cuda"),
                             fused: bool = False) -> Workload:
    """The whole retinanet_resnet50_fpn (randomly initialised), patched against as shipped, on 800 x 1216 images:
    inference, or a training step (forward with ``num_gt`` GT boxes per image and backward). ``fused``: patched
    with torchvision_tie_order=False (its classification loss equals torchvision's within float32 rounding)."""
    mode = "train" if training else "eval"
    height, width = workloads.IMAGE_SIZE
    step = f"training step, forward + backward ({num_gt} GT per image)" if training else "inference"
    models = _fused_retinanets if fused else _retinanets
    return Workload(
        f"retinanet-model-{height}x{width}-b{num_images}-{mode}{'-fused' if fused else ''}", "retinanet",
        f"retinanet_resnet50_fpn {step}{', fused form' if fused else ''}, {height}x{width}, batch {num_images}",
        dict(images=num_images, gt=num_gt if training else 0, fused_loss=int(fused and training)),
        partial(_model_inputs, num_images, num_gt if training else 0), partial(_run_model, models, 1, training),
        partial(_run_model, models, 0, training), reference=None, size=num_images,
        size_unit="images (800 x 1216)", series=f"{mode}{' fused' if fused else ''}", devices=devices, min_runs=3)


def _retinanet_target_inputs(num_images: int, num_gt: int, device):
    _, _, anchors = _retinanet_anchors(num_images, device)
    return anchors, [{"boxes": workloads.gt_boxes(num_gt, seed=i, device=device)} for i in range(num_images)]


def _torchvision_retinanet_matches(anchors, targets):
    matcher = _retinanets(anchors[0].device)[0].proposal_matcher
    return [matcher(torchvision.ops.box_iou(t["boxes"], a)) for a, t in zip(anchors, targets)]


def retinanet_targets_workload(num_images: int, num_gt: int) -> Workload:
    """torchvision: RetinaNet.compute_loss's matching (box_iou + Matcher(0.5, 0.4, low-quality matches) per
    image); ours: the patched model's, one match_anchors call."""
    from rpn_ops.torchvision_patch import _matched_idxs
    height, width = workloads.IMAGE_SIZE

    def ours(anchors, targets):
        return _matched_idxs(anchors, targets, _retinanets(anchors[0].device)[1].proposal_matcher)

    return Workload(
        f"retinanet-targets-{height}x{width}-b{num_images}-{num_gt}gt", "retinanet",
        f"RetinaNet training targets, {height}x{width}, batch {num_images}, {num_gt} GT each",
        dict(images=num_images, gt=num_gt), partial(_retinanet_target_inputs, num_images, num_gt), ours,
        _torchvision_retinanet_matches, None, size=num_gt, size_unit="GT boxes per image", series="targets")


def _focal_loss_inputs(num_images: int, num_gt: int, device):
    """RetinaNet's classification-loss inputs at 800 x 1216: trained-like [B, A, 91] logits (mostly near the
    prior's -4.6) that need a gradient, torchvision's Matcher indices for `num_gt` GT boxes per image (foreground,
    background and between thresholds) and the GT labels."""
    anchors, targets = _retinanet_target_inputs(num_images, num_gt, device)
    matched_idxs = _torchvision_retinanet_matches(anchors, targets)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(num_images, len(anchors[0]), 91, generator=generator) * 1.5 - 4.6
    labels = [torch.randint(1, 91, (num_gt,), generator=generator).to(device) for _ in range(num_images)]
    targets = [dict(t, labels=l) for t, l in zip(targets, labels)]
    return logits.to(device).requires_grad_(), targets, matched_idxs


def _loss_and_gradient(loss: torch.Tensor, logits: torch.Tensor) -> List[torch.Tensor]:
    return [loss.detach(), *torch.autograd.grad(loss, logits)]


def focal_loss_workload(num_images: int, num_gt: int, devices=("cpu", "cuda")) -> Workload:
    """torchvision: RetinaNetClassificationHead.compute_loss (a one-hot [A, 91] target, the valid rows' copies and
    sigmoid_focal_loss's ten ops per image) and its backward; ours: rpn_ops.dense_focal_loss (the patched RetinaNet's
    loss with torchvision_tie_order=False) and its backward. Equal within float32 rounding (float64 sums)."""
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead
    height, width = workloads.IMAGE_SIZE

    def ours(logits, targets, matched_idxs):
        labels = rpn_ops.anchor_labels(matched_idxs, [t["labels"] for t in targets])
        per_image = rpn_ops.dense_focal_loss(logits, labels)
        return _loss_and_gradient((per_image / (labels >= 0).sum(1).clamp(min=1)).sum() / len(targets), logits)

    def theirs(logits, targets, matched_idxs):
        head = _retinanets(logits.device)[0].head.classification_head
        return _loss_and_gradient(RetinaNetClassificationHead.compute_loss(head, targets, {"cls_logits": logits},
                                                                           matched_idxs), logits)

    return Workload(
        f"focal-loss-retinanet-{height}x{width}-b{num_images}", "focal_loss",
        f"RetinaNet classification loss + backward, {height}x{width}, batch {num_images}, 91 classes, "
        f"{num_gt} GT each", dict(images=num_images, gt=num_gt),
        partial(_focal_loss_inputs, num_images, num_gt), ours, theirs, None, size=num_images,
        size_unit="images (800 x 1216, FPN)", series="classification loss", devices=devices)


@lru_cache(maxsize=None)
def _fcoses(device: torch.device):
    """A randomly initialised fcos_resnet50_fpn (91 classes, torchvision's settings) built once per device, and a
    copy with rpn_ops.patch_torchvision applied: (torchvision's, ours)."""
    from torchvision.models.detection import fcos_resnet50_fpn
    torch.manual_seed(0)
    model = fcos_resnet50_fpn(weights=None, weights_backbone=None).to(device).eval()
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model))


def _fcos_anchors(num_images: int, device):
    images, features = workloads.fpn_batch(num_images, device=device, strides=RETINANET_STRIDES)
    model, _ = _fcoses(torch.device(device))
    return images, model.anchor_generator(images, features), [f.shape[-2] * f.shape[-1] for f in features]


def _fcos_head_inputs(num_images: int, device, saturated: int = 2_000):
    """Trained-like head outputs of 800 x 1216 images (class logits mostly far below FCOS's 0.2 score threshold,
    `saturated` of them saturated with their centerness: scores exactly 1.0), per level as postprocess_detections
    takes them."""
    images, anchors, per_level = _fcos_anchors(num_images, device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(num_images, sum(per_level), 91, generator=generator) * 1.5 - 6.0
    saturated = torch.randint(0, logits.numel(), (saturated,), generator=generator)
    logits.view(-1)[saturated] = 30.0
    ctrness = torch.randn(num_images, sum(per_level), 1, generator=generator)
    ctrness.view(-1)[torch.div(saturated, 91, rounding_mode="floor")] = 30.0
    deltas = workloads.box_deltas(num_images * sum(per_level), scale=0.5).reshape(num_images, -1, 4).abs()
    head_outputs = {"cls_logits": list(logits.to(device).split(per_level, 1)),
                    "bbox_regression": list(deltas.to(device).split(per_level, 1)),
                    "bbox_ctrness": list(ctrness.to(device).split(per_level, 1))}
    return head_outputs, [list(a.split(per_level)) for a in anchors], images.image_sizes


def fcos_postprocess_workload(num_images: int) -> Workload:
    """torchvision: FCOS.postprocess_detections; ours: the patched model's (its NMS)."""
    height, width = workloads.IMAGE_SIZE

    def run(which, head_outputs, anchors, image_sizes):
        model = _fcoses(head_outputs["cls_logits"][0].device)[which]
        return [t for d in model.postprocess_detections(head_outputs, anchors, image_sizes) for t in d.values()]

    return Workload(
        f"fcos-postprocess-{height}x{width}-b{num_images}", "fcos",
        f"FCOS detections, {height}x{width}, batch {num_images}, 91 classes", dict(images=num_images),
        partial(_fcos_head_inputs, num_images), partial(run, 1), partial(run, 0), None,
        size=num_images, size_unit="images (800 x 1216, FPN)", series="post-process")


def _fcos_dense_inputs(num_images: int, device):
    """The inputs of _fcos_head_inputs without saturated logits (see _retinanet_dense_inputs), as FCOS's head returns
    them: [B, A, C] logits, [B, A, 4] distances, [B, A, 1] centerness, anchors, image sizes, anchors per level."""
    head_outputs, anchors, image_sizes = _fcos_head_inputs(num_images, device, saturated=0)
    per_level = [level.shape[1] for level in head_outputs["cls_logits"]]
    return (*(torch.cat(head_outputs[k], 1) for k in ("cls_logits", "bbox_regression", "bbox_ctrness")),
            [torch.cat(a) for a in anchors], image_sizes, per_level)


def dense_fcos_workload(num_images: int) -> Workload:
    """torchvision: FCOS.postprocess_detections (as shipped); ours: one rpn_ops.dense_detections call (centerness
    scores, BoxLinearCoder's decode) with the model's settings."""
    height, width = workloads.IMAGE_SIZE

    def ours(class_logits, box_regression, centerness, anchors, image_sizes, per_level):
        model = _fcoses(class_logits.device)[1]
        return _dense_detections(class_logits, box_regression, anchors, image_sizes, per_level, model.score_thresh,
                                 model.topk_candidates, model.nms_thresh, model.detections_per_img,
                                 centerness=centerness, box_coding="linear")

    def theirs(class_logits, box_regression, centerness, anchors, image_sizes, per_level):
        head_outputs = {"cls_logits": class_logits, "bbox_regression": box_regression, "bbox_ctrness": centerness}
        return _postprocess_by_level(_fcoses(class_logits.device)[0], head_outputs, anchors, image_sizes, per_level)

    return Workload(
        f"dense-fcos-{height}x{width}-b{num_images}", "dense_detections",
        f"FCOS detections in one op, {height}x{width}, batch {num_images}, 91 classes", dict(images=num_images),
        partial(_fcos_dense_inputs, num_images), ours, theirs, None, size=num_images,
        size_unit="images (800 x 1216, FPN)", series="fcos")


def _fcos_target_inputs(num_images: int, num_gt: int, device):
    _, anchors, per_level = _fcos_anchors(num_images, device)
    return anchors, [{"boxes": workloads.gt_boxes(num_gt, seed=i, device=device)} for i in range(num_images)], per_level


def _torchvision_fcos_matches(anchors, targets, num_anchors_per_level):
    """The matched_idxs torchvision's FCOS.compute_loss computes, taken where it hands them to its head."""
    from types import SimpleNamespace
    from torchvision.models.detection.fcos import FCOS
    head = SimpleNamespace(compute_loss=lambda targets, head_outputs, anchors, matched_idxs: matched_idxs)
    return FCOS.compute_loss(SimpleNamespace(center_sampling_radius=1.5, head=head), targets, {}, anchors,
                             num_anchors_per_level)


def fcos_targets_workload(num_images: int, num_gt: int) -> Workload:
    """torchvision: FCOS.compute_loss's centre-sampling matching ([A, G, 4] tensors per image); ours: the patched
    model's, one match_fcos call."""
    height, width = workloads.IMAGE_SIZE

    def ours(anchors, targets, num_anchors_per_level):
        return rpn_ops.match_fcos([t["boxes"] for t in targets], anchors, num_anchors_per_level)

    return Workload(
        f"fcos-targets-{height}x{width}-b{num_images}-{num_gt}gt", "fcos",
        f"FCOS training targets, {height}x{width}, batch {num_images}, {num_gt} GT each",
        dict(images=num_images, gt=num_gt), partial(_fcos_target_inputs, num_images, num_gt), ours,
        _torchvision_fcos_matches, None, size=num_gt, size_unit="GT boxes per image", series="targets")


SSD_MODELS = {"ssd300": ("ssd300_vgg16", 300), "ssdlite320": ("ssdlite320_mobilenet_v3_large", 320)}


@lru_cache(maxsize=None)
def _ssds(name: str, device: torch.device):
    """A randomly initialised torchvision SSD (91 classes, torchvision's settings) built once per device, and a
    copy with rpn_ops.patch_torchvision applied: (torchvision's, ours)."""
    from torchvision.models import detection
    torch.manual_seed(0)
    model = getattr(detection, SSD_MODELS[name][0])(weights=None, weights_backbone=None).to(device).eval()
    return model, rpn_ops.patch_torchvision(copy.deepcopy(model))


def _ssd_anchors(name: str, num_images: int, device):
    """The model's default boxes for ``num_images`` images of its fixed size (feature shapes from its backbone)."""
    from torchvision.models.detection.image_list import ImageList
    model, _ = _ssds(name, torch.device(device))
    size = SSD_MODELS[name][1]
    training = model.training  # a training-step workload may have left it in training mode
    with torch.no_grad():
        features = list(model.eval().backbone(torch.zeros(1, 3, size, size, device=device)).values())
    model.train(training)
    images = ImageList(torch.zeros(num_images, 3, size, size, device=device), [(size, size)] * num_images)
    return images.image_sizes, model.anchor_generator(images, [f.expand(num_images, -1, -1, -1) for f in features])


def _ssd_head_inputs(name: str, num_images: int, device, saturated: int = 2_000):
    """Trained-like head outputs: the background class far ahead for most anchors, so that about 1 class score in
    100 passes the 0.01 threshold, and `saturated` logits saturated (softmax exactly 1.0: ties)."""
    image_sizes, anchors = _ssd_anchors(name, num_images, device)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(num_images, anchors[0].shape[0], 91, generator=generator) * 1.5
    logits[..., 0] += 9.5
    logits.view(-1)[torch.randint(0, logits.numel(), (saturated,), generator=generator)] = 30.0
    deltas = workloads.box_deltas(logits.shape[0] * logits.shape[1], scale=0.5).reshape(num_images, -1, 4)
    return {"cls_logits": logits.to(device), "bbox_regression": deltas.to(device)}, anchors, image_sizes


def ssd_postprocess_workload(name: str, num_images: int) -> Workload:
    """torchvision: SSD.postprocess_detections (per image: softmax, decode, clip, per class threshold and top-k,
    then batched_nms); ours: the patched model's."""

    def run(which, head_outputs, anchors, image_sizes):
        model = _ssds(name, head_outputs["cls_logits"].device)[which]
        return [t for d in model.postprocess_detections(head_outputs, anchors, image_sizes) for t in d.values()]

    return Workload(
        f"ssd-postprocess-{name}-b{num_images}", "ssd", f"{SSD_MODELS[name][0]} detections, batch {num_images}, "
        f"91 classes", dict(images=num_images), partial(_ssd_head_inputs, name, num_images), partial(run, 1),
        partial(run, 0), None, size=num_images, size_unit="images", series=f"{name} post-process")


def _ssd_target_inputs(name: str, num_images: int, num_gt: int, device):
    image_sizes, anchors = _ssd_anchors(name, num_images, device)
    return anchors, [{"boxes": workloads.gt_boxes(num_gt, seed=i, image_size=image_sizes[0], device=device)}
                     for i in range(num_images)]


def ssd_targets_workload(name: str, num_images: int, num_gt: int) -> Workload:
    """torchvision: SSD.forward's matching (box_iou + SSDMatcher(0.5) per image); ours: the patched model's, one
    match_anchors call with forced best anchors."""

    def theirs(anchors, targets):
        matcher = _ssds(name, anchors[0].device)[0].proposal_matcher
        return [matcher(torchvision.ops.box_iou(t["boxes"], a)) for a, t in zip(anchors, targets)]

    def ours(anchors, targets):
        return _ssds(name, anchors[0].device)[1]._matched_idxs(anchors, targets)

    return Workload(
        f"ssd-targets-{name}-b{num_images}-{num_gt}gt", "ssd",
        f"{SSD_MODELS[name][0]} training targets, batch {num_images}, {num_gt} GT each",
        dict(images=num_images, gt=num_gt), partial(_ssd_target_inputs, name, num_images, num_gt), ours, theirs,
        None, size=num_gt, size_unit="GT boxes per image", series=f"{name} targets")


def _ssd_model_inputs(name: str, num_images: int, num_gt: int, device):
    g = torch.Generator().manual_seed(0)
    size = SSD_MODELS[name][1]
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(num_images)]
    targets = [{"boxes": workloads.gt_boxes(num_gt, seed=i, image_size=(size, size), device=device),
                "labels": torch.randint(1, 91, (num_gt,), generator=g).to(device)} for i in range(num_images)]
    return images, targets if num_gt else None


def ssd_model_workload(name: str, num_images: int, training: bool, num_gt: int = 20, devices=("cpu", "cuda")
                       ) -> Workload:
    """A whole SSD (randomly initialised), patched (ours) and as torchvision ships it: eval inference, or a training
    step (forward with ``num_gt`` GT boxes per image and backward)."""
    mode = "train" if training else "eval"
    step = f"training step, forward + backward ({num_gt} GT per image)" if training else "inference"
    return Workload(
        f"ssd-model-{name}-b{num_images}-{mode}", "ssd", f"{SSD_MODELS[name][0]} {step}, batch {num_images}",
        dict(images=num_images, gt=num_gt if training else 0),
        partial(_ssd_model_inputs, name, num_images, num_gt if training else 0),
        partial(_run_model, partial(_ssds, name), 1, training), partial(_run_model, partial(_ssds, name), 0, training),
        reference=None, size=num_images, size_unit="images", series=f"{name} {mode}", devices=devices, min_runs=3)


def _full_only(workload: Workload, full_only: bool = True) -> Workload:
    return replace(workload, full_only=full_only)


WORKLOADS: List[Workload] = [
    *(_full_only(nms_workload(n, quick=n <= 5_000), n > 20_000) for n in (1_000, 5_000, 20_000, 100_000)),
    *(_full_only(nms_workload(n, max_output=1000), n > 20_000) for n in (20_000, 100_000)),
    *(_full_only(batched_nms_workload(n, classes, quick=n == 1_000 and classes == 80), n > 20_000 or classes == 5)
      for classes in (80, 5) for n in (1_000, 5_000, 20_000, 100_000)),
    box_iou_workload(2_000, 2_000, quick=True),
    box_iou_workload(200_000, 50),
    anchors_workload(2, quick=True),
    anchors_workload(8),
    decode_workload(2, quick=True),
    _full_only(decode_workload(8)),
    encode_workload(2),
    _full_only(encode_workload(8)),
    *(_full_only(assign_workload(images, gt, quick=images == 2 and gt == 50), images == 8 or gt == 500)
      for images in (2, 8) for gt in (10, 50, 500)),
    *(_full_only(proposals_workload(images, top_n, quick=images == 2 and top_n == 1000), images == 8)
      for images in (2, 8) for top_n in (1000, 2000)),
    *(_full_only(rpn_workload(2, training, with_head), with_head) for with_head in (True, False)
      for training in (False, True)),
    *(rpn_workload(2, training, with_head=False, fused=True) for training in (False, True)),
    *(rpn_workload(8, training, with_head, devices=("cuda",)) for with_head in (True, False)
      for training in (False, True)),
    *(rpn_workload(8, training, with_head=False, fused=True, devices=("cuda",)) for training in (False, True)),
    *(_full_only(model_workload(2, training)) for training in (False, True)),
    retinanet_postprocess_workload(2),
    retinanet_targets_workload(2, 50),
    focal_loss_workload(2, 50),
    *(_full_only(retinanet_model_workload(2, training)) for training in (False, True)),
    _full_only(retinanet_model_workload(2, True, fused=True)),
    *(retinanet_model_workload(8, training, devices=("cuda",)) for training in (False, True)),
    retinanet_model_workload(8, True, devices=("cuda",), fused=True),
    fcos_postprocess_workload(2),
    fcos_targets_workload(2, 50),
    ssd_postprocess_workload("ssd300", 2),
    ssd_postprocess_workload("ssdlite320", 2),
    ssd_targets_workload("ssd300", 2, 50),
    *(ssd_model_workload("ssdlite320", 2, training) for training in (False, True)),
    *(ssd_model_workload("ssdlite320", 8, training, devices=("cuda",)) for training in (False, True)),
    dense_retinanet_workload(2),
    dense_retinanet_workload(8, devices=("cuda",)),
    dense_fcos_workload(2),
    dense_ssd_workload("ssd300", 2),
    dense_ssd_workload("ssdlite320", 2),
    dense_ssd_workload("ssd300", 8, devices=("cuda",)),
    focal_loss_workload(8, 50, devices=("cuda",)),
    *(model_workload(8, training, devices=("cuda",)) for training in (False, True)),
]


def select(ops: Optional[str] = None, quick: bool = False, device: Optional[str] = None,
           full: bool = False) -> List[Workload]:
    """The workloads whose name contains one of the comma-separated substrings in ``ops`` (all if None), of
    the --quick ladder if ``quick``, else of the default ladder unless ``full``, that run on ``device`` (a
    device type; any if None)."""
    wanted = [part.strip() for part in ops.split(",") if part.strip()] if ops else []
    return [w for w in WORKLOADS
            if (w.quick if quick else full or not w.full_only)
            and (not wanted or any(part in w.name for part in wanted))
            and (device is None or device in w.devices)]


def parity(workload: Workload, ours, theirs, inputs) -> str:
    """'equal' (torch.equal; NaN equal to NaN; lists element by element), 'equal to float32 rounding' (a loss
    and its gradient summed in another order), 'equal up to ties' (NMS: same kept
    set, order differs only between equal scores; proposals: the same, per image), or 'MISMATCH'."""
    if isinstance(ours, (list, tuple)):
        if not (isinstance(theirs, (list, tuple)) and len(ours) == len(theirs)):
            return "MISMATCH"
        if all(_equal(a, b) for a, b in zip(ours, theirs)):
            return "equal"
        if workload.op == "generate_proposals" and _same_proposals_up_to_ties(ours, theirs):
            return "equal up to ties"
        if workload.op == "dense_detections" and _same_detections_up_to_ties(ours, theirs):
            return "equal up to ties"
        if (workload.op == "focal_loss" or workload.params.get("fused_loss")) and all(
                a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-9)
                for a, b in zip(ours, theirs)):
            return "equal to float32 rounding"  # float64 sums against float32 ones
        if workload.op == "rpn" and workload.params.get("fused") and all(
                _equal(a, b) or _same_rows_in_any_order(a, b) for a, b in zip(ours, theirs)):
            return "equal up to ties"  # the RPN returns no scores: proposals compared as sets of rows
        return "MISMATCH"
    if _equal(ours, theirs):
        return "equal"
    if workload.scores_arg is not None and ours.shape == theirs.shape:
        scores = inputs[workload.scores_arg]
        if torch.equal(ours.sort().values, theirs.sort().values) and torch.equal(scores[ours], scores[theirs]):
            return "equal up to ties"
    return "MISMATCH"


def _same_proposals_up_to_ties(ours, theirs) -> bool:
    """Per image (boxes..., scores...): the same score sequence, and among equal scores the same boxes in any
    order (torchvision's final sort is not stable; sigmoid saturates to equal float32 scores)."""
    images = len(ours) // 2
    for boxes_a, boxes_b, scores_a, scores_b in zip(ours[:images], theirs[:images], ours[images:], theirs[images:]):
        if not (_equal(scores_a, scores_b) and boxes_a.shape == boxes_b.shape and boxes_a.dtype == boxes_b.dtype):
            return False
        rows_a = sorted(map(tuple, torch.cat([scores_a[:, None].to(boxes_a), boxes_a], 1).tolist()))
        rows_b = sorted(map(tuple, torch.cat([scores_b[:, None].to(boxes_b), boxes_b], 1).tolist()))
        if rows_a != rows_b:
            return False
    return True


def _same_detections_up_to_ties(ours, theirs) -> bool:
    """Per image (boxes, scores, labels): the same score sequence, and among equal scores the same boxes and labels
    in any order (torchvision leaves the order of equal scores to torch.topk and an unstable sort)."""
    for image in range(0, len(ours), 3):
        (boxes_a, scores_a, labels_a), (boxes_b, scores_b, labels_b) = ours[image:image + 3], theirs[image:image + 3]
        if not (_equal(scores_a, scores_b) and boxes_a.shape == boxes_b.shape and boxes_a.dtype == boxes_b.dtype
                and _equal(labels_a.sort().values, labels_b.sort().values)):
            return False
        rows_a = torch.cat([scores_a[:, None].to(boxes_a), boxes_a, labels_a[:, None].to(boxes_a)], 1)
        rows_b = torch.cat([scores_b[:, None].to(boxes_b), boxes_b, labels_b[:, None].to(boxes_b)], 1)
        if not _same_rows_in_any_order(rows_a, rows_b):
            return False
    return True


def _same_rows_in_any_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dim() == 2 and a.dtype == b.dtype and a.shape == b.shape
            and sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist())))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
