"""FPN segmentation model: a features backbone, a top-down pathway whose every long skip is a
:class:`aff_jax.LongSkipFusion` (any fusion scheme), and a per-pixel classifier.

The paper's long-skip scenario (Table 2, ``fpn_resnet20``): X = the backbone's lateral
(low-level) map, Y = the top-down (high-level) map; ``fusion='add'`` is the plain FPN.
Names: ``backbone`` (the features model's own tree, so a converted classifier loads into it),
``top`` (1x1 lateral of the coarsest stage), ``merge<i>`` (the long skip into stage i),
``smooth`` (3x3 conv-BN-ReLU on the finest merged map), ``classifier``.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.layers import StatsRule, check_nhwc, conv2d
from aff_jax.long_skip import LongSkipFusion
from aff_jax.models.decoder_blocks import ConvBNReLU, pixel_logits


class FPN(nn.Module):
    """Input (N, H, W, 3) NHWC; output (N, H, W, num_classes) logits (at least float32).

    ``backbone``: a ``features_only`` host returning its stage maps finest first.
    ``long_skip``: builds the long-skip step, ``long_skip(channels, name=...)``, e.g. a
    ``functools.partial`` of :class:`aff_jax.LongSkipFusion` fixing its fusion.
    ``pyramid_channels``: the width of every pyramid level.
    """
    backbone: nn.Module
    num_classes: int
    long_skip: Callable[..., LongSkipFusion] = LongSkipFusion
    pyramid_channels: int = 128
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_nhwc(x)
        features = self.backbone(x, train)
        pyramid = conv2d(self.pyramid_channels, 1, bias=True, dtype=self.dtype,
                         param_dtype=self.param_dtype, name='top')(features[-1])
        for i in reversed(range(len(features) - 1)):
            merge = self.long_skip(self.pyramid_channels, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f'merge{i}')
            pyramid = merge(features[i], pyramid, train)
        pyramid = ConvBNReLU(self.pyramid_channels, self.stats_rule, self.dtype, self.param_dtype,
                             name='smooth')(pyramid, train)
        return pixel_logits(self, pyramid, x.shape[1], x.shape[2])
