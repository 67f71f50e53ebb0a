"""``aff_jax.load_pretrained``: the three formats, told apart by content (the files have no
extension), give the model the weights were written from; wrong weights and other files fail
with the strict key error or one line.

PyTorch: the port (``aff_jax.reference.torch_port``) in float64 is the reference. MXNet and
Orbax: the variables written (with ``aff_mx.save_params`` and ``convert.save_variables``, the
project's writers) must come back exactly, and so must the logits of the model they came from.
"""
import copy

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax.interop import convert
from aff_jax.interop import mxnet as aff_mx
from aff_jax.interop import torch as aff_torch
from aff_jax.reference import torch_port as port

TV = dict(layers=(1, 1, 1, 1), small_input=True)
CIFAR = dict(layers=(1, 1, 1), channels=(8, 8, 16, 32))
# The sources: (preset, the create_model keywords fixed by the weights, the ones given).
SOURCES = {
    'torch': ('tv_resnet18', dict(num_classes=10, fusion='iaff'), TV),
    'orbax': ('tv_resnet18', dict(num_classes=5, fusion='aff'), TV),
    'mxnet': ('cifar_aff_resnet32', dict(num_classes=7), CIFAR),
}
# Published input statistics: torchvision's ImageNet ones (the port) and those of the
# official train_cifar.py, on 0-1 pixels.
TORCHVISION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OFFICIAL_CIFAR = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def nchw_images(seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=gen) + torch.randn((n, 3, 1, 1), generator=gen)


def random_variables(model: nn.Module, seed: int) -> dict:
    """Every variable of ``model`` random (float32 numpy), BatchNorm variances positive and
    weights scaled by 1/sqrt(fan-in) so that activations stay O(1). From the shapes alone:
    initialising the model eagerly would take half a minute."""
    shapes = nn.unbox(jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == 'var':
            value = rng.uniform(0.5, 1.5, leaf.shape)
        elif name == 'kernel':
            value = rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape)
        else:
            value = rng.normal(0, 0.2, leaf.shape) + (name == 'scale')
        return value.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def logits(model: nn.Module, variables: dict, images: jax.Array) -> jax.Array:
    """Eval-mode logits, compiled once (applying eagerly compiles every op on its own)."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


@pytest.fixture(scope='module')
def written(tmp_path_factory):
    """``{format: (path, source)}``: the port module (torch) or the variables written."""
    directory = tmp_path_factory.mktemp('weights')
    name, fixed, given = SOURCES['torch']
    ref = port.randomize_(port.build_port(name, **fixed, **given), seed=1)
    torch.save(ref.state_dict(), directory / 'port')

    name, fixed, given = SOURCES['orbax']
    donor = port.randomize_(port.build_port(name, **fixed, **given), seed=2)
    tv_variables = aff_torch.from_state_dict(aff_jax.create_model(name, **fixed, **given),
                                             donor.state_dict())
    convert.save_variables(str(directory / 'converted'), tv_variables)

    name, fixed, given = SOURCES['mxnet']
    model = aff_jax.create_model(name, **fixed, **given)
    cifar_variables = random_variables(model, seed=3)
    aff_mx.save_params(directory / 'gluon', aff_mx.to_params(model, cifar_variables))
    return {'torch': (directory / 'port', ref),
            'orbax': (directory / 'converted', tv_variables),
            'mxnet': (directory / 'gluon', cifar_variables)}


def test_pytorch_file_gives_the_port_logits(written):
    path, ref = written['torch']
    model, variables = aff_jax.load_pretrained('tv_resnet18', path, **TV)
    assert model.num_classes == 10  # read off fc.weight, and iAFF off the keys
    x = nchw_images(seed=4)
    with torch.no_grad():
        want = copy.deepcopy(ref).double().eval()(x.double()).numpy()
    got = np.asarray(logits(model, variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))),
                     np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


@pytest.mark.parametrize('kind', ['mxnet', 'orbax'])
def test_written_variables_come_back_exactly(written, kind):
    name, fixed, given = SOURCES[kind]
    path, want = written[kind]
    loaded = aff_jax.load_pretrained(name, path, **given)
    want_flat = flax.traverse_util.flatten_dict(want)
    got_flat = flax.traverse_util.flatten_dict(loaded.variables)
    assert sorted(got_flat) == sorted(want_flat)
    for key, value in want_flat.items():
        assert isinstance(got_flat[key], np.ndarray), key
        np.testing.assert_array_equal(got_flat[key], np.asarray(value), err_msg='/'.join(key))
    # The class count and fusion read off the weights build the source's model.
    source = aff_jax.create_model(name, **fixed, **given)
    x = jnp.asarray(nchw_images(seed=5).numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(logits(loaded.model, loaded.variables, x),
                                  logits(source, want, x))


@pytest.mark.parametrize('kind, statistics', [('torch', TORCHVISION), ('mxnet', OFFICIAL_CIFAR)],
                         ids=['torch', 'mxnet'])
def test_preprocessing_is_the_presets(written, kind, statistics):
    name, _, given = SOURCES[kind]
    loaded = aff_jax.load_pretrained(name, written[kind][0], **given)
    assert loaded.preprocessing == aff_jax.models.preset(name).preprocessing
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
    mean, std = (np.array(s) for s in statistics)
    np.testing.assert_allclose(loaded.preprocess(pixels), (pixels / 255.0 - mean) / std,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kind, overrides, message', [
    ('torch', dict(TV, layers=(2, 1, 1, 1)),
     r'^PyTorch state_dict weights do not match the model: missing \d+ keys: '
     r'layer1\.1\.bn1\.bias, '),
    ('torch', dict(TV, num_classes=3),
     r'^PyTorch state_dict weights do not match the model: mis-shaped 2 keys: '
     r'fc\.bias: expected \(3,\), got \(10,\), fc\.weight: expected \(3, 512\), got \(10, 512\)$'),
    ('orbax', dict(TV, layers=(1, 1, 2, 1)),
     r'Orbax variables do not match the model: missing \d+ keys: '
     r'batch_stats/layer3/1/bn1/mean, '),
    ('mxnet', dict(CIFAR, channels=(8, 8, 16, 64)),
     r'^Gluon \.params weights do not match the model: mis-shaped \d+ keys: '),
], ids=['torch_depth', 'torch_classes', 'orbax_depth', 'mxnet_width'])
def test_weights_of_another_model_are_the_strict_error(written, kind, overrides, message):
    name = SOURCES[kind][0]
    with pytest.raises(ValueError, match=message) as error:
        aff_jax.load_pretrained(name, written[kind][0], **overrides)
    assert '\n' not in str(error.value)


def test_a_path_without_weights_is_a_one_line_error(tmp_path):
    (tmp_path / 'notes.pth').write_text('not weights\n')
    (tmp_path / 'empty.params').write_bytes(b'')
    (tmp_path / 'folder').mkdir()
    cases = {
        'notes.pth': r"not a weights file \(it starts with b'not weig'\); expected a PyTorch "
                     r'checkpoint \(torch\.save\), an MXNet \.params file or an Orbax checkpoint '
                     r'directory$',
        'empty.params': r'not a weights file \(it is empty\)',
        'folder': r'a directory but not an Orbax checkpoint',
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            aff_jax.load_pretrained('tv_resnet18', tmp_path / name)
        assert str(error.value).startswith(str(tmp_path / name)) and '\n' not in str(error.value)
    with pytest.raises(FileNotFoundError, match='no such file or directory'):
        aff_jax.load_pretrained('tv_resnet18', tmp_path / 'missing.pth')
