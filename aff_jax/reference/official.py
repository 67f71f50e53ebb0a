"""PyTorch translation of the official open-aff MXNet/Gluon models
(`model/fusion.py`, `model/block.py`, `model/classification.py`).

Attribute names and Sequential indices mirror the Gluon blocks (activations, pools and
flatten occupy indices as in Gluon), so a key here equals the Gluon structural parameter name
up to Gluon's BN naming (`gamma`/`beta` for `weight`/`bias`). Unlike the PyTorch port, the
official iAFF (`ResGlobLocaforGlobLocaChaFuse`) runs its own `global_att2` in the second stage.
Gluon BatchNorm uses eps 1e-5, like PyTorch's default. The CIFAR ResNet's input BN has
scale=False and center=False in Gluon: here `affine=False`, so it holds no trainable parameter.

Presets and their values come from train_cifar.py / train_imagenet.py and cmd_scripts.txt.
Tensors are NCHW.
"""
import math

from torch import nn

from aff_jax.reference.torch_port import attention_branch


class DirectAddFuse(nn.Module):
    """x + residual."""

    def forward(self, x, residual):
        return x + residual


class ASKCFuse(nn.Module):
    """AFF: 2 * (M * x + (1 - M) * residual), M = sigmoid(L(x + residual) + G(x + residual))."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        self.local_att = attention_branch(channels, r, pooled=False)
        self.global_att = attention_branch(channels, r, pooled=True)
        self.sig = nn.Sequential(nn.Sigmoid())

    def forward(self, x, residual):
        xa = x + residual
        m = self.sig(self.local_att(xa) + self.global_att(xa))
        return 2 * x * m + 2 * residual * (1 - m)


class ResGlobLocaforGlobLocaChaFuse(nn.Module):
    """iAFF: a first MS-CAM on x + residual gives xi; a second, independent one on xi fuses."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        self.local_att = attention_branch(channels, r, pooled=False)
        self.global_att = attention_branch(channels, r, pooled=True)
        self.local_att2 = attention_branch(channels, r, pooled=False)
        self.global_att2 = attention_branch(channels, r, pooled=True)
        self.sig1 = nn.Sigmoid()
        self.sig2 = nn.Sigmoid()

    def forward(self, x, residual):
        xa = x + residual
        m1 = self.sig1(self.local_att(xa) + self.global_att(xa))
        xi = x * m1 + residual * (1 - m1)
        m2 = self.sig2(self.local_att2(xi) + self.global_att2(xi))
        return x * m2 + residual * (1 - m2)


def make_attention(askc_type, channels, r):
    if askc_type == 'DirectAdd':
        return DirectAddFuse()
    if askc_type == 'ASKCFuse':
        return ASKCFuse(channels, r)
    if askc_type == 'ResGlobLocaforGlobLocaCha':
        return ResGlobLocaforGlobLocaChaFuse(channels, r)
    raise ValueError(f'unknown askc_type {askc_type!r}')


def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin, cout):
    return nn.Conv2d(cin, cout, 1, bias=False)


def avg_down(stride):
    """Gluon AvgPool2D(stride, stride, ceil_mode=True, count_include_pad=False)."""
    return nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)


class AFFResBlockV2(nn.Module):
    """Pre-activation basic block; no ReLU after the fusion. Fusion r is Gluon's default 4."""

    def __init__(self, askc_type, channels, stride, downsample, in_channels):
        super().__init__()
        self.resfwd = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(),
                                    conv3x3(in_channels, channels, stride),
                                    nn.BatchNorm2d(channels), nn.ReLU(),
                                    conv3x3(channels, channels))
        # Gluon keeps an (empty) downsample Sequential when there is no projection.
        self.downsample = nn.Sequential(*((avg_down(stride), conv1x1(in_channels, channels))
                                          if downsample else ()))
        self.attention = make_attention(askc_type, channels, r=4)

    def forward(self, x):
        residual = self.downsample(x) if len(self.downsample) else x
        return self.attention(self.resfwd(x), residual)


class AFFBottleneck(nn.Module):
    """ResNet V1b bottleneck (stride on the 3x3 conv), fusion with r=16, ReLU after the fusion."""
    expansion = 4

    def __init__(self, askc_type, inplanes, planes, strides=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, strides)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample
        self.attention = make_attention(askc_type, planes * 4, r=16)

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu3(self.attention(out, residual))


class AFFResNeXtBlock(nn.Module):
    """ResNeXt bottleneck (`body` indices 0..7), projection with optional avg-down, r=16."""

    def __init__(self, askc_type, in_channels, channels, cardinality, bottleneck_width, stride,
                 downsample, avg_down_proj=True):
        super().__init__()
        group_width = cardinality * int(math.floor(channels * (bottleneck_width / 64)))
        out = channels * 4
        self.body = nn.Sequential(conv1x1(in_channels, group_width), nn.BatchNorm2d(group_width),
                                  nn.ReLU(),
                                  conv3x3(group_width, group_width, stride, cardinality),
                                  nn.BatchNorm2d(group_width), nn.ReLU(),
                                  conv1x1(group_width, out), nn.BatchNorm2d(out))
        self.downsample = None
        if downsample:
            if avg_down_proj:
                proj = [avg_down(stride), conv1x1(in_channels, out)]
            else:
                proj = [nn.Conv2d(in_channels, out, 1, stride=stride, bias=False)]
            self.downsample = nn.Sequential(*proj, nn.BatchNorm2d(out))
        self.attention = make_attention(askc_type, out, r=16)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        return self.attention(self.body(x), residual).relu()


def _stage_type(askc_type, stage_index, start_layer):
    return askc_type if stage_index >= start_layer else 'DirectAdd'


class CIFARAFFResNet(nn.Module):
    """features: 0 input BN (affine-free), 1 conv3x3 (deep stem: 1-7, conv BN ReLU conv BN ReLU
    conv of widths C/2, C/2, C), then the stages, BN, ReLU, GAP, flatten."""

    def __init__(self, askc_type, start_layer, layers, channels, classes, deep_stem=False):
        super().__init__()
        if len(layers) != len(channels) - 1:
            raise ValueError(f'layers {layers} needs len(channels) - 1 entries, got {channels}')
        feats = [nn.BatchNorm2d(3, affine=False)]
        if deep_stem:
            half = channels[0] // 2
            feats += [conv3x3(3, half), nn.BatchNorm2d(half), nn.ReLU(),
                      conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(),
                      conv3x3(half, channels[0])]
        else:
            feats.append(conv3x3(3, channels[0]))
        in_ch = channels[0]
        for i, blocks in enumerate(layers):
            kind = _stage_type(askc_type, i + 1, start_layer)
            ch, stride = channels[i + 1], 1 if i == 0 else 2
            stage = [AFFResBlockV2(kind, ch, stride, ch != in_ch, in_ch)]
            stage += [AFFResBlockV2(kind, ch, 1, False, ch) for _ in range(blocks - 1)]
            feats.append(nn.Sequential(*stage))
            in_ch = ch
        feats += [nn.BatchNorm2d(in_ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*feats)
        self.output = nn.Linear(in_ch, classes)

    def forward(self, x):
        return self.output(self.features(x))


def _resnext_stages(askc_type, start_layer, layers, in_ch, cardinality, bottleneck_width,
                    first_stage_avg_down):
    """Stages of AFFResNeXtBlock, widths 64, 128, ...; returns (stages, output channels)."""
    stages, channels = [], 64
    for i, blocks in enumerate(layers):
        kind = _stage_type(askc_type, i + 1, start_layer)
        stride = 1 if i == 0 else 2
        avg = first_stage_avg_down if i == 0 else True
        stage = [AFFResNeXtBlock(kind, in_ch, channels, cardinality, bottleneck_width, stride,
                                 True, avg)]
        in_ch = channels * 4
        stage += [AFFResNeXtBlock(kind, in_ch, channels, cardinality, bottleneck_width, 1, False)
                  for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*stage))
        channels *= 2
    return stages, in_ch


class CIFARAFFResNeXt(nn.Module):
    """features: 0 conv3x3, 1 BN, 2 ReLU, 3.. stages (stage 1 projects with AvgPool(1)), GAP."""

    def __init__(self, askc_type, start_layer, layers, cardinality, bottleneck_width, classes):
        super().__init__()
        stages, out = _resnext_stages(askc_type, start_layer, layers, 64, cardinality,
                                      bottleneck_width, first_stage_avg_down=True)
        self.features = nn.Sequential(conv3x3(3, 64), nn.BatchNorm2d(64), nn.ReLU(), *stages,
                                      nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(out, classes)

    def forward(self, x):
        return self.output(self.features(x).flatten(1))


class AFFResNet(nn.Module):
    """ResNet V1b with deep stem 32 (conv1 = Sequential), avg-down projections in every stage
    (stage 1: AvgPool(1, 1)), fusion from stage `start_layer` on, DirectAdd before."""

    def __init__(self, askc_type, start_layer, layers, classes=1000, stem_width=32):
        super().__init__()
        self.conv1 = nn.Sequential(conv3x3(3, stem_width, 2), nn.BatchNorm2d(stem_width),
                                   nn.ReLU(), conv3x3(stem_width, stem_width),
                                   nn.BatchNorm2d(stem_width), nn.ReLU(),
                                   conv3x3(stem_width, stem_width * 2))
        self.bn1 = nn.BatchNorm2d(stem_width * 2)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = stem_width * 2
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            kind = _stage_type(askc_type, i + 1, start_layer)
            setattr(self, f'layer{i + 1}', self._make_layer(kind, planes, blocks, stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(512 * AFFBottleneck.expansion, classes)

    def _make_layer(self, kind, planes, blocks, strides):
        downsample = None
        if strides != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(avg_down(strides), conv1x1(self.inplanes, planes * 4),
                                       nn.BatchNorm2d(planes * 4))
        stage = [AFFBottleneck(kind, self.inplanes, planes, strides, downsample)]
        self.inplanes = planes * 4
        stage += [AFFBottleneck(kind, self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flat(self.avgpool(x)))


class AFFResNeXt(nn.Module):
    """features: 0-6 deep stem 64 (convs at 0, 3, 6), 7 BN, 8 ReLU, 9 max-pool, 10.. stages
    (stage 1 projects with a strided conv, later stages avg-down), then GAP."""

    def __init__(self, askc_type, start_layer, layers, cardinality, bottleneck_width,
                 classes=1000, stem_width=64):
        super().__init__()
        stages, out = _resnext_stages(askc_type, start_layer, layers, stem_width * 2, cardinality,
                                      bottleneck_width, first_stage_avg_down=False)
        self.features = nn.Sequential(
            conv3x3(3, stem_width, 2), nn.BatchNorm2d(stem_width), nn.ReLU(),
            conv3x3(stem_width, stem_width), nn.BatchNorm2d(stem_width), nn.ReLU(),
            conv3x3(stem_width, stem_width * 2), nn.BatchNorm2d(stem_width * 2), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1), *stages, nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(out, classes)

    def forward(self, x):
        return self.output(self.features(x).flatten(1))


_CIFAR_CHANNELS = (64, 64, 128, 256)  # channel_times 4 x (16, 16, 32, 64)

# name -> (class, constructor kwargs); askc_type, start_layer, layers, classes are overridable.
PRESETS = {
    'cifar_resnet32': (CIFARAFFResNet, dict(askc_type='DirectAdd', start_layer=1, layers=(5, 5, 5),
                                            channels=_CIFAR_CHANNELS, classes=100)),
    'cifar_aff_resnet32': (CIFARAFFResNet, dict(askc_type='ASKCFuse', start_layer=1,
                                                layers=(5, 5, 5), channels=_CIFAR_CHANNELS,
                                                classes=100)),
    'cifar_iaff_resnet32': (CIFARAFFResNet, dict(askc_type='ResGlobLocaforGlobLocaCha',
                                                 start_layer=1, layers=(5, 5, 5),
                                                 channels=_CIFAR_CHANNELS, classes=100)),
    'cifar_aff_resnext38_32x4d': (CIFARAFFResNeXt, dict(askc_type='ASKCFuse', start_layer=1,
                                                        layers=(4, 4, 4), cardinality=32,
                                                        bottleneck_width=4, classes=100)),
    'cifar_aff_resnext47_32x4d': (CIFARAFFResNeXt, dict(askc_type='ASKCFuse', start_layer=1,
                                                        layers=(5, 5, 5), cardinality=32,
                                                        bottleneck_width=4, classes=100)),
    'aff_resnet50': (AFFResNet, dict(askc_type='ASKCFuse', start_layer=3, layers=(3, 4, 6, 3),
                                     classes=1000)),
    'iaff_resnet50': (AFFResNet, dict(askc_type='ResGlobLocaforGlobLocaCha', start_layer=3,
                                      layers=(3, 4, 6, 3), classes=1000)),
    'aff_resnext50_32x4d': (AFFResNeXt, dict(askc_type='ASKCFuse', start_layer=3,
                                             layers=(3, 4, 6, 3), cardinality=32,
                                             bottleneck_width=4, classes=1000)),
    'iaff_resnext50_32x4d': (AFFResNeXt, dict(askc_type='ResGlobLocaforGlobLocaCha', start_layer=3,
                                              layers=(3, 4, 6, 3), cardinality=32,
                                              bottleneck_width=4, classes=1000)),
}

_OVERRIDABLE = ('askc_type', 'start_layer', 'layers', 'deep_stem')


def build_official(name, num_classes=None, **overrides):
    """The torch translation of official preset `name`; overrides: num_classes, askc_type,
    start_layer, layers, deep_stem (CIFAR ResNet only)."""
    cls, kwargs = PRESETS[name]
    bad = sorted(set(overrides) - set(_OVERRIDABLE))
    if bad:
        raise ValueError(f'cannot override {bad} of {name}; allowed: {_OVERRIDABLE}')
    kwargs = {**kwargs, **overrides}
    if num_classes is not None:
        kwargs['classes'] = num_classes
    return cls(**kwargs)


def count_trainable(module):
    """Number of trainable scalars (BN running statistics and affine-free BNs count nothing)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
