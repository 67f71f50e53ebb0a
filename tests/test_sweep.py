"""The sweep runner, ``python -m train.sweep``: a 2 fusions x 2 seeds grid of tiny runs through
the real command line (results against the cells' own metrics, reruns skipping finished
cells, overrides, errors), and the grid expansion and job runner on their own."""
from __future__ import annotations

import csv
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import types

import ml_collections
import numpy as np
import pytest

from aff_jax.training import sweep
from aff_jax.training.config import base_config, load_with_overrides
from aff_jax.training.errors import ConfigError
from conftest import REPO, metric_rows

FUSIONS, SEEDS, STEPS = ('add', 'aff'), (0, 1), 6
SWEEP_FILE = '''\
import ml_collections
from aff_jax.training.config import load_config


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.base = load_config({quickstart!r})
    c.base.update(dataset={dataset!r}, batch_size=16, eval_batch_size=40,
                  num_train_steps={steps}, log_every_steps=2, eval_every_steps=1000,
                  checkpoint_every_steps=1000, warmup_steps=0)
    c.base.model_overrides.start_layer = 3  # AFF in the last stage only: quicker to compile
    c.grid = ml_collections.ConfigDict(sort_keys=False)
    c.grid.fusion = {fusions!r}
    c.grid.seed = {seeds!r}
    return c
'''


def run_sweep_cli(config: pathlib.Path, workdir: pathlib.Path, env: dict[str, str],
                  *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, '-m', 'train.sweep', f'--config={config}',
               f'--workdir={workdir}', *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope='module')
def swept(tmp_path_factory, fast_train_env, image_folder):
    """The grid trained once, two cells at a time; what the tests below read and rerun."""
    root = tmp_path_factory.mktemp('sweep')
    config = root / 'tiny_sweep.py'
    config.write_text(SWEEP_FILE.format(
        quickstart=str(REPO / 'configs' / 'quickstart.py'), dataset=f'imagefolder:{image_folder}',
        steps=STEPS, fusions=FUSIONS, seeds=SEEDS))
    env = fast_train_env
    workdir = root / 'out'
    result = run_sweep_cli(config, workdir, env, '--parallel=2')
    assert result.returncode == 0, result.stdout + result.stderr
    return types.SimpleNamespace(config=config, env=env, workdir=workdir, stdout=result.stdout,
                                 results_csv=(workdir / sweep.RESULTS_CSV).read_text())


def cell_dir(workdir: pathlib.Path, fusion: str, seed: int) -> pathlib.Path:
    return workdir / f'fusion={fusion},seed={seed}'


def final_row(directory: pathlib.Path) -> dict:
    values = {}
    for row in metric_rows(directory):
        if row['step'] == STEPS:
            values.update(row)
    return values


def csv_rows(text: str) -> dict[str, dict[str, str]]:
    return {row['fusion']: row for row in csv.DictReader(text.splitlines())}


def test_sweep_trains_every_cell_and_writes_results(swept):
    for fusion in FUSIONS:
        for seed in SEEDS:
            assert f'fusion={fusion},seed={seed}: done in' in swept.stdout
            assert (cell_dir(swept.workdir, fusion, seed) / 'checkpoints' / str(STEPS)).is_dir()
    assert (swept.workdir / sweep.RESULTS_PNG).read_bytes()[:4] == b'\x89PNG'
    markdown = (swept.workdir / sweep.RESULTS_MD).read_text()
    assert 'sample standard deviation (ddof=1) over the n seeds' in markdown
    assert re.search(r'^\| add \| 2 \| 0, 1 \| [\d.]+ \+- [\d.]+% \|', markdown, re.M), markdown

    rows = csv_rows(swept.results_csv)
    assert sorted(rows) == sorted(FUSIONS)
    for fusion, row in rows.items():
        assert row['n'] == '2' and row['seeds'] == '0 1'
        for metric in ('eval/accuracy', 'eval/loss'):
            values = [final_row(cell_dir(swept.workdir, fusion, seed))[metric] for seed in SEEDS]
            assert float(row[f'{metric} mean']) == pytest.approx(np.mean(values), rel=1e-12)
            assert float(row[f'{metric} std']) == pytest.approx(np.std(values, ddof=1),
                                                                rel=1e-12, abs=1e-15)
        # The run's own summary line: the same parameter count and GFLOPs.
        log = (cell_dir(swept.workdir, fusion, 0) / sweep.CELL_LOG).read_text()
        params, gflops = re.search(r'model \S+: ([\d,]+) parameters, ([\d.e-]+) GFLOPs', log
                                   ).groups()
        assert int(row['params']) == int(params.replace(',', ''))
        assert float(row['gflops_per_image']) == pytest.approx(float(gflops), rel=1e-3)
        assert float(row['images_per_s mean']) > 0
    assert int(rows['add']['params']) < int(rows['aff']['params'])


def test_rerun_skips_finished_cells(swept):
    def snapshot():
        files = [p for p in swept.workdir.glob('fusion=*/**/*') if p.is_file()]
        return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}

    before = snapshot()
    result = run_sweep_cli(swept.config, swept.workdir, swept.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count('skipped, finished before\n') == len(FUSIONS) * len(SEEDS)
    assert 'started' not in result.stdout
    assert snapshot() == before
    assert (swept.workdir / sweep.RESULTS_CSV).read_text() == swept.results_csv


def test_overrides_from_the_command_line_and_failing_cells(swept, tmp_path):
    """A grid key and a base key from the command line: seed 0's cells are kept (with a word
    about their other config), seed 7's fail on the missing dataset, each in one line."""
    result = run_sweep_cli(swept.config, swept.workdir, swept.env, '--parallel=2',
                           '--config.grid.seed=(0, 7)',
                           f'--config.base.dataset=imagefolder:{tmp_path}/none')
    assert result.returncode == 2, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if ': failed,' in line]
    assert len(failed) == len(FUSIONS)
    for fusion in FUSIONS:
        assert (f'fusion={fusion},seed=0: skipped, finished before with another config '
                f'(dataset: ') in result.stdout
        assert any(line.startswith(f'fusion={fusion},seed=7: failed, exit status 1: error: '
                                   f'config.dataset') for line in failed), result.stdout
        assert f'fusion={fusion},seed=1' not in result.stdout
    assert '2 of 4 cells did not finish' in result.stdout
    assert 'Not finished' in (swept.workdir / sweep.RESULTS_MD).read_text()
    for fusion, row in csv_rows((swept.workdir / sweep.RESULTS_CSV).read_text()).items():
        assert (row['n'], row['seeds'], row['eval/accuracy std']) == ('1', '0', '')
        assert float(row['eval/accuracy mean']) == final_row(
            cell_dir(swept.workdir, fusion, 0))['eval/accuracy']


def test_unknown_key_is_a_one_line_error(swept, tmp_path):
    result = run_sweep_cli(swept.config, tmp_path / 'out', swept.env,
                           "--config.grid.fuson=('add',)")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith('error: config.grid.fuson: unknown config key; did you mean '
                               'grid.fusion')
    assert not (tmp_path / 'out').exists()
    with pytest.raises(ConfigError, match='config.base.num_train_step: unknown config key; '
                                          'did you mean base.num_train_steps'):
        load_with_overrides(str(swept.config), [('base.num_train_step', '5')])


# Without training -----------------------------------------------------------------------------

def _sweep_config(**grid) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.base = base_config()
    config.grid = ml_collections.ConfigDict(grid, sort_keys=False)
    return config


def test_cell_names_follow_the_grid_and_are_safe_directory_names():
    config = _sweep_config(fusion=('add', 'sk'), dataset=('imagefolder:/data/a b',), seed=(0, 1))
    config.grid.model_overrides = ml_collections.ConfigDict(
        {'channels': ((8, 8, 16, 32),), 'fusion': ('aff',)})
    cells = sweep.expand(config)
    # 'fusion' is the last part of two keys, so both are named in full; seeds run outermost.
    assert [cell.name for cell in cells] == [
        f'fusion={fusion},dataset=imagefolder__data_a_b,seed={seed},channels=8-8-16-32,'
        f'model_overrides.fusion=aff' for seed in (0, 1) for fusion in ('add', 'sk')]
    assert cells[1].config.fusion == 'sk' and cells[1].config.seed == 0
    assert cells[1].config.model_overrides.channels == (8, 8, 16, 32)
    assert cells[1].group == cells[3].group


@pytest.mark.parametrize('grid, message', [
    (dict(fuson=('add',)), 'config.grid.fuson: not a key of config.base; did you mean fusion'),
    (dict(fusion='add'), "config.grid.fusion must be a non-empty tuple of values, got 'add'"),
    (dict(seed=()), 'config.grid.seed must be a non-empty tuple'),
    (dict(batch_size=('16',)), "config.grid.batch_size: '16' does not fit config.base.batch_size"),
    (dict(fusion=('add', 'bogus')), "cell fusion=bogus: config.fusion: unknown fusion 'bogus'"),
    (dict(dataset=('a/b', 'a_b')), "would share the directory 'dataset=a_b'"),
])
def test_bad_grids_are_named_before_anything_runs(grid, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        sweep.expand(_sweep_config(**grid))


def test_a_training_config_is_not_a_sweep_config():
    with pytest.raises(ConfigError, match='a sweep config holds two groups'):
        sweep.expand(base_config())


def _python_job(tmp_path: pathlib.Path, name: str, code: str) -> sweep.Job:
    return sweep.Job(name, (sys.executable, '-c', code), tmp_path / name / 'log.txt')


def test_a_failed_job_is_reported_and_the_others_go_on(tmp_path):
    jobs = [_python_job(tmp_path, 'bad', "print('error: boom'); raise SystemExit(3)"),
            _python_job(tmp_path, 'good', "print('fine')"),
            _python_job(tmp_path, 'also_good', 'pass')]
    lines = []
    codes, stopped_by = sweep.run_jobs(jobs, 2, lines.append)
    assert codes == {'bad': 3, 'good': 0, 'also_good': 0} and stopped_by is None
    assert [line for line in lines if ': failed,' in line] == [
        f'bad: failed, exit status 3: error: boom (log {tmp_path / "bad" / "log.txt"})']
    assert (tmp_path / 'good' / 'log.txt').read_text().endswith('fine\n')


def test_a_signal_is_passed_on_to_running_jobs_and_stops_the_sweep(tmp_path):
    waits_for_sigterm = ('import signal, sys, time\n'
                         'signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n'
                         "print('ready', flush=True)\n"
                         'time.sleep(60)\n')
    jobs = [_python_job(tmp_path, 'running', waits_for_sigterm),
            _python_job(tmp_path, 'waiting', 'pass')]

    def terminate_when_ready():
        while 'ready' not in (jobs[0].log.read_text().splitlines() if jobs[0].log.exists()
                              else []):
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_when_ready, daemon=True).start()
    codes, stopped_by = sweep.run_jobs(jobs, 1, lambda line: None)
    assert codes == {'running': 143} and stopped_by == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler
