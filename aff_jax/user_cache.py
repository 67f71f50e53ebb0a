"""Where aff-jax keeps what it can recompute: ``$XDG_CACHE_HOME/aff_jax`` (default
``~/.cache/aff_jax``): folder-check verdicts, compiled XLA programs."""
from __future__ import annotations

import os
import pathlib


def user_cache_dir(*parts: str) -> pathlib.Path:
    """``$XDG_CACHE_HOME/aff_jax/<parts>`` (not created)."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return pathlib.Path(base, 'aff_jax', *parts)
