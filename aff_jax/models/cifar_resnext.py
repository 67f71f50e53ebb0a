"""The official CIFAR host ``CIFARAFFResNeXt`` (``model/classification.py``).

Names mirror the Gluon attributes: ``features.<i>`` (stem conv, BN, ReLU, stages, pool) and
``output``; blocks are :class:`aff_jax.models.resnext.ResNeXtBlock`.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax.fusion import FusionFactory
from aff_jax.layers import BatchNorm, StatsRule, check_nhwc, conv2d, dense, global_avg_pool
from aff_jax.models.residual import Scope
from aff_jax.models.resnext import resnext_stages

Dtype = Any


class CIFARAFFResNeXt(nn.Module):
    """CIFAR ResNeXt: 3x3 stem of ``channels`` (official 64), three stages of base width
    ``channels * 2**i`` (outputs 4x that), every first block with an avg-down projection
    (stage 1's pool has size 1). Input (N, H, W, 3), output (N, num_classes) float32 logits."""
    layers: Sequence[int]
    fusion: FusionFactory
    channels: int = 64
    cardinality: int = 32
    bottleneck_width: int = 4
    num_classes: int = 100
    start_layer: int = 1
    zero_init_last_bn: bool = False
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_nhwc(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def features(h):
            index = map(str, itertools.count())
            h = conv2d(self.channels, 3, padding=1, name=next(index), **kw)(h)
            h = nn.relu(BatchNorm(stats_rule=self.stats_rule, name=next(index), **kw)(h, train))
            next(index)
            h = resnext_stages(self, h, train, index, first_avg_down=True)
            return global_avg_pool(h, keepdims=False)

        x = Scope(features, name='features')(x.astype(self.dtype))
        return dense(self.num_classes, name='output', **kw)(x).astype(jnp.float32)
