"""Model presets by name: ``create_model`` and ``list_models``.

Two families structurally identical to their source:

* the official open-aff (MXNet) presets, with Gluon's BatchNorm statistics rule and
  preprocessing, and the official fusion settings (AFF = ``ASKCFuse``, blend x2; iAFF =
  ``ResGlobLocaforGlobLocaChaFuse`` with its own second global context);
* the PyTorch-port presets ``tv_*``, with PyTorch's BatchNorm statistics rule and the port's
  quirks by default (AFF x2, r=4, iAFF reusing ``global_att``) so its checkpoints load and agree.

Both keep their source's short-skip argument order (``fusion_order='official'``: the fusion
sees (residual, identity)) so that their weights load; ``fusion_order='paper'`` overrides it.
The paper's own hosts, which have no official code (``cifar_inception_resnet20``, the
same-layer scenario, and the segmentation decoders' long skips), use the paper's roles of X and
Y and its AFF (factor 1).

Each preset also records its input preprocessing, as data, the way timm's pretrained configs do.

Segmentation models (``fpn``, ``unet``, ``fpn_resnet20``) are a decoder over any classification
preset built with ``features_only=True``; see :func:`create_model`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from aff_jax import fusion as fusion_lib
from aff_jax import module_fields
from aff_jax.long_skip import LongSkipFusion
from aff_jax.models.cifar_inception import CIFARInceptionResNet
from aff_jax.models.cifar_resnet import CIFARAFFResNet
from aff_jax.models.cifar_resnext import CIFARAFFResNeXt
from aff_jax.models.features import FeatureInfo
from aff_jax.models import features as features_lib
from aff_jax.models.fpn import FPN
from aff_jax.models.resnet import AFFResNet
from aff_jax.models.resnext import AFFResNeXt
from aff_jax.models.tv_resnet import TVResNet
from aff_jax.models.unet import UNet


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a preset's checkpoints expect their input: ``(pixel / pixel_scale - mean) / std``
    per RGB channel, at ``input_size``; evaluation resizes the shorter side to
    ``input_size / crop_pct`` and centre-crops."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_scale: float
    input_size: int
    crop_pct: float = 1.0


# train_cifar.py: ToTensor (0-1) then Normalize with these CIFAR statistics.
CIFAR_OFFICIAL = Preprocessing((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 255.0, 32)
# train_imagenet.py: 0-255 pixels normalised directly; validation crop ratio 0.875.
IMAGENET_OFFICIAL = Preprocessing((123.68, 116.779, 103.939), (58.393, 57.12, 57.375), 1.0, 224, 0.875)
# The port is torchvision's ResNet: torchvision's ImageNet statistics on 0-1 pixels.
IMAGENET_TORCHVISION = Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0, 224, 0.875)


@dataclasses.dataclass(frozen=True)
class Preset:
    host: Callable[..., nn.Module]
    fields: dict[str, Any]
    fusion: str
    r: int
    fusion_options: dict[str, dict[str, Any]]
    stats_rule: str
    preprocessing: Preprocessing


_OFFICIAL_FUSION = {'aff': {'scale': 2.0}}
_PORT_FUSION = {'aff': {'scale': 2.0}, 'iaff': {'reuse_global': True}}


def _official_presets() -> dict[str, Preset]:
    def official(host, fields, fusion, r, pre):
        return Preset(host, dict(fields, fusion_order='official'), fusion, r, _OFFICIAL_FUSION,
                      'gluon', pre)

    cifar = dict(layers=(5, 5, 5), channels=(64, 64, 128, 256), num_classes=100, start_layer=1,
                 freeze_input_stats=True)
    presets = {
        'cifar_resnet32': official(CIFARAFFResNet, cifar, 'add', 4, CIFAR_OFFICIAL),
        'cifar_aff_resnet32': official(CIFARAFFResNet, cifar, 'aff', 4, CIFAR_OFFICIAL),
        'cifar_iaff_resnet32': official(CIFARAFFResNet, cifar, 'iaff', 4, CIFAR_OFFICIAL),
    }
    for depth, blocks in ((38, 4), (47, 5)):
        presets[f'cifar_aff_resnext{depth}_32x4d'] = official(
            CIFARAFFResNeXt, dict(layers=(blocks,) * 3, channels=64, cardinality=32,
                                  bottleneck_width=4, num_classes=100, start_layer=1),
            'aff', 16, CIFAR_OFFICIAL)
    imagenet = dict(layers=(3, 4, 6, 3), num_classes=1000, start_layer=3)
    for fusion in ('aff', 'iaff'):
        presets[f'{fusion}_resnet50'] = official(AFFResNet, imagenet, fusion, 16, IMAGENET_OFFICIAL)
        presets[f'{fusion}_resnext50_32x4d'] = official(
            AFFResNeXt, dict(imagenet, cardinality=32, bottleneck_width=4), fusion, 16,
            IMAGENET_OFFICIAL)
    return presets


def _port_presets() -> dict[str, Preset]:
    specs = {
        'tv_resnet18': dict(bottleneck=False, layers=(2, 2, 2, 2)),
        'tv_resnet34': dict(bottleneck=False, layers=(3, 4, 6, 3)),
        'tv_resnet50': dict(layers=(3, 4, 6, 3)),
        'tv_resnet101': dict(layers=(3, 4, 23, 3)),
        'tv_resnet152': dict(layers=(3, 8, 36, 3)),
        'tv_resnext50_32x4d': dict(layers=(3, 4, 6, 3), groups=32, width_per_group=4),
        'tv_resnext101_32x8d': dict(layers=(3, 4, 23, 3), groups=32, width_per_group=8),
        'tv_wide_resnet50_2': dict(layers=(3, 4, 6, 3), width_per_group=128),
        'tv_wide_resnet101_2': dict(layers=(3, 4, 23, 3), width_per_group=128),
    }
    return {name: Preset(TVResNet, dict(num_classes=1000, fusion_order='official', **fields),
                         'aff', 4, _PORT_FUSION, 'torch', IMAGENET_TORCHVISION)
            for name, fields in specs.items()}


def _paper_presets() -> dict[str, Preset]:
    # The same-layer host: the CIFAR ResNet-20 layout with two-branch cells, AFF with the
    # paper's factor 1 (no fusion_options), r = 4, CIFAR-100.
    inception = dict(layers=(3, 3, 3), channels=(16, 16, 32, 64), num_classes=100)
    return {'cifar_inception_resnet20': Preset(CIFARInceptionResNet, inception, 'aff', 4, {},
                                               'gluon', CIFAR_OFFICIAL)}


_PRESETS: dict[str, Preset] = {**_official_presets(), **_port_presets(), **_paper_presets()}


@dataclasses.dataclass(frozen=True)
class SegmentationPreset:
    """A decoder over a features backbone: ``backbone`` None means the caller names it."""
    decoder: Callable[..., nn.Module]
    backbone: str | None
    backbone_fields: dict[str, Any]
    fields: dict[str, Any]
    num_classes: int = 2
    fusion: str = 'aff'


_SEGMENTATION: dict[str, SegmentationPreset] = {
    'fpn': SegmentationPreset(FPN, None, {}, {}),
    'unet': SegmentationPreset(UNet, None, {}, {}),
    # The paper's StopSign host: the CIFAR pre-activation ResNet-20 (3 blocks per stage,
    # widths 16-32-64, plain additive short skips) under an FPN; a short-skip fusion chosen by
    # backbone_fusion takes the paper's roles.
    'fpn_resnet20': SegmentationPreset(
        FPN, 'cifar_resnet32',
        dict(layers=(3, 3, 3), channels=(16, 16, 32, 64), fusion_order='paper',
             freeze_input_stats=False),
        dict(pyramid_channels=32)),
}
_BACKBONE_PREFIX = 'backbone_'


def list_models() -> list[str]:
    """Every model name ``create_model`` accepts: classifiers and segmentation models."""
    return sorted({**_PRESETS, **_SEGMENTATION})


def is_segmentation(name: str) -> bool:
    """Whether ``create_model(name)`` is a segmentation model ((N, H, W, K) logits)."""
    return name in _SEGMENTATION


def preset(name: str) -> Preset:
    """The classification preset ``name``: host class, its fields, default fusion and
    preprocessing."""
    if name in _SEGMENTATION:
        raise ValueError(f'{name!r} is a segmentation model: its preprocessing is that of its '
                         f'backbone, preset(backbone)')
    if name not in _PRESETS:
        raise ValueError(f'unknown model {name!r}; known: {", ".join(list_models())}')
    return _PRESETS[name]


def feature_info(name: str, **overrides: Any) -> list[FeatureInfo]:
    """Channels, reduction and source module of each output of
    ``create_model(name, features_only=True, **overrides)``, finest first."""
    return features_lib.feature_info(create_model(name, features_only=True, **overrides))


def create_model(name: str, num_classes: int | None = None,
                 fusion: str | fusion_lib.FusionFactory | None = None, dtype: Any = jnp.float32,
                 **overrides: Any) -> nn.Module:
    """Build the preset ``name``.

    ``fusion``: a name from ``aff_jax.fusion.names()`` (default: the preset's), used with the
    preset's reduction ``r`` and its settings for that scheme (e.g. AFF x2), or a factory
    (``fusion.factory(...)`` or any ``functools.partial`` of a fusion module) used as is.
    ``overrides``: any field of the host (``layers``, ``small_input``, ``start_layer``,
    ``channels``, ``zero_init_last_bn``, ``fusion_order``, ``param_dtype``, ``features_only``,
    ``out_indices``, ...), plus ``r``, ``fusion_options`` (a dict of fusion fields, e.g.
    ``{'scale': 1.0}``) and ``scheme_options`` (fusion fields per scheme name, e.g.
    ``{'sk': {'scale': 2.0}}``: the entry of the scheme in use applies, so one setting serves a
    sweep over fusions whose schemes take different fields; every entry is checked against its
    scheme). A scheme's fields: the preset's, then ``scheme_options``', then
    ``fusion_options``'. Unknown keys raise.

    Segmentation models: ``fusion`` (default ``'aff'``, the paper's factor 1), ``r``,
    ``fusion_options``, ``scheme_options`` and ``upsample`` are the decoder's long-skip settings, and
    ``pyramid_channels`` (FPN) or ``decoder_channels`` (U-Net) its widths; ``backbone`` names a
    classification preset (``fpn``, ``unet``); every other key goes to the backbone, and a
    ``backbone_`` prefix sends a key the decoder also has there (``backbone_fusion='iaff'``,
    ``backbone_r=8``).
    """
    if name in _SEGMENTATION:
        return _create_segmentation(name, num_classes, fusion, dtype, overrides)
    spec = preset(name)
    r_given = 'r' in overrides
    r = overrides.pop('r', spec.r)
    module_fields.check_value(r, int, f'model {name!r}', 'r')
    stats_rule = overrides.pop('stats_rule', spec.stats_rule)
    fusion_options = dict(overrides.pop('fusion_options', None) or {})
    scheme_options = overrides.pop('scheme_options', None)
    fields = dict(spec.fields, dtype=dtype, stats_rule=stats_rule,
                  **({} if num_classes is None else {'num_classes': num_classes}), **overrides)
    module_fields.check_fields(spec.host, fields, f'model {name!r}', reserved=('name', 'fusion'),
                               extra=('r', 'fusion_options', 'scheme_options'))
    defaults = dict(r=r, stats_rule=stats_rule, dtype=dtype,
                    param_dtype=fields.get('param_dtype', jnp.float32))
    fusion = _fusion_factory(spec.fusion if fusion is None else fusion, defaults,
                             spec.fusion_options, scheme_options, fusion_options, r_given)
    return spec.host(fusion=fusion, **fields)


def _fusion_factory(fusion: str | fusion_lib.FusionFactory, host_defaults: dict[str, Any],
                    preset_options: Mapping[str, Mapping[str, Any]],
                    scheme_options: Mapping[str, Mapping[str, Any]] | None,
                    fusion_options: Mapping[str, Any] | None,
                    r_given: bool) -> fusion_lib.FusionFactory:
    """The factory of a host's (or a decoder's) fusion, checked now. A name is built with
    ``host_defaults`` (r, stats_rule, dtypes) where the scheme has them, then the fields of
    ``preset_options``' entry for it, ``scheme_options``' entry and ``fusion_options``, each
    overriding the one before; a factory is used as is, so options, or an ``r`` the caller
    gave (``r_given``), raise rather than be ignored."""
    if not isinstance(fusion, str):
        if r_given:
            raise TypeError('r applies to a fusion given by name; a fusion factory carries its '
                            'own r')
        if fusion_options or scheme_options:
            raise TypeError('fusion_options and scheme_options apply to a fusion given by name, '
                            'not to a factory')
        return fusion
    fusion_lib.scheme(fusion)
    options = {**preset_options.get(fusion, {}),
               **_options_of(fusion, scheme_options, host_defaults), **(fusion_options or {})}
    return fusion_lib.factory(fusion, host_defaults, **options)


def _options_of(scheme: str, scheme_options: Mapping[str, Mapping[str, Any]] | None,
                host_defaults: dict[str, Any]) -> dict[str, Any]:
    """``scheme``'s entry of ``scheme_options`` (``{}`` if none), after checking every entry:
    an unknown scheme name raises a ValueError, a field its scheme lacks a TypeError."""
    scheme_options = dict(scheme_options or {})
    for name, options in scheme_options.items():
        if name not in fusion_lib.names():
            raise ValueError(f'scheme_options: unknown fusion {name!r}; known: '
                             f'{", ".join(fusion_lib.names())}')
        fusion_lib.factory(name, host_defaults, **options)
    return dict(scheme_options.get(scheme, {}))


def _create_segmentation(name: str, num_classes: int | None,
                         fusion: str | fusion_lib.FusionFactory | None, dtype: Any,
                         overrides: dict[str, Any]) -> nn.Module:
    spec = _SEGMENTATION[name]
    backbone = spec.backbone
    if backbone is None:
        backbone = overrides.pop('backbone', None)
        if backbone not in _PRESETS:
            raise ValueError(f'model {name!r} needs backbone=NAME, a classification model '
                             f'({", ".join(sorted(_PRESETS))}); got {backbone!r}')
    decoder_keys = set(spec.decoder.__dataclass_fields__) - {
        'parent', 'name', 'backbone', 'num_classes', 'long_skip', 'stats_rule', 'dtype'}
    fields = dict(spec.fields)
    skip_fields = {key: LongSkipFusion.__dataclass_fields__[key].default
                   for key in ('r', 'upsample', 'fusion_options')}
    scheme_options = overrides.pop('scheme_options', None)
    backbone_fields = dict(spec.backbone_fields)
    for key, value in overrides.items():
        if key in skip_fields:
            skip_fields[key] = value
        elif key in decoder_keys:
            fields[key] = value
        else:
            backbone_fields[key.removeprefix(_BACKBONE_PREFIX)] = value
    module_fields.check_fields(spec.decoder, fields, f'model {name!r}')
    module_fields.check_fields(LongSkipFusion, skip_fields, f'model {name!r}')
    if 'param_dtype' in fields:  # like dtype, it holds for the whole model
        backbone_fields.setdefault('param_dtype', fields['param_dtype'])
    backbone_fusion = backbone_fields.pop('fusion', None)
    features = create_model(backbone, fusion=backbone_fusion, dtype=dtype, features_only=True,
                            **backbone_fields)
    stats_rule = _PRESETS[backbone].stats_rule
    param_dtype = fields.get('param_dtype', jnp.float32)
    defaults = dict(r=skip_fields['r'], stats_rule=stats_rule, dtype=dtype,
                    param_dtype=param_dtype)
    skip_fusion = _fusion_factory(spec.fusion if fusion is None else fusion, defaults, {},
                                  scheme_options, skip_fields['fusion_options'], 'r' in overrides)
    skip = functools.partial(LongSkipFusion, fusion=skip_fusion,
                             upsample=skip_fields['upsample'], dtype=dtype,
                             param_dtype=param_dtype)
    return spec.decoder(backbone=features, long_skip=skip, stats_rule=stats_rule, dtype=dtype,
                        num_classes=spec.num_classes if num_classes is None else num_classes,
                        **fields)
