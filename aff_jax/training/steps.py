"""The jitted train and eval steps, for any task (``tasks``): cross-entropy with label
smoothing, mixup (classification), accuracy, the task's evaluation sums.

Both steps take global arrays: the batch is sharded on the mesh ``data`` axis, so BatchNorm
statistics (means over the batch) are computed over the global batch by XLA's collectives,
and the evaluation sums are reduced over devices and processes the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from aff_jax import conv
from aff_jax.training.errors import ConfigError
from aff_jax.training.state import TrainState
from aff_jax.training.tasks import Task, cross_entropy

Batch = dict[str, jax.Array]

# The train step's metric that is read, not logged: the first non-finite step so far (0: none).
NONFINITE_STEP = 'nonfinite_step'


def mixup(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blend each example with the one at the mirrored batch position, as the official script.

    ``lam * x + (1 - lam) * x[::-1]`` for the NHWC images and the (B, K) targets alike.
    """
    return (lam * images + (1 - lam) * images[::-1],
            lam * targets + (1 - lam) * targets[::-1])


def check_regularisation(config: ml_collections.ConfigDict, task_name: str = 'classification'
                         ) -> None:
    if task_name != 'classification' and config.mixup_alpha:
        raise ConfigError(f'config.mixup_alpha must be 0 for a {task_name} task: mixup blends '
                          f'image labels, got {config.mixup_alpha}')
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ConfigError(f'config.label_smoothing must be in [0, 1), got {config.label_smoothing}')
    if config.mixup_alpha < 0.0:
        raise ConfigError(f'config.mixup_alpha must be >= 0 (0 disables mixup), got '
                          f'{config.mixup_alpha}')
    if not 0 <= config.mixup_off_steps <= config.num_train_steps:
        raise ConfigError(f'config.mixup_off_steps must be in [0, num_train_steps], got '
                          f'{config.mixup_off_steps}')


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, config: ml_collections.ConfigDict,
                    task: Task, rng: jax.Array, state_shardings: TrainState,
                    batch_sharding: NamedSharding
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``, jitted with the state donated and, on a
    CPU, ``conv.compiler_options``: a top-level jit, which JAX does not let another ``jit`` or
    ``make_jaxpr`` trace into (use its ``.trace`` / ``.lower``).

    ``batch``: ``image`` (B, H, W, C) float32, ``label`` (B,) int32 (classification) or
    (B, H, W) int32 (segmentation). The loss is the mean cross-entropy over what the task
    counts (images, or pixels not ignored). The randomness of step ``s`` is
    ``fold_in(rng, s)``, so a resumed run draws exactly what the uninterrupted one did.
    Mixup (``mixup_alpha > 0``) draws one ``lam ~ Beta(alpha, alpha)`` per step and is off for
    the last ``mixup_off_steps`` steps. ``train/accuracy`` compares the argmax with the
    unmixed labels. Metrics are float32 scalars: ``train/loss``, ``train/accuracy``,
    ``train/learning_rate`` (and ``train/skipped_updates`` with ``skip_nonfinite_updates``),
    plus ``NONFINITE_STEP`` (int32, not logged): ``state.nonfinite_step`` after the step, a copy
    the caller can read after the state itself has been donated to the next step.

    Divergence is tracked on device, without a host sync: a step whose loss or gradients are
    not all finite sets ``state.nonfinite_step`` (the first such step) or, with
    ``config.skip_nonfinite_updates``, leaves params, BatchNorm statistics and optimizer state
    as they were (so the schedule then counts applied updates) and counts the step in
    ``state.skipped_updates``.
    """
    check_regularisation(config, task.name)
    mixup_until = config.num_train_steps - config.mixup_off_steps

    def train_step(state: TrainState, batch: Batch):
        images, labels = batch['image'], batch['label']
        targets, weights = task.targets(labels, config.label_smoothing)
        if config.mixup_alpha > 0:
            lam = jax.random.beta(jax.random.fold_in(rng, state.step), config.mixup_alpha,
                                  config.mixup_alpha)
            lam = jnp.where(state.step < mixup_until, lam, 1.0)
            images, targets = mixup(images, targets, lam)

        def loss_fn(params):
            logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                          images, train=True, mutable=['batch_stats'])
            loss = (jnp.sum(cross_entropy(logits, targets) * weights)
                    / jnp.maximum(jnp.sum(weights), 1.0))
            return loss, (logits, updates['batch_stats'])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        step = state.step + 1
        nonfinite_step, skipped = state.nonfinite_step, state.skipped_updates
        if config.skip_nonfinite_updates:
            params, batch_stats, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, batch_stats, opt_state),
                (state.params, state.batch_stats, state.opt_state))
            skipped = skipped + (~finite).astype(jnp.int32)
        else:
            nonfinite_step = jnp.where((nonfinite_step == 0) & ~finite, step, nonfinite_step)
        new_state = TrainState(step=step, params=params, batch_stats=batch_stats,
                               opt_state=opt_state, nonfinite_step=nonfinite_step,
                               skipped_updates=skipped)
        metrics = {
            'train/loss': loss,
            'train/accuracy': task.accuracy(logits, labels),
            'train/learning_rate': jnp.asarray(schedule(state.step), jnp.float32),
        }
        if config.skip_nonfinite_updates:
            metrics['train/skipped_updates'] = skipped.astype(jnp.float32)
        metrics[NONFINITE_STEP] = nonfinite_step
        return new_state, metrics

    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=_compiler_options(batch_sharding))


def make_eval_step(model: nn.Module, reduce: Callable[[jax.Array, Batch], Any],
                   state_shardings: TrainState, batch_sharding: NamedSharding,
                   flip: bool = False) -> Callable[[TrainState, Batch], Any]:
    """``eval_step(state, batch) -> reduce(logits, batch)`` with running-average BN, the result
    replicated on every process. ``reduce``: a task's ``eval_sums`` (which leave out padded
    examples, ``batch['mask']`` 0), or e.g. the argmax for predictions to draw.

    ``flip``: test-time augmentation: the logits are the mean of those of the images and of
    their mirror images (width axis); per-pixel logits (B, H, W, K) of a mirror image are
    mirrored back first.
    """
    def logits_of(state: TrainState, images: jax.Array) -> jax.Array:
        return model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                           images, train=False)

    def eval_step(state: TrainState, batch: Batch):
        logits = logits_of(state, batch['image'])
        if flip:
            mirrored = logits_of(state, batch['image'][:, :, ::-1])
            if mirrored.ndim == 4:
                mirrored = mirrored[:, :, ::-1]
            logits = (logits + mirrored) / 2
        return reduce(logits, batch)

    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=replicated, compiler_options=_compiler_options(batch_sharding))


def _compiler_options(batch_sharding: NamedSharding) -> dict[str, str] | None:
    return conv.compiler_options(batch_sharding.mesh.devices.flat[0].platform)
