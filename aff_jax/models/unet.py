"""U-Net style segmentation model: a features backbone and a decoder that, from the coarsest
stage down, fuses the upsampled decoder map (Y, high-level) with the backbone's skip map
(X, low-level) by a :class:`aff_jax.LongSkipFusion`, then refines with a 3x3 conv-BN-ReLU.

Names: ``backbone``, ``merge<i>`` and ``block<i>`` (the long skip into stage i and its
conv-BN-ReLU), ``classifier``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.layers import StatsRule, check_nhwc
from aff_jax.long_skip import LongSkipFusion
from aff_jax.models.decoder_blocks import ConvBNReLU, pixel_logits

DEFAULT_MAX_WIDTH = 256


class UNet(nn.Module):
    """Input (N, H, W, 3) NHWC; output (N, H, W, num_classes) logits (at least float32).

    ``long_skip``: builds the long-skip step, ``long_skip(channels, name=...)`` (see
    :class:`FPN`). ``decoder_channels``: the decoder's width at each backbone stage but the
    coarsest, finest first (``len(stages) - 1`` values); default: each stage's own width, at
    most 256.
    """
    backbone: nn.Module
    num_classes: int
    long_skip: Callable[..., LongSkipFusion] = LongSkipFusion
    decoder_channels: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_nhwc(x)
        features = self.backbone(x, train)
        widths = self.decoder_channels
        if widths is None:
            widths = [min(f.shape[-1], DEFAULT_MAX_WIDTH) for f in features[:-1]]
        if len(widths) != len(features) - 1:
            raise ValueError(f'decoder_channels needs {len(features) - 1} widths (one per '
                             f'backbone stage but the coarsest), got {tuple(widths)}')
        y = features[-1]
        for i in reversed(range(len(features) - 1)):
            y = self.long_skip(widths[i], dtype=self.dtype, param_dtype=self.param_dtype,
                               name=f'merge{i}')(features[i], y, train)
            y = ConvBNReLU(widths[i], self.stats_rule, self.dtype, self.param_dtype,
                           name=f'block{i}')(y, train)
        return pixel_logits(self, y, x.shape[1], x.shape[2])
