"""layers.max_pool_3x3_s2 (the ImageNet stems' pooling) against PyTorch's MaxPool2d(3, 2, 1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aff_jax import layers
from aff_jax.layers import max_pool_3x3_s2


def _torch_pool(x_nhwc, g_nhwc):
    """PyTorch's output and input gradient for cotangent ``g``, NHWC in and out."""
    x = torch.tensor(np.transpose(x_nhwc, (0, 3, 1, 2)), requires_grad=True)
    y = torch.nn.functional.max_pool2d(x, 3, stride=2, padding=1)
    y.backward(torch.tensor(np.transpose(g_nhwc, (0, 3, 1, 2))))
    return (np.transpose(y.detach().numpy(), (0, 2, 3, 1)),
            np.transpose(x.grad.numpy(), (0, 2, 3, 1)))


def _ours(x, g):
    y, vjp = jax.vjp(max_pool_3x3_s2, jnp.asarray(x))
    return np.asarray(y), np.asarray(vjp(jnp.asarray(g))[0])


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 4), (1, 1, 2, 2), (3, 16, 16, 8)])
def test_values_and_gradient_equal_pytorch_with_ties(shape, on_cpu):
    """Values on a coarse grid make ties in most windows: the gradient must go to the first
    maximum in row-major order, as PyTorch's does. Cotangents are distinct powers of two, so
    a pixel that is the maximum of several windows sums them exactly in any order."""
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, shape).astype(np.float32)
    out_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
    g = (2.0 ** rng.integers(-8, 8, out_shape)).astype(np.float32)
    y, dx = _ours(x, g)
    y_ref, dx_ref = _torch_pool(x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)


def test_random_values_and_the_other_platforms_path_agree(on_cpu):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 13, 10, 6)).astype(np.float32)
    g = rng.standard_normal((4, 7, 5, 6)).astype(np.float32)
    y, dx = _ours(x, g)
    y_ref, dx_ref = _torch_pool(x, g)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    # What GPUs and TPUs run (XLA's reduce_window and its gradient), on this CPU.
    y_xla, vjp = jax.vjp(layers._max_pool_xla, jnp.asarray(x))
    np.testing.assert_array_equal(y_xla, y)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], dx, rtol=1e-6, atol=1e-6)


def test_a_nan_passes_its_gradient_to_itself(on_cpu):
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    x[0, 1, 1, 0] = np.nan
    g = np.ones((1, 2, 2, 1), np.float32)
    y, dx = _ours(x, g)
    y_ref, dx_ref = _torch_pool(x, g)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    np.testing.assert_array_equal(dx, dx_ref)


def test_bfloat16_keeps_its_dtype(on_cpu):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 3)), jnp.bfloat16)
    y, vjp = jax.vjp(max_pool_3x3_s2, x)
    (dx,) = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  _torch_pool(np.asarray(x, np.float32),
                                              np.ones(y.shape, np.float32))[0])
