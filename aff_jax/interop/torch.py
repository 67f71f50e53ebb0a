"""PyTorch ``state_dict`` <-> flax variables, for every aff-jax model and bare fusion module.

The keys are the PyTorch port's (``aff_pytorch/aff_net``): its modules and ours share the
attribute tree, so the mapping is by name (see :mod:`aff_jax.interop.naming`). PyTorch is not
needed: values may be ``torch.Tensor`` or ``np.ndarray``.

BatchNorm: PyTorch's eps 1e-5 and momentum 0.1 equal the hosts' defaults (eps 1e-5, decay
0.9); ``num_batches_tracked`` is kept in ``batch_stats`` by the ``tv_*`` hosts' BatchNorm
(``stats_rule='torch'``), so a round trip is exact.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from aff_jax.interop import naming

CONVENTION = naming.Convention('PyTorch state_dict', norm_scale='weight', norm_bias='bias',
                               counter='num_batches_tracked')


# Keys under which training scripts commonly nest the state_dict in a checkpoint dict, in the
# order they are tried ('state_dict' before an EMA copy such as timm's 'state_dict_ema').
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model', 'net')
# Prefixes that wrapping a module adds to every key: nn.DataParallel and
# DistributedDataParallel ('module.'), torch.compile ('_orig_mod.').
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
# torch.load's first bytes: a zip archive (torch >= 1.6) or a pickle (the legacy format).
_ZIP_MAGIC, _PICKLE_MAGIC = b'PK\x03\x04', b'\x80'


def from_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                    inputs: tuple | None = None) -> dict[str, Any]:
    """``state_dict`` -> ``{'params': ..., 'batch_stats': ...}`` (numpy arrays) for ``model``,
    in the dtypes of ``model``'s variables.

    Values are ``torch.Tensor`` (bfloat16 and float16 are widened to float32) or
    ``np.ndarray``. The wrappers :func:`load_state_dict_file` unwraps are unwrapped here too: a
    checkpoint dict holding the state_dict under a :data:`WRAPPER_KEYS` key (what
    ``torch.load`` returns for ``torch.save({'state_dict': ...})``), and a prefix from
    :data:`WRAPPER_PREFIXES` (``module.`` of DataParallel/DDP, ``_orig_mod.`` of torch.compile)
    when every key carries it; a dict holding no state_dict is a ``ValueError`` saying what it
    holds.
    Strict: every key is used once and every shape checked; any mismatch raises one
    ``ValueError`` counting the missing, unexpected and mis-shaped keys and naming the first
    ten of each. ``inputs``: abstract inputs for ``model.init`` when they cannot be derived
    (see ``naming.example_inputs``).
    """
    # A module without variables (``add``) has an empty state_dict.
    found = state_dict if not state_dict else _find_state_dict(
        state_dict, 'the dict given to from_state_dict')
    return naming.to_flax(model, _without_wrapper_prefixes(found), CONVENTION, inputs)


def to_state_dict(model: nn.Module, variables: Mapping[str, Any],
                  inputs: tuple | None = None) -> dict[str, np.ndarray]:
    """Flax variables of ``model`` -> a ``state_dict`` of numpy arrays (OIHW conv weights,
    (out, in) linear weights, int64 ``num_batches_tracked``); load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``."""
    return naming.from_flax(model, variables, CONVENTION, inputs)


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """The state_dict in a PyTorch checkpoint or an ``.npz`` of named arrays, as numpy arrays.

    Accepted PyTorch checkpoints (``torch.save``, either format), read with
    ``weights_only=True`` (nothing but tensors and containers is unpickled):

    * a state_dict (a dict of tensors), or a dict holding one under a key of
      :data:`WRAPPER_KEYS` (``state_dict``, ``model_state_dict``, ``model``, ``net``), at most
      two levels down (``{'model': {'state_dict': ...}}``); the other entries (``epoch``,
      ``optimizer``, ...) are ignored;
    * keys with a :data:`WRAPPER_PREFIXES` prefix on every one (``module.``, ``_orig_mod.``),
      which is removed;
    * bfloat16 and float16 tensors, returned as float32; integer tensors keep their dtype
      (``num_batches_tracked``: int64).

    Raises ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the
    path and the reason for a file that cannot be read or holds no state_dict.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file')
    if path.endswith('.npz'):
        return _read_npz(path)
    found = _find_state_dict(_torch_load(path), path)
    return _without_wrapper_prefixes({key: naming.as_numpy(value) for key, value in found.items()})


def _without_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state_dict`` without the :data:`WRAPPER_PREFIXES` that every key carries (stacked
    wrappers add several, e.g. ``module._orig_mod.``)."""
    while state_dict:
        prefix = next((p for p in WRAPPER_PREFIXES
                       if all(isinstance(k, str) and k.startswith(p) for k in state_dict)), None)
        if prefix is None:
            break
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f'{path}: not a readable .npz archive ({_reason(err)})') from None


def _torch_load(path: str) -> Any:
    """``torch.load(path)`` with ``weights_only=True``; a one-line ValueError when it fails."""
    try:
        import torch
    except ImportError:
        raise ImportError(f'{path}: reading a PyTorch checkpoint needs torch '
                          f'(pip install aff-jax[torch]), or save the arrays as .npz') from None
    header = _header(path)
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r'GLOBAL ([\w.]+)', str(err))
        if not blocked:
            raise _unreadable(path, header, err) from None
        raise ValueError(f'{path}: holds a pickled {blocked[1]}, which is not loaded because '
                         f'unpickling objects can run code; save a dict of tensors '
                         f'(model.state_dict()) instead') from None
    # A damaged file surfaces as whatever torch's reader trips over (EOFError, KeyError,
    # OSError EINVAL, RuntimeError, ...), so every failure is reported the same way.
    except Exception as err:
        raise _unreadable(path, header, err) from None


def _header(path: str) -> bytes:
    """The first bytes of ``path``; a ValueError for damage visible before torch reads it."""
    try:
        with open(path, 'rb') as f:
            header = f.read(16)
    except OSError as err:
        raise ValueError(f'{path}: cannot read ({err.strerror or _reason(err)})') from None
    if not header:
        raise ValueError(f'{path}: not a readable PyTorch checkpoint (empty file, 0 bytes)')
    if header.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise ValueError(f'{path}: not a readable PyTorch checkpoint (truncated or damaged: '
                         f'its zip archive has no central directory)')
    return header


def _unreadable(path: str, header: bytes, err: BaseException) -> ValueError:
    if header.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        reason = f'truncated or damaged: {_reason(err)}'
    else:
        reason = f'not a torch.save file: it starts with {header!r}'
    return ValueError(f'{path}: not a readable PyTorch checkpoint ({reason})')


def _reason(err: BaseException, limit: int = 160) -> str:
    """``err``'s type and the first line of its message, shortened to ``limit`` characters."""
    lines = str(err).strip().splitlines()
    text = f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors (or arrays)."""
    return (isinstance(obj, Mapping) and bool(obj)
            and all(isinstance(k, str) and hasattr(v, 'shape') for k, v in obj.items()))


def _find_state_dict(obj: Any, source: str) -> Mapping[str, Any]:
    """The state_dict in ``obj`` (what ``torch.load`` returned, or a mapping given in memory):
    ``obj`` itself or the value under a :data:`WRAPPER_KEYS` key, up to two levels down.
    ``source`` names ``obj`` in the error."""
    found = obj
    for _ in range(3):  # the top level, then two wrappers
        if _is_state_dict(found):
            return found
        if not isinstance(found, Mapping):
            break
        found = next((found[k] for k in WRAPPER_KEYS if isinstance(found.get(k), Mapping)),
                     None)
    raise ValueError(f'{source}: holds no state_dict (a dict of tensors, at the top or under '
                     f'{"/".join(WRAPPER_KEYS)}); it holds {_describe(obj)}')


def _describe(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return f'a {type(obj).__name__}'
    if not obj:
        return 'an empty dict'
    return 'a dict with keys ' + ', '.join(naming.capped([str(k) for k in obj]))


def port_fusion(state_dict: Mapping[str, Any]) -> str:
    """The port's fusion a checkpoint was saved with, read off its keys."""
    if any('.fuse_mode.local_att2.' in key for key in state_dict):
        return 'iaff'
    if any('.fuse_mode.local_att.' in key for key in state_dict):
        return 'aff'
    return 'add'
