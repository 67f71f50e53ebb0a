"""The official presets' Gluon models as a comparison reference: :func:`mxnet_reference`.

MXNet 1.9.1 needs numpy<1.24 (CPython <= 3.11), so Gluon runs in its own interpreter, in a
subprocess (``aff_jax/reference/gluon/compare_run.py``), fed the same ``.params`` file and
input through files. That interpreter is found by :func:`find_python`.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import tempfile
from typing import Callable, Sequence

import numpy as np

from aff_jax.compare.runs import OUTPUT, Case, Run, nchw_to_nhwc, nhwc_to_nchw
from aff_jax.reference import gluon

PYTHON_ENV = 'AFF_JAX_MXNET_PYTHON'
VENV_ENV = 'AFF_JAX_MXNET_VENV'


class MXNetUnavailable(RuntimeError):
    """No interpreter that can import mxnet was found or given."""


def default_venv() -> pathlib.Path:
    """The MXNet virtual environment the test suite builds and reuses:
    ``$AFF_JAX_MXNET_VENV``, else ``$XDG_CACHE_HOME/aff-jax/mxnet-venv`` (``~/.cache/...``)."""
    if os.environ.get(VENV_ENV):
        return pathlib.Path(os.environ[VENV_ENV])
    cache = pathlib.Path(os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache')
    return cache / 'aff-jax' / 'mxnet-venv'


def _has_mxnet(python: str) -> bool:
    probe = 'import importlib.util, sys; sys.exit(importlib.util.find_spec("mxnet") is None)'
    try:
        return subprocess.run([python, '-c', probe], capture_output=True).returncode == 0
    except OSError:  # no such file, not executable
        return False


def find_python(python: str | None = None) -> str:
    """An interpreter that can import mxnet: ``python`` if given, else the first of
    ``$AFF_JAX_MXNET_PYTHON`` and :func:`default_venv`'s python that can. Raises
    :class:`MXNetUnavailable`, one line saying how to provide one."""
    if python:
        if not _has_mxnet(python):
            raise MXNetUnavailable(f'{python} cannot import mxnet: give a Python with '
                                   f'mxnet==1.9.1 and numpy<1.24 installed')
        return python
    candidates = [os.environ[PYTHON_ENV]] if os.environ.get(PYTHON_ENV) else []
    candidates.append(str(default_venv() / 'bin' / 'python'))
    found = next((c for c in candidates if _has_mxnet(c)), None)
    if found is None:
        raise MXNetUnavailable(
            f'official presets compare against MXNet, and no Python with mxnet was found (tried '
            f'{", ".join(candidates)}): pass --mxnet-python PATH (python= in the API) or set '
            f'{PYTHON_ENV} to a CPython <= 3.11 with mxnet==1.9.1 and numpy<1.24 installed '
            f'(the test suite builds one at {default_venv()})')
    return found


def _read_run(path: pathlib.Path) -> Run:
    """A compare_run.py output file as a :class:`Run` (NHWC activations)."""
    run = Run([])
    with np.load(path) as arrays:
        for key in arrays.files:
            kind, name = key.split(':', 1)
            value = arrays[key]
            if kind == 'act':
                run.activations.append((name, nchw_to_nhwc(value)))
            elif kind == 'out':
                run.activations.append((OUTPUT, value))
            elif kind == 'stat':
                run.stats[name] = value
            elif kind == 'grad':
                run.grads[name] = value
            else:  # 'step<k>', k = 1, 2, ... in order
                step = int(kind[len('step'):])
                if step > len(run.states):
                    run.states.append({})
                run.states[step - 1][name] = value
    return run


def mxnet_reference(preset: str, params_path: str | os.PathLike, *,
                    layers: Sequence[int] | None = None, classes: int | None = None,
                    python: str | None = None) -> Callable[[Case, str], Run]:
    """``reference_fn(case, dtype) -> Run`` running the official Gluon model of ``preset``
    (an official aff_jax preset name; ``layers`` and ``classes`` override its blocks per stage
    and class count) holding ``params_path`` (a Gluon ``.params`` file) under ``python``
    (:func:`find_python`, called now so that a missing MXNet is reported before any work).

    Both precisions run in one subprocess (MXNet's start-up dominates small cases): the first
    call for a case computes float32 and float64, the second reads the stored one.
    """
    python = find_python(python)
    cached: dict[str, object] = {}

    def run(case: Case, dtype: str) -> Run:
        if cached.get('case') is not case:
            if len(case.inputs) != 1:
                raise ValueError(f'{preset} takes one input, got {len(case.inputs)}')
            with tempfile.TemporaryDirectory(prefix='aff_jax_gluon_') as tmp:
                tmp = pathlib.Path(tmp)
                arrays = dict(input=nhwc_to_nchw(case.inputs[0]), mode=case.mode,
                              steps=case.steps, learning_rate=case.learning_rate)
                if case.labels is not None:
                    arrays['labels'] = case.labels
                np.savez(tmp / 'case.npz', **arrays)
                command = [python, str(gluon.DIRECTORY / 'compare_run.py'), preset,
                           os.fspath(params_path), str(tmp / 'case.npz'), str(tmp)]
                if layers:
                    command += ['--layers', ','.join(map(str, layers))]
                if classes:
                    command += ['--classes', str(classes)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
                    raise RuntimeError(f'the Gluon reference ({python}) failed: {last}')
                cached.update(case=case, runs={d: _read_run(tmp / f'{d}.npz')
                                               for d in ('float32', 'float64')})
        return cached['runs'][dtype]
    return run
