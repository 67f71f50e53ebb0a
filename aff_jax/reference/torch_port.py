"""PyTorch reference of the open-aff PyTorch port (`aff_pytorch/aff_net/{fusion,aff_resnet}.py`).

Attribute names follow the port so `state_dict()` keys are identical to its checkpoints
(`layer1.0.fuse_mode.local_att.0.weight`, `layer2.0.downsample.1.running_var`, `fc.bias`, ...).
The port's quirks are kept on purpose, because the JAX `tv_*` presets must reproduce them:
AFF multiplies its output by 2, r defaults to 4, and iAFF's second stage calls `global_att`
again (its `global_att2` exists in the state_dict but never runs). The `small_input` stem is a
bias-free 3x3 stride-1 conv and the max-pool stays, as in the port.

Tensors are NCHW, as in PyTorch.
"""
import torch
from torch import nn


def attention_branch(channels, r, pooled):
    """1x1 conv C->C//r (bias) -> BN -> ReLU -> 1x1 conv C//r->C (bias) -> BN.

    With `pooled`, a global average pool comes first (index 0), so the output is (N, C, 1, 1)
    and broadcasts over H, W; otherwise it is the per-pixel (local) context.
    """
    inter = channels // r
    pool = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    return nn.Sequential(*pool,
                         nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(),
                         nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels))


class _MultiScaleGate(nn.Module):
    """Holds `local_att`, `global_att` and `sigmoid`; `gate(z)` = sigmoid(L(z) + G(z))."""

    def __init__(self, channels, r):
        super().__init__()
        self.local_att = attention_branch(channels, r, pooled=False)
        self.global_att = attention_branch(channels, r, pooled=True)
        self.sigmoid = nn.Sigmoid()

    def gate(self, z):
        return self.sigmoid(self.local_att(z) + self.global_att(z))


class MS_CAM(_MultiScaleGate):
    """x * M(x)."""

    def __init__(self, channels=64, r=4):
        super().__init__(channels, r)

    def forward(self, x):
        return x * self.gate(x)


class AFF(_MultiScaleGate):
    """2 * (M * x + (1 - M) * residual), M = M(x + residual); the factor 2 is the port's."""

    def __init__(self, channels=64, r=4):
        super().__init__(channels, r)

    def forward(self, x, residual):
        m = self.gate(x + residual)
        return 2 * x * m + 2 * residual * (1 - m)


class iAFF(nn.Module):
    """Two-stage AFF; the second gate uses `local_att2` but the FIRST `global_att` (port quirk)."""

    def __init__(self, channels=64, r=4):
        super().__init__()
        self.local_att = attention_branch(channels, r, pooled=False)
        self.global_att = attention_branch(channels, r, pooled=True)
        self.local_att2 = attention_branch(channels, r, pooled=False)
        self.global_att2 = attention_branch(channels, r, pooled=True)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x, residual):
        xa = x + residual
        m1 = self.sigmoid(self.local_att(xa) + self.global_att(xa))
        xi = x * m1 + residual * (1 - m1)
        m2 = self.sigmoid(self.local_att2(xi) + self.global_att(xi))
        return x * m2 + residual * (1 - m2)


class DAF(nn.Module):
    """x + residual."""

    def forward(self, x, residual):
        return x + residual


FUSE_TYPES = {'AFF': AFF, 'iAFF': iAFF, 'DAF': DAF}


def make_fuse(fuse_type, channels):
    if fuse_type not in FUSE_TYPES:
        raise ValueError(f'unknown fuse_type {fuse_type!r}; expected one of {sorted(FUSE_TYPES)}')
    return DAF() if fuse_type == 'DAF' else FUSE_TYPES[fuse_type](channels=channels)


def conv3x3(cin, cout, stride=1, groups=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 fuse_type='DAF'):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError('BasicBlock only supports groups=1 and base_width=64')
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.fuse_mode = make_fuse(fuse_type, planes)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.fuse_mode(out, identity))


class Bottleneck(nn.Module):
    """torchvision V1.5 bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 fuse_type='DAF'):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.fuse_mode = make_fuse(fuse_type, planes * self.expansion)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.fuse_mode(out, identity))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64,
                 fuse_type='DAF', small_input=False):
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.inplanes = 64
        if small_input:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, fuse_type)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, fuse_type)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, fuse_type)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, fuse_type)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride, fuse_type):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        stage = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                       fuse_type)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                        fuse_type=fuse_type) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (block, blocks per stage, groups, width_per_group), as the port's factory functions.
PRESETS = {
    'tv_resnet18': (BasicBlock, (2, 2, 2, 2), 1, 64),
    'tv_resnet34': (BasicBlock, (3, 4, 6, 3), 1, 64),
    'tv_resnet50': (Bottleneck, (3, 4, 6, 3), 1, 64),
    'tv_resnet101': (Bottleneck, (3, 4, 23, 3), 1, 64),
    'tv_resnet152': (Bottleneck, (3, 8, 36, 3), 1, 64),
    'tv_resnext50_32x4d': (Bottleneck, (3, 4, 6, 3), 32, 4),
    'tv_resnext101_32x8d': (Bottleneck, (3, 4, 23, 3), 32, 8),
    'tv_wide_resnet50_2': (Bottleneck, (3, 4, 6, 3), 1, 128),
    'tv_wide_resnet101_2': (Bottleneck, (3, 4, 23, 3), 1, 128),
}

# aff_jax fusion names of the tv_* presets -> the port's fuse_type.
FUSE_TYPE_OF = {'add': 'DAF', 'aff': 'AFF', 'iaff': 'iAFF'}


def build_port(name, fusion='aff', layers=None, num_classes=1000, small_input=False):
    """A port model by aff_jax preset name; `fusion` is an aff_jax name (add / aff / iaff)."""
    block, default_layers, groups, width = PRESETS[name]
    return ResNet(block, tuple(layers or default_layers), num_classes=num_classes, groups=groups,
                  width_per_group=width, fuse_type=FUSE_TYPE_OF[fusion], small_input=small_input)


@torch.no_grad()
def randomize_(module, seed):
    """Fills every conv / linear / BN of `module` with seeded random values, in place.

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) through deep stacks; BN gets
    random affine terms and non-trivial running statistics (random mean, positive random var,
    nonzero num_batches_tracked) so that eval-mode comparisons exercise every buffer.
    Returns `module`.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    def uniform(t, lo, hi):
        t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=gen))

    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            normal(m.weight, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                normal(m.bias, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            if m.affine:
                uniform(m.weight, 0.5, 1.5)
                normal(m.bias, 0.2)
            normal(m.running_mean, 0.2)
            uniform(m.running_var, 0.5, 1.5)
            m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
    return module
