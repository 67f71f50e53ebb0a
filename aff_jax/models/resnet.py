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

from aff_jax.fusion import FusionFactory
from aff_jax.layers import BatchNorm, StatsRule, check_nhwc, conv2d, max_pool_3x3_s2
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import Scope, Shortcut, Stage, stage_fusion

Dtype = Any


class Bottleneck(nn.Module):
    """``AFFBottleneck`` (V1b: stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4), fused with the
    shortcut, ReLU. (N, H, W, C_in) -> (N, H/stride, W/stride, 4 * planes)."""
    planes: int
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
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        out = nn.relu(BatchNorm(name='bn1', **bn)(conv2d(self.planes, 1, name='conv1', **kw)(x), train))
        out = conv2d(self.planes, 3, stride=self.stride, padding=1, name='conv2', **kw)(out)
        out = nn.relu(BatchNorm(name='bn2', **bn)(out, train))
        out = conv2d(self.planes * 4, 1, name='conv3', **kw)(out)
        out = BatchNorm(name='bn3', scale_init=last_scale, **bn)(out, train)
        residual = x
        if self.downsample:
            residual = Shortcut(self.planes * 4, self.stride, avg_down=self.avg_down,
                                name='downsample', **bn)(x, train)
        return nn.relu(self.fusion(name='attention')(out, residual, train))


class AFFResNet(nn.Module):
    """ImageNet ResNet-V1b with deep stem (3x3 convs ``stem_width``, ``stem_width``,
    2 * ``stem_width``), avg-down projections (stage 1's pool has size 1) and fusion from
    ``start_layer`` on. Input (N, H, W, 3), output (N, num_classes) float32 logits, or with
    ``features_only`` the outputs of ``layer1`` .. ``layer4`` (reductions 4, 8, 16, 32),
    ``out_indices`` picking some."""
    layers: Sequence[int]
    fusion: FusionFactory
    num_classes: int = 1000
    start_layer: int = 3
    deep_stem: bool = True
    stem_width: int = 32
    avg_down: bool = True
    zero_init_last_bn: bool = False
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
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(stats_rule=self.stats_rule, **kw)
        x = x.astype(self.dtype)
        if self.deep_stem:
            def stem(h):
                h = conv2d(self.stem_width, 3, stride=2, padding=1, name='0', **kw)(h)
                h = nn.relu(BatchNorm(name='1', **bn)(h, train))
                h = conv2d(self.stem_width, 3, padding=1, name='3', **kw)(h)
                h = nn.relu(BatchNorm(name='4', **bn)(h, train))
                return conv2d(self.stem_width * 2, 3, padding=1, name='6', **kw)(h)
            x = Scope(stem, name='conv1')(x)
        else:
            x = conv2d(64, 7, stride=2, padding=3, name='conv1', **kw)(x)
        x = max_pool_3x3_s2(nn.relu(BatchNorm(name='bn1', **bn)(x, train)))
        in_channels = self.stem_width * 2 if self.deep_stem else 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            stride = 1 if i == 0 else 2
            block = functools.partial(
                Bottleneck, planes=planes, avg_down=self.avg_down,
                fusion=stage_fusion(self.fusion, self.start_layer, i + 1, self.dtype, self.param_dtype),
                zero_init_last_bn=self.zero_init_last_bn, stats_rule=self.stats_rule, **kw)
            x = Stage(block, num_blocks, stride, downsample=stride != 1 or in_channels != planes * 4,
                      name=f'layer{i + 1}')(x, train)
            in_channels = planes * 4
            stages.append(x)
        return head_or_features(self, stages)
