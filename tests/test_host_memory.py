"""aff_jax.host_memory: freed temporaries stay mapped, so steps stop page-faulting them in;
threads keep their arenas."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from aff_jax import host_memory
from aff_jax.training.config import base_config
from aff_jax.training.errors import ConfigError
from aff_jax.training.loop import check_config

PAGE = 4096

# An XLA:CPU program with a 162 MiB temporary (above glibc's largest mmap threshold, 32 MiB, as
# a train step's are), called 8 times; the median page faults of the last 6 calls, counted
# around each. argv: the setting, then 'async' to give the CPU client its own threads back.
_PROBE = """
import json, resource, statistics, sys
from aff_jax import host_memory
retained = host_memory.retain_freed_memory(sys.argv[1])
import jax, jax.numpy as jnp
if sys.argv[2:] == ['async']:
    jax.config.update('jax_cpu_enable_async_dispatch', True)
x = jnp.ones((4608, 4608), jnp.float32)
step = jax.jit(lambda x: (jnp.flip(x, 0) * 2 + x.T).sum(axis=0) @ jnp.ones(4608)).lower(x).compile()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'retained': retained, 'faults_per_step': statistics.median(faults[2:]),
                  'temp_pages': step.memory_analysis().temp_size_in_bytes // 4096}))
"""

# Two threads each allocate what a oneDNN GEMM workspace takes (72 KiB) and report whether it
# came from the main arena, the heap below the program break.
_ARENAS_PROBE = """
import ctypes, json, sys, threading
from aff_jax import host_memory
host_memory.retain_freed_memory(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, (ctypes.c_ssize_t,)
in_main_arena = []

def allocate():
    block = libc.malloc(72 << 10)
    in_main_arena.append(block < libc.sbrk(0))

threads = [threading.Thread(target=allocate) for _ in range(2)]
[thread.start() for thread in threads]
[thread.join() for thread in threads]
print(json.dumps(in_main_arena))
"""


def _run(probe: str, *args: str):
    env = {key: value for key, value in os.environ.items()
           if key not in host_memory.USER_TUNING}
    out = subprocess.run([sys.executable, '-c', probe, *args], capture_output=True,
                         text=True, check=True, env={**env, 'JAX_PLATFORMS': 'cpu'})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_stops_the_page_faults_of_each_step():
    off, on = _run(_PROBE, 'off'), _run(_PROBE, 'auto')
    pages = on['temp_pages']
    assert pages >= (160 << 20) // PAGE
    assert (off['retained'], on['retained']) == (False, True)
    # glibc maps the temporaries afresh for every call and faults each of their pages in ...
    assert off['faults_per_step'] >= 0.9 * pages
    # ... unless freed memory stays mapped: then the next call reuses it.
    assert on['faults_per_step'] <= 0.02 * pages


def test_the_calling_thread_allocates_the_temporaries():
    # With the malloc settings alone, the client's own thread allocates the block from its
    # arena, which glibc maps anew for a block that large.
    mallopt_only = _run(_PROBE, 'on', 'async')
    assert mallopt_only['retained']
    assert mallopt_only['faults_per_step'] >= 0.9 * mallopt_only['temp_pages']


def test_threads_keep_their_own_arenas():
    # One arena for all threads made XLA's Eigen threads queue for each GEMM workspace.
    assert _run(_ARENAS_PROBE, 'on') == [False, False]


def test_auto_follows_the_platforms_and_leaves_user_tuning_alone(monkeypatch):
    monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
    assert not host_memory.cpu_only()
    assert host_memory.retain_freed_memory('auto') is False
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    assert host_memory.cpu_only()
    monkeypatch.setenv('MALLOC_ARENA_MAX', '4')
    assert host_memory.retain_freed_memory('auto') is False
    assert host_memory.retain_freed_memory('off') is False


def test_a_bad_setting_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"one of \('auto', 'on', 'off'\), got True"):
        host_memory.retain_freed_memory(True)
    config = base_config()
    config.retain_freed_memory = 'yes'
    with pytest.raises(ConfigError, match=r"config.retain_freed_memory must be one of .*got 'yes'"):
        check_config(config)
