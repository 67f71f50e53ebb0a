"""Checking keyword options against a flax module's dataclass fields before it is built.

Options come from config files and command lines (``--config.model_overrides.deep_stem=yes``),
where a misspelt name or a value of the wrong type would otherwise be taken silently: a
string ``'false'`` is truthy, a float ``r`` builds fractional widths. :func:`check_fields`
rejects both, naming the option, its value and the type its field declares.
"""
from __future__ import annotations

import collections.abc
import numbers
import types
import typing
from typing import Any, Iterable, Mapping

import flax.linen as nn
import numpy as np


def field_names(cls: type[nn.Module], reserved: Iterable[str] = ()) -> set[str]:
    """The dataclass fields of ``cls`` a caller may set: all but flax's ``parent`` and
    ``reserved`` (fields the caller fills itself)."""
    return set(cls.__dataclass_fields__) - {'parent', *reserved}


def check_fields(cls: type[nn.Module], options: Mapping[str, Any], owner: str,
                 reserved: Iterable[str] = (), extra: Iterable[str] = ()) -> None:
    """Raise a TypeError if ``options`` names a field ``cls`` lacks (or one of ``reserved``),
    or gives a field a value its annotation rules out.

    ``owner`` starts the message (e.g. ``"model 'cifar_aff_resnet32'"``); ``extra`` are the
    option names the caller handles itself, listed among the valid ones. Annotations this
    check cannot decide (``Any``, dtypes, protocols) accept any value.
    """
    names = field_names(cls, reserved)
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f'{owner} has no option(s) {unknown}; it takes '
                        f'{sorted(names | set(extra))}')
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        check_value(value, hints.get(key, Any), owner, key)


def check_value(value: Any, hint: Any, owner: str, key: str) -> None:
    """Raise a TypeError naming ``owner``'s option ``key`` if ``value`` does not fit the
    annotation ``hint`` (``int``, ``Sequence[int]``, ``Literal[...]``, unions, ...)."""
    if not _matches(value, hint):
        raise TypeError(f'{owner}: option {key}={value!r} ({type(value).__name__}) must be '
                        f'{_describe(hint)}')


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return Any in args or any(_matches(value, arg) for arg in args)
    if origin is typing.Literal:
        return any(type(value) is type(arg) and value == arg for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            return False
        item = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_matches, value, args))
        return all(_matches(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        # ml_collections' ConfigDict, which configs hand over, is not a registered Mapping.
        return isinstance(value, collections.abc.Mapping) or callable(getattr(value, 'items', None))
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if isinstance(hint, type) and origin is None and not getattr(hint, '_is_protocol', False):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return repr(hint).replace('typing.', '')

