"""Fine-tuning start (`config.init_from`): converted variables replace the fresh initialisation."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import aff_jax
from aff_jax.interop import convert
from aff_jax.training import state as state_lib
from aff_jax.training.pretrained import apply_pretrained

TINY = dict(layers=(1, 1, 1), channels=(8, 8, 16, 32))


def test_init_from_replaces_all_but_the_skipped_head(tmp_path):
    model = aff_jax.create_model('cifar_aff_resnet32', num_classes=4, **TINY)
    mesh = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        init_fn, _, shardings = state_lib.state_layout(model, optax.sgd(0.1), (1, 16, 16, 3), mesh, [])
        state = state_lib.create_state(init_fn, shardings, jax.random.key(0, impl='rbg'))
    donor = aff_jax.create_model('cifar_aff_resnet32', num_classes=7, **TINY)
    # Jitted, with XLA's RngBitGenerator (as training's config.rng_impl): one quick compile
    # instead of ~170 op-by-op ones (20 s).
    init = jax.jit(donor.init, static_argnames='train')
    variables = nn.unbox(init(jax.random.key(1, impl='rbg'), jnp.zeros((1, 16, 16, 3)), train=False))
    variables = {'params': variables['params'],
                 'batch_stats': jax.tree.map(lambda v: v + 0.5, variables['batch_stats'])}
    path = str(tmp_path / 'donor')
    convert.save_variables(path, variables)

    with pytest.raises(ValueError, match=r"output/kernel: run \(32, 4\), checkpoint \(32, 7\)"):
        apply_pretrained(state, path, (), shardings)
    tuned = apply_pretrained(state, path, ('output',), shardings)

    ours = flax.traverse_util.flatten_dict(tuned.params, sep='/')
    theirs = flax.traverse_util.flatten_dict(variables['params'], sep='/')
    fresh = flax.traverse_util.flatten_dict(state.params, sep='/')
    for key, value in ours.items():
        expected = fresh[key] if key.startswith('output/') else theirs[key]
        assert np.array_equal(np.asarray(value), np.asarray(expected)), key
    stats = flax.traverse_util.flatten_dict(tuned.batch_stats, sep='/')
    donor_stats = flax.traverse_util.flatten_dict(variables['batch_stats'], sep='/')
    assert all(np.array_equal(np.asarray(stats[k]), np.asarray(donor_stats[k])) for k in stats)
    assert int(tuned.step) == 0
