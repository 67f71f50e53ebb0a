"""JAX's persistent compilation cache, so that a second run of a config compiles nothing.

``config.compilation_cache``: ``'auto'`` (default) uses the directory JAX already has (from
``JAX_COMPILATION_CACHE_DIR``) or else ``$XDG_CACHE_HOME/aff_jax/xla``; a path uses that; ``'off'``,
``''`` or None turns it off. Every program is cached, however fast it compiled: a run starts with
dozens of small ones (initialisation, sharding, metrics) whose compile times add up.
"""
from __future__ import annotations

import pathlib

import jax

from aff_jax.user_cache import user_cache_dir

AUTO = 'auto'
# 'off' is what people type; as a path it would silently cache into ./off.
OFF = ('off', '')


def enable(setting: str | None) -> pathlib.Path | None:
    """Point JAX at the cache ``setting`` names (before anything is compiled); its directory,
    or None when off."""
    if setting is None or setting in OFF:
        return None
    if setting == AUTO:
        path = pathlib.Path(jax.config.jax_compilation_cache_dir or user_cache_dir('xla'))
    else:
        path = pathlib.Path(setting).expanduser()
    jax.config.update('jax_compilation_cache_dir', str(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    return path
