"""aff_jax.host_memory: freed temporaries stay mapped, so steps stop page-faulting them in."""
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
BLOCK = 64 << 20  # bytes: above glibc's largest mmap threshold (32 MiB), as XLA's temporaries are

# What an XLA:CPU step does with its temporaries: a worker thread (not the main one) allocates
# a large block, writes it, frees it; again on the next step. The median page faults of 10
# rounds after 2, counted around each round.
_PROBE = f"""
import ctypes, json, resource, statistics, sys, threading
from aff_jax import host_memory
retained = host_memory.retain_freed_memory(sys.argv[1])
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc({BLOCK})
    ctypes.memset(block, 1, {BLOCK})
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

worker = threading.Thread(target=lambda: [step() for _ in range(12)])
worker.start()
worker.join()
print(json.dumps({{'retained': retained, 'faults_per_step': statistics.median(faults[2:])}}))
"""


def _probe(setting: str) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in host_memory.USER_TUNING}
    out = subprocess.run([sys.executable, '-c', _PROBE, setting], capture_output=True,
                         text=True, check=True, env={**env, 'JAX_PLATFORMS': 'cpu'})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retained_memory_stops_the_page_faults_of_each_step():
    pages = BLOCK // PAGE
    off, on = _probe('off'), _probe('auto')
    assert (off['retained'], on['retained']) == (False, True)
    # glibc maps a 64 MiB block afresh for every step and faults each of its pages in ...
    assert off['faults_per_step'] >= 0.9 * pages
    # ... unless freed memory stays mapped: then the next step reuses it.
    assert on['faults_per_step'] <= 0.02 * pages


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
