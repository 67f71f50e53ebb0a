"""The official CIFAR host ``CIFARAFFResNet`` (``model/classification.py``) with its
pre-activation block ``AFFResBlockV2`` (``model/block.py``).

Names mirror the Gluon attributes (``features.<i>``, ``resfwd.<i>``, ``downsample.<i>``,
``attention``, ``output``) so ``save_parameters`` names map one-to-one onto flax paths.
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax.fusion import FusionFactory
from aff_jax.layers import BatchNorm, StatsRule, check_nhwc, conv2d
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import Scope, Shortcut, Stage, stage_fusion

Dtype = Any


class PreActBlock(nn.Module):
    """``AFFResBlockV2``: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, fused with the shortcut and
    returned without a final activation. The projection shortcut (when the width changes) is
    avg-pool (ceil mode, padding excluded) + 1x1 conv, with no BatchNorm.
    (N, H, W, C_in) -> (N, H/stride, W/stride, channels)."""
    channels: int
    fusion: FusionFactory
    stride: int = 1
    downsample: bool = False
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        x = _PreActBody(self.channels, self.stride, self.stats_rule, **kw, name='resfwd')(x, train)
        if self.downsample:
            residual = Shortcut(self.channels, self.stride, avg_down=True, norm=False,
                                stats_rule=self.stats_rule, name='downsample', **kw)(residual, train)
        return self.fusion(name='attention')(x, residual, train)


class _PreActBody(nn.Module):
    channels: int
    stride: int
    stats_rule: StatsRule
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(BatchNorm(stats_rule=self.stats_rule, name='0', **kw)(x, train))
        x = conv2d(self.channels, 3, stride=self.stride, padding=1, name='2', **kw)(x)
        x = nn.relu(BatchNorm(stats_rule=self.stats_rule, name='3', **kw)(x, train))
        return conv2d(self.channels, 3, padding=1, name='5', **kw)(x)


class CIFARAFFResNet(nn.Module):
    """Pre-activation CIFAR ResNet with fusion in every block from stage ``start_layer`` on.

    ``channels``: stem width then one width per stage (official: 64, 64, 128, 256);
    ``layers``: blocks per stage. The input passes a BatchNorm without scale and shift first.
    Input (N, H, W, 3), output (N, num_classes) float32 logits, or with ``features_only`` the
    stage outputs (reductions 1, 2, 4 for three stages), ``out_indices`` picking some. The
    last stage's output is taken after the final BN-ReLU (``features.<last>``), as timm does
    for pre-activation networks, so the features model holds every variable but the head.
    """
    layers: Sequence[int]
    channels: Sequence[int]
    fusion: FusionFactory
    num_classes: int = 100
    start_layer: int = 1
    deep_stem: bool = False
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'output'

    def _first_stage(self) -> int:
        # features: input BN, (deep stem: 2 x conv, BN, ReLU), stem conv, then the stages.
        return 1 + (6 if self.deep_stem else 0) + 1

    def feature_modules(self) -> tuple[str, ...]:
        first, last = self._first_stage(), len(self.layers) - 1
        return tuple(f'features.{first + i + (i == last)}' for i in range(len(self.layers)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        if len(self.channels) != len(self.layers) + 1:
            raise ValueError(f'channels needs a stem width plus one width per stage: '
                             f'{len(self.layers) + 1} values for layers={tuple(self.layers)}, '
                             f'got channels={tuple(self.channels)}')
        widths = tuple(self.channels)
        for stage in range(1, len(self.layers)):
            if widths[stage + 1] == widths[stage]:
                # The official block projects the shortcut only when the width changes, so a
                # stride-2 stage of unchanged width cannot add its shortcut.
                raise ValueError(f'channels={widths}: stage {stage + 1} has stride 2 and must '
                                 f'change the width, but keeps {widths[stage]}')
        stages = Scope(lambda h: _features(self, h, train), name='features')(x.astype(self.dtype))
        return head_or_features(self, stages)


def _features(cfg: CIFARAFFResNet, x: jax.Array, train: bool) -> list[jax.Array]:
    """Gluon's ``features`` up to its global pool: input BN, stem, stages, BN-ReLU. Returns
    the stage outputs, the last one after the BN-ReLU."""
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    bn = dict(stats_rule=cfg.stats_rule, **kw)
    index = map(str, itertools.count())
    x = BatchNorm(use_scale=False, use_bias=False, name=next(index), **bn)(x, train)
    if cfg.deep_stem:
        stem = cfg.channels[0] // 2
        for width in (stem, stem):
            x = conv2d(width, 3, padding=1, name=next(index), **kw)(x)
            x = nn.relu(BatchNorm(name=next(index), **bn)(x, train))
            next(index)
    x = conv2d(cfg.channels[0], 3, padding=1, name=next(index), **kw)(x)
    first = cfg._first_stage()
    in_channels = cfg.channels[0]
    stages = []
    for i, (width, num_blocks) in enumerate(zip(cfg.channels[1:], cfg.layers)):
        stride = 1 if i == 0 else 2
        block = functools.partial(
            PreActBlock, channels=width, stats_rule=cfg.stats_rule,
            fusion=stage_fusion(cfg.fusion, cfg.start_layer, i + 1, cfg.dtype, cfg.param_dtype), **kw)
        x = Stage(block, num_blocks, stride, downsample=width != in_channels,
                  name=str(first + i))(x, train)
        stages.append(x)
        in_channels = width
    stages[-1] = nn.relu(BatchNorm(name=str(first + len(cfg.layers)), **bn)(x, train))
    return stages
