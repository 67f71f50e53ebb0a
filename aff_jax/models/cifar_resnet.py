"""The official CIFAR host ``CIFARAFFResNet`` (``model/classification.py``) with its
pre-activation block ``AFFResBlockV2`` (``model/block.py``).

Names mirror the Gluon attributes (``features.<i>``, ``resfwd.<i>``, ``downsample.<i>``,
``attention``, ``output``) so ``save_parameters`` names map one-to-one onto flax paths.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.fusion import FusionFactory
from aff_jax.layers import StatsRule, check_nhwc
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import (ConvDef, FusionOrder, NormDef, Scope, SequentialNames,
                                     Shortcut, Stage, layer_defs, short_skip_pair, stage_fusion)


class PreActBlock(nn.Module):
    """``AFFResBlockV2``: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 (``resfwd``), fused with the
    shortcut (``attention``, inputs ordered by ``fusion_order``, see
    :func:`aff_jax.models.residual.short_skip_pair`) and returned without a final activation.
    The projection shortcut (when the width changes) is avg-pool (ceil mode, padding excluded)
    + 1x1 conv, with no BatchNorm. (N, H, W, C_in) -> (N, H/stride, W/stride, channels)."""
    channels: int
    fusion: FusionFactory
    conv: ConvDef
    norm: NormDef
    stride: int = 1
    downsample: bool = False
    fusion_order: FusionOrder = 'paper'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        identity = x
        out = _PreActBody(self.channels, self.conv, self.norm, self.stride, name='resfwd')(x, train)
        if self.downsample:
            identity = Shortcut(self.channels, self.conv, None, self.stride, avg_down=True,
                                name='downsample')(identity, train)
        return self.fusion(name='attention')(*short_skip_pair(identity, out, self.fusion_order),
                                             train)


class _PreActBody(nn.Module):
    channels: int
    conv: ConvDef
    norm: NormDef
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        names = SequentialNames()
        x = nn.relu(self.norm(name=names())(x, train))
        names.skip()
        x = self.conv(self.channels, 3, stride=self.stride, padding=1, name=names())(x)
        x = nn.relu(self.norm(name=names())(x, train))
        names.skip()
        return self.conv(self.channels, 3, padding=1, name=names())(x)


class CIFARAFFResNet(nn.Module):
    """Pre-activation CIFAR ResNet with fusion in every block from stage ``start_layer`` on.

    ``channels``: stem width then one width per stage (official: 64, 64, 128, 256);
    ``layers``: blocks per stage. The input passes a BatchNorm without scale and shift first;
    ``freeze_input_stats=True`` never updates its running statistics (train mode still
    normalises with the batch's), as the official Gluon training does: MXNet updates them in
    the backward pass, which never runs for this parameter-free BN fed the data. The official
    presets set it; then evaluation normalises the input with the initial statistics (0, 1).
    ``fusion_order``: ``'paper'`` (X = identity, Y = residual) or ``'official'`` (the official
    code's order, which its presets keep so that their weights load); see
    :func:`aff_jax.models.residual.short_skip_pair`.
    Input (N, H, W, 3), output (N, num_classes) logits (at least float32), or with
    ``features_only`` the stage outputs (reductions 1, 2, 4 for three stages), ``out_indices``
    picking some. The last stage's output is taken after the final BN-ReLU
    (``features.<last>``), as timm does for pre-activation networks, so the features model holds
    every variable but the head.
    """
    layers: Sequence[int]
    channels: Sequence[int]
    fusion: FusionFactory
    num_classes: int = 100
    start_layer: int = 1
    deep_stem: bool = False
    freeze_input_stats: bool = False
    fusion_order: FusionOrder = 'paper'
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
    conv, norm = layer_defs(cfg)
    names = SequentialNames()
    x = norm(use_scale=False, use_bias=False, update_stats=not cfg.freeze_input_stats,
             name=names())(x, train)
    if cfg.deep_stem:
        stem = cfg.channels[0] // 2
        for width in (stem, stem):
            x = conv(width, 3, padding=1, name=names())(x)
            x = nn.relu(norm(name=names())(x, train))
            names.skip()
    x = conv(cfg.channels[0], 3, padding=1, name=names())(x)
    in_channels = cfg.channels[0]
    stages = []
    for i, (width, num_blocks) in enumerate(zip(cfg.channels[1:], cfg.layers)):
        block = functools.partial(PreActBlock, channels=width, fusion=stage_fusion(cfg, i + 1),
                                  conv=conv, norm=norm, fusion_order=cfg.fusion_order)
        x = Stage(block, num_blocks, 1 if i == 0 else 2, downsample=width != in_channels,
                  name=names())(x, train)
        stages.append(x)
        in_channels = width
    stages[-1] = nn.relu(norm(name=names())(x, train))
    return stages
