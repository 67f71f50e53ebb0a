"""2-D convolution (NHWC input, HWIO kernel) with two implementations of its gradient on CPU.

``'xla'`` (the default) is XLA's own convolution and gradients. On a CPU the weight gradient
reads a channels-first copy of the input, and the input is stored once for it
(:mod:`aff_jax.stored_once`): XLA would otherwise recompute the BatchNorm and ReLU that
produced it inside that copy, in a scalar loop. With the convolutions in Eigen
(``compiler_options``) a 2-core AVX-512 Intel machine then trained ``cifar_aff_resnet32``
1.7-1.8x and ``tv_resnet50`` 1.4x faster than with ``'gemm'`` (BENCHMARKS.md). A 1x1 convolution
without groups is evaluated as a dot and, on CPUs, differentiated as a convolution: whichever
ran faster there.

``'gemm'`` computes the weight gradient on CPU as one ``x_tap^T @ g`` product per kernel tap
(nine for a 3x3 kernel, on a channels-first copy of the input, which is stored once for it
too) and a 1x1 convolution without groups as a ``dot`` over channels (of the strided
subsample for stride > 1), which XLA differentiates into GEMMs by itself. It was
adopted on the 2-core AMD development machine, where XLA's (then YNNPACK's) weight-gradient
convolution of wide, high-resolution layers ran at 4-7 GFLOP/s (64 channels at 32x32, batch
32); that machine has not been measured with Eigen's. The custom VJP takes the GEMM path only
when lowering for CPU (``jax.lax.platform_dependent``): GPU and TPU keep XLA's native
convolution gradients, and there both implementations lower to the same operations.

A map with fewer pixels than the kernel has taps (the 2x2 last stage of an ImageNet ResNet at
64x64 input) is convolved as one product of its stacked taps, in both implementations: XLA
would swap the operands of that convolution, a ~25x slower kernel on CPU. So is a grouped
convolution in float64, whose gradient XLA:CPU computed 200-470x slower than that product
(BENCHMARKS.md), which made a float64 comparison of a ResNeXt take minutes.

The two implementations differ in float32 rounding of the gradients (not their values beyond
1e-5), and so in the trajectory of a long run; training configs choose with
``config.conv_implementation``.

``compiler_options(platform)`` is what programs running these convolutions compile with: on a
CPU, XLA's convolutions run in Eigen rather than YNNPACK (which keeps the dots and
reductions); see its docstring.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from aff_jax import precision, stored_once

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

Padding = tuple[tuple[int, int], tuple[int, int]]

_YNN_FUSIONS = 'xla_cpu_experimental_ynn_fusion_type'
# XLA:CPU's default YNNPACK fusions (jaxlib 0.10.2) less LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
_YNN_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'

IMPLEMENTATIONS = ('xla', 'gemm')
_IMPLEMENTATION = contextvars.ContextVar('aff_jax_conv_implementation', default='xla')


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """Within the block, :func:`conv2d` traces ``'xla'`` (the default: XLA's convolutions and
    their gradients) or ``'gemm'`` (GEMM weight gradients on CPU, 1x1 convs as dots)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f'conv implementation must be one of {IMPLEMENTATIONS}, got {name!r}')
    token = _IMPLEMENTATION.set(name)
    try:
        yield
    finally:
        _IMPLEMENTATION.reset(token)


def compiler_options(platform: str) -> dict[str, str] | None:
    """``jax.jit(..., compiler_options=...)`` for a program with convolutions on ``platform``.

    On a CPU, XLA's convolutions run in Eigen instead of YNNPACK: on the 2-core AVX2
    development machine YNNPACK's were the slower ones (``cifar_aff_resnet32``, batch 32:
    forward 42.9 -> 60.9 img/s, train step 10.3 -> 12.2 img/s; BENCHMARKS.md). Dots and
    reductions stay with YNNPACK. None on other platforms, and where the user's ``XLA_FLAGS``
    choose the YNNPACK fusions themselves.
    """
    if platform != 'cpu' or _YNN_FUSIONS in os.environ.get('XLA_FLAGS', ''):
        return None
    return {_YNN_FUSIONS: _YNN_WITHOUT_CONVOLUTIONS}


def conv2d(x: jax.Array, kernel: jax.Array, stride: tuple[int, int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), dilation: tuple[int, int] = (1, 1),
           groups: int = 1) -> jax.Array:
    """``lax.conv_general_dilated`` with explicit padding: (N, H, W, C_in) x
    (kh, kw, C_in // groups, C_out) -> (N, H_out, W_out, C_out), where
    ``H_out = (H + pad_lo + pad_hi - dilation * (kh - 1) - 1) // stride + 1``.

    Same values as XLA's convolution; only the weight gradient's algorithm differs on CPU, and,
    on every platform, that of a map with fewer pixels than the kernel has taps and of a
    grouped convolution in float64 (one product of the stacked taps, see ``_tap_product``).
    """
    stride, dilation = tuple(stride), tuple(dilation)
    padding = tuple(tuple(p) for p in padding)
    if min(p for pair in padding for p in pair) < 0:
        raise ValueError(f'conv2d padding must be non-negative, got {padding}')
    if x.shape[-1] != kernel.shape[2] * groups:
        raise ValueError(f'conv2d input has {x.shape[-1]} channels, the kernel of shape '
                         f'{tuple(kernel.shape)} with groups={groups} expects {kernel.shape[2] * groups}')
    pointwise = kernel.shape[:2] == (1, 1) and groups == 1 and padding == ((0, 0), (0, 0))
    if _IMPLEMENTATION.get() == 'xla':
        x = stored_once.value(x)
        if pointwise:
            return _pointwise_trained_as_convolution(x, kernel, stride)
        return _native(x, kernel, stride, padding, dilation, groups)
    if pointwise:
        return _pointwise(x, kernel, stride)
    return _conv(stored_once.value(x), kernel, stride, padding, dilation, groups)


def _pointwise(x: jax.Array, kernel: jax.Array, stride: tuple[int, int]) -> jax.Array:
    x = x[:, ::stride[0], ::stride[1], :]
    return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_trained_as_convolution(x, kernel, stride):
    """A 1x1 convolution evaluated as a dot and, on CPUs, differentiated as XLA's convolution.

    On the 2-core Intel machine XLA:CPU ran the dots faster in inference (``aff_resnet50``'s
    forward pass 1.14x against 0.92-0.94x PyTorch with convolutions) but their gradients slower
    in training (``tv_resnet50`` step 1.46 s against 1.37 s; BENCHMARKS.md). Other platforms
    differentiate the dot, the program ``'gemm'`` gives them too (measured on an H100).
    """
    return _pointwise(x, kernel, stride)


def _pointwise_convolution(x, kernel, stride):
    return _native(x, kernel, stride, ((0, 0), (0, 0)), (1, 1), 1)


def _pointwise_trained_fwd(x, kernel, stride):
    out = lax.platform_dependent(x, kernel,
                                 cpu=functools.partial(_pointwise_convolution, stride=stride),
                                 default=functools.partial(_pointwise, stride=stride))
    return out, (x, kernel)


def _pointwise_trained_bwd(stride, residuals, g):
    def gradients(f):
        return lambda x, k, g: jax.vjp(functools.partial(f, stride=stride), x, k)[1](g)

    return lax.platform_dependent(*residuals, g, cpu=gradients(_pointwise_convolution),
                                  default=gradients(_pointwise))


_pointwise_trained_as_convolution.defvjp(_pointwise_trained_fwd, _pointwise_trained_bwd)


def _native(x, kernel, stride, padding, dilation, groups):
    if (x.shape[1] * x.shape[2] < kernel.shape[0] * kernel.shape[1]
            or (groups > 1 and x.dtype == jnp.float64)):
        return _tap_product(x, kernel, stride, padding, dilation, groups)
    return lax.conv_general_dilated(x, kernel, stride, padding, rhs_dilation=dilation,
                                    dimension_numbers=_DIMENSIONS, feature_group_count=groups)


def tap(index: int, dilation: int, out_size: int, stride: int) -> slice:
    """Along one spatial axis of the padded input, the positions kernel (or pooling window)
    tap ``index`` reads for the ``out_size`` outputs."""
    start = index * dilation
    return slice(start, start + (out_size - 1) * stride + 1, stride)


def _tap_product(x, kernel, stride, padding, dilation, groups):
    """The convolution as one product of the stacked taps of the padded input with the kernel
    (per group), for the cases XLA:CPU runs slowly (see the module docstring).

    XLA swaps the operands of a convolution of a map with fewer pixels than the kernel has taps
    (the map becomes the kernel: a 3x3 kernel on the 2x2 maps of an ImageNet ResNet's last
    stage at 64x64 input), folding any explicit padding back in first, and XLA:CPU ran the
    swapped one ~25x slower than the product.
    """
    kh, kw, cin_g, cout = kernel.shape
    n, h, w, _ = x.shape
    h_out = (h + sum(padding[0]) - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + sum(padding[1]) - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    taps = jnp.stack([xp[:, tap(i, dilation[0], h_out, stride[0]),
                         tap(j, dilation[1], w_out, stride[1]), :]
                      for i in range(kh) for j in range(kw)], axis=3)
    taps = taps.reshape(n, h_out, w_out, kh * kw, groups, cin_g)
    weights = kernel.reshape(kh * kw, cin_g, groups, cout // groups)
    out = jnp.einsum('nhwtgc,tcgo->nhwgo', taps, weights)
    return out.reshape(n, h_out, w_out, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, stride, padding, dilation, groups):
    return _native(x, kernel, stride, padding, dilation, groups)


def _conv_fwd(x, kernel, stride, padding, dilation, groups):
    return _native(x, kernel, stride, padding, dilation, groups), (x, kernel)


def _conv_bwd(stride, padding, dilation, groups, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: _native(x_, kernel, stride, padding, dilation, groups), x)
    (dx,) = input_vjp(g)

    def native_dw(x, g):
        _, kernel_vjp = jax.vjp(lambda k: _native(x, k, stride, padding, dilation, groups), kernel)
        return kernel_vjp(g)[0]

    def gemm_dw(x, g):
        return weight_gradient(x, g, kernel.shape, stride, padding, dilation,
                               groups).astype(kernel.dtype)

    dw = lax.platform_dependent(x, g, cpu=gemm_dw, default=native_dw)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_gradient(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                    stride: tuple[int, int], padding: Padding, dilation: tuple[int, int],
                    groups: int) -> jax.Array:
    """d(loss)/d(kernel) from the input ``x`` (N, H, W, C_in) and the output gradient ``g``
    (N, H_out, W_out, C_out), as one GEMM per kernel tap; returns ``kernel_shape`` (HWIO) in at
    least float32.

    Tap (i, j) sees the input window starting at ``(i * dilation, j * dilation)`` of the padded
    input, sampled every ``stride``: ``dw[i, j] = sum_{n, h, w} x_tap[n, h, w, :]^T g[n, h, w, :]``,
    per group (output channels are ``groups`` consecutive blocks).
    """
    kh, kw, cin_g, cout = kernel_shape
    n, h_out, w_out, _ = g.shape
    # Channels first, once: the GEMMs take x_tap^T with the contracted (N, H, W) axes minor,
    # and slicing the taps out of one transposed copy beats transposing every tap.
    xt = jnp.transpose(jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))), (3, 0, 1, 2))
    xt = xt.reshape(groups, cin_g, *xt.shape[1:])
    g_groups = g.reshape(n * h_out * w_out, groups, cout // groups)
    accumulate = precision.at_least_float32(jnp.result_type(x, g))
    taps = []
    for i in range(kh):
        for j in range(kw):
            window = xt[:, :, :, tap(i, dilation[0], h_out, stride[0]),
                        tap(j, dilation[1], w_out, stride[1])]
            window = window.reshape(groups, cin_g, n * h_out * w_out)
            # (groups, C_in/groups, C_out/groups), accumulated in float32 for bf16 inputs.
            product = jnp.einsum('gcm,mgd->gcd', window, g_groups,
                                 preferred_element_type=accumulate)
            taps.append(jnp.transpose(product, (1, 0, 2)).reshape(cin_g, cout))
    return jnp.stack(taps).reshape(kernel_shape)
