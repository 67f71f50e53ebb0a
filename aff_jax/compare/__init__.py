"""Layer-by-layer comparison of an aff-jax model with a reference implementation.

    rows = compare(model, variables, reference_fn, x, mode='train', steps=2)

runs the flax ``model`` and ``reference_fn`` (another framework's implementation holding the
same weights: :func:`torch_reference` for a PyTorch module, :func:`mxnet_reference` for an
official preset in Gluon) on the same input and returns one :class:`Row` per compared
quantity: every module output both sides name alike (in the reference's execution order), and
in train mode the updated running statistics, the gradients of a cross-entropy loss w.r.t.
every parameter (in backward order, last layer first, so the first diverging one is where
backprop first disagrees) and, per SGD step, every variable afterwards. Each row carries the
verdict of a float64 run of both sides (the JAX model copied into float64, the reference run
in float64), where two faithful implementations agree to ~1e-12, and, as information, the JAX
run in the model's own dtype against the reference's float32 run, with each side's own
float32-vs-float64 noise: deep train-mode networks amplify float32 rounding (a value within
rounding of a ReLU's zero or a max-pool tie flips one way in one framework and the other way in
the other) beyond any float32 noise estimate, so float32 rows cannot decide.
:func:`first_divergence` names the first row whose float64 difference exceeds what it allows
(:mod:`aff_jax.compare.table`).

``python -m aff_jax.compare`` is the command line over this (see ``cli``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from aff_jax.compare import jax_side
from aff_jax.compare.mxnet_side import MXNetUnavailable, mxnet_reference
from aff_jax.compare.runs import MODES, OUTPUT, Case, Run
from aff_jax.compare.table import (EPS64, Row, default_tolerance64, first_divergence,
                                   format_table, max_diff, noise_scale)
from aff_jax.compare.torch_side import torch_reference

__all__ = ['Case', 'MXNetUnavailable', 'OUTPUT', 'Row', 'Run', 'compare', 'default_tolerance64',
           'depth', 'example_input', 'first_divergence', 'format_table', 'make_case',
           'mxnet_reference',
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
    in ``dtype`` (``'float32'`` and ``'float64'``). ``mode``: ``'eval'`` or
    ``'train'``; ``steps`` SGD steps of ``learning_rate`` (train mode only). Labels for the
    loss are drawn from ``seed``, one class per output position. ``names(model, variables)``
    gives the JAX variables the reference's names and layouts (default
    ``aff_jax.interop.torch.to_state_dict``; ``aff_jax.interop.mxnet.to_params`` for Gluon).

    The JAX model also runs in float64 (:func:`aff_jax.precision.with_dtype`, under 64-bit
    JAX), against the reference's float64 run: those rows decide, with the tolerance
    :func:`default_tolerance64` of the model's :func:`depth`. A model built with a lower
    compute ``dtype`` (bfloat16) has its own run compared with the float32 reference as
    information; the reference's noise is then scaled by :func:`noise_scale`.
    """
    if names is None:
        from aff_jax.interop import torch as aff_torch
        names = aff_torch.to_state_dict
    case = make_case(model, variables, x, mode=mode, steps=steps, learning_rate=learning_rate,
                     seed=seed)
    ours, ours64 = jax_side.run(model, variables, case, names), jax_side.run_float64(
        model, variables, case, names)
    moved = perturbed(case, seed)
    ours_moved = jax_side.run_float64(model, variables, moved, names)
    reference, reference64 = reference_fn(case, 'float32'), reference_fn(case, 'float64')
    reference_moved = reference_fn(moved, 'float64')
    dtype = jnp.dtype(getattr(model, 'dtype', jnp.float32)).name
    scale = noise_scale(dtype)
    tolerance64 = default_tolerance64(depth(variables))

    def rows(kind, runs, order, strict):
        mine, mine64, mine_moved, ref, ref64, ref_moved = runs
        result = []
        for name in order:
            if name not in mine:
                if strict:
                    raise ValueError(f'{kind} {name}: the reference has it, the JAX model has '
                                     f'no variable of that name')
                continue
            a, a64 = np.asarray(mine[name]), np.asarray(mine64[name])
            b, b64 = np.asarray(ref[name]), np.asarray(ref64[name])
            if a.shape != b.shape:
                raise ValueError(f'{kind} {name}: JAX shape {a.shape} != reference {b.shape}')
            # Each side's own: the two compute in other orders, and either may amplify its
            # rounding where the other does not.
            noise64 = max(max_diff(np.asarray(mine_moved[name]), a64)[1],
                          max_diff(np.asarray(ref_moved[name]), b64)[1])
            result.append(Row(kind, name, tuple(b.shape), max_diff(a64, b64)[1], tolerance64,
                              noise64, *max_diff(a, b), max_diff(b, b64)[1] * scale,
                              max_diff(a, a64)[1]))
        return result

    runs = (ours, ours64, ours_moved, reference, reference64, reference_moved)
    table = rows('activation', [dict(run.activations) for run in runs],
                 [name for name, _ in reference.activations], strict=False)
    table += rows('stat', [run.stats for run in runs], list(reference.stats), True)
    table += rows('grad', [run.grads for run in runs], list(reversed(reference.grads)), True)
    if not len(reference.states) == len(reference64.states) == steps:
        raise ValueError(f'the reference reports {len(reference.states)} and '
                         f'{len(reference64.states)} states (float32, float64) for {steps} steps')
    for k, states in enumerate(zip(*(run.states for run in runs)), 1):
        table += rows(f'step{k}', states, list(states[3]), True)
    return table


def perturbed(case: Case, seed: int = 0, ulps: float = 4.0) -> Case:
    """``case`` with float64 inputs, each element moved by up to ``ulps`` units in the last
    place (uniformly, from ``seed``): how far a float64 run then moves estimates the rounding
    that run amplifies at each quantity (every op's rounding is such a perturbation of what
    follows it)."""
    rng = np.random.default_rng(seed)
    inputs = tuple(np.asarray(x, np.float64) * (1.0 + rng.uniform(-ulps, ulps, np.shape(x)) * EPS64)
                   for x in case.inputs)
    return dataclasses.replace(case, inputs=inputs)


def make_case(model: Any, variables: Mapping[str, Any], x: np.ndarray | tuple[np.ndarray, ...],
              *, mode: str = 'eval', steps: int = 0, learning_rate: float = 0.01,
              seed: int = 0) -> Case:
    """The :class:`Case` :func:`compare` runs: ``x`` (one input or a tuple) as float32, and in
    train mode labels drawn from ``seed``, one class per position of ``model``'s output."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f'steps must be a non-negative integer, got {steps!r}')
    if steps and mode != 'train':
        raise ValueError(f'steps={steps} needs mode=\'train\' (SGD steps train the model)')
    inputs = tuple(np.asarray(a, np.float32) for a in (x if isinstance(x, tuple) else (x,)))
    labels = None
    if mode == 'train':
        shape = jax_side.output_shape(model, variables, inputs)
        labels = np.random.default_rng(seed).integers(0, shape[-1], shape[:-1])
    return Case(inputs, mode, labels, steps, learning_rate)


def depth(variables: Mapping[str, Any]) -> int:
    """The number of conv and dense layers in ``variables``: their parameters of rank 2 or
    more (kernels)."""
    return sum(np.ndim(leaf) >= 2 for leaf in jax.tree.leaves(dict(variables).get('params', {})))
