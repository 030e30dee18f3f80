"""Arrays from other libraries: anything NumPy can view without a copy (the buffer protocol,
__array_interface__, __dlpack__: PyTorch CPU tensors, JAX CPU arrays) goes into the
functional ops and the layers as it is, read where it lies."""

import array
import tracemalloc

import numpy as np
import pytest
from cnnbp import _core, nn
from cnnbp import functional as F

torch = pytest.importorskip("torch")


class DLPackOnly:
    """An array that offers nothing but DLPack, as some libraries' arrays do."""

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, **kwargs):
        return self.tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()


class InterfaceOnly:
    """An array that offers only __array_interface__ (a view of an ndarray's memory)."""

    def __init__(self, values):
        self.values = values
        self.__array_interface__ = values.__array_interface__


def _inputs(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    dy = rng.standard_normal((2, 4, 5, 5)).astype(dtype)
    return x, w, b, dy


WRAPPERS = {
    "torch": torch.from_numpy,
    "dlpack": lambda a: DLPackOnly(torch.from_numpy(a)),
    "array_interface": InterfaceOnly,
    "memoryview": memoryview,
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", WRAPPERS)
def test_conv2d_forward_and_backward_take_other_arrays_as_numpy_ones(kind, dtype):
    wrap = WRAPPERS[kind]
    x, w, b, dy = _inputs(dtype)
    options = dict(stride=2, padding=1)
    expected = F.conv2d(x, w, b, **options)
    got = F.conv2d(wrap(x), wrap(w), wrap(b), **options)
    assert got.dtype == dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    for g, e in zip(
        F.conv2d_backward(wrap(dy), wrap(x), wrap(w), **options),
        F.conv2d_backward(dy, x, w, **options),
    ):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_take_torch_tensors_forward_and_backward(dtype):
    x, _, _, dy = _inputs(dtype)
    results = []
    for wrap in (np.asarray, torch.from_numpy):
        nn.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=dtype), nn.ReLU())
        out = model(wrap(x))
        dx = model.backward(wrap(dy))
        results.append((out, dx, model[0].weight.grad.copy(), model[0].bias.grad.copy()))
    for got, expected in zip(*results):
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, expected)


def test_buffer_protocol_objects_are_read_as_they_are():
    values = array.array("d", [-1.5, 0.0, 2.5])
    np.testing.assert_array_equal(F.relu(values), [0.0, 0.0, 2.5])
    np.testing.assert_array_equal(F.relu(memoryview(values)), [0.0, 0.0, 2.5])
    assert F.relu(array.array("f", [1.0])).dtype == np.float32


@pytest.mark.parametrize("kind", ["torch", "dlpack", "array_interface", "memoryview"])
def test_the_ops_read_the_callers_memory(kind):
    """batch_norm2d updates running statistics in place: in the caller's own memory, so the
    conversion made a view, not a copy."""
    running_mean, running_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    wrap = WRAPPERS[kind]
    view = _core.as_array(wrap(running_mean))
    assert np.shares_memory(view, running_mean)
    x = np.random.default_rng(1).standard_normal((4, 3, 5, 5)).astype(np.float32)
    F.batch_norm2d(x, None, None, wrap(running_mean), wrap(running_var), training=True)
    np.testing.assert_allclose(running_mean, 0.1 * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert not np.all(running_var == 1)


def _numpy_bytes_allocated_by(call):
    """The peak of NumPy allocations (tracemalloc sees them) while call() runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_no_copy_of_a_torch_tensor_is_made_on_the_way_in():
    """A 4 MiB input: a conversion that copied it would allocate its size in NumPy. A
    transposed tensor must be copied (the kernels read C-contiguous memory): that shows."""
    x = torch.randn(64, 16, 32, 32)
    w = torch.randn(1, 16, 3, 3)
    conv = nn.Conv2d(16, 1, 3)
    size = x.numel() * 4
    assert _numpy_bytes_allocated_by(lambda: F.conv2d(x, w)) < size // 4
    assert _numpy_bytes_allocated_by(lambda: conv(x)) < size // 4
    assert _numpy_bytes_allocated_by(lambda: F.relu(x)) < size // 4
    strided = x.transpose(2, 3)
    assert _numpy_bytes_allocated_by(lambda: F.conv2d(strided, w)) >= size
    np.testing.assert_array_equal(F.conv2d(strided, w), F.conv2d(strided.contiguous(), w))


def test_tensors_numpy_cannot_view_are_refused_by_name():
    with pytest.raises(TypeError, match=r"\[relu\] input: expected an array NumPy can view"):
        F.relu(torch.ones(3, requires_grad=True))
    with pytest.raises(TypeError, match=r"\[relu\] input: expected float32 or float64, got int64"):
        F.relu(torch.ones(3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"\[conv2d\] weight: expected float32 like the first"):
        F.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3, dtype=torch.float64))


def test_jax_arrays_go_in_as_numpy_ones():
    jnp = pytest.importorskip("jax.numpy")
    x = np.random.default_rng(2).standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(F.relu(jnp.asarray(x)), F.relu(x))
    np.testing.assert_array_equal(nn.ReLU()(jnp.asarray(x)), F.relu(x))
