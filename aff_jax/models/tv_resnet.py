"""The torchvision-style AFF-ResNet family of the official PyTorch port
(``aff_pytorch/aff_net/aff_resnet.py``): ResNet-18/34/50/101/152, ResNeXt, Wide ResNet.

Module names equal the port's attribute names (``conv1``, ``layer1.0.fuse_mode.local_att.0``,
``downsample.0``, ``fc``), so its ``state_dict`` keys map one-to-one onto the flax variables.
The fusion replaces ``out += identity`` as ``fuse_mode(out, identity)`` before the final ReLU.
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
from aff_jax.models.residual import Shortcut, Stage

Dtype = Any


class _Block(nn.Module):
    """BasicBlock (``bottleneck=False``: 3x3, 3x3) or Bottleneck (1x1, grouped 3x3 with the
    stride (ResNet V1.5), 1x1 expanding by 4). (N, H, W, C_in) -> (N, H/stride, W/stride, planes*expansion)."""
    planes: int
    fusion: FusionFactory
    bottleneck: bool
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    zero_init_last_bn: bool = False
    stats_rule: StatsRule = 'torch'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(stats_rule=self.stats_rule, **kw)
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        if self.bottleneck:
            width = int(self.planes * (self.base_width / 64.0)) * self.groups
            out_channels = self.planes * 4
            out = nn.relu(BatchNorm(name='bn1', **bn)(conv2d(width, 1, name='conv1', **kw)(x), train))
            out = conv2d(width, 3, stride=self.stride, padding=1, groups=self.groups, name='conv2', **kw)(out)
            out = nn.relu(BatchNorm(name='bn2', **bn)(out, train))
            out = conv2d(out_channels, 1, name='conv3', **kw)(out)
            out = BatchNorm(name='bn3', scale_init=last_scale, **bn)(out, train)
        else:
            if self.groups != 1 or self.base_width != 64:
                raise ValueError(f'BasicBlock only supports groups=1 and base_width=64, '
                                 f'got groups={self.groups}, base_width={self.base_width}')
            out_channels = self.planes
            out = conv2d(self.planes, 3, stride=self.stride, padding=1, name='conv1', **kw)(x)
            out = nn.relu(BatchNorm(name='bn1', **bn)(out, train))
            out = conv2d(self.planes, 3, padding=1, name='conv2', **kw)(out)
            out = BatchNorm(name='bn2', scale_init=last_scale, **bn)(out, train)
        identity = x
        if self.downsample:
            identity = Shortcut(out_channels, self.stride, name='downsample', **bn)(x, train)
        return nn.relu(self.fusion(name='fuse_mode')(out, identity, train))


class TVResNet(nn.Module):
    """torchvision ResNet with a fusion at every short skip. Input (N, H, W, 3) NHWC, output
    (N, num_classes) float32 logits, or with ``features_only`` the outputs of ``layer1`` ..
    ``layer4`` (reductions 4, 8, 16, 32; 2, 4, 8, 16 with ``small_input``), ``out_indices``
    picking some.

    ``small_input`` replaces the 7x7 stride-2 stem by a 3x3 stride-1 one (the max-pool stays,
    as in the port).
    """
    layers: Sequence[int]
    fusion: FusionFactory
    bottleneck: bool = True
    num_classes: int = 1000
    groups: int = 1
    width_per_group: int = 64
    small_input: bool = False
    zero_init_last_bn: bool = False
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'torch'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'fc'

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f'layer{i + 1}' for i in range(len(self.layers)))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        if self.small_input:
            x = conv2d(64, 3, padding=1, name='conv1', **kw)(x)
        else:
            x = conv2d(64, 7, stride=2, padding=3, name='conv1', **kw)(x)
        x = nn.relu(BatchNorm(stats_rule=self.stats_rule, name='bn1', **kw)(x, train))
        x = max_pool_3x3_s2(x)
        expansion = 4 if self.bottleneck else 1
        in_channels = 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            stride = 1 if i == 0 else 2
            x = Stage(
                block=functools.partial(
                    _Block, planes=planes, fusion=self.fusion, bottleneck=self.bottleneck,
                    groups=self.groups, base_width=self.width_per_group,
                    zero_init_last_bn=self.zero_init_last_bn, stats_rule=self.stats_rule, **kw),
                num_blocks=num_blocks, stride=stride,
                downsample=stride != 1 or in_channels != planes * expansion,
                name=f'layer{i + 1}')(x, train)
            in_channels = planes * expansion
            stages.append(x)
        return head_or_features(self, stages)
