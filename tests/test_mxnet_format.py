"""MXNet `.params` reading and writing without mxnet: exact round trips, the byte layout
against a hand-encoded file, and every documented error. Cross-checks with the real MXNet are in
test_mxnet_parity.py."""
import os
import struct

import numpy as np
import pytest

from aff_jax.interop import mxnet as aff_mx

# Written out from MXNet's ndarray.cc, independently of the module's constants.
LIST_MAGIC, V1, V2, V3 = 0x112, 0xF993FAC8, 0xF993FAC9, 0xF993FACA
FIRST_ARRAY = 24  # list magic, reserved, array count
NDIM_AT = FIRST_ARRAY + 8  # after the NDArray magic and the storage type


def _array_bytes(magic, shape, flag, data, stype=0, device=(1, 0)):
    return (struct.pack('<Iii', magic, stype, len(shape)) + struct.pack(f'<{len(shape)}q', *shape)
            + struct.pack('<iii', *device, flag) + data)


def _file_bytes(arrays, names):
    body = struct.pack('<QQQ', LIST_MAGIC, 0, len(arrays)) + b''.join(arrays)
    body += struct.pack('<Q', len(names))
    for name in names:
        raw = name.encode('utf-8')
        body += struct.pack('<Q', len(raw)) + raw
    return body


def _write(path, data):
    path.write_bytes(data)
    return path


def _one_array_file(tmp_path, magic=V2, shape=(2,), flag=0, stype=0, data=None):
    data = np.arange(np.prod(shape), dtype='<f4').tobytes() if data is None else data
    return _write(tmp_path / 'one.params',
                  _file_bytes([_array_bytes(magic, shape, flag, data, stype)], ['w']))


def _exactly_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_round_trip_is_exact_for_every_dtype_and_keeps_order(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        'features.1.weight': rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        'special': np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32),
        'arg:fc_bias': rng.normal(size=(5,)),
        'half': np.array([65504, 6e-8, -0.0, np.nan], np.float16),
        'bytes': np.array([0, 1, 254, 255], np.uint8),
        'int32': np.array([-2 ** 31, 2 ** 31 - 1], np.int32),
        'int8': np.array([-128, 127], np.int8),
        'int64': np.array([[-2 ** 63], [2 ** 63 - 1]], np.int64),
        'mask': np.array([True, False, True]),
        'empty': np.zeros((2, 0, 3), np.float32),
        'aux:名前.running_var': np.ones((1,), np.float32),
    }
    loaded = aff_mx.load_params(aff_mx.save_params(tmp_path / 'p.params', params))
    assert list(loaded) == list(params)
    for name, value in params.items():
        assert _exactly_equal(loaded[name], value), name


def test_round_trip_of_an_empty_dict(tmp_path):
    path = aff_mx.save_params(str(tmp_path / 'empty.params'), {})
    assert aff_mx.load_params(path) == {}
    assert (tmp_path / 'empty.params').read_bytes() == _file_bytes([], [])


def test_written_bytes_follow_the_mxnet_layout(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    steps = np.array([7, -1], np.int64)
    expected = _file_bytes([_array_bytes(V2, (2, 3), 0, weight.tobytes()),
                            _array_bytes(V2, (2,), 6, steps.tobytes())], ['w', 'num_update'])
    aff_mx.save_params(tmp_path / 'p.params', {'w': weight, 'num_update': steps})
    assert (tmp_path / 'p.params').read_bytes() == expected


def test_non_native_and_strided_inputs_are_stored_by_value(tmp_path):
    big_endian = np.arange(4, dtype='>f8')
    transposed = np.arange(6, dtype=np.int32).reshape(2, 3).T
    loaded = aff_mx.load_params(aff_mx.save_params(
        tmp_path / 'p.params', {'be': big_endian, 't': transposed}))
    assert loaded['be'].dtype == np.float64 and np.array_equal(loaded['be'], [0, 1, 2, 3])
    assert np.array_equal(loaded['t'], [[0, 3], [1, 4], [2, 5]])


def test_reads_v3_numpy_shape_arrays_including_0d(tmp_path):
    path = _write(tmp_path / 'v3.params', _file_bytes(
        [_array_bytes(V3, (), 1, struct.pack('<d', 2.5)),
         _array_bytes(V3, (3,), 3, bytes([1, 2, 3]), device=(2, 1))], ['s', 'v']))
    loaded = aff_mx.load_params(path)
    assert _exactly_equal(loaded['s'], np.array(2.5))
    assert _exactly_equal(loaded['v'], np.array([1, 2, 3], np.uint8))


def _raises(cls, path, offset, *fragments):
    with pytest.raises(cls) as info:
        aff_mx.load_params(path)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, aff_mx.ParamsFormatError)
    assert error.offset == offset and error.path == str(path)
    assert str(path) in str(error) and f'byte {offset}' in str(error)
    for fragment in fragments:
        assert fragment in str(error)


def test_every_truncation_is_reported(tmp_path):
    data = _file_bytes([_array_bytes(V2, (2, 2), 2, np.ones(4, np.float16).tobytes()),
                        _array_bytes(V2, (1,), 7, b'\x01')], ['a', 'bc'])
    for cut in range(len(data)):
        path = _write(tmp_path / f'cut{cut}.params', data[:cut])
        with pytest.raises(aff_mx.TruncatedParamsError, match=f'file is {cut} bytes'):
            aff_mx.load_params(path)


def test_truncated_data_names_the_array(tmp_path):
    path = _write(tmp_path / 'short.params', struct.pack('<QQQ', LIST_MAGIC, 0, 1)
                  + _array_bytes(V2, (3,), 0, b'\0' * 8))
    data_at = NDIM_AT + 4 + 8 + 12
    _raises(aff_mx.TruncatedParamsError, path, data_at, 'data of array #0',
            'needs 12 bytes, 8 left')


def test_bad_list_magic(tmp_path):
    data = bytearray(_one_array_file(tmp_path).read_bytes())
    struct.pack_into('<Q', data, 0, 0x113)
    _raises(aff_mx.BadMagicError, _write(tmp_path / 'bad.params', bytes(data)), 0, '0x113')


@pytest.mark.parametrize('magic', [V1, 0xDEADBEEF, 3])
def test_bad_or_legacy_ndarray_magic(tmp_path, magic):
    path = _one_array_file(tmp_path, magic=magic)
    _raises(aff_mx.BadMagicError, path, FIRST_ARRAY, hex(magic), 'array #0')


@pytest.mark.parametrize('stype, kind', [(1, 'row_sparse'), (2, 'csr'), (-1, 'unknown')])
def test_sparse_or_unknown_storage(tmp_path, stype, kind):
    path = _one_array_file(tmp_path, stype=stype)
    _raises(aff_mx.SparseParamsError, path, FIRST_ARRAY + 4, f'storage type {stype} ({kind})')


@pytest.mark.parametrize('flag, kind', [(12, 'bfloat16'), (8, 'int16'), (13, 'not an mshadow')])
def test_unknown_dtype_flag(tmp_path, flag, kind):
    path = _one_array_file(tmp_path, flag=flag)
    _raises(aff_mx.UnknownDTypeError, path, NDIM_AT + 4 + 8 + 8, f'flag {flag} ({kind}')


def test_uninitialised_and_unknown_shapes(tmp_path):
    _raises(aff_mx.ParamsFormatError, _one_array_file(tmp_path, shape=(), data=b''), NDIM_AT,
            'ndim 0')
    _raises(aff_mx.ParamsFormatError, _one_array_file(tmp_path, shape=(2, -1), data=b''),
            NDIM_AT, 'unknown dimensions')


def test_name_count_must_match_the_arrays(tmp_path):
    array = _array_bytes(V2, (1,), 0, b'\0' * 4)
    names_at = FIRST_ARRAY + len(array)
    unnamed = _write(tmp_path / 'list.params', _file_bytes([array], []))
    _raises(aff_mx.NameCountError, unnamed, names_at, '0 names for 1 arrays', 'unnamed list')
    too_many = _write(tmp_path / 'many.params', _file_bytes([array], ['a', 'b']))
    _raises(aff_mx.NameCountError, too_many, names_at, '2 names for 1 arrays')
    twice = _write(tmp_path / 'twice.params', _file_bytes([array, array], ['a', 'a']))
    _raises(aff_mx.NameCountError, twice, FIRST_ARRAY + 2 * len(array) + 8 + 9, "'a' appears twice")


def test_trailing_bytes(tmp_path):
    data = _one_array_file(tmp_path).read_bytes()
    path = _write(tmp_path / 'trailing.params', data + b'\0\0\0')
    _raises(aff_mx.TrailingBytesError, path, len(data), '3 unexpected bytes')


def test_undecodable_name(tmp_path):
    array = _array_bytes(V2, (1,), 0, b'\0' * 4)
    data = _file_bytes([array], ['x'])[:-1] + b'\xff'
    path = _write(tmp_path / 'name.params', data)
    _raises(aff_mx.ParamsFormatError, path, FIRST_ARRAY + len(array) + 8, 'not UTF-8')


@pytest.mark.parametrize('params, error, fragment', [
    ({'w': np.zeros(2, np.complex64)}, ValueError, 'dtype complex64'),
    ({'w': np.zeros(2, np.int16)}, ValueError, 'dtype int16'),
    ({'w': np.float32(1.0)}, ValueError, '0-d'),
    ({'w': [1.0, 2.0]}, TypeError, 'list, not an array'),
    ({3: np.zeros(2, np.float32)}, TypeError, 'names must be str'),
])
def test_invalid_input_leaves_the_target_untouched(tmp_path, params, error, fragment):
    target = tmp_path / 'p.params'
    aff_mx.save_params(target, {'old': np.ones(1, np.float32)})
    before = target.read_bytes()
    with pytest.raises(error, match=fragment):
        aff_mx.save_params(target, {'ok': np.ones(3, np.float32), **params})
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ['p.params']


def test_failed_replace_removes_the_temporary_file(tmp_path):
    target = tmp_path / 'is_a_directory'
    target.mkdir()
    with pytest.raises(OSError):
        aff_mx.save_params(target, {'w': np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == ['is_a_directory'] and not os.listdir(target)
