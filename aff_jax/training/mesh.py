"""The device mesh ``('data', 'model')`` and the shardings of batches and parameters.

The batch is split along ``data``. Parameters carry logical axis names
(``nn.with_logical_partitioning``); ``logical_axis_rules`` map them onto mesh axes, and any
logical name without a rule stays replicated.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from aff_jax.training.errors import ConfigError

MESH_AXES = ('data', 'model')


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    """``(data, model)`` with a ``-1`` replaced by all remaining devices.

    A mesh may use fewer devices than exist (``(1, 1)`` runs on the first device) but its size
    must divide ``num_devices``.
    """
    shape = tuple(mesh_shape)
    if len(shape) != 2 or not all(isinstance(n, int) and (n == -1 or n >= 1) for n in shape):
        raise ConfigError(f'config.mesh_shape must be two positive ints (data, model), one of them '
                          f'may be -1 for all remaining devices; got {mesh_shape!r}')
    if shape.count(-1) == 2:
        raise ConfigError(f'config.mesh_shape: at most one axis may be -1, got {mesh_shape!r}')
    known = int(np.prod([n for n in shape if n != -1]))
    if num_devices % known:
        raise ConfigError(f'config.mesh_shape {mesh_shape!r} does not divide the {num_devices} '
                          f'available devices')
    return tuple(num_devices // known if n == -1 else n for n in shape)


def make_mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``('data', 'model')`` mesh with Auto axes over the first ``data * model`` devices.

    A multi-process job must use every device: each process feeds its own devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, model = resolve_mesh_shape(mesh_shape, len(devices))
    if jax.process_count() > 1 and data * model != len(devices):
        raise ConfigError(f'config.mesh_shape {mesh_shape!r} uses {data * model} of '
                          f'{len(devices)} devices; a multi-process job must use all of them')
    return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:data * model])


def check_batch_size(batch_size: int, mesh: Mesh, key: str = 'batch_size') -> None:
    """Raise unless the global batch splits evenly over the ``data`` axis."""
    data = mesh.shape['data']
    if batch_size < 1 or batch_size % data:
        raise ConfigError(f'config.{key}={batch_size} is not divisible by the mesh data axis '
                          f'({data}); choose a multiple of {data} or another config.mesh_shape')


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension on ``data``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_rules(rules: Sequence[Sequence[Any]]) -> list[tuple[str, str | None]]:
    """Validate ``config.logical_axis_rules``: pairs ``(logical name, 'data'|'model'|None)``."""
    checked = []
    for rule in rules:
        if (len(rule) != 2 or not isinstance(rule[0], str)
                or rule[1] not in (*MESH_AXES, None)):
            raise ConfigError(f'config.logical_axis_rules: each rule is (logical_name, mesh_axis) '
                              f'with mesh_axis one of {MESH_AXES} or None; got {tuple(rule)!r}')
        checked.append((rule[0], rule[1]))
    return checked


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]) -> Any:
    """NamedShardings for a tree of ``nn.LogicallyPartitioned`` (abstract) parameters.

    Raises ``ConfigError`` naming the parameter when a sharded dimension does not divide by
    its mesh axis, rather than letting XLA fail later with a less specific message.
    """
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_params), mesh, rules)

    def check(path, value, sharding):
        for dim, axis in zip(value.shape, sharding.spec):
            if axis is not None and dim % mesh.shape[axis]:
                raise ConfigError(
                    f'config.logical_axis_rules put dimension {dim} of parameter '
                    f'{jax.tree_util.keystr(path)} {tuple(value.shape)} on mesh axis {axis!r} of '
                    f'size {mesh.shape[axis]}, which does not divide it')

    jax.tree_util.tree_map_with_path(check, nn.meta.unbox(boxed_params), shardings)
    return shardings


def process_batch_split(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """Which part of a global batch this process loads: ``(shard_index, shard_count)``.

    The process's devices hold one contiguous block of the batch; the block has size
    ``global_batch // shard_count`` and is block number ``shard_index``. Processes whose devices
    differ only along ``model`` load the same block.
    """
    slices = sharding.addressable_devices_indices_map((global_batch,)).values()
    starts = [s[0].start or 0 for s in slices]
    stops = [global_batch if s[0].stop is None else s[0].stop for s in slices]
    start, stop = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops):
        covered.update(range(a, b))
    if covered != set(range(start, stop)) or global_batch % (stop - start):
        raise ConfigError(f'config.mesh_shape: the devices of process {jax.process_index()} do '
                          f'not hold one contiguous block of the batch')
    return start // (stop - start), global_batch // (stop - start)
