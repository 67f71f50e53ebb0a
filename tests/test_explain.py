"""Gates on request, Grad-CAM, the pointing game and ``python -m aff_jax.explain`` (issue 11).

The sown gates and context logits are checked against the float64 numpy reference of
test_fusion; Grad-CAM against hand computations (a split model's gradients, and the closed
form of a GAP + dense head) upsampled by PyTorch's bilinear ``align_corners=False``; the CLI
on a quick-start workdir trained for a few steps."""
from __future__ import annotations

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax._src.interpreters import partial_eval as pe
from PIL import Image

import aff_jax
from aff_jax import explain
from aff_jax.training import loop, sweep
from aff_jax.training.config import load_with_overrides
from conftest import REPO, TINY_RUN, run_train
from test_fusion import LEARNED, Reference, cat, inputs, make, randomized, setup

# name -> (the gate's input from x, y; its contexts), for every single-gate scheme.
GATE_OF = {
    'se': (lambda x, y: y, ('global_att',)),
    'gau': (lambda x, y: y, ('global_att',)),
    'highway': (lambda x, y: x, ('global_att',)),
    'sa': (cat, ('global_att',)),
    'sk': (lambda x, y: x + y, ('global_att',)),
    'ms_se': (lambda x, y: y, ('local_att', 'global_att')),
    'ms_gau': (lambda x, y: y, ('local_att', 'global_att')),
    'ms_sa': (cat, ('local_att', 'global_att')),
    'ms_modulate_sum': (lambda x, y: x + y, ('local_att', 'global_att')),
    'ms_refine_sum': (lambda x, y: x + y, ('local_att', 'global_att')),
    'aff_global_global': (lambda x, y: x + y, ('global_att', 'global_att2')),
    'aff_local_local': (lambda x, y: x + y, ('local_att', 'local_att2')),
    'aff': (lambda x, y: x + y, ('local_att', 'global_att')),
}
QUICKSTART = dict(num_classes=10, layers=(1, 1, 1), channels=(8, 8, 16, 32))


def sown(module, variables, *args):
    out, state = module.apply(variables, *args, False, mutable=['intermediates'])
    return out, jax.tree.map(np.asarray, state['intermediates'])


def init(model, images, seed=1):
    """Random variables of ``model`` (test_fusion's ``randomized``) from its abstract
    initialisation: running a host's initialisers op by op costs a minute on 2 cores."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return randomized(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nn.unbox(shapes)), seed)


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5,
                               err_msg=what)


# ---------------------------------------------------------------- gates on request

def test_every_learned_scheme_has_its_gate_checked_here():
    assert sorted(GATE_OF) == sorted(set(LEARNED) - {'concat', 'iaff'})


@pytest.mark.parametrize('name', sorted(GATE_OF))
def test_sown_gate_and_logits_match_numpy(name):
    module = make(name)
    x, y = inputs(2)
    variables = setup(module, x, y, seed=3)
    _, recorded = sown(module, variables, x, y)
    ref = Reference(variables, train=False)
    gate_input, contexts = GATE_OF[name]
    z = gate_input(x.astype(np.float64), y)
    assert recorded['gate'][0].shape == x.shape  # global-only gates broadcast over H, W
    assert_close(recorded['gate'][0], np.broadcast_to(ref.gate(z, *contexts), x.shape), 'gate')
    assert sorted(k for k in recorded if k != 'gate') == sorted(contexts)
    for context in contexts:
        (logits,) = recorded[context]['logits']
        assert_close(logits, ref.context(context, z), context)


@pytest.mark.parametrize('reuse_global', [False, True])
def test_iaff_sows_both_gates(reuse_global):
    module = make('iaff', reuse_global=reuse_global)
    x, y = inputs(4)
    variables = setup(module, x, y, seed=5)
    _, recorded = sown(module, variables, x, y)
    ref = Reference(variables, train=False)
    x64 = x.astype(np.float64)
    initial = ref.gate(x64 + y, 'local_att', 'global_att')
    xi = initial * x64 + (1 - initial) * y
    second = 'global_att' if reuse_global else 'global_att2'
    assert_close(recorded['initial_gate'][0], initial, 'initial_gate')
    assert_close(recorded['gate'][0], ref.gate(xi, 'local_att2', second), 'gate')
    # The port's second stage calls global_att again: two records, the second of xi.
    assert len(recorded['global_att']['logits']) == (2 if reuse_global else 1)
    assert_close(recorded['global_att']['logits'][-1],
                 ref.context('global_att', xi if reuse_global else x64 + y), 'global_att')
    assert ('global_att2' in recorded) == (not reuse_global)


def test_mscam_sows_its_gate():
    module = aff_jax.MSCAM(r=2)
    x, _ = inputs(6)
    variables = randomized(module.init(jax.random.key(0), x, False), 7)
    _, state = module.apply(variables, x, False, mutable=['intermediates'])
    ref = Reference(variables, train=False)
    assert_close(state['intermediates']['gate'][0],
                 ref.gate(x.astype(np.float64), 'local_att', 'global_att'), 'gate')


def live_equations(closed):
    """The jaxpr with its dead equations removed (what no output depends on)."""
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return jaxpr


@pytest.mark.parametrize('name', ['sk', 'aff', 'iaff'])
def test_without_intermediates_outputs_and_jaxpr_are_unchanged(name):
    """Plain apply: the same output as with the gates recorded, no equation computed for
    them (its jaxpr has nothing dead), and exactly the live part of the recording program."""
    module = make(name)
    x, y = inputs(8)
    variables = setup(module, x, y, seed=9)

    def plain(v, a, b):
        return module.apply(v, a, b, False)

    def recording(v, a, b):
        return module.apply(v, a, b, False, mutable=['intermediates'])[0]

    np.testing.assert_array_equal(np.asarray(plain(variables, x, y)),
                                  np.asarray(recording(variables, x, y)))
    plain_jaxpr = jax.make_jaxpr(plain)(variables, x, y)
    recording_jaxpr = jax.make_jaxpr(recording)(variables, x, y)
    assert str(live_equations(plain_jaxpr)) == str(plain_jaxpr.jaxpr)
    assert str(live_equations(recording_jaxpr)) == str(plain_jaxpr.jaxpr)


def test_training_step_records_nothing():
    """mutable=['batch_stats'] (the train step's) neither records gates nor changes the output."""
    module = make('aff')
    x, y = inputs(10)
    variables = setup(module, x, y)
    out, updates = module.apply(variables, x, y, True, mutable=['batch_stats'])
    assert set(updates) == {'batch_stats'}
    out2, both = module.apply(variables, x, y, True, mutable=['batch_stats', 'intermediates'])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    assert 'gate' in both['intermediates']


def test_attention_maps_of_a_host():
    model = aff_jax.create_model('cifar_aff_resnet32', **QUICKSTART)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = init(model, images)
    maps = jax.jit(lambda v, x: explain.attention_maps(model, v, x))(variables, images)
    assert {path: m.shape for path, m in maps.items()} == {
        'features.2.0.attention': (2, 32, 32, 8), 'features.3.0.attention': (2, 16, 16, 16),
        'features.4.0.attention': (2, 8, 8, 32)}
    assert all(0.0 <= float(m.min()) and float(m.max()) <= 1.0 for m in maps.values())
    add = aff_jax.create_model('cifar_aff_resnet32', fusion='add', **QUICKSTART)
    assert explain.attention_maps(add, init(add, images), images) == {}


# ---------------------------------------------------------------- Grad-CAM

def torch_upsample(cam, height, width):
    """PyTorch's bilinear upsampling (align_corners=False) of (N, h, w) maps."""
    t = torch.from_numpy(np.asarray(cam, np.float64))[:, None]
    return torch.nn.functional.interpolate(t, size=(height, width), mode='bilinear',
                                           align_corners=False)[:, 0].numpy()


def hand_cam(acts, grads, height, width):
    """Grad-CAM from activations and gradients (N, h, w, C), float64 numpy."""
    weights = grads.mean(axis=(1, 2))
    cam = np.maximum(np.einsum('nhwc,nc->nhw', acts, weights), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)
    return torch_upsample(cam, height, width)


class Split(nn.Module):
    """A small classifier whose two halves can be run alone: ``first`` (a stride-2 conv, the
    layer explained) and ``rest`` (conv, ReLU, pool, dense)."""

    def setup(self):
        self.stem = nn.Conv(6, (3, 3), strides=2)
        self.body = nn.Conv(5, (3, 3))
        self.head = nn.Dense(4)

    def first(self, x):
        return self.stem(x)

    def rest(self, a):
        return self.head(jax.nn.relu(self.body(a)).mean(axis=(1, 2)))

    def __call__(self, x, train):
        return self.rest(self.first(x))


def test_grad_cam_against_a_split_model():
    model = Split()
    images = jax.random.normal(jax.random.key(2), (3, 16, 16, 2))
    variables = init(model, images, seed=3)
    acts = model.apply(variables, images, method='first')
    logits = model.apply(variables, images, False)
    targets = np.array([2, 0, 3])
    grads = jax.grad(lambda a: jnp.sum(model.apply(variables, a, method='rest')[
        np.arange(3), targets]))(acts)
    want = hand_cam(np.asarray(acts, np.float64), np.asarray(grads, np.float64), 16, 16)
    got = jax.jit(lambda v, x: explain.grad_cam(model, v, x, layer='stem', target=targets))(
        variables, images)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # Default target: the predicted class.
    predicted = np.asarray(jnp.argmax(logits, -1))
    grads = jax.grad(lambda a: jnp.sum(model.apply(variables, a, method='rest')[
        np.arange(3), predicted]))(acts)
    want = hand_cam(np.asarray(acts, np.float64), np.asarray(grads, np.float64), 16, 16)
    got = jax.jit(lambda v, x: explain.grad_cam(model, v, x, layer='stem'))(variables, images)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_grad_cam_of_the_last_stage_in_closed_form():
    """The quick-start host's default layer, the final BN (``features.5``), feeds ReLU, global
    average pooling and the dense head, so dS/dA = W[:, c] / (h w) where A > 0, else 0."""
    model = aff_jax.create_model('cifar_aff_resnet32', **QUICKSTART)
    images = jax.random.normal(jax.random.key(4), (2, 32, 32, 3))
    variables = init(model, images, seed=5)
    assert explain.default_layer(model) == 'features.5'
    _, state = jax.jit(lambda v, x: model.apply(
        v, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda m, _: m.path == ('features', '5')))(variables, images)
    acts = np.asarray(state['intermediates']['features']['5']['__call__'][0], np.float64)
    kernel = np.asarray(variables['params']['output']['kernel'], np.float64)  # (C, K)
    target = 7
    grads = (acts > 0) * kernel[:, target] / (acts.shape[1] * acts.shape[2])
    want = hand_cam(acts, grads, 32, 32)
    got = jax.jit(lambda v, x: explain.grad_cam(model, v, x, target=target))(variables, images)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# One small preset per host family; the segmentation decoders need a target.
HOSTS = {
    'cifar_aff_resnet32': dict(layers=(1, 1, 1), channels=(8, 8, 16, 32)),
    'cifar_aff_resnext38_32x4d': dict(layers=(1, 1, 1), channels=16, cardinality=4,
                                      bottleneck_width=8, r=4),
    'cifar_inception_resnet20': dict(layers=(1, 1, 1), channels=(8, 8, 16, 32)),
    'aff_resnet50': dict(layers=(1, 1, 1, 1), stem_width=8),
    'aff_resnext50_32x4d': dict(layers=(1, 1, 1, 1), channels=8, cardinality=4,
                                bottleneck_width=16, stem_width=8, r=4),
    'tv_resnet18': dict(layers=(1, 1, 1, 1), small_input=True),
    'fpn': dict(backbone='cifar_resnet32', layers=(1, 1, 1), channels=(8, 8, 16, 32),
                pyramid_channels=8),
    'unet': dict(backbone='tv_resnet18', layers=(1, 1, 1, 1), small_input=True),
}


def test_every_host_family_is_covered():
    from aff_jax.models import registry
    hosts = {registry.preset(name).host for name in aff_jax.list_models()
             if not aff_jax.models.is_segmentation(name)}
    covered = {registry.preset(name).host for name in HOSTS if name in registry._PRESETS}
    assert covered == hosts
    assert {'fpn', 'unet'} <= set(HOSTS)


@pytest.mark.parametrize('name', sorted(HOSTS))
def test_grad_cam_shapes_and_range_for_each_host(name):
    size = 64 if name.startswith(('aff_', 'tv_')) else 32
    model = aff_jax.create_model(name, num_classes=3, **HOSTS[name])
    images = jax.random.normal(jax.random.key(6), (2, size, size, 3))
    variables = init(model, images, seed=7)
    segmentation = aff_jax.models.is_segmentation(name)
    if segmentation:
        with pytest.raises(ValueError, match='give target='):
            jax.eval_shape(lambda v, x: explain.grad_cam(model, v, x), variables, images)
    maps = np.asarray(jax.jit(lambda v, x: explain.grad_cam(
        model, v, x, target=1 if segmentation else None))(variables, images))
    assert maps.shape == (2, size, size) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.max() > 0.5


def test_grad_cam_errors_name_the_problem():
    model = aff_jax.create_model('cifar_aff_resnet32', **QUICKSTART)
    images = jnp.zeros((2, 32, 32, 3))
    variables = init(model, images)

    def traced(**kw):  # the checks happen while tracing: no need to run anything
        return jax.eval_shape(lambda v, x: explain.grad_cam(model, v, x, **kw), variables,
                              images)

    with pytest.raises(ValueError, match=r"'features\.9'.*did you mean"):
        traced(layer='features.9')
    with pytest.raises(ValueError, match='NHWC'):
        traced(layer='output')
    with pytest.raises(ValueError, match='target=10 is not a class'):
        traced(target=10)
    with pytest.raises(ValueError, match='2 ints'):
        traced(target=np.array([1, 2, 3]))


def test_grad_cam_is_batch_sharded_under_jit():
    """Two CPU devices are not available in this process, so the mesh has one; the step is
    the CLI's, with the eval step's shardings."""
    model = aff_jax.create_model('cifar_aff_resnet32', **QUICKSTART)
    images = jax.random.normal(jax.random.key(8), (4, 32, 32, 3))
    variables = init(model, images, seed=9)
    mesh = jax.make_mesh((1, 1), ('data', 'model'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(lambda v, x: explain.grad_cam(model, v, x), in_shardings=(replicated, batch),
                   out_shardings=batch)
    got = step(variables, jax.device_put(images, batch))
    assert got.sharding == batch
    unsharded = jax.jit(lambda v, x: explain.grad_cam(model, v, x))(variables, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(unsharded), atol=1e-6)


# ---------------------------------------------------------------- the pointing game

def test_pointing_game_on_constructed_cases():
    maps = np.zeros((6, 8, 8), np.float32)
    boxes = np.array([[2, 2, 4, 5]] * 6)
    maps[0, 3, 3] = 1.0      # inside
    maps[1, 6, 6] = 1.0      # outside
    maps[2, 2, 5] = 1.0      # on the box's top-right corner: inside
    maps[3, 4, 2] = 1.0      # on its bottom-left corner: inside
    maps[4, 5, 3] = 1.0      # one row below the bottom edge: outside
    maps[5, 0, 0] = 0.5      # a tie: the first maximum in row-major order counts
    maps[5, 3, 4] = 0.5
    np.testing.assert_array_equal(explain.peaks(maps),
                                  [[3, 3], [6, 6], [2, 5], [4, 2], [5, 3], [0, 0]])
    np.testing.assert_array_equal(explain.pointing_hits(maps, boxes),
                                  [True, False, True, True, False, False])
    assert explain.pointing_game(maps, boxes) == 0.5


def test_pointing_game_rejects_bad_boxes():
    maps = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r'\(N, 4\) for 2 maps'):
        explain.pointing_hits(maps, np.zeros((3, 4)))
    with pytest.raises(ValueError, match='ymin <= ymax'):
        explain.pointing_hits(maps, np.array([[2, 0, 1, 3], [0, 0, 1, 1]]))
    with pytest.raises(ValueError, match=r'\(N, H, W\)'):
        explain.peaks(np.zeros((4, 4)))


def test_pointing_game_sweep_cells():
    cells = sweep.expand(load_with_overrides(str(REPO / 'configs/pointing_game.py'), []))
    fusions = ('add', 'aff', 'iaff')
    assert [(c.config.fusion, c.config.seed) for c in cells] == [
        (f, s) for s in (0, 1, 2) for f in fusions]
    quickstart = load_with_overrides(str(REPO / 'configs/quickstart.py'), [])
    for cell in cells:
        loop.check_config(cell.config)
        differing = {k for k in quickstart if quickstart[k] != cell.config[k]}
        assert differing <= {'fusion', 'seed', 'warmup_steps'}
        assert cell.config.warmup_steps == 20


# ---------------------------------------------------------------- the CLI

STEPS = 10


@pytest.fixture(scope='module')
def quickstart_run(tmp_path_factory, fast_train_env):
    """A quick-start workdir trained for STEPS steps on aff_multiscale."""
    workdir = tmp_path_factory.mktemp('quickstart')
    values = {**TINY_RUN, 'num_train_steps': STEPS, 'checkpoint_every_steps': STEPS,
              'eval_every_steps': STEPS, 'dataset': 'aff_multiscale'}
    process = run_train(workdir, [f'--config.{k}={v}' for k, v in values.items()], fast_train_env)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return workdir


def run_explain(args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'aff_jax.explain', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_the_report_and_plays_the_pointing_game(quickstart_run, fast_train_env,
                                                           tmp_path):
    out = tmp_path / 'report'
    result = run_explain([f'--workdir={quickstart_run}', f'--out={out}', '--num_images=3',
                          '--pointing-game'], fast_train_env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / 'explain.json').read_text())
    assert record['step'] == STEPS and record['layer'] == 'features.5'
    # TINY_RUN fuses with AFF in the last stage only.
    assert record['gate_modules'] == ['features.4.0.attention']
    game = record['pointing_game']
    assert game['images'] == 1000 and 0 <= game['hits'] <= 1000
    assert game['fraction'] == game['hits'] / 1000
    assert f'pointing game: {game["hits"]}/1000' in result.stdout
    pngs = ['summary.png'] + [f'image_{i:03d}_{kind}.png' for i in range(3)
                              for kind in ('input', 'gradcam', 'gate_0')]
    for name in pngs:
        with Image.open(out / name) as image:
            assert image.size[0] >= 128 and image.size[1] >= 128, name
            assert np.asarray(image).std() > 0, name
    index = (out / 'index.html').read_text()
    assert all(name in index for name in pngs)
    assert f'{game["hits"]}/1000' in index
    assert json.loads((out / 'config.json').read_text())['num_train_steps'] == STEPS
    assert not (out / 'image_003_input.png').exists()


def test_cli_errors_are_one_line(quickstart_run, fast_train_env, tmp_path, image_folder):
    result = run_explain([f'--workdir={quickstart_run}', f'--out={tmp_path}',
                          f'--dataset=imagefolder:{image_folder}', '--pointing-game'],
                         fast_train_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --pointing-game needs the target boxes that only aff_multiscale records; "
        f"the dataset is 'imagefolder:{image_folder}'"]
    result = run_explain([f'--workdir={tmp_path / "none"}', f'--out={tmp_path}'], fast_train_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith('error: no checkpoint in ')
    result = run_explain([f'--workdir={quickstart_run}', f'--out={tmp_path}',
                          '--layer=features.9'], fast_train_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --layer/--target: layer 'features.9': no module at that path runs in this "
        "model; did you mean features.5")
