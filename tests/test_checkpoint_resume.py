"""Exact resume through the command line: a run killed with SIGKILL after a checkpoint, then
stopped by SIGTERM, then resumed to the end logs the same numbers and ends with the same
parameters as the run that was never interrupted."""
from __future__ import annotations

import json
import shutil
import pathlib
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import TINY_RUN, run_train, tiny_run_overrides

STEPS = TINY_RUN['num_train_steps']
CHECKPOINT_EVERY = TINY_RUN['checkpoint_every_steps']


def _overrides(image_folder):
    return tiny_run_overrides(f'imagefolder:{image_folder}')


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / 'checkpoints'
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _wait_until(condition, process, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.02)


def _last_logged_step(workdir: pathlib.Path) -> int:
    path = workdir / 'metrics.jsonl'
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])['step'] if lines else 0


def _final_state(workdir: pathlib.Path) -> dict:
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / 'checkpoints' / str(STEPS) / 'state')


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
    rows = _rows(workdir)
    train_steps = [r['step'] for r in rows if 'train/loss' in r]
    assert train_steps == list(range(5, STEPS + 1, 5))
    assert [r['step'] for r in rows if 'eval/accuracy' in r] == [STEPS // 2, STEPS]
    # The folder's classes are easy: far above the 10% of chance.
    assert rows[-1]['eval/accuracy'] > 0.5
    assert _complete_steps(workdir) == [STEPS - 40, STEPS - 20, STEPS]  # keep_checkpoints = 3


def test_sigkill_then_sigterm_then_resume_is_exact(uninterrupted, tmp_path, image_folder,
                                                   train_env):
    workdir = tmp_path / 'interrupted'
    overrides = _overrides(image_folder)

    # 1. SIGKILL once the first checkpoint is complete and training has gone past it.
    process = run_train(workdir, overrides, train_env)
    _wait_until(lambda: _complete_steps(workdir) and _last_logged_step(workdir) > CHECKPOINT_EVERY,
                process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_at = _complete_steps(workdir)[-1]
    assert killed_at < STEPS

    # 2. Resume, then SIGTERM: a checkpoint is forced at the current step and the run exits 143.
    #    (Rows the killed run logged after its checkpoint are still in metrics.jsonl until the
    #    resumed run rewrites the file, hence the modification time.)
    metrics = workdir / 'metrics.jsonl'
    killed_mtime = metrics.stat().st_mtime_ns
    process = run_train(workdir, overrides, train_env)
    _wait_until(lambda: metrics.stat().st_mtime_ns != killed_mtime
                and _last_logged_step(workdir) > killed_at + 5, process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert f'resuming from the checkpoint at step {killed_at}' in stdout
    assert 'stopped by SIGTERM' in stdout
    terminated_at = _complete_steps(workdir)[-1]
    assert killed_at < terminated_at < STEPS

    # 3. Resume to the end.
    process = run_train(workdir, overrides, train_env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert f'resuming from the checkpoint at step {terminated_at}' in stdout

    reference_dir = uninterrupted[0]
    assert _rows(workdir) == _rows(reference_dir)
    expected = jax.tree_util.tree_leaves_with_path(_final_state(reference_dir))
    actual = jax.tree_util.tree_leaves_with_path(_final_state(workdir))
    assert [path for path, _ in actual] == [path for path, _ in expected]
    for (path, want), (_, got) in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                      err_msg=jax.tree_util.keystr(path))


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
