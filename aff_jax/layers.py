"""Framework-faithful building blocks shared by every fusion module and host network.

All tensors are NHWC. Parameters carry logical axis names (``nn.with_logical_partitioning``) so
the training code can map them onto a device mesh; the names are

* conv kernel ``('conv_height', 'conv_width', 'conv_in', 'conv_out')``, conv bias ``('conv_out',)``
* BatchNorm scale/bias ``('norm',)``
* dense kernel ``('embed', 'classes')``, dense bias ``('classes',)``
"""
from __future__ import annotations

import functools
from typing import Any, Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aff_jax import conv as conv_lib
from aff_jax import precision

Dtype = Any

CONV_AXES = ('conv_height', 'conv_width', 'conv_in', 'conv_out')
NORM_AXES = ('norm',)
DENSE_AXES = ('embed', 'classes')

# torchvision's ResNet init: kaiming normal, fan_out, gain sqrt(2).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def param(module: nn.Module, name: str, init: Any, axes: tuple[str, ...], shape: tuple[int, ...],
          dtype: Dtype) -> jax.Array:
    """``module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)``, whose
    existing value is checked against ``shape`` directly.

    flax checks an existing parameter by tracing its initializer (``jax.eval_shape`` of a
    random draw, on every call): a third or more of the time it takes to trace a model's
    forward pass, which every run pays for each program it builds.
    """
    if module.is_initializing() or not module.has_variable('params', name):
        return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)
    value = nn.meta.unbox(module.get_variable('params', name))
    if tuple(np.shape(value)) != tuple(shape):
        raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, np.shape(value),
                                               tuple(shape))
    return value


class Conv2D(nn.Module):
    """A square conv with PyTorch/Gluon semantics: symmetric explicit padding ``padding``.

    flax's ``'SAME'`` pads (0, 1) for a stride-2 3x3 conv on an even input where PyTorch and
    Gluon pad (1, 1), so the padding is always given explicitly. Parameters as ``nn.Conv``'s:
    ``kernel`` HWIO ``(k, k, C_in // groups, features)``, ``bias`` ``(features,)``.
    (N, H, W, C_in) -> (N, H_out, W_out, features). Computed by :func:`aff_jax.conv.conv2d`
    (GEMM weight gradients on CPU).
    """
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.groups:
            raise ValueError(f'{self.name}: {channels} input channels do not split into '
                             f'groups={self.groups}')
        k = self.kernel_size
        kernel = param(self, 'kernel', conv_kernel_init, CONV_AXES,
                       (k, k, channels // self.groups, self.features), self.param_dtype)
        dtype = precision.checked(self.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        y = conv_lib.conv2d(x, kernel, (self.stride, self.stride), pad,
                            (self.dilation, self.dilation), self.groups)
        if self.use_bias:
            bias = param(self, 'bias', nn.initializers.zeros, CONV_AXES[-1:], (self.features,),
                         self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def conv2d(features: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
           dilation: int = 1, groups: int = 1, bias: bool = False, dtype: Dtype = jnp.float32,
           param_dtype: Dtype = jnp.float32, name: str | None = None) -> Conv2D:
    """:class:`Conv2D` with the keyword names the hosts use (``bias`` for ``use_bias``)."""
    return Conv2D(features, kernel_size, stride=stride, padding=padding, dilation=dilation,
                  groups=groups, use_bias=bias, dtype=dtype, param_dtype=param_dtype, name=name)


def dense(features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          name: str | None = None) -> nn.Dense:
    """Fully connected layer; kernel layout ``(in, out)`` (PyTorch's weight transposed)."""
    return nn.Dense(
        features, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(dense_kernel_init, DENSE_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, DENSE_AXES[-1:]),
        name=name)


StatsRule = Literal['torch', 'gluon']


class BatchNorm(nn.Module):
    """Per-channel batch normalisation of an NHWC tensor over (N, H, W).

    Statistics and normalisation are computed in at least float32 (float64 for a float64
    ``dtype``, :mod:`aff_jax.precision`); the output is cast to ``dtype``, and the running
    statistics are stored in at least float32 of ``param_dtype``. ``momentum`` is the
    running-average decay (PyTorch momentum 0.1 == 0.9 here == Gluon's default 0.9).

    ``stats_rule`` reproduces the source framework's running-statistics update:

    * ``'torch'``: running_var is updated with the *unbiased* batch variance (n / (n - 1)) and a
      ``num_batches_tracked`` int32 counter is kept, as in ``torch.nn.BatchNorm2d``.
    * ``'gluon'``: running_var is updated with the biased batch variance, and the momentum is
      rounded to float32, as Gluon does (its operator takes momentum as a float32
      hyperparameter, also in a net cast to float64; float32 runs round it so anyway).

    ``update_stats=False`` normalises with the batch statistics in train mode but leaves the
    running ones untouched: what MXNet does for a BN whose backward pass never runs, since it
    updates running statistics there (the official CIFAR ResNets' parameter-free input BN).

    In train mode a channel must see more than one value. The global-context branch of MS-CAM
    normalises one pooled value per image, so a batch of size 1 would silently output ``bias``
    (flax) or raise (PyTorch); we raise a ``ValueError`` naming the shape.
    """
    use_scale: bool = True
    use_bias: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    stats_rule: StatsRule = 'gluon'
    update_stats: bool = True
    scale_init: Any = nn.initializers.ones
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.stats_rule not in ('torch', 'gluon'):
            raise ValueError(f"BatchNorm stats_rule must be 'torch' or 'gluon', got {self.stats_rule!r}")
        channels = x.shape[-1]
        compute = precision.at_least_float32(self.dtype)
        stored = precision.at_least_float32(self.param_dtype)
        running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), stored)
        running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), stored)
        if self.stats_rule == 'torch':
            tracked = self.variable('batch_stats', 'num_batches_tracked', jnp.zeros, (), jnp.int32)
        xc = x.astype(compute)
        # Without a parameter, a constant 1 or 0 that XLA folds away.
        scale = (param(self, 'scale', self.scale_init, NORM_AXES, (channels,), self.param_dtype)
                 .astype(compute) if self.use_scale else jnp.ones((channels,), compute))
        bias = (param(self, 'bias', nn.initializers.zeros, NORM_AXES, (channels,),
                      self.param_dtype).astype(compute)
                if self.use_bias else jnp.zeros((channels,), compute))
        if train:
            count = x.size // channels
            if count < 2:
                raise ValueError(
                    f'BatchNorm in train mode needs more than one value per channel, got input '
                    f'of shape {tuple(x.shape)}; the global-context branch sees one value per '
                    f'image, so train with a batch size of at least 2')
            y, mean, var = normalize_batch(xc, scale, bias, self.epsilon)
            if self.update_stats and not self.is_initializing():
                update_var = var * (count / (count - 1)) if self.stats_rule == 'torch' else var
                m = (self.momentum if self.stats_rule == 'torch'
                     else float(np.float32(self.momentum)))
                running_mean.value = (m * running_mean.value + (1.0 - m) * mean).astype(stored)
                running_var.value = (m * running_var.value + (1.0 - m) * update_var).astype(stored)
                if self.stats_rule == 'torch':
                    tracked.value = tracked.value + 1
        else:
            y = _normalize(xc, running_mean.value.astype(compute),
                           running_var.value.astype(compute), scale, bias, self.epsilon)
        return y.astype(self.dtype)


def _normalize(x, mean, var, scale, bias, epsilon):
    return (x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias


def _normalize_batch_fwd(x, scale, bias, epsilon):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    y = _normalize(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _normalize_batch_bwd(epsilon, residuals, cotangents):
    x, mean, inv, scale = residuals
    dy, dmean, dvar = cotangents
    axes = tuple(range(dy.ndim - 1))
    n = dy.size // dy.shape[-1]
    centred = x - mean
    dbias = jnp.sum(dy, axes)
    dscale = jnp.sum(dy * centred, axes) * inv
    a = scale * inv
    dx = dy * a - (a * dbias - dmean) / n - centred * ((a * inv * dscale - 2 * dvar) / n)
    return dx, dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch normalisation of ``x`` (..., C) over all but its last axis, in ``x``'s
    dtype (float32 or float64; ``scale`` and ``bias`` alike):
    ``((x - mean) * rsqrt(var + epsilon) * scale + bias, mean, var)``, biased variance.

    The gradient is the closed form, ``dx = a*dy - (a*sum(dy) - dmean)/n - (x - mean) *
    (a*inv*dscale - 2*dvar)/n`` with ``inv = rsqrt(var + epsilon)``, ``a = scale*inv``,
    ``dscale = inv*sum(dy*(x - mean))`` and sums over all but the channel axis, instead
    of JAX's derivative of each step: a program with fewer ops, which XLA:CPU fuses into fewer
    places (the ``cifar_aff_resnet32`` train step: 9% faster, compiled in 6.7 s instead of
    8.5 s; BENCHMARKS.md). Values equal the step-wise derivative to float32 rounding.
    """
    return _normalize_batch_fwd(x, scale, bias, epsilon)[0]


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``MaxPool2d(3, stride=2, padding=1)`` (floor mode): (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).

    The gradient goes to the first maximum of each window in row-major order (PyTorch's
    choice; to a NaN if the window holds one). On CPUs the pooling is nine strided slices with
    a gradient of nine strided pads (``_max_pool_taps``): XLA:CPU's own gradient of a
    ``reduce_window`` tracks the argmax through four index tensors and took ~60 ms for a
    16x64x64x64 input on the 2-core machine, against ~7 ms.
    """
    return jax.lax.platform_dependent(x, cpu=_max_pool_taps, default=_max_pool_xla)


def _max_pool_xla(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _pool_taps(x):
    """The -inf-padded input and its nine window taps, each (N, ceil(H/2), ceil(W/2), C)."""
    h_out, w_out = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return xp, [xp[:, conv_lib.tap(i, 1, h_out, 2), conv_lib.tap(j, 1, w_out, 2), :]
                for i in range(3) for j in range(3)]


@jax.custom_vjp
def _max_pool_taps(x):
    return functools.reduce(jnp.maximum, _pool_taps(x)[1])


def _max_pool_taps_fwd(x):
    y = _max_pool_taps(x)
    return y, (x, y)


def _max_pool_taps_bwd(residuals, g):
    x, y = residuals
    xp, taps = _pool_taps(x)
    h_out, w_out = y.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, g.dtype)
    for t, tap in enumerate(taps):
        i, j = divmod(t, 3)
        hit = ((tap == y) | (tap != tap)) & ~taken
        taken = taken | hit
        # Tap (i, j) of output (a, b) is padded-input pixel (i + 2a, j + 2b): an interior pad.
        dxp = dxp + jax.lax.pad(
            jnp.where(hit, g, 0), jnp.zeros((), g.dtype),
            ((0, 0, 0), (i, xp.shape[1] - i - (2 * h_out - 1), 1),
             (j, xp.shape[2] - j - (2 * w_out - 1), 1), (0, 0, 0)))
    return (dxp[:, 1:-1, 1:-1, :],)


_max_pool_taps.defvjp(_max_pool_taps_fwd, _max_pool_taps_bwd)


def avg_pool_ceil(x: jax.Array, size: int) -> jax.Array:
    """``AvgPool2D(size, stride=size, ceil_mode=True, count_include_pad=False)``.

    Ceil mode keeps the partial window at the high edge (7 -> 4 for size 2); the padding that
    completes it is excluded from the average. (N, H, W, C) -> (N, ceil(H/size), ceil(W/size), C).
    """
    if size == 1:
        return x
    pad_h, pad_w = (-x.shape[1]) % size, (-x.shape[2]) % size
    return nn.avg_pool(x, (size, size), strides=(size, size),
                       padding=((0, pad_h), (0, pad_w)), count_include_pad=False)


def global_avg_pool(x: jax.Array, keepdims: bool = True) -> jax.Array:
    """(N, H, W, C) -> (N, 1, 1, C), or (N, C) without ``keepdims``; the mean accumulated in at
    least float32."""
    return jnp.mean(x.astype(precision.at_least_float32(x.dtype)), axis=(1, 2),
                    keepdims=keepdims).astype(x.dtype)


def check_nhwc(x: Any, what: str = 'input') -> None:
    """Raise a ValueError naming the shape unless ``x`` is a rank-4 NHWC array."""
    shape = getattr(x, 'shape', None)
    if shape is None or len(shape) != 4:
        raise ValueError(f'{what} must be a rank-4 NHWC array (N, H, W, C), got shape {shape}')


UPSAMPLE_METHODS = ('nearest', 'bilinear')


def upsample(x: jax.Array, height: int, width: int, method: str = 'nearest') -> jax.Array:
    """Resize (N, h, w, C) up to (N, height, width, C) as PyTorch's ``F.interpolate`` does.

    ``'nearest'``: PyTorch's (and torchvision FPN's) rule, output pixel ``i`` takes input pixel
    ``floor(i * h / height)``, in exact integer arithmetic. ``'bilinear'``: half-pixel centres
    (``align_corners=False``); borders repeat the edge pixel, as PyTorch's clamping does.
    """
    if method not in UPSAMPLE_METHODS:
        raise ValueError(f'upsample method must be one of {UPSAMPLE_METHODS}, got {method!r}')
    _, h, w, _ = x.shape
    if (h, w) == (height, width):
        return x
    if method == 'nearest':
        rows = (np.arange(height) * h) // height
        cols = (np.arange(width) * w) // width
        return jnp.asarray(x)[:, rows][:, :, cols]
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), 'bilinear',
                            antialias=False).astype(x.dtype)
