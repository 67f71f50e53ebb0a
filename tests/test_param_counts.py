"""Every preset, at full depth, has the parameters of its independent PyTorch reference.

JAX side: `jax.eval_shape` of `init` (no arrays are allocated). Torch side: the references built
on the meta device. Besides the totals, the sorted list of per-tensor sizes must agree, which
catches compensating errors (a wrong width in one layer and another elsewhere).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax.reference.official import PRESETS as OFFICIAL, build_official, count_trainable
from aff_jax.reference.torch_port import PRESETS as PORT, build_port


def jax_variable_shapes(model):
    init = functools.partial(model.init, train=False)
    return nn.unbox(jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def sizes(tree):
    return sorted(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def torch_sizes(tensors):
    return sorted(t.numel() for t in tensors)


@pytest.mark.parametrize('name', sorted(OFFICIAL))
def test_official_preset_trainable_params(name):
    with torch.device('meta'):
        ref = build_official(name)
    shapes = jax_variable_shapes(aff_jax.create_model(name))
    got = sizes(shapes['params'])
    assert sum(got) == count_trainable(ref)
    assert got == torch_sizes(p for p in ref.parameters() if p.requires_grad)
    running = [b for n, b in ref.named_buffers() if n.endswith(('running_mean', 'running_var'))]
    assert sizes(shapes['batch_stats']) == torch_sizes(running)


def test_official_cifar_deep_stem_override():
    with torch.device('meta'):
        ref = build_official('cifar_aff_resnet32', deep_stem=True, layers=(1, 1, 1))
    model = aff_jax.create_model('cifar_aff_resnet32', deep_stem=True, layers=(1, 1, 1))
    assert sizes(jax_variable_shapes(model)['params']) == torch_sizes(ref.parameters())


# The 101/152-layer presets are traced with plain addition: it checks their depth at half the
# tracing cost, and the fused blocks are the same as in the 50-layer presets.
DEEP = ('tv_resnet101', 'tv_resnet152', 'tv_resnext101_32x8d', 'tv_wide_resnet101_2')
PORT_CASES = ([(name, 'add' if name in DEEP else 'aff') for name in sorted(PORT)]
              + [('tv_resnet18', 'add'), ('tv_resnet18', 'iaff'), ('tv_resnet50', 'iaff')])


@pytest.mark.parametrize('name,fusion', PORT_CASES)
def test_port_preset_state_dict_sizes(name, fusion):
    """Parameters and BN buffers (running stats, num_batches_tracked) of the port's model;
    `fusion='aff'` is also the preset's default."""
    with torch.device('meta'):
        ref = build_port(name, fusion=fusion)
    model = (aff_jax.create_model(name) if fusion == 'aff'
             else aff_jax.create_model(name, fusion=fusion))
    shapes = jax_variable_shapes(model)
    assert sum(sizes(shapes['params'])) == sum(p.numel() for p in ref.parameters())
    assert sizes(shapes) == torch_sizes(ref.state_dict().values())
