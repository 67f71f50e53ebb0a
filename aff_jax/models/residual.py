"""Residual-network plumbing shared by the hosts: layer constructors, child numbering, the
short-skip fusion order, the projection shortcut and the stage container.

Children are named as the source framework's ``Sequential`` numbers them, so a flax variable
path reads like the PyTorch ``state_dict`` key or the Gluon parameter name.
"""
from __future__ import annotations

import functools
import typing
from typing import Any, Callable, Literal

import flax.linen as nn
import jax

from aff_jax import fusion as fusion_lib
from aff_jax import stored_once
from aff_jax.layers import BatchNorm, avg_pool_ceil, conv2d

# ``conv(features, kernel_size, stride=..., padding=..., name=...)`` and
# ``norm(name=..., scale_init=...)``: :func:`aff_jax.layers.conv2d` and
# :class:`aff_jax.layers.BatchNorm` with a host's dtype, param_dtype and stats_rule bound.
ConvDef = Callable[..., nn.Module]
NormDef = Callable[..., nn.Module]


def layer_defs(host: Any) -> tuple[ConvDef, NormDef]:
    """The conv and BatchNorm constructors of ``host`` (a module with ``dtype``,
    ``param_dtype`` and ``stats_rule``), built once and handed to its blocks, as flax's
    ``examples/imagenet`` hands ``partial(nn.Conv, ...)`` down, so that no block repeats them."""
    kw = dict(dtype=host.dtype, param_dtype=host.param_dtype)
    return (functools.partial(conv2d, **kw),
            functools.partial(BatchNorm, stats_rule=host.stats_rule, **kw))


class SequentialNames:
    """Child names in the order a Gluon ``HybridSequential`` or a PyTorch ``Sequential``
    numbers its layers, from ``start``: ``names()`` is the next layer's name; layers without
    parameters (ReLU, pooling) take an index too and are passed over with ``names.skip()``."""

    def __init__(self, start: int = 0) -> None:
        self._index = start

    def __call__(self) -> str:
        name = str(self._index)
        self._index += 1
        return name

    def skip(self) -> None:
        self._index += 1


def deep_stem(h: jax.Array, conv: ConvDef, norm: NormDef, width: int, train: bool,
              names: SequentialNames) -> jax.Array:
    """The official ImageNet hosts' deep stem (ResNet-C): 3x3 stride-2 conv, BN, ReLU, 3x3
    conv, BN, ReLU, 3x3 conv to ``2 * width``, its children named by ``names`` (ReLUs take an
    index). (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), 2 * width); no BN after the last conv."""
    h = conv(width, 3, stride=2, padding=1, name=names())(h)
    h = nn.relu(norm(name=names())(h, train))
    names.skip()
    h = conv(width, 3, padding=1, name=names())(h)
    h = nn.relu(norm(name=names())(h, train))
    names.skip()
    return conv(width * 2, 3, padding=1, name=names())(h)


FusionOrder = Literal['paper', 'official']
FUSION_ORDERS: tuple[str, ...] = typing.get_args(FusionOrder)


def short_skip_pair(identity: jax.Array, residual: jax.Array,
                    fusion_order: FusionOrder) -> tuple[jax.Array, jax.Array]:
    """The ``(X, Y)`` a short skip hands its fusion.

    ``'paper'`` (section 4): X = the identity (shortcut), Y = the residual body's output, the
    map with the larger receptive field; so ``se`` is identity + G(residual) * residual, as in
    SENet. ``'official'``: ``(residual, identity)``, the argument order of the official MXNet
    code and the PyTorch port (``attention(x, residual)``), which their checkpoints need:
    it turns the one-sided schemes (``se``, ``gau``, ``highway``, ``sa``, ...) around and gives
    AFF's gate M the residual instead of the identity. ``add`` and ``concat`` do not care.
    """
    if fusion_order == 'paper':
        return identity, residual
    if fusion_order == 'official':
        return residual, identity
    raise ValueError(f'fusion_order must be one of {FUSION_ORDERS}, got {fusion_order!r}')


class Shortcut(nn.Module):
    """Projection shortcut ``(N, H, W, C_in) -> (N, ceil(H/stride), ceil(W/stride), features)``.

    ``avg_down`` (ResNet-D / the official models): ``AvgPool2D(stride, ceil_mode=True,
    count_include_pad=False)`` (child ``0``; identity for stride 1 but it still takes the index)
    then a stride-1 1x1 conv; otherwise a strided 1x1 conv. ``norm`` (None: no BatchNorm)
    adds a BatchNorm after.
    """
    features: int
    conv: ConvDef
    norm: NormDef | None
    stride: int = 1
    avg_down: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        names = SequentialNames()
        conv_stride = self.stride
        if self.avg_down:
            x = avg_pool_ceil(x, self.stride)
            names.skip()
            conv_stride = 1
        x = self.conv(self.features, 1, stride=conv_stride, name=names())(x)
        if self.norm is not None:
            x = self.norm(name=names())(x, train)
        return x


class Stage(nn.Module):
    """``num_blocks`` residual blocks named ``'0'``, ``'1'``, ...

    ``block(stride=..., downsample=..., name=...)`` builds one block; the first block gets
    ``stride`` and, when ``downsample``, the projection shortcut.
    """
    block: Callable[..., nn.Module]
    num_blocks: int
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(self.num_blocks):
            first = i == 0
            x = self.block(stride=self.stride if first else 1,
                           downsample=self.downsample and first, name=str(i))(x, train)
            # The gradient along the residual stream, stored once per block (on CPUs): else
            # XLA recomputes the chain of its sums inside every consumer (aff_jax.stored_once).
            x = stored_once.cotangent(x)
        return x


def fusion_def(host: Any, fusion: Callable[..., nn.Module] | None = None
               ) -> Callable[..., nn.Module]:
    """The fusion factory ``fusion`` (default ``host.fusion``) with ``host``'s ``dtype`` and
    ``param_dtype`` bound, as :func:`layer_defs` binds them for convs and BatchNorms: a fusion
    computes in its host's precision, also in a copy of the host made in another one
    (:func:`aff_jax.precision.with_dtype`)."""
    return functools.partial(host.fusion if fusion is None else fusion, dtype=host.dtype,
                             param_dtype=host.param_dtype)


def stage_fusion(host: Any, stage_index: int) -> Callable[..., nn.Module]:
    """The fusion of ``host``'s stage ``stage_index`` (1-based), by :func:`fusion_def`: the
    official hosts fuse by plain addition in stages before ``host.start_layer``."""
    return fusion_def(host, None if stage_index >= host.start_layer else fusion_lib.factory('add'))


class Scope(nn.Module):
    """A named container whose children ``body(*args)`` creates, numbered as the source
    framework's ``Sequential`` numbers them (Gluon's ``features``, PyTorch's stems).

    ``body`` must be a plain function (a closure), not a module method: flax attaches the
    modules a method creates to the method's own module instead of to this scope.
    """
    body: Callable[..., Any]

    @nn.compact
    def __call__(self, *args: Any) -> Any:
        return self.body(*args)
