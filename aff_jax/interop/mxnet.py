"""MXNet / Gluon interop.

Reading and writing the MXNet 1.x NDArray list format, the `.params` files written by
Gluon's `save_parameters`, `mx.nd.save` and the symbolic `export`, with numpy alone.

Layout (little-endian), as in MXNet's `src/ndarray/ndarray.cc`:

    uint64 list magic 0x112, uint64 reserved (0)
    uint64 array count, then per array:
        uint32 NDArray magic: 0xF993FAC9 (V2) or 0xF993FACA (V3, numpy-shape semantics)
        int32  storage type (0 dense; 1 row_sparse and 2 csr are rejected)
        int32  ndim, then ndim x int64 dims
        int32  device type, int32 device id (ignored on load, CPU written)
        int32  dtype flag (mshadow: 0 float32, 1 float64, 2 float16, 3 uint8, 4 int32,
               5 int8, 6 int64, 7 bool)
        raw C-order data
    uint64 name count, then per name: uint64 byte length, UTF-8 bytes

Names are returned exactly as stored: `save_parameters` writes structural names
(`features.1.weight`), `mx.nd.save` whatever keys it was given, and old `export`/`save_checkpoint`
files prefix them with `arg:` / `aux:`. Parameter arrays keep MXNet's layouts (convolution
weights OIHW, dense weights (out, in)).
"""
import contextlib
import os
import struct
import uuid

import numpy as np

LIST_MAGIC = 0x112
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA

_DTYPE_FLAGS = {
    0: np.dtype('<f4'),
    1: np.dtype('<f8'),
    2: np.dtype('<f2'),
    3: np.dtype('u1'),
    4: np.dtype('<i4'),
    5: np.dtype('i1'),
    6: np.dtype('<i8'),
    7: np.dtype('?'),
}
_FLAG_OF_KIND = {(dt.kind, dt.itemsize): flag for flag, dt in _DTYPE_FLAGS.items()}
# The other mshadow flags, named in the error: bfloat16 has no numpy dtype, and MXNet 1.x's
# Python side never produces the 16/32/64-bit integer flags beyond int32/int64.
_UNSUPPORTED_FLAGS = {8: 'int16', 9: 'uint16', 10: 'uint32', 11: 'uint64', 12: 'bfloat16'}
_STORAGE_NAMES = {1: 'row_sparse', 2: 'csr'}
_CPU_DEVICE = 1


class ParamsFormatError(ValueError):
    """A `.params` file that is not a valid dense MXNet NDArray list.

    `path` and `offset` (byte position of the offending field) are kept as attributes and
    stated in the message.
    """

    def __init__(self, path, offset, problem):
        self.path = path
        self.offset = offset
        super().__init__(f'{path}: at byte {offset}: {problem}')


class TruncatedParamsError(ParamsFormatError):
    """The file ends inside a header, shape, array or name."""


class BadMagicError(ParamsFormatError):
    """The list magic (0x112) or an NDArray magic (V2/V3) is wrong."""


class SparseParamsError(ParamsFormatError):
    """An array uses sparse (row_sparse / csr) or an unknown storage type."""


class UnknownDTypeError(ParamsFormatError):
    """An array's dtype flag has no numpy equivalent here."""


class NameCountError(ParamsFormatError):
    """The name table does not give exactly one distinct name per array."""


class TrailingBytesError(ParamsFormatError):
    """Bytes follow the name table."""


class _Reader:
    """Cursor over the file's bytes that raises the format errors with positions."""

    def __init__(self, path, data):
        self.path = path
        self.data = memoryview(data)  # slices without copying
        self.pos = 0

    def error(self, cls, problem, offset=None):
        return cls(self.path, self.pos if offset is None else offset, problem)

    def take(self, size, what):
        if size > len(self.data) - self.pos:
            raise self.error(
                TruncatedParamsError,
                f'file ends while reading {what}: needs {size} bytes, '
                f'{len(self.data) - self.pos} left (file is {len(self.data)} bytes)')
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def unpack(self, fmt, what):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def _read_array(reader, index):
    start = reader.pos
    (magic,) = reader.unpack('<I', f'the magic of array #{index}')
    if magic not in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        raise reader.error(
            BadMagicError,
            f'array #{index} has NDArray magic {magic:#x}, expected {NDARRAY_V2_MAGIC:#x} (V2) '
            f'or {NDARRAY_V3_MAGIC:#x} (V3); files from MXNet < 1.0 (V1/legacy) are not '
            'supported', start)
    stype_at = reader.pos
    (stype,) = reader.unpack('<i', f'the storage type of array #{index}')
    if stype != 0:
        kind = _STORAGE_NAMES.get(stype, 'unknown')
        raise reader.error(
            SparseParamsError,
            f'array #{index} has storage type {stype} ({kind}); only dense arrays are supported',
            stype_at)
    shape_at = reader.pos
    (ndim,) = reader.unpack('<i', f'the ndim of array #{index}')
    # V2 (legacy shape semantics) marks an unset array with ndim 0; V3 uses ndim -1 and
    # allows 0-d arrays.
    min_ndim = 1 if magic == NDARRAY_V2_MAGIC else 0
    if ndim < min_ndim:
        raise reader.error(
            ParamsFormatError, f'array #{index} has ndim {ndim}: an uninitialised NDArray',
            shape_at)
    shape = reader.unpack(f'<{ndim}q', f'the shape of array #{index}')
    if any(d < 0 for d in shape):
        raise reader.error(
            ParamsFormatError, f'array #{index} has unknown dimensions in shape {shape}',
            shape_at)
    reader.unpack('<ii', f'the context of array #{index}')
    flag_at = reader.pos
    (flag,) = reader.unpack('<i', f'the dtype flag of array #{index}')
    if flag not in _DTYPE_FLAGS:
        name = _UNSUPPORTED_FLAGS.get(flag, 'not an mshadow type')
        raise reader.error(
            UnknownDTypeError, f'array #{index} has dtype flag {flag} ({name})', flag_at)
    dtype = _DTYPE_FLAGS[flag]
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    raw = reader.take(size, f'the data of array #{index} (shape {shape}, {dtype.name})')
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder('='))


def load_params(path):
    """Read an MXNet `.params` file into `{name: np.ndarray}` in file order.

    Arrays are native-endian copies with MXNet's dtype and layout. Raises a
    `ParamsFormatError` subclass, with the path and byte offset, for a truncated file, a bad
    magic, sparse storage, an unknown dtype flag, a name table that does not name every array
    exactly once, or trailing bytes.
    """
    path = os.fspath(path)
    with open(path, 'rb') as f:
        reader = _Reader(path, f.read())
    magic, _ = reader.unpack('<QQ', 'the list header')
    if magic != LIST_MAGIC:
        raise reader.error(
            BadMagicError, f'list magic is {magic:#x}, expected {LIST_MAGIC:#x}: not an MXNet '
            'NDArray file', 0)
    (count,) = reader.unpack('<Q', 'the array count')
    arrays = [_read_array(reader, i) for i in range(count)]
    names_at = reader.pos
    (name_count,) = reader.unpack('<Q', 'the name count')
    if name_count != count:
        hint = ' (an unnamed list, as mx.nd.save writes for a list)' if name_count == 0 else ''
        raise reader.error(
            NameCountError, f'{name_count} names for {count} arrays{hint}', names_at)
    params = {}
    for i, array in enumerate(arrays):
        name_at = reader.pos
        (length,) = reader.unpack('<Q', f'the length of name #{i}')
        raw = reader.take(length, f'name #{i}')
        try:
            name = bytes(raw).decode('utf-8')
        except UnicodeDecodeError as e:
            raise reader.error(ParamsFormatError, f'name #{i} is not UTF-8: {e}', name_at) from e
        if name in params:
            raise reader.error(NameCountError, f'name {name!r} appears twice', name_at)
        params[name] = array
    if reader.pos != len(reader.data):
        raise reader.error(
            TrailingBytesError,
            f'{len(reader.data) - reader.pos} unexpected bytes after the name table')
    return params


def _checked_array(name, value):
    if not isinstance(name, str):
        raise TypeError(f'parameter names must be str, got {name!r} ({type(name).__name__})')
    if not hasattr(value, 'dtype') or not hasattr(value, 'shape'):
        raise TypeError(f'parameter {name!r} is a {type(value).__name__}, not an array')
    array = np.asarray(value)
    flag = _FLAG_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if flag is None:
        supported = ', '.join(dt.name for dt in _DTYPE_FLAGS.values())
        raise ValueError(
            f'parameter {name!r} has dtype {array.dtype}; MXNet params support {supported}')
    if array.ndim == 0:
        raise ValueError(
            f'parameter {name!r} is 0-d; the V2 NDArray format needs at least one dimension')
    return flag, np.ascontiguousarray(array, dtype=_DTYPE_FLAGS[flag])


def _encode(params):
    """Yield the file's bytes chunk by chunk (array data as uncopied uint8 views)."""
    checked = [(name, *_checked_array(name, value)) for name, value in params.items()]
    yield struct.pack('<QQQ', LIST_MAGIC, 0, len(checked))
    for _, flag, array in checked:
        yield struct.pack(f'<Iii{array.ndim}qiii', NDARRAY_V2_MAGIC, 0, array.ndim,
                          *array.shape, _CPU_DEVICE, 0, flag)
        yield array.reshape(-1).view(np.uint8)
    yield struct.pack('<Q', len(checked))
    for name, _, _ in checked:
        raw = name.encode('utf-8')
        yield struct.pack('<Q', len(raw)) + raw


def save_params(path, params):
    """Write `{name: array}` as an MXNet `.params` file (V2 NDArrays, CPU context).

    The file loads with `mx.nd.load` and, given Gluon's structural names, with
    `Block.load_parameters`. Values must be arrays (numpy or anything exposing `dtype` and
    `shape` and converting with `np.asarray`) of at least one dimension with dtype float32,
    float64, float16, uint8, int32, int8, int64 or bool; they are stored unchanged in file
    order = iteration order of `params`. The write is atomic: the data goes to a temporary
    file in the same directory that replaces `path` only once complete, so an error never
    leaves a partial file. Returns `path`.
    """
    chunks = list(_encode(params))
    target = os.fspath(path)
    tmp = f'{target}.{uuid.uuid4().hex}.tmp'
    f = open(tmp, 'xb')
    try:
        with f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


# --- Gluon parameter names <-> flax variables -------------------------------------------------

def _convention():
    from aff_jax.interop import naming

    # Gluon's BatchNorm(scale=False, center=False) (the CIFAR hosts' input BN) still stores
    # gamma (forced to 1) and beta (never trained, but *added* by the op): both must be 1 / 0.
    return naming.Convention('Gluon .params', norm_scale='gamma', norm_bias='beta',
                             affine_placeholders=True)


def from_params(model, params, inputs=None):
    """Gluon structural names (``save_parameters``) -> flax ``{'params', 'batch_stats'}``.

    ``model`` is an official preset (``create_model('aff_resnet50')``, ...) or a bare fusion
    module; its module tree mirrors the Gluon attribute tree, so ``layer3.0.attention.
    local_att.0.weight`` is the flax path ``layer3/0/attention/local_att/0/kernel``. Strict like
    the PyTorch side: one ``ValueError`` lists missing, unexpected and mis-shaped names. Names
    with the ``arg:``/``aux:`` prefixes of ``export`` files are accepted with the prefix removed.
    Gluon's BatchNorm uses eps 1e-5 and decay 0.9, as the official presets do.
    """
    from aff_jax.interop import naming

    stripped = {}
    for name, value in params.items():
        key = name.split(':', 1)[1] if name.startswith(('arg:', 'aux:')) else name
        if key in stripped:
            raise ValueError(f'parameter {key!r} appears twice (with and without a prefix)')
        stripped[key] = value
    return naming.to_flax(model, stripped, _convention(), inputs)


def to_params(model, variables, inputs=None):
    """Flax variables of ``model`` -> ``{gluon name: np.ndarray}`` for :func:`save_params`
    (and Gluon's ``load_parameters``); placeholders of affine-free BatchNorms are written as
    gamma = 1, beta = 0."""
    from aff_jax.interop import naming

    return naming.from_flax(model, variables, _convention(), inputs)
