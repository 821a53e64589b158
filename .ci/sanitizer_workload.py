"""Every rpn_ops operator on small inputs, for compute-sanitizer's memcheck and racecheck (run by .ci/gpu).

    python .ci/sanitizer_workload.py [--device cuda|cpu]

Small, but past each kernel's edge cases: several 64-box blocks of the NMS mask, early exit, ties, empty input,
every float dtype, several images and levels. Prints one line per call, then "N calls ran"; exit status 1 if a
call raised. On the CPU it proves the workload itself (the GPU check's dry run).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's rpn_ops
import rpn_ops  # noqa: E402
from rpn_ops import workloads  # noqa: E402

IMAGE_SIZE = (256, 320)  # FPN levels of 64 x 80 down to 4 x 5 cells: about 20k anchors per image
BATCH = 2


def box_ops(device):
    boxes, scores = workloads.rpn_like_boxes(3000, device=device)
    classes = workloads.categories(3000, 7, device=device)
    gt = workloads.gt_boxes(20, image_size=IMAGE_SIZE, device=device)
    yield "nms float32", lambda: rpn_ops.nms(boxes, scores, 0.7)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        yield f"nms {dtype}", lambda dtype=dtype: rpn_ops.nms(boxes.to(dtype), scores.to(dtype), 0.7)
    yield "nms tied scores", lambda: rpn_ops.nms(boxes, workloads.tied_scores(scores), 0.5)
    yield "nms max_output=50", lambda: rpn_ops.nms(boxes, scores, 0.7, max_output=50)
    yield "nms empty", lambda: rpn_ops.nms(boxes[:0], scores[:0], 0.7)
    yield "batched_nms 7 classes", lambda: rpn_ops.batched_nms(boxes, scores, classes, 0.7)
    yield "batched_nms max_output=50", lambda: rpn_ops.batched_nms(boxes, scores, classes, 0.7, max_output=50)
    yield "box_iou 3000 x 20", lambda: rpn_ops.box_iou(boxes, gt)
    yield "box_iou float16", lambda: rpn_ops.box_iou(boxes[:500].half(), gt.half())
    yield "box_iou batched", lambda: rpn_ops.box_iou(boxes[:400].view(2, 200, 4), gt.expand(2, 20, 4))
    deltas = workloads.box_deltas(3000, classes=2, scale=3.0, device=device)  # dw, dh past the clip too
    yield "decode_boxes 2 classes", lambda: rpn_ops.decode_boxes(deltas, boxes, (1.0, 1.0, 1.0, 1.0))
    yield "decode_boxes float16", lambda: rpn_ops.decode_boxes(deltas[:, :4].half(), boxes.half(), (10, 10, 5, 5))
    yield "encode_boxes", lambda: rpn_ops.encode_boxes(gt[classes % 20], boxes, (1.0, 1.0, 1.0, 1.0))
    logits = (torch.randn(3000, 91, generator=torch.Generator().manual_seed(2)) * 2 - 4).to(device)
    yield "score_candidates", lambda: rpn_ops.score_candidates(logits, 0.05)
    yield "score_candidates none kept", lambda: rpn_ops.score_candidates(logits, 0.9999999)


def anchor_ops(device):
    images, features = workloads.fpn_batch(BATCH, IMAGE_SIZE, device=device)
    generator = rpn_ops.AnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)
    grid_sizes = [tuple(f.shape[-2:]) for f in features]
    strides = [(IMAGE_SIZE[0] // h, IMAGE_SIZE[1] // w) for h, w in grid_sizes]
    cells = [c.to(device) for c in generator.cell_anchors]
    yield "grid_anchors", lambda: rpn_ops.grid_anchors(cells, grid_sizes, strides, num_images=BATCH)
    yield "AnchorGenerator", lambda: generator(images, features)
    anchors = generator(images, features)
    gts = [workloads.gt_boxes(12, seed=1, image_size=IMAGE_SIZE, device=device), anchors[0][:0]]
    yield "match_anchors", lambda: rpn_ops.match_anchors(gts[0], anchors[0], 0.7, 0.3, True)
    yield "match_anchors list, no low-quality", lambda: rpn_ops.match_anchors([gts[0]] * BATCH, anchors, 0.7, 0.3,
                                                                              False)
    yield "match_anchors list, SSD's forced best anchors", lambda: rpn_ops.match_anchors(
        [gts[0]] * BATCH, anchors, 0.5, 0.5, False, force_best_anchors=True)
    per_level = [h * w * 3 for h, w in grid_sizes]
    yield "match_fcos (one image without GT)", lambda: rpn_ops.match_fcos(gts, anchors, per_level)
    yield "assign_targets (one image without GT)", lambda: rpn_ops.assign_targets(anchors, gts)

    g = torch.Generator().manual_seed(0)
    objectness = torch.randn(BATCH * sum(per_level), 1, generator=g).to(device)
    deltas = (torch.randn(BATCH * sum(per_level), 4, generator=g) * 0.5).to(device)
    grid = rpn_ops.AnchorGrid.from_generator(generator, IMAGE_SIZE, grid_sizes, device=device)
    settings = dict(image_sizes=images.image_sizes, num_anchors_per_level=per_level, pre_nms_top_n=300,
                    post_nms_top_n=200)
    yield "generate_proposals list", lambda: rpn_ops.generate_proposals(objectness, deltas, anchors, **settings)
    yield "generate_proposals padded", lambda: rpn_ops.generate_proposals(objectness, deltas, anchors, padded=True,
                                                                          **settings)
    yield "generate_proposals AnchorGrid", lambda: rpn_ops.generate_proposals(objectness, deltas, grid, **settings)

    class_logits = (torch.randn(BATCH, sum(per_level), 21, generator=g) * 2 - 4).to(device)
    class_deltas = deltas.view(BATCH, -1, 4)
    detections = dict(image_sizes=images.image_sizes, num_anchors_per_level=per_level, topk_candidates=300)
    yield "dense_detections sigmoid, per level", lambda: rpn_ops.dense_detections(
        class_logits, class_deltas, anchors, **detections)
    yield "dense_detections softmax, per class, padded, AnchorGrid", lambda: rpn_ops.dense_detections(
        class_logits, class_deltas, grid, activation="softmax", topk_per="class", padded=True, **detections)
    yield "dense_detections float64, 5 per image", lambda: rpn_ops.dense_detections(
        class_logits.double(), class_deltas.double(), anchors, detections_per_img=5, **detections)
    yield "dense_detections FCOS (centerness, linear coding)", lambda: rpn_ops.dense_detections(
        class_logits, class_deltas.abs(), anchors, centerness=class_logits[..., :1], box_coding="linear",
        **detections)
    labels = torch.randint(-2, 21, class_logits.shape[:2], generator=g).to(device)
    yield "dense_focal_loss", lambda: rpn_ops.dense_focal_loss(class_logits, labels)
    yield "dense_focal_loss backward, float16", lambda: torch.ops.rpn_ops.dense_focal_loss_backward(
        torch.ones(BATCH, device=device), class_logits.half(), labels, 0.25, 2.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    device = parser.parse_args().device
    started, ran, failed = time.perf_counter(), 0, []
    for name, call in [*box_ops(device), *anchor_ops(device)]:
        try:
            call()
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel's fault shows up here, next to its name
            ran += 1
            print(f"ran    {name}", flush=True)
        except Exception as error:  # report every op, not only the first that fails
            failed.append(name)
            print(f"FAILED {name}: {type(error).__name__}: {error}", flush=True)
    print(f"{ran} calls ran on {device} in {time.perf_counter() - started:.1f} s"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
