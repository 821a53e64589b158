"""Anchor generation: a drop-in for torchvision's ``AnchorGenerator`` whose grid anchors come from one kernel
call for all levels and all images."""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .ops import grid_anchors


def cell_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> Tensor:
    """The zero-centred anchors of one position, ``[len(aspect_ratios) * len(sizes), 4]``, ratio-major, as
    torchvision's ``AnchorGenerator.generate_anchors`` (aspect ratio = height / width; rounded half to even)."""
    scales = torch.as_tensor(sizes, dtype=dtype, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a set of feature maps, as ``torchvision.models.detection.anchor_utils.AnchorGenerator``:
    same constructor, attributes (``sizes``, ``aspect_ratios``, ``cell_anchors``) and methods, the same anchors
    to the bit, in the same order, dtype and device.

    ``forward(image_list, feature_maps)`` returns one ``[sum_l h_l * w_l * A_l, 4]`` tensor per image. Level l's
    stride is the padded batch size integer-divided by its grid size, e.g. (61, 64) for a 13 x 19 map of an
    800 x 1216 batch. All images' anchors are written by one kernel call into one buffer, one independent
    tensor per image. The concatenated cell-anchor table is cached per dtype and device, and recomputed when
    ``cell_anchors`` is replaced or modified in place.

    Like torchvision, ``forward`` converts ``cell_anchors`` to the feature maps' dtype and device and keeps the
    converted tensors (``set_cell_anchors``), so a float16 call followed by a float32 one gives the same anchors
    as torchvision's module would.
    """

    __annotations__ = {"cell_anchors": List[Tensor]}

    def __init__(
        self,
        sizes: Sequence = ((128, 256, 512),),
        aspect_ratios: Sequence = ((0.5, 1.0, 2.0),),
    ):
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes and aspect_ratios need one entry per feature map, got {len(sizes)} sizes "
                             f"and {len(aspect_ratios)} aspect ratios")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [self.generate_anchors(size, ratio) for size, ratio in zip(sizes, aspect_ratios)]
        self._tables: Dict[Tuple[torch.dtype, torch.device], Tuple[List[Tensor], List[int], Tensor]] = {}

    def generate_anchors(
        self,
        scales: Sequence[float],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        return cell_anchors(scales, aspect_ratios, dtype, device)

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        self.cell_anchors = [cell_anchor.to(dtype=dtype, device=device) for cell_anchor in self.cell_anchors]

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: List[List[int]], strides: List[List[Tensor]]) -> List[Tensor]:
        """Per level, the ``[h * w * A, 4]`` anchors (views of one buffer), as torchvision's method."""
        self._check_levels(len(grid_sizes))
        anchors = grid_anchors(self.cell_anchors, grid_sizes, strides)
        return list(anchors.split([int(g[0]) * int(g[1]) * len(c) for g, c in zip(grid_sizes, self.cell_anchors)]))

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        self._check_levels(len(feature_maps))
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        image_height, image_width = image_list.tensors.shape[-2:]
        for level, (height, width) in enumerate(grid_sizes):
            if height == 0 or width == 0:
                raise ValueError(f"feature map {level} has an empty grid {tuple(feature_maps[level].shape)}; "
                                 "anchors need at least one row and one column")
        strides = [(image_height // height, image_width // width) for height, width in grid_sizes]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        table, cells_per_level = self._cell_table(dtype, device)
        num_images = len(image_list.image_sizes)
        anchors = torch.ops.rpn_ops.grid_anchors.default(
            table, cells_per_level, [s for g in grid_sizes for s in g], [s for pair in strides for s in pair],
            num_images)
        return list(anchors.unbind(0))

    def _cell_table(self, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, List[int]]:
        """All levels' cell anchors in one [cells, 4] table, cached while ``cell_anchors`` is unchanged."""
        cells_per_level = [len(c) for c in self.cell_anchors]
        if torch.compiler.is_compiling():
            return torch.cat(self.cell_anchors), cells_per_level
        key = (dtype, device)
        cached = self._tables.get(key)
        state = [(c, c._version) for c in self.cell_anchors]
        if cached is None or len(cached[0]) != len(state) or any(
            c is not old or version != old_version for (c, version), (old, old_version) in zip(state, cached[0])
        ):
            cached = (state, torch.cat(self.cell_anchors))
            self._tables[key] = cached
        return cached[1], cells_per_level

    def _check_levels(self, levels: int) -> None:
        if levels != len(self.cell_anchors):
            raise ValueError(f"AnchorGenerator has sizes and aspect ratios for {len(self.cell_anchors)} feature "
                             f"maps but got {levels}; pass one (sizes, aspect_ratios) entry per feature map")
