"""The JAX side: a flax module's :class:`~aff_jax.compare.runs.Run` for a case, in the
module's own precision (:func:`run`) and in float64 (:func:`run_float64`).

Activations come from ``capture_intermediates``; variables are handed over to the reference's
names by a ``names(model, variables) -> {name: array}`` function (``aff_jax.interop.torch.
to_state_dict`` or ``aff_jax.interop.mxnet.to_params``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from aff_jax import precision
from aff_jax.compare.runs import OUTPUT, Case, Run

Names = Callable[[Any, Mapping[str, Any]], dict[str, np.ndarray]]


def _activations(intermediates: Mapping[str, Any], output: jax.Array) -> list[tuple[str, np.ndarray]]:
    """Dotted module path -> output of its first call (array outputs only), then the model's."""
    acts = []
    for path, outputs in flax.traverse_util.flatten_dict(dict(intermediates)).items():
        if path[-1] == '__call__' and len(path) > 1 and isinstance(outputs[0], jax.Array):
            acts.append(('.'.join(path[:-1]), np.asarray(outputs[0])))
    return acts + [(OUTPUT, np.asarray(output))]


def output_shape(model: Any, variables: Mapping[str, Any], inputs: tuple[np.ndarray, ...]
                 ) -> tuple[int, ...]:
    """The shape of ``model``'s output on ``inputs`` (abstract evaluation, nothing computed)."""
    out = jax.eval_shape(lambda v, *xs: model.apply(v, *xs, train=False), dict(variables), *inputs)
    return tuple(out.shape)


@functools.cache
def _jitted(fun: Callable, backend: str) -> Callable:
    """``fun`` jitted with the model (its first argument) static, once per backend, so that
    comparing one model instance again (another reference, mode or step count) reuses the
    compiled program. Each program runs a few times on a few images, so compiling is nearly all
    of a comparison's time: on CPUs XLA is asked for unoptimised code, which compiles about
    twice as fast (not measured on accelerators, which keep XLA's defaults)."""
    options = ({'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
               if backend == 'cpu' else None)
    return jax.jit(fun, static_argnums=0, compiler_options=options)


def _eval_pass(model: Any, variables: Mapping[str, Any], inputs: tuple) -> tuple:
    """(output, intermediates) in inference mode."""
    out, state = model.apply(variables, *inputs, train=False, capture_intermediates=True,
                             mutable=['intermediates'])
    return out, state['intermediates']


def _train_pass(model: Any, params: Any, stats: Any, inputs: tuple, labels: jax.Array) -> tuple:
    """((output, intermediates, new batch_stats), grads) of the mean softmax cross-entropy over
    the output's last axis, in train mode."""
    def loss(params):
        out, state = model.apply({'params': params, 'batch_stats': stats}, *inputs, train=True,
                                 capture_intermediates=True, mutable=['batch_stats', 'intermediates'])
        logits = out.astype(precision.at_least_float32(out.dtype))
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return value.mean(), (out, state['intermediates'], state['batch_stats'])

    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return aux, grads


@jax.jit
def _sgd_step(params: Any, grads: Any, learning_rate: float) -> Any:
    # Jitted: op by op, every parameter shape would compile its own multiply and subtract.
    return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)


def run(model: Any, variables: Mapping[str, Any], case: Case, names: Names) -> Run:
    """``model`` (holding ``variables``: ``{'params', 'batch_stats'}``) on ``case``."""
    inputs = tuple(jnp.asarray(x) for x in case.inputs)
    if case.mode == 'eval':
        out, intermediates = _jitted(_eval_pass, jax.default_backend())(model, dict(variables),
                                                                         inputs)
        return Run(_activations(intermediates, out))
    params, stats = variables.get('params', {}), variables.get('batch_stats', {})
    labels = jnp.asarray(case.labels)
    result = None
    train_pass = _jitted(_train_pass, jax.default_backend())
    for _ in range(max(case.steps, 1)):
        (out, intermediates, new_stats), grads = train_pass(model, params, stats, inputs, labels)
        if result is None:
            result = Run(_activations(intermediates, out),
                         stats=names(model, {'params': params, 'batch_stats': new_stats}),
                         grads=names(model, {'params': grads, 'batch_stats': new_stats}))
        if case.steps:
            params = _sgd_step(params, grads, case.learning_rate)
            stats = new_stats
            result.states.append(names(model, {'params': params, 'batch_stats': stats}))
    return result


def run_float64(model: Any, variables: Mapping[str, Any], case: Case, names: Names) -> Run:
    """:func:`run` of ``model`` computing and storing everything in float64
    (:func:`aff_jax.precision.with_dtype`), its variables and the case's inputs cast exactly
    to float64, under 64-bit JAX."""
    with jax.enable_x64(True):
        return run(precision.with_dtype(model, jnp.float64),
                   precision.cast_floats(variables, np.float64),
                   dataclasses.replace(case, inputs=tuple(np.asarray(x, np.float64)
                                                          for x in case.inputs)),
                   names)
