"""Pieces the segmentation decoders (``fpn.py``, ``unet.py``) share."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax import layers
from aff_jax.layers import BatchNorm, StatsRule, conv2d
from aff_jax.fusion import FusionFactory
from aff_jax.long_skip import LongSkipFusion, fusion_factory

Dtype = Any


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


def decoder_fusion(decoder: Any) -> FusionFactory:
    """The factory of a decoder's long-skip fusion, from its ``fusion``, ``r``,
    ``fusion_options``, ``stats_rule``, ``dtype`` and ``param_dtype`` (checked when built)."""
    return fusion_factory(decoder.fusion, decoder.r, decoder.fusion_options, decoder.stats_rule,
                          decoder.dtype, decoder.param_dtype)


def long_skip(decoder: Any, channels: int, name: str) -> LongSkipFusion:
    """The decoder's long-skip step at width ``channels``, with its fusion settings."""
    return LongSkipFusion(channels, decoder_fusion(decoder), upsample=decoder.upsample,
                          dtype=decoder.dtype, param_dtype=decoder.param_dtype, name=name)


def pixel_logits(decoder: Any, x: jax.Array, height: int, width: int) -> jax.Array:
    """Per-pixel class logits: a 1x1 conv with bias (child ``classifier``) on the decoder's
    finest map (N, h, w, C), bilinearly upsampled to (N, height, width, num_classes) float32."""
    logits = conv2d(decoder.num_classes, 1, bias=True, dtype=decoder.dtype,
                    param_dtype=decoder.param_dtype, name='classifier')(x)
    return layers.upsample(logits.astype(jnp.float32), height, width, 'bilinear')
