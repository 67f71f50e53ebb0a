"""Sharded training on 8 CPU devices (a subprocess with XLA_FLAGS, so the rest of the suite
keeps its single device).

* The same train steps on meshes (1, 1), (8, 1) and (4, 2) -- the last with conv output
  channels and classes sharded on ``model`` -- give the same losses and parameters.
* A checkpoint saved on the (4, 2) mesh restores on (8, 1) and on one device with identical
  values, each array laid out on the new mesh, and training continues with the same numbers.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, cpu_devices_env

STEPS = 3
BATCH = 16
IMAGE = (16, 16, 3)
NUM_CLASSES = 10
SHARDED_RULES = (('conv_out', 'model'), ('classes', 'model'))
MESHES = {'1x1': ((1, 1), ()), '8x1': ((8, 1), ()), '4x2': ((4, 2), SHARDED_RULES)}


def _config():
    from aff_jax.training.config import base_config
    c = base_config()
    c.model_overrides.layers = (1, 1, 1)
    c.model_overrides.channels = (8, 8, 16, 32)
    c.model_overrides.start_layer = 3  # AFF in the last stage only: half the compile time
    c.batch_size = BATCH
    c.num_train_steps = 100
    c.learning_rate = 0.2
    c.warmup_steps = 1
    c.mixup_alpha = 1.0
    c.label_smoothing = 0.1
    return c


def _worker(out: pathlib.Path) -> None:
    """Runs in the 8-device subprocess; writes results.npz and results.json to ``out``."""
    import jax
    import aff_jax
    from aff_jax.training import mesh as mesh_lib, optimizer, state as state_lib, steps, tasks
    from aff_jax.training.checkpoint import Checkpointer

    assert jax.device_count() == 8
    config = _config()
    model = aff_jax.create_model(config.model, num_classes=NUM_CLASSES, **config.model_overrides)
    tx = optimizer.make_optimizer(config)
    init_rng, step_rng = jax.random.split(jax.random.key(0, impl=config.rng_impl))
    rng = np.random.default_rng(0)
    batches = [{'image': rng.normal(size=(BATCH, *IMAGE)).astype(np.float32),
                'label': rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}
               for _ in range(STEPS + 1)]
    arrays, info, runs = {}, {}, {}

    def flat(tree, prefix):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            arrays[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)

    for name, (shape, rules) in MESHES.items():
        mesh = mesh_lib.make_mesh(shape)
        with jax.set_mesh(mesh):
            init_fn, abstract, shardings = state_lib.state_layout(
                model, tx, (1, *IMAGE), mesh, mesh_lib.check_rules(rules))
            state = state_lib.create_state(init_fn, shardings, init_rng)
            flat(state.params, f'{name}/init')
            batch_sharding = mesh_lib.batch_sharding(mesh)
            train_step = steps.make_train_step(model, tx, optimizer.make_schedule(config), config,
                                               tasks.Classification(NUM_CLASSES), step_rng,
                                               shardings, batch_sharding)
            losses = []
            for batch in batches[:STEPS]:
                state, metrics = train_step(state, jax.device_put(batch, batch_sharding))
                losses.append(float(metrics['train/loss']))
            flat(state, f'{name}/final')
            classifier = state.params['output']['kernel'].sharding
            info[name] = {'losses': losses, 'kernel_spec': list(classifier.spec),
                          'kernel_devices': len(classifier.device_set)}
            runs[name] = (mesh, abstract, shardings, train_step, state)

    # Save the (4, 2) state.
    mesh, _, _, train_step, state = runs['4x2']
    with jax.set_mesh(mesh):
        with Checkpointer(out / 'checkpoints', every_steps=100, keep=1) as checkpointer:
            checkpointer.save(STEPS, state, _config().to_dict(), force=True)
        _, metrics = train_step(state,
                                jax.device_put(batches[STEPS], mesh_lib.batch_sharding(mesh)))
    info['4x2']['next_loss'] = float(metrics['train/loss'])

    for name in ('8x1', '1x1'):
        mesh, abstract, shardings, train_step, _ = runs[name]
        with jax.set_mesh(mesh), Checkpointer(out / 'checkpoints', every_steps=100,
                                              keep=1) as checkpointer:
            restored = checkpointer.restore(STEPS, state_lib.with_shardings(abstract, shardings))
            flat(restored, f'{name}/restored')
            info[name]['restored_meshes'] = sorted(
                {str(dict(leaf.sharding.mesh.shape)) for leaf in jax.tree.leaves(restored)})
            _, metrics = train_step(restored,
                                    jax.device_put(batches[STEPS], mesh_lib.batch_sharding(mesh)))
            info[name]['next_loss'] = float(metrics['train/loss'])
    np.savez(out / 'results.npz', **arrays)
    (out / 'results.json').write_text(json.dumps(info))


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp('sharding')
    env = dict(os.environ, **cpu_devices_env(8), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(out / 'results.npz') as arrays:
        return dict(arrays), json.loads((out / 'results.json').read_text())


def _error_ratio(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| over the allowed 1e-5 * ||b||, per tensor; <= 1 passes.

    Elementwise ratios blow up on entries near 0. Tensors whose exact gradient is 0 (the bias
    of a conv followed by BatchNorm) hold only rounding noise (~1e-9), which depends on the
    reduction order and so on the mesh: an RMS floor of 1e-7 is allowed on top.
    """
    return float(np.linalg.norm(a - b) / (1e-5 * np.linalg.norm(b) + 1e-7 * np.sqrt(b.size)))


def _tree(arrays: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


@pytest.mark.parametrize('mesh', ['8x1', '4x2'])
def test_same_losses_and_parameters_on_every_mesh(results, mesh):
    arrays, info = results
    np.testing.assert_allclose(info[mesh]['losses'], info['1x1']['losses'], rtol=1e-5)
    assert info['1x1']['losses'][-1] < info['1x1']['losses'][0] * 1.5  # trained, not diverged
    reference = _tree(arrays, '1x1/final')
    tree = _tree(arrays, f'{mesh}/final')
    assert tree.keys() == reference.keys() and len(reference) > 50
    worst = max((_error_ratio(tree[k], reference[k]), k) for k in reference)
    assert worst[0] <= 1.0, worst
    # Initialisation does not depend on the mesh at all.
    for key, value in _tree(arrays, '1x1/init').items():
        np.testing.assert_array_equal(arrays[f'{mesh}/init{key}'], value, err_msg=key)


def test_model_axis_shards_the_parameters(results):
    _, info = results
    assert info['4x2']['kernel_spec'] == [None, 'model']
    assert info['4x2']['kernel_devices'] == 8
    assert info['8x1']['kernel_spec'] == [None, None]


@pytest.mark.parametrize('mesh, mesh_shape', [('8x1', "{'data': 8, 'model': 1}"),
                                              ('1x1', "{'data': 1, 'model': 1}")])
def test_checkpoint_from_4x2_restores_on_another_mesh(results, mesh, mesh_shape):
    arrays, info = results
    saved = _tree(arrays, '4x2/final')
    restored = _tree(arrays, f'{mesh}/restored')
    assert restored.keys() == saved.keys()
    for key, value in saved.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)
    assert info[mesh]['restored_meshes'] == [mesh_shape]
    np.testing.assert_allclose(info[mesh]['next_loss'], info['4x2']['next_loss'], rtol=1e-5)


if __name__ == '__main__':
    _worker(pathlib.Path(sys.argv[1]))
