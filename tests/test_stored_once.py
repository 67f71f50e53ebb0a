"""aff_jax.stored_once: exact identities that make XLA:CPU store a value (or a gradient) once
instead of recomputing it inside each consumer."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from aff_jax import conv as conv_lib
from aff_jax import stored_once

# NaN of both signs, infinities, signed zeros, subnormals, the largest float, ordinary values.
SPECIAL = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -3e-39, 3.4e38, 1.5,
                    -2.75], np.float32)


def _bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


def test_the_stored_value_and_gradient_are_bit_identical(on_cpu):
    x = jnp.asarray(SPECIAL)
    stored, _ = jax.jit(lambda x: jax.vjp(stored_once.value, x))(x)
    np.testing.assert_array_equal(_bits(stored), _bits(SPECIAL))
    (gradient,) = jax.jit(lambda g: jax.vjp(stored_once.cotangent, x)[1](g))(x)
    np.testing.assert_array_equal(_bits(gradient), _bits(SPECIAL))
    # bfloat16 passes through unstored (XLA:CPU's division flushed its subnormals to zero).
    bf16 = jnp.asarray(SPECIAL, jnp.bfloat16)
    stored_bf16, _ = jax.jit(lambda x: jax.vjp(stored_once.value, x))(bf16)
    np.testing.assert_array_equal(np.asarray(stored_bf16).view(np.uint16),
                                  np.asarray(bf16).view(np.uint16))


@pytest.mark.parametrize('wrap', [stored_once.value, stored_once.cotangent])
def test_gradients_pass_through_unchanged(wrap, on_cpu):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)

    def loss(x, w, wrapped):
        h = jnp.maximum(x * 1.5 - 0.2, 0)
        h = wrap(h) if wrapped else h
        return jnp.sum(jnp.tanh(conv_lib.conv2d(h, w, padding=((1, 1), (1, 1)))) ** 2)

    plain = jax.jit(jax.grad(lambda x, w: loss(x, w, False), argnums=(0, 1)))(x, w)
    wrapped = jax.jit(jax.grad(lambda x, w: loss(x, w, True), argnums=(0, 1)))(x, w)
    for a, b in zip(plain, wrapped):
        np.testing.assert_array_equal(a, b)


def test_other_platforms_and_inference_trace_the_plain_identity():
    x = jnp.ones((4, 4), jnp.float32)
    forward_and_backward = jax.jit(lambda x: jax.vjp(stored_once.value, x)[0])
    lowered = {platform: forward_and_backward.trace(x).lower(lowering_platforms=(platform,))
               .as_text() for platform in ('cpu', 'cuda', 'tpu')}
    assert 'divide' in lowered['cpu']
    assert 'divide' not in lowered['cuda'] and 'divide' not in lowered['tpu']
    assert 'divide' not in jax.jit(stored_once.value).lower(x).as_text()


def _transposes_with_relu(hlo: str) -> int:
    """Fused computations of ``hlo`` that transpose and compute a ReLU (maximum)."""
    computations = re.split(r'\n(?=%?fused\S* .*\{\n)', hlo)
    return sum(1 for body in computations if body.lstrip('%').startswith('fused')
               and ' transpose(' in body and ' maximum(' in body)


def test_the_weight_gradient_transposes_the_stored_input(on_cpu):
    """XLA:CPU's weight-gradient convolution reads a channels-first copy of the input. Without
    the stored value, BatchNorm-like scaling and the ReLU are computed a second time inside
    that copy; with it (conv2d's input), once."""
    rng = np.random.default_rng(0)
    shape = (4, 8, 8, 16)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a, b = jnp.full((16,), 1.5), jnp.full((16,), 0.1)
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, 16, 16)), jnp.float32)
    r = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    options = conv_lib.compiler_options('cpu')

    def step(conv):
        def loss(w, a, b, x):  # tanh: the backward pass needs the forward convolution's output
            return jnp.sum(jnp.tanh(conv(jnp.maximum(x * a + b, 0), w)) * r)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=options)

    def raw(h, w):
        return lax.conv_general_dilated(h, w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    def library(h, w):
        return conv_lib.conv2d(h, w, padding=((1, 1), (1, 1)))

    counts = {}
    for name, conv in (('raw', raw), ('library', library)):
        with conv_lib.implementation('xla'):
            compiled = step(conv).lower(w, a, b, x).compile()
            counts[name] = _transposes_with_relu(compiled.as_text())
            gradients = compiled(w, a, b, x)
        if name == 'raw':
            reference = gradients
    assert counts == {'raw': 1, 'library': 0}
    for expected, got in zip(reference, gradients):
        np.testing.assert_array_equal(expected, got)


def test_a_stage_stores_the_gradient_along_its_residual_stream(on_cpu):
    """Each block's output gradient is the sum of everything after it; without storing it per
    block (residual.Stage), XLA:CPU recomputed that chain inside each consumer: fusions of
    30 / 52 / 75 operands and 345 / 851 / 1557 full-size adds and multiplies for 2 / 4 / 6
    blocks. Stored, the widest fusion and the work per block stay the same at every depth."""
    import aff_jax
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8, 3)), jnp.float32)
    full_size_op = re.compile(r'= f32\[4,8,8,8\]\{[\d,]*\} (?:add|multiply)\(')
    widest, full_size_ops = [], []
    for depth in (2, 4, 6):
        model = aff_jax.create_model('cifar_aff_resnet32', layers=(depth,), channels=(8, 8),
                                     num_classes=10)
        variables = model.init(jax.random.key(0), x, train=False)

        def loss(params):
            out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                 x, train=True, mutable=['batch_stats'])
            return out.sum()

        hlo = jax.jit(jax.grad(loss), compiler_options=conv_lib.compiler_options('cpu')).lower(
            variables['params']).compile().as_text()
        entry = hlo.split('ENTRY')[1]
        widest.append(max(line.split(' fusion(')[1].split('), kind')[0].count('%')
                          for line in entry.splitlines() if ' fusion(' in line))
        full_size_ops.append(len(full_size_op.findall(hlo)))
    assert widest[0] == widest[1] == widest[2]
    assert full_size_ops[2] - full_size_ops[1] == full_size_ops[1] - full_size_ops[0] > 0
