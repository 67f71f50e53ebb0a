"""``python -m train.evaluate``: a checkpoint (or the same weights converted) scores exactly what
the trainer's final evaluation logged, top-5 agrees with numpy, and each bad input is one line."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aff_jax.interop import convert
from aff_jax.training import loop, tasks
from aff_jax.training.config import load_with_overrides, split_overrides
from aff_jax.training.errors import ConfigError
from conftest import (FOLDER_CLASSES, FOLDER_SPLITS, REPO, TINY_RUN, checkpointed_state,
                      metric_rows, run_train)

STEPS = 10
CONFIG = 'configs/quickstart.py'


def overrides(image_folder) -> list[str]:
    # Additive short skips: the fusion plays no part here, and without it the train step
    # compiles in two thirds of the time.
    values = {**TINY_RUN, 'num_train_steps': STEPS, 'fusion': 'add',
              'dataset': f'imagefolder:{image_folder}'}
    return [f'--config.{key}={value}' for key, value in values.items()]


def run_evaluate(workdir, args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'train.evaluate', f'--config={CONFIG}',
                           f'--workdir={workdir}', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, image_folder, fast_train_env):
    """A finished run of STEPS steps (its last step checkpointed and evaluated)."""
    workdir = tmp_path_factory.mktemp('run')
    process = run_train(workdir, overrides(image_folder), fast_train_env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return workdir


def final_eval(workdir) -> dict[str, float]:
    row = metric_rows(workdir)[-1]
    assert row['step'] == STEPS
    return {name: value for name, value in row.items() if name.startswith('eval/')}


def scored(record: dict) -> dict[str, float]:
    return {name: value for name, value in record.items()
            if name.startswith('eval/') and name != 'eval/count'}


def test_checkpoint_scores_equal_the_final_evaluation(trained, image_folder, fast_train_env):
    result = run_evaluate(trained, overrides(image_folder), fast_train_env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((trained / 'eval.json').read_text())
    want = final_eval(trained)
    assert set(want) == {'eval/loss', 'eval/accuracy', 'eval/top5_accuracy'}
    assert scored(record) == want  # bit for bit: the same eval step on the same state
    assert record['eval/count'] == FOLDER_CLASSES * FOLDER_SPLITS['test']
    assert (record['step'], record['split']) == (STEPS, 'test')
    assert record['checkpoint'] == str(trained / 'checkpoints' / str(STEPS))
    assert (f'top-1 accuracy {100 * want["eval/accuracy"]:.2f}%, top-5 accuracy '
            f'{100 * want["eval/top5_accuracy"]:.2f}%') in result.stdout


def test_converted_weights_score_the_same(trained, image_folder, fast_train_env, tmp_path):
    """The checkpoint's variables written as ``convert`` writes them, scored with --init_from
    in a workdir without checkpoints."""
    state = checkpointed_state(trained, STEPS)
    weights = convert.save_variables(str(tmp_path / 'weights'), {
        'params': state['params'], 'batch_stats': state['batch_stats']})
    result = run_evaluate(tmp_path / 'out', [*overrides(image_folder), f'--init_from={weights}'],
                          fast_train_env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / 'out' / 'eval.json').read_text())
    assert scored(record) == final_eval(trained)
    assert (record['step'], record['checkpoint']) == (None, weights)


def test_no_checkpoint_is_a_one_line_error(tmp_path, image_folder, fast_train_env):
    result = run_evaluate(tmp_path, overrides(image_folder), fast_train_env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: no checkpoint in {tmp_path / "checkpoints"}; train one with python -m train, '
        f'or give converted weights with --init_from']
    assert not any(tmp_path.iterdir())  # neither checkpoints/ nor eval.json


def in_process_config(image_folder, *extra: str):
    """The tests' config, without the persistent compilation cache (this process's JAX
    settings are shared with other tests)."""
    _, pairs = split_overrides([*overrides(image_folder), '--config.compilation_cache=', *extra])
    return load_with_overrides(str(REPO / CONFIG), pairs)


def test_unknown_split_and_another_model_are_named(trained, image_folder):
    with pytest.raises(ConfigError, match=r"^unknown split 'validation'; the datasets have "
                                          r"train and test$"):
        loop.evaluate_saved(in_process_config(image_folder), trained, split='validation')
    wider = in_process_config(image_folder, '--config.model_overrides.channels=(8, 8, 16, 64)')
    with pytest.raises(ConfigError, match=(
            rf'^cannot evaluate the checkpoint at step {STEPS} in {trained / "checkpoints"}, it '
            r'holds another model: .*saved float32\(32,\), this config needs float32\(64,\).* '
            r"The config differs from the checkpoint's in: compilation_cache: 'auto' -> ''; "
            r'model_overrides.channels: \[8, 8, 16, 32\] -> \[8, 8, 16, 64\]\. Give the config '
            r'it was trained with$')):
        loop.evaluate_saved(wider, trained)


def test_top5_sums_against_numpy():
    """Random logits with ties (equal logits rank by index, as argmax does) and padded
    examples (mask 0), for 12 and for 3 classes (top-5 is then every class)."""
    rng = np.random.default_rng(0)
    for classes in (12, 3):
        logits = rng.integers(0, 4, (64, classes)).astype(np.float32)  # many ties
        labels = rng.integers(0, classes, 64)
        mask = (rng.random(64) < 0.8).astype(np.float32)
        sums = jax.jit(tasks.Classification(classes).eval_sums)(
            jnp.asarray(logits), {'label': jnp.asarray(labels), 'mask': jnp.asarray(mask)})
        # A stable sort of the negated logits: the largest first, ties by index.
        top5 = np.argsort(-logits, axis=-1, kind='stable')[:, :5]
        in_top5 = (top5 == labels[:, None]).any(-1)
        assert float(sums['correct_top5']) == float(np.sum(in_top5 * mask))
        assert float(sums['correct']) == float(np.sum((top5[:, 0] == labels) * mask))
    assert float(sums['correct_top5']) == float(mask.sum())
