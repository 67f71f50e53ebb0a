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
