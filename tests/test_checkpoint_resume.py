"""Exact resume through the command line: a run killed with SIGKILL after a checkpoint, then
stopped by SIGTERM, then resumed to the end logs the same numbers and ends with the same
parameters as the run that was never interrupted."""
from __future__ import annotations

import shutil
import signal

import pytest

from conftest import (TINY_RUN, assert_same_state, checkpointed_state, complete_steps,
                      last_logged_step, metric_rows, run_train, tiny_run_overrides, wait_until)

STEPS = TINY_RUN['num_train_steps']
CHECKPOINT_EVERY = TINY_RUN['checkpoint_every_steps']


def _overrides(image_folder):
    return tiny_run_overrides(f'imagefolder:{image_folder}')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, image_folder, train_env):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    process = run_train(workdir, _overrides(image_folder), train_env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return workdir, stdout, stderr


def test_uninterrupted_run_reports_what_a_user_needs(uninterrupted):
    workdir, stdout, stderr = uninterrupted
    assert 'parameters' in stdout and 'GFLOPs per image' in stdout
    assert 'final held-out accuracy' in stdout
    assert 'step/s' in stderr  # the progress bar
    assert (workdir / 'curves.png').stat().st_size > 0
    assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
    rows = metric_rows(workdir)
    train_steps = [r['step'] for r in rows if 'train/loss' in r]
    assert train_steps == list(range(5, STEPS + 1, 5))
    assert [r['step'] for r in rows if 'eval/accuracy' in r] == [STEPS // 2, STEPS]
    # The folder's classes are easy: far above the 10% of chance.
    assert rows[-1]['eval/accuracy'] > 0.5
    assert complete_steps(workdir) == [STEPS - 40, STEPS - 20, STEPS]  # keep_checkpoints = 3


def test_sigkill_then_sigterm_then_resume_is_exact(uninterrupted, tmp_path, image_folder,
                                                   train_env):
    workdir = tmp_path / 'interrupted'
    overrides = _overrides(image_folder)

    # 1. SIGKILL once the first checkpoint is complete and training has gone past it.
    process = run_train(workdir, overrides, train_env)
    wait_until(lambda: complete_steps(workdir) and last_logged_step(workdir) > CHECKPOINT_EVERY,
                process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = complete_steps(workdir)[-1]
    assert killed_at < STEPS

    # 2. Resume, then SIGTERM: a checkpoint is forced at the current step and the run exits 143.
    #    (Rows the killed run logged after its checkpoint are still in metrics.jsonl until the
    #    resumed run rewrites the file, hence the modification time.)
    metrics = workdir / 'metrics.jsonl'
    killed_mtime = metrics.stat().st_mtime_ns
    process = run_train(workdir, overrides, train_env)
    wait_until(lambda: metrics.stat().st_mtime_ns != killed_mtime
                and last_logged_step(workdir) > killed_at + 5, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert f'resuming from the checkpoint at step {killed_at}' in stdout
    assert 'stopped by SIGTERM' in stdout
    terminated_at = complete_steps(workdir)[-1]
    assert killed_at < terminated_at < STEPS

    # 3. Resume to the end.
    process = run_train(workdir, overrides, train_env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert f'resuming from the checkpoint at step {terminated_at}' in stdout

    reference_dir = uninterrupted[0]
    assert metric_rows(workdir) == metric_rows(reference_dir)
    assert_same_state(checkpointed_state(workdir, STEPS), checkpointed_state(reference_dir, STEPS))


def test_resuming_with_another_model_is_a_one_line_error(uninterrupted, tmp_path, image_folder,
                                                         train_env):
    workdir = tmp_path / 'copy'
    shutil.copytree(uninterrupted[0], workdir)
    process = run_train(workdir, [*_overrides(image_folder),
                                  '--config.model_overrides.channels=(8, 8, 16, 64)'], train_env)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    [line] = stderr.strip().splitlines()
    assert line.startswith(f'error: cannot resume from the checkpoint at step {STEPS}'), line
    assert 'model_overrides.channels: [8, 8, 16, 32] -> [8, 8, 16, 64]' in line
