"""Sweeps: one ordinary training run per cell of a grid of config values, and a results table.

A sweep config file's ``get_config(arg=None)`` returns a ConfigDict of two groups:

* ``base``: a training config (``config.base_config()`` and its keys; a recipe can be
  started from with ``config.load_config``);
* ``grid``: keys of ``base``, nested as in ``base`` (``grid.model_overrides.r``), each holding a
  tuple of values. The cells are the product of the tuples, in the grid's key order and each
  tuple's order. A ConfigDict sorts its keys unless built with ``sort_keys=False``::

      c = ml_collections.ConfigDict()
      c.base = load_config(pathlib.Path(__file__).with_name('quickstart.py'))
      c.grid = ml_collections.ConfigDict(sort_keys=False)
      c.grid.fusion = ('add', 'aff')
      c.grid.model_overrides = ml_collections.ConfigDict({'r': (4, 16)})
      c.grid.seed = (0, 1, 2)

``run_sweep`` trains each cell with ``python -m train`` in ``DIR/<cell name>/`` (here
``fusion=aff,r=4,seed=0``), skipping the cells that finished before (an interrupted cell
resumes, as any run does), and writes ``DIR/results.csv``, ``results.md`` and ``results.png``:
one row per cell without its ``seed``, the final evaluation's mean +- std over the seeds.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from aff_jax.training import loop, summary, tensorboard
from aff_jax.training.config import (OPEN_KEYS, as_tuples, changed_keys, from_tree,
                                     unknown_key_hint)
from aff_jax.training.errors import ConfigError, RunError
from aff_jax.training.metrics import METRICS_FILE, TENSORBOARD_DIR, read_metrics

SEED_KEY = 'seed'  # the grid key whose cells are collapsed into one row
MAIN_METRICS = ('eval/accuracy', 'eval/miou')  # classification, segmentation
CELL_CONFIG = 'config.json'  # the cell's training config, as JSON
CELL_CONFIG_FILE = 'config.py'  # the config file its `python -m train` command reads
CELL_LOG = 'train.log'
RESULTS_CSV, RESULTS_MD, RESULTS_PNG = 'results.csv', 'results.md', 'results.png'
_UNSAFE = re.compile(r'[^A-Za-z0-9._+-]')  # replaced by '_' in cell names
_THROUGHPUT_TAG = 'train/loss'  # logged at every log step
_CELL_CONFIG_PY = '''\
"""Written by `python -m train.sweep`: the config.json beside this file, as a config."""
import pathlib

from aff_jax.training import sweep


def get_config():
    return sweep.cell_config(pathlib.Path(__file__).with_name(sweep.CELL_CONFIG))
'''


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: ``values`` ``((dotted grid key, value), ...)`` in grid order,
    ``name`` its directory under the sweep's workdir, ``config`` its training config."""
    name: str
    values: tuple[tuple[str, Any], ...]
    config: ml_collections.ConfigDict

    @property
    def group(self) -> tuple[tuple[str, Any], ...]:
        """The values that name its row of the results: all but the seed."""
        return tuple((key, value) for key, value in self.values if key != SEED_KEY)


@dataclasses.dataclass
class Row:
    """One row of the results: the cells of one ``group`` (all seeds).

    ``seeds``, ``metrics[name]`` and ``images_per_s`` hold one entry per finished cell (a
    segmentation class absent from a cell's test set has no ``eval/iou/<class>`` there);
    ``params`` and ``flops`` (per image) are None when no cell finished; ``unfinished``: names.
    """
    group: tuple[tuple[str, Any], ...]
    seeds: list = dataclasses.field(default_factory=list)
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    images_per_s: list[float] = dataclasses.field(default_factory=list)
    params: int | None = None
    flops: float | None = None
    unfinished: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Job:
    """One subprocess: ``argv``, its output appended to ``log``."""
    name: str
    argv: tuple[str, ...]
    log: pathlib.Path


# The grid ---------------------------------------------------------------------------------

def expand(sweep: ml_collections.ConfigDict) -> list[Cell]:
    """The cells of ``sweep`` (``base`` and ``grid``, see the module docstring) in running
    order: the product of the grid's tuples, the seed's outermost. Each config is checked as
    ``python -m train`` checks it before running. Raises ConfigError naming the
    key: another shape of config, a grid key ``base`` lacks, a value that does not fit it, an
    empty or non-tuple grid entry, two cells with one name, a cell ``check_config`` rejects.
    """
    groups = sorted(sweep.keys())
    if groups != ['base', 'grid'] or not all(
            isinstance(sweep[g], ml_collections.ConfigDict) for g in groups):
        shown = ', '.join(groups[:6]) + (', ...' if len(groups) > 6 else '')
        raise ConfigError(f'a sweep config holds two groups, config.base (a training config) '
                          f'and config.grid (a tuple of values per key); got {shown}')
    axes = []
    for key, values in _leaves(sweep.grid):
        if not isinstance(values, (tuple, list)) or not values:
            raise ConfigError(f'config.grid.{key} must be a non-empty tuple of values, got '
                              f'{values!r}')
        axes.append((key, tuple(as_tuples(value) for value in values)))
    labels = _labels([key for key, _ in axes])
    # Seeds outermost: with --parallel, the cells that run at once are then mostly different
    # models rather than seeds of one model, which would each compile the same programs (the
    # persistent compilation cache only serves a run that starts after another finished).
    outer = sorted(axes, key=lambda axis: axis[0] != SEED_KEY)
    cells, names = [], {}
    for combination in itertools.product(*(values for _, values in outer)):
        chosen = dict(zip((key for key, _ in outer), combination))
        values = tuple((key, chosen[key]) for key, _ in axes)
        name = ','.join(f'{labels[key]}={_UNSAFE.sub("_", _text(value))}'
                        for key, value in values)
        if name in names:
            raise ConfigError(f'config.grid: the cells {dict(names[name])} and {dict(values)} '
                              f'would share the directory {name!r}; give distinct values')
        names[name] = values
        config = copy.deepcopy(sweep.base)
        for key, value in values:
            _assign(config, key, value)
        try:
            loop.check_config(config)
        except ConfigError as e:
            raise ConfigError(f'cell {name}: {e}') from e
        cells.append(Cell(name, values, config))
    return cells


def _leaves(group: ml_collections.ConfigDict, prefix: str = '') -> Iterator[tuple[str, Any]]:
    for key in group.keys():
        value = group[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', value


def _text(value) -> str:
    return '-'.join(map(_text, value)) if isinstance(value, tuple) else str(value)


def _labels(keys: Sequence[str]) -> dict[str, str]:
    """Short names of dotted grid keys: the last part, unless two keys share it."""
    last = [key.split('.')[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key for key, short in zip(keys, last)}


def _assign(config: ml_collections.ConfigDict, key: str, value) -> None:
    """``config.KEY = value`` for a dotted grid KEY; new keys only under ``OPEN_KEYS``."""
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
        node = node.get(part)
        if not isinstance(node, ml_collections.ConfigDict):
            break
    if not isinstance(node, ml_collections.ConfigDict) or (
            leaf not in node and not (parents and parents[-1] in OPEN_KEYS)):
        raise ConfigError(f'config.grid.{key}: not a key of config.base'
                          f'{unknown_key_hint(config, key)}')
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f'config.grid.{key}: {value!r} does not fit config.base.{key}, of '
                          f'type {node.get_ref(leaf).get_type().__name__}') from e


# Running the cells ------------------------------------------------------------------------

def run_sweep(sweep: ml_collections.ConfigDict, workdir: str | pathlib.Path, parallel: int = 1,
              command: str = '', report: Callable[[str], None] = print) -> int:
    """Train every unfinished cell of ``sweep`` in ``workdir/<cell name>/``, ``parallel`` at a
    time, then write ``workdir/results.{csv,md,png}`` from all finished cells (``command``:
    the command line, quoted in ``results.md``). ``report`` gets one line per event.

    Returns the exit status: 0 every cell finished; 2 some did not (each failure was reported
    with its exit status); 128 + N when signal N stopped the sweep (it was passed on to the
    running cells, which saved a checkpoint: the same command resumes them). Raises
    ConfigError before anything runs for a bad grid, cell config or ``parallel``, and RunError
    for a workdir that cannot be written.
    """
    if parallel < 1:
        raise ConfigError(f'--parallel must be >= 1, got {parallel}')
    cells = expand(sweep)
    workdir = pathlib.Path(workdir).absolute()
    jobs = []
    try:
        for cell in cells:
            directory = workdir / cell.name
            if final_metrics(directory, cell.config.num_train_steps) is not None:
                report(_skip_line(cell, directory))
                continue
            directory.mkdir(parents=True, exist_ok=True)
            (directory / CELL_CONFIG).write_text(cell.config.to_json(indent=2) + '\n')
            (directory / CELL_CONFIG_FILE).write_text(_CELL_CONFIG_PY)
            jobs.append(Job(cell.name, _train_command(directory), directory / CELL_LOG))
    except OSError as e:
        raise RunError(f'--workdir {workdir} is not writable: {e.strerror or e}') from e
    # JAX takes 75% of an accelerator's memory per process up front, which would leave the
    # second of several cells sharing one without any.
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if parallel > 1:
        env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    _, stopped_by = run_jobs(jobs, parallel, report, env)
    rows = summarize(cells, workdir, report)
    write_results(rows, workdir, command, parallel)
    report(f'results: {workdir / RESULTS_MD}, {RESULTS_CSV}, {RESULTS_PNG}')
    unfinished = [name for row in rows for name in row.unfinished]
    if stopped_by:
        report(f'stopped by {signal.Signals(stopped_by).name}; the same command resumes the '
               f'{len(unfinished)} unfinished cell(s)')
        return 128 + stopped_by
    if unfinished:
        report(f'{len(unfinished)} of {len(cells)} cells did not finish: {", ".join(unfinished)}')
        return 2
    return 0


def _skip_line(cell: Cell, directory: pathlib.Path) -> str:
    line = f'{cell.name}: skipped, finished before'
    saved = directory / CELL_CONFIG
    changes = changed_keys(json.loads(saved.read_text()), cell.config) if saved.exists() else []
    if changes:
        line += (f' with another config ({"; ".join(changes)}); its results are kept, use '
                 f'another --workdir to train it again')
    return line


def _train_command(directory: pathlib.Path) -> tuple[str, ...]:
    # Each cell is `python -m train` in a process of its own rather than train_and_evaluate in
    # this one: --parallel needs processes (one JAX runtime trains one model at a time, signal
    # handlers belong to a process's main thread), so one path serves both modes; a cell that
    # crashes or runs out of memory cannot take the sweep down; its exit status is the
    # documented one of `python -m train`, and its log starts with the command that reruns it.
    return (sys.executable, '-m', 'train', f'--config={directory / CELL_CONFIG_FILE}',
            f'--workdir={directory}')


def cell_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The training config in a cell's ``config.json`` (``Cell.config`` as JSON), with the
    types of ``base_config()``: what the cell's ``config.py`` gives ``python -m train``."""
    return from_tree(json.loads(pathlib.Path(path).read_text()))


def run_jobs(jobs: Sequence[Job], parallel: int, report: Callable[[str], None],
             env: dict[str, str] | None = None) -> tuple[dict[str, int], int | None]:
    """Run ``jobs`` as subprocesses in order, at most ``parallel`` at a time; a failing job does
    not stop the others. Returns the exit status of each job that ran, by name, and the signal
    (SIGINT or SIGTERM) that stopped the sweep, or None: such a signal is passed on to the
    running jobs, which are waited for, and no further job starts.
    """
    waiting = list(jobs)
    running: dict[subprocess.Popen, tuple[Job, float, int]] = {}
    codes: dict[str, int] = {}
    received: list[int] = []

    def forward(signum, frame):
        del frame
        received.append(signum)
        for process in list(running):
            process.send_signal(signum)

    # Handlers can only be installed from the main thread; elsewhere signals keep their effect.
    handlers = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)
                } if handlers else {}
    try:
        while running or (waiting and not received):
            while waiting and not received and len(running) < parallel:
                job = waiting.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with job.log.open('a') as log:
                    log.write(f'$ {shlex.join(job.argv)}\n')
                    start = log.tell()
                    # A session of its own: a Ctrl-C at the terminal reaches the sweep only,
                    # which passes it on once (a second one makes a run skip its checkpoint).
                    process = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                               env=env, start_new_session=True)
                running[process] = (job, time.monotonic(), start)
                if received:  # a signal that came before the job was in `running`
                    process.send_signal(received[-1])
                report(f'{job.name}: started ({len(jobs) - len(waiting)}/{len(jobs)}), log '
                       f'{job.log}')
            done = [process for process in running if process.poll() is not None]
            for process in done:
                job, started, start = running.pop(process)
                codes[job.name] = process.returncode
                report(_end_line(job, process.returncode, time.monotonic() - started, start,
                                 'stopped' if received else 'failed'))
            if not done:
                time.sleep(0.1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return codes, (received[0] if received else None)


def _end_line(job: Job, code: int, seconds: float, log_start: int, verdict: str) -> str:
    """``NAME: done in S s``, or ``NAME: VERDICT, exit status N: LINE (log PATH)`` with the
    job's last ``error:`` line (else its last line) since ``log_start``."""
    if code == 0:
        return f'{job.name}: done in {seconds:.0f} s'
    status = f'killed by signal {-code}' if code < 0 else f'exit status {code}'
    with job.log.open('rb') as log:
        log.seek(log_start)
        lines = [line.strip() for line in re.split(r'[\r\n]', log.read().decode(errors='replace'))
                 if line.strip()]
    errors = [line for line in lines if line.startswith('error:')]
    last = (errors or lines or ['(no output)'])[-1]
    return f'{job.name}: {verdict}, {status}: {last} (log {job.log})'


# Reading the cells ------------------------------------------------------------------------

def final_metrics(directory: pathlib.Path, num_train_steps: int) -> dict[str, float] | None:
    """The final evaluation (``eval/*`` logged at ``num_train_steps``) of the run in
    ``directory`` if it finished: its checkpoint of that step complete (Orbax renames a
    checkpoint into place once written) and the evaluation logged; else None."""
    if not (directory / loop.CHECKPOINT_DIR / str(num_train_steps)).is_dir():
        return None
    values = {name: value for row in read_metrics(directory / METRICS_FILE)
              if row['step'] == num_train_steps
              for name, value in row.items() if name.startswith('eval/')}
    return values if any(name in values for name in MAIN_METRICS) else None


def images_per_second(directory: pathlib.Path, batch_size: int) -> float | None:
    """Training throughput of the run in ``directory``: the median over the intervals between
    consecutive logged steps (``batch_size * steps / seconds``), from the wall times of its
    TensorBoard records (one event file per attempt). The first log of an attempt only opens an
    interval, so compilation does not count, and the median leaves out the few intervals that
    hold an evaluation or a checkpoint. None with fewer than two logs in every attempt."""
    rates = []
    for path in sorted((directory / TENSORBOARD_DIR).glob('events.out.tfevents.*')):
        logs = [(event.step, event.wall_time) for event in tensorboard.read_events(path)
                if _THROUGHPUT_TAG in event.scalars]
        rates += [batch_size * (s1 - s0) / (t1 - t0)
                  for (s0, t0), (s1, t1) in zip(logs, logs[1:]) if s1 > s0 and t1 > t0]
    return float(np.median(rates)) if rates else None


def model_size(config: ml_collections.ConfigDict) -> tuple[int, float]:
    """``(parameters, FLOPs per image)`` of ``config``'s model, as its run's first line says
    (``summary.count_params``, ``summary.flops_per_image``); nothing is compiled."""
    exp = loop.build_experiment(config)
    image = jnp.zeros((1, *exp.input_shape), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(
        functools.partial(exp.model.init, train=False), jax.random.key(0), image))
    return (summary.count_params(variables['params']),
            summary.flops_per_image(exp.model, variables, exp.input_shape))


def summarize(cells: Sequence[Cell], workdir: pathlib.Path,
              report: Callable[[str], None] = print) -> list[Row]:
    """One Row per group of ``cells`` (in grid order), read from their directories. A finished
    cell is described by the config it ran with (its ``config.json``), which may be older than
    ``cell.config``; a model that no longer builds is reported and leaves its size blank."""
    rows: dict[tuple, Row] = {}
    for cell in cells:
        row = rows.setdefault(cell.group, Row(cell.group))
        directory = workdir / cell.name
        final = final_metrics(directory, cell.config.num_train_steps)
        if final is None:
            row.unfinished.append(cell.name)
            continue
        saved = directory / CELL_CONFIG
        config = cell_config(saved) if saved.exists() else cell.config
        row.seeds.append(config.seed)
        for name, value in final.items():
            row.metrics.setdefault(name, []).append(value)
        rate = images_per_second(directory, config.batch_size)
        if rate is not None:
            row.images_per_s.append(rate)
        if row.params is None:
            try:
                row.params, row.flops = model_size(config)
            except RunError as e:
                report(f'{cell.name}: no parameter count or GFLOPs, {e}')
    return list(rows.values())


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); std None for fewer than 2 values, both
    None for none."""
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


# Writing the results ----------------------------------------------------------------------

def _metric_names(rows: Sequence[Row]) -> list[str]:
    """Every logged final metric, the task's main one first."""
    names = {name for row in rows for name in row.metrics}
    return sorted(names, key=lambda name: (name not in MAIN_METRICS, name))


def write_results(rows: Sequence[Row], workdir: pathlib.Path, command: str = '',
                  parallel: int = 1) -> None:
    """``results.csv`` (full precision, empty where there is no value), ``results.md`` and
    ``results.png`` in ``workdir``, one row per Row."""
    names = _metric_names(rows)
    keys = [key for key, _ in rows[0].group] if rows else []
    labels = _labels(keys)
    with (workdir / RESULTS_CSV).open('w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow([*keys, 'n', 'seeds', *(f'{name} {stat}' for name in names
                                                 for stat in ('mean', 'std')),
                         'params', 'gflops_per_image', 'images_per_s mean', 'images_per_s std'])
        for row in rows:
            stats = [value for name in names for value in mean_std(row.metrics.get(name, []))]
            writer.writerow([*(str(value) for _, value in row.group), len(row.seeds),
                             ' '.join(map(str, row.seeds)),
                             *('' if value is None else repr(value) for value in stats),
                             '' if row.params is None else row.params,
                             '' if row.flops is None else repr(row.flops / 1e9),
                             *('' if value is None else repr(value)
                               for value in mean_std(row.images_per_s))])
    (workdir / RESULTS_MD).write_text(_markdown(rows, names, [labels[k] for k in keys], command,
                                                parallel))
    _plot(rows, workdir / RESULTS_PNG, command)


def _markdown(rows: Sequence[Row], names: list[str], columns: list[str], command: str,
              parallel: int) -> str:
    head = [*columns, 'n', 'seeds', *names, 'params', 'GFLOPs/image', 'img/s']
    lines = [
        '# Sweep results', '',
        *([f'`{command}`', ''] if command else []),
        'One row per grid cell without its seed. Each final evaluation is the mean +- the '
        'sample standard deviation (ddof=1) over the n seeds whose run finished (no std for '
        'n = 1). GFLOPs: one inference forward pass on one image (a multiply-add is 2 FLOPs). '
        'img/s: training throughput, the median over the intervals between logged steps'
        + (f', with up to {parallel} cells training at once' if parallel > 1 else '') + '.',
        '',
        '| ' + ' | '.join(head) + ' |',
        '|' + '---|' * len(columns) + '---:|' * (len(head) - len(columns)),
    ]
    for row in rows:
        cells = [str(value) for _, value in row.group]
        cells += [str(len(row.seeds)), ', '.join(map(str, row.seeds))]
        cells += [_format(name, *mean_std(row.metrics.get(name, []))) for name in names]
        cells += ['' if row.params is None else f'{row.params:,}',
                  '' if row.flops is None else f'{row.flops / 1e9:.4g}',
                  _format('img/s', *mean_std(row.images_per_s))]
        lines.append('| ' + ' | '.join(cells) + ' |')
    unfinished = [name for row in rows for name in row.unfinished]
    if unfinished:
        lines += ['', 'Not finished (see their train.log): '
                  + ', '.join(f'`{name}`' for name in unfinished) + '.']
    return '\n'.join(lines) + '\n'


def _format(name: str, mean: float | None, std: float | None) -> str:
    """Losses with 4 decimals, img/s whole, the other metrics (fractions) in percent."""
    if mean is None:
        return ''
    if name == 'img/s':
        scale, digits, unit = 1.0, 0, ''
    elif name.endswith('loss'):
        scale, digits, unit = 1.0, 4, ''
    else:
        scale, digits, unit = 100.0, 2, '%'
    text = f'{scale * mean:,.{digits}f}'
    return text + (f' +- {scale * std:,.{digits}f}' if std is not None else '') + unit


def _plot(rows: Sequence[Row], path: pathlib.Path, title: str) -> None:
    """Bars of each main metric present (mean over seeds, error bars: std), one panel each."""
    metrics = [name for name in MAIN_METRICS if any(name in row.metrics for row in rows)]
    metrics = metrics or list(MAIN_METRICS[:1])
    fig = Figure(figsize=(len(metrics) * max(4.0, 1.0 + 0.8 * len(rows)), 4.5))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    short = _labels([key for key, _ in rows[0].group] if rows else [])
    labels = [', '.join(f'{short[key]}={_text(value)}' for key, value in row.group) or 'all'
              for row in rows]
    for ax, metric in zip(axes, metrics):
        stats = [mean_std(row.metrics.get(metric, [])) for row in rows]
        means = [np.nan if mean is None else mean for mean, _ in stats]
        errors = [0.0 if std is None else std for _, std in stats]
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color='tab:blue', alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=30 if len(rows) > 3 else 0,
                      ha='right' if len(rows) > 3 else 'center', fontsize=8)
        ax.set_ylabel(f'{metric} (mean +- std over seeds)')
        ax.grid(axis='y', alpha=0.3)
    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 14)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
