"""conv2d's scratch memory: a few images per thread, never the whole batch."""

import numpy as np
import pytest
from cnnbp import functional as F


@pytest.mark.parametrize(
    "stride, dtype", [(1, "float32"), (2, "float32"), (1, "float64"), (2, "float64")]
)
def test_conv2d_workspace_is_bounded_by_images_not_batch(stride, dtype):
    # scratch memory is a few images per thread plus fixed partial sums: it stops growing
    # once the batch outnumbers the reduction chunks
    sizes = [
        F.conv2d_workspace_bytes((n, 16, 24, 24), (32, 16, 3, 3), stride, 1, dtype)
        for n in (64, 256, 1024)
    ]
    assert sizes[0] > 0
    assert sizes[0] == sizes[1] == sizes[2]
    whole_batch_im2col = 1024 * 16 * 9 * 24 * 24 * np.dtype(dtype).itemsize
    assert sizes[2] < whole_batch_im2col / 100


def test_conv2d_workspace_of_tiny_problems_is_zero_and_arguments_are_checked():
    assert F.conv2d_workspace_bytes((1, 1, 6, 6), (1, 1, 3, 3)) == 0
    with pytest.raises(ValueError, match=r"\[conv2d_workspace_bytes\] weight"):
        F.conv2d_workspace_bytes((1, 2, 6, 6), (1, 3, 3, 3))
    with pytest.raises(TypeError, match=r"\[conv2d_workspace_bytes\] dtype"):
        F.conv2d_workspace_bytes((1, 2, 6, 6), (1, 2, 3, 3), dtype="int32")
