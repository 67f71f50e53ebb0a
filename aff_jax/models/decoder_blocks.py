"""Pieces the segmentation decoders (``fpn.py``, ``unet.py``) share."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax import layers, precision
from aff_jax.layers import BatchNorm, StatsRule, conv2d


class ConvBNReLU(nn.Module):
    """3x3 conv (no bias, padding 1) -> BatchNorm -> ReLU: (N, H, W, C) -> (N, H, W, features).
    Children ``0`` (conv) and ``1`` (BN), as a PyTorch ``Sequential`` numbers them."""
    features: int
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(self.features, 3, padding=1, name='0', **kw)(x)
        return nn.relu(BatchNorm(stats_rule=self.stats_rule, name='1', **kw)(x, train))


def pixel_logits(decoder: Any, x: jax.Array, height: int, width: int) -> jax.Array:
    """Per-pixel class logits: a 1x1 conv with bias (child ``classifier``) on the decoder's
    finest map (N, h, w, C), bilinearly upsampled to (N, height, width, num_classes), in at
    least float32."""
    logits = conv2d(decoder.num_classes, 1, bias=True, dtype=decoder.dtype,
                    param_dtype=decoder.param_dtype, name='classifier')(x)
    return layers.upsample(logits.astype(precision.at_least_float32(decoder.dtype)), height, width,
                           'bilinear')
