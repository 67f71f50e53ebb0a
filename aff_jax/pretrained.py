"""Weights to a model in one call: ``model, variables = aff_jax.load_pretrained(name, path)``.

The format is read off what ``path`` holds, not its extension: a directory is an Orbax
checkpoint of ``{'params', 'batch_stats'}`` (``python -m aff_jax.interop.convert``'s output; a
trainer checkpoint's ``checkpoints/N/state`` too), a file starting with MXNet's NDArray-list
magic a Gluon ``.params``, one starting as ``torch.save`` files do (a zip archive, or a pickle
for the legacy format) a PyTorch checkpoint. The preset fixes the architecture; its class count
is read off the weights' classifier, and a ``tv_*`` preset's fusion (add, AFF or iAFF) off its
keys, unless given. Loading is strict: one ``ValueError`` names the missing, unexpected and
mis-shaped keys.
"""
from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Iterator, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aff_jax.interop import mxnet as aff_mx
from aff_jax.interop import naming
from aff_jax.interop import torch as aff_torch
from aff_jax.models import registry
from aff_jax.models.tv_resnet import TVResNet

# The classifier's module: 'fc' in the ImageNet and tv_* hosts, 'output' in the CIFAR hosts.
_HEADS = ('fc', 'output')
_MXNET_MAGIC = struct.pack('<Q', aff_mx.LIST_MAGIC)
# torch.save's first bytes: a zip archive (torch >= 1.6) or a pickle's protocol opcode (legacy).
_TORCH_MAGICS = (b'PK\x03\x04', b'\x80')


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A preset with its weights; unpacks as ``model, variables``.

    ``model``: the flax module. ``variables``: ``{'params', 'batch_stats'}`` of numpy arrays for
    ``model.apply(variables, x, train=False)``. ``preprocessing``: the preset's
    ``aff_jax.models.Preprocessing``, how its checkpoints expect their input.
    """
    model: nn.Module
    variables: dict[str, Any]
    preprocessing: registry.Preprocessing

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.variables))

    def preprocess(self, images: Any) -> jax.Array:
        """(N, H, W, 3) RGB pixels in 0-255 -> the model's input, float32
        ``(images / pixel_scale - mean) / std``. Resizing and cropping to
        ``preprocessing.input_size`` (shorter side to ``input_size / crop_pct``, centre crop)
        are the caller's."""
        pre = self.preprocessing
        images = jnp.asarray(images, jnp.float32) / pre.pixel_scale
        return (images - jnp.asarray(pre.mean)) / jnp.asarray(pre.std)


def load_pretrained(name: str, path: str | os.PathLike, **overrides: Any) -> Pretrained:
    """``create_model(name, **overrides)`` with the weights at ``path`` (see the module doc).

    ``overrides``: any ``create_model`` keyword (``num_classes`` and, for ``tv_*``, ``fusion``
    default to what the weights hold). Raises ``FileNotFoundError`` for a missing path and a
    one-line ``ValueError`` for a file of another kind, a damaged one, or weights that do not
    fit the model.
    """
    if registry.is_segmentation(name):
        raise ValueError(f'load_pretrained takes a classification preset; {name!r} is a '
                         f'segmentation model')
    preset = registry.preset(name)
    path = os.fspath(path)
    kind = _format(path)
    if kind == 'orbax':
        variables = _read_orbax(path)
        # Keyed like the other formats, 'fc.kernel', so that the head and fusion read alike.
        shapes = {'.'.join(k): np.shape(v) for k, v in
                  flax.traverse_util.flatten_dict(dict(variables['params'])).items()}
        classes = _num_classes(shapes, 'kernel', axis=1)
    else:
        weights = (aff_mx.load_params(path) if kind == 'mxnet'
                   else aff_torch.load_state_dict_file(path))
        # Without the 'arg:' / 'aux:' prefixes of Gluon's exported files (from_params drops them).
        shapes = {k.split(':', 1)[-1]: np.shape(v) for k, v in weights.items()}
        classes = _num_classes(shapes, 'weight', axis=0)
    overrides.setdefault('num_classes', classes)
    if preset.host is TVResNet:
        overrides.setdefault('fusion', aff_torch.port_fusion(shapes))
    model = registry.create_model(name, **overrides)
    if kind == 'orbax':
        _check_variables(model, variables, path)
    elif kind == 'mxnet':
        variables = aff_mx.from_params(model, weights)
    else:
        variables = aff_torch.from_state_dict(model, weights)
    return Pretrained(model, variables, preset.preprocessing)


def _format(path: str) -> str:
    """``'orbax'``, ``'mxnet'`` or ``'torch'`` by what ``path`` holds."""
    if os.path.isdir(path):
        return 'orbax'
    try:
        with open(path, 'rb') as f:
            header = f.read(8)
    except FileNotFoundError:
        raise FileNotFoundError(f'{path}: no such file or directory') from None
    except OSError as e:
        raise ValueError(f'{path}: cannot read ({e.strerror or e})') from None
    if header == _MXNET_MAGIC:
        return 'mxnet'
    if header.startswith(_TORCH_MAGICS):
        return 'torch'
    found = f'it starts with {header!r}' if header else 'it is empty'
    raise ValueError(f'{path}: not a weights file ({found}); expected a PyTorch checkpoint '
                     f'(torch.save), an MXNet .params file or an Orbax checkpoint directory')


def _read_orbax(path: str) -> dict[str, Any]:
    # Imported here: `python -m aff_jax.interop.convert` imports aff_jax first, and runpy warns
    # when the module it is about to run as __main__ was imported already.
    from aff_jax.interop.convert import load_variables

    try:
        restored = load_variables(path)
    except FileNotFoundError as e:
        raise ValueError(f'{path}: a directory but not an Orbax checkpoint ({e})') from None
    if not isinstance(restored, dict) or 'params' not in restored:
        raise ValueError(f'{path}: the Orbax checkpoint holds no params (it holds '
                         f'{sorted(restored) if isinstance(restored, dict) else type(restored)})')
    # Orbax restores device arrays; the other formats give numpy arrays, so this one does too.
    return jax.tree.map(np.asarray, {'params': restored['params'],
                                     'batch_stats': restored.get('batch_stats', {})})


def _num_classes(shapes: Mapping[str, tuple[int, ...]], leaf: str, axis: int) -> int | None:
    """The classifier's output count: ``axis`` of its ``leaf`` weight, None without one."""
    return next((shapes[f'{head}.{leaf}'][axis] for head in _HEADS
                 if f'{head}.{leaf}' in shapes), None)


def _check_variables(model: nn.Module, variables: Mapping[str, Any], path: str) -> None:
    """One ValueError naming every missing, unexpected and mis-shaped variable, or nothing."""
    template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                              *naming.example_inputs(model, {}))

    def flat(tree) -> dict[str, tuple[int, ...]]:
        return {f'{collection}/' + '/'.join(k): tuple(np.shape(v))
                for collection in ('params', 'batch_stats')
                for k, v in flax.traverse_util.flatten_dict(
                    dict(nn.unbox(tree).get(collection, {}))).items()}

    missing, unexpected, misshaped = naming.key_mismatches(
        flat(template), flat(variables), labels=('model', 'checkpoint'), limit=None)
    problems = [f'{kind} {len(keys)} {"key" if len(keys) == 1 else "keys"}: '
                f'{", ".join(naming.capped(keys))}'
                for kind, keys in (('missing', missing), ('unexpected', unexpected),
                                   ('mis-shaped', misshaped)) if keys]
    if problems:
        raise ValueError(f'{path}: Orbax variables do not match the model: '
                         + '; '.join(problems))
