"""rpn_ops.dense_focal_loss: RetinaNet's sigmoid focal loss from one class label per anchor, and rpn_ops.anchor_labels,
which builds those labels from a matcher's indices. The plain-PyTorch reference against torchvision itself, to the
bit; the operator and its gradient against the reference computed in float64, on every device, for every dtype,
alpha, gamma, mix of labels, shape and layout; NaN and infinities; RetinaNet's classification loss end to end; bad
input; opcheck, torch.compile, autocast and determinism."""
import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

import emulator
import rpn_ops
from helpers import FLOAT_DTYPES, compiles, cpu_kernels, emulated, needs_cuda, too_large_to_emulate
from rpn_ops import reference

ALPHAS = [0.25, 0.0, 1.0, -1.0]
GAMMAS = [2.0, 0.0, 1.0, 3.0, 0.5, 1.5]
SHAPE = (3, 150, 9)  # emulated: the CUDA threads run one by one
TWO_BLOCK_SHAPE = (3, 300, 20)  # 6000 logits an image: two blocks of 4096 per image, three images on a grid of two

# The sums' tolerance against the float64 reference. float64: its own rounding. float32: the rounding of each term,
# which the kernels compute in float32 in torchvision's operation order, whose (1 - t) x - log_sigmoid(x) cancels (up
# to 2.3e-6 measured on few terms; each term is within a few ulps of torchvision's float32 one, FLOAT32_TERMS_RTOL).
# float16 and bfloat16, computed in float32: one rounding of the sum to their type.
SUM_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: torch.finfo(torch.float16).eps,
            torch.bfloat16: torch.finfo(torch.bfloat16).eps}
SUM_ATOL = {torch.float64: 1e-30, torch.float32: 1e-30, torch.float16: torch.finfo(torch.float16).tiny,
            torch.bfloat16: torch.finfo(torch.bfloat16).tiny}
FLOAT32_TERMS_RTOL = 3e-7  # 2.5 float32 ulps of the sum of torchvision's float32 terms (1.5 measured)
GRAD_TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-7),
                  torch.float16: dict(rtol=torch.finfo(torch.float16).eps, atol=1e-7),
                  torch.bfloat16: dict(rtol=torch.finfo(torch.bfloat16).eps, atol=1e-7)}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------
# Inputs


def randn_logits(shape, g):
    return torch.randn(shape, generator=g, dtype=torch.float64) * 3


def trained_logits(shape, g):
    """A trained RetinaNet's logits: most near its prior's -4.6 (sigmoid 0.01), a few confident peaks."""
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 0.7 - 4.6
    peaks = torch.rand(shape, generator=g) < 0.02
    return torch.where(peaks, torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 2, logits)


def large_logits(shape, g):
    """-100, -30, 30 and 100: sigmoids of exactly 0 or 1 in float32, and exp(-100) a float32 subnormal."""
    values = torch.tensor([-100.0, -30.0, 30.0, 100.0], dtype=torch.float64)
    return values[torch.randint(0, 4, shape, generator=g)]


LOGITS = {"randn": randn_logits, "trained": trained_logits, "large": large_logits}


def make_logits(shape, kind="randn", seed=0, dtype=torch.float32, device="cpu"):
    return LOGITS[kind](shape, torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)


def make_labels(images, anchors, classes, mix="mixed", seed=0, device="cpu"):
    """[B, A] labels: "mixed" (about 70 % background, 10 % ignored, 20 % foreground of a random class), or all
    "background", "ignored" or "foreground". Without classes, "mixed" has no foreground."""
    g = torch.Generator().manual_seed(seed + 1000)
    shape = (images, anchors)
    foreground = torch.randint(0, max(classes, 1), shape, generator=g) if classes else torch.full(shape, -1)
    draw = torch.rand(shape, generator=g)
    labels = {"mixed": torch.where(draw < 0.7, -1, torch.where(draw < 0.8, -2, foreground)),
              "background": torch.full(shape, -1), "ignored": torch.full(shape, -2), "foreground": foreground}[mix]
    return labels.to(device)


def inputs(shape=SHAPE, kind="randn", mix="mixed", seed=0, dtype=torch.float32, device="cpu"):
    return make_logits(shape, kind, seed, dtype, device), make_labels(*shape, mix, seed, device)


def as_matcher_output(labels, classes, seed=0):
    """Matcher indices and ground-truth labels that give `labels`: class c's box at a shuffled position, matched by
    the anchors of class c; the negative labels are the matcher's own."""
    order = torch.randperm(classes, generator=torch.Generator().manual_seed(seed + 2000))
    position_of_class = torch.argsort(order)
    matched = torch.where(labels >= 0, position_of_class[labels.clamp(min=0)], labels)
    return list(matched), [order.clone() for _ in range(len(labels))]


# ---------------------------------------------------------------------------------------------------------
# Ground truth


def torchvision_sums(cls_logits, matched_idxs, targets, alpha=0.25, gamma=2.0):
    """Per image, the sum RetinaNetClassificationHead.compute_loss divides by its foreground count, with its steps
    (the one-hot target from the matched ground truth, the valid anchors' rows) and the given alpha and gamma."""
    sums = []
    for targets_per_image, cls_logits_per_image, matched_idxs_per_image in zip(targets, cls_logits, matched_idxs):
        foreground_idxs_per_image = matched_idxs_per_image >= 0
        gt_classes_target = torch.zeros_like(cls_logits_per_image)
        gt_classes_target[foreground_idxs_per_image,
                          targets_per_image["labels"][matched_idxs_per_image[foreground_idxs_per_image]]] = 1.0
        valid_idxs_per_image = matched_idxs_per_image != Matcher.BETWEEN_THRESHOLDS
        sums.append(torchvision.ops.sigmoid_focal_loss(cls_logits_per_image[valid_idxs_per_image],
                                                       gt_classes_target[valid_idxs_per_image], alpha, gamma,
                                                       reduction="sum"))
    return torch.stack(sums)


def expected_sums(logits, labels, alpha=0.25, gamma=2.0):
    """The reference in float64 on the logits' values (which float16 / bfloat16 logits have in float32 too)."""
    return reference.dense_focal_loss(logits.detach().cpu().double(), labels.cpu(), alpha, gamma)


def float32_terms_summed(logits, labels, alpha=0.25, gamma=2.0):
    """Per image, torchvision's float32 terms (sigmoid_focal_loss, reduction "none", on the device) summed in
    float64: the kernels' sum, up to the rounding of exp and log1p."""
    sums = []
    for x, image_labels in zip(logits.detach(), labels):
        target = torch.zeros_like(x)
        foreground = image_labels >= 0
        target[foreground, image_labels[foreground]] = 1.0
        valid = image_labels != -2
        terms = torchvision.ops.sigmoid_focal_loss(x[valid], target[valid], alpha, gamma, reduction="none")
        sums.append(terms.double().sum())
    return torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.float64)


def expected_gradient(logits, labels, alpha=0.25, gamma=2.0, upstream=None):
    """The gradient of the float64 reference's (sums * upstream).sum() with respect to the logits."""
    x = logits.detach().cpu().double().requires_grad_()
    sums = reference.dense_focal_loss(x, labels.cpu(), alpha, gamma)
    weights = torch.ones_like(sums) if upstream is None else upstream.cpu().double()
    (sums * weights).sum().backward()
    return x.grad


def assert_sums(got, logits, labels, alpha=0.25, gamma=2.0):
    """`got` is the loss of the logits' dtype and device: the float64 reference within the dtype's rounding and, in
    float32, the float64 sum of torchvision's float32 terms within a few ulps."""
    dtype = logits.dtype
    assert got.dtype == dtype and got.shape == logits.shape[:1] and got.device == logits.device, (got.dtype, got.shape)
    torch.testing.assert_close(got.cpu().double(), expected_sums(logits, labels, alpha, gamma), rtol=SUM_RTOL[dtype],
                               atol=SUM_ATOL[dtype], equal_nan=True,
                               msg=lambda m: f"alpha={alpha}, gamma={gamma}, {dtype_id(dtype)}: {m}")
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu().double(), float32_terms_summed(logits, labels, alpha, gamma),
                                   rtol=FLOAT32_TERMS_RTOL, atol=SUM_ATOL[dtype], equal_nan=True,
                                   msg=lambda m: f"alpha={alpha}, gamma={gamma}, float32 terms: {m}")


def assert_gradient(got, logits, labels, alpha=0.25, gamma=2.0, upstream=None):
    """`got` is the float64 reference's gradient within the dtype's rounding, exactly 0 for ignored anchors."""
    assert got.dtype == logits.dtype and got.shape == logits.shape and got.device == logits.device
    torch.testing.assert_close(got.cpu().double(), expected_gradient(logits, labels, alpha, gamma, upstream),
                               **GRAD_TOLERANCE[logits.dtype],
                               msg=lambda m: f"alpha={alpha}, gamma={gamma}, {dtype_id(logits.dtype)}: {m}")
    ignored = got[labels == -2]
    assert torch.equal(ignored, torch.zeros_like(ignored))


def loss_and_gradient(logits, labels, alpha=0.25, gamma=2.0, upstream=None):
    """The operator's loss and, through autograd, the gradient of (loss * upstream).sum()."""
    x = logits.detach().requires_grad_()
    loss = rpn_ops.dense_focal_loss(x, labels, alpha, gamma)
    (loss.sum() if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), x.grad


# ---------------------------------------------------------------------------------------------------------
# The reference is torchvision


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_reference_is_torchvisions_sigmoid_focal_loss(dtype, alpha, gamma):
    """The reference equals, to the bit, torchvision's sigmoid_focal_loss per image on the one-hot targets of the
    valid anchors, built from a matcher's indices as RetinaNetClassificationHead.compute_loss builds them."""
    logits, labels = inputs((3, 200, 7), dtype=dtype)
    labels[2] = -1
    matched_idxs, gt_labels = as_matcher_output(labels, 7)
    expected = torchvision_sums(logits, matched_idxs, [{"labels": gt} for gt in gt_labels], alpha, gamma)
    assert torch.equal(reference.dense_focal_loss(logits, labels, alpha, gamma), expected)


# ---------------------------------------------------------------------------------------------------------
# The operator is the reference


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_loss_is_the_float64_reference(device, dtype, alpha):
    """Every dtype, alpha and gamma, on spread-out logits and on a trained detector's."""
    for gamma in GAMMAS:
        for kind in ("randn", "trained"):
            logits, labels = inputs(kind=kind, seed=1, dtype=dtype, device=device)
            assert_sums(rpn_ops.dense_focal_loss(logits, labels, alpha, gamma), logits, labels, alpha, gamma)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_large_logits(device, dtype):
    """Logits of +-30 and +-100: sigmoids of exactly 0 and 1, cross entropies of 0 and 100."""
    logits, labels = inputs(kind="large", seed=2, dtype=dtype, device=device)
    for alpha, gamma in [(0.25, 2.0), (-1.0, 0.5), (1.0, 1.5), (0.0, 0.0)]:
        assert_sums(rpn_ops.dense_focal_loss(logits, labels, alpha, gamma), logits, labels, alpha, gamma)


@pytest.mark.parametrize("mix", ["mixed", "background", "foreground", "ignored"])
def test_label_mixes(device, mix):
    """Every mix of labels, also with one class: few terms, whose float32 rounding averages out the least."""
    for shape in (SHAPE, (2, 40, 1)):
        logits, labels = inputs(shape, "trained", mix, seed=3, device=device)
        for alpha, gamma in [(0.25, 2.0), (0.25, 0.0), (-1.0, 1.5)]:
            loss = rpn_ops.dense_focal_loss(logits, labels, alpha, gamma)
            assert_sums(loss, logits, labels, alpha, gamma)
            assert (loss == 0).all() if mix == "ignored" else (loss > 0).all()


def test_defaults_are_retinanets(device):
    """alpha 0.25 and gamma 2 by default, as torchvision's RetinaNet."""
    logits, labels = inputs(seed=4, device=device)
    assert torch.equal(rpn_ops.dense_focal_loss(logits, labels),
                       torch.ops.rpn_ops.dense_focal_loss(logits, labels, 0.25, 2.0))


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 7, 0), (0, 7, 5), (0, 0, 0)], ids=str)
def test_empty_inputs(device, shape):
    """No anchors, no classes or no images: zero sums, one per image, and an empty or zero gradient."""
    logits, labels = inputs(shape, device=device)
    loss, grad = loss_and_gradient(logits, labels)
    assert loss.shape == shape[:1] and loss.dtype == logits.dtype and (loss == 0).all()
    assert grad.shape == shape and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_non_contiguous_inputs(device, dtype):
    """Classes outermost, every other logit, labels of every other column: the contiguous inputs' loss and
    gradient."""
    logits, labels = inputs(seed=5, dtype=dtype, device=device)
    expected = loss_and_gradient(logits, labels)
    wide_logits = torch.zeros(*SHAPE[:2], 2 * SHAPE[2], dtype=dtype, device=device)
    wide_logits[..., ::2] = logits
    wide_labels = torch.stack([labels, labels], 2).reshape(SHAPE[0], 2 * SHAPE[1])[:, ::2]
    classes_outermost = logits.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    for strided_logits in (wide_logits[..., ::2], classes_outermost):
        assert not strided_logits.is_contiguous() and not wide_labels.is_contiguous()
        got = loss_and_gradient(strided_logits, wide_labels)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_loss_is_torchvisions_within_its_float32_rounding(device):
    """The float32 loss against torchvision's float32 sums (whose own float32 summation is the tolerance)."""
    logits, labels = inputs(TWO_BLOCK_SHAPE, "trained", seed=6, device=device)
    matched_idxs, gt_labels = as_matcher_output(labels.cpu(), TWO_BLOCK_SHAPE[2], seed=6)
    for alpha, gamma in [(0.25, 2.0), (-1.0, 1.5)]:
        expected = torchvision_sums(logits.cpu(), matched_idxs, [{"labels": gt} for gt in gt_labels], alpha, gamma)
        torch.testing.assert_close(rpn_ops.dense_focal_loss(logits, labels, alpha, gamma).cpu(), expected,
                                   rtol=1e-5, atol=0)


@too_large_to_emulate
def test_many_blocks(device):
    """COCO's 91 classes on 20k anchors: many blocks on every device."""
    logits, labels = inputs((2, 20_000, 91), "trained", seed=7, device=device)
    assert_sums(rpn_ops.dense_focal_loss(logits, labels), logits, labels)


# ---------------------------------------------------------------------------------------------------------
# Gradient


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradient_is_the_float64_references(device, dtype, alpha):
    """Through loss.sum() and with a different upstream gradient per image."""
    logits, labels = inputs(seed=8, dtype=dtype, device=device)
    upstream = torch.tensor([0.5, -2.0, 3.0], dtype=dtype, device=device)
    for gamma in GAMMAS:
        assert_gradient(loss_and_gradient(logits, labels, alpha, gamma)[1], logits, labels, alpha, gamma)
        assert_gradient(loss_and_gradient(logits, labels, alpha, gamma, upstream)[1], logits, labels, alpha, gamma,
                        upstream)


@pytest.mark.parametrize("kind", ["trained", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_gradient_of_saturated_and_trained_logits(device, kind, dtype):
    """Sigmoids of 0 and 1 (gamma >= 1: the reference's autograd has no q ** (gamma - 1) at q = 0 then)."""
    logits, labels = inputs(kind=kind, seed=9, dtype=dtype, device=device)
    for alpha, gamma in [(0.25, 2.0), (-1.0, 1.0), (0.5, 3.0)]:
        assert_gradient(loss_and_gradient(logits, labels, alpha, gamma)[1], logits, labels, alpha, gamma)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 1.5), (0.75, 0.5)])
def test_gradcheck(alpha, gamma):
    """The analytic gradient is the loss's numerical derivative."""
    logits, labels = inputs((2, 6, 3), seed=10, dtype=torch.float64)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: rpn_ops.dense_focal_loss(x, labels, alpha, gamma), (logits,))


def test_cuda_backward_kernel_matches_the_cpu_kernel(gpu):
    """The backward kernel on several grids: one block, two blocks an image, a grid-stride loop, more images than
    a grid holds (under the emulator's small sizings). The gradients are the CPU kernel's to the bit: both compute
    each term with focal_math.h's exp and log1p, without contraction (EmulatedCuda checks every emulated run)."""
    if emulated():
        emulator.module().reset_kernel_runs()
    for seed, shape in enumerate([(1, 1, 1), (3, 5, 3), TWO_BLOCK_SHAPE, (2, 450, 20)]):
        logits, labels = inputs(shape, "trained", seed=seed)
        grad = torch.tensor([1.0, -0.5, 2.0][:shape[0]])
        with cpu_kernels():
            expected = torch.ops.rpn_ops.dense_focal_loss_backward(grad, logits, labels, 0.25, 2.0)
        got = torch.ops.rpn_ops.dense_focal_loss_backward(grad.to(gpu), logits.to(gpu), labels.to(gpu), 0.25, 2.0)
        assert torch.equal(got.cpu(), expected)
    if emulated():
        launches, blocks, _ = emulator.kernel_runs()["focal_gradient_kernel<float>"]
        assert launches == 2 * 4 and blocks > launches


# ---------------------------------------------------------------------------------------------------------
# NaN and infinities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_nan_and_infinite_logits_give_torchvisions_sums(device, dtype):
    """A NaN logit: a NaN sum. +inf at a target of 0: inf. -inf at a target of 0, or any infinity at a target of 1:
    NaN (binary_cross_entropy_with_logits' (1 - t) x - log_sigmoid(x)). Ignored anchors' logits do not count."""
    logits, labels = inputs((6, 10, 4), "trained", seed=11, dtype=dtype, device=device)
    labels[:, :3] = torch.tensor([-1, 2, -2])
    special = [(0, 0, 1, math.nan), (1, 0, 1, math.inf), (2, 0, 1, -math.inf), (3, 1, 2, math.inf),
               (4, 1, 2, -math.inf), (5, 2, 0, math.nan)]  # image, anchor (background, class 2, ignored), class
    for image, anchor, c, value in special:
        logits[image, anchor, c] = value
    loss = rpn_ops.dense_focal_loss(logits, labels)
    assert_sums(loss, logits, labels)
    assert loss[1].item() == math.inf and loss[0].isnan() and loss[2:5].isnan().all() and loss[5].isfinite()


# ---------------------------------------------------------------------------------------------------------
# RetinaNet's labels and classification loss


def test_anchor_labels_from_matched_indices():
    """A matched anchor takes its ground truth's class, the others the matcher's -1 or -2; an image without
    ground truth is all background."""
    matched_idxs = [torch.tensor([0, -1, 2, -2, 1, 0, -1]), torch.tensor([-1, -1, -1, -1, -1, -1, -1]),
                    torch.tensor([-2, 0, -1, 0, -2, -2, -1])]
    gt_labels = [torch.tensor([4, 0, 2]), torch.zeros(0, dtype=torch.int64), torch.tensor([3], dtype=torch.int32)]
    labels = rpn_ops.anchor_labels(matched_idxs, gt_labels)
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[4, -1, 2, -2, 0, 4, -1], [-1] * 7, [-2, 3, -1, 3, -2, -2, -1]]


def test_retinanets_classification_loss(device):
    """torchvision's RetinaNetClassificationHead.compute_loss on Matcher output, and its gradient, from the
    operator: (sums / foreground anchors per image, at least 1).sum() / images."""
    head = RetinaNetClassificationHead(in_channels=8, num_anchors=3, num_classes=5)
    g = torch.Generator().manual_seed(12)
    anchors = torchvision.ops.box_convert(torch.rand(240, 4, generator=g) * torch.tensor([96.0, 96, 32, 32]) +
                                          torch.tensor([0.0, 0, 8, 8]), "cxcywh", "xyxy")
    gt_boxes = [anchors[torch.randperm(240, generator=g)[:4]] + torch.randn(4, 4, generator=g),
                torch.zeros(0, 4), anchors[:1] + 1.0]
    targets = [{"boxes": boxes, "labels": torch.randint(0, 5, (len(boxes),), generator=g)} for boxes in gt_boxes]
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    matched_idxs = [matcher(torchvision.ops.box_iou(t["boxes"], anchors)) if len(t["boxes"])
                    else torch.full((240,), -1, dtype=torch.int64) for t in targets]
    assert all((m == -2).any() for m in matched_idxs[::2]) and all((m >= 0).any() for m in matched_idxs[::2])
    labels = rpn_ops.anchor_labels(matched_idxs, [t["labels"] for t in targets])
    cls_logits = make_logits((3, 240, 5), "trained", seed=12).requires_grad_()
    expected = head.compute_loss(targets, {"cls_logits": cls_logits}, matched_idxs)
    expected_grad, = torch.autograd.grad(expected, cls_logits)
    x = cls_logits.detach().to(device).requires_grad_()
    got = (rpn_ops.dense_focal_loss(x, labels.to(device)) / (labels >= 0).sum(1).clamp(min=1).to(device)).sum() / 3
    got.backward()
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.cpu(), expected_grad, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error that names the argument


@pytest.mark.parametrize("change, error, message", [
    (lambda x, l: (x[0], l), RuntimeError, r"class_logits must have shape \[images, anchors, classes\]"),
    (lambda x, l: (x.int(), l), TypeError, "class_logits must be float16, bfloat16, float32 or float64"),
    (lambda x, l: (x, l.int()), TypeError, "anchor_labels must be int64"),
    (lambda x, l: (x, l[:, 1:]), RuntimeError, r"anchor_labels must have shape \[images, anchors\] = \[2, 7\]"),
    (lambda x, l: (x, l[:1]), RuntimeError, "anchor_labels must have shape"),
    (lambda x, l: (x, l.reshape(-1)), RuntimeError, "anchor_labels must have shape"),
    (lambda x, l: (x, torch.where(l == 1, -3, l)), ValueError,
     r"anchor_labels must be a class in \[0, 5\), -1 \(background\) or -2 \(ignored\), got values in \[-3, "),
    (lambda x, l: (x, torch.where(l == 1, 5, l)), ValueError, r"got values in \[-2, 5\]"),
    (lambda x, l: (x, l, 1.5), ValueError, r"alpha must be in \[0, 1\], or -1 for no weighting, got 1.5"),
    (lambda x, l: (x, l, -0.5), ValueError, "alpha must be in"),
    (lambda x, l: (x, l, math.nan), ValueError, "alpha must be in"),
    (lambda x, l: (x, l, 0.25, math.nan), ValueError, "gamma must be a finite number, got nan"),
    (lambda x, l: (x, l, 0.25, math.inf), ValueError, "gamma must be a finite number"),
    (lambda x, l: (x.tolist(), l), TypeError, "dense_focal_loss: class_logits must be a tensor, got list"),
    (lambda x, l: (x, l.tolist()), TypeError, "dense_focal_loss: anchor_labels must be a tensor, got list"),
    (lambda x, l: (x, l, "0.25"), TypeError, "alpha must be a number, got str"),
    (lambda x, l: (x, l, 0.25, None), TypeError, "gamma must be a number, got NoneType"),
])
def test_bad_input_raises_a_clear_error(device, change, error, message):
    """Each bad argument raises the error of its kind, naming it."""
    logits, labels = inputs((2, 7, 5), device=device)
    labels[:, :3] = torch.tensor([-2, -1, 1])
    with pytest.raises(error, match=message):
        rpn_ops.dense_focal_loss(*change(logits, labels))


@pytest.mark.parametrize("grad, error", [(torch.ones(3), RuntimeError), (torch.ones(2, 1), RuntimeError),
                                         (torch.ones(()), RuntimeError), (torch.ones(2, dtype=torch.int64), TypeError)],
                         ids=["3_images", "2x1", "scalar", "int64"])
def test_backward_with_a_bad_gradient_raises(device, grad, error):
    """The backward operator takes one floating gradient per image."""
    logits, labels = inputs((2, 7, 5), device=device)
    with pytest.raises(error, match="dense_focal_loss: the gradient must"):
        torch.ops.rpn_ops.dense_focal_loss_backward(grad.to(device), logits, labels, 0.25, 2.0)


# ---------------------------------------------------------------------------------------------------------
# PyTorch integration


def test_opcheck(device):
    """Schema, fake kernel, autograd registration and AOT dispatch of both operators."""
    logits, labels = inputs((2, 40, 5), "trained", seed=13, device=device)
    logits.requires_grad_()
    torch.library.opcheck(torch.ops.rpn_ops.dense_focal_loss.default, (logits, labels, 0.25, 2.0))
    torch.library.opcheck(torch.ops.rpn_ops.dense_focal_loss.default, (logits, labels, -1.0, 1.5))
    grad = torch.tensor([1.0, -2.0], device=device)
    torch.library.opcheck(torch.ops.rpn_ops.dense_focal_loss_backward.default,
                          (grad, logits.detach(), labels, 0.25, 2.0))


@compiles
def test_torch_compile_fullgraph(device):
    """The compiled graph's loss and gradient are eager's; its sum of the losses is inductor's (the order of a
    float32 sum of three may differ)."""
    logits, labels = inputs(seed=14, device=device)

    def losses(x):
        loss = rpn_ops.dense_focal_loss(x, labels)
        return loss, loss.sum()

    def run(fn):
        x = logits.clone().requires_grad_()
        loss, total = fn(x)
        total.backward()
        return loss.detach(), total.detach(), x.grad

    torch._dynamo.reset()
    got, expected = run(torch.compile(losses, fullgraph=True)), run(losses)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])
    torch.testing.assert_close(got[1], expected[1], rtol=torch.finfo(torch.float32).eps, atol=0)


def test_scripts(device):
    """dense_focal_loss and anchor_labels script and give the eager results."""
    logits, labels = inputs(seed=16, device=device)
    matched, gt_labels = as_matcher_output(labels.cpu(), SHAPE[2], seed=16)
    matched, gt_labels = [m.to(device) for m in matched], [g.to(device) for g in gt_labels]
    assert torch.equal(torch.jit.script(rpn_ops.anchor_labels)(matched, gt_labels),
                       rpn_ops.anchor_labels(matched, gt_labels))
    assert torch.equal(torch.jit.script(rpn_ops.dense_focal_loss)(logits, labels, 0.5, 1.5),
                       rpn_ops.dense_focal_loss(logits, labels, 0.5, 1.5))


@pytest.mark.parametrize("device_type, dtype", [
    ("cpu", torch.bfloat16), pytest.param("cuda", torch.float16, marks=needs_cuda)], ids=["cpu", "cuda"])
def test_autocast_computes_half_logits_in_float32(device_type, dtype):
    """Under autocast the loss of bfloat16 / float16 logits is float32's, and its gradient float32's rounded."""
    logits, labels = inputs(seed=15, dtype=dtype, device=device_type)
    x = logits.clone().requires_grad_()
    with torch.autocast(device_type, dtype=dtype):
        loss = rpn_ops.dense_focal_loss(x, labels)
    expected, expected_grad = loss_and_gradient(logits.float(), labels)
    assert loss.dtype == torch.float32 and torch.equal(loss.detach(), expected)
    loss.sum().backward()
    assert x.grad.dtype == dtype and torch.equal(x.grad, expected_grad.to(dtype))


@needs_cuda
def test_inputs_on_another_device_are_rejected():
    """Labels or a gradient on another device than the logits raise."""
    logits, labels = inputs((2, 7, 5))
    with pytest.raises(RuntimeError, match="class_logits and anchor_labels must be on the same device"):
        rpn_ops.dense_focal_loss(logits.cuda(), labels)
    with pytest.raises(RuntimeError, match="the gradient must be on cuda"):
        torch.ops.rpn_ops.dense_focal_loss_backward(torch.ones(2), logits.cuda(), labels.cuda(), 0.25, 2.0)


# ---------------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("threading", ["idle", "busy"])
def test_cpu_results_do_not_depend_on_the_thread_count(threading):
    """One thread or two, on an idle or a busy machine: the same bits, also on repeated calls."""
    logits, labels = inputs((2, 20_000, 91), "trained", seed=17)
    threads = torch.get_num_threads()
    torch.ops.rpn_ops._set_cpu_threading(threading)
    try:
        torch.set_num_threads(1)
        expected = loss_and_gradient(logits, labels)
        torch.set_num_threads(2)
        for _ in range(2):
            got = loss_and_gradient(logits, labels)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    finally:
        torch.set_num_threads(threads)
        torch.ops.rpn_ops._set_cpu_threading("auto")


def test_cpu_results_do_not_depend_on_the_instruction_set():
    """Every instruction set the CPU runs (the float32 terms of negative targets are SIMD lanes): the same bits."""
    logits, labels = inputs((2, 2000, 91), "trained", seed=19)
    results = {}
    for isa in rpn_ops.build_info()["cpu_isas_supported"]:
        rpn_ops.set_cpu_isa(isa)
        results[isa] = loss_and_gradient(logits, labels)
    for isa, (loss, grad) in results.items():
        assert torch.equal(loss, results["baseline"][0]) and torch.equal(grad, results["baseline"][1]), isa


def test_repeated_calls_are_bit_equal(device):
    """The same loss and gradient, to the bit, call after call."""
    logits, labels = inputs(TWO_BLOCK_SHAPE, "trained", seed=18, device=device)
    expected = loss_and_gradient(logits, labels)
    got = loss_and_gradient(logits, labels)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
