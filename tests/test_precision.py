"""The precision rule: a float64 model computes every value in float64, a bfloat16 one promotes
to float32 where stability needs it (aff_jax.precision), read off the traced program of a train
step (loss and gradients), so that nothing computed in between escapes the check."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import aff_jax
from aff_jax import precision

# One model of each host class, reduced in depth; the segmentation models over two backbones.
HOSTS = {
    'cifar_aff_resnet32': dict(layers=(1, 1, 1)),
    'cifar_aff_resnext38_32x4d': dict(layers=(1, 1, 1)),
    'cifar_inception_resnet20': dict(layers=(1, 1), channels=(8, 8, 16), fusion='iaff'),
    'aff_resnet50': dict(layers=(1, 1, 1, 1)),
    'iaff_resnext50_32x4d': dict(layers=(1, 1, 1, 1)),
    'tv_resnet18': dict(layers=(1, 1, 1, 1), fusion='iaff'),
    'fpn': dict(backbone='cifar_resnet32', layers=(1, 1, 1), pyramid_channels=8, fusion='sa'),
    'unet': dict(backbone='tv_resnet18', layers=(1, 1, 1, 1), decoder_channels=(8, 8, 8)),
}


def float_dtypes(jaxpr) -> set[str]:
    """The floating-point dtypes of every value a (closed) jaxpr computes, sub-programs (custom
    gradients, jitted calls) included."""
    jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
    found = set()
    for eqn in jaxpr.eqns:
        found |= {str(v.aval.dtype) for v in eqn.outvars
                  if jnp.issubdtype(getattr(v.aval, 'dtype', np.int32), jnp.floating)}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
                    found |= float_dtypes(sub)
    return found


def train_step_dtypes(model, dtype) -> set[str]:
    """Float dtypes in the program of a train-mode loss and its gradients for ``model``."""
    x = jnp.zeros((2, 16, 16, 3), dtype)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    def loss(params, stats):
        out, _ = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                             mutable=['batch_stats'])
        labels = jnp.zeros(out.shape[:-1], jnp.int32)
        return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

    return float_dtypes(jax.make_jaxpr(jax.grad(loss))(nn.unbox(variables['params']),
                                                       variables['batch_stats']))


@pytest.mark.parametrize('name', sorted(HOSTS))
def test_a_float64_copy_computes_everything_in_float64(name):
    model = aff_jax.create_model(name, num_classes=3, **HOSTS[name])
    with jax.enable_x64(True):
        assert train_step_dtypes(precision.with_dtype(model, jnp.float64), jnp.float64) == {
            'float64'}


@pytest.mark.parametrize('name', ['tv_resnet18', 'fpn'])
def test_bfloat16_promotes_to_float32_where_stability_needs_it(name):
    model = aff_jax.create_model(name, num_classes=3, dtype=jnp.bfloat16, **HOSTS[name])
    assert train_step_dtypes(model, jnp.float32) == {'bfloat16', 'float32'}


def test_float64_without_64_bit_jax_is_an_error():
    model = aff_jax.create_model('tv_resnet18', num_classes=3, dtype=jnp.float64,
                                 param_dtype=jnp.float64, **HOSTS['tv_resnet18'])
    with pytest.raises(ValueError, match='dtype float64 needs 64-bit JAX, which is off'):
        model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)


def test_a_float64_copy_computes_the_models_function():
    """The FPN (long skips, upsampling, a decoder over a backbone) copied into float64 gives
    the float32 model's logits, to float32 rounding, from the same variables."""
    model = aff_jax.create_model('fpn', num_classes=3, **HOSTS['fpn'])
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))
    with jax.enable_x64(True):
        model64 = precision.with_dtype(model, jnp.float64)
        got = jax.jit(lambda v, x: model64.apply(v, x, train=False))(
            precision.cast_floats(variables, np.float64), x.astype(np.float64))
        assert got.dtype == jnp.float64
    assert np.linalg.norm(np.asarray(got) - want) <= 1e-5 * np.linalg.norm(want)
