"""Input generators and comparisons shared by the tests (on top of rpn_ops.workloads, which the benchmarks
share too). Everything here is deterministic for a seed."""
import functools
import math
from typing import Dict, Tuple

import pytest
import torch
import torchvision
from torch import Tensor

from rpn_ops import workloads

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Tests the `device` fixture does not run on the emulated CUDA device (conftest.py):
compiles = pytest.mark.not_emulated("torch.compile refuses to trace under the dispatch mode that routes the "
                                    "operators to the emulator; the compiled graph calls the operators eager runs")
too_large_to_emulate = pytest.mark.not_emulated("inputs too large for the emulator, whose small sizing constants "
                                                "send small inputs down the same paths")



def emulated() -> bool:
    """Whether the test runs on the emulated CUDA device (the `device` fixture's "emulated")."""
    import emulator

    return emulator.active()


def cpu_kernels():
    """A context in which the rpn_ops operators run their CPU kernels, also on the emulated CUDA device: for a
    test of the CUDA kernels to compute the CPU kernels' answer."""
    import emulator

    return emulator.suspended()


def in_worker_threads(fn):
    """`fn` for a thread pool: the emulated CUDA device belongs to the thread that entered it, so on it each
    worker enters it too."""
    if not emulated():
        return fn
    import emulator

    def on_the_emulated_device(*args):
        with emulator.EmulatedCuda():
            return fn(*args)

    return on_the_emulated_device


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type rpn_ops computes in: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# Ground truth: torchvision on the CPU, on inputs cast to the compute type.
# ---------------------------------------------------------------------------------------------------------

def tv_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision.ops.nms on the CPU (its IoU-vs-threshold comparison is in double, as ours)."""
    dtype = compute_dtype(boxes.dtype)
    return torchvision.ops.nms(boxes.cpu().to(dtype), scores.cpu().to(dtype), iou_threshold)


def tv_batched_nms_per_class(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's per-class NMS (its `_batched_nms_vanilla` path: no coordinate-offset trick), with the
    result ordered by descending score, ties by index (torchvision's own final sort is not stable)."""
    dtype = compute_dtype(boxes.dtype)
    boxes, scores, idxs = boxes.cpu().to(dtype), scores.cpu().to(dtype), idxs.cpu()
    keep = torch.zeros(len(boxes), dtype=torch.bool)
    for category in torch.unique(idxs):
        members = torch.where(idxs == category)[0]
        keep[members[torchvision.ops.nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = torch.where(keep)[0]
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


@functools.lru_cache(maxsize=None)
def tv_nms_rpn_like(n: int, iou_threshold: float, seed: int = 0) -> Tensor:
    """torchvision's answer on workloads.rpn_like_boxes(n, seed), cached: the CPU and CUDA tests share it."""
    boxes, scores = workloads.rpn_like_boxes(n, seed=seed)
    return torchvision.ops.nms(boxes, scores, iou_threshold)


def stable_descending(scores: Tensor) -> Tensor:
    """Indices by descending score, ties by ascending index, NaN first: the order NMS visits boxes in."""
    return torch.sort(scores.cpu(), descending=True, stable=True).indices


# ---------------------------------------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------------------------------------

def assert_indices(got: Tensor, expected: Tensor, device) -> None:
    """`got` is an int64 index tensor on `device` equal to `expected`, element for element."""
    assert isinstance(got, Tensor)
    assert got.dtype == torch.int64, got.dtype
    assert got.device.type == torch.device(device).type, (got.device, device)
    assert got.dim() == 1, got.shape
    got, expected = got.cpu(), expected.cpu().to(torch.int64)
    if not torch.equal(got, expected):
        first = next((i for i in range(min(len(got), len(expected))) if got[i] != expected[i]),
                     min(len(got), len(expected)))
        raise AssertionError(
            f"indices differ: got {len(got)} kept, expected {len(expected)}; first difference at position "
            f"{first}: got {got[first:first + 5].tolist()}, expected {expected[first:first + 5].tolist()}")


def assert_same_iou(got: Tensor, expected: Tensor) -> None:
    """Bit-exact equality of IoU matrices (NaN where expected has NaN; -0.0 == 0.0)."""
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    got, expected = got.cpu(), expected.cpu()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan), f"NaN at {torch.nonzero(torch.isnan(got) != nan)[:5].tolist()}"
    differ = (got != expected) & ~nan
    assert not differ.any(), (
        f"{int(differ.sum())} of {differ.numel()} IoU values differ, e.g. at {torch.nonzero(differ)[0].tolist()}: "
        f"got {got[differ][:3].tolist()}, expected {expected[differ][:3].tolist()}")


# ---------------------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------------------

def non_contiguous(t: Tensor) -> Tensor:
    """The same values as `t` in a column-major [N, 4] view (or a strided [N] view)."""
    if t.dim() == 2:
        out = t.t().contiguous().t()
    else:
        out = torch.stack([t, t], 1)[:, 1]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _special(boxes: Tensor, g: torch.Generator, kind: str) -> Tensor:
    b = boxes.clone()
    n = len(b)
    if kind == "zero_width":
        b[:, 2] = b[:, 0]
    elif kind == "zero_height":
        b[:, 3] = b[:, 1]
    elif kind == "points":
        b[:, 2:] = b[:, :2]
    elif kind == "inverted_x":
        b = b[:, [2, 1, 0, 3]]
    elif kind == "inverted_both":
        b = b[:, [2, 3, 0, 1]]
    elif kind == "negative_coordinates":
        b = b - 2000.0
    elif kind == "huge":
        b = b * 1e27  # up to ~1e30: areas overflow float32 to inf
    elif kind == "tiny":
        b = b * 1e-22  # areas ~1e-42..1e-39: float32 subnormals, which must not be flushed to zero
    elif kind == "nan":
        b[torch.arange(n), torch.randint(0, 4, (n,), generator=g)] = float("nan")
    elif kind == "inf":
        b[:, 2] = float("inf")
    elif kind == "neg_inf":
        b[:, 0] = float("-inf")
    elif kind == "infinite_box":
        b[:] = torch.tensor([float("-inf"), float("-inf"), float("inf"), float("inf")])
    else:
        raise ValueError(kind)
    return b


SPECIAL_KINDS = ["zero_width", "zero_height", "points", "inverted_x", "inverted_both", "negative_coordinates",
                 "huge", "tiny", "nan", "inf", "neg_inf", "infinite_box", "all_mixed"]


def special_boxes(kind: str, n: int = 400, fraction: float = 0.25, seed: int = 0,
                  dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """Clustered RPN-like boxes of which about `fraction` are replaced by the special `kind` (or a mix of all
    kinds, "all_mixed"), so that special boxes meet ordinary ones, and one another, in both score orders."""
    boxes, scores = workloads.rpn_like_boxes(n, seed=seed, per_cluster=20, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    chosen = torch.rand(n, generator=g) < fraction
    kinds = SPECIAL_KINDS[:-1] if kind == "all_mixed" else [kind]
    which = torch.randint(0, len(kinds), (n,), generator=g)
    for k, name in enumerate(kinds):
        rows = chosen & (which == k)
        boxes[rows] = _special(boxes[rows], g, name)
    # A few exact copies, so specials also meet themselves.
    copies = torch.randint(0, n, (n // 20,), generator=g)
    boxes = torch.cat([boxes, boxes[copies]])
    scores = torch.cat([scores, torch.rand(len(copies), generator=g, dtype=torch.float64)])
    assert chosen.sum() > 0
    return boxes.to(dtype), scores.to(dtype)


def pair_with_float32_iou(target: float) -> Tensor:
    """Two float32 boxes, [0, 0, 1, h] and [0, 0, w, 1] (inside it), whose IoU computed in float32 in
    torchvision's operation order is exactly the float32 number `target`; found by searching h just above 1
    and w around `target`."""
    target_f = torch.tensor(target, dtype=torch.float32)
    as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
    one_bits, target_bits = torch.tensor(1.0).view(torch.int32).item(), target_f.view(torch.int32).item()
    h = as_float(torch.arange(one_bits, one_bits + 64))
    w = as_float(torch.arange(target_bits - 256, target_bits + 256))
    outer = torch.stack([torch.zeros_like(h), torch.zeros_like(h), torch.ones_like(h), h], 1)
    inner = torch.stack([torch.zeros_like(w), torch.zeros_like(w), w, torch.ones_like(w)], 1)
    hits = torch.nonzero(torchvision.ops.box_iou(outer, inner) == target_f)
    assert len(hits) > 0, f"no box pair with float32 IoU {target!r}"
    pair = torch.stack([outer[hits[0, 0]], inner[hits[0, 1]]])
    assert torchvision.ops.box_iou(pair, pair)[0, 1].item() == target
    return pair


def float32_neighbours(value: float) -> Dict[str, float]:
    """float32(value) and the float32 numbers just below and above it."""
    f = torch.tensor(value, dtype=torch.float32)
    return {"below": torch.nextafter(f, torch.tensor(-math.inf)).item(), "nearest": f.item(),
            "above": torch.nextafter(f, torch.tensor(math.inf)).item()}


def exact_half_iou_pair(dtype=torch.float32, device="cpu") -> Tensor:
    """[0, 0, 4, 1] and [0, 0, 2, 1]: intersection 2, union 4, IoU exactly 0.5 in every float type."""
    return torch.tensor([[0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 1.0]], dtype=dtype, device=device)

