"""The official ImageNet ``AFFResNeXt`` (``model/classification.py``) and its block
``AFFResNeXtBlock`` (``model/block.py``), which the CIFAR ResNeXt host shares.

Names mirror the Gluon attributes: ``features.<i>`` (deep stem, BN, ReLU, max-pool, stages,
pool), ``body.<i>``, ``downsample.<i>``, ``attention``, ``output``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.fusion import FusionFactory
from aff_jax.layers import StatsRule, check_nhwc, max_pool_3x3_s2
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import (ConvDef, FusionOrder, NormDef, Scope, SequentialNames,
                                     Shortcut, Stage, deep_stem, layer_defs, short_skip_pair,
                                     stage_fusion)


class ResNeXtBlock(nn.Module):
    """``AFFResNeXtBlock``: 1x1 -> grouped 3x3 (stride) -> 1x1 (x4) (``body``), fused with the
    shortcut (``attention``, inputs ordered by ``fusion_order``, see
    :func:`aff_jax.models.residual.short_skip_pair`), ReLU.

    Group width ``cardinality * floor(channels * bottleneck_width / 64)``; output
    ``channels * 4``. (N, H, W, C_in) -> (N, H/stride, W/stride, 4 * channels).
    The official block initialises the last BN's gamma to zero when ``last_gamma`` is *False*
    (an inverted flag); ``zero_init_last_bn`` here means what it says.
    """
    channels: int
    cardinality: int
    bottleneck_width: int
    fusion: FusionFactory
    conv: ConvDef
    norm: NormDef
    stride: int = 1
    downsample: bool = False
    avg_down: bool = True
    zero_init_last_bn: bool = False
    fusion_order: FusionOrder = 'paper'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        group_width = self.cardinality * int(math.floor(self.channels * (self.bottleneck_width / 64)))
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones

        def body(h):
            names = SequentialNames()
            h = self.conv(group_width, 1, name=names())(h)
            h = nn.relu(self.norm(name=names())(h, train))
            names.skip()
            h = self.conv(group_width, 3, stride=self.stride, padding=1, groups=self.cardinality,
                          name=names())(h)
            h = nn.relu(self.norm(name=names())(h, train))
            names.skip()
            h = self.conv(self.channels * 4, 1, name=names())(h)
            return self.norm(name=names(), scale_init=last_scale)(h, train)

        out = Scope(body, name='body')(x)
        identity = x
        if self.downsample:
            identity = Shortcut(self.channels * 4, self.conv, self.norm, self.stride,
                                avg_down=self.avg_down, name='downsample')(x, train)
        pair = short_skip_pair(identity, out, self.fusion_order)
        return nn.relu(self.fusion(name='attention')(*pair, train))


def resnext_stages(host: Any, x: jax.Array, train: bool, conv: ConvDef, norm: NormDef,
                   names: SequentialNames, first_avg_down: bool) -> list[jax.Array]:
    """The stages of both ResNeXt hosts, built with the host's ``conv`` and ``norm`` and named
    by Gluon ``features`` indices drawn from ``names``; returns each stage's output.

    Stage i (1-based) has base width ``host.channels * 2**(i-1)``, stride 1 then 2, and a
    projection shortcut on its first block (avg-down except, on ImageNet, in stage 1).
    """
    outputs = []
    for i, num_blocks in enumerate(host.layers):
        block = functools.partial(
            ResNeXtBlock, channels=host.channels * 2 ** i, cardinality=host.cardinality,
            bottleneck_width=host.bottleneck_width, fusion=stage_fusion(host, i + 1),
            conv=conv, norm=norm, avg_down=first_avg_down or i > 0,
            zero_init_last_bn=host.zero_init_last_bn, fusion_order=host.fusion_order)
        x = Stage(block, num_blocks, 1 if i == 0 else 2, downsample=True, name=names())(x, train)
        outputs.append(x)
    return outputs


class AFFResNeXt(nn.Module):
    """ImageNet ResNeXt with deep stem (3x3 convs: ``stem_width``, ``stem_width``,
    2 * ``stem_width``), max-pool, avg-down shortcuts from stage 2 on, fusion from
    ``start_layer`` on (``fusion_order`` as in :class:`ResNeXtBlock`). Input (N, H, W, 3),
    output (N, num_classes) logits (at least float32), or with ``features_only`` the stage
    outputs (reductions 4, 8, 16, 32), ``out_indices`` picking some."""
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
    fusion_order: FusionOrder = 'paper'
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
        conv, norm = layer_defs(self)

        def features(h):
            names = SequentialNames()
            if self.deep_stem:
                h = deep_stem(h, conv, norm, self.stem_width, train, names)
            else:
                h = conv(64, 7, stride=2, padding=3, name=names())(h)
            h = nn.relu(norm(name=names())(h, train))
            names.skip()
            h = max_pool_3x3_s2(h)
            names.skip()
            return resnext_stages(self, h, train, conv, norm, names, first_avg_down=False)

        return head_or_features(self, Scope(features, name='features')(x.astype(self.dtype)))
