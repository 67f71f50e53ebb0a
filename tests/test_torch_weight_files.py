"""PyTorch weights as people save them: `load_state_dict_file` and `from_state_dict` on real
`torch.save` files (wrapper dicts, DataParallel/torch.compile key prefixes, half precision, the
legacy format), one-line errors for damaged files, short mismatch errors, and the convert CLI.

The weights are the PyTorch port's AFF (`aff_jax.reference.torch_port`) with random values;
its flax twin is cheap to set up, which keeps the file fast.
"""
import subprocess
import sys

import flax
import numpy as np
import pytest
import torch

import aff_jax
from aff_jax.interop import naming
from aff_jax.interop import torch as aff_torch
from aff_jax.reference import torch_port as port


@pytest.fixture(scope='module')
def ref():
    return port.randomize_(port.AFF(16, 4), seed=7)


@pytest.fixture(scope='module')
def model():
    return aff_jax.AFF(r=4, scale=2.0, stats_rule='torch')


@pytest.fixture(scope='module')
def want(ref, model):
    """The variables loaded from the plain state_dict, as numpy arrays."""
    return aff_torch.from_state_dict(model, {k: v.numpy() for k, v in ref.state_dict().items()})


def assert_same_variables(got, want):
    got, want = flax.traverse_util.flatten_dict(got), flax.traverse_util.flatten_dict(want)
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        g = np.asarray(got[path])
        assert g.dtype == w.dtype, (path, g.dtype, w.dtype)
        np.testing.assert_array_equal(g, w, err_msg='/'.join(path))


def saved(tmp_path, obj, name='weights.pth', **kwargs):
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return str(path)


def one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert '\n' not in message, message
    assert str(path) in message, message
    return message


def sgd_state(m):
    """The layout of `torch.optim.SGD(momentum=0.9).state_dict()` after a step, built by hand
    (creating a torch optimizer costs seconds)."""
    return {'state': {i: {'momentum_buffer': torch.zeros_like(p)}
                      for i, p in enumerate(m.parameters())},
            'param_groups': [{'lr': 0.1, 'momentum': 0.9, 'nesterov': False,
                              'params': list(range(len(list(m.parameters()))))}]}


# How training scripts save a module `m`.
LAYOUTS = {
    'plain': lambda m: m.state_dict(),
    'DataParallel': lambda m: torch.nn.DataParallel(m).state_dict(),
    'torch.compile prefix': lambda m: {'_orig_mod.' + k: v for k, v in m.state_dict().items()},
    'state_dict, epoch, optimizer': lambda m: {
        'state_dict': m.state_dict(), 'epoch': 3, 'optimizer': sgd_state(m)},
    'model': lambda m: {'model': m.state_dict()},
    'model_state_dict': lambda m: {'epoch': 3, 'model_state_dict': m.state_dict()},
    'net': lambda m: {'net': m.state_dict(), 'acc': 0.5},
    'model/state_dict of DDP': lambda m: {
        'model': {'state_dict': torch.nn.DataParallel(m).state_dict()}, 'step': 10},
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_saved_layouts_load_to_the_same_variables(layout, ref, model, want, tmp_path):
    state_dict = aff_torch.load_state_dict_file(saved(tmp_path, LAYOUTS[layout](ref)))
    assert sorted(state_dict) == sorted(ref.state_dict())
    assert_same_variables(aff_torch.from_state_dict(model, state_dict), want)


def test_legacy_format_loads(ref, model, want, tmp_path):
    path = saved(tmp_path, ref.state_dict(), _use_new_zipfile_serialization=False)
    assert_same_variables(aff_torch.from_state_dict(model, aff_torch.load_state_dict_file(path)),
                          want)


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_saved_layouts_load_in_memory_too(layout, ref, model, want):
    """What torch.load returns for each layout, given to from_state_dict directly."""
    assert_same_variables(aff_torch.from_state_dict(model, LAYOUTS[layout](ref)), want)


def test_a_dict_without_a_state_dict_says_what_it_holds(model):
    with pytest.raises(ValueError) as excinfo:
        aff_torch.from_state_dict(model, {'epoch': 3, 'best_acc': 0.9})
    message = str(excinfo.value)
    assert '\n' not in message
    assert message == ('the dict given to from_state_dict: holds no state_dict (a dict of '
                       'tensors, at the top or under state_dict/model_state_dict/model/net); it '
                       'holds a dict with keys epoch, best_acc')


def test_prefixed_state_dict_loads_without_a_file(ref, model, want):
    wrapped = torch.nn.DataParallel(torch.compile(ref)).state_dict()
    assert next(iter(wrapped)).startswith('module._orig_mod.')
    assert_same_variables(aff_torch.from_state_dict(model, wrapped), want)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_loads_as_float32(dtype, ref, model, tmp_path):
    """Floats are widened from the rounded values; counters stay int64."""
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    rounded = aff_torch.from_state_dict(model, {k: v.float().numpy() if v.is_floating_point()
                                                else v.numpy() for k, v in half.items()})
    state_dict = aff_torch.load_state_dict_file(saved(tmp_path, half))
    assert {str(v.dtype) for v in state_dict.values()} == {'float32', 'int64'}
    assert_same_variables(aff_torch.from_state_dict(model, state_dict), rounded)
    assert_same_variables(aff_torch.from_state_dict(model, half), rounded)


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {
    'truncated': ('weights.pth', {}, _truncated),
    'truncated legacy': ('weights.pth', {'_use_new_zipfile_serialization': False}, _truncated),
    'zero bytes': ('weights.pth', {}, lambda path: path.write_bytes(b'')),
    'text file': ('weights.pth', {}, lambda path: path.write_text('epoch 3, loss 0.12\n')),
    'text as .npz': ('weights.npz', {}, lambda path: path.write_text('not an archive\n')),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_file_is_one_line_value_error(damage, ref, tmp_path):
    name, kwargs, damage_file = DAMAGE[damage]
    path = tmp_path / name
    torch.save(ref.state_dict(), path, **kwargs)
    damage_file(path)
    with pytest.raises(ValueError) as excinfo:
        aff_torch.load_state_dict_file(str(path))
    assert 'not a readable' in one_line_error(excinfo, path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / 'absent.pth'
    with pytest.raises(FileNotFoundError) as excinfo:
        aff_torch.load_state_dict_file(str(path))
    one_line_error(excinfo, path)


def test_file_without_a_state_dict_names_its_keys(tmp_path):
    path = saved(tmp_path, {'epoch': 3, 'best_acc': 0.9, **{f'extra{i}': i for i in range(20)}})
    with pytest.raises(ValueError) as excinfo:
        aff_torch.load_state_dict_file(path)
    message = one_line_error(excinfo, path)
    assert 'holds no state_dict' in message and 'epoch, best_acc' in message
    assert '(and 12 more)' in message


def test_pickled_module_is_refused_by_name(ref, tmp_path):
    """A whole pickled nn.Module would need unsafe unpickling: say so, in one line."""
    path = saved(tmp_path, ref)
    with pytest.raises(ValueError) as excinfo:
        aff_torch.load_state_dict_file(path)
    assert 'torch_port.AFF' in one_line_error(excinfo, path)


def test_mismatch_error_is_short_and_counts_the_rest(model):
    """A whole ResNet's state_dict given to a bare AFF: hundreds of keys, one short line."""
    state_dict = port.build_port('tv_resnet18', fusion='iaff', layers=(1, 1, 1, 1)).state_dict()
    with pytest.raises(ValueError) as excinfo:
        aff_torch.from_state_dict(model, state_dict)
    message = str(excinfo.value)
    assert len(message) < 2000 and '\n' not in message
    assert f'unexpected {len(state_dict)} keys: ' in message
    assert f'(and {len(state_dict) - 10} more)' in message


def test_mismatch_error_hints_at_an_extra_prefix(ref, model):
    encoder = {'encoder.' + k: v for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match="hint: every unexpected key starts with 'encoder.'"):
        aff_torch.from_state_dict(model, encoder)


def test_key_mismatches_caps_each_list():
    expected = {f'k{i:02d}': (1,) for i in range(30)}
    missing, unexpected, misshaped = naming.key_mismatches(expected, {'k00': (2,), 'x': (1,)})
    assert missing == [f'k{i:02d}' for i in range(1, 11)] + ['... (and 19 more)']
    assert unexpected == ['x'] and misshaped == ['k00: expected (1,), got (2,)']
    assert len(naming.key_mismatches(expected, {}, limit=None)[0]) == 30


def test_convert_cli_reports_a_damaged_file_in_one_line(tmp_path):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'\x80\x02truncated')
    process = subprocess.run(
        [sys.executable, '-m', 'aff_jax.interop.convert', '--model', 'tv_resnet18',
         '--torch', str(path), '--out', str(tmp_path / 'out')],
        capture_output=True, text=True, timeout=120)
    assert process.returncode == 1, process.stderr
    assert 'Traceback' not in process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and str(path) in lines[0], lines
    assert not (tmp_path / 'out').exists()
