"""The official ImageNet ``AFFResNeXt`` (``model/classification.py``) and its block
``AFFResNeXtBlock`` (``model/block.py``), which the CIFAR ResNeXt host shares.

Names mirror the Gluon attributes: ``features.<i>`` (deep stem, BN, ReLU, max-pool, stages,
pool), ``body.<i>``, ``downsample.<i>``, ``attention``, ``output``.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax.fusion import FusionFactory
from aff_jax.layers import BatchNorm, StatsRule, check_nhwc, conv2d, max_pool_3x3_s2
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import Scope, Shortcut, Stage, stage_fusion

Dtype = Any


class ResNeXtBlock(nn.Module):
    """``AFFResNeXtBlock``: 1x1 -> grouped 3x3 (stride) -> 1x1 (x4), fused with the shortcut, ReLU.

    Group width ``cardinality * floor(channels * bottleneck_width / 64)``; output
    ``channels * 4``. (N, H, W, C_in) -> (N, H/stride, W/stride, 4 * channels).
    The official block initialises the last BN's gamma to zero when ``last_gamma`` is *False*
    (an inverted flag); ``zero_init_last_bn`` here means what it says.
    """
    channels: int
    cardinality: int
    bottleneck_width: int
    fusion: FusionFactory
    stride: int = 1
    downsample: bool = False
    avg_down: bool = True
    zero_init_last_bn: bool = False
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(stats_rule=self.stats_rule, **kw)
        group_width = self.cardinality * int(math.floor(self.channels * (self.bottleneck_width / 64)))
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones

        def body(h):
            h = conv2d(group_width, 1, name='0', **kw)(h)
            h = nn.relu(BatchNorm(name='1', **bn)(h, train))
            h = conv2d(group_width, 3, stride=self.stride, padding=1, groups=self.cardinality,
                       name='3', **kw)(h)
            h = nn.relu(BatchNorm(name='4', **bn)(h, train))
            h = conv2d(self.channels * 4, 1, name='6', **kw)(h)
            return BatchNorm(name='7', scale_init=last_scale, **bn)(h, train)

        out = Scope(body, name='body')(x)
        residual = x
        if self.downsample:
            residual = Shortcut(self.channels * 4, self.stride, avg_down=self.avg_down,
                                name='downsample', **bn)(x, train)
        return nn.relu(self.fusion(name='attention')(out, residual, train))


def resnext_stages(host: Any, x: jax.Array, train: bool, first_index: int,
                   first_avg_down: bool) -> list[jax.Array]:
    """The stages of both ResNeXt hosts, named by Gluon ``features`` indices from
    ``first_index`` on; returns each stage's output.

    Stage i (1-based) has base width ``host.channels * 2**(i-1)``, stride 1 then 2, and a
    projection shortcut on its first block (avg-down except, on ImageNet, in stage 1).
    """
    kw = dict(dtype=host.dtype, param_dtype=host.param_dtype)
    outputs = []
    for i, num_blocks in enumerate(host.layers):
        block = functools.partial(
            ResNeXtBlock, channels=host.channels * 2 ** i, cardinality=host.cardinality,
            bottleneck_width=host.bottleneck_width,
            fusion=stage_fusion(host.fusion, host.start_layer, i + 1, host.dtype, host.param_dtype),
            avg_down=first_avg_down or i > 0, zero_init_last_bn=host.zero_init_last_bn,
            stats_rule=host.stats_rule, **kw)
        x = Stage(block, num_blocks, 1 if i == 0 else 2, downsample=True,
                  name=str(first_index + i))(x, train)
        outputs.append(x)
    return outputs


class AFFResNeXt(nn.Module):
    """ImageNet ResNeXt with deep stem (3x3 convs: ``stem_width``, ``stem_width``,
    2 * ``stem_width``), max-pool, avg-down shortcuts from stage 2 on, fusion from
    ``start_layer`` on. Input (N, H, W, 3), output (N, num_classes) float32 logits, or with
    ``features_only`` the stage outputs (reductions 4, 8, 16, 32), ``out_indices`` picking
    some."""
    layers: Sequence[int]
    fusion: FusionFactory
    cardinality: int = 32
    bottleneck_width: int = 4
    num_classes: int = 1000
    start_layer: int = 3
    deep_stem: bool = True
    stem_width: int = 64
    channels: int = 64
    zero_init_last_bn: bool = False
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'output'

    def _first_stage(self) -> int:
        # features: the stem (deep: conv, BN, ReLU, conv, BN, ReLU, conv), BN, ReLU, max-pool.
        return (7 if self.deep_stem else 1) + 3

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f'features.{self._first_stage() + i}' for i in range(len(self.layers)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(stats_rule=self.stats_rule, **kw)

        def features(h):
            index = map(str, itertools.count())
            if self.deep_stem:
                h = conv2d(self.stem_width, 3, stride=2, padding=1, name=next(index), **kw)(h)
                h = nn.relu(BatchNorm(name=next(index), **bn)(h, train))
                next(index)
                h = conv2d(self.stem_width, 3, padding=1, name=next(index), **kw)(h)
                h = nn.relu(BatchNorm(name=next(index), **bn)(h, train))
                next(index)
                h = conv2d(self.stem_width * 2, 3, padding=1, name=next(index), **kw)(h)
            else:
                h = conv2d(64, 7, stride=2, padding=3, name=next(index), **kw)(h)
            h = nn.relu(BatchNorm(name=next(index), **bn)(h, train))
            next(index)
            h = max_pool_3x3_s2(h)
            return resnext_stages(self, h, train, self._first_stage(), first_avg_down=False)

        return head_or_features(self, Scope(features, name='features')(x.astype(self.dtype)))
