"""glibc's malloc settings for XLA:CPU runs: keep freed memory mapped for the next step.

XLA:CPU allocates a compiled program's temporaries afresh on every call (about 0.9 GB in one
block for a ``cifar_aff_resnet32`` train step at batch 32). glibc serves a block that large
with ``mmap`` and unmaps it on ``free``, so every step faults it back in page by page: ~240,000
page faults per step there, a fifth of the step on 2 cores (BENCHMARKS.md). With no ``mmap``
and no trimming, the main arena (the heap that ``brk`` grows) keeps a freed block and the next
step reuses it.

Only the main arena can: a block beyond a thread arena's 64 MiB heap is mapped anew whatever
``M_MMAP_MAX`` says (glibc's fallback for those arenas), and by default XLA:CPU runs a program
on a thread of its own, which allocates from a thread arena. So the CPU client also runs
programs on the thread that calls them (``jax_cpu_enable_async_dispatch=False``): from the
main thread, the temporaries come from the main arena. The other threads keep their arenas;
one arena for all (this module's setting until 2026-11-27) left no faults, but made the two
Eigen threads of a 2-core machine queue for it: the oneDNN GEMMs inside XLA's convolutions
allocate a ~72 KiB workspace each, ~22,000 per ``cifar_aff_resnet32`` step, and the steps ran
10-15% slower than with separate arenas.

What it costs: the process keeps its peak heap (which the next step needs again), and a call
of a compiled program returns when its result is ready, so Python no longer runs ahead of
the computation (the train loop does nothing heavy between steps). Hence ``'auto'``: only
where JAX can use nothing but the CPU, and only when the user has not tuned malloc through
the environment. Computations over several devices keep their own threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import pkgutil

import jax

AUTO, ON, OFF = 'auto', 'on', 'off'
SETTINGS = (AUTO, ON, OFF)
# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# Variables through which glibc takes malloc settings at start-up; 'auto' leaves those alone.
USER_TUNING = ('GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_', 'MALLOC_MMAP_THRESHOLD_',
               'MALLOC_TOP_PAD_', 'MALLOC_TRIM_THRESHOLD_')


def retain_freed_memory(setting: str = AUTO) -> bool:
    """Set glibc's malloc to keep freed memory (no ``mmap``, never trim) and JAX's CPU client
    to run programs on the calling thread, when ``setting`` is ``'on'``, or when it is
    ``'auto'``, JAX can only run on the CPU (``cpu_only``) and no variable of ``USER_TUNING``
    is set; ``'off'`` changes nothing. Returns whether it did (False where the C library is not
    glibc).

    Call it before JAX starts its backend, which reads ``jax_cpu_enable_async_dispatch`` when
    it creates the CPU client; and call the programs from the main thread, whose temporaries
    come from the main arena.
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
    if not all(mallopt(param, value) == 1
               for param, value in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))):
        return False
    jax.config.update('jax_cpu_enable_async_dispatch', False)
    return True


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
