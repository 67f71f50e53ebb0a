"""Training pieces against closed forms and NumPy references, and the command line's answers
to bad input; one TFDS (mock) dataset trains end to end."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aff_jax
from aff_jax.layers import conv2d, dense
from aff_jax.training import loop, optimizer, steps, summary, tasks
from aff_jax.training import mesh as mesh_lib
from aff_jax.training import state as state_lib
from aff_jax.training.config import apply_overrides, base_config, load_config
from aff_jax.training.errors import ConfigError
from conftest import REPO, TINY_RUN, cpu_devices_env, run_train


def _config(**values):
    config = base_config()
    config.update(values)
    return config


# Learning-rate schedules -----------------------------------------------------------------

def test_cosine_schedule_is_linear_warmup_then_half_cosine():
    schedule = optimizer.make_schedule(_config(learning_rate=0.2, warmup_steps=10,
                                               num_train_steps=110, schedule='cosine'))
    for step in (0, 3, 10, 35, 60, 109, 110):
        expected = (0.2 * step / 10 if step < 10
                    else 0.1 * (1 + math.cos(math.pi * (step - 10) / 100)))
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), step


def test_step_schedule_decays_at_absolute_steps():
    schedule = optimizer.make_schedule(_config(
        learning_rate=0.2, warmup_steps=4, num_train_steps=100, schedule='step',
        lr_decay_boundaries=(30, 60), lr_decay_factor=0.1))
    for step, expected in ((0, 0.0), (2, 0.1), (4, 0.2), (29, 0.2), (30, 0.02), (59, 0.02),
                           (60, 0.002), (99, 0.002)):
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step


def test_linear_schedule_is_one_cycle_warmup_then_linear_to_zero():
    schedule = optimizer.make_schedule(_config(learning_rate=0.4, warmup_steps=20,
                                               num_train_steps=100, schedule='linear'))
    for step in (0, 5, 20, 40, 60, 99, 100):
        expected = 0.4 * step / 20 if step < 20 else 0.4 * (100 - step) / 80
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), step


def test_learning_rate_scales_with_the_global_batch():
    config = _config(learning_rate=0.075, lr_base_batch_size=512, batch_size=2048,
                     schedule='constant', warmup_steps=0)
    assert optimizer.peak_learning_rate(config) == pytest.approx(0.3)
    assert float(optimizer.make_schedule(config)(7)) == pytest.approx(0.3)


@pytest.mark.parametrize('values, key', [
    (dict(schedule='one_cycle'), 'config.schedule'),
    (dict(warmup_steps=1000, num_train_steps=1000), 'config.warmup_steps'),
    (dict(schedule='step', lr_decay_boundaries=(50, 20)), 'config.lr_decay_boundaries'),
    (dict(lr_base_batch_size=0), 'config.lr_base_batch_size'),
])
def test_bad_schedule_keys_are_named(values, key):
    with pytest.raises(ConfigError, match=key):
        optimizer.make_schedule(_config(**values))


# The optimizer: Gluon's 'nag' ---------------------------------------------------------------

def _gluon_nag(weights, grads_per_step, lr, momentum, wd, decayed):
    """MXNet's NAG update: g += wd * w (where decayed); m = momentum * m + g;
    w -= lr * (g + momentum * m)."""
    weights = {k: v.copy() for k, v in weights.items()}
    moms = {k: np.zeros_like(v) for k, v in weights.items()}
    for grads in grads_per_step:
        for k in weights:
            g = grads[k] + (wd * weights[k] if decayed[k] else 0.0)
            moms[k] = momentum * moms[k] + g
            weights[k] = weights[k] - lr * (g + momentum * moms[k])
    return weights


@pytest.mark.parametrize('decay_bn_bias', [False, True])
def test_optimizer_matches_gluon_nag_with_weight_decay_mask(decay_bn_bias):
    rng = np.random.default_rng(0)
    shapes = {'conv/kernel': (3, 3, 2, 4), 'conv/bias': (4,), 'bn/scale': (4,), 'bn/bias': (4,),
              'output/kernel': (4, 3)}
    weights = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(3)]

    def tree(flat):
        nested = {}
        for key, value in flat.items():
            module, name = key.split('/')
            nested.setdefault(module, {})[name] = jnp.asarray(value)
        return nested

    config = _config(learning_rate=0.1, schedule='constant', warmup_steps=0, momentum=0.9,
                     nesterov=True, weight_decay=0.01, weight_decay_bn_bias=decay_bn_bias)
    tx = optimizer.make_optimizer(config)
    params = tree(weights)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(tree(g), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    decayed = {k: decay_bn_bias or k.endswith('kernel') for k in shapes}
    expected = _gluon_nag(weights, grads, 0.1, 0.9, 0.01, decayed)
    for key, value in expected.items():
        module, name = key.split('/')
        np.testing.assert_allclose(params[module][name], value, rtol=1e-5, atol=1e-6, err_msg=key)


# Loss: label smoothing and mixup as in train_cifar.py ----------------------------------------

def test_mixup_and_label_smoothing_cross_entropy_match_the_official_targets():
    rng = np.random.default_rng(1)
    classes, eta, lam = 7, 0.1, 0.3
    labels = rng.integers(0, classes, 6)
    images = rng.normal(size=(6, 4, 4, 3)).astype(np.float32)
    logits = rng.normal(size=(6, classes)).astype(np.float32)

    def official_one_hot(y):  # on 1 - eta + eta/K, off eta/K
        out = np.full((len(y), classes), eta / classes)
        out[np.arange(len(y)), y] = 1 - eta + eta / classes
        return out

    targets = lam * official_one_hot(labels) + (1 - lam) * official_one_hot(labels[::-1])
    shifted = logits - logits.max(1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    expected = -(targets * log_softmax).sum(1)

    mixed_images, mixed_targets = steps.mixup(
        jnp.asarray(images), tasks.smoothed_one_hot(jnp.asarray(labels), classes, eta), lam)
    np.testing.assert_allclose(mixed_images, lam * images + (1 - lam) * images[::-1], rtol=1e-6)
    np.testing.assert_allclose(mixed_targets, targets, rtol=1e-6)
    np.testing.assert_allclose(tasks.cross_entropy(jnp.asarray(logits), mixed_targets), expected,
                               rtol=1e-5)


@pytest.mark.parametrize('values, key', [
    (dict(label_smoothing=1.0), 'config.label_smoothing'),
    (dict(mixup_alpha=-1.0), 'config.mixup_alpha'),
    (dict(mixup_off_steps=2000, num_train_steps=1000), 'config.mixup_off_steps'),
])
def test_bad_regularisation_keys_are_named(values, key):
    with pytest.raises(ConfigError, match=key):
        steps.check_regularisation(_config(**values))


# Mesh ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape, devices, expected', [
    ((-1, 1), 8, (8, 1)), ((2, -1), 8, (2, 4)), ((4, 2), 8, (4, 2)), ((1, 1), 8, (1, 1)),
    ((2, 1), 8, (2, 1)),
])
def test_mesh_shape_resolution(shape, devices, expected):
    assert mesh_lib.resolve_mesh_shape(shape, devices) == expected


@pytest.mark.parametrize('shape', [(3, 1), (-1, -1), (0, 1), (2, 2, 2), (16, 1)])
def test_bad_mesh_shapes_are_named(shape):
    with pytest.raises(ConfigError, match='config.mesh_shape'):
        mesh_lib.resolve_mesh_shape(shape, 8)


def test_bad_logical_axis_rules_are_named():
    with pytest.raises(ConfigError, match='config.logical_axis_rules'):
        mesh_lib.check_rules([('conv_out', 'tensor')])


# Summary: parameters and FLOPs ---------------------------------------------------------------

class _ConvDense(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = conv2d(8, 3, stride=2, padding=1)(x)
        return dense(5)(x.reshape(x.shape[0], -1))


def test_flops_and_parameters_per_image_against_a_closed_form():
    model = _ConvDense()
    variables = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)))))
    assert summary.count_params(variables['params']) == 3 * 3 * 3 * 8 + (5 * 5 * 8) * 5 + 5
    # XLA counts the multiply-adds that touch real pixels: along each axis the 5 outputs of a
    # stride-2, pad-1 3x3 window over 10 pixels see 2, 3, 3, 3, 3 of them.
    taps_per_axis = sum(sum(0 <= 2 * o - 1 + k < 10 for k in range(3)) for o in range(5))
    conv = 2 * taps_per_axis ** 2 * 3 * 8
    fully_connected = 2 * 200 * 5 + 5
    assert summary.flops_per_image(model, variables, (10, 10, 3)) == conv + fully_connected
    assert summary.describe('m', 1234, 2.5e8) == 'model m: 1,234 parameters, 0.25 GFLOPs per image'
    assert summary.describe('m', 1234, None) == 'model m: 1,234 parameters, GFLOPs per image unknown'


# Divergence on device -------------------------------------------------------------------------

class _TinyClassifier(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


@pytest.mark.parametrize('skip', [False, True])
def test_a_nonfinite_step_is_flagged_or_skipped_on_device(skip):
    """Three steps, the second on a batch holding a NaN: without skipping, the state records
    step 2 as the first non-finite one and keeps it; with skipping, step 2 leaves every array
    of the state as step 1 left it, is counted, and step 3 trains again."""
    config = _config(num_train_steps=10, skip_nonfinite_updates=skip)
    model, tx = _TinyClassifier(), optimizer.make_optimizer(config)
    mesh = mesh_lib.make_mesh((1, 1))
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(4, 6, 6, 3)).astype(np.float32),
                'label': np.array([0, 1, 2, 0], np.int32)} for _ in range(3)]
    batches[1]['image'][2, 3, 3, 1] = np.nan
    with jax.set_mesh(mesh):
        init_fn, _, shardings = state_lib.state_layout(model, tx, (1, 6, 6, 3), mesh, [])
        state = state_lib.create_state(init_fn, shardings, jax.random.key(0, impl='rbg'))
        sharding = mesh_lib.batch_sharding(mesh)
        train_step = steps.make_train_step(model, tx, optimizer.make_schedule(config), config,
                                           tasks.Classification(3), jax.random.key(1),
                                           shardings, sharding)
        states, logged = [], []
        for batch in batches:
            state, metrics = train_step(state, jax.device_put(batch, sharding))
            states.append(jax.device_get(state))
            logged.append(jax.device_get(metrics))
    assert not np.isfinite(logged[1]['train/loss'])
    assert [int(s.step) for s in states] == [1, 2, 3]
    arrays = lambda s: jax.tree.leaves((s.params, s.batch_stats, s.opt_state))  # noqa: E731
    if skip:
        assert [int(s.skipped_updates) for s in states] == [0, 1, 1]
        assert [int(s.nonfinite_step) for s in states] == [0, 0, 0]
        assert [float(m['train/skipped_updates']) for m in logged] == [0.0, 1.0, 1.0]
        for kept, before in zip(arrays(states[1]), arrays(states[0])):
            np.testing.assert_array_equal(kept, before)
        assert all(np.isfinite(a).all() for a in arrays(states[2]))
        assert not np.array_equal(states[2].params['Dense_0']['kernel'],
                                  states[1].params['Dense_0']['kernel'])
    else:
        assert [int(s.nonfinite_step) for s in states] == [0, 2, 2]
        assert [int(s.skipped_updates) for s in states] == [0, 0, 0]
        assert 'train/skipped_updates' not in logged[0]


class _TinySegmenter(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(3, (3, 3))(x) + x[..., :1] * jnp.arange(3.0)


@pytest.mark.parametrize('model', [_TinyClassifier(), _TinySegmenter()])
def test_eval_flip_averages_the_logits_of_the_mirror_images(model):
    """(logits(x) + unmirrored logits(mirror(x))) / 2, from two plain applies; per-pixel
    logits of the mirror image are mirrored back to their pixels."""
    mesh = mesh_lib.make_mesh((1, 1))
    images = np.random.default_rng(0).normal(size=(4, 6, 5, 3)).astype(np.float32)
    tx = optimizer.make_optimizer(_config())
    with jax.set_mesh(mesh):
        init_fn, _, shardings = state_lib.state_layout(model, tx, (1, 6, 5, 3), mesh, [])
        state = state_lib.create_state(init_fn, shardings, jax.random.key(0, impl='rbg'))
        sharding = mesh_lib.batch_sharding(mesh)
        plain, flipped = (steps.make_eval_step(model, lambda logits, _: logits, shardings,
                                               sharding, flip)
                          for flip in (False, True))
        batch = {'image': jax.device_put(images, sharding)}
        mirrored = {'image': jax.device_put(images[:, :, ::-1].copy(), sharding)}
        got = np.asarray(flipped(state, batch))
        once, other = np.asarray(plain(state, batch)), np.asarray(plain(state, mirrored))
    if other.ndim == 4:
        other = other[:, :, ::-1]
        assert not np.allclose(once, other, atol=1e-3)  # the mirror image is another input
    np.testing.assert_allclose(got, (once + other) / 2, rtol=1e-5, atol=1e-6)


def test_bfloat16_training_keeps_float32_state_and_follows_float32():
    """dtype='bfloat16': convolutions run in bf16, while parameters, BatchNorm statistics and
    optimizer state stay float32 (master weights); one step on the same batch and weights gives
    the float32 loss and update up to bf16 rounding."""
    config = _config(num_train_steps=10, learning_rate=0.1)
    tx = optimizer.make_optimizer(config)
    mesh = mesh_lib.make_mesh((1, 1))
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
             'label': rng.integers(0, 10, 8).astype(np.int32)}
    results = {}
    with jax.set_mesh(mesh):
        for dtype in (jnp.float32, jnp.bfloat16):
            # AFF in the last stage only: bf16 through every kind of layer at half the compile.
            model = aff_jax.create_model('cifar_aff_resnet32', num_classes=10, dtype=dtype,
                                         layers=(1, 1, 1), channels=(8, 8, 16, 32),
                                         start_layer=3)
            init_fn, _, shardings = state_lib.state_layout(model, tx, (1, 16, 16, 3), mesh, [])
            state = state_lib.create_state(init_fn, shardings, jax.random.key(0, impl='rbg'))
            initial = jax.device_get(state.params)
            sharding = mesh_lib.batch_sharding(mesh)
            train_step = steps.make_train_step(model, tx, optimizer.make_schedule(config),
                                               config, tasks.Classification(10),
                                               jax.random.key(1), shardings, sharding)
            jaxpr = str(train_step.trace(state, jax.device_put(batch, sharding)).jaxpr)
            state, metrics = train_step(state, jax.device_put(batch, sharding))
            results[dtype] = jax.device_get((state, metrics))
            if dtype == jnp.bfloat16:
                assert 'conv_general_dilated' in jaxpr and 'bf16[8,16,16,8]' in jaxpr
    (f32_state, f32_metrics), (bf16_state, bf16_metrics) = results[jnp.float32], results[jnp.bfloat16]
    arrays = lambda s: jax.tree.leaves((s.params, s.batch_stats, s.opt_state))  # noqa: E731
    floating = {a.dtype for a in arrays(bf16_state) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floating == {np.dtype(np.float32)}
    np.testing.assert_allclose(bf16_metrics['train/loss'], f32_metrics['train/loss'], rtol=2e-2)
    flat = lambda p: np.concatenate([np.ravel(a) for a in jax.tree.leaves(p)])  # noqa: E731
    f32_update = flat(f32_state.params) - flat(initial)
    bf16_update = flat(bf16_state.params) - flat(initial)
    assert np.linalg.norm(f32_update) > 0
    # bf16 keeps 8 significant bits; through BatchNorm on a batch of 8 the gradients differ by
    # several percent, but point the same way.
    cosine = bf16_update @ f32_update / np.linalg.norm(bf16_update) / np.linalg.norm(f32_update)
    assert cosine > 0.98, cosine


# Config overrides ------------------------------------------------------------------------------

def test_overrides_parse_literals_and_open_model_overrides():
    config = load_config(REPO / 'configs' / 'quickstart.py')
    apply_overrides(config, [('learning_rate', '1'), ('mesh_shape', '(2, 1)'),
                             ('fusion', 'iaff'), ('nesterov', 'false'), ('num_classes', '12'),
                             ('model_overrides.r', '2'), ('model_overrides.layers', '(2, 1, 1)')])
    assert (config.learning_rate, config.mesh_shape, config.fusion) == (1.0, (2, 1), 'iaff')
    assert (config.nesterov, config.num_classes) == (False, 12)
    model = aff_jax.create_model(config.model, num_classes=10, fusion=config.fusion,
                                 **config.model_overrides)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))['params']
    assert len(params['features']['2']) == 2  # two blocks in stage 1
    # r = 2: the MS-CAM bottleneck of the 32-channel stage has 32 / 2 channels.
    bottleneck = params['features']['4']['0']['attention']['local_att']['0']['kernel']
    assert nn.meta.unbox(bottleneck).shape == (1, 1, 32, 16)


@pytest.mark.parametrize('key, value, message', [
    ('learnin_rate', '0.1', 'config.learnin_rate: unknown config key; did you mean '
                            'learning_rate?'),
    ('model_overrides', '3', 'config.model_overrides is a group of keys'),
    ('batch_size', '2.5', "config.batch_size must be of type int, got '2.5'"),
    ('batch_size', 'abc', "config.batch_size must be of type int, got 'abc'"),
    ('no.such', '1', 'config.no.such: unknown config key'),
])
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as error:
        apply_overrides(base_config(), [(key, value)])
    assert str(error.value).startswith(message), str(error.value)


# The command line ----------------------------------------------------------------------------

@pytest.mark.parametrize('overrides, devices, key', [
    (['--config.dataset=no_such_dataset'], 1, 'config.dataset'),
    (['--config.model=no_such_model'], 1, 'config.model'),
    (['--config.fusion=no_such_fusion'], 1, 'config.fusion'),
    (['--config.mesh_shape=(3, 1)'], 4, 'config.mesh_shape'),
    (['--config.batch_size=6'], 4, 'config.batch_size'),
    (['--config.learnin_rate=0.1'], 1, 'config.learnin_rate: unknown config key; did you mean '
                                        'learning_rate?'),
    # The model is built after the dataset is read: a prepared one, so that nothing else prints.
    (['--config.dataset=imagefolder:{folder}', '--config.model_overrides.no_such_key=1'], 1,
     'config.model_overrides'),
    (['--config.batch_size=1'], 1, 'config.batch_size=1: BatchNorm'),
    (['--config.learning_rate=-1'], 1, 'config.learning_rate must be > 0'),
    (['--config.seed=-1'], 1, 'config.seed must be an int >= 0'),
    (['--config.num_train_steps'], 1, '--config.num_train_steps needs a value'),
], ids=['dataset', 'model', 'fusion', 'mesh', 'batch', 'unknown_key', 'unknown_override',
        'batch_of_one', 'learning_rate', 'seed', 'no_value'])
def test_bad_input_exits_nonzero_with_a_one_line_reason(tmp_path, train_env, image_folder,
                                                         overrides, devices, key):
    env = dict(train_env, **cpu_devices_env(devices, fast=False))
    process = run_train(tmp_path / 'run', [o.format(folder=image_folder) for o in overrides], env)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'error: {key}'), stderr
    assert 'Traceback' not in stderr


_TFDS_SCRIPT = '''
import json, sys
import tensorflow_datasets as tfds
from aff_jax.training import loop
from aff_jax.training.config import load_config

examples, workdir, values = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
config = load_config('configs/quickstart.py')
config.update_from_flattened_dict(values)
with tfds.testing.mock_data(num_examples=examples):
    result = loop.train_and_evaluate(config, workdir)
print(json.dumps(result.eval_metrics))
'''


def test_a_tfds_dataset_trains(tmp_path, train_env):
    """cifar10 through tfds.testing.mock_data (random images and labels): it trains, and the
    held-out count shows that the padding of the last eval batch is masked out."""
    examples = 50  # two eval batches of 32, the second with 14 padding examples
    values = {**TINY_RUN, 'dataset': 'cifar10'}
    process = subprocess.run(
        [sys.executable, '-c', _TFDS_SCRIPT, str(examples), str(tmp_path / 'run'),
         json.dumps(values)], cwd=REPO, env=train_env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    metrics = json.loads(process.stdout.strip().splitlines()[-1])
    assert metrics['eval/count'] == examples
    assert 0.0 <= metrics['eval/accuracy'] <= 1.0 and np.isfinite(metrics['eval/loss'])
    metrics_file = tmp_path / 'run' / 'metrics.jsonl'
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert rows[-1]['step'] == TINY_RUN['num_train_steps']


# Sweep recipes (base + grid, an argument required): every cell of theirs is checked and built
# in tests/test_ablation_configs.py (pointing_game.py's in tests/test_explain.py).
SWEEP_CONFIGS = ('ablation_context.py', 'ablation_integration.py', 'pointing_game.py')


@pytest.mark.parametrize('path, args', [
    *((p.name, ()) for p in sorted((REPO / 'configs').glob('*.py'))
      if p.name not in SWEEP_CONFIGS),
    ('cifar100_aff_resnet32.py', ('step',)),
    ('cifar10_fast.py', ('gpu',)),
])
def test_every_shipped_config_is_valid_and_builds_its_model(path, args):
    config = load_config(REPO / 'configs' / path, *args)
    loop.check_config(config)
    aff_jax.create_model(config.model, num_classes=config.num_classes, fusion=config.fusion,
                         **config.model_overrides)
