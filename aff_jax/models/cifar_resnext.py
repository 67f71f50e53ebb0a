"""The official CIFAR host ``CIFARAFFResNeXt`` (``model/classification.py``).

Names mirror the Gluon attributes: ``features.<i>`` (stem conv, BN, ReLU, stages, pool) and
``output``; blocks are :class:`aff_jax.models.resnext.ResNeXtBlock`.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.fusion import FusionFactory
from aff_jax.layers import StatsRule, check_nhwc
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import FusionOrder, Scope, SequentialNames, layer_defs
from aff_jax.models.resnext import resnext_stages


class CIFARAFFResNeXt(nn.Module):
    """CIFAR ResNeXt: 3x3 stem of ``channels`` (official 64), three stages of base width
    ``channels * 2**i`` (outputs 4x that), every first block with an avg-down projection
    (stage 1's pool has size 1); ``fusion_order`` as in
    :class:`aff_jax.models.resnext.ResNeXtBlock`. Input (N, H, W, 3), output
    (N, num_classes) logits (at least float32), or with ``features_only`` the stage outputs
    (reductions 1, 2, 4), ``out_indices`` picking some."""
    layers: Sequence[int]
    fusion: FusionFactory
    channels: int = 64
    cardinality: int = 32
    bottleneck_width: int = 4
    num_classes: int = 100
    start_layer: int = 1
    zero_init_last_bn: bool = False
    fusion_order: FusionOrder = 'paper'
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'output'
    _FIRST_STAGE = 3  # features: conv, BN, ReLU, then the stages

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f'features.{self._FIRST_STAGE + i}' for i in range(len(self.layers)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        conv, norm = layer_defs(self)

        def features(h):
            names = SequentialNames()
            h = conv(self.channels, 3, padding=1, name=names())(h)
            h = nn.relu(norm(name=names())(h, train))
            names.skip()
            return resnext_stages(self, h, train, conv, norm, names, first_avg_down=True)

        return head_or_features(self, Scope(features, name='features')(x.astype(self.dtype)))
