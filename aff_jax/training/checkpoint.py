"""Orbax checkpoints of the train state and the config.

A checkpoint is a Composite of two items: ``state`` (the TrainState, ``StandardSave``) and
``config`` (JSON). The data position needs no item of its own: the training stream is global,
so the state's step is the index of the next batch (``pipeline.make_dataset(start_batch=...)``),
whatever the number of workers or processes. Saves are asynchronous: ``save`` returns once the
arrays are copied off the devices, and the files are written in the background. Orbax writes
into a temporary directory and renames it when complete, so ``steps`` only ever lists finished
checkpoints. A checkpoint that fails to restore is moved aside (``move_aside``), never deleted.
"""
from __future__ import annotations

import contextlib
import pathlib
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from aff_jax.training.errors import ConfigError, attribute_full_disk
from aff_jax.training.state import TrainState

CORRUPT_PREFIX = 'corrupt-'
# Seconds before each removal of a failed save's directories (see Checkpointer.__exit__).
_PARTIAL_SAVE_SWEEPS = (0.0, 0.5)


class Checkpointer:
    """Save every ``every_steps`` steps, keep the newest ``keep``, save on preemption.

    Preemption: a multi-process job relies on JAX's preemption sync point (the coordination
    service turns SIGTERM into a step all processes agree on, ``preempted``); a single-process
    job forces the save itself (``stop_signals``). Use as a context manager: leaving the block
    waits for a pending save to be complete on disk; after an exception, a save that cannot
    complete (a full disk, ...) is removed, so no partial checkpoint stays behind.
    """

    def __init__(self, directory: pathlib.Path, every_steps: int, keep: int):
        if every_steps < 1:
            raise ConfigError(f'config.checkpoint_every_steps must be >= 1, got {every_steps}')
        if keep < 1:
            raise ConfigError(f'config.keep_checkpoints must be >= 1, got {keep}')
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(every_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=True,
            create=True,
            # A run killed mid-save leaves a temporary directory; a resumed run may save
            # the same step again.
            cleanup_tmp_directories=True,
        )
        self.directory = directory.absolute()
        # Handlers given up front, so a fresh process can read a checkpoint's metadata.
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            'state': ocp.StandardCheckpointHandler(),
            'config': ocp.JsonCheckpointHandler(),
        })

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the exception that ended the run is the one
            self.close()                       # to report
        # What is still temporary now is a save that failed (a full disk, ...): remove it, so
        # that no half-written checkpoint stays behind. A failed save can still create one of
        # its directories after a first removal (an empty `state.orbax-checkpoint-tmp`, in
        # about one of ten full-disk test runs: Orbax creates them asynchronously and, it
        # seems, does not wait for that when the save fails), so look again a moment later.
        if jax.process_index() == 0:
            failed = sorted(self.directory.glob('*.orbax-checkpoint-tmp*'))
            if failed:  # what a full disk without a file name stopped
                attribute_full_disk(exc, failed[0])
            for delay in _PARTIAL_SAVE_SWEEPS:
                time.sleep(delay)
                for partial in self.directory.glob('*.orbax-checkpoint-tmp*'):
                    shutil.rmtree(partial, ignore_errors=True)

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return list(self.manager.all_steps())

    def newest_step(self) -> int | None:
        """The newest complete checkpoint's step once pending saves are on disk, or None."""
        self.manager.wait_until_finished()
        return self.manager.latest_step()

    def preempted(self, step: int) -> bool:
        """Whether a multi-process job must save at ``step`` and stop (call on every process,
        every step)."""
        return self.manager.reached_preemption(step)

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would save."""
        return self.manager.should_save(step)

    def save(self, step: int, state: TrainState, config: dict, force: bool = False) -> bool:
        """Start saving if the policy (or ``force``) says so; returns whether it did."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  config=ocp.args.JsonSave(config))
        return self.manager.save(step, args=args, force=force)

    def saved_config(self, step: int) -> dict:
        """The config checkpoint ``step`` was saved with (JSON: tuples read back as lists)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))['config']

    def mismatches(self, step: int, target: TrainState) -> list[str]:
        """How the arrays saved at ``step`` differ from ``target`` in names, shapes and dtypes
        (empty when the checkpoint fits). Reads metadata only."""
        metadata = self.manager.item_metadata(step)['state']
        if not metadata:
            raise ValueError('its state metadata is missing')
        saved = _shapes(metadata)
        wanted = _shapes(target)
        return [f'{name}: saved {saved.get(name, "nothing")}, this config needs '
                f'{wanted.get(name, "nothing")}'
                for name in sorted(saved.keys() | wanted.keys())
                if saved.get(name) != wanted.get(name)]

    def restore(self, step: int, target: TrainState) -> TrainState:
        """The state of checkpoint ``step`` laid out as ``target`` (ShapeDtypeStructs with the
        current mesh's shardings, which may differ from the mesh that saved)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        return restored['state']

    def move_aside(self, step: int) -> pathlib.Path:
        """Move checkpoint ``step`` to ``corrupt-<step>`` (``-2``, ``-3``, ... if taken) in the
        checkpoint directory, where no run looks for checkpoints; returns the new path."""
        target = self.directory / f'{CORRUPT_PREFIX}{step}'
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.directory / f'{CORRUPT_PREFIX}{step}-{suffix}'
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'aff_jax moved checkpoint {step} aside')
        self.manager.reload()
        return target

    def close(self) -> None:
        """Wait for pending saves to be complete on disk, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def _shapes(tree: Any) -> dict[str, str]:
    """``'params/output/kernel' -> 'float32(32, 10)'`` for every array of a state tree, from
    arrays, ShapeDtypeStructs or Orbax metadata alike."""
    def name(path):
        return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                        for k in path)
    return {name(path): f'{jax.numpy.dtype(leaf.dtype).name}{tuple(leaf.shape)}'
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
