"""Runs that meet faults and careless use through the command line: divergence, a second run
on a live workdir, Ctrl-C, a full disk, a read-only workdir, a peer that never joins, bad
image files. Each test asserts the exit status, the one line on stderr and what is on disk
afterwards. (Kills and damaged checkpoints: test_checkpoint_resume.py.)"""
from __future__ import annotations

import errno
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import jax
import numpy as np
import pytest

from aff_jax.training import distributed, workdir_lock
from aff_jax.training.errors import RunError, attribute_full_disk, disk_full
from aff_jax.training.metrics import MetricsWriter
from conftest import (checkpointed_state, complete_steps, last_logged_step, metric_rows,
                      run_train, tiny_run_overrides, wait_until)


# XLA's C++ log lines (glog format: ``W1126 19:52:38.123456  1234 cuda_timer.cc:88] ...``),
# which XLA:GPU prints on its own; they are not the run's report.
_XLA_LOG_LINE = re.compile(r'[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\] ')


def _one_line(stderr: str) -> str:
    """The single line a failed run prints (progress-bar redraws and XLA's logs aside)."""
    lines = [line for line in stderr.splitlines()
             if line.strip() and '%|' not in line and not _XLA_LOG_LINE.match(line)]
    assert len(lines) == 1, stderr[-3000:]
    assert 'Traceback' not in stderr
    return lines[0]


def _leftovers(workdir: pathlib.Path) -> list[str]:
    """What a cleanly ended run must not leave: the lock, Orbax's temporary directories."""
    found = [p.name for p in (workdir / 'checkpoints').glob('*') if 'tmp' in p.name]
    return found + (['LOCK'] if (workdir / 'LOCK').exists() else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_divergence_exits_3_naming_the_step_and_keeps_the_newest_finite_checkpoint(
        tmp_path, image_folder, train_env):
    """The learning rate jumps x1e12 at step 25: the loss blows up after the checkpoint of
    step 20. Rotation keeps one checkpoint, and it is still step 20's, finite."""
    workdir = tmp_path / 'run'
    process = run_train(workdir, [
        *tiny_run_overrides(f'imagefolder:{image_folder}'), '--config.schedule=step',
        '--config.lr_decay_boundaries=(25,)', '--config.lr_decay_factor=1e12',
        '--config.checkpoint_every_steps=10', '--config.keep_checkpoints=1'], train_env)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 3, stderr[-3000:]
    line = _one_line(stderr)
    match = re.match(r'error: the loss or the gradients became non-finite at step (\d+) .*'
                     r'stopped at step (\d+) without checkpointing it, the newest checkpoint is '
                     r'step 20\.', line)
    assert match, line
    first_bad, stopped = map(int, match.groups())
    assert 26 <= first_bad <= stopped <= 30
    assert complete_steps(workdir) == [20] and not _leftovers(workdir)
    state = checkpointed_state(workdir, 20)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
    assert int(state['nonfinite_step']) == 0
    rows = metric_rows(workdir)
    assert rows[-1]['step'] < first_bad
    assert all(math.isfinite(v) for row in rows for v in row.values())


def test_a_second_run_on_a_live_workdir_fails_at_once_and_ctrl_c_saves(tmp_path, image_folder,
                                                                       train_env):
    workdir = tmp_path / 'run'
    overrides = tiny_run_overrides(f'imagefolder:{image_folder}')
    first = run_train(workdir, overrides, train_env)
    wait_until(lambda: last_logged_step(workdir) >= 5, first)
    # Paused, so that it is still training when the second run has started and failed.
    first.send_signal(signal.SIGSTOP)

    second = run_train(workdir, overrides, train_env)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 1
    line = _one_line(stderr)
    assert line.startswith(f'error: workdir {workdir.absolute()} is in use by another run (host '
                           f'{socket.gethostname()}, PID {first.pid}, started '), line

    first.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr[-3000:]
    assert 'stopped by SIGINT after saving the checkpoint at step' in stdout
    stopped_at = int(re.search(r'checkpoint at step (\d+)', stdout).group(1))
    assert complete_steps(workdir)[-1] == stopped_at
    assert not _leftovers(workdir)


def test_a_full_disk_is_one_line_naming_the_newest_intact_checkpoint(tmp_path, image_folder,
                                                                     train_env):
    """The workdir on a 1 MB file system: two checkpoints (0.4-0.55 MB each) fit, the next
    does not. The run stops with one line; the partial checkpoint is gone, the others intact."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(workdir)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f'cannot mount a small file system here: {mounted.stderr.strip()}')
    try:
        process = run_train(workdir, [*tiny_run_overrides(f'imagefolder:{image_folder}'),
                                      '--config.checkpoint_every_steps=5'], train_env)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr[-3000:]
        line = _one_line(stderr)
        steps = complete_steps(workdir)
        # Two checkpoints fit, or one where compression leaves them larger than half the space.
        assert steps in ([5], [5, 10]) and not _leftovers(workdir), (steps, _leftovers(workdir))
        # The checkpoint being written meets the full disk, unless the steps outrun its
        # background write and a file of the workdir (metrics.jsonl, TensorBoard's) meets it
        # first. Either is named.
        target = re.escape(f'the checkpoint of step {steps[-1] + 5} (not kept)')
        assert re.match(rf'error: no space left on device writing ({target}|{workdir}/\S+); ',
                        line), line
        assert line.endswith(f'; the newest intact checkpoint is step {steps[-1]} in '
                             f'{workdir / "checkpoints"}; free some space and run the same '
                             f'command to resume'), line
        assert all(np.isfinite(leaf).all()
                   for leaf in jax.tree.leaves(checkpointed_state(workdir, steps[-1])))
    finally:
        subprocess.run(['umount', str(workdir)], check=True)


def test_a_full_disk_under_the_metrics_file_names_that_file(tmp_path):
    """A file object's write reports ENOSPC without a file name; the message still has it."""
    (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
    writer = MetricsWriter(tmp_path, start_step=0, enabled=True)
    (tmp_path / 'metrics.jsonl').unlink()
    (tmp_path / 'metrics.jsonl').symlink_to('/dev/full')
    with pytest.raises(OSError) as raised:
        writer.write(1, {'train/loss': 1.0})
    writer.close()
    assert str(disk_full(raised.value, tmp_path / 'checkpoints')) == (
        f'no space left on device writing {tmp_path / "metrics.jsonl"}; the newest intact '
        f'checkpoint is step 10 in {tmp_path / "checkpoints"}; free some space and run the same '
        f'command to resume')


def test_a_full_disk_in_a_save_that_names_no_file_names_the_save(tmp_path):
    """Orbax writes some checkpoint files with ``write_text``, whose ENOSPC names no file."""
    (tmp_path / '5').mkdir()
    failed_save = tmp_path / '10.orbax-checkpoint-tmp-1795726917'
    error = RuntimeError('the save failed')
    error.__cause__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    attribute_full_disk(error, failed_save)
    assert str(disk_full(error, tmp_path)) == (
        f'no space left on device writing the checkpoint of step 10 (not kept); the newest '
        f'intact checkpoint is step 5 in {tmp_path}; free some space and run the same command '
        f'to resume')


def test_a_read_only_workdir_is_one_line(tmp_path, train_env):
    """Root writes through file modes, so as root the workdir is made immutable instead."""
    workdir = tmp_path / 'run'
    workdir.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(['chattr', '+i', str(workdir)], capture_output=True).returncode:
            pytest.skip('running as root on a file system without chattr +i')
    else:
        workdir.chmod(0o555)
    try:
        process = run_train(workdir, [], train_env)
        _, stderr = process.communicate(timeout=120)
    finally:
        if os.geteuid() == 0:
            subprocess.run(['chattr', '-i', str(workdir)], check=True)
        workdir.chmod(0o755)
    assert process.returncode == 1
    line = _one_line(stderr)
    assert line.startswith(f'error: --workdir {workdir} is not writable: '), line
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize('process_id, expected', [
    (0, 'error: process(es) 1 of 2 never joined within config.distributed_timeout_s=3 s'),
    (1, 'error: process 1 of 2: the coordinator (process 0, rendezvous at 127.0.0.1:'),
])
def test_a_peer_that_never_joins_is_named_within_the_timeout(tmp_path, train_env, process_id,
                                                              expected):
    port = _free_port()
    process = run_train(tmp_path / 'run', [
        '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
        f'--process_id={process_id}', '--config.distributed_timeout_s=3'], train_env)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert _one_line(stderr).startswith(expected), stderr


def test_bad_image_files_are_listed_before_step_1_or_skipped(tmp_path, image_folder, train_env):
    folder = tmp_path / 'folder'
    shutil.copytree(image_folder, folder)
    truncated = folder / 'train' / 'class_3' / '0.png'
    truncated.write_bytes(truncated.read_bytes()[:60])
    empty = folder / 'test' / 'class_5' / '1.png'
    empty.write_bytes(b'')
    overrides = tiny_run_overrides(f'imagefolder:{folder}')

    process = run_train(tmp_path / 'strict', overrides, train_env)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    line = _one_line(stderr)
    assert line.startswith('error: config.dataset: imagefolder: cannot read 2 of 160 files: '), line
    assert f'{truncated}: truncated' in line and f'{empty}: zero bytes' in line
    assert line.endswith('set config.skip_bad_files=True to train without them'), line
    assert not (tmp_path / 'strict' / 'checkpoints').exists()

    process = run_train(tmp_path / 'skipping', [*overrides, '--config.skip_bad_files=True'],
                        train_env)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    assert f'leaving out {truncated}' in stderr and f'leaving out {empty}' in stderr
    assert '119 train / 39 test images' in stdout
    assert metric_rows(tmp_path / 'skipping')[-1]['step'] == 80


def _write_lock(workdir: pathlib.Path, **holder) -> None:
    (workdir / 'LOCK').write_text(json.dumps(holder))


def test_the_workdir_lock_tells_live_holders_from_dead_ones(tmp_path):
    here, me = socket.gethostname(), os.getpid()
    exited = subprocess.Popen(['true'])
    exited.wait()
    live_start = workdir_lock.process_start(me)
    cases = {
        'dead PID': dict(host=here, pid=exited.pid, started='then'),
        'reused PID': dict(host=here, pid=me, process_start='1', started='then'),
        'half-written': None,
    }
    for name, holder in cases.items():
        if holder is None:
            (tmp_path / 'LOCK').write_text('{"host": ')
        else:
            _write_lock(tmp_path, **holder)
        with workdir_lock.WorkdirLock(tmp_path) as lock:
            assert lock.taken_over == (holder or {}), name
            assert json.loads((tmp_path / 'LOCK').read_text())['pid'] == me
        assert not (tmp_path / 'LOCK').exists()

    for holder, shown in ((dict(host=here, pid=me, process_start=live_start, started='now'),
                           f'(host {here}, PID {me}, started now)'),
                          (dict(host='elsewhere', pid=1, started='now'),
                           '(host elsewhere, PID 1, started now)')):
        _write_lock(tmp_path, **holder)
        with pytest.raises(RunError, match=re.escape(shown)):
            workdir_lock.WorkdirLock(tmp_path).__enter__()
        assert json.loads((tmp_path / 'LOCK').read_text()) == holder


def test_the_rendezvous_ignores_a_stray_connection():
    """Process 0 of 2 waits; a stranger connects and sends garbage, then process 1 reports:
    the wait ends normally, for both."""
    port = _free_port()
    address = ('127.0.0.1', port)
    errors = []

    def coordinator():
        try:
            distributed._wait_for_peers(address, 2, 20)
        except Exception as e:  # noqa: BLE001 - reported through the assertion below
            errors.append(e)

    thread = threading.Thread(target=coordinator)
    thread.start()
    stray = None
    for _ in range(100):
        try:
            stray = socket.create_connection(address, timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    stray.sendall(b'hello?\n')
    distributed._report_to_coordinator(address, 1, 2, 20)
    thread.join(20)
    stray.close()
    assert not thread.is_alive() and errors == []
