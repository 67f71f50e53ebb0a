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


MODEL_CASES = [
    # name, fusion, layers, small_input, input (N, C, H, W)
    ('tv_resnet18', 'add', (2, 1, 1, 1), True, (8, 3, 32, 32)),
    ('tv_resnet18', 'aff', (2, 1, 1, 1), True, (8, 3, 32, 32)),
    ('tv_resnet18', 'iaff', (1, 1, 1, 1), False, (8, 3, 48, 48)),
    ('tv_resnet50', 'aff', (2, 1, 1, 1), False, (8, 3, 48, 48)),
    ('tv_resnet50', 'iaff', (1, 1, 1, 1), True, (8, 3, 32, 32)),
    ('tv_resnext50_32x4d', 'aff', (1, 1, 1, 1), True, (8, 3, 32, 32)),
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
