"""glibc's malloc settings for XLA:CPU runs: keep freed memory mapped for the next step.

XLA:CPU allocates a compiled program's temporaries afresh on every call (about 2.2 GB for a
``cifar_aff_resnet32`` train step at batch 32), from whichever of its threads runs it. glibc
serves blocks that large with ``mmap`` (a thread's own arena cannot hold them) and unmaps them
on ``free``, so every step faults the whole buffer back in page by page: ~550,000 page faults
per step there, a fifth of the step on 2 cores (BENCHMARKS.md). With one arena, no ``mmap``
and no trimming, a freed buffer stays mapped and the next step reuses it: 0 faults per step in
most runs (a third of them in some, where the heap grew past a freed block).

What it costs: the process keeps its peak heap (which the next step needs again) and every
thread allocates from one arena, which makes XLA's multi-threaded compilation about 10%
slower (seconds, once per program; nothing with a warm compilation cache). Hence ``'auto'``:
only where JAX can use nothing but the CPU, and only when the user has not tuned malloc
through the environment.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

AUTO, ON, OFF = 'auto', 'on', 'off'
SETTINGS = (AUTO, ON, OFF)
# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Variables through which glibc takes malloc settings at start-up; 'auto' leaves those alone.
USER_TUNING = ('GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_',
               'MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_')


def retain_freed_memory(setting: str = AUTO) -> bool:
    """Set glibc's malloc to keep freed memory (one arena, no ``mmap``, never trim) when
    ``setting`` is ``'on'``, or when it is ``'auto'``, JAX can only run on the CPU
    (``cpu_only``) and no variable of ``USER_TUNING`` is set; ``'off'`` changes nothing.
    Returns whether it did (False where the C library is not glibc).

    Call it before JAX starts its backend: a thread picks its arena at its first allocation,
    and XLA's worker threads are started with the backend; later, it only covers the threads
    that have not allocated yet.
    """
    if setting not in SETTINGS:
        raise ValueError(f'retain_freed_memory must be one of {SETTINGS}, got {setting!r}')
    if setting == OFF:
        return False
    if setting == AUTO and (any(name in os.environ for name in USER_TUNING) or not cpu_only()):
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    # -1 as the trim threshold is SIZE_MAX in glibc: never give the heap's top back.
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def cpu_only() -> bool:
    """Whether JAX will run on the CPU alone: ``JAX_PLATFORMS=cpu``, or no accelerator
    backend is installed (a PJRT plugin under ``jax_plugins``, or ``libtpu``). Decided
    without starting a backend."""
    platforms = os.environ.get('JAX_PLATFORMS', '').strip()
    if platforms:
        return platforms == 'cpu'
    if importlib.util.find_spec('libtpu') is not None:
        return False
    if importlib.metadata.entry_points(group='jax_plugins'):
        return False
    try:
        import jax_plugins
    except ImportError:
        return True
    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def _glibc_mallopt():
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
    except (OSError, TypeError):
        return None
    if not hasattr(libc, 'gnu_get_libc_version'):  # musl, macOS: no glibc mallopt
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt
