"""The paper's roles of X and Y (section 4; API.md "Paper roles of X and Y") in every host.

Y is the map with the larger receptive field: short skip X = identity, Y = residual; long skip
X = low-level, Y = high-level; same layer X = small kernel, Y = large kernel. Each test traces a
small host (``jax.eval_shape``, nothing is computed) under a method interceptor that records
every module call's inputs and output, and checks that the two inputs of each fusion module are
the very arrays the host made for the identity and the residual branch (or the lateral and the
upsampled top-down map, or the two branches): object identity, stronger than equal values.
The one-sided schemes are those the order matters for.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import aff_jax
from aff_jax import fusion, layers

ONE_SIDED = ['se', 'gau', 'highway', 'sa', 'ms_se', 'ms_gau', 'ms_sa', 'ms_modulate_sum',
             'ms_refine_sum']
IMAGE = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

# family: (preset, overrides, the block child whose output is the residual branch). Each small
# host fuses in a block with a plain identity and in one with a projection shortcut.
SHORT_SKIP = {
    'cifar_resnet': ('cifar_aff_resnet32', dict(layers=(1, 1), channels=(4, 4, 8)), 'resfwd'),
    'cifar_resnext': ('cifar_aff_resnext38_32x4d',
                      dict(layers=(2,), channels=4, cardinality=2, bottleneck_width=64),
                      'body'),
    'imagenet_resnet': ('aff_resnet50', dict(layers=(2,), start_layer=1, stem_width=4), 'bn3'),
    'imagenet_resnext': ('aff_resnext50_32x4d',
                         dict(layers=(2,), start_layer=1, channels=4, cardinality=2,
                              bottleneck_width=64, stem_width=4), 'body'),
    'tv_basic': ('tv_resnet18', dict(layers=(1, 1), small_input=True), 'bn2'),
    'tv_bottleneck': ('tv_resnet50', dict(layers=(2,), small_input=True), 'bn3'),
}


def record(model):
    """{module path: (module type, positional args, output)} of every module call while
    ``model.init`` is traced on IMAGE."""
    calls = {}

    def interceptor(method, args, kwargs, context):
        out = method(*args, **kwargs)
        if context.method_name == '__call__':
            calls[context.module.path] = (type(context.module), args, out)
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), IMAGE)
    return calls


def fusion_calls(calls, scheme):
    """(path, x, y) of every call of a ``scheme`` module."""
    cls = fusion.scheme(scheme)
    return [(path, args[0], args[1]) for path, (kind, args, _) in calls.items() if kind is cls]


def assert_pair(x, y, want_x, want_y, what):
    assert want_x is not want_y, what
    assert x is want_x, f'{what}: X is not the expected map'
    assert y is want_y, f'{what}: Y is not the expected map'


@pytest.mark.parametrize('scheme', ONE_SIDED)
@pytest.mark.parametrize('family', sorted(SHORT_SKIP))
def test_short_skip_x_is_the_identity(family, scheme):
    """fusion_order='paper': X = the identity (the block input, or its projection), Y = the
    residual branch; 'official' (the presets' default) hands them the other way round."""
    preset, overrides, body = SHORT_SKIP[family]
    for order in ('paper', 'official'):
        calls = record(aff_jax.create_model(preset, fusion=scheme, r=4, fusion_order=order,
                                            **overrides))
        fused = fusion_calls(calls, scheme)
        kinds = set()
        for path, x, y in fused:
            block = path[:-1]
            projection = block + ('downsample',)
            kinds.add(projection in calls)
            identity = calls[projection][2] if projection in calls else calls[block][1][0]
            residual = calls[block + (body,)][2]
            want = (identity, residual) if order == 'paper' else (residual, identity)
            assert_pair(x, y, *want, f'{order} order at {"/".join(path)}')
        assert kinds == {False, True}, 'blocks with and without a projection'


def test_fusion_order_defaults_and_bad_values():
    """Official and port presets keep the official order; a host built directly, the paper's
    own hosts and the StopSign backbone use the paper's; a bad value is named."""
    for name in ('cifar_resnet32', 'cifar_aff_resnet32', 'cifar_aff_resnext38_32x4d',
                 'aff_resnet50', 'iaff_resnext50_32x4d', 'tv_resnet18', 'tv_wide_resnet50_2'):
        assert aff_jax.create_model(name).fusion_order == 'official', name
    for name in ('cifar_aff_resnet32', 'cifar_aff_resnext38_32x4d', 'aff_resnet50',
                 'aff_resnext50_32x4d', 'tv_resnet18'):
        host = aff_jax.models.preset(name).host
        assert host.__dataclass_fields__['fusion_order'].default == 'paper', name
    assert aff_jax.create_model('fpn_resnet20').backbone.fusion_order == 'paper'
    with pytest.raises(TypeError, match=r"option fusion_order='reversed' \(str\) must be "
                                        r"Literal\['paper', 'official'\]"):
        aff_jax.create_model('tv_resnet18', layers=(1, 1), fusion_order='reversed')
    # A host built directly is not checked until it runs.
    model = aff_jax.create_model('tv_resnet18', layers=(1, 1)).clone(fusion_order='reversed')
    with pytest.raises(ValueError, match=r"fusion_order must be one of \('paper', 'official'\), "
                                         r"got 'reversed'"):
        record(model)


LONG_SKIP = {'fpn': dict(pyramid_channels=8), 'unet': dict(decoder_channels=(8, 12))}


@pytest.mark.parametrize('scheme', ONE_SIDED)
@pytest.mark.parametrize('decoder', sorted(LONG_SKIP))
def test_long_skip_x_is_the_low_level_map(decoder, scheme, monkeypatch):
    """Each merge<i>: X = the lateral projection of backbone stage i (low level), Y = the
    upsampled (projected) map coming down from the coarser stage (high level)."""
    upsampled = []  # (output, input) of every upsampling
    upsample = layers.upsample

    def recording_upsample(x, height, width, method='nearest'):
        upsampled.append((upsample(x, height, width, method), x))
        return upsampled[-1][0]

    monkeypatch.setattr(layers, 'upsample', recording_upsample)
    model = aff_jax.create_model(decoder, backbone='cifar_resnet32', fusion=scheme, r=4,
                                 layers=(1, 1, 1), channels=(8, 8, 16, 32), **LONG_SKIP[decoder])
    calls = record(model)
    stages = calls[('backbone',)][2]
    merges = fusion_calls(calls, scheme)
    assert len(merges) == len(stages) - 1
    for path, x, y in merges:
        merge = path[:-1]
        x_low, y_high = calls[merge][1][:2]
        assert x_low is stages[int(merge[-1].removeprefix('merge'))], '/'.join(merge)
        assert y_high.shape[1] < x_low.shape[1]
        source = calls[merge + ('project',)][2] if merge + ('project',) in calls else y_high
        assert any(out is y and given is source for out, given in upsampled), \
            f'{"/".join(path)}: Y is not the upsampled high-level map'
        assert_pair(x, y, calls[merge + ('lateral',)][2], y, '/'.join(path))


@pytest.mark.parametrize('scheme', ONE_SIDED)
def test_same_layer_x_is_the_small_kernel(scheme):
    """Every cell: X = the 3x3 branch (conv_x, bn_x), Y = the dilated branch (conv_y, bn_y)."""
    calls = record(aff_jax.create_model('cifar_inception_resnet20', fusion=scheme, layers=(1, 1),
                                        channels=(8, 8, 16)))
    cells = fusion_calls(calls, scheme)
    assert len(cells) == 4
    for path, x, y in cells:
        cell = path[:-1]
        assert calls[cell + ('bn_x',)][1][0] is calls[cell + ('conv_x',)][2]
        assert calls[cell + ('bn_y',)][1][0] is calls[cell + ('conv_y',)][2]
        assert_pair(x, y, calls[cell + ('bn_x',)][2], calls[cell + ('bn_y',)][2], '/'.join(path))
