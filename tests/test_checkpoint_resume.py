"""Exact resume through the command line: a run killed with SIGKILL three times (once while a
checkpoint is being written), stopped by SIGTERM, resumed with another number of data
workers, and resumed from intact checkpoints past damaged ones, logs the same numbers and ends
with the same parameters as the run that was never interrupted."""
from __future__ import annotations

import random
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
    rows = metric_rows(workdir, wall_clock=True)
    train_rows = [r for r in rows if 'train/loss' in r]
    assert [r['step'] for r in train_rows] == list(range(5, STEPS + 1, 5))
    # Rates from the second interval on (the first step, with its compilation, is not timed).
    assert all(r['train/images_per_second'] > 0 for r in train_rows)
    assert all(0 <= r['train/data_wait_fraction'] <= 1 for r in train_rows)
    assert [r['step'] for r in rows if 'eval/accuracy' in r] == [STEPS // 2, STEPS]
    # The folder's classes are easy: far above the 10% of chance.
    assert rows[-1]['eval/accuracy'] > 0.5
    assert complete_steps(workdir) == [20, 40, 60, 80]  # keep_checkpoints = 4


def _writing_checkpoint(workdir) -> bool:
    directory = workdir / 'checkpoints'
    return directory.exists() and any('tmp' in p.name for p in directory.iterdir())


def test_three_sigkills_and_a_sigterm_then_resume_is_exact(uninterrupted, tmp_path, image_folder,
                                                           train_env):
    rng = random.Random(8)  # the "random" moments, reproducibly
    workdir = tmp_path / 'interrupted'
    overrides = _overrides(image_folder)
    metrics = workdir / 'metrics.jsonl'

    def resumed_and_past(step):
        """The resumed run rewrote metrics.jsonl (rows of the previous attempt after its
        checkpoint stay until then, hence the modification time) and logged beyond ``step``."""
        before = metrics.stat().st_mtime_ns if metrics.exists() else None
        return lambda: (metrics.exists() and metrics.stat().st_mtime_ns != before
                        and last_logged_step(workdir) > step)

    def killed(process):
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        assert process.returncode == -signal.SIGKILL
        return stderr

    # 1. SIGKILL at a random step once the first checkpoint is complete.
    process = run_train(workdir, overrides, train_env)
    condition = resumed_and_past(rng.randint(CHECKPOINT_EVERY + 1, CHECKPOINT_EVERY + 15))
    wait_until(lambda: condition() and complete_steps(workdir), process)
    killed(process)
    resumed_at = complete_steps(workdir)[-1]

    # 2. Resumed with a grain worker process instead of none; SIGKILL while the next
    #    checkpoint is being written: its temporary directory stays behind.
    process = run_train(workdir, [*overrides, '--config.data_workers=1'], train_env)
    condition = resumed_and_past(resumed_at)
    wait_until(lambda: condition() and _writing_checkpoint(workdir), process)
    stderr = killed(process)
    assert 'taking over the workdir lock of a run that is gone' in stderr
    assert _writing_checkpoint(workdir)
    resumed_at = complete_steps(workdir)[-1]

    # 3. SIGKILL at a random step before the next checkpoint; the partial one left by the
    #    previous attempt was discarded when this one started.
    process = run_train(workdir, overrides, train_env)
    wait_until(resumed_and_past(resumed_at + rng.randint(1, 10)), process)
    killed(process)
    assert not _writing_checkpoint(workdir)
    assert complete_steps(workdir)[-1] == resumed_at
    assert resumed_at < STEPS

    # 4. Resume, then SIGTERM: a checkpoint is forced at the current step and the run exits 143.
    process = run_train(workdir, overrides, train_env)
    wait_until(resumed_and_past(resumed_at + 5), process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-3000:]
    assert f'resuming from the checkpoint at step {resumed_at}' in stdout
    assert 'stopped by SIGTERM' in stdout
    terminated_at = complete_steps(workdir)[-1]
    assert resumed_at < terminated_at < STEPS

    # 5. Resume to the end.
    process = run_train(workdir, overrides, train_env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert f'resuming from the checkpoint at step {terminated_at}' in stdout

    reference_dir = uninterrupted[0]
    assert metric_rows(workdir) == metric_rows(reference_dir)
    assert_same_state(checkpointed_state(workdir, STEPS), checkpointed_state(reference_dir, STEPS))
    assert not (workdir / 'LOCK').exists() and not _writing_checkpoint(workdir)


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_from_an_intact_one(
        uninterrupted, tmp_path, image_folder, train_env):
    """Three kinds of damage to the three newest checkpoints: a truncated array file, a
    truncated config, missing state metadata. Each is reported in one line and moved aside;
    the run resumes from step 20 and ends as the uninterrupted one did."""
    workdir = tmp_path / 'damaged'
    shutil.copytree(uninterrupted[0], workdir)
    checkpoints = workdir / 'checkpoints'
    assert complete_steps(workdir) == [20, 40, 60, 80]
    largest = max((checkpoints / '80' / 'state').rglob('d/*'), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])
    config = checkpoints / '60' / 'config' / 'metadata'
    config.write_text(config.read_text()[:50])
    (checkpoints / '40' / 'state' / '_METADATA').unlink()

    process = run_train(workdir, _overrides(image_folder), train_env)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    reports = [line for line in stderr.splitlines() if 'cannot be restored' in line]
    assert [line.split(' cannot')[0] for line in reports] == [
        f'the checkpoint at step {step}' for step in (80, 60, 40)], stderr[-3000:]
    for line, step in zip(reports, (80, 60, 40)):
        assert line.endswith(f'); moved it to {checkpoints / f"corrupt-{step}"}'), line
        assert (checkpoints / f'corrupt-{step}').is_dir()
    assert 'resuming from the checkpoint at step 20' in stdout
    assert complete_steps(workdir) == [20, 40, 60, 80]
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


def test_a_run_killed_in_its_final_evaluation_writes_it_when_rerun(uninterrupted, tmp_path,
                                                                   image_folder, train_env):
    """The last checkpoint was complete but the process died evaluating: the rerun has nothing
    to train, evaluates and writes the missing final row (sweeps rely on it to call a run done)."""
    workdir = tmp_path / 'no_final_eval'
    shutil.copytree(uninterrupted[0], workdir)
    metrics = workdir / 'metrics.jsonl'
    lines = metrics.read_text().splitlines(keepends=True)
    assert '"eval/accuracy"' in lines[-1] and f'"step": {STEPS}' in lines[-1]
    metrics.write_text(''.join(lines[:-1]))
    process = run_train(workdir, _overrides(image_folder), train_env)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert metric_rows(workdir) == metric_rows(uninterrupted[0])
