"""Backbone features: what every classification host returns with ``features_only=True``.

A host computes its stages once; the classifier pools the last stage's output into its head,
a ``features_only`` host returns the stage outputs instead (one NHWC map per stage, finest
first, ``out_indices`` picking some). The features model builds every stage and no head, so its
variables are the classifier's minus the head (``FeatureHost.head``): a converted classifier
checkpoint loads into it once the head's keys are left out (:func:`without_head`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from aff_jax import precision
from aff_jax.layers import dense, global_avg_pool

# The probe input of feature_info: divisible by every host's total stride (at most 32), so
# each reduction is an exact ratio.
_PROBE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
    """One output of a features model: its ``channels``, its ``reduction`` (input size over
    map size) and the dotted ``module`` path (the source framework's name) it comes from."""
    channels: int
    reduction: int
    module: str


def check_out_indices(out_indices: Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """The stage indices to return: all by default; each in ``[0, num_stages)``, increasing."""
    if out_indices is None:
        return tuple(range(num_stages))
    indices = tuple(out_indices)
    if (not indices or any(not isinstance(i, int) or not 0 <= i < num_stages for i in indices)
            or list(indices) != sorted(set(indices))):
        raise ValueError(f'out_indices must be increasing stage indices in [0, {num_stages}), '
                         f'got {out_indices!r}')
    return indices


def head_or_features(host: Any, stages: Sequence[jax.Array]) -> Any:
    """What a host returns from its stage outputs ``stages`` (finest first): the selected maps
    when ``host.features_only``, else ``(N, num_classes)`` logits (at least float32) of the
    global average pool of the last one through the dense head ``host.head``. Call it from the
    host's compact ``__call__`` so that the head belongs to the host."""
    if host.features_only:
        return tuple(stages[i] for i in check_out_indices(host.out_indices, len(stages)))
    pooled = global_avg_pool(stages[-1], keepdims=False)
    return dense(host.num_classes, dtype=host.dtype, param_dtype=host.param_dtype,
                 name=host.head)(pooled).astype(precision.at_least_float32(host.dtype))


def feature_info(model: Any) -> list[FeatureInfo]:
    """Channels, reduction and module of each output of the features model ``model``
    (a host built with ``features_only=True``), from its shapes alone (nothing is run)."""
    if not getattr(model, 'features_only', False):
        raise ValueError(f'{type(model).__name__} was not built with features_only=True')
    image = jnp.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
    maps = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0], image)
    modules = model.feature_modules()
    indices = check_out_indices(model.out_indices, len(modules))
    return [FeatureInfo(int(m.shape[-1]), _PROBE_SIZE // int(m.shape[1]), modules[i])
            for i, m in zip(indices, maps)]


def without_head(model: Any, weights: Mapping[str, Any]) -> dict[str, Any]:
    """Flat dotted weights (``state_dict`` keys, Gluon names) without those of ``model``'s
    classifier head when ``model`` is a features model; unchanged otherwise."""
    if not getattr(model, 'features_only', False):
        return dict(weights)
    prefix = model.head + '.'
    return {key: value for key, value in weights.items() if not key.startswith(prefix)}
