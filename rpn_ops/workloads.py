"""Realistic RPN-like inputs, shared by the tests and the benchmarks.

Region proposals are not uniform noise: they come in clusters around objects (many anchors regress onto
the same object), with sizes spread over the FPN scales. NMS cost depends on exactly that structure.
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

IMAGE_SIZE = (800, 1216)  # (height, width) of a typical Faster R-CNN input batch

# torchvision's Faster R-CNN FPN anchors: one size per level, three aspect ratios, strides 4..64.
FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * len(FPN_SIZES)
FPN_STRIDES = (4, 8, 16, 32, 64)


class ImageBatch(NamedTuple):
    """What an AnchorGenerator reads of torchvision's ImageList: the padded batch and each image's size."""
    tensors: Tensor
    image_sizes: List[Tuple[int, int]]


def fpn_batch(
    num_images: int,
    image_size: Tuple[int, int] = IMAGE_SIZE,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    strides: Sequence[int] = FPN_STRIDES,
    channels: int = 1,
) -> Tuple[ImageBatch, List[Tensor]]:
    """A batch padded to ``image_size`` (images slightly smaller, as after batching) and one feature map per
    stride with a ResNet-FPN backbone's sizes (ceil division: an 800 x 1216 batch gives a 13 x 19 map of
    stride 64, whose integer-division strides are (61, 64))."""
    height, width = image_size
    images = ImageBatch(torch.zeros(num_images, 3, height, width, device=device),
                        [(height - 7 * i, width - 5 * i) for i in range(num_images)])
    features = [torch.zeros(num_images, channels, -(-height // s), -(-width // s), dtype=dtype, device=device)
                for s in strides]
    return images, features


def box_deltas(n: int, classes: int = 1, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float32,
               device="cpu") -> Tensor:
    """``[n, 4 * classes]`` regression deltas (dx, dy, dw, dh): normal with standard deviation ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4 * classes, generator=g) * scale).to(dtype=dtype, device=device)


def rpn_like_boxes(
    n: int,
    seed: int = 0,
    image_size: Tuple[int, int] = IMAGE_SIZE,
    per_cluster: int = 60,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> Tuple[Tensor, Tensor]:
    """``n`` boxes (x1, y1, x2, y2) clustered around ``n / per_cluster`` objects of sizes 8..256 px, with
    uniform scores in [0, 1). Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    clusters = max(1, n // per_cluster)
    height, width = image_size
    centers = torch.rand(clusters, 2, generator=g) * torch.tensor([width, height])
    sizes = torch.exp(torch.rand(clusters, 2, generator=g) * math.log(256 / 8) + math.log(8))
    which = torch.randint(0, clusters, (n,), generator=g)
    jitter = torch.randn(n, 4, generator=g) * 0.15
    cx = centers[which, 0] + jitter[:, 0] * sizes[which, 0]
    cy = centers[which, 1] + jitter[:, 1] * sizes[which, 1]
    w = sizes[which, 0] * torch.exp(jitter[:, 2])
    h = sizes[which, 1] * torch.exp(jitter[:, 3])
    boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    scores = torch.rand(n, generator=g)
    return boxes.to(dtype=dtype, device=device), scores.to(dtype=dtype, device=device)


def random_boxes(n: int, seed: int = 0, scale: float = 600.0, min_size: float = 1.0, dtype=torch.float32,
                 device="cpu") -> Tensor:
    """``n`` uniformly placed boxes with sides in [min_size, min_size + scale / 4)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * scale
    wh = torch.rand(n, 2, generator=g) * (scale / 4) + min_size
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def categories(n: int, num_classes: int, seed: int = 0, device="cpu") -> Tensor:
    """``n`` int64 category ids in [0, num_classes)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, (n,), generator=g).to(device)


def gt_boxes(n: int, seed: int = 0, image_size: Tuple[int, int] = IMAGE_SIZE, device="cpu") -> Tensor:
    """``n`` ground-truth-like boxes: object sizes 16..512 px, inside the image."""
    g = torch.Generator().manual_seed(seed)
    height, width = image_size
    size = torch.exp(torch.rand(n, 2, generator=g) * math.log(512 / 16) + math.log(16))
    size = torch.minimum(size, torch.tensor([width - 1.0, height - 1.0]))
    corner = torch.rand(n, 2, generator=g) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], 1).to(device)


def tied_scores(scores: Tensor, levels: int = 8) -> Tensor:
    """Scores quantised to ``levels`` values, so that many ties must be broken by index."""
    return (scores * levels).floor() / levels


def nan_to(scores: Tensor, fraction: float, seed: int = 0, value: Optional[float] = float("nan")) -> Tensor:
    """A copy of ``scores`` with about ``fraction`` of the entries replaced by ``value``."""
    g = torch.Generator().manual_seed(seed)
    out = scores.clone()
    out[torch.rand(scores.shape, generator=g) < fraction] = value
    return out
