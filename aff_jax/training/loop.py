"""The training loop: set up (or resume) a run, train, evaluate, checkpoint, report.

``train_and_evaluate(config, workdir)`` is what ``python -m train`` runs. Every problem with
the config, the dataset or the workdir is raised as a one-line ``RunError`` before any
compilation; divergence as ``Diverged``. The task (classification or segmentation, ``tasks``)
follows from the model and the dataset, which must agree; the loop is the same for both.

One ``ExitStack`` owns the run's resources (workdir lock, signal handlers, checkpointer, data
iterators, metrics writer): whichever way the run ends, a pending checkpoint is completed (or,
when it cannot be, removed), grain workers stop, the handlers and the lock are released.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import aff_jax
from aff_jax import conv as conv_lib
from aff_jax import host_memory
from aff_jax.data import auto_augment, pipeline
from aff_jax.data.sources import SPLITS
from aff_jax.training import mesh as mesh_lib
from aff_jax.training import optimizer as optimizer_lib
from aff_jax.training import pretrained
from aff_jax.training import state as state_lib
from aff_jax.training import compile_cache, steps, summary, tasks
from aff_jax.training.checkpoint import Checkpointer
from aff_jax.training.config import changed_keys
from aff_jax.training.errors import ConfigError, Diverged, RunError, disk_full
from aff_jax.training.metrics import (METRICS_FILE, MetricsWriter, ProgressBar, Throughput,
                                      read_metrics)
from aff_jax.training.plot import CURVES_FILE, PREDICTIONS_FILE, plot_curves, plot_predictions
from aff_jax.training.stop_signals import StopSignals
from aff_jax.training.workdir_lock import WorkdirLock

CHECKPOINT_DIR = 'checkpoints'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
RNG_IMPLS = ('rbg', 'unsafe_rbg', 'threefry2x32')
MATMUL_PRECISIONS = (None, 'default', 'high', 'highest')
AUGMENTS = ('default', 'none') + auto_augment.POLICIES
POSITIVE_INT_KEYS = ('batch_size', 'eval_batch_size', 'num_train_steps', 'log_every_steps',
                     'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                     'distributed_timeout_s')


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How a run ended: the step reached, the final held-out metrics (``eval/loss``,
    ``eval/count``, ``eval/accuracy`` and ``eval/top5_accuracy``, or ``eval/miou``,
    ``eval/pixel_accuracy`` and ``eval/iou/<class>``), or None when a signal stopped it first
    (after a checkpoint); ``exit_code``: 0, or 128 + the signal's number (143 SIGTERM or
    preemption, 130 SIGINT)."""
    step: int
    eval_metrics: dict[str, float] | None
    exit_code: int = 0


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What ``evaluate_saved`` scored: the checkpoint's ``step`` (None for ``init_from``
    weights), the ``split``, the ``source`` (the checkpoint's directory or the weights' path)
    and the task's ``scores`` (``Task.scores``: ``eval/*`` and ``eval/count``)."""
    step: int | None
    split: str
    source: str
    scores: dict[str, float]
    task: tasks.Task


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything ``train_and_evaluate`` derives from a validated config."""
    config: ml_collections.ConfigDict
    info: Any
    num_classes: int
    input_shape: tuple[int, int, int]
    mesh: jax.sharding.Mesh
    model: Any
    rules: list[tuple[str, str | None]]
    task: tasks.Task


def check_config(config: ml_collections.ConfigDict) -> None:
    """Validate the keys that need no dataset or devices; raise ConfigError naming the key."""
    for key in POSITIVE_INT_KEYS:
        value = config[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f'config.{key} must be a positive int, got {value!r}')
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ConfigError(f'config.seed must be an int >= 0, got {config.seed!r}')
    if config.batch_size < 2:
        raise ConfigError(f'config.batch_size={config.batch_size}: BatchNorm in training needs '
                          f'at least 2 examples per batch (a single one normalises every '
                          f'channel of the global contexts to its bias)')
    if config.model not in aff_jax.list_models():
        raise ConfigError(f'config.model: unknown model {config.model!r}; known: '
                          f'{", ".join(aff_jax.list_models())}')
    if config.fusion is not None and config.fusion not in aff_jax.fusion.names():
        raise ConfigError(f'config.fusion: unknown fusion {config.fusion!r}; known: '
                          f'{", ".join(aff_jax.fusion.names())}')
    if config.dtype not in DTYPES:
        raise ConfigError(f'config.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}')
    if config.conv_implementation not in conv_lib.IMPLEMENTATIONS:
        raise ConfigError(f'config.conv_implementation must be one of '
                          f'{conv_lib.IMPLEMENTATIONS}, got {config.conv_implementation!r}')
    if config.matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(f'config.matmul_precision must be one of {MATMUL_PRECISIONS}, got '
                          f'{config.matmul_precision!r}')
    if config.retain_freed_memory not in host_memory.SETTINGS:
        raise ConfigError(f'config.retain_freed_memory must be one of {host_memory.SETTINGS}, '
                          f'got {config.retain_freed_memory!r}')
    if config.rng_impl not in RNG_IMPLS:
        raise ConfigError(f'config.rng_impl must be one of {RNG_IMPLS}, got {config.rng_impl!r}')
    optimizer_lib.make_optimizer(config)
    steps.check_regularisation(config, _task_name(config.model))
    augmentation(config)


def augmentation(config: ml_collections.ConfigDict
                 ) -> tuple[str | None, auto_augment.Policy | None]:
    """``config.augment`` as the pipeline's ``augment_kind`` (None: the dataset's default) and
    ``policy``."""
    if config.augment not in AUGMENTS:
        raise ConfigError(f'config.augment must be one of {AUGMENTS}, got {config.augment!r}')
    if config.augment == 'none':
        return 'none', None
    if config.augment == 'default':
        return None, None
    try:
        return None, auto_augment.Policy(config.augment, config.randaugment_num_ops,
                                         config.randaugment_magnitude)
    except ValueError as e:
        raise ConfigError(f'config.{e}') from e


def _task_name(model: str) -> str:
    return 'segmentation' if aff_jax.models.is_segmentation(model) else 'classification'


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validate ``config`` (which passed ``check_config``, as ``train_and_evaluate`` ensures)
    against the devices and the dataset; build the mesh and the model. The mesh checks come
    first, so a bad mesh fails before a dataset is prepared.
    """
    mesh = mesh_lib.make_mesh(config.mesh_shape)
    mesh_lib.check_batch_size(config.batch_size, mesh)
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, key='eval_batch_size')
    rules = mesh_lib.check_rules(config.logical_axis_rules)
    try:
        info = pipeline.get_info(config.dataset, data_dir=config.data_dir,
                                 num_classes=config.num_classes,
                                 skip_bad_files=config.skip_bad_files)
    except ValueError as e:
        raise ConfigError(f'config.dataset: {e}') from e
    if info.task != _task_name(config.model):
        raise ConfigError(f'config.model {config.model!r} is a {_task_name(config.model)} '
                          f'model but config.dataset {config.dataset!r} is a {info.task} '
                          f'dataset')
    num_classes = info.num_classes if config.num_classes is None else config.num_classes
    if num_classes < info.num_classes:
        raise ConfigError(f'config.num_classes={num_classes} is smaller than the '
                          f'{info.num_classes} classes of {config.dataset!r}')
    height, width, channels = info.image_shape
    if config.image_size is not None:
        height = width = config.image_size
    try:
        model = aff_jax.create_model(config.model, num_classes=num_classes, fusion=config.fusion,
                                     dtype=DTYPES[config.dtype], **config.model_overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f'config.model_overrides: {e}') from e
    if info.task == 'segmentation':
        names = tuple(info.class_names) + tuple(
            f'class_{k}' for k in range(len(info.class_names), num_classes))
        task = tasks.Segmentation(num_classes, names)
    else:
        task = tasks.Classification(num_classes)
    return Experiment(config, info, num_classes, (height, width, channels), mesh, model, rules,
                      task)


def _dataset(exp: Experiment, split: str, global_batch: int, train: bool,
             start_batch: int = 0):
    """This process's share of ``split`` (a re-iterable grain dataset)."""
    index, count = mesh_lib.process_batch_split(mesh_lib.batch_sharding(exp.mesh), global_batch)
    kind, policy = augmentation(exp.config)
    try:
        return pipeline.make_dataset(
            exp.config.dataset, split, batch_size=global_batch // count, seed=exp.config.seed,
            train=train, data_dir=exp.config.data_dir, image_size=exp.config.image_size,
            process_index=index, process_count=count, worker_count=exp.config.data_workers,
            augment_kind=kind, policy=policy,
            num_classes=exp.config.num_classes, start_batch=start_batch,
            skip_bad_files=exp.config.skip_bad_files)
    except ValueError as e:
        raise ConfigError(f'config.dataset={exp.config.dataset!r}: {e}') from e


def _to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding,
               global_batch: int) -> dict[str, jax.Array]:
    """Assemble the per-process arrays of a batch into global arrays sharded on ``data``."""
    return {key: jax.make_array_from_process_local_data(
        sharding, value, (global_batch, *value.shape[1:])) for key, value in batch.items()}


def evaluate(exp: Experiment, eval_step, state: state_lib.TrainState, eval_data
             ) -> dict[str, float]:
    """One pass over the held-out split (``eval_data``, from ``_dataset``): the task's scores
    (``tasks``), from sums accumulated on device and read once."""
    sharding = mesh_lib.batch_sharding(exp.mesh)
    totals = None
    with contextlib.closing(iter(eval_data)) as batches:
        for batch in batches:
            sums = eval_step(state, _to_global(batch, sharding, exp.config.eval_batch_size))
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return exp.task.scores(jax.device_get(totals))


@contextlib.contextmanager
def numerics(config: ml_collections.ConfigDict) -> Iterator[None]:
    """The config's convolution implementation and float32 matmul precision, for whatever is
    traced inside (the train and eval steps)."""
    with conv_lib.implementation(config.conv_implementation), \
            jax.default_matmul_precision(config.matmul_precision):
        yield


def _configure_process(config: ml_collections.ConfigDict) -> None:
    """The config's process-wide settings, before anything starts JAX's backend or compiles:
    glibc's malloc (``host_memory``) and the persistent compilation cache."""
    host_memory.retain_freed_memory(config.retain_freed_memory)
    compile_cache.enable(config.compilation_cache)


def evaluate_saved(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                   split: str = 'test', init_from: str | None = None) -> Evaluation:
    """Score saved weights on ``split`` with the trainer's sharded eval step.

    The weights: those ``restored`` gives (the newest complete checkpoint in
    ``workdir/checkpoints``, or ``init_from`` converted variables). Raises RunError in one
    line: the config (``check_config``, ``build_experiment``), an unknown split, and what
    ``restored`` raises.
    """
    check_config(config)
    if split not in SPLITS:
        raise ConfigError(f'unknown split {split!r}; the datasets have {" and ".join(SPLITS)}')
    with restored(config, workdir, init_from) as saved:
        exp = saved.exp
        eval_step = steps.make_eval_step(exp.model, exp.task.eval_sums, saved.shardings,
                                         mesh_lib.batch_sharding(exp.mesh), config.eval_flip)
        scores = evaluate(exp, eval_step, saved.state,
                          _dataset(exp, split, config.eval_batch_size, train=False))
    return Evaluation(saved.step, split, saved.source, scores, exp.task)


@dataclasses.dataclass(frozen=True)
class Restored:
    """Saved weights ready to run: the experiment ``exp``, the ``state`` laid out by
    ``shardings`` on ``exp.mesh``, the checkpoint's ``step`` (None for ``init_from`` weights)
    and the ``source`` (the checkpoint's directory or the weights' path)."""
    exp: Experiment
    state: state_lib.TrainState
    shardings: state_lib.TrainState
    step: int | None
    source: str

    def eval_batches(self, split: str = 'test'
                     ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, jax.Array]]]:
        """This process's batches of ``split`` as evaluation reads them (storage order, eval
        preprocessing, the last batch padded with mask 0), each with its global arrays sharded
        on ``data`` as the eval step takes them."""
        config = self.exp.config
        sharding = mesh_lib.batch_sharding(self.exp.mesh)
        with contextlib.closing(iter(_dataset(self.exp, split, config.eval_batch_size,
                                              train=False))) as batches:
            for batch in batches:
                yield batch, _to_global(batch, sharding, config.eval_batch_size)


def _no_checkpoint(directory: pathlib.Path) -> RunError:
    return RunError(f'no checkpoint in {directory}; train one with python -m train, or give '
                    f'converted weights with --init_from')


@contextlib.contextmanager
def restored(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
             init_from: str | None = None) -> Iterator[Restored]:
    """The newest complete checkpoint in ``workdir/checkpoints`` restored onto ``config``'s
    mesh, or with ``init_from`` an Orbax directory of converted variables, taken as a run with
    that ``config.init_from`` would start from it (``init_skip`` and a segmentation model's
    backbone alike). ``config`` must have passed ``check_config``. Inside the block the mesh
    and the convolution implementation are set, and the workdir's lock is held while its
    checkpoints are open: opening them removes unfinished saves, which would be a live run's.
    Raises RunError in one line: the config (``build_experiment``), no checkpoint, a
    checkpoint of another model or one that does not restore, weights that do not fit.
    """
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    if init_from is None and not directory.is_dir():
        raise _no_checkpoint(directory)  # before the Checkpointer, which would create it
    if init_from is not None and not os.path.isdir(init_from):
        raise ConfigError(f'--init_from {init_from}: no such directory (an Orbax checkpoint '
                          f'written by python -m aff_jax.interop.convert)')
    _configure_process(config)
    with contextlib.ExitStack() as resources:
        if init_from is None:
            resources.enter_context(WorkdirLock(directory.parent))
        exp = build_experiment(config)
        resources.enter_context(jax.set_mesh(exp.mesh))
        resources.enter_context(numerics(config))
        tx = optimizer_lib.make_optimizer(config)
        init_fn, abstract_state, shardings = state_lib.state_layout(
            exp.model, tx, (1, *exp.input_shape), exp.mesh, exp.rules)
        if init_from is None:
            checkpointer = resources.enter_context(Checkpointer(
                directory, config.checkpoint_every_steps, config.keep_checkpoints))
            saved = checkpointer.steps()
            if not saved:
                raise _no_checkpoint(directory)
            step = saved[-1]
            try:
                mismatches = checkpointer.mismatches(step, abstract_state)
                state = None if mismatches else checkpointer.restore(
                    step, state_lib.with_shardings(abstract_state, shardings))
            except Exception as e:  # noqa: BLE001 - damaged files fail in many ways
                raise RunError(f'the checkpoint at step {step} in {directory} cannot be '
                               f'restored ({_short_reason(e)})') from e
            if mismatches:
                raise _another_model(
                    'evaluate', checkpointer, step, mismatches,
                    changed_keys(checkpointer.saved_config(step), config),
                    'Give the config it was trained with')
            source = str(directory / str(step))
        else:
            init_rng, _ = jax.random.split(jax.random.key(config.seed, impl=config.rng_impl))
            state = pretrained.apply_pretrained(
                state_lib.create_state(init_fn, shardings, init_rng), init_from,
                config.init_skip, shardings, *_pretrained_target(exp.model))
            step, source = None, os.path.abspath(init_from)
        yield Restored(exp, state, shardings, step, source)


def newest_saved_config(workdir: str | pathlib.Path) -> dict:
    """The config (as saved: JSON, tuples read back as lists) of the newest complete
    checkpoint in ``workdir/checkpoints``, read under the workdir's lock as ``restored``
    reads it. Raises RunError when there is no checkpoint."""
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        raise _no_checkpoint(directory)
    # The policies only act on saves, and this one saves nothing: keep everything regardless.
    with WorkdirLock(directory.parent), Checkpointer(directory, 1, sys.maxsize) as checkpointer:
        saved = checkpointer.steps()
        if not saved:
            raise _no_checkpoint(directory)
        return checkpointer.saved_config(saved[-1])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> RunResult:
    """Train ``config`` in ``workdir``, resuming from its newest complete checkpoint if any.

    Writes ``workdir/checkpoints``, ``metrics.jsonl``, ``tensorboard/`` and ``curves.png``;
    prints the model summary first and the final held-out accuracy last (process 0). Raises
    RunError (one line: config, dataset, workdir, full disk) or Diverged.
    """
    check_config(config)
    workdir = _open_workdir(pathlib.Path(workdir))
    _configure_process(config)
    try:
        return _run(config, workdir)
    except Exception as e:
        full = disk_full(e, workdir / CHECKPOINT_DIR)
        if full is None:
            raise
        raise full from e


def _open_workdir(workdir: pathlib.Path) -> pathlib.Path:
    """``workdir``, created if need be; RunError if it cannot be written."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f'.write-test-{os.getpid()}'
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise RunError(f'--workdir {workdir} is not writable: {e.strerror or e}') from e
    return workdir.absolute()


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> RunResult:
    is_main = jax.process_index() == 0
    tx = optimizer_lib.make_optimizer(config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed, impl=config.rng_impl))
    with contextlib.ExitStack() as resources:
        if is_main:
            lock = resources.enter_context(WorkdirLock(workdir))
            if lock.taken_over:
                held = lock.taken_over
                print(f'taking over the workdir lock of a run that is gone (host '
                      f'{held.get("host")}, PID {held.get("pid")}, started {held.get("started")})',
                      file=sys.stderr)
        exp = build_experiment(config)
        signals = resources.enter_context(StopSignals())
        resources.enter_context(jax.set_mesh(exp.mesh))
        resources.enter_context(numerics(config))
        layout = state_lib.state_layout(exp.model, tx, (1, *exp.input_shape), exp.mesh,
                                        exp.rules)
        _, abstract_state, shardings = layout
        checkpointer = resources.enter_context(Checkpointer(
            workdir / CHECKPOINT_DIR, config.checkpoint_every_steps, config.keep_checkpoints))
        state, changes = _initial_state(exp, checkpointer, layout, init_rng)
        start = int(state.step)
        if is_main:
            _print_start(exp, abstract_state, start, changes)
        train_iter = resources.enter_context(contextlib.closing(iter(
            _dataset(exp, 'train', config.batch_size, train=True, start_batch=start))))
        eval_data = _dataset(exp, 'test', config.eval_batch_size, train=False)
        batch_sharding = mesh_lib.batch_sharding(exp.mesh)
        train_step = steps.make_train_step(
            exp.model, tx, optimizer_lib.make_schedule(config), config, exp.task,
            step_rng, shardings, batch_sharding)
        eval_step = steps.make_eval_step(exp.model, exp.task.eval_sums, shardings,
                                         batch_sharding, config.eval_flip)
        writer = resources.enter_context(contextlib.closing(
            MetricsWriter(workdir, start, enabled=is_main)))
        state, exit_code = _train(exp, state, train_iter, train_step, eval_step, eval_data,
                                  checkpointer, writer, signals)
        final = None
        if not exit_code:
            final = evaluate(exp, eval_step, state, eval_data)
            # Also when resuming a finished run whose final evaluation was interrupted.
            if not _has_eval_row(workdir, config.num_train_steps):
                writer.write(config.num_train_steps, _eval_row(final))
            if exp.task.name == 'segmentation':
                _write_predictions(exp, state, shardings, eval_data, workdir / PREDICTIONS_FILE,
                                   is_main)
    step = int(state.step)
    if is_main:
        _print_end(exp, workdir, step, final, exit_code)
    return RunResult(step, final, exit_code)


def _initial_state(exp: Experiment, checkpointer: Checkpointer, layout,
                   rng: jax.Array) -> tuple[state_lib.TrainState, list[str]]:
    """The state to start from and how the config differs from the checkpoint's.

    The newest checkpoint that restores, on the current mesh; one that fails (damaged files,
    missing metadata) is reported in one line and moved aside, and the next older one is
    tried. A checkpoint of another model is a ConfigError. Without a checkpoint: a fresh
    state (with ``init_from`` weights).
    """
    init_fn, abstract_state, shardings = layout
    target = state_lib.with_shardings(abstract_state, shardings)
    for step in reversed(checkpointer.steps()):
        try:
            changes = changed_keys(checkpointer.saved_config(step), exp.config)
            mismatches = checkpointer.mismatches(step, abstract_state)
            if not mismatches:
                return checkpointer.restore(step, target), changes
        except Exception as e:  # noqa: BLE001 - whatever is damaged, the older one may be fine
            moved = checkpointer.move_aside(step)
            if jax.process_index() == 0:
                print(f'the checkpoint at step {step} cannot be restored '
                      f'({_short_reason(e)}); moved it to {moved}', file=sys.stderr)
            continue
        raise _another_model('resume from', checkpointer, step, mismatches, changes,
                             'Use a new --workdir for a new run')
    state = state_lib.create_state(init_fn, shardings, rng)
    if exp.config.init_from:
        state = pretrained.apply_pretrained(state, exp.config.init_from, exp.config.init_skip,
                                            shardings, *_pretrained_target(exp.model))
    return state, []


def _another_model(action: str, checkpointer: Checkpointer, step: int, mismatches: list[str],
                   changes: list[str], advice: str) -> ConfigError:
    """The error for a checkpoint whose arrays do not fit the config's model."""
    shown = '; '.join(mismatches[:3]) + (f' (and {len(mismatches) - 3} more)'
                                         if len(mismatches) > 3 else '')
    return ConfigError(
        f'cannot {action} the checkpoint at step {step} in {checkpointer.directory}, it holds '
        f'another model: {shown}. The config differs from the checkpoint\'s in: '
        f'{"; ".join(changes) or "nothing (another version of aff-jax wrote it)"}. {advice}')


def _short_reason(error: Exception, limit: int = 200) -> str:
    # TensorStore appends a pointer to its own details (a bound method's repr) to its errors.
    text = ' '.join(str(error).split(' See full TensorStore details')[0].split())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def _check_finite(nonfinite_step: jax.Array, step: int, checkpointer: Checkpointer,
                  config: ml_collections.ConfigDict) -> None:
    """Raise Diverged if a non-finite update was applied up to ``step`` (``nonfinite_step``:
    the state's flag, 0 if none). One scalar read, at steps that wait for the device anyway."""
    bad = int(nonfinite_step)
    if not bad:
        return
    saved = checkpointer.newest_step()
    newest = f'the newest checkpoint is step {saved}' if saved is not None else \
        'no checkpoint was written'
    raise Diverged(
        f'the loss or the gradients became non-finite at step {bad} (learning_rate '
        f'{config.learning_rate}); stopped at step {step} without checkpointing it, {newest}. '
        f'Lower config.learning_rate, or set config.skip_nonfinite_updates=True to skip such '
        f'updates')


def _device_batches(batches: Iterator[dict[str, np.ndarray]], sharding, global_batch: int,
                    ahead: int = 2) -> Iterator[dict[str, jax.Array]]:
    """The batches as global device arrays, ``ahead`` batches before the step that takes them,
    so that their host-to-device copies overlap the steps running on the device."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(_to_global(batch, sharding, global_batch))
        if len(queue) > ahead:
            yield queue.popleft()
    yield from queue


def _train(exp: Experiment, state: state_lib.TrainState, train_iter: Iterator, train_step,
           eval_step, eval_data, checkpointer: Checkpointer, writer: MetricsWriter,
           signals: StopSignals) -> tuple[state_lib.TrainState, int]:
    """Steps ``state.step + 1 .. num_train_steps``; returns the state and 0, or the exit code
    of the signal (or preemption notice) that stopped it early, after a checkpoint of the
    step it reached. Raises Diverged before logging or checkpointing a non-finite state.

    A log step's metrics are read after the next step has been dispatched (the device is
    never left idle waiting for the host to write them); evaluation and checkpoint steps
    wait for the device anyway and write theirs at once.
    """
    config = exp.config
    throughput = Throughput(config.batch_size)
    batches = _device_batches(throughput.batches(train_iter), mesh_lib.batch_sharding(exp.mesh),
                              config.batch_size)
    config_dict = config.to_dict()
    exit_code = 0
    pending = None  # (step, metrics) of a log step not written yet

    def write_pending():
        logged_step, metrics, rates = pending
        metrics = dict(metrics)
        _check_finite(metrics.pop(steps.NONFINITE_STEP), logged_step, checkpointer, config)
        # The logged values are those of this one step, so that a run resumed at any step
        # logs exactly what the uninterrupted run did.
        values = {name: float(value) for name, value in metrics.items()}
        writer.write(logged_step, {**values, **rates})
        bar.show({name: values[name] for name in ('train/loss', 'train/accuracy')})

    with contextlib.closing(ProgressBar(config.num_train_steps, int(state.step),
                                        enabled=writer.enabled)) as bar:
        for step in range(int(state.step) + 1, config.num_train_steps + 1):
            state, metrics = train_step(state, next(batches))
            if throughput.since is None:
                throughput.restart(step)
            bar.advance()
            if pending is not None:
                write_pending()
                pending = None
            if checkpointer.preempted(step):
                exit_code = 143
            elif signals.received:
                exit_code = signals.exit_code
            last = step == config.num_train_steps
            if step % config.log_every_steps == 0 or last:
                pending = (step, metrics, throughput.read(step))
            evaluate_now = step % config.eval_every_steps == 0 and not last
            save = bool(exit_code) or last or checkpointer.should_save(step)
            if evaluate_now or save:
                if pending is not None:
                    write_pending()
                    pending = None
                _check_finite(state.nonfinite_step, step, checkpointer, config)
            if evaluate_now:
                values = _eval_row(evaluate(exp, eval_step, state, eval_data))
                writer.write(step, values)
                bar.print(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in values.items()))
                throughput.restart(step)  # the rates are of training steps only
            if save:
                checkpointer.save(step, state, config_dict, force=True)
            if exit_code:
                break
    return state, exit_code


def _has_eval_row(workdir: pathlib.Path, step: int) -> bool:
    return any(row['step'] == step and any(name.startswith('eval/') for name in row)
               for row in read_metrics(workdir / METRICS_FILE))


def _eval_row(values: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in values.items() if name != 'eval/count'}


def _pretrained_target(model: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Where ``init_from`` weights go: ``(into, drop)``. A segmentation model takes a
    classifier's checkpoint into its ``backbone``, without the classifier's head."""
    if hasattr(model, 'backbone'):
        return ('backbone',), (model.backbone.head,)
    return (), ()


def _write_predictions(exp: Experiment, state: state_lib.TrainState, shardings, eval_data,
                       path: pathlib.Path, is_main: bool, count: int = 6) -> None:
    """``predictions.png``: the first ``count`` test images, their true and predicted masks.
    Every process runs the prediction (its devices hold part of the batch); process 0 draws."""
    sharding = mesh_lib.batch_sharding(exp.mesh)
    predict = steps.make_eval_step(
        exp.model, lambda logits, _: jnp.argmax(logits, -1).astype(jnp.int32), shardings, sharding,
        exp.config.eval_flip)
    with contextlib.closing(iter(eval_data)) as batches:
        batch = next(batches)
    images = _to_global({'image': batch['image']}, sharding, exp.config.eval_batch_size)
    predicted = np.asarray(predict(state, images))
    if is_main:
        shown = min(count, int(batch['mask'].sum()))
        pixels = batch['image'][:shown] * np.asarray(exp.info.std) + np.asarray(exp.info.mean)
        plot_predictions(pixels, batch['label'][:shown], predicted[:shown], exp.task.class_names,
                         path)


def _print_start(exp: Experiment, abstract_state: state_lib.TrainState, start: int,
                 changes: list[str]) -> None:
    variables = {'params': abstract_state.params, 'batch_stats': abstract_state.batch_stats}
    flops = summary.flops_per_image(exp.model, variables, exp.input_shape)
    print(summary.describe(exp.config.model, summary.count_params(abstract_state.params), flops))
    mesh = exp.mesh
    print(f'mesh data={mesh.shape["data"]} model={mesh.shape["model"]} over '
          f'{mesh.devices.size} {mesh.devices.flat[0].platform} device(s), '
          f'{jax.process_count()} process(es)')
    print(f'dataset {exp.config.dataset}: {exp.info.num_train} train / {exp.info.num_test} test '
          f'images of {exp.input_shape}, {exp.info.num_classes} classes')
    if start:
        print(f'resuming from the checkpoint at step {start}')
    if changes:
        print('the config differs from the checkpoint\'s, so the run will not continue exactly '
              'as it would have: ' + '; '.join(changes))


def _print_end(exp: Experiment, workdir: pathlib.Path, step: int, final: dict | None,
               exit_code: int) -> None:
    rows = read_metrics(workdir / METRICS_FILE)
    if rows:
        plot_curves(rows, workdir / CURVES_FILE, f'{exp.config.model} on {exp.config.dataset}')
    if final is None:
        signal_name = 'SIGINT' if exit_code == 130 else 'SIGTERM'
        print(f'stopped by {signal_name} after saving the checkpoint at step {step}; run the '
              f'same command to resume')
        return
    print(exp.task.describe(step, final))
