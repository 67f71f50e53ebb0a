"""The torchvision-style AFF-ResNet family of the official PyTorch port
(``aff_pytorch/aff_net/aff_resnet.py``): ResNet-18/34/50/101/152, ResNeXt, Wide ResNet.

Module names equal the port's attribute names (``conv1``, ``layer1.0.fuse_mode.local_att.0``,
``downsample.0``, ``fc``), so its ``state_dict`` keys map one-to-one onto the flax variables.
The fusion replaces ``out += identity`` before the final ReLU; the port calls
``fuse_mode(out, identity)`` (``fusion_order='official'``, which its presets keep).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax.fusion import FusionFactory
from aff_jax.layers import StatsRule, check_nhwc, max_pool_3x3_s2
from aff_jax.models.features import head_or_features
from aff_jax.models.residual import (ConvDef, FusionOrder, NormDef, Shortcut, Stage, fusion_def,
                                     layer_defs, short_skip_pair)


class _Block(nn.Module):
    """BasicBlock (``bottleneck=False``: 3x3, 3x3) or Bottleneck (1x1, grouped 3x3 with the
    stride (ResNet V1.5), 1x1 expanding by 4), fused with the shortcut (``fuse_mode``, inputs
    ordered by ``fusion_order``, see :func:`aff_jax.models.residual.short_skip_pair`), ReLU.
    (N, H, W, C_in) -> (N, H/stride, W/stride, planes*expansion)."""
    planes: int
    fusion: FusionFactory
    conv: ConvDef
    norm: NormDef
    bottleneck: bool
    stride: int = 1
    downsample: bool = False
    groups: int = 1
    base_width: int = 64
    zero_init_last_bn: bool = False
    fusion_order: FusionOrder = 'paper'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv, norm = self.conv, self.norm
        last_scale = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        if self.bottleneck:
            width = int(self.planes * (self.base_width / 64.0)) * self.groups
            out_channels = self.planes * 4
            out = nn.relu(norm(name='bn1')(conv(width, 1, name='conv1')(x), train))
            out = conv(width, 3, stride=self.stride, padding=1, groups=self.groups, name='conv2')(out)
            out = nn.relu(norm(name='bn2')(out, train))
            out = conv(out_channels, 1, name='conv3')(out)
            out = norm(name='bn3', scale_init=last_scale)(out, train)
        else:
            if self.groups != 1 or self.base_width != 64:
                raise ValueError(f'BasicBlock only supports groups=1 and base_width=64, '
                                 f'got groups={self.groups}, base_width={self.base_width}')
            out_channels = self.planes
            out = conv(self.planes, 3, stride=self.stride, padding=1, name='conv1')(x)
            out = nn.relu(norm(name='bn1')(out, train))
            out = conv(self.planes, 3, padding=1, name='conv2')(out)
            out = norm(name='bn2', scale_init=last_scale)(out, train)
        identity = x
        if self.downsample:
            identity = Shortcut(out_channels, conv, norm, self.stride, name='downsample')(x, train)
        pair = short_skip_pair(identity, out, self.fusion_order)
        return nn.relu(self.fusion(name='fuse_mode')(*pair, train))


class TVResNet(nn.Module):
    """torchvision ResNet with a fusion at every short skip (``fusion_order`` as in
    :class:`_Block`). Input (N, H, W, 3) NHWC, output (N, num_classes) logits (at least
    float32), or with ``features_only`` the outputs of ``layer1`` .. ``layer4`` (reductions 4,
    8, 16, 32; 2, 4, 8, 16 with ``small_input``), ``out_indices`` picking some.

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
    fusion_order: FusionOrder = 'paper'
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
        conv, norm = layer_defs(self)
        fuse = fusion_def(self)
        x = x.astype(self.dtype)
        if self.small_input:
            x = conv(64, 3, padding=1, name='conv1')(x)
        else:
            x = conv(64, 7, stride=2, padding=3, name='conv1')(x)
        x = max_pool_3x3_s2(nn.relu(norm(name='bn1')(x, train)))
        expansion = 4 if self.bottleneck else 1
        in_channels = 64
        stages = []
        for i, (planes, num_blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
            stride = 1 if i == 0 else 2
            block = functools.partial(
                _Block, planes=planes, fusion=fuse, conv=conv, norm=norm,
                bottleneck=self.bottleneck, groups=self.groups, base_width=self.width_per_group,
                zero_init_last_bn=self.zero_init_last_bn, fusion_order=self.fusion_order)
            x = Stage(block, num_blocks, stride,
                      downsample=stride != 1 or in_channels != planes * expansion,
                      name=f'layer{i + 1}')(x, train)
            in_channels = planes * expansion
            stages.append(x)
        return head_or_features(self, stages)
