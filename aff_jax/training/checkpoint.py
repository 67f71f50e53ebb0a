"""Orbax checkpoints of the train state, the data iterator position and the config.

A checkpoint is a Composite of three items: ``state`` (the TrainState, ``StandardSave``),
``data`` (the grain iterator state, one file per process) and ``config`` (JSON). Saves are
asynchronous: ``save`` returns once the arrays are copied off the devices, and the files are
written in the background. Orbax writes into a temporary directory and renames it when
complete, so ``latest_step`` only ever sees finished checkpoints.
"""
from __future__ import annotations

import pathlib
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from aff_jax.training.errors import ConfigError
from aff_jax.training.state import TrainState


class Checkpointer:
    """Save every ``every_steps`` steps, keep the newest ``keep``, save on preemption.

    Preemption: a multi-process job relies on JAX's preemption sync point (the coordination
    service turns SIGTERM into a step all processes agree on). A single-process job never
    reaches that sync point, so a SIGTERM handler records the signal and the next ``save``
    call forces a checkpoint.
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
            'data': grain.checkpoint.CheckpointHandler(),
            'config': ocp.JsonCheckpointHandler(),
        })
        self._sigterm_received = False
        self._previous_handler = None
        if jax.process_count() == 1:
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._sigterm_received = True

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def preempted(self, step: int) -> bool:
        """Whether the job must save at ``step`` and stop (call on every process, every step)."""
        return self._sigterm_received or self.manager.reached_preemption(step)

    def save(self, step: int, state: TrainState, data_iterator: Any, config: dict,
             force: bool = False) -> bool:
        """Start saving if the policy (or ``force``) says so; returns whether it did."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config),
        )
        return self.manager.save(step, args=args, force=force or self._sigterm_received)

    def saved_config(self, step: int) -> dict:
        """The config checkpoint ``step`` was saved with (JSON: tuples read back as lists)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))['config']

    def mismatches(self, step: int, target: TrainState) -> list[str]:
        """How the arrays saved at ``step`` differ from ``target`` in names, shapes and dtypes
        (empty when the checkpoint fits). Reads metadata only."""
        saved = _shapes(self.manager.item_metadata(step)['state'])
        wanted = _shapes(target)
        return [f'{name}: saved {saved.get(name, "nothing")}, this config needs '
                f'{wanted.get(name, "nothing")}'
                for name in sorted(saved.keys() | wanted.keys())
                if saved.get(name) != wanted.get(name)]

    def restore(self, step: int, target: TrainState, data_iterator: Any) -> TrainState:
        """The state of checkpoint ``step`` laid out as ``target`` (ShapeDtypeStructs with the
        current mesh's shardings, which may differ from the mesh that saved); the iterator is
        moved to the saved position in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored['state']

    def close(self) -> None:
        """Wait for pending saves to be complete on disk, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None


def _shapes(tree: Any) -> dict[str, str]:
    """``'params/output/kernel' -> 'float32(32, 10)'`` for every array of a state tree, from
    arrays, ShapeDtypeStructs or Orbax metadata alike."""
    def name(path):
        return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                        for k in path)
    return {name(path): f'{jax.numpy.dtype(leaf.dtype).name}{tuple(leaf.shape)}'
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
