"""The emulated CUDA device of the tests: csrc/cuda/ compiled for the CPU against csrc/emulator/ (the CUDA
execution model on fibers), loaded as torch.ops.rpn_ops_emulated next to rpn_ops.

`EmulatedCuda()` is a dispatch mode that sends every call of a `torch.ops.rpn_ops` operator on CPU tensors to
its emulated CUDA kernel instead, run once per emulator setting in RUNS (thread orders and sizing presets), and
checks each run against the CPU kernel on the same inputs: the same outputs to the bit (or the same error),
with the differences the README documents (decode divides by a weight by multiplying by its reciprocal, as
PyTorch's CUDA kernels do; score_candidates computes each sigmoid alone, as torch.sigmoid's CUDA kernel does;
dense_focal_loss adds its float64 terms in another order, so its sums agree within that reordering's bound).
PyTorch's own division by a number follows CUDA's rule there too, and its sigmoid and sqrt inside scores_as_on_cuda(). The
tests' `device` fixture uses it for its third device, "emulated".

The module is built on first use into build/emulated/ (ninja rebuilds only what changed). With
RPN_OPS_EMULATOR_ASAN=1 it is the AddressSanitizer build, in build/emulated-asan/, whose runtime must be preloaded
(test_emulator.py runs the emulated tests that way, in a subprocess).
"""
import contextlib
import functools
import glob
import math
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import numpy
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode_temporarily
from torch.utils._pytree import tree_flatten

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO_ROOT, "csrc")
NAMESPACE = "rpn_ops_emulated"
ASAN = os.environ.get("RPN_OPS_EMULATOR_ASAN") == "1"

# Every sizing constant at its smallest useful value: small inputs take the large-input paths (NMS mask in
# chunks of 64 rows with `removed` in global memory, grid-stride loops, tiles of 8 ground-truth boxes, ...).
SMALL_SIZINGS = {
    "launch.cuh:kMaxBlocks": 2,
    "box_iou.cu:kMaxTileBlocks": 3,
    "box_coding.cu:kLevelsPerLaunch": 2,
    "nms.cu:kMaskBudgetBytes": 8,
    "nms.cu:kMaxSharedRemovedWords": 1,
    "matching.cu:kTileBoxes": 8,
    "matching.cu:kMaxImagesPerGrid": 2,
    "proposals.cu:kImagesPerLaunch": 2,
    "proposals.cu:kSegmentsPerLaunch": 3,
    "detections.cu:kImagesPerLaunch": 2,
    "detections.cu:kImagesPerMaskLaunch": 2,
    "focal_loss.cu:kMaxBlocksPerImage": 2,
    "focal_loss.cu:kMaxImagesPerGrid": 2,
}


@dataclass(frozen=True)
class Run:
    """One emulator setting an emulated call runs under."""

    order: str  # "forward", "reverse" or "random"
    seed: int = 0
    small_sizings: bool = False

    def __str__(self) -> str:
        order = f"random({self.seed})" if self.order == "random" else self.order
        return f"{order} order, {'small' if self.small_sizings else 'default'} sizings"


# Every emulated call runs twice: threads (and blocks) in forward order with the default sizes, then in reverse
# order with the small sizes. RPN_OPS_EMULATOR_SEEDS="1,2" adds random orders (small sizes) with those seeds.
RUNS = (Run("forward"), Run("reverse", small_sizings=True)) + tuple(
    Run("random", int(seed), small_sizings=True)
    for seed in os.environ.get("RPN_OPS_EMULATOR_SEEDS", "").split(",") if seed.strip())


def sources() -> list:
    """The emulated module's C++ sources: the schema and check files, the emulator, and a .cpp per .cu file
    (written into the build folder) that includes it."""
    wrappers = []
    for cu in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))):
        wrapper = os.path.join(build_directory(), "cuda_" + os.path.basename(cu)[:-3] + ".cpp")
        text = f'// The CUDA kernels of {os.path.basename(cu)}, compiled for the CUDA emulator.\n#include "{cu}"\n'
        if not os.path.exists(wrapper) or _read(wrapper) != text:
            with open(wrapper, "w") as f:
                f.write(text)
        wrappers.append(wrapper)
    schemas = [f for f in sorted(glob.glob(os.path.join(CSRC, "*.cpp"))) if os.path.basename(f) != "module.cpp"]
    emulator = sorted(glob.glob(os.path.join(CSRC, "emulator", "*.cpp")))
    return schemas + emulator + wrappers


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def build_directory() -> str:
    folder = os.path.join(REPO_ROOT, "build", "emulated-asan" if ASAN else "emulated")
    os.makedirs(folder, exist_ok=True)
    return folder


def compile_flags() -> list:
    flags = ["-std=c++20", "-ffp-contract=off", "-fvisibility=hidden", "-DRPN_OPS_EMULATED_CUDA",
             f"-DRPN_OPS_NAMESPACE={NAMESPACE}"]
    # Debug information is most of the build's time: ASan's reports need line tables only (-g1), the rest none.
    if ASAN:
        return flags + ["-O1", "-g1", "-fno-omit-frame-pointer", "-fsanitize=address"]
    return flags + ["-O2", "-g0"]


@functools.lru_cache(maxsize=None)
def module():
    """The emulated module (its import registers torch.ops.rpn_ops_emulated)."""
    from torch.utils.cpp_extension import load

    return load(name="rpn_ops_emulated_asan" if ASAN else "rpn_ops_emulated", sources=sources(),
                extra_cflags=compile_flags(), extra_ldflags=["-fsanitize=address"] if ASAN else [],
                extra_include_paths=[CSRC], build_directory=build_directory(),
                verbose=os.environ.get("RPN_OPS_EMULATOR_VERBOSE") == "1")


@contextlib.contextmanager
def settings(run: Run) -> Iterator[None]:
    """The emulator set to `run` for the duration."""
    m = module()
    previous_order = m.thread_order()
    m.set_thread_order(run.order, run.seed)
    if run.small_sizings:
        for name, value in SMALL_SIZINGS.items():
            m.set_sizing(name, value)
    try:
        yield
    finally:
        m.reset_sizings()
        m.set_thread_order(previous_order, 0)


# ---------------------------------------------------------------------------------------------------------
# Redirection and comparison


def _emulated_overload(func):
    """The emulated twin of an rpn_ops operator that has a CUDA kernel, else None."""
    if func.namespace != "rpn_ops" or not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CUDA"):
        return None
    module()
    name = func._schema.name.split("::")[1]
    assert hasattr(getattr(torch.ops, NAMESPACE), name), f"the emulated module has no kernel for {func.name()}"
    return getattr(getattr(getattr(torch.ops, NAMESPACE), name), func._overloadname)


def _same_bits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal dtypes, shapes and bits; a NaN equals any NaN (its sign and payload are not specified)."""
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return False
    if got.is_floating_point():
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        nan = got.isnan()
        same = (got.contiguous().view(bits) == expected.contiguous().view(bits)) | (nan & expected.isnan())
        return bool(same.all())
    return torch.equal(got, expected)


def assert_same_outputs(got, expected, what: str) -> None:
    """The emulated outputs equal the CPU kernel's to the bit: dtypes, shapes and values, in the same structure."""
    got_leaves, got_spec = tree_flatten(got)
    expected_leaves, expected_spec = tree_flatten(expected)
    assert got_spec == expected_spec, f"{what}: output structure {got_spec} != the CPU kernel's {expected_spec}"
    for i, (g, e) in enumerate(zip(got_leaves, expected_leaves)):
        if isinstance(e, torch.Tensor):
            assert isinstance(g, torch.Tensor) and g.device.type == "cpu", f"{what}: output {i} is {g!r}"
            if not _same_bits(g, e):
                raise AssertionError(f"{what}: output {i} differs from the CPU kernel's: {_difference(g, e)}")
        else:
            assert g == e, f"{what}: output {i} is {g!r}, the CPU kernel's {e!r}"


def assert_same_sums(got: torch.Tensor, expected: torch.Tensor, terms: int, what: str) -> None:
    """Sums of `terms` non-negative float64 terms each (dense_focal_loss), added in another order than the CPU
    kernel's: within the reordering's bound, terms x 2^-52 of the sum, plus one rounding to the output's dtype.
    NaN and infinities equal exactly."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, f"{what}: {_difference(got, expected)}"
    g, e = got.double(), expected.double()
    finite = e.isfinite()
    bound = (terms * 2.0 ** -52 + torch.finfo(got.dtype).eps) * e.abs()
    close = torch.where(finite, (g - e).abs() <= bound, _same_values(g, e))
    if not bool(close.all()):
        raise AssertionError(f"{what}: sums differ from the CPU kernel's by more than their reordering allows: "
                             f"{got.tolist()} against {expected.tolist()}")


def _same_values(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return (got == expected) | (got.isnan() & expected.isnan())


def _difference(got: torch.Tensor, expected: torch.Tensor) -> str:
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return f"{got.dtype} {tuple(got.shape)} against {expected.dtype} {tuple(expected.shape)}"
    differ = got != expected
    if got.is_floating_point():
        both_nan = got.isnan() & expected.isnan()
        differ = (differ & ~both_nan) | ((got.signbit() != expected.signbit()) & ~both_nan)
    where = torch.nonzero(differ)
    first = tuple(where[0].tolist()) if len(where) else ()
    return (f"{len(where)} of {got.numel()} values, first at {list(first)}: "
            f"{got[first].tolist() if first else ''} against {expected[first].tolist() if first else ''}")


def cuda_divided_codes(rel_codes: torch.Tensor, weights) -> torch.Tensor:
    """`rel_codes` (4 per box and class) divided by the weights as PyTorch's CUDA kernel divides by a Python
    scalar: multiplied by float(1 / weight), computed in opmath, rounded to the codes' dtype."""
    opmath = torch.float64 if rel_codes.dtype == torch.float64 else torch.float32
    reciprocals = torch.tensor(list(weights), dtype=opmath).reciprocal()
    codes = rel_codes.unflatten(-1, (-1, 4)).to(opmath) * reciprocals
    return codes.to(rel_codes.dtype).flatten(-2)


def _powers_of_two(weights) -> bool:
    return all(w > 0 and math.frexp(w)[0] == 0.5 for w in weights)


def one_by_one_sigmoid_candidates(logits, score_thresh):
    """score_candidates as its CUDA kernel computes it: each score alone, as torch.sigmoid's CUDA kernel does,
    which on the CPU is torch.sigmoid's scalar path (taken for a non-contiguous input). The CPU kernel gives
    torch.sigmoid's CPU bits instead, where vectorised and scalar paths round differently."""
    scores = _cuda_sigmoid(torch.ops.aten.sigmoid.default, logits).flatten()
    kept = torch.where(scores > score_thresh)[0]
    return scores[kept], kept


_SIGMOIDS = {torch.ops.aten.sigmoid.default, torch.ops.aten.sigmoid_.default}
_SQRTS = {torch.ops.aten.sqrt.default, torch.ops.aten.sqrt_.default}
_scores_as_on_cuda = False


@contextlib.contextmanager
def scores_as_on_cuda():
    """Inside, on the emulated device, PyTorch's sigmoid and sqrt of float32 / float64 tensors compute each element
    as their CUDA kernels do (see _cuda_sigmoid, _cuda_sqrt): for torchvision's one-stage post-process, whose scores
    rpn_ops gives as torchvision computes them on the device. Off by default: rpn_ops' other kernels call PyTorch's
    sigmoid themselves, and so match torchvision's on the CPU's terms."""
    global _scores_as_on_cuda
    previous, _scores_as_on_cuda = _scores_as_on_cuda, True
    try:
        yield
    finally:
        _scores_as_on_cuda = previous


def _cuda_sigmoid(func, x):
    """torch.sigmoid as its CUDA kernel computes it: each float32 / float64 element alone (the CPU's scalar path,
    taken for a non-contiguous input, where the vectorised one rounds differently), so that torchvision's scores
    on the emulated device are those it gives on a GPU. Other dtypes as on the CPU."""
    if x.dtype not in (torch.float32, torch.float64):
        return func(x)
    spread = x.new_zeros(2 * x.numel())
    spread[::2] = x.reshape(-1)
    scores = torch.ops.aten.sigmoid.default(spread[::2]).view(x.shape)
    return x.copy_(scores) if func is torch.ops.aten.sigmoid_.default else scores


def _cuda_sqrt(func, x):
    """torch.sqrt as its CUDA kernel computes it: correctly rounded (the CPU's vectorised sqrt, SLEEF's, is within
    half an ulp plus a little, so its last bit can differ), computed in opmath and rounded to the dtype."""
    if not x.is_floating_point():
        return func(x)
    opmath = torch.float64 if x.dtype == torch.float64 else torch.float32
    roots = torch.from_numpy(numpy.sqrt(x.detach().to(opmath).numpy())).to(x.dtype)
    return x.copy_(roots) if func is torch.ops.aten.sqrt_.default else roots


def cuda_sqrt(x):
    return _cuda_sqrt(torch.ops.aten.sqrt.default, x)


def cuda_decode(rel_codes, boxes, weights, bbox_xform_clip):
    """decode_boxes as its CUDA kernel computes it (see _cpu_twin_call)."""
    return torch.ops.rpn_ops.decode_boxes(*_cpu_twin_call(torch.ops.rpn_ops.decode_boxes.default,
                                                          (rel_codes, boxes, list(weights), bbox_xform_clip), {})[0])


def cuda_dense_detections(class_logits, box_regression, anchors, image_sizes, num_anchors_per_level, score_thresh,
                          topk_candidates, nms_thresh, detections_per_img, weights, bbox_xform_clip, activation,
                          topk_per, cell_anchors=None, cells_per_level=(), grid_sizes=(), strides=(),
                          centerness=None, box_coding="deltas"):
    """dense_detections as its CUDA kernel computes it: each sigmoid alone and decode's division by the reciprocal,
    as PyTorch's CUDA kernels do (the CPU kernel gives torch.sigmoid's CPU bits, and divides); the padded outputs of
    rpn_ops.reference.dense_detections with those steps. Called once the CPU kernel accepted the inputs."""
    from rpn_ops import reference

    images = len(image_sizes) // 2
    if cell_anchors is not None:
        cells = list(cell_anchors.split(list(cells_per_level)))
        anchors = [reference.grid_anchors(cells, list(zip(grid_sizes[::2], grid_sizes[1::2])),
                                          list(zip(strides[::2], strides[1::2])))]
    anchor_list = [anchors[0 if len(anchors) == 1 else b] for b in range(images)]
    boxes, scores, labels = reference.dense_detections(
        class_logits, box_regression, anchor_list, list(zip(image_sizes[::2], image_sizes[1::2])),
        list(num_anchors_per_level), score_thresh, topk_candidates, nms_thresh, detections_per_img, weights,
        bbox_xform_clip, activation, topk_per, sigmoid=lambda x: _cuda_sigmoid(torch.ops.aten.sigmoid.default, x),
        decode=cuda_decode, centerness=centerness, box_coding=box_coding, sqrt=cuda_sqrt)
    padded = torch.ops.rpn_ops.dense_detections(class_logits, box_regression, anchors, image_sizes,
                                                num_anchors_per_level, score_thresh, 0, nms_thresh,
                                                detections_per_img, weights, bbox_xform_clip, activation, topk_per,
                                                centerness=centerness, box_coding=box_coding)
    out_boxes, out_scores, out_labels, counts = (t.clone() for t in padded)  # zeros of the right dtypes and shapes
    for b in range(images):
        count = len(scores[b])
        out_boxes[b, :count], out_scores[b, :count], out_labels[b, :count] = boxes[b], scores[b], labels[b]
        counts[b] = count
    return out_boxes, out_scores, out_labels, counts


def _cpu_twin(func, args, kwargs):
    """What computes the CUDA kernel's answer on the CPU: the CPU kernel, except where the two differ by design."""
    twin = None
    if func._schema.name.endswith("::dense_detections"):
        twin = cuda_dense_detections
    elif func._schema.name.endswith("::score_candidates") and args[0].dtype in (torch.float32, torch.float64):
        twin = one_by_one_sigmoid_candidates
    if twin is not None and _call(func, args, kwargs)[1] is None:  # bad input: the CPU kernel's error
        return twin, args, kwargs
    return (func, *_cpu_twin_call(func, args, kwargs))


def _cpu_twin_call(func, args, kwargs):
    """The CPU kernel's call that computes what the CUDA kernel does. decode_boxes divides a code by its weight
    by multiplying with the reciprocal on CUDA, as PyTorch's CUDA kernel does (a difference the README documents): its
    twin is the CPU kernel on cuda_divided_codes with weights of 1."""
    valid_weights = func._schema.name.endswith("::decode_boxes") and all(0 < w < math.inf for w in args[2])
    if valid_weights and not _powers_of_two(args[2]):
        rel_codes, boxes, weights = args[:3]
        return (cuda_divided_codes(rel_codes, weights), boxes, [1.0] * 4) + tuple(args[3:]), kwargs
    return args, kwargs


def _on_plain_cpu_tensors(args, kwargs) -> bool:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" for t in tensors)


_TRUE_DIVISIONS = {torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor, torch.ops.aten.div.Scalar,
                   torch.ops.aten.div_.Scalar}


def _cuda_true_division(func, a, b):
    """a / b as PyTorch's CUDA kernel computes it. A tensor divided by a number (or a 0-dim tensor, which on CUDA
    is a CPU scalar) is multiplied by the reciprocal, computed in opmath (float32 for float16 / bfloat16 /
    float32); anything else divides as on the CPU. torchvision's BoxCoder divides codes by its weights this way,
    which is why rpn_ops' CUDA decode does too."""
    divisor_is_scalar = not isinstance(b, torch.Tensor) or (b.dim() == 0 and a.dim() > 0)
    dtype = torch.result_type(a, b)
    if not divisor_is_scalar or not dtype.is_floating_point:
        return func(a, b)
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    divisor = b.to(opmath) if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=opmath)
    quotient = (a.to(opmath) * divisor.reciprocal()).to(dtype)
    if func in (torch.ops.aten.div_.Tensor, torch.ops.aten.div_.Scalar):
        return a.copy_(quotient)
    return quotient


def _call(op, args, kwargs) -> Tuple[object, Optional[BaseException]]:
    try:
        return op(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001  (compared with the other kernel's error)
        return None, error


class EmulatedCuda(TorchDispatchMode):
    """Runs `torch.ops.rpn_ops` operators on their emulated CUDA kernels (see the module docstring)."""

    def __enter__(self):
        module()  # built and loaded before the first operator call
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _on_plain_cpu_tensors(args, kwargs):  # fake or meta tensors: tracing, not running
            return func(*args, **kwargs)
        if func in _TRUE_DIVISIONS:
            return _cuda_true_division(func, *args, **kwargs)
        if func in _SIGMOIDS and _scores_as_on_cuda:
            return _cuda_sigmoid(func, *args, **kwargs)
        if func in _SQRTS and _scores_as_on_cuda:
            return _cuda_sqrt(func, *args, **kwargs)
        emulated = _emulated_overload(func)
        if emulated is None:
            return func(*args, **kwargs)
        expected, expected_error = _call(*_cpu_twin(func, args, kwargs))
        result = None
        for run in RUNS:
            with settings(run):
                got, error = _call(emulated, args, kwargs)
            what = f"emulated CUDA {func._schema.name} ({run})"
            if expected_error is not None or error is not None:
                if error is not None and expected_error is None:
                    raise AssertionError(f"{what} raised where the CPU kernel did not: {error}") from error
                assert error is not None, f"{what} did not raise; the CPU kernel raised {expected_error!r}"
                assert type(error) is type(expected_error) and _message(error) == _message(expected_error), (
                    f"{what} raised {type(error).__name__}: {_message(error)!r}; the CPU kernel raised "
                    f"{type(expected_error).__name__}: {_message(expected_error)!r}")
                continue
            if func._schema.name.endswith("::dense_focal_loss"):  # float64 sums in the CUDA kernel's block order
                assert_same_sums(got, expected, args[0].numel(), what)
            else:
                assert_same_outputs(got, expected, what)
            result = got
        if expected_error is not None:
            raise expected_error
        return result


def _message(error: BaseException) -> str:
    return str(error).split("\nException raised from")[0].strip()


def kernel_runs() -> Dict[str, Tuple[int, int, int]]:
    return dict(module().kernel_runs())


def active() -> bool:
    """Whether the rpn_ops operators run on the emulated CUDA device right now."""
    return isinstance(_get_current_dispatch_mode(), EmulatedCuda)


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """The CPU kernels for the duration, where the emulated device is active."""
    if not active():
        yield
        return
    with _pop_mode_temporarily():
        yield
