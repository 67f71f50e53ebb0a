"""The same-layer host (paper section 4, "same layer"; Table 2's InceptionNet on CIFAR-100,
r = 4): a pre-activation CIFAR ResNet whose every 3x3 conv is an Inception-style cell of two
parallel branches with different receptive fields, fused by any scheme of
``aff_jax.fusion.names()``.

As in the author's dilated two-branch cells, X is a 3x3 conv and Y a 3x3 conv with dilation 2
(a 5x5 receptive field at the cost of a 3x3), each followed by its own BatchNorm so that the
fusion sees two maps of comparable scale; in the paper's roles Y, the larger receptive field,
is the second argument of the fusion. The branch convs have no bias (the BatchNorm after them
cancels it).

Block structure, NHWC, ``h`` of shape (N, H, W, C_in), ``C`` the stage width, ``s`` its stride:

    cell(h, s)  = fuse(X, Y),   X = BN_x(conv3x3(h, stride s))                  (N, H/s, W/s, C)
                                Y = BN_y(conv3x3(h, stride s, dilation 2))      (N, H/s, W/s, C)
    body(h)     = cell2(ReLU(BN2(cell1(ReLU(BN1(h)), s))), 1)                    (N, H/s, W/s, C)
    block(h)    = shortcut(h) + body(h)                                          (N, H/s, W/s, C)

``shortcut`` is the identity, or a strided 1x1 conv (no BatchNorm) when the stride or the width
changes. The residual add stays a plain addition: the fusion under study is the one inside each
cell. Names: ``stem``, ``stage<i>.<j>`` with ``bn1``, ``cell1``, ``bn2``, ``cell2`` (each with
``conv_x``, ``bn_x``, ``conv_y``, ``bn_y``, ``fuse``) and ``downsample.0``, ``final_bn``, ``fc``.
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
from aff_jax.models.residual import ConvDef, NormDef, Shortcut, Stage, fusion_def, layer_defs


class TwoBranchCell(nn.Module):
    """``fuse(X, Y)`` of a 3x3 branch X (``conv_x``, ``bn_x``) and a 3x3 dilation-2 branch Y
    (``conv_y``, ``bn_y``) of the same input: (N, H, W, C_in) ->
    (N, ceil(H/stride), ceil(W/stride), features)."""
    features: int
    fusion: FusionFactory
    conv: ConvDef
    norm: NormDef
    stride: int = 1

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> jax.Array:
        # padding = dilation keeps both branches on the same output grid for any stride.
        x = self.conv(self.features, 3, stride=self.stride, padding=1, name='conv_x')(h)
        y = self.conv(self.features, 3, stride=self.stride, padding=2, dilation=2,
                      name='conv_y')(h)
        x = self.norm(name='bn_x')(x, train)
        y = self.norm(name='bn_y')(y, train)
        return self.fusion(name='fuse')(x, y, train)


class InceptionBlock(nn.Module):
    """Pre-activation residual block of two :class:`TwoBranchCell` (see the module docstring):
    (N, H, W, C_in) -> (N, ceil(H/stride), ceil(W/stride), channels)."""
    channels: int
    fusion: FusionFactory
    conv: ConvDef
    norm: NormDef
    stride: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cell = functools.partial(TwoBranchCell, self.channels, self.fusion, self.conv, self.norm)
        out = nn.relu(self.norm(name='bn1')(x, train))
        out = cell(self.stride, name='cell1')(out, train)
        out = nn.relu(self.norm(name='bn2')(out, train))
        out = cell(name='cell2')(out, train)
        identity = x
        if self.downsample:
            identity = Shortcut(self.channels, self.conv, None, self.stride,
                                name='downsample')(x, train)
        return identity + out


class CIFARInceptionResNet(nn.Module):
    """The same-layer host: 3x3 stem of ``channels[0]``, then one stage per entry of
    ``layers`` (blocks per stage) of width ``channels[i + 1]``, stride 1 then 2, final BN-ReLU,
    global average pool and a dense head. ``cifar_inception_resnet20``: layers (3, 3, 3),
    channels (16, 16, 32, 64), the CIFAR ResNet-20 layout (stem, 18 cells, head).

    Input (N, H, W, 3), output (N, num_classes) logits (at least float32), or with
    ``features_only`` the stage outputs (reductions 1, 2, 4 for three stages), ``out_indices``
    picking some; the last one is taken after the final BN-ReLU (``final_bn``), as for the
    other pre-activation host.
    """
    layers: Sequence[int]
    channels: Sequence[int]
    fusion: FusionFactory
    num_classes: int = 100
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    head = 'fc'

    def feature_modules(self) -> tuple[str, ...]:
        return tuple(f'stage{i + 1}' for i in range(len(self.layers) - 1)) + ('final_bn',)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> Any:
        check_nhwc(x)
        if len(self.channels) != len(self.layers) + 1:
            raise ValueError(f'channels needs a stem width plus one width per stage: '
                             f'{len(self.layers) + 1} values for layers={tuple(self.layers)}, '
                             f'got channels={tuple(self.channels)}')
        conv, norm = layer_defs(self)
        x = conv(self.channels[0], 3, padding=1, name='stem')(x.astype(self.dtype))
        stages = []
        for i, (width, num_blocks) in enumerate(zip(self.channels[1:], self.layers)):
            stride = 1 if i == 0 else 2
            block = functools.partial(InceptionBlock, channels=width, fusion=fusion_def(self),
                                      conv=conv, norm=norm)
            x = Stage(block, num_blocks, stride, downsample=stride != 1 or width != x.shape[-1],
                      name=f'stage{i + 1}')(x, train)
            stages.append(x)
        stages[-1] = nn.relu(norm(name='final_bn')(x, train))
        return head_or_features(self, stages)
