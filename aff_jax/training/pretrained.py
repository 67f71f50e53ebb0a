"""Starting a run from converted weights (``config.init_from``): fine-tuning.

The checkpoint is an Orbax checkpoint of ``{'params', 'batch_stats'}`` as written by
``python -m aff_jax.interop.convert`` (from an official MXNet or a PyTorch-port checkpoint).
Parameters and BatchNorm statistics replace the fresh initialisation; the step and the
optimizer state stay fresh. Variables whose path starts with a prefix in ``skip`` keep their
fresh values (a new classifier head: ``fc`` for ResNet hosts, ``output`` for the others).
A segmentation model takes a classifier's checkpoint into its backbone (``into``), leaving out
the classifier's head (``drop``); its decoder starts fresh.
"""
from __future__ import annotations

import os
from typing import Sequence

import flax
import jax
import numpy as np

from aff_jax.interop.convert import load_variables
from aff_jax.interop.naming import key_mismatches
from aff_jax.training.errors import ConfigError


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == prefix or key.startswith(prefix + '/') for prefix in prefixes)


def apply_pretrained(state, path: str, skip: Sequence[str], shardings,
                     into: Sequence[str] = (), drop: Sequence[str] = ()):
    """``state`` with its params and batch_stats taken from the checkpoint at ``path``.

    ``into``: the path (module names) in the run's variables where the checkpoint's tree
    goes, the root by default; variables outside it keep their fresh values. ``drop``:
    prefixes of the checkpoint's own paths that are left out (a classifier's head).
    Strict: every variable under ``into`` and not under ``skip`` must be in the checkpoint with
    the same shape, and the checkpoint may hold nothing else outside ``skip`` and ``drop``; one
    ``ConfigError`` names every missing, unexpected and mis-shaped variable.
    """
    if not os.path.isdir(path):
        raise ConfigError(f'config.init_from: no checkpoint directory {path}')
    loaded = load_variables(path)
    base = '/'.join(into)

    def target(key: str) -> str | None:
        """The run's key for a checkpoint key, None for a dropped one."""
        if _under(key, drop):
            return None
        return f'{base}/{key}' if base else key

    def kept(key: str) -> bool:
        return (not base or _under(key, (base,))) and not _under(key, skip)

    replaced = {}
    for collection in ('params', 'batch_stats'):
        ours = flax.traverse_util.flatten_dict(getattr(state, collection), sep='/')
        theirs = {target(k): v for k, v in flax.traverse_util.flatten_dict(
            dict(loaded.get(collection, {})), sep='/').items() if target(k) is not None}
        missing, unexpected, misshaped = key_mismatches(
            {k: v.shape for k, v in ours.items() if kept(k)},
            {k: np.shape(v) for k, v in theirs.items() if not _under(k, skip)},
            labels=('run', 'checkpoint'))
        if missing or unexpected or misshaped:
            raise ConfigError(
                f'config.init_from {path}: {collection} do not match the model '
                f'(missing {missing}, unexpected {unexpected}, mis-shaped {misshaped}); '
                f'list new layers in config.init_skip')
        sharding = flax.traverse_util.flatten_dict(getattr(shardings, collection), sep='/')
        merged = {k: (jax.device_put(np.asarray(theirs[k], ours[k].dtype), sharding[k])
                      if kept(k) else ours[k]) for k in ours}
        replaced[collection] = flax.traverse_util.unflatten_dict(merged, sep='/')
    return state.replace(**replaced)
