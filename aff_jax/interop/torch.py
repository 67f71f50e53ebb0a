"""PyTorch ``state_dict`` <-> flax variables, for every aff-jax model and bare fusion module.

The keys are the PyTorch port's (``aff_pytorch/aff_net``): its modules and ours share the
attribute tree, so the mapping is by name (see :mod:`aff_jax.interop.naming`). PyTorch is not
needed: values may be ``torch.Tensor`` or ``np.ndarray``.

BatchNorm: PyTorch's eps 1e-5 and momentum 0.1 equal the hosts' defaults (eps 1e-5, decay
0.9); ``num_batches_tracked`` is kept in ``batch_stats`` by the ``tv_*`` hosts' BatchNorm
(``stats_rule='torch'``), so a round trip is exact.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from aff_jax.interop import naming

CONVENTION = naming.Convention('PyTorch state_dict', norm_scale='weight', norm_bias='bias',
                               counter='num_batches_tracked')


def from_state_dict(model: nn.Module, state_dict: Mapping[str, Any],
                    inputs: tuple | None = None) -> dict[str, Any]:
    """``state_dict`` -> ``{'params': ..., 'batch_stats': ...}`` (numpy arrays) for ``model``.

    Strict: every key is used once and every shape checked; any mismatch raises one
    ``ValueError`` listing the missing, unexpected and mis-shaped keys. ``inputs``: abstract
    inputs for ``model.init`` when they cannot be derived (see ``naming.example_inputs``).
    """
    return naming.to_flax(model, state_dict, CONVENTION, inputs)


def to_state_dict(model: nn.Module, variables: Mapping[str, Any],
                  inputs: tuple | None = None) -> dict[str, np.ndarray]:
    """Flax variables of ``model`` -> a ``state_dict`` of numpy arrays (OIHW conv weights,
    (out, in) linear weights, int64 ``num_batches_tracked``); load it with
    ``module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})``."""
    return naming.from_flax(model, variables, CONVENTION, inputs)


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
    """A PyTorch checkpoint (``torch.save`` of a state_dict, or of a dict holding one under
    ``'state_dict'``) or an ``.npz`` of named arrays."""
    if path.endswith('.npz'):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    import torch

    obj = torch.load(path, map_location='cpu', weights_only=True)
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise ValueError(f'{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}')
    return {k: v.numpy() for k, v in obj.items()}


def port_fusion(state_dict: Mapping[str, Any]) -> str:
    """The port's fusion a checkpoint was saved with, read off its keys."""
    if any('.fuse_mode.local_att2.' in key for key in state_dict):
        return 'iaff'
    if any('.fuse_mode.local_att.' in key for key in state_dict):
        return 'aff'
    return 'add'
