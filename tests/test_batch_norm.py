"""Train-mode batch normalisation with its closed-form gradient (aff_jax.layers.normalize_batch)
against PyTorch's batch_norm and autograd in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aff_jax.layers import BatchNorm, normalize_batch

EPS = 1e-5


def _torch_reference(x, scale, bias, dy, dmean, dvar):
    """Values and gradients of (y, mean, var) weighted by the three cotangents, float64."""
    xt, st, bt = (torch.tensor(np.asarray(a, np.float64), requires_grad=True)
                  for a in (x, scale, bias))
    dims = tuple(range(x.ndim - 1))
    mean = xt.mean(dims)
    var = xt.var(dims, unbiased=False)
    # torch's own kernel normalises channels-first: N, C, H, W.
    y = torch.nn.functional.batch_norm(xt.movedim(-1, 1), None, None, st, bt, training=True,
                                       eps=EPS).movedim(1, -1)
    loss = ((y * torch.tensor(np.asarray(dy, np.float64))).sum()
            + (mean * torch.tensor(np.asarray(dmean, np.float64))).sum()
            + (var * torch.tensor(np.asarray(dvar, np.float64))).sum())
    loss.backward()
    return ([t.detach().numpy() for t in (y, mean, var)],
            [t.grad.numpy() for t in (xt, st, bt)])


@pytest.mark.parametrize('shape', [(4, 5, 6, 8), (6, 1, 1, 16), (3, 7)])
def test_values_and_gradients_match_torch(shape):
    keys = jax.random.split(jax.random.key(0), 6)
    channels = shape[-1]
    x = 3.0 * jax.random.normal(keys[0], shape) + 1.5
    scale = jax.random.normal(keys[1], (channels,))
    bias = jax.random.normal(keys[2], (channels,))
    dy = jax.random.normal(keys[3], shape)
    dmean = jax.random.normal(keys[4], (channels,))
    dvar = jax.random.normal(keys[5], (channels,))

    def loss(x, scale, bias):
        y, mean, var = normalize_batch(x, scale, bias, EPS)
        return jnp.sum(y * dy) + jnp.sum(mean * dmean) + jnp.sum(var * dvar)

    values = jax.jit(normalize_batch, static_argnums=3)(x, scale, bias, EPS)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, scale, bias)
    want_values, want_grads = _torch_reference(x, scale, bias, dy, dmean, dvar)
    for got, want, name in zip((*values, *grads), (*want_values, *want_grads),
                               ('y', 'mean', 'var', 'dx', 'dscale', 'dbias')):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_module_gradient_matches_the_stepwise_formula():
    """The BatchNorm module in train mode (the gradient the models train with) against
    jax.grad of the textbook steps, scale and bias included."""
    x = jax.random.normal(jax.random.key(1), (4, 3, 3, 8)) * 2.0 - 1.0
    bn = BatchNorm()
    variables = bn.init(jax.random.key(2), x, train=True)
    params = {'scale': jnp.linspace(0.5, 2.0, 8), 'bias': jnp.linspace(-1.0, 1.0, 8)}
    weights = jax.random.normal(jax.random.key(3), x.shape)

    def module_loss(params, x):
        y, _ = bn.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                        train=True, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y) * weights)

    def stepwise_loss(params, x):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        y = (x - mean) * jax.lax.rsqrt(var + EPS) * params['scale'] + params['bias']
        return jnp.sum(jnp.sin(y) * weights)

    got = jax.grad(module_loss, argnums=(0, 1))(params, x)
    want = jax.grad(stepwise_loss, argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
