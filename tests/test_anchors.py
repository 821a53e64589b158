"""rpn_ops.AnchorGenerator and rpn_ops.grid_anchors: torchvision's AnchorGenerator, anchor for anchor and bit
for bit, in the same order, dtype and device, from one kernel call."""
import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import rpn_ops
from helpers import FLOAT_DTYPES, cpu_kernels
from rpn_ops import reference, workloads

from rpn_ops.workloads import FPN_ASPECT_RATIOS as FPN_RATIOS
from rpn_ops.workloads import FPN_SIZES, FPN_STRIDES


def ceil_div(a, b):
    return -(-a // b)


def fpn_batch(height, width, num_images=2, dtype=torch.float32, device="cpu", strides=FPN_STRIDES):
    """A torchvision ImageList padded to (height, width), and one feature map per stride (workloads.fpn_batch)."""
    images, features = workloads.fpn_batch(num_images, (height, width), dtype, device, strides, channels=2)
    return ImageList(images.tensors, images.image_sizes), features


def assert_same_anchors(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.device == e.device and g.shape == e.shape, (g.dtype, g.shape, e.shape)
        assert torch.equal(g.cpu(), e.cpu()), (g != e).nonzero()[:5]


@pytest.mark.parametrize("height, width", [(800, 1216), (800, 1088), (797, 1201), (320, 320), (64, 64), (33, 1000)])
def test_fpn_defaults_match_torchvision(device, height, width):
    images, features = fpn_batch(height, width, device=device)
    expected = TorchvisionAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features)
    assert_same_anchors(rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features), expected)


def test_non_divisible_batch_uses_integer_division_strides():
    images, features = fpn_batch(800, 1216, num_images=1)
    anchors = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features)[0]
    last_level = anchors[-13 * 19 * 3:]  # the 13 x 19 map of stride 64 has strides (800 // 13, 1216 // 19)
    assert (800 // 13, 1216 // 19) == (61, 64)
    centre_of_last_cell = (last_level[-1, :2] + last_level[-1, 2:]) / 2
    assert centre_of_last_cell.tolist() == [18 * 64, 12 * 61]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_every_dtype_matches_torchvision(device, dtype):
    images, features = fpn_batch(800, 1216, dtype=dtype, device=device)
    expected = TorchvisionAnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features)
    assert_same_anchors(rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_classic_single_level_matches_torchvision(device, dtype):
    """Faster R-CNN C4: stride 16, sizes 128/256/512, ratios 0.5/1/2 (also torchvision's defaults)."""
    images, features = fpn_batch(600, 1000, num_images=3, dtype=dtype, device=device, strides=(16,))
    expected = TorchvisionAnchorGenerator()(images, features)
    assert_same_anchors(rpn_ops.AnchorGenerator()(images, features), expected)
    classic = rpn_ops.AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),))
    assert_same_anchors(classic(images, features), expected)


def test_flat_sizes_mean_one_size_per_level_like_torchvision():
    ours, theirs = rpn_ops.AnchorGenerator((32, 64), (0.5, 1.0)), TorchvisionAnchorGenerator((32, 64), (0.5, 1.0))
    assert ours.sizes == theirs.sizes == ((32,), (64,)) and ours.aspect_ratios == theirs.aspect_ratios
    images, features = fpn_batch(300, 200, strides=(8, 16))
    assert_same_anchors(ours(images, features), theirs(images, features))


def test_many_sizes_and_ratios_per_level_match_torchvision(device):
    sizes = ((16, 24, 40), (50, 70, 90, 110), (300,))
    ratios = ((0.25, 0.5, 1.0, 2.0, 4.0), (1.0,), (0.3, 3.3))
    images, features = fpn_batch(517, 733, num_images=1, device=device, strides=(8, 16, 32))
    expected = TorchvisionAnchorGenerator(sizes, ratios)(images, features)
    assert_same_anchors(rpn_ops.AnchorGenerator(sizes, ratios)(images, features), expected)


def test_feature_maps_larger_than_the_image_give_stride_zero_like_torchvision(device):
    images = ImageList(torch.zeros(1, 3, 20, 30, device=device), [(20, 30)])
    features = [torch.zeros(1, 1, 25, 40, device=device), torch.zeros(1, 1, 5, 7, device=device)]
    generator_args = (((10,), (20,)), ((1.0, 2.0),) * 2)
    expected = TorchvisionAnchorGenerator(*generator_args)(images, features)
    assert_same_anchors(rpn_ops.AnchorGenerator(*generator_args)(images, features), expected)


def test_attributes_and_methods_match_torchvision():
    ours, theirs = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS), TorchvisionAnchorGenerator(FPN_SIZES, FPN_RATIOS)
    assert ours.sizes == theirs.sizes and ours.aspect_ratios == theirs.aspect_ratios
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    assert_same_anchors(ours.cell_anchors, theirs.cell_anchors)
    assert torch.equal(ours.generate_anchors((7, 77), (0.7, 1.3), torch.float64),
                       theirs.generate_anchors((7, 77), (0.7, 1.3), torch.float64))
    grid_sizes = [[50, 76], [25, 38], [13, 19], [7, 10], [4, 5]]
    strides = [[torch.tensor(s), torch.tensor(s)] for s in FPN_STRIDES]
    assert_same_anchors(ours.grid_anchors(grid_sizes, strides), theirs.grid_anchors(grid_sizes, strides))
    assert isinstance(ours, torch.nn.Module) and ours.state_dict().keys() == theirs.state_dict().keys()


def test_each_image_gets_its_own_tensor():
    images, features = fpn_batch(256, 256, num_images=3)
    anchors = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features)
    assert len(anchors) == 3 and all(a.is_contiguous() for a in anchors)
    before = anchors[1].clone()
    anchors[0].add_(1000)
    assert torch.equal(anchors[1], before) and torch.equal(anchors[2], before)


def test_a_dtype_sequence_gives_what_torchvision_gives():
    """torchvision keeps the cell anchors it converted: a bfloat16 call rounds them for later calls. Ours keeps
    the same state, so a mixed sequence of calls still matches."""
    ours, theirs = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS), TorchvisionAnchorGenerator(FPN_SIZES, FPN_RATIOS)
    for dtype in (torch.float32, torch.bfloat16, torch.float32, torch.float16, torch.float64):
        images, features = fpn_batch(800, 1216, num_images=1, dtype=dtype)
        assert_same_anchors(ours(images, features), theirs(images, features))


def test_changed_cell_anchors_are_never_served_from_the_cache():
    generator = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    images, features = fpn_batch(128, 128, num_images=1)
    first = generator(images, features)[0]
    generator.cell_anchors[0].mul_(2)  # in place
    doubled = generator(images, features)[0]
    assert not torch.equal(first, doubled)
    generator.cell_anchors = [c + 1 for c in generator.cell_anchors]  # replaced
    shifted = generator(images, features)[0]
    expected = reference.grid_anchors(generator.cell_anchors, [f.shape[-2:] for f in features],
                                      [(128 // f.shape[-2], 128 // f.shape[-1]) for f in features])
    assert torch.equal(shifted, expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_functional_form_matches_the_reference(device, dtype):
    cells = [rpn_ops.cell_anchors(s, r, dtype, device) for s, r in zip(FPN_SIZES, FPN_RATIOS)]
    grid_sizes = [(ceil_div(416, s), ceil_div(640, s)) for s in FPN_STRIDES]
    strides = [(416 // h, 640 // w) for h, w in grid_sizes]
    expected = reference.grid_anchors(cells, grid_sizes, strides)
    got = rpn_ops.grid_anchors(cells, grid_sizes, strides)
    assert got.dtype == dtype and got.device.type == device
    assert torch.equal(got, expected)
    stacked = rpn_ops.grid_anchors(cells, grid_sizes, strides, num_images=3)
    assert stacked.shape == (3, *expected.shape) and all(torch.equal(s, expected) for s in stacked)


def test_cell_anchors_match_torchvision_generate_anchors():
    theirs = TorchvisionAnchorGenerator()
    for sizes, ratios in [((32,), (0.5, 1.0, 2.0)), ((128, 256, 512), (0.5, 1.0, 2.0)), ((45, 91), (0.37, 2.9))]:
        assert torch.equal(rpn_ops.cell_anchors(sizes, ratios), theirs.generate_anchors(sizes, ratios))


def test_empty_batch_and_empty_levels(device):
    images, features = fpn_batch(64, 64, num_images=0, device=device)
    assert rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features) == []
    cells = [rpn_ops.cell_anchors((8,), (1.0,), device=device)[:0], rpn_ops.cell_anchors((8,), (1.0,), device=device)]
    got = rpn_ops.grid_anchors(cells, [(3, 3), (2, 2)], [(8, 8), (16, 16)])
    assert torch.equal(got, reference.grid_anchors(cells, [(3, 3), (2, 2)], [(8, 8), (16, 16)]))


def test_bad_input_is_rejected_with_a_clear_message():
    generator = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)
    images, features = fpn_batch(64, 64, num_images=1)
    with pytest.raises(ValueError, match="for 5 feature maps but got 4"):
        generator(images, features[:4])
    with pytest.raises(ValueError, match="empty grid"):
        generator(images, [torch.zeros(1, 1, 0, 4)] + features[1:])
    with pytest.raises(ValueError, match="for 5 feature maps but got 6"):
        generator(images, features + features[:1])
    with pytest.raises(ValueError, match="one entry per feature map"):
        rpn_ops.AnchorGenerator(((32,), (64,)), ((1.0,),) * 3)
    cells = [rpn_ops.cell_anchors((8,), (1.0,))]
    with pytest.raises(ValueError, match="one grid size and one stride per level"):
        rpn_ops.grid_anchors(cells, [(2, 2), (1, 1)], [(4, 4)])
    with pytest.raises(ValueError, match=r"grid size of level 0 must be >= 0"):
        rpn_ops.grid_anchors(cells, [(-2, 2)], [(4, 4)])
    with pytest.raises(ValueError, match=r"strides of level 0 must be >= 0"):
        rpn_ops.grid_anchors(cells, [(2, 2)], [(4, -4)])
    with pytest.raises(TypeError, match="must be an int"):
        rpn_ops.grid_anchors(cells, [(2.5, 2)], [(4, 4)])
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        rpn_ops.grid_anchors([cells[0].int()], [(2, 2)], [(4, 4)])
    with pytest.raises(RuntimeError, match=r"shape \[cells, 4\]"):
        rpn_ops.grid_anchors([cells[0][:, :3]], [(2, 2)], [(4, 4)])
    with pytest.raises(ValueError, match="cells_per_level sums to 2 but cell_anchors has 1 rows"):
        torch.ops.rpn_ops.grid_anchors(cells[0], [2], [2, 2], [4, 4])
    with pytest.raises(ValueError, match="anchors of all levels pass"):
        rpn_ops.grid_anchors(cells, [(1 << 16, 1 << 16)], [(4, 4)])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_kernel_matches_cpu(gpu, dtype):
    images, features = fpn_batch(797, 1201, num_images=4, dtype=dtype)
    with cpu_kernels():
        cpu = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images, features)
    images_gpu = ImageList(images.tensors.to(gpu), images.image_sizes)
    got = rpn_ops.AnchorGenerator(FPN_SIZES, FPN_RATIOS)(images_gpu, [f.to(gpu) for f in features])
    assert all(g.device.type == torch.device(gpu).type for g in got)
    assert_same_anchors([g.cpu() for g in got], cpu)


def test_gradients_reach_the_cell_anchors_as_in_torchvision(device):
    """Each cell anchor is shifted to every position of its level: its gradient sums theirs, as torchvision's."""
    grid_sizes, strides = [[5, 7], [3, 4]], [[8, 8], [16, 12]]
    gradients = []
    for anchors_of in (lambda cells: rpn_ops.grid_anchors(cells, grid_sizes, strides),
                       lambda cells: torch.cat(_torchvision_grid_anchors(cells, grid_sizes, strides))):
        cells = [rpn_ops.cell_anchors((32,), (0.5, 1.0, 2.0)).to(device).requires_grad_(),
                 rpn_ops.cell_anchors((64,), (1.0,)).to(device).requires_grad_()]
        anchors = anchors_of(cells)
        gradients.append(torch.autograd.grad(anchors, cells, torch.linspace(-1, 1, anchors.numel(),
                                                                           device=device).view_as(anchors)))
    for got, expected in zip(*gradients):
        assert torch.equal(got, expected)


def _torchvision_grid_anchors(cells, grid_sizes, strides):
    generator = TorchvisionAnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0), (1.0,)))
    generator.cell_anchors = cells
    return generator.grid_anchors(grid_sizes, [[torch.tensor(s) for s in pair] for pair in strides])


def test_levels_that_disagree_raise_an_assertion_error_as_in_torchvision():
    """torchvision asserts; code that catches AssertionError keeps working, and the message says what to fix."""
    generator = rpn_ops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    images, features = fpn_batch(64, 64, strides=(8,))
    with pytest.raises(AssertionError, match="sizes and aspect ratios for 2 feature maps but got 1"):
        generator(images, features)
    with pytest.raises(ValueError):
        generator(images, features)
