"""FPN and U-Net over any backbone: output shapes, finite gradients, every fusion in every
decoder, the fpn_resnet20 preset's structure, and how create_model routes its options."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aff_jax
from aff_jax import fusion
from test_fusion import randomized

# Small versions of three backbone families: the paper's CIFAR pre-activation ResNet, a
# PyTorch-port tv_* and an official ImageNet host (AFF-ResNeXt: deep stem, avg-down, AFF).
BACKBONES = {
    'cifar_resnet': dict(backbone='cifar_resnet32', layers=(1, 1, 1), channels=(8, 8, 16, 32)),
    'tv_resnet18': dict(backbone='tv_resnet18', layers=(1, 1, 1, 1), small_input=True),
    'aff_resnext50': dict(backbone='aff_resnext50_32x4d', layers=(1, 1, 1, 1), channels=8,
                          cardinality=4, bottleneck_width=16, stem_width=8),
}
DECODERS = {'fpn': dict(pyramid_channels=16), 'unet': dict(decoder_channels=None)}
SIZE, CLASSES = 32, 3


def build(decoder, backbone, fusion_name, **kw):
    return aff_jax.create_model(decoder, fusion=fusion_name, num_classes=CLASSES,
                                **DECODERS[decoder], **BACKBONES[backbone], **kw)


def abstract_apply(model, batch=2, size=SIZE):
    def run(x):
        return model.init_with_output(jax.random.key(0), x, train=False)
    logits, variables = jax.eval_shape(run, jnp.zeros((batch, size, size, 3)))
    return logits, nn.unbox(variables)


# Every decoder with every backbone, the long-skip fusions rotated so that each decoder meets
# add, aff and iaff (18 full combinations cost minutes of op-by-op runs for no extra path).
GRADIENT_CASES = [(decoder, backbone, ('add', 'aff', 'iaff')[(i + j) % 3])
                  for i, decoder in enumerate(sorted(DECODERS))
                  for j, backbone in enumerate(sorted(BACKBONES))]


@pytest.mark.parametrize('decoder, backbone, fusion_name', GRADIENT_CASES)
def test_logits_at_input_resolution_and_finite_gradients(decoder, backbone, fusion_name):
    """Train-mode forward on 2 images of 32x32: (2, 32, 32, 3) logits, and every parameter
    gets a finite gradient, with NumPy-drawn weights. Jitted: one compile per case (13-18 s)
    beats running op by op (31-45 s per case)."""
    model = build(decoder, backbone, fusion_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, SIZE, SIZE, 3)) + rng.normal(size=(2, 1, 1, 3)),
                    jnp.float32)
    labels = jnp.asarray(rng.integers(0, CLASSES, (2, SIZE, SIZE)))
    _, abstract = abstract_apply(model)
    variables = randomized(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), seed=1)

    def loss(params):
        logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                train=True, mutable=['batch_stats'])
        assert logits.shape == (2, SIZE, SIZE, CLASSES) and logits.dtype == jnp.float32
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

    grads = jax.jit(jax.grad(loss))(variables['params'])
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    # The loss reaches the classifier and, through every long skip, the backbone's first conv.
    first_conv = jax.tree.leaves(grads['backbone'])[0]
    assert np.any(grads['classifier']['kernel'] != 0) and np.any(first_conv != 0)


@pytest.mark.parametrize('fusion_name', fusion.names())
@pytest.mark.parametrize('decoder', sorted(DECODERS))
def test_every_fusion_works_in_every_decoder(decoder, fusion_name):
    """Shapes only; each long skip holds exactly one ``fusion_name`` module at its width."""
    model = build(decoder, 'tv_resnet18', fusion_name)
    logits, variables = abstract_apply(model)
    assert logits.shape == (2, SIZE, SIZE, CLASSES)
    widths = (16, 16, 16) if decoder == 'fpn' else (64, 128, 256)
    for level, width in enumerate(widths):
        x = jnp.zeros((2, 4, 4, width))
        kw = {} if fusion_name in ('add', 'concat') else {'r': 4}
        want = jax.eval_shape(functools.partial(fusion.create(fusion_name, **kw).init, train=False),
                              jax.random.key(0), x, x)
        got = variables['params'][f'merge{level}'].get('fuse', {})
        assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(
            lambda a: a.shape, nn.unbox(want).get('params', {}))


def count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_fpn_resnet20_is_resnet20_under_an_fpn():
    """Backbone = the CIFAR pre-act ResNet-20 (3 blocks per stage, widths 16-32-64, additive
    short skips) without its head; the add-FPN's parameters in closed form."""
    model = aff_jax.create_model('fpn_resnet20', fusion='add')
    assert model.num_classes == 2 and model.pyramid_channels == 32
    _, variables = abstract_apply(model, size=64)
    classifier = aff_jax.create_model('cifar_resnet32', layers=(3, 3, 3),
                                      channels=(16, 16, 32, 64), num_classes=10)
    _, reference = abstract_apply(classifier, size=64)
    head = reference['params'].pop('output')
    assert count(variables['params']['backbone']) == count(reference['params'])
    assert count(head) == 64 * 10 + 10
    p, k = 32, 2
    decoder = ((64 * p + p) + (16 * p + p) + (32 * p + p)  # top and the two laterals
               + 9 * p * p + 2 * p  # smooth: 3x3 conv, BN
               + p * k + k)  # classifier
    assert count(variables['params']) - count(reference['params']) == decoder
    assert [len(variables['params']['backbone']['features'][str(i)]) for i in (2, 3, 4)] == [3] * 3


def test_option_routing():
    """Decoder keys go to the decoder, the rest to the backbone, ``backbone_`` to the backbone."""
    model = aff_jax.create_model('fpn', backbone='tv_resnet18', fusion='sk', r=8,
                                 pyramid_channels=64, layers=(1, 1, 1, 1), small_input=True,
                                 backbone_fusion='iaff', backbone_r=16)
    assert model.pyramid_channels == 64
    assert model.backbone.features_only and tuple(model.backbone.layers) == (1, 1, 1, 1)
    _, variables = abstract_apply(model)
    params = variables['params']
    # Backbone blocks: iAFF with r=16 at width 64 -> 4 inter channels; decoder SK at r=8.
    assert params['backbone']['layer1']['0']['fuse_mode']['local_att2']['0']['kernel'].shape == (
        1, 1, 64, 4)
    assert params['merge0']['fuse']['global_att']['1']['kernel'].shape == (1, 1, 64, 8)
    unet = aff_jax.create_model('unet', backbone='tv_resnet18', decoder_channels=(8, 16, 24),
                                layers=(1, 1, 1, 1))
    _, variables = abstract_apply(unet)
    assert [variables['params'][f'block{i}']['0']['kernel'].shape[-1] for i in range(3)] == [
        8, 16, 24]


def test_param_dtype_holds_for_backbone_and_decoder():
    model = aff_jax.create_model('fpn_resnet20', layers=(1, 1, 1), param_dtype=jnp.bfloat16)
    _, variables = abstract_apply(model)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables['params'])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def test_segmentation_models_are_listed_and_bad_options_are_named():
    assert {'fpn', 'unet', 'fpn_resnet20'} <= set(aff_jax.list_models())
    assert aff_jax.models.is_segmentation('unet') and not aff_jax.models.is_segmentation(
        'tv_resnet18')
    with pytest.raises(ValueError, match='needs backbone=NAME'):
        aff_jax.create_model('fpn')
    with pytest.raises(ValueError, match="'fpn_resnet20'"):
        aff_jax.create_model('unet', backbone='fpn_resnet20')
    with pytest.raises(TypeError, match='not_an_option'):
        aff_jax.create_model('fpn_resnet20', not_an_option=1)
    with pytest.raises(ValueError, match='not_a_fusion'):
        aff_jax.create_model('fpn_resnet20', fusion='not_a_fusion')
    with pytest.raises(TypeError, match='scale'):
        aff_jax.create_model('fpn_resnet20', fusion='add', fusion_options={'scale': 2.0})
    with pytest.raises(ValueError, match='decoder_channels needs 3 widths'):
        abstract_apply(aff_jax.create_model('unet', backbone='tv_resnet18',
                                            decoder_channels=(8, 8)))
    with pytest.raises(ValueError, match='segmentation model'):
        aff_jax.models.preset('fpn')
