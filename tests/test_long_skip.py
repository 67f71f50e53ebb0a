"""LongSkipFusion against a NumPy evaluation of lateral projection + upsampling + the fusion
formula (train and eval, running statistics included), its shape errors, and the upsampling
rules against PyTorch's ``F.interpolate``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax import fusion, layers
from test_fusion import SCHEMES, Reference, assert_close, assert_stats_equal, randomized

N, X_SIZE, Y_SIZE = 3, (7, 9), (4, 5)  # non-integer ratios exercise the index rules


def interpolate(y, height, width, method):
    """PyTorch's resize of an NHWC float64 array."""
    t = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)))
    kw = {'align_corners': False} if method == 'bilinear' else {}
    return torch.nn.functional.interpolate(t, size=(height, width), mode=method,
                                           **kw).numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('method', layers.UPSAMPLE_METHODS)
@pytest.mark.parametrize('source, target', [((4, 5), (7, 9)), ((2, 2), (4, 4)), ((3, 3), (3, 8)),
                                            ((1, 1), (5, 3)), ((5, 6), (5, 6))])
def test_upsample_matches_torch_interpolate(method, source, target):
    y = np.random.default_rng(0).normal(size=(2, *source, 3))
    got = layers.upsample(jnp.asarray(y, jnp.float32), *target, method)
    np.testing.assert_allclose(got, interpolate(y, *target, method), rtol=1e-6, atol=1e-6)


def inputs(cx, cy, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, *X_SIZE, cx)) + rng.normal(size=(N, 1, 1, cx))
    y = rng.normal(size=(N, *Y_SIZE, cy)) + rng.normal(size=(N, 1, 1, cy))
    return x.astype(np.float32), y.astype(np.float32)


def reference(variables, x, y, scheme, method, train):
    """NumPy: lateral(X), upsample(project(Y)), then the scheme's formula (test_fusion)."""
    params, stats = variables['params'], variables.get('batch_stats', {})
    x, y = x.astype(np.float64), y.astype(np.float64)
    lateral = Reference.conv1x1(params['lateral'], x)
    if 'project' in params:
        y = Reference.conv1x1(params['project'], y)
    y = interpolate(y, *X_SIZE, method)
    ref = Reference({'params': params.get('fuse', {}), 'batch_stats': stats.get('fuse', {})},
                    train)
    return SCHEMES[scheme][1](ref, lateral, y), ref.stats


@pytest.mark.parametrize('scheme, method, cy', [
    ('add', 'nearest', 8), ('aff', 'nearest', 10), ('aff', 'bilinear', 8),
    ('iaff', 'bilinear', 10), ('se', 'nearest', 10), ('concat', 'bilinear', 10),
])
def test_long_skip_matches_numpy(scheme, method, cy):
    channels = 8
    module = aff_jax.LongSkipFusion(channels, fusion=scheme, r=2, upsample=method)
    x, y = inputs(6, cy)
    variables = randomized(module.init(jax.random.key(0), x, y, False), seed=1)
    assert ('project' in variables['params']) == (cy != channels)
    want, _ = reference(variables, x, y, scheme, method, train=False)
    assert_close(module.apply(variables, x, y, False), want, 'eval')
    want, stats = reference(variables, x, y, scheme, method, train=True)
    got, updates = module.apply(variables, x, y, True, mutable=['batch_stats'])
    assert_close(got, want, 'train')
    assert_stats_equal(updates.get('batch_stats', {}).get('fuse', {}), stats)


def test_add_is_the_plain_fpn_merge():
    """lateral(X) + Y repeated 2x along H and W (nearest, an exact factor of 2)."""
    module = aff_jax.LongSkipFusion(4, fusion='add')
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
    y = rng.normal(size=(2, 4, 3, 4)).astype(np.float32)
    variables = randomized(module.init(jax.random.key(0), x, y, False), seed=3)
    kernel, bias = (np.asarray(variables['params']['lateral'][k]) for k in ('kernel', 'bias'))
    want = x @ kernel[0, 0] + bias + y.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(module.apply(variables, x, y, False), want, rtol=1e-5, atol=1e-5)
    assert set(variables['params']) == {'lateral'}


def test_fusion_factory_and_options():
    """A factory is used as is (its r, not the module's); fusion_options reach a named scheme."""
    x, y = inputs(6, 8)
    by_factory = aff_jax.LongSkipFusion(8, fusion=fusion.factory('sk', r=4), r=2)
    params = nn.unbox(jax.eval_shape(
        lambda: by_factory.init(jax.random.key(0), x, y, False)))['params']
    assert params['fuse']['global_att']['1']['kernel'].shape[-1] == 2  # 8 // 4
    doubled = aff_jax.LongSkipFusion(8, fusion='aff', r=2, fusion_options={'scale': 2.0})
    single = aff_jax.LongSkipFusion(8, fusion='aff', r=2)
    variables = single.init(jax.random.key(0), x, y, False)
    np.testing.assert_allclose(doubled.apply(variables, x, y, False),
                               2 * single.apply(variables, x, y, False), rtol=1e-6)
    with pytest.raises(TypeError, match='no_such_option'):
        aff_jax.LongSkipFusion(8, fusion='aff', fusion_options={'no_such_option': 1}).init(
            jax.random.key(0), x, y, False)


@pytest.mark.parametrize('x_shape, y_shape, problem', [
    ((2, 4, 4, 3), (2, 8, 8, 3), 'must not be larger'),
    ((2, 8, 4, 3), (2, 4, 8, 3), 'must not be larger'),
    ((2, 8, 8, 3), (3, 4, 4, 3), 'batch sizes differ'),
    ((8, 8, 3), (2, 4, 4, 3), 'rank-4'),
    ((2, 8, 8, 3), (2, 4, 4, 3, 1), 'rank-4'),
])
def test_bad_shapes_name_both(x_shape, y_shape, problem):
    module = aff_jax.LongSkipFusion(4, fusion='aff')
    with pytest.raises(ValueError) as err:
        module.init(jax.random.key(0), jnp.zeros(x_shape), jnp.zeros(y_shape), False)
    message = str(err.value)
    assert str(x_shape) in message and str(y_shape) in message and problem in message


def test_bad_upsample_and_fusion_names():
    x, y = inputs(6, 8)
    with pytest.raises(ValueError, match="'area'"):
        aff_jax.LongSkipFusion(8, upsample='area').init(jax.random.key(0), x, y, False)
    with pytest.raises(ValueError, match="'not_a_fusion'"):
        aff_jax.LongSkipFusion(8, fusion='not_a_fusion').init(jax.random.key(0), x, y, False)
