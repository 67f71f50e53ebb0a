"""Mapping between flax variables and another framework's flat, dotted weight names.

Every aff-jax module names its children after the source framework's attributes, so a flax
path ``('layer1', '0', 'conv1', 'kernel')`` *is* the key ``layer1.0.conv1.weight`` once the leaf
name and layout are translated. A :class:`Convention` says how a framework names leaves:

=================  =======================  =====================
flax leaf          PyTorch ``state_dict``   Gluon ``.params``
=================  =======================  =====================
conv ``kernel``    ``weight`` (OIHW)        ``weight`` (OIHW)
dense ``kernel``   ``weight`` (out, in)     ``weight`` (out, in)
conv/dense bias    ``bias``                 ``bias``
BN ``scale``       ``weight``               ``gamma``
BN ``bias``        ``bias``                 ``beta``
BN ``mean/var``    ``running_mean/var``     ``running_mean/var``
=================  =======================  =====================

Flax kernels are HWIO; the conversion is a transpose, exact in both directions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aff_jax.models.features import without_head


@dataclasses.dataclass(frozen=True)
class Convention:
    """How one framework names and lays out weights.

    ``counter``: name of an integer BN batch counter kept by the framework (PyTorch's
    ``num_batches_tracked``, int64), or None. ``affine_placeholders``: the framework stores
    ``gamma``/``beta`` (fixed at 1/0) even for a BatchNorm without scale and shift, as Gluon's
    ``BatchNorm(scale=False, center=False)`` does.
    """
    framework: str
    norm_scale: str
    norm_bias: str
    counter: str | None = None
    affine_placeholders: bool = False


@dataclasses.dataclass(frozen=True)
class _Entry:
    collection: str | None  # None: a placeholder with no flax variable
    path: tuple[str, ...]
    shape: tuple[int, ...]  # external shape
    dtype: Any  # flax dtype (or the placeholder's)
    to_external: Callable[[np.ndarray], np.ndarray]
    to_flax: Callable[[np.ndarray], np.ndarray]
    fixed: float | None = None  # a placeholder's required value


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _conv_to_external(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))


def _conv_to_flax(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _dense_transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def _layout(leaf: str, ndim: int) -> tuple[Callable, Callable]:
    if leaf == 'kernel' and ndim == 4:
        return _conv_to_external, _conv_to_flax
    if leaf == 'kernel' and ndim == 2:
        return _dense_transpose, _dense_transpose
    return _identity, _identity


def _external_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == 'kernel' and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == 'kernel' and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def example_inputs(model: nn.Module, external_shapes: Mapping[str, tuple[int, ...]]) -> tuple:
    """Abstract inputs for ``model.init`` that fix every variable shape.

    Hosts take a (1, 64, 64, 3) image (their variable shapes do not depend on the spatial
    size). A bare fusion module's channel count C is read off the weights: it is the largest
    output-channel count of its convolutions (C // r for the bottleneck's first conv, C for
    its second); a scheme without weights (``add``) gets C = 1.
    """
    if hasattr(model, 'num_classes'):
        return (jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),)
    if not hasattr(model, 'num_inputs'):
        raise TypeError(f'cannot derive example inputs for {type(model).__name__}: '
                        f'pass inputs=(...) explicitly')
    conv_out = [shape[0] for shape in external_shapes.values() if len(shape) == 4]
    channels = max(conv_out, default=1)
    return (jax.ShapeDtypeStruct((2, 4, 4, channels), jnp.float32),) * model.num_inputs


def _trace_template(model: nn.Module, inputs: tuple, x64: bool) -> dict[str, Any]:
    with jax.enable_x64(x64):
        variables = jax.eval_shape(lambda *xs: model.init(jax.random.key(0), *xs, train=False),
                                   *inputs)
    return nn.unbox(variables)


_cached_template = functools.lru_cache(maxsize=16)(_trace_template)


def _template(model: nn.Module, inputs: tuple) -> dict[str, Any]:
    """``model``'s abstract variables (read, never modified), their dtypes as 64-bit JAX is on
    or off now. Traced once per model, input shapes and that setting, since converting one
    model's weights needs them several times (both directions, the compare tool's every step);
    a module with an unhashable field is traced every time."""
    x64 = bool(jax.config.jax_enable_x64)
    try:
        hash((model, inputs))
    except TypeError:
        return _trace_template(model, inputs, x64)
    return _cached_template(model, inputs, x64)


def entries(model: nn.Module, convention: Convention, inputs: tuple) -> dict[str, _Entry]:
    """External key -> how it maps onto ``model``'s variables (strictly every one of them)."""
    template = _template(model, inputs)
    norm_paths = {path[:-1] for path in flax.traverse_util.flatten_dict(
        dict(template.get('batch_stats', {})))}
    params = flax.traverse_util.flatten_dict(dict(template.get('params', {})))
    result: dict[str, _Entry] = {}
    for path, leaf in params.items():
        module, name = path[:-1], path[-1]
        if module in norm_paths:
            ext = {'scale': convention.norm_scale, 'bias': convention.norm_bias}[name]
        else:
            ext = {'kernel': 'weight', 'bias': 'bias'}[name]
        to_ext, to_flax = _layout(name, len(leaf.shape))
        result['.'.join(module + (ext,))] = _Entry(
            'params', path, _external_shape(name, leaf.shape), leaf.dtype, to_ext, to_flax)
    stats = flax.traverse_util.flatten_dict(dict(template.get('batch_stats', {})))
    stat_names = {'mean': 'running_mean', 'var': 'running_var'}
    if convention.counter:
        stat_names['num_batches_tracked'] = convention.counter
    for path, leaf in stats.items():
        module, name = path[:-1], path[-1]
        if name not in stat_names:
            raise ValueError(f'{convention.framework} has no equivalent of the BatchNorm '
                             f'statistic {"/".join(path)}')
        result['.'.join(module + (stat_names[name],))] = _Entry(
            'batch_stats', path, tuple(leaf.shape), leaf.dtype, _identity, _identity)
    if convention.affine_placeholders:
        for module in sorted(norm_paths):
            channels = stats[module + ('mean',)].shape
            for ext, name, value in ((convention.norm_scale, 'scale', 1.0),
                                     (convention.norm_bias, 'bias', 0.0)):
                if module + (name,) not in params:
                    result['.'.join(module + (ext,))] = _Entry(
                        None, module + (name,), tuple(channels), jnp.float32, _identity,
                        _identity, fixed=value)
    return result


def as_numpy(value: Any) -> np.ndarray:
    """``value`` as a numpy array; a ``torch.Tensor`` of bfloat16 or float16 becomes float32
    (numpy has no bfloat16, and the flax variables are float32)."""
    if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def capped(items: list[str], limit: int = 10) -> list[str]:
    """The first ``limit`` of ``items``, then one ``'... (and N more)'`` entry for the rest, so
    that an error naming them stays short however many there are."""
    if len(items) <= limit:
        return list(items)
    return list(items[:limit]) + [f'... (and {len(items) - limit} more)']


def key_mismatches(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]],
                   labels: tuple[str, str] = ('expected', 'got'), limit: int | None = 10
                   ) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mis-shaped)`` between two ``key -> shape`` maps, each sorted;
    a mis-shaped entry reads ``'key: expected (..), got (..)'`` (words from ``labels``).

    Each list is :func:`capped` at ``limit`` entries (``None``: complete), ready to go into an
    error message.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(f'{key}: {labels[0]} {tuple(expected[key])}, {labels[1]} {tuple(given[key])}'
                       for key in set(expected) & set(given)
                       if tuple(given[key]) != tuple(expected[key]))
    if limit is None:
        return missing, unexpected, misshaped
    return capped(missing, limit), capped(unexpected, limit), capped(misshaped, limit)


def _listing(items: list[str], kind: str) -> str:
    noun = 'key' if len(items) == 1 else 'keys'
    return f'{kind} {len(items)} {noun}: ' + ', '.join(capped(items))


def _extra_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """The shortest dotted prefix that every unexpected key carries and whose removal turns
    some of them into missing keys (``'encoder.'`` of weights saved from a model wrapping
    this one), or None."""
    if not missing or not unexpected:
        return None
    wanted = set(missing)
    first = unexpected[0].split('.')[:-1]
    for depth in range(1, len(first) + 1):
        prefix = '.'.join(first[:depth]) + '.'
        if not all(key.startswith(prefix) for key in unexpected):
            return None
        if any(key[len(prefix):] in wanted for key in unexpected):
            return prefix
    return None


def check_keys(expected: Mapping[str, _Entry], given: Mapping[str, Any], framework: str) -> None:
    """One single-line ValueError counting the missing, unexpected and mis-shaped keys and
    naming the first ten of each kind (with a hint when the given keys carry an extra prefix),
    or nothing."""
    missing, unexpected, misshaped = key_mismatches(
        {key: entry.shape for key, entry in expected.items()},
        {key: as_numpy(value).shape for key, value in given.items()}, limit=None)
    if not (missing or unexpected or misshaped):
        return
    parts = [_listing(items, kind) for kind, items in (
        ('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if items]
    prefix = _extra_prefix(missing, unexpected)
    if prefix:
        parts.append(f'hint: every unexpected key starts with {prefix!r}, which the model\'s '
                     f'keys lack; remove that prefix from the keys')
    raise ValueError(f'{framework} weights do not match the model: ' + '; '.join(parts))


def to_flax(model: nn.Module, weights: Mapping[str, Any], convention: Convention,
            inputs: tuple | None = None) -> dict[str, Any]:
    """Flat external weights -> flax variables ``{'params', 'batch_stats'}`` (numpy arrays).

    A ``features_only`` host takes a classifier's weights: its head is left out.
    """
    weights = without_head(model, weights)
    shapes = {k: tuple(as_numpy(v).shape) for k, v in weights.items()}
    expected = entries(model, convention, inputs or example_inputs(model, shapes))
    check_keys(expected, weights, convention.framework)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, entry in expected.items():
        value = as_numpy(weights[key])
        integral = np.issubdtype(np.dtype(entry.dtype), np.integer)
        if np.issubdtype(value.dtype, np.integer) != integral:
            raise ValueError(f'{key}: expected {"an integer" if integral else "a floating"} '
                             f'array, got dtype {value.dtype}')
        if entry.collection is None:
            if not np.all(value == entry.fixed):
                raise ValueError(f'{key}: this BatchNorm has no learned '
                                 f'{entry.path[-1]}, so the value must be all {entry.fixed}')
            continue
        flat[(entry.collection,) + entry.path] = entry.to_flax(value).astype(entry.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def from_flax(model: nn.Module, variables: Mapping[str, Any], convention: Convention,
              inputs: tuple | None = None, counter_dtype: Any = np.int64) -> dict[str, np.ndarray]:
    """Flax variables (boxed or not) -> flat external weights, checked against ``model``."""
    variables = nn.unbox(dict(variables))
    flat = flax.traverse_util.flatten_dict(
        {k: dict(v) for k, v in variables.items() if k in ('params', 'batch_stats')})
    given = {path: np.asarray(jax.device_get(value)) for path, value in flat.items()}
    by_path = {(e.collection,) + e.path: (key, e) for key, e in
               entries(model, convention, inputs or _inputs_from_flax(model, given)).items()}
    missing = sorted('/'.join(p) for p in by_path if p[0] is not None and p not in given)
    unexpected = sorted('/'.join(p) for p in given if p not in by_path)
    if missing or unexpected:
        raise ValueError(f'variables do not match the model: missing {missing}, unexpected {unexpected}')
    result = {}
    for path, (key, entry) in by_path.items():
        if entry.collection is None:
            result[key] = np.full(entry.shape, entry.fixed, np.float32)
            continue
        value = entry.to_external(given[path])
        if convention.counter and path[-1] == 'num_batches_tracked':
            value = value.astype(counter_dtype)
        if value.shape != entry.shape:
            raise ValueError(f'{"/".join(path)}: expected shape {entry.shape} once converted, '
                             f'got {value.shape}')
        result[key] = value
    return result


def _inputs_from_flax(model: nn.Module, flat: Mapping[tuple[str, ...], np.ndarray]) -> tuple:
    shapes = {'/'.join(p): _external_shape(p[-1], v.shape) for p, v in flat.items()
              if p[-1] == 'kernel'}
    return example_inputs(model, shapes)
