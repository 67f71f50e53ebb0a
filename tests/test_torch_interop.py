"""aff_jax.interop.torch against the independent PyTorch port reference (`aff_jax.reference.torch_port`).

Port models get random weights and non-trivial BN statistics, are loaded with
`from_state_dict`, and must agree with PyTorch in eval mode and in train mode (logits, updated
running statistics and num_batches_tracked), to a norm-based relative error of 1e-5.

The reference runs in float64, so the tolerance measures our float32 error alone. Train-mode
BatchNorm of the global branch normalises one pooled value per image; when the images' pooled
features are nearly equal that is ill-conditioned (PyTorch's own float32 forward then drifts by
1e-4 and more from float64), so the inputs differ per image in offset and contrast, as real
images do, and batches hold 8 images (our float32 error then stays below 5e-6, as
PyTorch's own float32 error does). Depths are reduced with `layers`; every block kind appears.
"""
import copy

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
import parity
from aff_jax import compare
from aff_jax.interop import torch as aff_torch
from aff_jax.reference import torch_port as port

TOL = 1e-5


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)


def images(shape, seed):
    """NCHW float32 noise with a per-image offset per channel and a per-image contrast."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    return (torch.randn(shape, generator=gen) * (0.5 + torch.rand(n, 1, 1, 1, generator=gen))
            + torch.randn(n, c, 1, 1, generator=gen))


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def as_nhwc(t):
    a = t.numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def numpy_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def assert_state_matches(got, want):
    """`got` (from to_state_dict) equals torch's state_dict: exact counters, floats to TOL."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        if key.endswith('num_batches_tracked'):
            assert int(got[key]) == int(w), f'{key}: {int(got[key])} != {int(w)}'
        else:
            assert rel_err(got[key], w) <= TOL, key


def check_parity(ref, model, call_jax, inputs):
    """Eval then train forward of torch `ref` (run in float64) and flax `model` loaded from
    `ref`'s float32 state_dict; `call_jax(variables, train, **apply_kwargs)`."""
    variables = aff_torch.from_state_dict(model, ref.state_dict())
    truth = copy.deepcopy(ref).double()
    with torch.no_grad():
        want_eval = as_nhwc(truth.eval()(*(x.double() for x in inputs)))
        want_train = as_nhwc(truth.train()(*(x.double() for x in inputs)))
    assert rel_err(call_jax(variables, False), want_eval) <= TOL
    got_train, updates = call_jax(variables, True, mutable=['batch_stats'])
    assert rel_err(got_train, want_train) <= TOL
    updated = aff_torch.to_state_dict(model, {'params': variables['params'], **updates})
    assert_state_matches(updated, numpy_state(truth))


# float32 against the port in float64 (the precision rule's float32 path); every preset's
# float64 parity is checked below.
MODEL_CASES = [
    # name, fusion, layers, small_input, input (N, C, H, W)
    ('tv_resnet18', 'iaff', (2, 1, 1, 1), False, (8, 3, 48, 48)),
]


@pytest.mark.parametrize('name,fusion,layers,small_input,shape', MODEL_CASES)
def test_tv_model_matches_port(name, fusion, layers, small_input, shape):
    ref = port.randomize_(port.build_port(name, fusion=fusion, layers=layers, num_classes=10,
                                          small_input=small_input), seed=len(name) + len(fusion))
    model = aff_jax.create_model(name, num_classes=10, fusion=fusion, layers=layers,
                                 small_input=small_input)
    x = images(shape, seed=1)
    check_parity(ref, model, lambda v, train, **kw: model.apply(v, nhwc(x), train=train, **kw),
                 (x,))


BARE_CASES = {
    'MS_CAM': (lambda: port.MS_CAM(16, 4), lambda: aff_jax.MSCAM(r=4, stats_rule='torch'), 1),
    'AFF': (lambda: port.AFF(16, 4), lambda: aff_jax.AFF(r=4, scale=2.0, stats_rule='torch'), 2),
    'iAFF': (lambda: port.iAFF(16, 4),
             lambda: aff_jax.IAFF(r=4, reuse_global=True, stats_rule='torch'), 2),
}


@pytest.mark.parametrize('kind', sorted(BARE_CASES))
def test_bare_module_matches_port(kind):
    """The port's MS_CAM / AFF (x2) / iAFF (second stage on global_att, so its BN counters
    advance twice per step and global_att2's stay put)."""
    make_ref, make_jax, arity = BARE_CASES[kind]
    ref, model = port.randomize_(make_ref(), seed=3), make_jax()
    inputs = tuple(images((4, 16, 5, 6), seed) for seed in range(arity))
    check_parity(ref, model, lambda v, train, **kw: model.apply(v, *map(nhwc, inputs), train, **kw),
                 inputs)


@pytest.fixture(scope='module')
def resnet18_pair():
    ref = port.randomize_(port.build_port('tv_resnet18', fusion='iaff', layers=(1, 1, 1, 1)), 5)
    return ref, aff_jax.create_model('tv_resnet18', fusion='iaff', layers=(1, 1, 1, 1))


def test_round_trip_is_exact(resnet18_pair):
    """Same keys, dtypes (int64 counters) and values, from torch tensors or numpy arrays; the
    port's model loads the exported dict strictly."""
    ref, model = resnet18_pair
    want = numpy_state(ref)
    for given in (ref.state_dict(), want):
        got = aff_torch.to_state_dict(model, aff_torch.from_state_dict(model, given))
        assert sorted(got) == sorted(want)
        for key, w in want.items():
            assert got[key].dtype == w.dtype, f'{key}: {got[key].dtype} != {w.dtype}'
            np.testing.assert_array_equal(got[key], w, err_msg=key)
    clone = port.build_port('tv_resnet18', fusion='iaff', layers=(1, 1, 1, 1))
    clone.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=True)


def test_bad_state_dict_names_every_problem(resnet18_pair):
    ref, model = resnet18_pair
    sd = dict(ref.state_dict())
    del sd['layer2.0.fuse_mode.global_att2.5.running_var']
    sd['layer3.0.fuse_mode.extra.weight'] = torch.zeros(3)
    sd['fc.weight'] = torch.zeros(10, 512)
    with pytest.raises(ValueError) as err:
        aff_torch.from_state_dict(model, sd)
    message = str(err.value)
    for key in ('layer2.0.fuse_mode.global_att2.5.running_var', 'layer3.0.fuse_mode.extra.weight',
                'fc.weight'):
        assert key in message, key


def test_gluon_rule_module_rejects_torch_counters():
    """A module keeping no num_batches_tracked cannot silently drop the port's counters."""
    sd = port.randomize_(port.AFF(16, 4), 1).state_dict()
    with pytest.raises(ValueError, match='num_batches_tracked'):
        aff_torch.from_state_dict(aff_jax.AFF(r=4, scale=2.0, stats_rule='gluon'), sd)


# --- float64: every tv_* preset and the port's modules, eval and train, gradients, an SGD step ---

# name, fusion, small_input, at one block per stage (tv_resnet34 is tv_resnet18, and
# tv_resnet101/152 are tv_resnet50, deeper: test_the_presets_of_one_structure_differ_in_depth).
# Each fusion of the port meets each block kind and both stems.
FLOAT64_PRESETS = [
    ('tv_resnet18', 'iaff', True),
    ('tv_resnet34', 'aff', False),
    ('tv_resnet50', 'aff', True),
    ('tv_resnet101', 'add', True),
    ('tv_resnet152', 'iaff', True),
    ('tv_resnext50_32x4d', 'aff', True),
    ('tv_resnext101_32x8d', 'add', True),
    ('tv_wide_resnet50_2', 'aff', True),
    ('tv_wide_resnet101_2', 'add', False),
]


def check_float64_parity(ref, model, inputs):
    """`model` loaded from `ref`'s weights, both in float64: eval mode, then train mode with
    gradients and one SGD step, within parity.TOLERANCE."""
    variables = aff_torch.from_state_dict(model, ref.state_dict())
    reference = compare.torch_reference(ref)
    for mode, steps in (('eval', 0), ('train', 1)):
        diffs = parity.float64_diffs(model, variables, reference, inputs,
                                     names=aff_torch.to_state_dict, mode=mode, steps=steps)
        parity.assert_parity(diffs)
    return diffs


@pytest.mark.parametrize('name,fusion,small_input', FLOAT64_PRESETS)
def test_tv_preset_matches_port_in_float64(name, fusion, small_input):
    layers = (1, 1, 1, 1)
    ref = port.randomize_(port.build_port(name, fusion=fusion, layers=layers, num_classes=10,
                                          small_input=small_input), seed=len(name))
    model = aff_jax.create_model(name, num_classes=10, fusion=fusion, layers=layers,
                                 small_input=small_input)
    diffs = check_float64_parity(ref, model, compare.example_input(4, 16 if small_input else 32,
                                                                    seed=1))
    kinds = {d.kind for d in diffs}
    assert kinds == {'activation', 'stat', 'grad', 'step1'}
    # Every conv bias of a fusion context feeds a BatchNorm, so its gradient is exactly zero.
    assert {d.name for d in diffs if d.zero} == {
        d.name for d in diffs if d.kind == 'grad' and '_att' in d.name
        and d.name.endswith(('local_att.0.bias', 'local_att.3.bias', 'local_att2.0.bias',
                             'local_att2.3.bias', 'global_att.1.bias', 'global_att.4.bias',
                             'global_att2.1.bias', 'global_att2.4.bias'))}


def test_the_presets_of_one_structure_differ_in_depth():
    """So that, at one block per stage, the float64 test above covers each with one."""
    from aff_jax.models import preset

    def fields(name):
        return {**preset(name).fields, 'layers': None}, preset(name).host

    assert fields('tv_resnet18') == fields('tv_resnet34')
    assert fields('tv_resnet50') == fields('tv_resnet101') == fields('tv_resnet152')
    assert fields('tv_wide_resnet50_2') == fields('tv_wide_resnet101_2')
    assert port.PRESETS['tv_resnet18'][0] is port.PRESETS['tv_resnet34'][0]


@pytest.mark.parametrize('kind', sorted(BARE_CASES))
def test_bare_module_matches_port_in_float64(kind):
    make_ref, make_jax, arity = BARE_CASES[kind]
    ref, model = port.randomize_(make_ref(), seed=3), make_jax()
    inputs = tuple(compare.example_input(4, 5, seed, channels=16) for seed in range(arity))
    check_float64_parity(ref, model, inputs if arity > 1 else inputs[0])
