"""Anchor generation: a drop-in for torchvision's ``AnchorGenerator`` whose grid anchors come from one kernel
call for all levels and all images."""
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import _portable
from .ops import _flat, grid_anchors

if TYPE_CHECKING:
    from torchvision.models.detection.image_list import ImageList


def cell_anchors(
    sizes: List[float],
    aspect_ratios: List[float],
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


class LevelMismatchError(ValueError, AssertionError):
    """Feature maps and (sizes, aspect_ratios) entries that disagree in number. An AssertionError too, which is
    what torchvision's AnchorGenerator raises there, so code that catches that keeps working."""


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

    It scripts (``torch.jit.script``; the scripted module concatenates the cell anchors on each call instead of
    caching them) and traces: traced, or exported to ONNX, it computes the anchors with PyTorch operators from the
    traced feature-map sizes, as torchvision's does, so that the trace holds for other image sizes.
    """

    __annotations__ = {"cell_anchors": List[Tensor]}
    __jit_ignored_attributes__ = ["_tables"]

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
        self._tables: Dict[Tuple[torch.dtype, torch.device], Tuple[list, Tensor]] = {}

    def generate_anchors(
        self,
        scales: List[int],
        aspect_ratios: List[float],
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
        if not torch.jit.is_scripting():
            anchors = grid_anchors(self.cell_anchors, grid_sizes, strides)
            return list(anchors.split([int(g[0]) * int(g[1]) * len(c)
                                       for g, c in zip(grid_sizes, self.cell_anchors)]))
        integer_strides = [[int(s[0]), int(s[1])] for s in strides]
        anchors = grid_anchors(self.cell_anchors, grid_sizes, integer_strides)
        return list(anchors.split([g[0] * g[1] * c.shape[0] for g, c in zip(grid_sizes, self.cell_anchors)]))

    def forward(self, image_list: "ImageList", feature_maps: List[Tensor]) -> List[Tensor]:
        self._check_levels(len(feature_maps))
        grid_sizes = [list(feature_map.shape[-2:]) for feature_map in feature_maps]
        image_height, image_width = image_list.tensors.shape[-2], image_list.tensors.shape[-1]
        for level, grid in enumerate(grid_sizes):
            if grid[0] == 0 or grid[1] == 0:
                raise ValueError(f"feature map {level} has an empty grid {feature_maps[level].shape}; "
                                 "anchors need at least one row and one column")
        strides = [[image_height // grid[0], image_width // grid[1]] for grid in grid_sizes]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        self.set_cell_anchors(dtype, device)
        num_images = len(image_list.image_sizes)
        if not torch.jit.is_scripting() and (torch.jit.is_tracing() or _portable.exporting_to_onnx()):
            anchors = _portable.grid_anchors(self.cell_anchors, grid_sizes, strides)  # traced sizes are tensors
            return [anchors.clone() for _ in range(num_images)]
        anchors = torch.ops.rpn_ops.grid_anchors(self._cell_table(dtype, device), [c.shape[0] for c in self.cell_anchors],
                                                 _flat(grid_sizes), _flat(strides), num_images)
        return list(anchors.unbind(0))

    def _cell_table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """All levels' cell anchors in one [cells, 4] table, cached while ``cell_anchors`` is unchanged."""
        if torch.jit.is_scripting() or torch.compiler.is_compiling():
            return torch.cat(self.cell_anchors)
        key = (dtype, device)
        cached = self._tables.get(key)
        state = [(c, c._version) for c in self.cell_anchors]
        if cached is None or len(cached[0]) != len(state) or any(
            c is not old or version != old_version for (c, version), (old, old_version) in zip(state, cached[0])
        ):
            cached = (state, torch.cat(self.cell_anchors))
            self._tables[key] = cached
        return cached[1]

    def _check_levels(self, levels: int) -> None:
        if levels != len(self.cell_anchors):
            raise LevelMismatchError(
                f"AnchorGenerator has sizes and aspect ratios for {len(self.cell_anchors)} feature maps but got "
                f"{levels}; pass one (sizes, aspect_ratios) entry per feature map")

    def __prepare_scriptable__(self) -> "AnchorGenerator":
        """TorchScript resolves forward's "ImageList" annotation in this module: torchvision's ImageList, imported
        only now (importing rpn_ops does not import torchvision)."""
        global ImageList
        from torchvision.models.detection.image_list import ImageList  # noqa: F401
        return self
