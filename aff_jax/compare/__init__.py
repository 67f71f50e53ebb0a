"""Layer-by-layer comparison of an aff-jax model with a reference implementation.

    rows = compare(model, variables, reference_fn, x, mode='train', steps=2)

runs the flax ``model`` and ``reference_fn`` (another framework's implementation holding the
same weights: :func:`torch_reference` for a PyTorch module, :func:`mxnet_reference` for an
official preset in Gluon) on the same input and returns one :class:`Row` per compared
quantity: every module output both sides name alike (in the reference's execution order), and
in train mode the updated running statistics, the gradients of a cross-entropy loss w.r.t.
every parameter (in backward order, last layer first, so the first diverging one is where
backprop first disagrees) and, per SGD step, every variable afterwards. Each row carries the
reference's own rounding noise (its float32 run against its float64 run): deep networks
amplify rounding, so a fixed tolerance alone would flag layers where the reference disagrees
with itself just as much. :func:`first_divergence` names the first row beyond both.

``python -m aff_jax.compare`` is the command line over this (see ``cli``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np

from aff_jax.compare import jax_side
from aff_jax.compare.mxnet_side import MXNetUnavailable, mxnet_reference
from aff_jax.compare.runs import MODES, OUTPUT, Case, Run
from aff_jax.compare.table import (Row, default_noise_factor, default_tolerance, first_divergence,
                                   format_table, max_diff, noise_scale)
from aff_jax.compare.torch_side import torch_reference

__all__ = ['Case', 'MXNetUnavailable', 'OUTPUT', 'Row', 'Run', 'compare', 'default_noise_factor',
           'default_tolerance',
           'example_input', 'first_divergence', 'format_table', 'mxnet_reference',
           'torch_reference']


def example_input(batch: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """A (batch, size, size, channels) NHWC float32 input.

    Per-image channel offsets make images differ in their means, so that the global-context
    branch (which pools each image to one value per channel) sees well separated inputs.
    """
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, size, size, channels))
    offsets = 2.0 * rng.standard_normal((batch, 1, 1, channels))
    return (noise + offsets).astype(np.float32)


def compare(model: Any, variables: Mapping[str, Any], reference_fn: Callable[[Case, str], Run],
            x: np.ndarray | tuple[np.ndarray, ...], *, mode: str = 'eval', steps: int = 0,
            learning_rate: float = 0.01, seed: int = 0,
            names: jax_side.Names | None = None) -> list[Row]:
    """Rows comparing ``model`` (a flax module holding ``variables``) with ``reference_fn``.

    ``x``: the model's input, NHWC, or a tuple of inputs (``(x, y)`` for a fusion module).
    ``reference_fn(case, dtype)``: the reference's :class:`Run` for a :class:`Case`, computed
    in ``dtype`` (``'float32'``, then ``'float64'``: the noise floor). ``mode``: ``'eval'`` or
    ``'train'``; ``steps`` SGD steps of ``learning_rate`` (train mode only). Labels for the
    loss are drawn from ``seed``, one class per output position. ``names(model, variables)``
    gives the JAX variables the reference's names and layouts (default
    ``aff_jax.interop.torch.to_state_dict``; ``aff_jax.interop.mxnet.to_params`` for Gluon).

    A model built with a lower compute ``dtype`` (bfloat16) is compared with the float32
    reference; its rows' noise is the reference's scaled by :func:`noise_scale`.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f'steps must be a non-negative integer, got {steps!r}')
    if steps and mode != 'train':
        raise ValueError(f'steps={steps} needs mode=\'train\' (SGD steps train the model)')
    if names is None:
        from aff_jax.interop import torch as aff_torch
        names = aff_torch.to_state_dict
    inputs = tuple(np.asarray(a, np.float32) for a in (x if isinstance(x, tuple) else (x,)))
    labels = None
    if mode == 'train':
        shape = jax_side.output_shape(model, variables, inputs)
        labels = np.random.default_rng(seed).integers(0, shape[-1], shape[:-1])
    case = Case(inputs, mode, labels, steps, learning_rate)
    ours = jax_side.run(model, variables, case, names)
    reference, exact = reference_fn(case, 'float32'), reference_fn(case, 'float64')
    scale = noise_scale(jnp.dtype(getattr(model, 'dtype', jnp.float32)).name)

    def rows(kind, ours, reference, exact, order, strict):
        result = []
        for name in order:
            if name not in ours:
                if strict:
                    raise ValueError(f'{kind} {name}: the reference has it, the JAX model has '
                                     f'no variable of that name')
                continue
            mine, ref = np.asarray(ours[name]), np.asarray(reference[name])
            if mine.shape != ref.shape:
                raise ValueError(f'{kind} {name}: JAX shape {mine.shape} != reference {ref.shape}')
            result.append(Row(kind, name, tuple(ref.shape), *max_diff(mine, ref),
                              max_diff(ref, exact[name])[1] * scale))
        return result

    table = rows('activation', dict(ours.activations), dict(reference.activations),
                 dict(exact.activations),
                 [name for name, _ in reference.activations], strict=False)
    table += rows('stat', ours.stats, reference.stats, exact.stats, list(reference.stats), True)
    table += rows('grad', ours.grads, reference.grads, exact.grads,
                  list(reversed(reference.grads)), True)
    if not len(reference.states) == len(exact.states) == steps:
        raise ValueError(f'the reference reports {len(reference.states)} and {len(exact.states)} '
                         f'states (float32, float64) for {steps} steps')
    for k, (mine, ref, ref64) in enumerate(zip(ours.states, reference.states, exact.states), 1):
        table += rows(f'step{k}', mine, ref, ref64, list(ref), True)
    return table
