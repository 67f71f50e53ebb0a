"""Learning-rate schedules and the SGD optimizer of the paper's recipes.

The official open-aff scripts use Gluon's ``nag`` optimizer: Nesterov momentum with the weight
decay added to the gradient before the momentum (coupled L2), optionally not applied to
BatchNorm scale/bias and to biases (``--no-wd``). The learning rate is either a linear warmup
from 0 followed by a cosine decay to 0 (``--cosine``), or constant and multiplied by
``lr_decay_factor`` at given steps (the step schedule).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from aff_jax.training.errors import ConfigError

SCHEDULES = ('cosine', 'linear', 'step', 'constant')


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate``, scaled by ``batch_size / lr_base_batch_size`` when that is set."""
    if not config.learning_rate > 0:
        raise ConfigError(f'config.learning_rate must be > 0, got {config.learning_rate!r}')
    if config.lr_base_batch_size is None:
        return config.learning_rate
    if config.lr_base_batch_size < 1:
        raise ConfigError(f'config.lr_base_batch_size must be a positive int or None, got '
                          f'{config.lr_base_batch_size!r}')
    return config.learning_rate * config.batch_size / config.lr_base_batch_size


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Step -> learning rate. Step 0 is the first update.

    ``cosine``: linear 0 -> peak over ``warmup_steps``, then cosine from peak to 0 at
    ``num_train_steps``. ``linear``: the warmup, then linear from peak to 0 at
    ``num_train_steps`` (the one-cycle schedule of fast CIFAR training). ``step``: the same
    warmup, then peak multiplied by ``lr_decay_factor`` at every step in
    ``lr_decay_boundaries`` (absolute steps).
    ``constant``: the warmup, then peak.
    """
    peak = peak_learning_rate(config)
    warmup, total = config.warmup_steps, config.num_train_steps
    if config.schedule not in SCHEDULES:
        raise ConfigError(f'config.schedule must be one of {SCHEDULES}, got {config.schedule!r}')
    if not 0 <= warmup < total:
        raise ConfigError(f'config.warmup_steps={warmup} must be in [0, num_train_steps={total})')
    if config.schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end_value=0.0)
    if config.schedule == 'linear':
        after_warmup = optax.linear_schedule(peak, 0.0, total - warmup)
    elif config.schedule == 'step':
        boundaries = tuple(config.lr_decay_boundaries)
        in_range = all(warmup <= b < total for b in boundaries)
        if not in_range or list(boundaries) != sorted(boundaries):
            raise ConfigError(f'config.lr_decay_boundaries must be increasing steps in '
                              f'[warmup_steps, num_train_steps), got {boundaries!r}')
        after_warmup = optax.piecewise_constant_schedule(
            peak, {b - warmup: config.lr_decay_factor for b in boundaries})
    else:
        after_warmup = optax.constant_schedule(peak)
    if warmup == 0:
        return after_warmup
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after_warmup], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True for conv and dense kernels, False for BatchNorm scale/bias and biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Coupled L2 weight decay, then SGD with (Nesterov) momentum and the schedule."""
    mask = None if config.weight_decay_bn_bias else weight_decay_mask
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(make_schedule(config), momentum=config.momentum, nesterov=config.nesterov))
