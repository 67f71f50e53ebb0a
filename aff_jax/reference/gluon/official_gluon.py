"""Gluon (MXNet 1.x) models mirroring the official open-aff definitions.

Written for the MXNet parity tests and `python -m aff_jax.compare` from the published `model/fusion.py`, `model/block.py` and
`model/classification.py`: class names, constructor arguments, attribute names, the order in
which children are registered and the explicit prefixes follow them, so `save_parameters`
writes the official structural names (`features.3.0.attention.local_att.0.weight`) in the
official order. Only what the presets use is kept: BatchNorm as the norm layer, deep ImageNet
stems, no SE branch, no dilation, no dropout, no CIFAR deep stem, and no `last_gamma` choice
(it only picks an initialiser; the tests draw every weight themselves).

Imports mxnet: runs only under the dedicated venv's interpreter (mxnet==1.9.1, numpy<1.24),
as a sibling module of the scripts that use it (this directory on `sys.path`), never through
the `aff_jax` package. Arrays are NCHW.
"""
import math

from mxnet.gluon import HybridBlock, nn


def _attention_branch(prefix, channels, inter_channels, pooled):
    """MS-CAM context: [global average pool] -> 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN."""
    branch = nn.HybridSequential(prefix=prefix)
    if pooled:
        branch.add(nn.GlobalAvgPool2D())
    branch.add(nn.Conv2D(inter_channels, kernel_size=1, strides=1, padding=0),
               nn.BatchNorm(), nn.Activation('relu'),
               nn.Conv2D(channels, kernel_size=1, strides=1, padding=0), nn.BatchNorm())
    return branch


def _add_ms_cam(block, suffix, channels, inter_channels):
    """Register an MS-CAM's two branches on ``block`` (inside its ``name_scope``) as
    ``local_att<suffix>`` then ``global_att<suffix>``: the official attribute names, prefixes
    and registration order."""
    for kind, pooled in (('local', False), ('global', True)):
        name = f'{kind}_att{suffix}'
        setattr(block, name, _attention_branch(name, channels, inter_channels, pooled))


class DirectAddFuse(HybridBlock):
    """x + residual."""

    def hybrid_forward(self, F, x, residual):
        return x + residual


class ASKCFuse(HybridBlock):
    """AFF: 2 * (x * M + residual * (1 - M)), M = sigmoid(L(x + residual) + G(x + residual))."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        inter = int(channels // r)
        with self.name_scope():
            _add_ms_cam(self, '', channels, inter)
            self.sig = nn.HybridSequential(prefix='sig')
            self.sig.add(nn.Activation('sigmoid'))

    def hybrid_forward(self, F, x, residual):
        xa = x + residual
        wei = self.sig(F.broadcast_add(self.local_att(xa), self.global_att(xa)))
        return 2 * F.broadcast_mul(x, wei) + 2 * F.broadcast_mul(residual, 1 - wei)


class ResGlobLocaforGlobLocaChaFuse(HybridBlock):
    """iAFF: a first MS-CAM on x + residual mixes xi; a second, own MS-CAM on xi fuses."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        inter = int(channels // r)
        with self.name_scope():
            _add_ms_cam(self, '', channels, inter)
            _add_ms_cam(self, '2', channels, inter)
            self.sig1 = nn.Activation('sigmoid')
            self.sig2 = nn.Activation('sigmoid')

    def hybrid_forward(self, F, x, residual):
        xa = x + residual
        wei = self.sig1(F.broadcast_add(self.local_att(xa), self.global_att(xa)))
        xi = F.broadcast_mul(x, wei) + F.broadcast_mul(residual, 1 - wei)
        wei2 = self.sig2(F.broadcast_add(self.local_att2(xi), self.global_att2(xi)))
        return F.broadcast_mul(x, wei2) + F.broadcast_mul(residual, 1 - wei2)


_ATTENTIONAL_FUSIONS = {
    'ASKCFuse': ASKCFuse,
    'ResGlobLocaforGlobLocaCha': ResGlobLocaforGlobLocaChaFuse,
}


def _fusion(askc_type, channels, r):
    if askc_type == 'DirectAdd':
        return DirectAddFuse()
    if askc_type not in _ATTENTIONAL_FUSIONS:
        raise ValueError(f'unknown askc_type {askc_type!r}')
    return _ATTENTIONAL_FUSIONS[askc_type](channels=channels, r=r)


def _conv3x3(channels, stride, in_channels=0, groups=1):
    return nn.Conv2D(channels, kernel_size=3, strides=stride, padding=1, groups=groups,
                     use_bias=False, in_channels=in_channels)


def _conv1x1(channels, in_channels=0, stride=1):
    return nn.Conv2D(channels, kernel_size=1, strides=stride, use_bias=False,
                     in_channels=in_channels)


def _avg_pool(stride):
    return nn.AvgPool2D(pool_size=stride, strides=stride, ceil_mode=True,
                        count_include_pad=False)


class AFFResBlockV2(HybridBlock):
    """Pre-activation basic block; the fusion (r=4) joins the body and the shortcut."""

    def __init__(self, askc_type, channels, stride, downsample=False, in_channels=0, **kwargs):
        super().__init__(**kwargs)
        self.resfwd = nn.HybridSequential(prefix='resfwd')
        self.resfwd.add(nn.BatchNorm(), nn.Activation('relu'),
                        _conv3x3(channels, stride, in_channels),
                        nn.BatchNorm(), nn.Activation('relu'),
                        _conv3x3(channels, 1, channels))
        # Empty (an identity) unless the block changes width; kept as in the official block.
        self.downsample = nn.HybridSequential(prefix='downsample')
        if downsample:
            self.downsample.add(_avg_pool(stride), _conv1x1(channels, in_channels))
        self.attention = _fusion(askc_type, channels, r=4)

    def hybrid_forward(self, F, x):
        return self.attention(self.resfwd(x), self.downsample(x))


class AFFBottleneck(HybridBlock):
    """ResNetV1b bottleneck (stride on the 3x3); fusion (r=16) before the last ReLU."""

    expansion = 4

    def __init__(self, askc_type, planes, strides=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(planes)
        self.bn1 = nn.BatchNorm(in_channels=planes)
        self.conv2 = _conv3x3(planes, strides)
        self.bn2 = nn.BatchNorm(in_channels=planes)
        self.relu1 = nn.Activation('relu')
        self.relu2 = nn.Activation('relu')
        self.relu3 = nn.Activation('relu')
        self.conv3 = _conv1x1(planes * self.expansion)
        self.bn3 = nn.BatchNorm(in_channels=planes * self.expansion)
        self.downsample = downsample
        self.attention = _fusion(askc_type, planes * self.expansion, r=16)

    def hybrid_forward(self, F, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu3(self.attention(out, residual))


class AFFResNeXtBlock(HybridBlock):
    """ResNeXt bottleneck (grouped 3x3); fusion (r=16) before the last ReLU."""

    def __init__(self, askc_type, channels, cardinality, bottleneck_width, stride,
                 downsample=False, avg_down=True, **kwargs):
        super().__init__(**kwargs)
        group_width = cardinality * int(math.floor(channels * (bottleneck_width / 64)))
        self.body = nn.HybridSequential(prefix='')
        self.body.add(_conv1x1(group_width), nn.BatchNorm(), nn.Activation('relu'),
                      _conv3x3(group_width, stride, groups=cardinality), nn.BatchNorm(),
                      nn.Activation('relu'),
                      _conv1x1(channels * 4), nn.BatchNorm())
        if downsample:
            self.downsample = nn.HybridSequential(prefix='')
            if avg_down:
                self.downsample.add(_avg_pool(stride), _conv1x1(channels * 4))
            else:
                self.downsample.add(_conv1x1(channels * 4, stride=stride))
            self.downsample.add(nn.BatchNorm())
        else:
            self.downsample = None
        self.attention = _fusion(askc_type, channels * 4, r=16)

    def hybrid_forward(self, F, x):
        residual = x if self.downsample is None else self.downsample(x)
        return F.Activation(self.attention(self.body(x), residual), act_type='relu')


class CIFARAFFResNet(HybridBlock):
    """CIFAR pre-activation ResNet; `channels` = [stem, stage 1, stage 2, ...]."""

    def __init__(self, askc_type, start_layer, layers, channels, classes, **kwargs):
        super().__init__(**kwargs)
        if len(layers) != len(channels) - 1:
            raise ValueError(f'{len(layers)} stages need {len(layers) + 1} channels, '
                             f'got {channels}')
        with self.name_scope():
            self.features = nn.HybridSequential(prefix='')
            # Gluon keeps gamma (forced to 1) and beta (frozen at 0) of this BN in the file.
            self.features.add(nn.BatchNorm(scale=False, center=False))
            self.features.add(nn.Conv2D(channels[0], 3, 1, 1, use_bias=False))
            for i, num_layer in enumerate(layers):
                stage_askc = askc_type if i + 1 >= start_layer else 'DirectAdd'
                stage = nn.HybridSequential(prefix='stage%d_' % (i + 1))
                with stage.name_scope():
                    for b in range(num_layer):
                        in_channels = channels[i] if b == 0 else channels[i + 1]
                        stage.add(AFFResBlockV2(
                            stage_askc, channels[i + 1], stride=2 if i > 0 and b == 0 else 1,
                            downsample=in_channels != channels[i + 1], in_channels=in_channels))
                self.features.add(stage)
            self.features.add(nn.BatchNorm(), nn.Activation('relu'), nn.GlobalAvgPool2D(),
                              nn.Flatten())
            self.output = nn.Dense(classes, in_units=channels[-1])

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def _resnext_stages(features, askc_type, start_layer, layers, cardinality, bottleneck_width,
                    avg_down):
    """Append the ResNeXt stages (64, 128, ... bottleneck channels) to `features`.

    `avg_down(i)` says whether stage i (0-based) projects its shortcut through an average pool.
    """
    for i, num_layer in enumerate(layers):
        channels = 64 * 2 ** i
        stage_askc = askc_type if i + 1 >= start_layer else 'DirectAdd'
        stage = nn.HybridSequential(prefix='stage%d_' % (i + 1))
        with stage.name_scope():
            stage.add(AFFResNeXtBlock(stage_askc, channels, cardinality, bottleneck_width,
                                      1 if i == 0 else 2, True, avg_down=avg_down(i), prefix=''))
            for _ in range(num_layer - 1):
                stage.add(AFFResNeXtBlock(stage_askc, channels, cardinality, bottleneck_width,
                                          1, False, prefix=''))
        features.add(stage)


class CIFARAFFResNeXt(HybridBlock):
    """CIFAR ResNeXt: 3x3 stem of `channels[0]` (= 64), then ResNeXt stages."""

    def __init__(self, askc_type, start_layer, layers, channels, cardinality, bottleneck_width,
                 classes=10, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix='')
            self.features.add(nn.Conv2D(channels[0], 3, 1, 1, use_bias=False), nn.BatchNorm(),
                              nn.Activation('relu'))
            _resnext_stages(self.features, askc_type, start_layer, layers, cardinality,
                            bottleneck_width, avg_down=lambda i: True)
            self.features.add(nn.GlobalAvgPool2D())
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


def _deep_stem(block, stem_width):
    """Add conv3x3/2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3 (2x width) to `block`."""
    block.add(_conv3x3(stem_width, 2), nn.BatchNorm(), nn.Activation('relu'),
              _conv3x3(stem_width, 1), nn.BatchNorm(), nn.Activation('relu'),
              _conv3x3(stem_width * 2, 1))


class AFFResNet(HybridBlock):
    """ResNet-V1b (deep stem of width 32, average-pool shortcuts) with AFFBottleneck blocks."""

    def __init__(self, askc_type, start_layer, layers, classes=1000, stem_width=32):
        super().__init__(prefix='')
        if len(layers) != 4:
            raise ValueError(f'AFFResNet has 4 stages, got layers={layers}')
        self.inplanes = stem_width * 2
        with self.name_scope():
            self.conv1 = nn.HybridSequential(prefix='conv1')
            _deep_stem(self.conv1, stem_width)
            self.bn1 = nn.BatchNorm(in_channels=stem_width * 2)
            self.relu = nn.Activation('relu')
            self.maxpool = nn.MaxPool2D(pool_size=3, strides=2, padding=1)
            for i, blocks in enumerate(layers):
                setattr(self, 'layer%d' % (i + 1), self._make_layer(
                    askc_type if i + 1 >= start_layer else 'DirectAdd', i + 1, 64 * 2 ** i,
                    blocks, strides=1 if i == 0 else 2))
            self.avgpool = nn.GlobalAvgPool2D()
            self.flat = nn.Flatten()
            self.fc = nn.Dense(in_units=self.inplanes, units=classes)

    def _make_layer(self, askc_type, stage_index, planes, blocks, strides):
        out_planes = planes * AFFBottleneck.expansion
        downsample = None
        if strides != 1 or self.inplanes != out_planes:
            downsample = nn.HybridSequential(prefix='down%d_' % stage_index)
            with downsample.name_scope():
                downsample.add(_avg_pool(strides), _conv1x1(out_planes),
                               nn.BatchNorm(in_channels=out_planes))
        layer = nn.HybridSequential(prefix='layers%d_' % stage_index)
        with layer.name_scope():
            layer.add(AFFBottleneck(askc_type, planes, strides, downsample=downsample))
            self.inplanes = out_planes
            for _ in range(1, blocks):
                layer.add(AFFBottleneck(askc_type, planes))
        return layer

    def hybrid_forward(self, F, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, 'layer%d' % (i + 1))(x)
        return self.fc(self.flat(self.avgpool(x)))


class AFFResNeXt(HybridBlock):
    """ImageNet ResNeXt (deep stem of width 64, average-pool shortcuts after stage 1)."""

    def __init__(self, askc_type, start_layer, layers, cardinality, bottleneck_width,
                 classes=1000, stem_width=64, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential(prefix='')
            _deep_stem(self.features, stem_width)
            self.features.add(nn.BatchNorm(), nn.Activation('relu'), nn.MaxPool2D(3, 2, 1))
            _resnext_stages(self.features, askc_type, start_layer, layers, cardinality,
                            bottleneck_width, avg_down=lambda i: i > 0)
            self.features.add(nn.GlobalAvgPool2D())
            self.output = nn.Dense(classes)

    def hybrid_forward(self, F, x):
        return self.output(self.features(x))


_AFF, _IAFF = 'ASKCFuse', 'ResGlobLocaforGlobLocaCha'
_CIFAR_CHANNELS = [64, 64, 128, 256]

# aff_jax preset name -> (class, constructor arguments, default input size), as the official
# train_cifar.py / train_imagenet.py build them.
PRESETS = {
    'cifar_resnet32': (CIFARAFFResNet, dict(askc_type='DirectAdd', start_layer=1, layers=[5] * 3,
                                            channels=_CIFAR_CHANNELS, classes=100), 32),
    'cifar_aff_resnet32': (CIFARAFFResNet, dict(askc_type=_AFF, start_layer=1, layers=[5] * 3,
                                                channels=_CIFAR_CHANNELS, classes=100), 32),
    'cifar_iaff_resnet32': (CIFARAFFResNet, dict(askc_type=_IAFF, start_layer=1, layers=[5] * 3,
                                                 channels=_CIFAR_CHANNELS, classes=100), 32),
    'cifar_aff_resnext38_32x4d': (CIFARAFFResNeXt, dict(
        askc_type=_AFF, start_layer=1, layers=[4] * 3, channels=_CIFAR_CHANNELS,
        cardinality=32, bottleneck_width=4, classes=100), 32),
    'cifar_aff_resnext47_32x4d': (CIFARAFFResNeXt, dict(
        askc_type=_AFF, start_layer=1, layers=[5] * 3, channels=_CIFAR_CHANNELS,
        cardinality=32, bottleneck_width=4, classes=100), 32),
    'aff_resnet50': (AFFResNet, dict(askc_type=_AFF, start_layer=3, layers=[3, 4, 6, 3],
                                     classes=1000), 56),
    'iaff_resnet50': (AFFResNet, dict(askc_type=_IAFF, start_layer=3, layers=[3, 4, 6, 3],
                                      classes=1000), 56),
    'aff_resnext50_32x4d': (AFFResNeXt, dict(askc_type=_AFF, start_layer=3, layers=[3, 4, 6, 3],
                                             cardinality=32, bottleneck_width=4,
                                             classes=1000), 56),
    'iaff_resnext50_32x4d': (AFFResNeXt, dict(askc_type=_IAFF, start_layer=3,
                                              layers=[3, 4, 6, 3], cardinality=32,
                                              bottleneck_width=4, classes=1000), 56),
}


def build(preset, layers=None, classes=None):
    """The Gluon model of `preset`, uninitialised; `layers` (blocks per stage, e.g. [1, 1, 1])
    and `classes` replace the preset's."""
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
    cls, kwargs, _ = PRESETS[preset]
    if layers:
        if len(layers) != len(kwargs['layers']):
            raise ValueError(f'{preset} has {len(kwargs["layers"])} stages, got layers={layers}')
        kwargs = dict(kwargs, layers=list(layers))
    if classes:
        kwargs = dict(kwargs, classes=classes)
    return cls(**kwargs)
