"""rpn_ops.score_candidates: torchvision's per-level score step of RetinaNet / FCOS (sigmoid, threshold, the kept
scores and their flat indices), to the bit, without the sigmoid of every logit."""
import pytest
import torch

import rpn_ops
from emulator import one_by_one_sigmoid_candidates
from helpers import emulated


def torchvision_steps(logits, score_thresh):
    """What torchvision's postprocess_detections runs per image and level."""
    scores = torch.sigmoid(logits).flatten()
    keep = scores > score_thresh
    return scores[keep], torch.where(keep)[0]


def assert_same(got, expected):
    assert got[0].dtype == expected[0].dtype and got[1].dtype == torch.int64
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[0], expected[0])


def detection_logits(n, seed=0, dtype=torch.float32, device="cpu"):
    """Trained-like class logits: mostly far below a 0.05 score, some near it, a few saturated to 1.0 (ties)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * 1.5 - 4.0
    if n:
        logits[torch.randint(0, n, (max(1, n // 500),), generator=g)] = 40.0
    return logits.to(dtype).to(device)


def _expected(device):
    """The CPU and CUDA kernels give torchvision's steps' bits; the emulated CUDA kernels compute as CUDA does."""
    return one_by_one_sigmoid_candidates if emulated() else torchvision_steps


SIZES = [0, 1, 31, 32, 33, 1000, 32768, 32769, 100_003, 1_234_567]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_and_indices_are_torchvisions_to_the_bit(device, n, dtype):
    logits = detection_logits(n, seed=n, dtype=dtype, device=device)
    for score_thresh in (0.05, 0.5, 0.999, 1e-30):
        assert_same(rpn_ops.score_candidates(logits, score_thresh), _expected(device)(logits, score_thresh))


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_cpu_scores_follow_torchs_split_for_each_thread_count(threads):
    """torch.sigmoid's vectorised and scalar paths round differently, and which elements take the scalar one
    depends on how many threads share the tensor: the same bits as torch at every thread count."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for n in (32769, 65536 * 3 + 17, 1_000_001):
            logits = torch.linspace(-3.2, 3.0, n)  # every score near the thresholds: the paths differ often
            for score_thresh in (0.05, 0.3):
                assert_same(rpn_ops.score_candidates(logits, score_thresh), torchvision_steps(logits, score_thresh))
    finally:
        torch.set_num_threads(previous)


def test_thresholds_outside_zero_one_and_special_values(device):
    logits = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 103.0, -104.0, 2.0, -2.0],
                          device=device)
    for score_thresh in (-1.0, 0.0, 0.5, 1.0, 2.0, 0.11920292, float("inf"), -float("inf")):
        assert_same(rpn_ops.score_candidates(logits, score_thresh), _expected(device)(logits, score_thresh))


def test_the_threshold_is_compared_in_the_logits_dtype(device):
    """0.05 is not a float32: torch compares float32 scores with float32(0.05), and so does score_candidates."""
    boundary = torch.tensor(0.05, dtype=torch.float32)
    logit = torch.log(boundary / (1 - boundary))
    logits = (logit + torch.arange(-200, 201) * 1e-7).to(device)
    assert_same(rpn_ops.score_candidates(logits, 0.05), _expected(device)(logits, 0.05))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_take_torchvisions_steps(device, dtype):
    logits = detection_logits(5000, dtype=dtype, device=device)
    assert_same(rpn_ops.score_candidates(logits, 0.05), torchvision_steps(logits, 0.05))


def test_multi_dimensional_and_non_contiguous_logits_are_flattened_in_index_order():
    logits = detection_logits(6 * 40_000).reshape(40_000, 6)
    assert_same(rpn_ops.score_candidates(logits, 0.05), torchvision_steps(logits, 0.05))
    transposed = logits.t()  # torch's sigmoid keeps the input's layout; flatten then reads in index order
    got = rpn_ops.score_candidates(transposed, 0.05)
    scores = torch.sigmoid(transposed.contiguous()).flatten()
    keep = scores > 0.05
    assert_same(got, (scores[keep], torch.where(keep)[0]))


def test_gradients_are_torchvisions():
    logits = detection_logits(3000).double().requires_grad_()
    theirs = logits.detach().clone().requires_grad_()
    scores, _ = rpn_ops.score_candidates(logits, 0.05)
    expected, _ = torchvision_steps(theirs, 0.05)
    weights = torch.rand(scores.shape, dtype=scores.dtype)
    (scores * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.equal(logits.grad, theirs.grad)
    torch.autograd.gradcheck(lambda x: rpn_ops.score_candidates(x, 0.3)[0], (torch.randn(50, dtype=torch.double,
                                                                                      requires_grad=True),))


def test_opcheck_and_compile():
    logits = detection_logits(4000)
    torch.library.opcheck(torch.ops.rpn_ops.score_candidates.default, (logits, 0.05),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: rpn_ops.score_candidates(x, 0.05), dynamic=True)
    assert_same(compiled(logits), torchvision_steps(logits, 0.05))


def test_bad_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        rpn_ops.score_candidates(torch.zeros(4, dtype=torch.int64), 0.05)
    with pytest.raises(TypeError, match="logits must be a tensor"):
        rpn_ops.score_candidates([0.1, 0.2], 0.05)
    with pytest.raises(ValueError, match="score_thresh"):
        rpn_ops.score_candidates(torch.zeros(4), float("nan"))


def test_scripts():
    scripted = torch.jit.script(rpn_ops.score_candidates)
    logits = detection_logits(1000)
    assert_same(scripted(logits, 0.05), torchvision_steps(logits, 0.05))
