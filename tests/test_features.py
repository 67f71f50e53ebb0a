"""Backbone features: ``features_only`` models, ``feature_info``, and classifier weights
loading into them with the head left out (PyTorch, MXNet names, Orbax ``init_from``)."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax.interop import mxnet as aff_mx
from aff_jax.interop import torch as aff_torch
from aff_jax.interop.convert import save_variables
from aff_jax.models import feature_info, registry
from aff_jax.models.cifar_resnet import CIFARAFFResNet
from aff_jax.reference import torch_port as port
from aff_jax.training import pretrained
from test_torch_interop import images, nhwc, rel_err

CLASSIFIERS = [name for name in aff_jax.list_models() if not aff_jax.models.is_segmentation(name)]
SIZE = 64


def abstract_features(model, size=SIZE):
    """(features tuple of ShapeDtypeStructs, unboxed abstract variables) of ``model``."""
    out, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False),
        jnp.zeros((1, size, size, 3)))
    return out, flax.linen.unbox(variables)


def dotted_modules(variables):
    return {'.'.join(path[:-1]) for path in
            flax.traverse_util.flatten_dict(dict(variables['params']))}


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_features_match_feature_info(name):
    """Every classification preset: one map per stage, finest first, with the channels and
    reduction feature_info states; its module exists in the variables; no head."""
    model = aff_jax.create_model(name, features_only=True)
    info = feature_info(name)
    maps, variables = abstract_features(model)
    assert len(maps) == len(info) == len(registry.preset(name).fields['layers'])
    for feature, stage in zip(maps, info):
        assert feature.shape == (1, SIZE // stage.reduction, SIZE // stage.reduction,
                                 stage.channels)
    assert [i.reduction for i in info] == sorted(i.reduction for i in info)
    modules = dotted_modules(variables)
    for stage in info:
        assert any(m == stage.module or m.startswith(stage.module + '.') for m in modules), stage
    assert model.head not in variables['params']


def test_feature_info_of_known_hosts():
    assert [(i.channels, i.reduction, i.module) for i in feature_info('tv_resnet50')] == [
        (256, 4, 'layer1'), (512, 8, 'layer2'), (1024, 16, 'layer3'), (2048, 32, 'layer4')]
    assert [(i.channels, i.reduction) for i in feature_info('tv_resnet18', small_input=True)] == [
        (64, 2), (128, 4), (256, 8), (512, 16)]
    # Pre-activation CIFAR host: the last map is the one after the final BN-ReLU.
    assert [(i.channels, i.reduction, i.module) for i in feature_info('cifar_aff_resnet32')] == [
        (64, 1, 'features.2'), (128, 2, 'features.3'), (256, 4, 'features.5')]
    assert [i.module for i in feature_info('aff_resnext50_32x4d')] == [
        'features.10', 'features.11', 'features.12', 'features.13']
    assert [(i.channels, i.reduction, i.module) for i in feature_info(
        'cifar_inception_resnet20')] == [(16, 1, 'stage1'), (32, 2, 'stage2'), (64, 4, 'final_bn')]


def test_out_indices_pick_stages_and_bad_ones_are_named():
    model = aff_jax.create_model('tv_resnet18', features_only=True, out_indices=(1, 3))
    maps, _ = abstract_features(model)
    assert [m.shape[-1] for m in maps] == [128, 512]
    assert [i.module for i in feature_info('tv_resnet18', out_indices=(1, 3))] == ['layer2',
                                                                                     'layer4']
    for bad in ((3, 1), (4,), (), (1, 1)):
        with pytest.raises(ValueError, match='out_indices'):
            abstract_features(aff_jax.create_model('tv_resnet18', features_only=True,
                                                   out_indices=bad))


def test_tv_resnet50_stages_equal_the_port_layers():
    """Full-depth tv_resnet50 with AFF, one state_dict: our four maps vs the port's
    layer1..layer4 outputs in eval mode (the port run in float64).

    The attention BNs' random affine terms are scaled down to keep the gate logits moderate,
    as in a trained network: with them at full size the 16 doubling AFF blocks are chaotic
    (PyTorch's own float32 run drifts 1e-4 from its float64 run by layer3); scaled, its drift
    stays below 1e-6.
    """
    ref = port.randomize_(port.build_port('tv_resnet50', fusion='aff'), seed=7)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if 'fuse_mode' in name and isinstance(module, torch.nn.BatchNorm2d):
                module.weight.mul_(0.2)
                module.bias.mul_(0.2)
    model = aff_jax.create_model('tv_resnet50', fusion='aff', features_only=True)
    variables = aff_torch.from_state_dict(model, ref.state_dict())  # fc.* left out
    x = images((2, 3, 64, 64), seed=2)
    truth = ref.double().eval()
    with torch.no_grad():
        h = truth.maxpool(truth.relu(truth.bn1(truth.conv1(x.double()))))
        want = []
        for layer in (truth.layer1, truth.layer2, truth.layer3, truth.layer4):
            h = layer(h)
            want.append(h.numpy().transpose(0, 2, 3, 1))
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, nhwc(x))
    assert len(got) == 4
    for stage, (g, w) in enumerate(zip(got, want)):
        assert rel_err(g, w) <= 1e-5, f'layer{stage + 1}'


def classifier_stages(model, variables, x, name):
    """The stage maps of classifier ``model``, from its captured intermediates: each stage's
    output, and for the pre-activation CIFAR host the ReLU of the final BN."""
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=['intermediates'])
    captured = flax.traverse_util.flatten_dict(dict(state['intermediates']), sep='.')
    info = feature_info(name, **OVERRIDES[name])
    maps = [captured[f'{stage.module}.__call__'][0] for stage in info]
    if isinstance(model, CIFARAFFResNet):
        maps[-1] = jax.nn.relu(maps[-1])
    return maps


OVERRIDES = {
    'tv_resnet18': dict(layers=(1, 1, 1, 1), small_input=True),
    'cifar_aff_resnet32': dict(layers=(1, 1, 1), channels=(8, 8, 16, 32)),
    'iaff_resnext50_32x4d': dict(layers=(1, 1, 1, 1)),
}


def randomized(variables, seed):
    rng = np.random.default_rng(seed)

    def fill(path, a):
        if path[-1].key in ('var', 'scale'):
            return rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
        if path[-1].key == 'num_batches_tracked':
            return a
        return (rng.normal(size=a.shape) / np.sqrt(max(np.prod(a.shape[:-1]), 1))).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(fill, jax.tree.map(np.asarray, variables))


def random_variables(model, x, seed):
    """``model``'s variables for input ``x`` drawn by :func:`randomized` from their shapes:
    initialising op by op (threefry) would cost ~25 s per model."""
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return randomized(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                   flax.linen.unbox(abstract)), seed)


@pytest.mark.parametrize('name', sorted(OVERRIDES))
def test_classifier_weights_minus_head_load_into_the_features_model(name):
    """A classifier's exported weights (PyTorch keys for tv_*, Gluon names for the official
    presets) load into the features model with the head left out, and it computes the
    classifier's own stage maps."""
    classifier = aff_jax.create_model(name, num_classes=5, **OVERRIDES[name])
    features = aff_jax.create_model(name, features_only=True, **OVERRIDES[name])
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = random_variables(classifier, x, seed=1)
    if name.startswith('tv_'):
        exported = aff_torch.to_state_dict(classifier, variables)
        loaded = aff_torch.from_state_dict(features, exported)
        back = aff_torch.to_state_dict(features, loaded)
    else:
        exported = aff_mx.to_params(classifier, variables)
        loaded = aff_mx.from_params(features, exported)
        back = aff_mx.to_params(features, loaded)
    head = classifier.head + '.'
    assert any(k.startswith(head) for k in exported)
    assert sorted(back) == sorted(k for k in exported if not k.startswith(head))
    got = features.apply(loaded, x, train=False)
    want = classifier_stages(classifier, variables, x, name)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_features_model_is_still_strict_outside_the_head():
    classifier = aff_jax.create_model('tv_resnet18', layers=(1, 1, 1, 1), num_classes=3)
    features = aff_jax.create_model('tv_resnet18', layers=(1, 1, 1, 1), features_only=True)
    x = jnp.zeros((2, 32, 32, 3))
    sd = aff_torch.to_state_dict(classifier, random_variables(classifier, x, seed=0))
    del sd['layer2.0.bn1.running_var']
    sd['layer9.weight'] = np.zeros(3, np.float32)
    with pytest.raises(ValueError) as err:
        aff_torch.from_state_dict(features, sd)
    assert 'layer2.0.bn1.running_var' in str(err.value) and 'layer9.weight' in str(err.value)
    assert 'fc.weight' not in str(err.value)


def test_init_from_a_classifier_checkpoint_fills_a_segmentation_backbone(tmp_path):
    """Orbax init_from: a converted classifier checkpoint goes into the FPN's backbone (head
    dropped), the decoder stays fresh; a checkpoint of another backbone is named."""
    overrides = dict(layers=(1, 1, 1), channels=(8, 8, 16, 32))
    classifier = aff_jax.create_model('cifar_aff_resnet32', num_classes=10, **overrides)
    x = jnp.zeros((2, 32, 32, 3))
    saved = random_variables(classifier, x, seed=3)
    save_variables(str(tmp_path / 'ckpt'), saved)

    seg = aff_jax.create_model('fpn', backbone='cifar_aff_resnet32', num_classes=2, **overrides)
    fresh = random_variables(seg, x, seed=4)

    class State(flax.struct.PyTreeNode):
        params: dict
        batch_stats: dict

    def with_shardings(variables):
        state = jax.device_put(State(variables['params'], variables['batch_stats']))
        return state, jax.tree.map(lambda a: a.sharding, state)

    state, shardings = with_shardings(fresh)
    loaded = pretrained.apply_pretrained(state, str(tmp_path / 'ckpt'), (), shardings,
                                         into=('backbone',), drop=('output',))
    for collection in ('params', 'batch_stats'):
        ours = flax.traverse_util.flatten_dict(dict(getattr(loaded, collection)), sep='/')
        theirs = flax.traverse_util.flatten_dict(dict(saved[collection]), sep='/')
        start = flax.traverse_util.flatten_dict(dict(getattr(state, collection)), sep='/')
        for key, value in ours.items():
            if key.startswith('backbone/'):
                np.testing.assert_array_equal(value, theirs[key.removeprefix('backbone/')])
            else:
                np.testing.assert_array_equal(value, start[key])
    other = aff_jax.create_model('fpn', backbone='cifar_aff_resnet32', num_classes=2,
                                 layers=(1, 1, 1), channels=(8, 8, 16, 64))
    other_state, other_shardings = with_shardings(random_variables(other, x, seed=5))
    with pytest.raises(ValueError, match=r'mis-shaped \[.backbone/features'):
        pretrained.apply_pretrained(other_state, str(tmp_path / 'ckpt'), (), other_shardings,
                                    into=('backbone',), drop=('output',))
