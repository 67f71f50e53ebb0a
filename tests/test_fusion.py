"""Every fusion scheme against an independent float64 numpy evaluation of its formula (in
float32, and in float64 to 1e-10), and in float64 against an independent PyTorch implementation
(`aff_jax.reference.torch_fusion`): outputs, statistics, gradients and an SGD step.

The reference reads the module's variables (NHWC, conv kernels HWIO) and recomputes the output
and, in train mode, the updated running statistics: flax momentum 0.9 (= PyTorch 0.1), BN eps
1e-5, normalisation by the biased batch variance; running_var takes the unbiased variance where
the BN keeps a `num_batches_tracked` counter (the PyTorch rule) and the biased one otherwise,
with the momentum rounded to float32 (the Gluon rule, as MXNet's operator takes it).
"""
import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import aff_jax
import parity
from aff_jax import compare, fusion
from aff_jax.interop import torch as aff_torch
from aff_jax.reference import torch_fusion, torch_port

EPS = 1e-5
MOMENTUM = 0.9
SHAPE = (3, 4, 5, 8)  # N, H, W, C
REDUCTION = 2


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class Reference:
    """Numpy evaluation of contexts from a fusion module's variables; train mode updates
    `self.stats` in call order, as the module's own BatchNorms would."""

    def __init__(self, variables, train):
        self.params = variables.get('params', {})
        self.stats = copy.deepcopy(variables.get('batch_stats', {}))
        self.train = train

    @staticmethod
    def conv1x1(p, z):
        return z @ p['kernel'][0, 0].astype(np.float64) + p['bias']

    def bn(self, p, s, z):
        if self.train:
            n = z.size // z.shape[-1]
            mean, var = z.mean((0, 1, 2)), z.var((0, 1, 2))
            torch_rule = 'num_batches_tracked' in s
            m = MOMENTUM if torch_rule else float(np.float32(MOMENTUM))
            s['mean'] = m * s['mean'] + (1 - m) * mean
            update = var * n / (n - 1) if torch_rule else var
            s['var'] = m * s['var'] + (1 - m) * update
            if torch_rule:
                s['num_batches_tracked'] = s['num_batches_tracked'] + 1
        else:
            mean, var = s['mean'], s['var']
        return (z - mean) / np.sqrt(var + EPS) * p['scale'] + p['bias']

    def context(self, name, z):
        """Local (per pixel, children 0 1 3 4) or global (pooled, children 1 2 4 5) logits."""
        p, s = self.params[name], self.stats[name]
        first = 1 if name.startswith('global') else 0
        if first:
            z = z.mean((1, 2), keepdims=True)
        c1, b1, c2, b2 = (str(first + i) for i in (0, 1, 3, 4))
        h = np.maximum(self.bn(p[b1], s[b1], self.conv1x1(p[c1], z)), 0.0)
        return self.bn(p[b2], s[b2], self.conv1x1(p[c2], h))

    def gate(self, z, *names):
        return sigmoid(sum(self.context(n, z) for n in names))


def select(m, x, y):
    return m * x + (1 - m) * y


def cat(x, y):
    return np.concatenate([x, y], axis=-1)


def aff_formula(scale):
    return lambda ref, x, y: scale * select(ref.gate(x + y, 'local_att', 'global_att'), x, y)


def iaff_formula(reuse_global):
    def f(ref, x, y):
        xi = select(ref.gate(x + y, 'local_att', 'global_att'), x, y)
        second = 'global_att' if reuse_global else 'global_att2'
        return select(ref.gate(xi, 'local_att2', second), x, y)
    return f


# name -> (branches as {name: input channels / C}, formula(Reference, x, y)).
SCHEMES = {
    'add': ({}, lambda ref, x, y: x + y),
    'concat': ({}, lambda ref, x, y: ref.conv1x1(ref.params['conv'], cat(x, y))),
    'se': ({'global_att': 1}, lambda ref, x, y: x + ref.gate(y, 'global_att') * y),
    'gau': ({'global_att': 1}, lambda ref, x, y: ref.gate(y, 'global_att') * x + y),
    'highway': ({'global_att': 1}, lambda ref, x, y: select(ref.gate(x, 'global_att'), x, y)),
    'sa': ({'global_att': 2}, lambda ref, x, y: ref.gate(cat(x, y), 'global_att') * x + y),
    'sk': ({'global_att': 1}, lambda ref, x, y: select(ref.gate(x + y, 'global_att'), x, y)),
    'ms_se': ({'local_att': 1, 'global_att': 1},
              lambda ref, x, y: x + ref.gate(y, 'local_att', 'global_att') * y),
    'ms_gau': ({'local_att': 1, 'global_att': 1},
               lambda ref, x, y: ref.gate(y, 'local_att', 'global_att') * x + y),
    'ms_sa': ({'local_att': 2, 'global_att': 2},
              lambda ref, x, y: ref.gate(cat(x, y), 'local_att', 'global_att') * x + y),
    'ms_modulate_sum': ({'local_att': 1, 'global_att': 1},
                        lambda ref, x, y: ref.gate(x + y, 'local_att', 'global_att') * x + y),
    'ms_refine_sum': ({'local_att': 1, 'global_att': 1},
                      lambda ref, x, y: x + ref.gate(x + y, 'local_att', 'global_att') * y),
    'aff_global_global': ({'global_att': 1, 'global_att2': 1},
                          lambda ref, x, y: select(ref.gate(x + y, 'global_att', 'global_att2'),
                                                  x, y)),
    'aff_local_local': ({'local_att': 1, 'local_att2': 1},
                        lambda ref, x, y: select(ref.gate(x + y, 'local_att', 'local_att2'), x, y)),
    'aff': ({'local_att': 1, 'global_att': 1}, aff_formula(1.0)),
    'iaff': ({'local_att': 1, 'global_att': 1, 'local_att2': 1, 'global_att2': 1},
             iaff_formula(False)),
}
LEARNED = [n for n, (branches, _) in SCHEMES.items() if branches]
WITH_GLOBAL = [n for n, (branches, _) in SCHEMES.items() if any('global' in b for b in branches)]

# Distinctive pieces of each docstring's formula (compared with whitespace and backticks removed);
# the first five are API.md's formulas verbatim.
DOC_TOKENS = {
    'se': 'X+G(Y)*Y', 'gau': 'G(Y)*X+Y', 'highway': 'G(X)*X+(1-G(X))*Y', 'sa': 'G(X,Y)*X+Y',
    'sk': 'G(X+Y)*X+(1-G(X+Y))*Y', 'ms_se': 'X+M(Y)*Y', 'ms_gau': 'M(Y)*X+Y',
    'ms_sa': 'M(X,Y)*X+Y', 'ms_modulate_sum': 'M(X+Y)*X+Y', 'ms_refine_sum': 'X+M(X+Y)*Y',
    'aff_global_global': 'G2(X+Y)', 'aff_local_local': 'L2(X+Y)',
    'aff': 'L(X+Y)+G(X+Y)', 'iaff': 'M2(', 'add': 'X+Y', 'concat': '[X,Y]',
}


def make(name, **kw):
    return fusion.create(name, r=REDUCTION, **kw) if name in LEARNED else fusion.create(name, **kw)


def numpy_tree(tree):
    return jax.tree.map(np.asarray, nn.unbox(tree))


def randomized(variables, seed):
    """The module's variables with random values: weights ~ 1/sqrt(fan_in), BN scale in
    [0.5, 1.5], running mean ~ N(0, 0.2), running var in [0.5, 1.5] (counters untouched)."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(numpy_tree(variables))
    out = {}
    for path, a in flat.items():
        leaf = path[-1]
        if leaf == 'kernel':
            v = rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        elif leaf in ('scale', 'var'):
            v = rng.uniform(0.5, 1.5, a.shape)
        elif leaf in ('bias', 'mean'):
            v = rng.normal(0.0, 0.2, a.shape)
        else:
            v = a
        out[path] = np.asarray(v, a.dtype)
    return traverse_util.unflatten_dict(out)


def inputs(seed, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def setup(module, x, y, seed=0):
    return randomized(module.init(jax.random.key(0), x, y, False), seed)


def assert_close(got, want, what, tolerance=None):
    """float32 (or float64, with ``tolerance``) against the float64 reference. In train mode
    BatchNorm divides by the standard deviation of a few values (the global context sees one
    per image), which magnifies float32 rounding: iAFF's two stages reach 2e-5 there."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f'{what}: shape {got.shape} != {want.shape}'
    if tolerance is None:
        tolerance = 5e-5 if what == 'train' else 1e-5
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=what)


def assert_stats_equal(got, want, tolerance=None):
    got = traverse_util.flatten_dict(numpy_tree(got))
    want = traverse_util.flatten_dict(want)
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        if path[-1] == 'num_batches_tracked':
            assert int(got[path]) == int(w), path
        else:
            assert_close(got[path], w, '/'.join(path), tolerance)


def check_against_reference(module, formula, variables, x, y, tolerance=None):
    """Eval and train outputs, and the train-mode running statistics, vs the numpy formula."""
    ref = Reference(variables, train=False)
    want = formula(ref, x.astype(np.float64), y)
    assert_close(module.apply(variables, x, y, False), want, 'eval', tolerance)
    ref = Reference(variables, train=True)
    want = formula(ref, x.astype(np.float64), y)
    got, updates = module.apply(variables, x, y, True, mutable=['batch_stats'])
    assert_close(got, want, 'train', tolerance)
    assert_stats_equal(updates.get('batch_stats', {}), ref.stats, tolerance)


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_scheme_matches_numpy_formula(name):
    module = make(name)
    x, y = inputs(1)
    check_against_reference(module, SCHEMES[name][1], setup(module, x, y), x, y)


def test_every_registered_scheme_is_checked_here():
    assert set(SCHEMES) == set(fusion.names()) == set(torch_fusion.NAMES)


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_scheme_matches_numpy_formula_in_float64(name):
    """dtype float64 computes every value in float64 (gates and BatchNorm statistics
    included): the numpy formula to 1e-10 instead of float32's 1e-5."""
    with jax.enable_x64(True):
        module = make(name, dtype=jnp.float64, param_dtype=jnp.float64)
        x, y = (a.astype(np.float64) for a in inputs(1))
        variables = setup(module, x, y)
        _, state = module.apply(variables, x, y, True, mutable=['batch_stats', 'intermediates'],
                                capture_intermediates=True)
        dtypes = {a.dtype for a in jax.tree.leaves(state)} | {
            a.dtype for a in jax.tree.leaves(variables) if a.dtype != np.int32}
        assert dtypes == {np.dtype(np.float64)}, dtypes
        check_against_reference(module, SCHEMES[name][1], variables, x, y, tolerance=1e-10)


def test_float64_without_64_bit_jax_is_an_error_not_float32():
    module = fusion.create('aff', dtype=jnp.float64)
    x, y = inputs(1)
    with pytest.raises(ValueError, match=r"dtype float64 needs 64-bit JAX, which is off: "
                                         r"jax.config.update\('jax_enable_x64', True\)"):
        module.init(jax.random.key(0), x, y, False)


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_scheme_matches_torch_in_float64(name):
    """Against the PyTorch formula of the scheme, both in float64: eval, then train mode with
    the running statistics, every gradient and one SGD step, to 1e-10."""
    ref = torch_port.randomize_(torch_fusion.build(name, 8, r=REDUCTION), seed=len(name))
    fields = {'r': REDUCTION, 'stats_rule': 'torch'} if name in LEARNED else {}
    module = fusion.create(name, **fields)
    variables = aff_torch.from_state_dict(module, ref.state_dict())
    x, y = (compare.example_input(4, 5, seed, channels=8) for seed in (1, 2))
    for mode, steps in (('eval', 0), ('train', 1)):
        diffs = parity.float64_diffs(module, variables, compare.torch_reference(ref), (x, y),
                                     names=aff_torch.to_state_dict, mode=mode, steps=steps)
        parity.assert_parity(diffs)
    assert {d.kind for d in diffs} == ({'activation', 'stat', 'grad', 'step1'} if name in LEARNED
                                       else {'activation', 'grad', 'step1'} if name == 'concat'
                                       else {'activation'})


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_parameter_shapes_default_r4(name):
    """create(name) defaults to r=4: each context is C_in -> C//4 -> C; concat is 2C -> C."""
    c = 16
    x = jnp.zeros((2, 3, 3, c))
    got = traverse_util.flatten_dict(numpy_tree(fusion.create(name).init(
        jax.random.key(0), x, x, False)).get('params', {}))
    got = {'/'.join(k): v.shape for k, v in got.items()}
    want = {}
    for branch, factor in SCHEMES[name][0].items():
        first = 1 if branch.startswith('global') else 0
        c1, b1, c2, b2 = (f'{branch}/{first + i}' for i in (0, 1, 3, 4))
        want.update({f'{c1}/kernel': (1, 1, factor * c, c // 4), f'{c1}/bias': (c // 4,),
                     f'{b1}/scale': (c // 4,), f'{b1}/bias': (c // 4,),
                     f'{c2}/kernel': (1, 1, c // 4, c), f'{c2}/bias': (c,),
                     f'{b2}/scale': (c,), f'{b2}/bias': (c,)})
    if name == 'concat':
        want = {'conv/kernel': (1, 1, 2 * c, c), 'conv/bias': (c,)}
    assert got == want


def test_mscam_matches_numpy():
    module = aff_jax.MSCAM(r=REDUCTION)
    x, _ = inputs(2)
    variables = randomized(module.init(jax.random.key(0), x, False), 3)
    ref = Reference(variables, train=False)
    xd = x.astype(np.float64)
    assert_close(module.apply(variables, x, False), xd * ref.gate(xd, 'local_att', 'global_att'),
                 'eval')
    ref = Reference(variables, train=True)
    want = xd * ref.gate(xd, 'local_att', 'global_att')
    got, updates = module.apply(variables, x, True, mutable=['batch_stats'])
    assert_close(got, want, 'train')
    assert_stats_equal(updates['batch_stats'], ref.stats)


def test_aff_scale():
    x, y = inputs(4)
    one, two = aff_jax.AFF(r=REDUCTION), aff_jax.AFF(r=REDUCTION, scale=2.0)
    assert one.scale == 1.0
    variables = setup(one, x, y)
    check_against_reference(one, aff_formula(1.0), variables, x, y)
    check_against_reference(two, aff_formula(2.0), variables, x, y)
    # Exactly twice: scaling by a power of two commutes with float32 rounding, so putting the
    # scale on the gate (which keeps XLA from recomputing chained blends) changes no bit.
    np.testing.assert_array_equal(two.apply(variables, x, y, False),
                                  2 * one.apply(variables, x, y, False))


class _BlendChain(nn.Module):
    """``depth`` AFF (scale 2) blends in a row, each output also read by a transposing copy,
    as a residual stage's outputs are by the weight gradients of the convolutions after them."""
    depth: int

    @nn.compact
    def __call__(self, z, ys):
        outputs = []
        for i in range(self.depth):
            z = aff_jax.AFF(r=4, scale=2.0, name=str(i))(z, ys[i], True)
            outputs.append(jnp.transpose(z, (3, 1, 2, 0)))
        return outputs


def test_chained_blends_are_computed_once(on_cpu):
    """XLA duplicates an elementwise op with one non-constant operand into every consumer; a
    blend ending in ``scale * (...)`` dragged the whole chain before it into each transposing
    copy, so the multiplies grew with the square of the depth (16, 56, 120 for depths 2, 4, 6).
    Computed once, they grow linearly."""
    shape = (4, 8, 8, 16)
    full_size_multiply = re.compile(r'= f32\[%s\]\{[\d,]*\} multiply\(' % ','.join(map(str, shape)))
    counts = []
    for depth in (2, 4, 6):
        chain = _BlendChain(depth)
        z, ys = jnp.ones(shape), jnp.ones((depth, *shape))
        variables = chain.init(jax.random.key(0), z, ys)
        step = jax.jit(lambda z, ys: chain.apply(variables, z, ys, mutable=['batch_stats'])[0])
        counts.append(len(full_size_multiply.findall(step.lower(z, ys).compile().as_text())))
    assert counts[0] > 0
    assert counts[2] - counts[1] == counts[1] - counts[0], counts


def test_iaff_reuse_global():
    """reuse_global=True (the port) calls global_att twice and leaves global_att2 untouched."""
    x, y = inputs(5)
    own, reuse = aff_jax.IAFF(r=REDUCTION), aff_jax.IAFF(r=REDUCTION, reuse_global=True)
    assert not own.reuse_global
    variables = setup(own, x, y)
    assert (jax.tree.structure(numpy_tree(reuse.init(jax.random.key(0), x, y, False)))
            == jax.tree.structure(variables))
    check_against_reference(own, iaff_formula(False), variables, x, y)
    check_against_reference(reuse, iaff_formula(True), variables, x, y)
    diff = np.abs(own.apply(variables, x, y, False) - reuse.apply(variables, x, y, False)).max()
    assert diff > 1e-3
    _, updates = reuse.apply(variables, x, y, True, mutable=['batch_stats'])
    untouched = traverse_util.flatten_dict(numpy_tree(updates['batch_stats'])['global_att2'])
    for path, value in traverse_util.flatten_dict(variables['batch_stats']['global_att2']).items():
        np.testing.assert_array_equal(untouched[path], value)


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_mismatched_shapes_raise(name):
    x = jnp.zeros((2, 4, 4, 8))
    y = jnp.zeros((2, 4, 4, 16))
    with pytest.raises(ValueError) as err:
        make(name).init(jax.random.key(0), x, y, False)
    assert '(2, 4, 4, 8)' in str(err.value) and '(2, 4, 4, 16)' in str(err.value)


@pytest.mark.parametrize('name', ['add', 'concat', 'aff', 'iaff', 'se'])
def test_rank_not_4_raises(name):
    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match=re.escape('(2, 4, 8)')):
        make(name).init(jax.random.key(0), x, x, False)


def test_mscam_rank_not_4_raises():
    with pytest.raises(ValueError, match=re.escape('(4, 4, 8)')):
        aff_jax.MSCAM(r=REDUCTION).init(jax.random.key(0), jnp.zeros((4, 4, 8)), False)


@pytest.mark.parametrize('name', LEARNED)
def test_reduction_leaving_no_channels_raises(name):
    x = jnp.zeros((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r'r\s*=\s*8'):
        fusion.create(name, r=8).init(jax.random.key(0), x, x, False)


@pytest.mark.parametrize('name', WITH_GLOBAL)
def test_batch_of_one_in_train_mode_raises(name):
    """One pooled value per channel cannot be batch-normalised; eval mode still works."""
    module = make(name)
    x, y = inputs(6, (1, 3, 3, 8))
    variables = randomized(module.init(jax.random.key(0), x, y, False), 7)
    with pytest.raises(ValueError, match='(?i)batch'):
        module.apply(variables, x, y, True, mutable=['batch_stats'])
    ref = Reference(variables, train=False)
    assert_close(module.apply(variables, x, y, False),
                 SCHEMES[name][1](ref, x.astype(np.float64), y), 'eval at batch 1')


def test_mscam_batch_of_one_in_train_mode_raises():
    module = aff_jax.MSCAM(r=REDUCTION)
    x = jnp.ones((1, 3, 3, 8))
    variables = module.init(jax.random.key(0), x, False)
    with pytest.raises(ValueError, match='(?i)batch'):
        module.apply(variables, x, True, mutable=['batch_stats'])


@pytest.mark.parametrize('name', sorted(SCHEMES))
def test_docstring_states_formula(name):
    doc = type(make(name)).__doc__ or ''
    assert DOC_TOKENS[name] in re.sub(r'[\s`]', '', doc), doc


@pytest.mark.parametrize('name', ['se', 'gau', 'sa', 'ms_modulate_sum', 'ms_refine_sum'])
def test_scale_of_a_scheme_that_does_not_select_is_an_error(name):
    """scale only weighs a soft selection; elsewhere it would be silently ignored."""
    x, y = inputs(8)
    with pytest.raises(ValueError, match=r"scale applies to combine='select' only.*scale=2\.0"):
        make(name, scale=2.0).init(jax.random.key(0), x, y, False)
