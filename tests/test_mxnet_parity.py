"""Checks against the real MXNet 1.9.1, run in a dedicated venv (never in the test interpreter).

The session fixture `mxnet_python` builds `mxnet==1.9.1` + `numpy<1.24` into a cached venv
(`$AFF_JAX_MXNET_VENV`, default `~/.cache/aff-jax/mxnet-venv`; reused once complete) and skips
only when the package registry cannot be reached. MXNet 1.9.1 needs numpy<1.24, whose wheels
stop at CPython 3.11: the venv uses `$AFF_JAX_MXNET_PYTHON`, else this interpreter when it is
<= 3.11, else python3.11 / python3.10 from PATH. The shared libraries it loads beyond its
wheel are libgomp.so.1 and libquadmath.so.0 (Debian: libgomp1, libquadmath0).

The scripts in tests/gluon_ref run under that venv, with aff_jax/reference/gluon (the official
Gluon models) on their path: `make_reference.py` (official Gluon models with drawn weights ->
.params, input, logits, parameter table) and `nd_io.py` (mx.nd load/save). `python -m
aff_jax.compare` runs the official presets against Gluon in the same venv.
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import parity
import pytest

from aff_jax import compare
from aff_jax.compare import cli, mxnet_side
from aff_jax.interop import mxnet as aff_mx
from aff_jax.reference import gluon

REQUIREMENTS = ('mxnet==1.9.1', 'numpy<1.24')
GLUON_REF = Path(__file__).parent / 'gluon_ref'
# pip output that means the registry was not reachable (as opposed to a resolution failure).
_NETWORK_FAILURES = ('NewConnectionError', 'ConnectTimeoutError', 'Failed to establish a new '
                     'connection', 'Temporary failure in name resolution', 'Network is '
                     'unreachable', 'ProxyError', 'Max retries exceeded', 'ReadTimeoutError')


# Read at import, before conftest's session fixture points XDG_CACHE_HOME at a temporary
# directory: the venv is the user's cached one, not rebuilt per session.
_VENV = mxnet_side.default_venv()


def _base_python():
    if 'AFF_JAX_MXNET_PYTHON' in os.environ:
        return os.environ['AFF_JAX_MXNET_PYTHON']
    if sys.version_info < (3, 12):
        return sys.executable
    for name in ('python3.11', 'python3.10'):
        if shutil.which(name):
            return shutil.which(name)
    pytest.fail('mxnet==1.9.1 needs numpy<1.24, which has no wheels past CPython 3.11: install '
                'python3.11 or set AFF_JAX_MXNET_PYTHON to a CPython <= 3.11')


def _tail(text, lines=30):
    return '\n'.join(text.strip().splitlines()[-lines:])


def _build_venv(venv, marker):
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([_base_python(), '-m', 'venv', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    pip = subprocess.run(
        [str(python), '-m', 'pip', 'install', '--only-binary=:all:', '--no-input',
         '--disable-pip-version-check', '--retries', '2', '--timeout', '30', *REQUIREMENTS],
        capture_output=True, text=True)
    if pip.returncode:
        output = pip.stdout + pip.stderr
        network = [line for line in output.splitlines()
                   if any(failure in line for failure in _NETWORK_FAILURES)]
        if network:
            pytest.skip(f'package registry unreachable, cannot pip install '
                        f'{" ".join(REQUIREMENTS)}: {network[-1].strip()}')
        pytest.fail(f'pip install {" ".join(REQUIREMENTS)} failed:\n{_tail(output)}')
    check = subprocess.run([str(python), '-c', 'import mxnet; print(mxnet.__version__)'],
                           capture_output=True, text=True)
    if check.returncode:
        hint = (' (missing system library: install libgomp1 / libquadmath0)'
                if 'cannot open shared object file' in check.stderr else '')
        pytest.fail(f'mxnet does not import in {venv}{hint}:\n{_tail(check.stderr)}')
    marker.write_text(' '.join(REQUIREMENTS))


@pytest.fixture(scope='session')
def mxnet_python():
    """Path of the python of a venv holding mxnet 1.9.1 (built on first use, then reused)."""
    venv = _VENV
    venv.parent.mkdir(parents=True, exist_ok=True)
    marker = venv / '.aff-jax-complete'
    with open(venv.parent / f'{venv.name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; others then reuse
        if not (marker.exists() and marker.read_text() == ' '.join(REQUIREMENTS)):
            _build_venv(venv, marker)
    return venv / 'bin' / 'python'


@pytest.fixture(scope='session')
def run_gluon(mxnet_python):
    """run_gluon(script, *args): run a tests/gluon_ref script under the mxnet venv."""
    def run(script, *args):
        result = subprocess.run([str(mxnet_python), str(GLUON_REF / script), *map(str, args)],
                                capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(gluon.DIRECTORY)))
        if result.returncode:
            pytest.fail(f'{script} {" ".join(map(str, args))} failed:\n{_tail(result.stderr)}')
    return run


@pytest.fixture(scope='session')
def gluon_reference(run_gluon, tmp_path_factory):
    """gluon_reference(preset, layers=None, values=False) -> directory of make_reference.py's
    outputs for that preset (`layers` like '1,1,1' reduces depth), made once per session."""
    made = {}

    def make(preset, layers=None, values=False):
        key = (preset, layers, values)
        if key not in made:
            out = tmp_path_factory.mktemp(preset)
            options = (['--layers', layers] if layers else []) + (['--values'] if values else [])
            run_gluon('make_reference.py', preset, out, *options)
            made[key] = out
        return made[key]
    return make


@pytest.fixture
def small_cifar_aff(gluon_reference):
    return gluon_reference('cifar_aff_resnet32', '1,1,1', values=True)


def test_reads_gluon_save_parameters(small_cifar_aff):
    params = aff_mx.load_params(small_cifar_aff / 'model.params')
    table = json.loads((small_cifar_aff / 'params.json').read_text())
    assert list(params) == [entry['name'] for entry in table]
    with np.load(small_cifar_aff / 'values.npz') as values:
        assert values.files == list(params)
        for entry in table:
            array, name = params[entry['name']], entry['name']
            assert list(array.shape) == entry['shape'] and array.dtype == entry['dtype'], name
            assert array.tobytes() == values[name].tobytes(), name
    # The input BN (scale=False, center=False) keeps gamma/beta in the file, frozen at 1/0.
    assert np.array_equal(params['features.0.gamma'], np.ones(3, np.float32))
    assert np.array_equal(params['features.0.beta'], np.zeros(3, np.float32))


def test_our_file_equals_gluons_and_loads_into_the_model(small_cifar_aff, run_gluon, tmp_path):
    params = aff_mx.load_params(small_cifar_aff / 'model.params')
    ours = aff_mx.save_params(tmp_path / 'ours.params', params)
    assert ours.read_bytes() == (small_cifar_aff / 'model.params').read_bytes()
    run_gluon('make_reference.py', 'cifar_aff_resnet32', tmp_path / 'run', '--layers', '1,1,1',
              '--load', ours)
    with np.load(small_cifar_aff / 'reference.npz') as ref, \
            np.load(tmp_path / 'run' / 'reference.npz') as rerun:
        assert np.array_equal(rerun['input'], ref['input'])
        assert np.array_equal(rerun['logits'], ref['logits'])


def _every_dtype():
    rng = np.random.default_rng(1)
    return {
        'f32': rng.normal(size=(2, 3, 1, 2)).astype(np.float32),
        'f64': np.array([np.pi, -0.0, np.nan]),
        'f16': np.array([65504, 6e-8, -1.5], np.float16),
        'u8': np.array([0, 7, 255], np.uint8),
        'i32': np.array([-2 ** 31, 2 ** 31 - 1], np.int32),
        'i8': np.array([[-128], [127]], np.int8),
        'i64': np.array([-2 ** 63, 2 ** 63 - 1], np.int64),
        'bool': np.array([True, False]),
        'empty': np.zeros((3, 0), np.float32),
    }


def test_mx_nd_load_reads_our_file(run_gluon, tmp_path):
    params = _every_dtype()
    run_gluon('nd_io.py', 'load', aff_mx.save_params(tmp_path / 'ours.params', params),
              tmp_path / 'seen.npz')
    with np.load(tmp_path / 'seen.npz') as seen:
        assert seen.files == list(params)
        for name, value in params.items():
            assert seen[name].dtype == value.dtype and seen[name].shape == value.shape, name
            assert seen[name].tobytes() == value.tobytes(), name


@pytest.mark.parametrize('command, extra', [
    ('save', {}),
    ('save-np', {'scalar': np.array(2.5, np.float32)}),  # V3 files allow 0-d arrays
])
def test_reads_mx_nd_save(run_gluon, tmp_path, command, extra):
    params = {**_every_dtype(), **extra}
    np.savez(tmp_path / 'in.npz', **params)
    run_gluon('nd_io.py', command, tmp_path / 'in.npz', tmp_path / 'mx.params')
    loaded = aff_mx.load_params(tmp_path / 'mx.params')
    assert list(loaded) == list(params)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype and loaded[name].shape == value.shape, name
        assert loaded[name].tobytes() == value.tobytes(), name


# --- JAX models loaded from Gluon checkpoints ------------------------------------------------

@pytest.mark.parametrize('preset, layers', [
    ('cifar_aff_resnet32', None),
    ('cifar_iaff_resnet32', '1,1,1'),
    ('cifar_aff_resnext38_32x4d', '1,1,1'),
    ('aff_resnet50', '2,1,2,1'),
    ('iaff_resnext50_32x4d', '2,2,1,1'),
])
def test_jax_logits_equal_mxnet(gluon_reference, preset, layers):
    import aff_jax
    import jax.numpy as jnp

    out = gluon_reference(preset, layers)
    params = aff_mx.load_params(out / 'model.params')
    overrides = {'layers': tuple(int(n) for n in layers.split(','))} if layers else {}
    model = aff_jax.create_model(preset, **overrides)
    variables = aff_mx.from_params(model, params)
    reference = np.load(out / 'reference.npz')
    logits = np.asarray(model.apply(variables, jnp.asarray(reference['input'].transpose(0, 2, 3, 1)),
                                    train=False))
    expected = reference['logits']
    assert logits.shape == expected.shape
    assert np.linalg.norm(logits - expected) / np.linalg.norm(expected) <= 1e-5
    back = aff_mx.to_params(model, variables)
    assert set(back) == set(params)
    for name, value in params.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name


def test_from_params_is_strict(gluon_reference):
    import aff_jax

    params = aff_mx.load_params(gluon_reference('cifar_aff_resnet32', '1,1,1') / 'model.params')
    model = aff_jax.create_model('cifar_aff_resnet32', layers=(1, 1, 1))
    broken = dict(params)
    del broken['features.1.weight']
    broken['features.9.weight'] = np.zeros((3,), np.float32)
    broken['output.bias'] = np.zeros((7,), np.float32)
    with pytest.raises(ValueError) as err:
        aff_mx.from_params(model, broken)
    message = str(err.value)
    assert 'features.1.weight' in message and 'features.9.weight' in message
    assert 'output.bias: expected (100,), got (7,)' in message
    # The input BatchNorm has no learned shift, yet MXNet adds its stored beta: a nonzero one
    # cannot be represented and must not be dropped silently.
    shifted = dict(params, **{'features.0.beta': np.full(3, 0.5, np.float32)})
    with pytest.raises(ValueError, match='features.0.beta'):
        aff_mx.from_params(model, shifted)
    prefixed = {('aux:' if 'running' in k else 'arg:') + k: v for k, v in params.items()}
    exported = aff_mx.from_params(model, prefixed)
    plain = aff_mx.from_params(model, params)
    assert np.array_equal(exported['params']['output']['kernel'], plain['params']['output']['kernel'])


def test_convert_official_checkpoint_for_inference(gluon_reference, tmp_path):
    """The README recipe: Gluon .params -> Orbax checkpoint -> model.apply."""
    import aff_jax
    import jax.numpy as jnp
    from aff_jax.interop import convert

    out = gluon_reference('cifar_iaff_resnet32', '1,1,1')
    target = tmp_path / 'orbax'
    code = convert.main(['--model', 'cifar_iaff_resnet32', '--mxnet', str(out / 'model.params'),
                         '--out', str(target)])
    assert code == 1  # the preset is full depth; the reduced checkpoint must not load silently
    assert not target.exists()
    variables = convert.convert('cifar_iaff_resnet32', mxnet=str(out / 'model.params'),
                                overrides={'layers': (1, 1, 1)})
    convert.save_variables(str(target), variables)
    model = aff_jax.create_model('cifar_iaff_resnet32', layers=(1, 1, 1))
    reference = np.load(out / 'reference.npz')
    logits = model.apply(convert.load_variables(str(target)),
                         jnp.asarray(reference['input'].transpose(0, 2, 3, 1)), train=False)
    expected = reference['logits']
    assert np.linalg.norm(np.asarray(logits) - expected) / np.linalg.norm(expected) <= 1e-5


# --- python -m aff_jax.compare against Gluon ----------------------------------------------------

# Reduced depth (one block per stage) and small inputs: the same structure, compiled quickly.
_ONE_BLOCK = {'cifar': ((1, 1, 1), 16), 'imagenet': ((1, 1, 1, 1), 32)}
# MXNet updates BatchNorm running statistics in the backward pass, which never runs for the
# CIFAR ResNets' input BN (no learned parameters, fed the data): the official presets freeze
# its statistics (freeze_input_stats); the flax-style choice differs from Gluon exactly there.
_INPUT_BN_STATS = {'features.0.running_mean', 'features.0.running_var'}


def test_the_two_cifar_resnexts_differ_only_in_depth():
    """So that, at one block per stage, the compare test below covers both with one."""
    from aff_jax.models import preset

    deep, shallow = (preset(f'cifar_aff_resnext{d}_32x4d') for d in (47, 38))
    assert (deep.fields['layers'], shallow.fields['layers']) == ((5, 5, 5), (4, 4, 4))
    assert ({**deep.fields, 'layers': None}, deep.host, deep.fusion, deep.r) == \
        ({**shallow.fields, 'layers': None}, shallow.host, shallow.fusion, shallow.r)


@pytest.mark.parametrize('preset', [
    'cifar_resnet32', 'cifar_aff_resnet32', 'cifar_iaff_resnet32', 'cifar_aff_resnext38_32x4d',
    'aff_resnet50', 'iaff_resnet50', 'aff_resnext50_32x4d', 'iaff_resnext50_32x4d'])
def test_official_preset_matches_gluon_in_eval_and_train_mode(gluon_reference, mxnet_python,
                                                               preset):
    import aff_jax

    layers, size = _ONE_BLOCK['cifar' if preset.startswith('cifar') else 'imagenet']
    params = gluon_reference(preset, ','.join(map(str, layers))) / 'model.params'
    model = aff_jax.create_model(preset, layers=layers)
    variables = aff_mx.from_params(model, aff_mx.load_params(params))
    reference = compare.mxnet_reference(preset, params, layers=layers, python=str(mxnet_python))
    # Both in float64 (Gluon's net cast after loading): a value within float32 rounding of a
    # ReLU's zero or a max-pool tie can flip one way in each framework's float32, which no
    # float32 noise estimate covers (seen on AVX-512 and AMD machines); in float64 the two
    # agree to ~1e-13.
    x = compare.example_input(4, size, seed=1)
    eval_diffs = parity.float64_diffs(model, variables, reference, x, names=aff_mx.to_params)
    parity.assert_parity(eval_diffs)
    assert len(eval_diffs) > 20
    train_diffs = parity.float64_diffs(model, variables, reference, x, names=aff_mx.to_params,
                                       mode='train', steps=1)
    parity.assert_parity(train_diffs)
    if preset == 'cifar_resnet32':
        updating = aff_jax.create_model(preset, layers=layers, freeze_input_stats=False)
        differing = parity.beyond(parity.float64_diffs(
            updating, variables, reference, x, names=aff_mx.to_params, mode='train', steps=1))
        assert {d.name for d in differing} == _INPUT_BN_STATS
        assert {d.kind for d in differing} == {'stat', 'step1'}
    kinds = {d.kind for d in train_diffs}
    assert kinds == {'activation', 'stat', 'grad', 'step1'}
    table = json.loads((params.parent / 'params.json').read_text())
    trainable = [e['name'] for e in table if e['grad_req'] != 'null']
    assert [d.name for d in train_diffs if d.kind == 'grad'] == trainable


def test_compare_cli_locates_a_perturbed_official_weight(gluon_reference, mxnet_python, capsys):
    params = gluon_reference('cifar_aff_resnet32', '1,1,1') / 'model.params'
    code = cli.main(['--model', 'cifar_aff_resnet32', '--checkpoint', str(params),
                     '--layers', '1,1,1', '--size', '16', '--json', '--mxnet-python',
                     str(mxnet_python), '--perturb', 'features.3.0.resfwd.2.weight'])
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    first = result['first_divergence']
    assert (first['kind'], first['name']) == ('activation', 'features.3.0.resfwd.2')
    rows = {row['name']: row for row in result['rows']}
    assert rows['features.3.0.resfwd.0']['max_rel64'] < 1e-10


def test_compare_without_mxnet_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv('AFF_JAX_MXNET_PYTHON', raising=False)
    monkeypatch.setenv('AFF_JAX_MXNET_VENV', str(tmp_path / 'no-venv'))
    args = ['--model', 'cifar_aff_resnet32', '--checkpoint', str(tmp_path / 'missing.params')]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'no Python with mxnet was found' in err and '--mxnet-python' in err
    assert 'AFF_JAX_MXNET_PYTHON' in err
    assert cli.main(args + ['--mxnet-python', sys.executable]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {sys.executable} cannot import mxnet: give a Python with mxnet==1.9.1 ' \
                  f'and numpy<1.24 installed'
