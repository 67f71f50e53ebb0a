"""The same-layer host ``cifar_inception_resnet20``: parameter count from the architecture,
every fusion scheme trains (shapes, finite gradients), and the branches' roles: X the 3x3
conv, Y the dilated 3x3 conv, whatever weights they hold."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import aff_jax
from aff_jax import fusion

EPS = 1e-5
# One stage keeps the eager gradient tests cheap (every new op shape compiles once); the
# stride-2 stages are checked by the parameter count and tests/test_fusion_roles.py.
TINY = dict(layers=(1,), channels=(4, 8), num_classes=5)
# Batch 4: a global context's train-mode BN normalises one value per image, and two values
# always normalise to -1 and +1, which would leave its first conv without a gradient.
IMAGE = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
FIRST_CELL = ('stage1', '0', 'cell1')  # its input depends on no cell's weights


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(model, size=32):
    return nn.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                                   jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)))


def mscam_params(c, r):
    """An MS-CAM context pair: local and global bottleneck, each conv C->C/r (+bias),
    BN(C/r), conv C/r->C (+bias), BN(C)."""
    i = c // r
    return 2 * ((c * i + i) + 2 * i + (i * c + c) + 2 * c)


def host_params(layers, channels, classes, fusion_params):
    """Stem; per block BN, cell (two 3x3 convs without bias, two BNs, the fusion), BN, cell,
    and a 1x1 projection where the stride or width changes; final BN; dense head."""
    total = 3 * 3 * 3 * channels[0]
    c_in = channels[0]
    for stage, (c, blocks) in enumerate(zip(channels[1:], layers)):
        for block in range(blocks):
            c_block = c_in if block == 0 else c
            cell1 = 2 * 9 * c_block * c + 2 * 2 * c + fusion_params(c)
            cell2 = 2 * 9 * c * c + 2 * 2 * c + fusion_params(c)
            total += 2 * c_block + cell1 + 2 * c + cell2
            if block == 0 and (stage > 0 or c_block != c):
                total += c_block * c
        c_in = c
    return total + 2 * c_in + c_in * classes + classes


def randomized(model, seed, centre_only=False):
    """Variables of ``model`` on IMAGE drawn from their shapes (``init`` would compile a random
    generator per shape): weights ~ N(0, 1/fan_in), BN scale and running variance in
    [0.5, 1.5]. ``centre_only`` zeroes every 3x3 kernel but its centre tap, so that dilation
    changes nothing (both branches see one pixel)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if path[-1].key in ('scale', 'var'):
            return rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
        value = rng.normal(0.0, 1.0 / np.sqrt(max(np.prod(a.shape[:-1]), 1)), a.shape)
        if centre_only and path[-1].key == 'kernel' and a.shape[:2] == (3, 3):
            value[[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = 0.0
        return value.astype(a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, IMAGE.shape[1]))


def test_parameter_count_from_the_architecture():
    """The preset (layers 3-3-3, widths 16-16-32-64, AFF r = 4, 100 classes) and overridden
    depth, width, r and fusion."""
    got = count(abstract_variables(aff_jax.create_model('cifar_inception_resnet20'))['params'])
    assert got == host_params((3, 3, 3), (16, 16, 32, 64), 100, lambda c: mscam_params(c, 4))
    assert got == 585_380
    deeper = aff_jax.create_model('cifar_inception_resnet20', layers=(2, 1, 1, 2), r=8,
                                  channels=(8, 16, 16, 32, 64), num_classes=10)
    assert count(abstract_variables(deeper)['params']) == host_params(
        (2, 1, 1, 2), (8, 16, 16, 32, 64), 10, lambda c: mscam_params(c, 8))
    plain = aff_jax.create_model('cifar_inception_resnet20', fusion='add')
    assert count(abstract_variables(plain)['params']) == host_params(
        (3, 3, 3), (16, 16, 32, 64), 100, lambda c: 0)


def test_channels_must_match_layers():
    model = aff_jax.create_model('cifar_inception_resnet20', layers=(1, 1), channels=(8, 8))
    with pytest.raises(ValueError, match=r'channels needs a stem width plus one width per stage'):
        abstract_variables(model)


@pytest.mark.parametrize('name', fusion.names())
def test_every_fusion_gives_shapes_and_finite_gradients(name):
    """Logits and stage shapes; train-mode gradients of the features model, eager (op by op
    is cheaper here than compiling 16 small models), finite and reaching the fusion."""
    classifier = aff_jax.create_model('cifar_inception_resnet20', fusion=name, **TINY)
    logits = jax.eval_shape(lambda v: classifier.apply(v, IMAGE, train=False),
                            abstract_variables(classifier, IMAGE.shape[1]))
    assert logits.shape == (4, 5)
    model = aff_jax.create_model('cifar_inception_resnet20', fusion=name, features_only=True,
                                 **TINY)
    variables = randomized(model, seed=0)

    def loss(params):
        stages, updates = model.apply({**variables, 'params': params}, IMAGE, train=True,
                                      mutable=['batch_stats'])
        return sum(jnp.mean(jnp.tanh(s)) for s in stages), (stages, updates)

    grads, (stages, updates) = jax.grad(loss, has_aux=True)(variables['params'])
    assert [s.shape for s in stages] == [(4, 8, 8, 8)]
    assert (jax.tree.structure(updates['batch_stats'])
            == jax.tree.structure(variables['batch_stats']))
    flat = traverse_util.flatten_dict(grads, sep='/')
    assert all(np.isfinite(g).all() for g in flat.values())
    fused = [g for path, g in flat.items() if '/fuse/' in path]
    assert bool(fused) == (name != 'add')
    # Not every kernel: a bottleneck of C // r = 2 channels may sit behind a dead ReLU.
    assert name == 'add' or any(np.abs(g).max() > 0 for g in fused if g.ndim == 4), \
        'the fusion gets gradients'


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def branch(h, variables, cell, which, dilation):
    """BN_which(conv3x3_which(h)) in eval mode with the given dilation (stride 1, padding =
    dilation), computed by lax directly rather than by the host's conv."""
    params = at(variables['params'], cell)
    stats = at(variables['batch_stats'], cell)[f'bn_{which}']
    pad = ((dilation, dilation), (dilation, dilation))
    z = jax.lax.conv_general_dilated(h, params[f'conv_{which}']['kernel'], (1, 1), pad,
                                     rhs_dilation=(dilation, dilation),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST)
    bn = params[f'bn_{which}']
    return (z - stats['mean']) / jnp.sqrt(stats['var'] + EPS) * bn['scale'] + bn['bias']


def with_branches_swapped(variables):
    """``variables`` with each cell's X branch (conv_x, bn_x) and Y branch (conv_y, bn_y)
    exchanged, parameters and running statistics."""
    swap = {'conv_x': 'conv_y', 'conv_y': 'conv_x', 'bn_x': 'bn_y', 'bn_y': 'bn_x'}
    return {collection: traverse_util.unflatten_dict(
                {tuple(swap.get(p, p) for p in path): v
                 for path, v in traverse_util.flatten_dict(tree).items()})
            for collection, tree in variables.items()}


def recorded_cells(model, variables):
    """{cell path: {'h': cell input, 'x', 'y': the fusion's inputs, 'z': its output}} of one
    eval-mode run on IMAGE."""
    found = {}

    def interceptor(method, args, kwargs, context):
        out = method(*args, **kwargs)
        path = context.module.path
        if context.method_name == '__call__' and path[-1:] == ('fuse',):
            found.setdefault(path[:-1], {}).update(x=args[0], y=args[1], z=out)
        if context.method_name == '__call__' and path[-1:] == ('conv_x',):
            found.setdefault(path[:-1], {})['h'] = args[0]
        return out

    with nn.intercept_methods(interceptor):
        model.apply(variables, IMAGE, train=False)
    return found


@pytest.mark.parametrize('centre_only', [False, True])
def test_x_is_the_small_kernel_whatever_weights_the_branches_hold(centre_only):
    """The fusion's X is BN_x(conv3x3(h)) and Y is BN_y(conv3x3 with dilation 2(h)), checked
    against an independent convolution. Swapping the branches' weights moves the weights, not
    the roles: X is still the dilation-1 conv (now of Y's former weights). With centre-only
    kernels (where dilation changes nothing) the swap exchanges X and Y exactly, and the
    one-sided ``se`` turns from X + G(Y)*Y into Y + G(X)*X."""
    model = aff_jax.create_model('cifar_inception_resnet20', fusion='se', **TINY)
    variables = randomized(model, 2, centre_only)
    swapped = with_branches_swapped(variables)
    before, after = recorded_cells(model, variables), recorded_cells(model, swapped)
    assert len(before) == len(after) == 2
    seen, moved = before[FIRST_CELL], after[FIRST_CELL]
    h, close = seen['h'], dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(moved['h'], h)
    np.testing.assert_allclose(seen['x'], branch(h, variables, FIRST_CELL, 'x', 1), **close)
    np.testing.assert_allclose(seen['y'], branch(h, variables, FIRST_CELL, 'y', 2), **close)
    np.testing.assert_allclose(moved['x'], branch(h, swapped, FIRST_CELL, 'x', 1), **close)
    np.testing.assert_allclose(moved['y'], branch(h, swapped, FIRST_CELL, 'y', 2), **close)
    exchanged = (np.allclose(moved['x'], seen['y'], **close)
                 and np.allclose(moved['y'], seen['x'], **close))
    assert exchanged == centre_only
    if centre_only:
        fuse = {c: at(variables[c], FIRST_CELL + ('fuse',)) for c in variables}
        want = fusion.create('se', r=4).apply(fuse, seen['y'], seen['x'], False)
        np.testing.assert_allclose(moved['z'], want, **close)
        assert not np.allclose(moved['z'], seen['z'], **close)
