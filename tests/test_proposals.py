"""generate_proposals: torchvision's RegionProposalNetwork.filter_proposals on decoded anchors, computed in one
call. Parity with torchvision's RPN itself (Faster R-CNN FPN defaults, test and training settings), with the
plain-PyTorch reference, across devices, dtypes, instruction sets, torch.compile, and bad input."""
import math

import pytest
import torch
import torchvision
from torchvision.models.detection import rpn as tv_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import rpn_ops
from helpers import compiles, cpu_kernels, needs_cuda
from rpn_ops import reference, workloads

TEST_SETTINGS = dict(pre_nms_top_n=1000, post_nms_top_n=1000)
TRAINING_SETTINGS = dict(pre_nms_top_n=2000, post_nms_top_n=2000)
SMALL_IMAGE = (320, 480)


def torchvision_rpn(pre_nms_top_n=1000, post_nms_top_n=1000, nms_thresh=0.7, score_thresh=0.0, min_size=1e-3,
                    training=False):
    generator = TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)
    rpn = tv_rpn.RegionProposalNetwork(
        generator, tv_rpn.RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
        pre_nms_top_n=dict(training=pre_nms_top_n, testing=pre_nms_top_n),
        post_nms_top_n=dict(training=post_nms_top_n, testing=post_nms_top_n), nms_thresh=nms_thresh,
        score_thresh=score_thresh)
    rpn.min_size = min_size
    rpn.train(training)
    return rpn


class Inputs:
    """RPN head outputs in concat_box_prediction_layers' layout, with torchvision's anchors."""

    def __init__(self, batch, image_size=workloads.IMAGE_SIZE, seed=0, dtype=torch.float32, device="cpu",
                 delta_scale=0.5, image_sizes=None):
        images, features = workloads.fpn_batch(batch, image_size, device=device)
        if image_sizes is not None:
            images = workloads.ImageBatch(images.tensors, list(image_sizes))
        self.image_sizes = images.image_sizes
        self.generator = TorchvisionAnchorGenerator(workloads.FPN_SIZES, workloads.FPN_ASPECT_RATIOS)
        self.grid_sizes = [tuple(f.shape[-2:]) for f in features]
        self.anchors = self.generator(ImageList(images.tensors, self.image_sizes), features)
        self.batch_size = tuple(images.tensors.shape[-2:])
        self.num_anchors_per_level = [h * w * 3 for h, w in self.grid_sizes]
        total = sum(self.num_anchors_per_level)
        g = torch.Generator().manual_seed(seed)
        self.objectness = torch.randn(batch * total, 1, generator=g).to(dtype=dtype, device=device)
        self.deltas = (torch.randn(batch * total, 4, generator=g) * delta_scale).to(dtype=dtype, device=device)

    def ours(self, padded=False, anchors=None, **settings):
        return rpn_ops.generate_proposals(self.objectness, self.deltas, self.anchors if anchors is None else anchors,
                                          self.image_sizes, self.num_anchors_per_level, padded=padded, **settings)

    def torchvision(self, **settings):
        rpn = torchvision_rpn(**settings)
        proposals = rpn.box_coder.decode(self.deltas.detach(), self.anchors).view(len(self.anchors), -1, 4)
        return rpn.filter_proposals(proposals, self.objectness, self.image_sizes, self.num_anchors_per_level)

    def reference(self, pre_nms_top_n, post_nms_top_n, **settings):
        return reference.generate_proposals(self.objectness, self.deltas, self.anchors, self.image_sizes,
                                            self.num_anchors_per_level, pre_nms_top_n, post_nms_top_n, **settings)


def rows(boxes, scores):
    """(score, x1, y1, x2, y2) rows sorted: the same set whatever the order among equal scores."""
    return sorted(map(tuple, torch.cat([scores.double()[:, None], boxes.double()], 1).tolist()))


def assert_same_proposals(got, expected, exact=True):
    """Same count, dtypes and descending score sequence per image; the same boxes, in the same order except
    among equal scores."""
    got_boxes, got_scores = got
    expected_boxes, expected_scores = expected
    assert len(got_boxes) == len(expected_boxes) == len(got_scores)
    for image, (boxes, scores, e_boxes, e_scores) in enumerate(
            zip(got_boxes, got_scores, expected_boxes, expected_scores)):
        assert boxes.dtype == e_boxes.dtype and scores.dtype == e_scores.dtype, (boxes.dtype, e_boxes.dtype)
        assert boxes.shape == e_boxes.shape and scores.shape == e_scores.shape, (image, boxes.shape, e_boxes.shape)
        boxes, scores, e_boxes, e_scores = boxes.cpu(), scores.cpu(), e_boxes.cpu(), e_scores.cpu()
        assert (scores[:-1] >= scores[1:]).all(), "scores must be in descending order"
        if exact:
            assert torch.equal(scores, e_scores), f"image {image}: scores differ"
            assert rows(boxes, scores) == rows(e_boxes, e_scores), f"image {image}: boxes differ"
            ties = torch.unique(scores).numel() < scores.numel()
            if not ties:
                assert torch.equal(boxes, e_boxes)
        else:
            torch.testing.assert_close(scores, e_scores)
            torch.testing.assert_close(boxes, e_boxes)


# ---------------------------------------------------------------------------------------------------------
# Parity with torchvision's RPN

@pytest.mark.parametrize("settings", [TEST_SETTINGS, TRAINING_SETTINGS], ids=["test", "training"])
@pytest.mark.parametrize("batch", [1, 2])
def test_faster_rcnn_fpn_matches_torchvision(device, settings, batch):
    inputs = Inputs(batch, seed=batch, device=device)
    assert_same_proposals(inputs.ours(**settings), Inputs(batch, seed=batch).torchvision(**settings))


@pytest.mark.parametrize("settings", [TEST_SETTINGS, TRAINING_SETTINGS], ids=["test", "training"])
def test_batch_of_eight_matches_torchvision(device, settings):
    inputs = Inputs(8, SMALL_IMAGE, seed=8, device=device)
    assert_same_proposals(inputs.ours(**settings), Inputs(8, SMALL_IMAGE, seed=8).torchvision(**settings))


def test_images_of_different_sizes_are_clipped_to_their_own_size(device):
    sizes = [(320, 480), (200, 150), (317, 33)]
    inputs = Inputs(3, SMALL_IMAGE, seed=3, device=device, delta_scale=2.0, image_sizes=sizes)
    got = inputs.ours(**TEST_SETTINGS)
    assert_same_proposals(got, Inputs(3, SMALL_IMAGE, seed=3, delta_scale=2.0, image_sizes=sizes).torchvision(
        **TEST_SETTINGS))
    for (height, width), boxes in zip(sizes, got[0]):
        assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all() and (boxes >= 0).all()


def test_deltas_beyond_the_clamp_match_torchvision():
    inputs = Inputs(2, SMALL_IMAGE, seed=4, delta_scale=8.0)  # dw, dh up to ~30, clamped at log(1000 / 16)
    assert (inputs.deltas[:, 2:] > math.log(1000 / 16)).sum() > 1000
    assert_same_proposals(inputs.ours(**TEST_SETTINGS), inputs.torchvision(**TEST_SETTINGS))


def test_custom_thresholds_match_torchvision():
    inputs = Inputs(2, SMALL_IMAGE, seed=5, delta_scale=1.0)
    settings = dict(pre_nms_top_n=300, post_nms_top_n=150, nms_thresh=0.5, score_thresh=0.6, min_size=20.0)
    got = inputs.ours(**settings)
    assert_same_proposals(got, inputs.torchvision(**settings))
    assert all(0 < len(b) <= 150 for b in got[0])


def test_fewer_anchors_than_pre_nms_top_n(device):
    inputs = Inputs(2, (64, 96), seed=6, device=device)  # levels of 1152 ... 6 anchors
    assert min(inputs.num_anchors_per_level) < 1000 < sum(inputs.num_anchors_per_level)
    assert_same_proposals(inputs.ours(**TRAINING_SETTINGS), Inputs(2, (64, 96), seed=6).torchvision(
        **TRAINING_SETTINGS))


@pytest.mark.parametrize("settings", [dict(score_thresh=1.5), dict(min_size=1e6), dict(post_nms_top_n=0),
                                      dict(pre_nms_top_n=0)], ids=["score", "min_size", "post_zero", "pre_zero"])
def test_everything_filtered_out_gives_empty_outputs(device, settings):
    inputs = Inputs(2, SMALL_IMAGE, seed=7, device=device)
    full = dict(TEST_SETTINGS, **settings)
    boxes, scores = inputs.ours(**full)
    assert [b.shape for b in boxes] == [(0, 4)] * 2 and [s.shape for s in scores] == [(0,)] * 2
    assert boxes[0].dtype == torch.float32 and scores[0].device.type == torch.device(device).type
    if "pre_nms_top_n" not in settings:
        assert_same_proposals((boxes, scores), Inputs(2, SMALL_IMAGE, seed=7).torchvision(**full))


def test_saturated_logits_tie_like_torchvision():
    """Logits of 50 and 30 (sigmoid exactly 1.0) on level-0 anchors 64 px apart, which do not suppress each
    other, fewer than top-k: every tie is kept, in some order among equal scores."""
    inputs = Inputs(2, SMALL_IMAGE, seed=8)
    total = sum(inputs.num_anchors_per_level)
    inputs.deltas.zero_()
    logits = inputs.objectness.view(2, total)
    width = inputs.grid_sizes[0][1]
    tied = torch.tensor([3 * (row * width + col) for row in range(0, 80, 16) for col in range(0, width, 16)])
    logits[:, tied] = 50.0
    logits[:, tied + 1] = 30.0  # another cell anchor at the same place: sigmoid 1.0 too, lower logit
    got = inputs.ours(**TEST_SETTINGS)
    assert (got[1][0] == 1.0).sum() == 2 * len(tied)
    assert_same_proposals(got, inputs.torchvision(**TEST_SETTINGS))


def test_ties_at_the_top_k_boundary_prefer_lower_indices():
    """torch.topk leaves the choice among equal logits at the boundary unspecified; we take the lowest anchor
    indices, as the reference's stable sort does."""
    inputs = Inputs(1, SMALL_IMAGE, seed=9)
    inputs.objectness.fill_(1.0)
    settings = dict(pre_nms_top_n=100, post_nms_top_n=500)
    got = inputs.ours(**settings)
    assert_same_proposals(got, inputs.reference(**settings))
    anchors = inputs.anchors[0]
    kept_level0 = {tuple(a) for a in rpn_ops.decode_boxes(inputs.deltas[:100], anchors[:100], (1, 1, 1, 1))
                   .clamp(min=0).tolist()}
    assert len(kept_level0 & {tuple(b) for b in got[0][0].tolist()}) > 0


def test_nan_logits_are_ranked_first_and_dropped_like_torchvision():
    inputs = Inputs(2, SMALL_IMAGE, seed=10)
    inputs.objectness[::97] = float("nan")
    got = inputs.ours(**TEST_SETTINGS)
    assert all(not torch.isnan(s).any() for s in got[1])
    assert_same_proposals(got, inputs.torchvision(**TEST_SETTINGS))


# ---------------------------------------------------------------------------------------------------------
# Dtypes and layouts

def test_float64_matches_torchvision(device):
    inputs = Inputs(2, SMALL_IMAGE, seed=11, dtype=torch.float64, device=device)
    got = inputs.ours(**TEST_SETTINGS)
    assert got[0][0].dtype == got[1][0].dtype == torch.float64
    assert_same_proposals(got, Inputs(2, SMALL_IMAGE, seed=11, dtype=torch.float64).torchvision(**TEST_SETTINGS))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_match_torchvision_with_float32_nms(monkeypatch, dtype):
    """torchvision's CPU NMS rejects float16 / bfloat16; every other step runs in the half type, as ours.
    Logits are distinct half values (torch.topk picks arbitrarily among equal ones) and nothing is cut at
    post_nms_top_n (torchvision orders equal scores of different levels arbitrarily)."""
    inputs = Inputs(2, (128, 192), seed=12, dtype=dtype, delta_scale=1.0)
    inputs.objectness = distinct_half_values(len(inputs.objectness), dtype, seed=12)[:, None]
    settings = dict(pre_nms_top_n=1000, post_nms_top_n=10000)
    got = inputs.ours(**settings)
    assert got[0][0].dtype == got[1][0].dtype == dtype
    nms = torchvision.ops.boxes.nms
    monkeypatch.setattr(torchvision.ops.boxes, "nms", lambda b, s, t: nms(b.float(), s.float(), t))
    assert_same_proposals(got, inputs.torchvision(**settings))
    inputs.objectness = Inputs(2, (128, 192), seed=12, dtype=dtype).objectness  # with ties: the reference's order
    assert_same_proposals(inputs.ours(**TEST_SETTINGS), inputs.reference(**TEST_SETTINGS))


def distinct_half_values(n, dtype, seed):
    """n distinct values of a 16-bit float type in [-4, 4], in random order."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    usable = every[torch.isfinite(every) & (every.float().abs() <= 4) & (every != 0)]
    g = torch.Generator().manual_seed(seed)
    assert len(usable) >= n
    return usable[torch.randperm(len(usable), generator=g)[:n]]


def test_half_objectness_with_float32_deltas(device):
    inputs = Inputs(2, SMALL_IMAGE, seed=13, device=device)
    inputs.objectness = inputs.objectness.half()
    boxes, scores = inputs.ours(**TEST_SETTINGS)
    assert boxes[0].dtype == torch.float32 and scores[0].dtype == torch.float16
    assert_same_proposals((boxes, scores), inputs.reference(**TEST_SETTINGS))


def test_non_contiguous_inputs_and_layouts(device):
    inputs = Inputs(2, SMALL_IMAGE, seed=14, device=device)
    expected = inputs.ours(**TEST_SETTINGS)
    total = sum(inputs.num_anchors_per_level)
    inputs.objectness = inputs.objectness.view(2, total).t().contiguous().t()  # [B, A], column-major
    inputs.deltas = inputs.deltas.t().contiguous().t()
    assert not inputs.objectness.is_contiguous() and not inputs.deltas.is_contiguous()
    assert_same_proposals(inputs.ours(**TEST_SETTINGS), expected)
    stacked = torch.stack(inputs.anchors).transpose(1, 2).contiguous().transpose(1, 2)
    assert_same_proposals(inputs.ours(anchors=stacked, **TEST_SETTINGS), expected)
    assert_same_proposals(inputs.ours(anchors=inputs.anchors[0], **TEST_SETTINGS), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_anchor_grid_equals_materialised_anchors(device, dtype):
    inputs = Inputs(2, SMALL_IMAGE, seed=15, dtype=dtype, device=device)
    grid = rpn_ops.AnchorGrid.from_generator(inputs.generator, inputs.batch_size, inputs.grid_sizes, dtype=dtype,
                                             device=device)
    inputs.anchors = [a.to(dtype) for a in inputs.anchors]
    assert_same_proposals(inputs.ours(anchors=grid, **TEST_SETTINGS), inputs.ours(**TEST_SETTINGS))


def test_reference_agrees_with_torchvision_and_ours():
    inputs = Inputs(2, (128, 192), seed=16, delta_scale=1.0)
    settings = dict(pre_nms_top_n=200, post_nms_top_n=100)
    expected = inputs.torchvision(**settings)
    assert_same_proposals(inputs.reference(**settings), expected)
    assert_same_proposals(inputs.ours(**settings), expected)


def test_more_image_level_segments_than_one_grid_dimension_holds(gpu):
    """13108 images x 5 levels of one anchor: 65540 (image, level) NMS segments, more than the 65535 blocks of a
    grid's z dimension, in which the CUDA kernel once launched all the segment masks (found by the emulator)."""
    images, levels = 13108, 5
    g = torch.Generator().manual_seed(31)
    anchors = workloads.random_boxes(levels, seed=31)
    objectness = torch.randn(images * levels, 1, generator=g)
    deltas = 0.1 * torch.randn(images * levels, 4, generator=g)
    image_sizes = [(480, 640)] * images
    with cpu_kernels():
        expected = rpn_ops.generate_proposals(objectness, deltas, anchors, image_sizes, [1] * levels, 1, levels)
    got = rpn_ops.generate_proposals(objectness.to(gpu), deltas.to(gpu), anchors.to(gpu), image_sizes, [1] * levels, 1,
                                     levels)
    assert_same_proposals(got, expected, exact=gpu != "cuda")


@pytest.mark.parametrize("settings", [TEST_SETTINGS, dict(pre_nms_top_n=50, post_nms_top_n=20, score_thresh=0.6)])
def test_padded_outputs_hold_the_lists(device, settings):
    inputs = Inputs(3, SMALL_IMAGE, seed=17, device=device)
    boxes, scores = inputs.ours(**settings)
    padded_boxes, padded_scores, counts = inputs.ours(padded=True, **settings)
    post = settings["post_nms_top_n"]
    assert padded_boxes.shape == (3, post, 4) and padded_scores.shape == (3, post) and counts.dtype == torch.int64
    assert counts.tolist() == [len(b) for b in boxes]
    for b in range(3):
        n = len(boxes[b])
        assert torch.equal(padded_boxes[b, :n], boxes[b]) and torch.equal(padded_scores[b, :n], scores[b])
        assert (padded_boxes[b, n:] == 0).all() and (padded_scores[b, n:] == 0).all()


@pytest.mark.parametrize("settings", [TEST_SETTINGS, TRAINING_SETTINGS], ids=["test", "training"])
def test_cuda_kernels_match_cpu(gpu, settings):
    got = Inputs(4, SMALL_IMAGE, seed=18, device=gpu).ours(**settings)
    with cpu_kernels():
        expected = Inputs(4, SMALL_IMAGE, seed=18).ours(**settings)
    assert_same_proposals(got, expected, exact=gpu != "cuda")


@needs_cuda
def test_cuda_padded_is_graph_capturable():
    inputs = Inputs(2, SMALL_IMAGE, seed=19, device="cuda")
    expected = inputs.ours(padded=True, **TEST_SETTINGS)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = inputs.ours(padded=True, **TEST_SETTINGS)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, expected):
        assert torch.equal(got, want)


@pytest.mark.skipif(not rpn_ops.build_info()["cpu_isas_supported"], reason="no instruction set")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_cpu_instruction_set_gives_the_same_proposals(isa):
    if isa not in rpn_ops.build_info()["cpu_isas_supported"]:
        pytest.skip(f"this CPU has no {isa}")
    inputs = Inputs(2, SMALL_IMAGE, seed=20)
    expected = inputs.ours(**TEST_SETTINGS)
    rpn_ops.set_cpu_isa(isa)
    assert_same_proposals(inputs.ours(**TEST_SETTINGS), expected)


# ---------------------------------------------------------------------------------------------------------
# PyTorch integration

def test_opcheck(device):
    inputs = Inputs(2, (64, 96), seed=21, device=device)
    args = rpn_ops.proposals._proposal_args(inputs.objectness, inputs.deltas, inputs.anchors, inputs.image_sizes,
                                            inputs.num_anchors_per_level, 100, 50, 0.7, 0.0, 1e-3)
    torch.library.opcheck(torch.ops.rpn_ops.generate_proposals_padded.default, args)
    torch.library.opcheck(torch.ops.rpn_ops.generate_proposals.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@compiles
def test_torch_compile_fullgraph(device):
    inputs = Inputs(2, (64, 96), seed=22, device=device)

    def padded(objectness, deltas, anchors):
        return rpn_ops.generate_proposals(objectness, deltas, anchors, inputs.image_sizes,
                                          inputs.num_anchors_per_level, 100, 50, padded=True)

    def lists(objectness, deltas, anchors):
        boxes, scores = rpn_ops.generate_proposals(objectness, deltas, anchors, inputs.image_sizes,
                                                   inputs.num_anchors_per_level, 100, 50)
        return [b * 2 for b in boxes], [s + 1 for s in scores]

    args = (inputs.objectness, inputs.deltas, inputs.anchors)
    for fn in (padded, lists):
        torch._dynamo.reset()
        got, expected = torch.compile(fn, fullgraph=True)(*args), fn(*args)
        for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
            assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a Python error that says what is wrong

def _bad(inputs, **change):
    args = dict(objectness=inputs.objectness, pred_bbox_deltas=inputs.deltas, anchors=inputs.anchors,
                image_sizes=inputs.image_sizes, num_anchors_per_level=inputs.num_anchors_per_level,
                pre_nms_top_n=100, post_nms_top_n=50)
    args.update(change)
    return rpn_ops.generate_proposals(**args)


@pytest.mark.parametrize("change, error, message", [
    (lambda i: dict(num_anchors_per_level=i.num_anchors_per_level[:-1]), RuntimeError, "objectness must have shape"),
    (lambda i: dict(num_anchors_per_level=[-1] + i.num_anchors_per_level[1:]), ValueError, "must be >= 0"),
    (lambda i: dict(image_sizes=i.image_sizes[:1]), RuntimeError, "B = 1 images"),
    (lambda i: dict(pre_nms_top_n=-1), ValueError, "pre_nms_top_n must be >= 0"),
    (lambda i: dict(post_nms_top_n=-5), ValueError, "post_nms_top_n must be >= 0"),
    (lambda i: dict(nms_thresh=float("nan")), ValueError, "nms_thresh must be a finite number"),
    (lambda i: dict(score_thresh=float("inf")), ValueError, "score_thresh must be a finite number"),
    (lambda i: dict(min_size=float("-inf")), ValueError, "min_size must be a finite number"),
    (lambda i: dict(pred_bbox_deltas=i.deltas[:, :3]), RuntimeError, "pred_bbox_deltas must have shape"),
    (lambda i: dict(anchors=[a[:-1] for a in i.anchors]), RuntimeError, r"anchors\[0\] must have shape"),
    (lambda i: dict(anchors=i.anchors * 2), ValueError, "one per image"),
    (lambda i: dict(objectness=i.objectness.int()), TypeError, "objectness must be float16"),
    (lambda i: dict(anchors=[i.anchors[0], i.anchors[1].double()]), TypeError, "one dtype"),
    (lambda i: dict(image_sizes=[(64, 96), (64,)]), ValueError, "must be a pair"),
    (lambda i: dict(anchors="anchors"), TypeError, "anchors must be a tensor"),
])
def test_bad_input_raises_a_clear_error(device, change, error, message):
    inputs = Inputs(2, (64, 96), seed=23, device=device)
    with pytest.raises(error, match=message):
        _bad(inputs, **change(inputs))


@needs_cuda
def test_mixed_devices_are_rejected():
    inputs = Inputs(2, (64, 96), seed=24)
    with pytest.raises(RuntimeError, match="same device as objectness"):
        _bad(inputs, pred_bbox_deltas=inputs.deltas.cuda())


def test_anchors_that_require_grad_are_refused_with_a_clear_error():
    """generate_proposals gives no gradient (torchvision's decode would, to the anchors): it says so instead of
    returning proposals that silently carry none."""
    anchors = workloads.random_boxes(40, seed=3).requires_grad_()
    objectness, deltas = torch.randn(40, 1), torch.randn(40, 4)
    with pytest.raises(ValueError, match="does not propagate gradients to the anchors"):
        rpn_ops.generate_proposals(objectness, deltas, anchors, [(100, 100)], [40], 10, 10)
