"""Sizes past 32-bit indexing: counts beyond what the kernels index are refused with a clear error before
anything is allocated; sizes within them work (64-bit offsets everywhere). The inputs here are zero-stride
views, so 2^31 boxes cost a few bytes."""
import resource

import pytest
import torch

import rpn_ops

TOO_MANY = 2**31  # one past kMaxBoxes


def huge(rows, width=4, dtype=torch.float32):
    return torch.zeros(1, width, dtype=dtype).expand(rows, width) if width else torch.zeros(1, dtype=dtype).expand(rows)


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("call, match", [
    (lambda: rpn_ops.nms(huge(TOO_MANY), huge(TOO_MANY, 0), 0.5), "boxes holds 2147483648 boxes; at most 2147483647"),
    (lambda: rpn_ops.batched_nms(huge(TOO_MANY), huge(TOO_MANY, 0), huge(TOO_MANY, 0, torch.int64), 0.5),
     "boxes holds 2147483648 boxes; at most 2147483647"),
    (lambda: rpn_ops.decode_boxes(huge(TOO_MANY), huge(TOO_MANY), (1.0, 1.0, 1.0, 1.0)),
     "boxes holds 2147483648 boxes"),
    (lambda: rpn_ops.encode_boxes(huge(TOO_MANY), huge(TOO_MANY), (1.0, 1.0, 1.0, 1.0)),
     "reference_boxes holds 2147483648 boxes"),
    (lambda: rpn_ops.grid_anchors([torch.zeros(3, 4)], [(2**15, 2**15)], [(4, 4)]),
     "the anchors of all levels pass 2147483647 per image"),
], ids=["nms", "batched_nms", "decode", "encode", "grid_anchors"])
def test_counts_past_32_bit_indexing_are_refused_before_allocating(call, match):
    before = peak_rss_mib()
    with pytest.raises((RuntimeError, ValueError), match=match):
        call()
    assert peak_rss_mib() - before < 64  # nothing of the inputs' nominal size was allocated


def test_box_iou_of_2_31_rows_against_no_column_is_empty():
    out = rpn_ops.box_iou(huge(TOO_MANY), torch.zeros(0, 4))
    assert out.shape == (TOO_MANY, 0)

