"""`python -m aff_jax.compare` and `python -m aff_jax.interop.convert` on PyTorch-port checkpoints."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax import compare
from aff_jax.compare import cli
from aff_jax.interop import convert
from aff_jax.interop import torch as aff_torch
from aff_jax.reference import torch_port


@pytest.fixture(scope='module')
def resnet50_checkpoint(tmp_path_factory):
    """A full tv_resnet50 AFF checkpoint: random weights, BN statistics calibrated on a batch
    (as training would leave them) so activations keep a realistic scale."""
    model = torch_port.randomize_(torch_port.build_port('tv_resnet50', fusion='aff', num_classes=10), 0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: the running stats become the batch's
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(compare.example_input(16, 64, seed=1).transpose(0, 3, 1, 2).copy()))
    path = tmp_path_factory.mktemp('ckpt') / 'tv_resnet50_aff.pt'
    torch.save(model.state_dict(), path)
    return path


def test_compare_prints_the_per_layer_table(resnet50_checkpoint, capsys):
    code = cli.main(['--model', 'tv_resnet50', '--checkpoint', str(resnet50_checkpoint),
                     '--batch', '2', '--size', '64'])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('JAX float32 vs reference float32')
    assert out[1].split()[:3] == ['kind', 'name', 'shape']
    assert {line.split()[0] for line in out[2:-1]} == {'activation'}
    layers = [line.split()[1] for line in out[2:-1]]
    # Execution order of the port, every block and the fusion internals included.
    for name in ('conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.fuse_mode.local_att.0',
                 'layer1.0.fuse_mode.global_att.5', 'layer1.0.fuse_mode', 'layer4.2', 'fc'):
        assert name in layers
    assert layers.index('layer1.0.conv1') < layers.index('layer1.0.fuse_mode') < layers.index('fc')
    assert out[-1].endswith(': none') and code == 0
    first_rows = {line.split()[1]: line.split() for line in out[2:7]}
    assert float(first_rows['conv1'][-2]) <= 1e-5  # max rel diff of the stem conv


def test_compare_names_the_first_diverging_layer(resnet50_checkpoint, capsys):
    code = cli.main(['--model', 'tv_resnet50', '--checkpoint', str(resnet50_checkpoint),
                     '--batch', '2', '--size', '64', '--json',
                     '--perturb', 'layer3.1.conv2.weight'])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (result['first_divergence']['kind'], result['first_divergence']['name']) == (
        'activation', 'layer3.1.conv2')
    rows = {row['name']: row for row in result['rows']}
    assert rows['layer3.1.conv1']['max_rel'] < 1e-4
    assert rows['layer3.1.conv2']['max_rel'] > 1e-2


def test_compare_rejects_unknown_weight(resnet50_checkpoint, capsys):
    code = cli.main(['--model', 'tv_resnet50', '--checkpoint', str(resnet50_checkpoint),
                     '--perturb', 'layer9.weight'])
    assert code == 2 and "layer9.weight" in capsys.readouterr().err


def test_convert_torch_checkpoint_to_orbax(tmp_path):
    reference = torch_port.randomize_(
        torch_port.build_port('tv_resnet18', fusion='iaff', layers=(1, 1, 1, 1), num_classes=5,
                              small_input=True), 3)
    path = tmp_path / 'port.pth'
    torch.save({'state_dict': reference.state_dict()}, path)
    out = tmp_path / 'orbax'
    variables = convert.convert('tv_resnet18', torch=str(path),
                                overrides={'layers': (1, 1, 1, 1), 'small_input': True})
    convert.save_variables(str(out), variables)
    with pytest.raises(FileExistsError):
        convert.save_variables(str(out), variables)
    restored = convert.load_variables(str(out))
    model = aff_jax.create_model('tv_resnet18', num_classes=5, fusion='iaff', layers=(1, 1, 1, 1),
                                 small_input=True)
    x = compare.example_input(4, 16, seed=2)
    reference.eval()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    logits = np.asarray(model.apply(restored, jnp.asarray(x), train=False))
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-5
    assert aff_torch.port_fusion(reference.state_dict()) == 'iaff'
