"""The model registry: names from API.md, errors on bad names, any fusion in any host.

Shapes only (`jax.eval_shape`), so no model is compiled or run.
"""
import ast
import functools
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aff_jax
from aff_jax import fusion

API_MODELS = {
    'cifar_resnet32', 'cifar_aff_resnet32', 'cifar_iaff_resnet32', 'cifar_aff_resnext38_32x4d',
    'cifar_aff_resnext47_32x4d', 'aff_resnet50', 'iaff_resnet50', 'aff_resnext50_32x4d',
    'iaff_resnext50_32x4d', 'tv_resnet18', 'tv_resnet34', 'tv_resnet50', 'tv_resnet101',
    'tv_resnet152', 'tv_resnext50_32x4d', 'tv_resnext101_32x8d', 'tv_wide_resnet50_2',
    'tv_wide_resnet101_2', 'cifar_inception_resnet20',
}
REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_WIDTHS = (64, 128, 256)  # one block per stage with layers=(1, 1, 1)


def shapes(model, batch=2, size=32):
    """(variable shapes, logits shape) of `model` on a (batch, size, size, 3) input."""
    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        return variables, model.apply(variables, x, train=False)
    variables, logits = jax.eval_shape(run, jnp.zeros((batch, size, size, 3)))
    return nn.unbox(variables), logits.shape


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def params_under(params, key):
    """Parameter count of every submodule called `key`, anywhere in the tree."""
    if not isinstance(params, dict):
        return 0
    return sum(count(v) if k == key else params_under(v, key) for k, v in params.items())


def scheme_params(name, channels, r):
    """Parameters of one bare `name` module fusing two (.., channels) maps."""
    kw = {} if name in ('add', 'concat') else {'r': r}
    x = jnp.zeros((2, 4, 4, channels))
    variables = jax.eval_shape(functools.partial(fusion.create(name, **kw).init, train=False),
                               jax.random.key(0), x, x)
    return count(nn.unbox(variables).get('params', {}))


def test_list_models_in_a_fresh_interpreter():
    out = subprocess.run([sys.executable, '-c', 'import aff_jax; print(aff_jax.list_models())'],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    listed = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert API_MODELS <= set(listed), sorted(API_MODELS - set(listed))


def test_unknown_model_name_is_named():
    with pytest.raises(ValueError, match='tv_resnet9000'):
        aff_jax.create_model('tv_resnet9000')


def test_unknown_fusion_is_named():
    with pytest.raises(ValueError, match='not_a_fusion'):
        aff_jax.create_model('cifar_resnet32', fusion='not_a_fusion')


def test_unknown_override_is_named():
    with pytest.raises((TypeError, ValueError), match='not_an_option'):
        aff_jax.create_model('tv_resnet18', not_an_option=3)


@pytest.mark.parametrize('name', sorted(fusion.names()))
def test_every_fusion_drops_into_the_cifar_host(name):
    """Each block's `attention` holds exactly one `name` module at the stage width, r=4."""
    model = aff_jax.create_model('cifar_resnet32', fusion=name, layers=(1, 1, 1))
    variables, logits = shapes(model)
    assert logits == (2, 100)
    want = sum(scheme_params(name, c, 4) for c in CIFAR_WIDTHS)
    assert params_under(variables['params'], 'attention') == want


@pytest.mark.parametrize('name', ['concat', 'sa', 'aff_local_local', 'iaff'])
def test_fusion_drops_into_a_bottleneck_host(name):
    """tv ResNet-50, one block per stage: `fuse_mode` at widths 256..2048, the preset's r=4."""
    variables, logits = shapes(aff_jax.create_model('tv_resnet50', fusion=name, num_classes=7,
                                                    layers=(1, 1, 1, 1), small_input=True))
    assert logits == (2, 7)
    want = sum(scheme_params(name, c, 4) for c in (256, 512, 1024, 2048))
    assert params_under(variables['params'], 'fuse_mode') == want


def test_overrides_r_num_classes_and_small_input():
    variables, logits = shapes(aff_jax.create_model('cifar_aff_resnet32', num_classes=10,
                                                    layers=(1, 1, 1), r=8))
    assert logits == (2, 10)
    assert params_under(variables['params'], 'attention') == sum(
        scheme_params('aff', c, 8) for c in CIFAR_WIDTHS)
    small, _ = shapes(aff_jax.create_model('tv_resnet18', layers=(1, 1, 1, 1), small_input=True))
    large, _ = shapes(aff_jax.create_model('tv_resnet18', layers=(1, 1, 1, 1)))
    assert small['params']['conv1']['kernel'].shape == (3, 3, 3, 64)
    assert large['params']['conv1']['kernel'].shape == (7, 7, 3, 64)


def test_stats_rule_override_reaches_host_and_fusion():
    """The Gluon-rule preset with the PyTorch rule: every BatchNorm, the fusion's included,
    keeps ``num_batches_tracked`` (it used to raise 'multiple values for stats_rule')."""
    model = aff_jax.create_model('cifar_aff_resnet32', layers=(1, 1, 1), stats_rule='torch')
    variables, _ = shapes(model)
    counters = [jax.tree_util.keystr(path) for path, _ in
                jax.tree_util.tree_leaves_with_path(variables['batch_stats'])
                if 'num_batches_tracked' in jax.tree_util.keystr(path)]
    assert any('attention' in c for c in counters) and any('attention' not in c for c in counters)


def test_r_with_a_fusion_factory_is_an_error_not_ignored():
    factory = fusion.factory('aff', {'r': 4, 'stats_rule': 'torch'})
    with pytest.raises(TypeError, match='r applies to a fusion given by name'):
        aff_jax.create_model('tv_resnet18', fusion=factory, r=8)
    with pytest.raises(TypeError, match='r applies to a fusion given by name'):
        aff_jax.create_model('fpn_resnet20', fusion=factory, r=8)  # the long skips' r
    with pytest.raises(TypeError, match='fusion_options and scheme_options apply'):
        aff_jax.create_model('fpn_resnet20', fusion=factory, scheme_options={'aff': {}})


def test_scheme_options_apply_to_the_scheme_in_use_and_are_all_checked():
    """``scheme_options={'sk': {'scale': 2}}`` gives ``sk`` the factor that ``fusion_options``
    gives it, leaves ``aff`` (the preset's own factor 2) and ``add`` as they are, yields to
    ``fusion_options``, reaches the long skips of a segmentation model, and checks entries of
    schemes not in use. (The factor's effect on the output: tests/test_fusion.py.)"""
    per_scheme = {'sk': {'scale': 2.0}, 'add': {}}

    def fuse(model_name, fusion, **kw):  # the module the host builds at every fusion point
        model = aff_jax.create_model(model_name, fusion=fusion, layers=(1, 1, 1), **kw)
        factory = (model.long_skip.keywords['fusion'] if model_name == 'fpn_resnet20'
                   else model.fusion)
        return factory(name='fuse')

    assert fuse('cifar_aff_resnet32', 'sk').scale == 1.0
    assert fuse('cifar_aff_resnet32', 'sk', scheme_options=per_scheme).scale == 2.0
    assert fuse('cifar_aff_resnet32', 'aff', scheme_options={'sk': {'scale': 3.0}}).scale == 2.0
    assert isinstance(fuse('cifar_aff_resnet32', 'add', scheme_options=per_scheme), fusion.Add)
    assert fuse('cifar_aff_resnet32', 'sk', scheme_options=per_scheme,
                fusion_options={'scale': 1.0}).scale == 1.0
    assert fuse('fpn_resnet20', 'sk', scheme_options=per_scheme).scale == 2.0
    with pytest.raises(ValueError, match="scheme_options: unknown fusion 'skk'"):
        aff_jax.create_model('cifar_aff_resnet32', fusion='aff', scheme_options={'skk': {}})
    with pytest.raises(TypeError, match=r"fusion 'add' has no option\(s\) \['scale'\]"):
        aff_jax.create_model('cifar_aff_resnet32', fusion='aff',
                             scheme_options={'add': {'scale': 2.0}})



@pytest.mark.parametrize('name, options, message', [
    # A command line's 'false' is a string, which a bool field would take as True.
    ('cifar_aff_resnet32', dict(freeze_input_stats='false'),
     "model 'cifar_aff_resnet32': option freeze_input_stats='false' (str) must be bool"),
    ('aff_resnet50', dict(deep_stem=1), "option deep_stem=1 (int) must be bool"),
    ('cifar_aff_resnet32', dict(layers=(1, 1.5, 1)),
     'option layers=(1, 1.5, 1) (tuple) must be Sequence[int]'),
    ('tv_resnet18', dict(layers='2222'), "option layers='2222' (str) must be Sequence"),
    ('cifar_aff_resnet32', dict(start_layer=True), "option start_layer=True (bool) must be int"),
    ('cifar_aff_resnet32', dict(fusion_order='offical'),
     "option fusion_order='offical' (str) must be Literal['paper', 'official']"),
    ('cifar_aff_resnet32', dict(stats_rule='tf'), "option stats_rule='tf'"),
    ('cifar_aff_resnet32', dict(r=4.0), "option r=4.0 (float) must be int"),
    ('cifar_resnet32', dict(r=2.5), "model 'cifar_resnet32': option r=2.5"),  # add has no r
    ('cifar_aff_resnet32', dict(fusion_options={'scale': '2'}),
     "fusion 'aff': option scale='2' (str) must be float"),
    ('fpn_resnet20', dict(pyramid_channels=32.0), "model 'fpn_resnet20': option pyramid_channels"),
    ('fpn_resnet20', dict(upsample=2), "model 'fpn_resnet20': option upsample=2 (int) must be str"),
])
def test_options_of_the_wrong_type_are_rejected_by_name(name, options, message):
    """create_model checks every option against its field's annotation: no value of the wrong
    type is passed on (e.g. the string 'false' to a bool field, which would read as True)."""
    with pytest.raises(TypeError, match=re.escape(message)):
        aff_jax.create_model(name, **options)


def test_options_of_the_right_type_pass_in_any_accepted_form():
    """Lists for sequences, numpy integers for ints, ints for floats: what configs and sweeps
    produce is not rejected."""
    model = aff_jax.create_model('cifar_aff_resnet32', layers=[1, 1, 1], r=np.int64(2),
                                 fusion_options={'scale': 2}, freeze_input_stats=np.bool_(False))
    assert model.layers == [1, 1, 1] and model.fusion(name='f').r == 2


def test_official_fusion_starts_at_start_layer():
    """aff_resnet50 fuses from stage 3 on: stages 1-2 hold no attention parameters."""
    variables, _ = shapes(aff_jax.create_model('aff_resnet50', layers=(1, 1, 1, 1)), size=64)
    params = variables['params']
    assert params_under(params['layer1'], 'attention') == 0
    assert params_under(params['layer2'], 'attention') == 0
    assert params_under(params['layer3'], 'attention') == scheme_params('aff', 1024, 16)
    assert params_under(params['layer4'], 'attention') == scheme_params('aff', 2048, 16)


def test_cifar_host_rejects_a_stride_two_stage_of_unchanged_width():
    model = aff_jax.create_model('cifar_aff_resnet32', layers=(1, 1, 1), channels=(8, 8, 16, 16))
    with pytest.raises(ValueError, match=r'stage 3 has stride 2 and must change the width'):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                       jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
