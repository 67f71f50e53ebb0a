"""The precision rule of every aff-jax module, and a model's copy in another precision.

A module's ``dtype`` is its compute dtype and ``param_dtype`` the storage dtype of its
variables (parameters and BatchNorm running statistics alike). Where stability needs it
(BatchNorm statistics and normalisation, attention gates and blends, average pooling,
logits, weight-gradient accumulation), computation runs in :func:`at_least_float32` of the
dtype: bfloat16 and float16 are promoted to float32, float32 stays, and float64 is never
demoted. A float64 model therefore computes every value in float64, which needs 64-bit JAX
(``jax.config.update('jax_enable_x64', True)``, or the ``jax.enable_x64(True)`` context around
building its variables and applying it); without it JAX would silently compute in float32, so
:func:`checked` raises instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

X64_HINT = ("jax.config.update('jax_enable_x64', True), or run inside the "
            "jax.enable_x64(True) context")


def checked(dtype: Dtype) -> jnp.dtype:
    """``dtype`` as a numpy dtype; a ValueError if it is a 64-bit float while 64-bit JAX is off
    (JAX would compute in float32 instead)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError(f'dtype float64 needs 64-bit JAX, which is off: {X64_HINT}')
    return dtype


def at_least_float32(dtype: Dtype) -> jnp.dtype:
    """The dtype that values of ``dtype`` are computed in where stability needs it: float32 for
    bfloat16, float16 and float32, float64 for float64 (:func:`checked`)."""
    return checked(jnp.promote_types(dtype, jnp.float32))


def with_dtype(module: nn.Module, dtype: Dtype, param_dtype: Dtype | None = None) -> nn.Module:
    """A copy of ``module`` with compute ``dtype`` and storage ``param_dtype`` (default: the
    same as ``dtype``), applied to every submodule given as a field (a segmentation model's
    backbone) too. Fusions and long skips take the dtypes of the module that builds them, so
    ``with_dtype(create_model(...), jnp.float64)`` is the whole model in float64.

    The copy's variables have the same tree as ``module``'s; cast them to ``param_dtype``.
    """
    param_dtype = dtype if param_dtype is None else param_dtype
    changes = {}
    for field in dataclasses.fields(module):
        if field.name in ('parent', 'name'):
            continue
        value = getattr(module, field.name)
        if field.name == 'dtype':
            changes['dtype'] = dtype
        elif field.name == 'param_dtype':
            changes['param_dtype'] = param_dtype
        elif isinstance(value, nn.Module):
            changes[field.name] = with_dtype(value, dtype, param_dtype)
    return module.clone(**changes)


def cast_floats(tree: Any, dtype: Dtype) -> Any:
    """``tree`` (boxed or not) as numpy arrays, every floating-point one cast to ``dtype``;
    integer arrays (BatchNorm counters) keep theirs."""
    def cast(value):
        value = np.asarray(value)
        return value.astype(dtype) if jnp.issubdtype(value.dtype, jnp.floating) else value
    return jax.tree.map(cast, nn.unbox(tree))
