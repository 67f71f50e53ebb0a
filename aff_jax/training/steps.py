"""The jitted train and eval steps: cross-entropy, label smoothing, mixup, accuracy.

Both steps take global arrays: the batch is sharded on the mesh ``data`` axis, so BatchNorm
statistics (means over the batch) are computed over the global batch by XLA's collectives.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from aff_jax.training.errors import ConfigError
from aff_jax.training.state import TrainState

Batch = dict[str, jax.Array]


def smoothed_one_hot(labels: jax.Array, num_classes: int, eta: float) -> jax.Array:
    """(B,) int labels -> (B, num_classes) targets: ``1 - eta + eta/K`` on, ``eta/K`` off.

    The official script's label smoothing (eta 0.1); ``eta=0`` is the plain one-hot.
    """
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), eta)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, K) logits and (B, K) target distributions -> (B,) losses, computed in float32."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def mixup(images: jax.Array, targets: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blend each example with the one at the mirrored batch position, as the official script.

    ``lam * x + (1 - lam) * x[::-1]`` for the NHWC images and the (B, K) targets alike.
    """
    return (lam * images + (1 - lam) * images[::-1],
            lam * targets + (1 - lam) * targets[::-1])


def check_regularisation(config: ml_collections.ConfigDict) -> None:
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
                    num_classes: int, rng: jax.Array, state_shardings: TrainState,
                    batch_sharding: NamedSharding
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``batch``: ``image`` (B, H, W, C) float32, ``label`` (B,) int32. The randomness of step ``s``
    is ``fold_in(rng, s)``, so a resumed run draws exactly what the uninterrupted one did.
    Mixup (``mixup_alpha > 0``) draws one ``lam ~ Beta(alpha, alpha)`` per step and is off for
    the last ``mixup_off_steps`` steps. ``train/accuracy`` compares the argmax with the
    unmixed labels. Metrics are float32 scalars: ``train/loss``, ``train/accuracy``,
    ``train/learning_rate``.
    """
    check_regularisation(config)
    mixup_until = config.num_train_steps - config.mixup_off_steps

    def train_step(state: TrainState, batch: Batch):
        images, labels = batch['image'], batch['label']
        targets = smoothed_one_hot(labels, num_classes, config.label_smoothing)
        if config.mixup_alpha > 0:
            lam = jax.random.beta(jax.random.fold_in(rng, state.step), config.mixup_alpha,
                                  config.mixup_alpha)
            lam = jnp.where(state.step < mixup_until, lam, 1.0)
            images, targets = mixup(images, targets, lam)

        def loss_fn(params):
            logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                          images, train=True, mutable=['batch_stats'])
            return cross_entropy(logits, targets).mean(), (logits, updates['batch_stats'])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1,
                               params=optax.apply_updates(state.params, updates),
                               batch_stats=batch_stats, opt_state=opt_state)
        metrics = {
            'train/loss': loss,
            'train/accuracy': jnp.mean(jnp.argmax(logits, -1) == labels, dtype=jnp.float32),
            'train/learning_rate': jnp.asarray(schedule(state.step), jnp.float32),
        }
        return new_state, metrics

    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module, num_classes: int, state_shardings: TrainState,
                   batch_sharding: NamedSharding
                   ) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """``eval_step(state, batch) -> sums``: running-average BN, padded examples masked out.

    ``batch`` also holds ``mask`` (B,) float32, 0 for padding. Returns float32 scalars
    ``loss`` (sum of the unsmoothed cross-entropy), ``correct`` and ``count`` over real examples.
    """
    def eval_step(state: TrainState, batch: Batch):
        logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                             batch['image'], train=False)
        mask = batch['mask']
        losses = cross_entropy(logits, jax.nn.one_hot(batch['label'], num_classes))
        correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
        return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
                'count': jnp.sum(mask)}

    replicated = NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
    return jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=replicated)
