"""Residual-network plumbing shared by the hosts: the projection shortcut and the stage container.

Both name their children as the source framework's ``Sequential`` numbers them, so a flax
variable path reads like the PyTorch ``state_dict`` key or the Gluon parameter name.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax import fusion as fusion_lib
from aff_jax.layers import BatchNorm, StatsRule, avg_pool_ceil, conv2d

Dtype = Any


class Shortcut(nn.Module):
    """Projection shortcut ``(N, H, W, C_in) -> (N, ceil(H/stride), ceil(W/stride), features)``.

    ``avg_down`` (ResNet-D / the official models): ``AvgPool2D(stride, ceil_mode=True,
    count_include_pad=False)`` (child ``0``; identity for stride 1 but it still takes the index)
    then a stride-1 1x1 conv; otherwise a strided 1x1 conv. ``norm`` adds a BatchNorm after.
    """
    features: int
    stride: int = 1
    avg_down: bool = False
    norm: bool = True
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        index, conv_stride = 0, self.stride
        if self.avg_down:
            x = avg_pool_ceil(x, self.stride)
            index, conv_stride = 1, 1
        x = conv2d(self.features, 1, stride=conv_stride, name=str(index), dtype=self.dtype,
                   param_dtype=self.param_dtype)(x)
        if self.norm:
            x = BatchNorm(stats_rule=self.stats_rule, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=str(index + 1))(x, train)
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
        return x


def stage_fusion(fusion: Callable[..., nn.Module], start_layer: int, stage_index: int,
                 dtype: Dtype, param_dtype: Dtype) -> Callable[..., nn.Module]:
    """The official hosts fuse by plain addition in stages before ``start_layer`` (1-based)."""
    if stage_index >= start_layer:
        return fusion
    return fusion_lib.factory('add', dtype=dtype, param_dtype=param_dtype)


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
