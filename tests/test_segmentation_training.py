"""Segmentation in the trainer: the loss and metrics against NumPy references (ignored pixels,
an absent class), the same numbers on 8 devices as on 1, and the command line end to end on
aff_stopsign: metrics, predictions.png, exact resume after SIGKILL, one-line errors."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from aff_jax.training import tasks
from conftest import (assert_same_state, checkpointed_state, complete_steps, cpu_devices_env,
                      last_logged_step, metric_rows, run_train, wait_until)

REPO = pathlib.Path(__file__).resolve().parents[1]
K = 4
NAMES = ('background', 'road', 'sign', 'sky')


def labelled_batch(seed, shape=(3, 5, 6), absent=3):
    """Random logits (B, H, W, K), labels with ~20% ignored pixels and no pixel of class
    ``absent``, which the logits never predict either (a class absent from both)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(*shape, K)).astype(np.float32)
    logits[..., absent] = -10.0
    labels = rng.choice([0, 1, 2], size=shape)
    labels[rng.random(shape) < 0.2] = 255
    return logits, labels.astype(np.int32)


def numpy_scores(logits, labels, mask):
    """IoU per class from sets of pixels, straight from the definition."""
    keep = (labels != 255) & (mask[:, None, None] > 0)
    truth, guess = labels[keep], logits.argmax(-1)[keep]
    ious = {}
    for k, name in enumerate(NAMES):
        union = np.sum((truth == k) | (guess == k))
        if union:
            ious[name] = np.sum((truth == k) & (guess == k)) / union
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    losses = -np.take_along_axis(log_p, np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
    return {'eval/miou': np.mean(list(ious.values())),
            'eval/pixel_accuracy': np.mean(truth == guess),
            'eval/loss': losses[keep].sum() / keep.sum(),
            **{f'eval/iou/{name}': v for name, v in ious.items()}}


def test_eval_sums_and_scores_match_numpy():
    """Two batches, the second with a padding example: confusion on device, summed, scored."""
    task = tasks.Segmentation(K, NAMES)
    batches = [labelled_batch(0), labelled_batch(1)]
    masks = [np.ones(3, np.float32), np.array([1, 1, 0], np.float32)]
    sums = [jax.jit(task.eval_sums)(jnp.asarray(lg), {'label': jnp.asarray(lb), 'mask': m})
            for (lg, lb), m in zip(batches, masks)]
    totals = jax.tree.map(lambda a, b: a + b, *sums)
    assert totals['confusion'].dtype == jnp.int32 and totals['count'] == 5
    got = task.scores(jax.device_get(totals))
    logits, labels = (np.concatenate(parts) for parts in zip(*batches))
    want = numpy_scores(logits, labels, np.concatenate(masks))
    assert 'eval/iou/sky' not in got  # absent from truth and prediction: no IoU, not averaged
    assert sorted(got) == sorted([*want, 'eval/count'])
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)


def test_scores_of_a_constructed_confusion_matrix():
    confusion = np.array([[50, 10, 0], [5, 30, 0], [0, 0, 0]])
    scores = tasks.segmentation_scores(confusion, ('a', 'b', 'c'))
    assert scores['eval/iou/a'] == pytest.approx(50 / 65)
    assert scores['eval/iou/b'] == pytest.approx(30 / 45)
    assert 'eval/iou/c' not in scores
    assert scores['eval/miou'] == pytest.approx((50 / 65 + 30 / 45) / 2)
    assert scores['eval/pixel_accuracy'] == pytest.approx(80 / 95)
    # A class that is predicted but never true has IoU 0 and counts in the mean.
    scores = tasks.segmentation_scores(np.array([[5, 5], [0, 0]]), ('a', 'b'))
    assert scores['eval/iou/b'] == 0.0 and scores['eval/miou'] == pytest.approx(0.25)


def test_train_targets_ignore_pixels_and_smooth():
    """The train step's loss: mean smoothed cross-entropy over the pixels not ignored."""
    task = tasks.Segmentation(K, NAMES)
    logits, labels = labelled_batch(2)
    targets, weights = task.targets(jnp.asarray(labels), 0.1)
    losses = tasks.cross_entropy(jnp.asarray(logits), targets)
    loss = float(jnp.sum(losses * weights) / jnp.sum(weights))
    keep = labels != 255
    one_hot = np.eye(K)[np.where(keep, labels, 0)] * 0.9 + 0.1 / K
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    assert loss == pytest.approx(-(one_hot * log_p).sum(-1)[keep].mean(), rel=1e-5)
    accuracy = float(task.accuracy(jnp.asarray(logits), jnp.asarray(labels)))
    assert accuracy == pytest.approx(np.mean(logits.argmax(-1)[keep] == labels[keep]))


# ---------------------------------------------------------------- 8 devices vs 1

class TinySegmenter(nn.Module):
    """conv 3x3 -> BatchNorm (batch statistics span the devices) -> ReLU -> conv 1x1 to K."""
    num_classes: int = K

    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3, 3))(x)))
        return nn.Conv(self.num_classes, (1, 1))(x)


def _sharded_worker(out: pathlib.Path) -> None:
    """Runs with 8 CPU devices: train steps and an evaluation on meshes (8, 1) and (1, 1)."""
    import ml_collections
    import optax
    from aff_jax.training import mesh as mesh_lib, state as state_lib, steps

    assert jax.device_count() == 8
    config = ml_collections.ConfigDict(dict(num_train_steps=10, mixup_alpha=0.0,
                                            mixup_off_steps=0, label_smoothing=0.1,
                                            skip_nonfinite_updates=False))
    task = tasks.Segmentation(K, NAMES)
    model, tx = TinySegmenter(), optax.sgd(0.1)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    labels = np.stack([labelled_batch(i, shape=(8, 8))[1] for i in range(16)])
    batch = {'image': images, 'label': labels}
    eval_batch = {**batch, 'mask': np.array([1.0] * 13 + [0.0] * 3, np.float32)}
    results = {}
    for name, shape in (('8x1', (8, 1)), ('1x1', (1, 1))):
        mesh = mesh_lib.make_mesh(shape)
        with jax.set_mesh(mesh):
            init_fn, _, shardings = state_lib.state_layout(model, tx, (1, 8, 8, 3), mesh, [])
            state = state_lib.create_state(init_fn, shardings, jax.random.key(0, impl='rbg'))
            sharding = mesh_lib.batch_sharding(mesh)
            train_step = steps.make_train_step(model, tx, optax.constant_schedule(0.1), config,
                                               task, jax.random.key(1), shardings, sharding)
            losses = []
            for _ in range(3):
                state, metrics = train_step(state, jax.device_put(batch, sharding))
                losses.append(float(metrics['train/loss']))
            eval_step = steps.make_eval_step(model, task.eval_sums, shardings, sharding)
            sums = eval_step(state, jax.device_put(eval_batch, sharding))
            results[name] = {'losses': losses, 'confusion': np.asarray(sums['confusion']).tolist(),
                             'scores': task.scores(jax.device_get(sums))}
    (out / 'results.json').write_text(json.dumps(results))


def test_eight_devices_give_the_numbers_of_one(tmp_path):
    env = dict(os.environ, **cpu_devices_env(8),
               PYTHONPATH=f'{REPO}{os.pathsep}{REPO / "tests"}')
    process = subprocess.run([sys.executable, __file__, str(tmp_path)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    sharded, single = results['8x1'], results['1x1']
    np.testing.assert_allclose(sharded['losses'], single['losses'], rtol=1e-5)
    assert sharded['confusion'] == single['confusion']
    assert sum(map(sum, single['confusion'])) == int(np.sum(
        np.stack([labelled_batch(i, shape=(8, 8))[1] for i in range(13)]) != 255))
    for key, value in single['scores'].items():
        assert sharded['scores'][key] == pytest.approx(value, rel=1e-5), key


# ---------------------------------------------------------------- the command line

STEPS = 30
SEG_RUN = {'model_overrides.layers': (1, 1, 1), 'model_overrides.channels': (8, 8, 16, 32),
           'model_overrides.pyramid_channels': 8, 'batch_size': 8, 'eval_batch_size': 100,
           'num_train_steps': STEPS, 'warmup_steps': 2, 'log_every_steps': 5,
           'eval_every_steps': 15, 'checkpoint_every_steps': 10}
SEG_OVERRIDES = [f'--config.{key}={value}' for key, value in SEG_RUN.items()]
RECIPE = 'configs/stopsign_fpn.py'


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, train_env):
    workdir = tmp_path_factory.mktemp('segmentation')
    process = run_train(workdir, SEG_OVERRIDES, train_env, config=RECIPE)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return workdir, stdout


def test_segmentation_run_reports_miou_and_draws_predictions(uninterrupted):
    workdir, stdout = uninterrupted
    rows = metric_rows(workdir)
    evals = [row for row in rows if 'eval/miou' in row]
    assert [row['step'] for row in evals] == [15, STEPS]
    for row in evals:
        assert set(row) >= {'eval/loss', 'eval/miou', 'eval/pixel_accuracy',
                            'eval/iou/background'}
        assert 0.0 <= row['eval/miou'] <= 1.0
    assert [row['step'] for row in rows if 'train/loss' in row] == list(range(5, STEPS + 1, 5))
    final = stdout.strip().splitlines()[-1]
    assert final.startswith(f'final held-out mIoU after {STEPS} steps: '), final
    assert f'{100 * evals[-1]["eval/miou"]:.2f}%' in final and '500 test images' in final
    with Image.open(workdir / 'predictions.png') as picture:
        assert picture.size[0] > 200 and picture.size[1] > 600  # six rows of three panels
    assert (workdir / 'curves.png').stat().st_size > 0


def test_sigkill_then_resume_is_exact(uninterrupted, tmp_path, train_env):
    workdir = tmp_path / 'interrupted'
    process = run_train(workdir, SEG_OVERRIDES, train_env, config=RECIPE)
    wait_until(lambda: complete_steps(workdir) and last_logged_step(workdir) > 10, process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    killed_at = complete_steps(workdir)[-1]
    assert killed_at < STEPS
    process = run_train(workdir, SEG_OVERRIDES, train_env, config=RECIPE)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert f'resuming from the checkpoint at step {killed_at}' in stdout
    reference = uninterrupted[0]
    assert metric_rows(workdir) == metric_rows(reference)
    assert_same_state(checkpointed_state(workdir, STEPS), checkpointed_state(reference, STEPS))


def write_segfolder(root: pathlib.Path, label: int) -> pathlib.Path:
    """Two 16x16 images per split whose masks hold 0, 1 and ``label``."""
    for split in ('train', 'test'):
        for sub in ('images', 'masks'):
            (root / split / sub).mkdir(parents=True)
        for i in range(2):
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8] = 1
            mask[10:] = label
            Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(
                root / split / 'images' / f'{i}.png')
            Image.fromarray(mask).save(root / split / 'masks' / f'{i}.png')
    return root


@pytest.mark.parametrize('config, overrides, start, names', [
    ('configs/quickstart.py', ['--config.model=fpn_resnet20'], 'error: config.model',
     ["'fpn_resnet20' is a segmentation model", "'aff_multiscale' is a classification"]),
    (RECIPE, ['--config.model=cifar_aff_resnet32'], 'error: config.model',
     ["'aff_stopsign' is a segmentation dataset"]),
    (RECIPE, ['--config.mixup_alpha=0.2'], 'error: config.mixup_alpha', ['segmentation']),
    (RECIPE, ['--config.num_classes=2', 'SEGFOLDER'], 'error: config.dataset',
     ['masks/0.png', 'label 7']),
], ids=['segmentation-model-classification-data', 'classifier-segmentation-data', 'mixup',
        'segfolder-label'])
def test_bad_segmentation_input_is_one_line(tmp_path, train_env, config, overrides, start,
                                            names):
    folder = write_segfolder(tmp_path / 'folder', label=7)
    overrides = [f'--config.dataset=segfolder:{folder}' if o == 'SEGFOLDER' else o
                 for o in overrides]
    process = run_train(tmp_path / 'run', overrides, train_env, config=config)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    # The last line: a first use of an embedded dataset prints TFDS's generation progress.
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(start) and 'Traceback' not in stderr, stderr[-3000:]
    for name in names:
        assert name in line, line


def test_a_segfolder_trains(tmp_path, train_env):
    """A user's folder with labels 0, 1, 7 (num_classes 8 inferred) trains and scores every
    class present; classes 2..6 are absent from truth and predictions alike or predicted."""
    folder = write_segfolder(tmp_path / 'folder', label=7)
    overrides = [*SEG_OVERRIDES, f'--config.dataset=segfolder:{folder}',
                 '--config.batch_size=2', '--config.eval_batch_size=2',
                 '--config.num_train_steps=4', '--config.log_every_steps=2',
                 '--config.eval_every_steps=2']
    process = run_train(tmp_path / 'run', overrides, train_env, config=RECIPE)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert 'dataset segfolder:' in stdout and '8 classes' in stdout
    final = metric_rows(tmp_path / 'run')[-1]
    assert {'eval/iou/class_0', 'eval/iou/class_1', 'eval/iou/class_7'} <= set(final)


if __name__ == '__main__':
    _sharded_worker(pathlib.Path(sys.argv[1]))
