"""The official ImageNet ``AFFResNet`` (ResNet V1b body, ``model/classification.py``) and its
block ``AFFBottleneck`` (``model/block.py``).

Names mirror the Gluon attributes: ``conv1.<i>`` (deep stem), ``bn1``, ``layer<k>.<j>`` with
``conv1..3``, ``bn1..3``, ``downsample.<i>``, ``attention``, and ``fc``.
"""
from __future__ import annotations

import functools
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


class Bottleneck(nn.Module):
    """``AFFBottleneck`` (V1b: stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4), fused with the
    shortcut (``attention``, inputs ordered by ``fusion_order``, see
    :func:`aff_jax.models.residual.short_skip_pair`), ReLU.
    (N, H, W, C_in) -> (N, H/stride, W/stride, 4 * planes)."""
    planes: int
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
        conv, norm = self.conv, self.norm
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        out = nn.relu(norm(name='bn1')(conv(self.planes, 1, name='conv1')(x), train))
        out = conv(self.planes, 3, stride=self.stride, padding=1, name='conv2')(out)
        out = nn.relu(norm(name='bn2')(out, train))
        out = conv(self.planes * 4, 1, name='conv3')(out)
        out = norm(name='bn3', scale_init=last_scale)(out, train)
        identity = x
        if self.downsample:
            identity = Shortcut(self.planes * 4, conv, norm, self.stride, avg_down=self.avg_down,
                                name='downsample')(x, train)
        pair = short_skip_pair(identity, out, self.fusion_order)
        return nn.relu(self.fusion(name='attention')(*pair, train))


class AFFResNet(nn.Module):
    """ImageNet ResNet-V1b with deep stem (3x3 convs ``stem_width``, ``stem_width``,
    2 * ``stem_width``), avg-down projections (stage 1's pool has size 1) and fusion from
    ``start_layer`` on (``fusion_order`` as in :class:`Bottleneck`). Input (N, H, W, 3),
    output (N, num_classes) logits (at least float32), or with ``features_only`` the outputs of
    ``layer1`` .. ``layer4`` (reductions 4, 8, 16, 32), ``out_indices`` picking some."""
    layers: Sequence[int]
    fusion: FusionFactory
    num_classes: int = 1000
    start_layer: int = 3
    deep_stem: bool = True
    stem_width: int = 32
    avg_down: bool = True
    zero_init_last_bn: bool = False
    fusion_order: FusionOrder = 'paper'
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'fc'

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f'layer{i + 1}' for i in range(len(self.layers)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        conv, norm = layer_defs(self)
        x = x.astype(self.dtype)
        if self.deep_stem:
            def stem(h):
                return deep_stem(h, conv, norm, self.stem_width, train, SequentialNames())
            x = Scope(stem, name='conv1')(x)
        else:
            x = conv(64, 7, stride=2, padding=3, name='conv1')(x)
        x = max_pool_3x3_s2(nn.relu(norm(name='bn1')(x, train)))
        in_channels = self.stem_width * 2 if self.deep_stem else 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            stride = 1 if i == 0 else 2
            block = functools.partial(
                Bottleneck, planes=planes, fusion=stage_fusion(self, i + 1), conv=conv, norm=norm,
                avg_down=self.avg_down, zero_init_last_bn=self.zero_init_last_bn,
                fusion_order=self.fusion_order)
            x = Stage(block, num_blocks, stride, downsample=stride != 1 or in_channels != planes * 4,
                      name=f'layer{i + 1}')(x, train)
            in_channels = planes * 4
            stages.append(x)
        return head_or_features(self, stages)
