"""Identities that make XLA:CPU compute a tensor once and store it, instead of recomputing it
inside every consumer: ``value(x)`` for a value the backward pass reads again, ``cotangent(x)``
for the gradient flowing back through ``x``.

XLA's fusion pass copies a cheap elementwise producer into each of its consumers. In a CPU
train step that costs twice over:

* a convolution's input (BatchNorm and ReLU of a stored tensor) is read again by the weight
  gradient, which XLA:CPU computes on a channels-first copy of it. With BatchNorm and ReLU
  fused into that copy, the copy runs as a scalar loop in the transposed order (6.3 ms for a
  32x32x32x64 map on the 2-core development machine) instead of a plain transposing copy of
  the stored input (0.8 ms);
* the gradient along a stage's residual stream is a chain of sums over its blocks, which each
  consumer recomputed from the top (fusions of up to 59 operands).

XLA never duplicates a float division, and ``x / 1`` equals ``x`` for every float32 (NaN, inf,
-0 and subnormals included; other dtypes are left alone). The 1 is computed from ``x``
(``(x != x) * 0 + 1``, also 1 where ``x`` is NaN), so that XLA cannot fold the division away
or turn it into a multiplication.
Both identities change no value and no gradient; they apply only where a program is lowered
for a CPU (``jax.lax.platform_dependent``) and only under differentiation, where the backward
pass exists: inference and other platforms trace the plain identity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Where XLA:CPU's division by 1 is exact, subnormals included; in bfloat16 it flushed a
# subnormal to zero, so other dtypes pass through unstored.
_EXACT_DTYPES = (jnp.float32, jnp.float64)


def _divide_by_opaque_one(x: jax.Array) -> jax.Array:
    return x / (lax.convert_element_type(x != x, x.dtype) * 0 + 1)


def _store_on_cpu(x: jax.Array) -> jax.Array:
    if x.dtype not in _EXACT_DTYPES:
        return x
    return lax.platform_dependent(x, cpu=_divide_by_opaque_one, default=lambda x: x)


@jax.custom_vjp
def value(x: jax.Array) -> jax.Array:
    """``x``; in a CPU program that differentiates through it, computed once and stored."""
    return x


value.defvjp(lambda x: (_store_on_cpu(x), None), lambda _, g: (g,))


@jax.custom_vjp
def cotangent(x: jax.Array) -> jax.Array:
    """``x``; in a CPU program's backward pass, the gradient with respect to it is computed
    once and stored."""
    return x


cotangent.defvjp(lambda x: (x, None), lambda _, g: (_store_on_cpu(g),))
