"""Shared fixtures for the training tests: the environment of `python -m train` subprocesses,
a small image-folder dataset, and what the resume tests read off a workdir."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

# XLA:CPU's default LLVM -O3 pipeline takes up to 15 s to compile one threefry draw of some
# shapes (jax.random.normal of (3, 3, 8, 12): 15 s; at -O1 0.4 s), and the tests initialise
# modules with threefry keys, op by op, shape after shape: -O1 cuts the suite's time by about
# a third. Train steps compile and run alike at both levels (BENCHMARKS.md), and the training
# subprocesses (train_env) run with the library's defaults. A level already set is kept: the
# scripts of cpu_devices_env import this file too.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               '--xla_backend_optimization_level=1').strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from aff_jax.training.metrics import WALL_CLOCK_METRICS  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# Unoptimised XLA code compiles about twice as fast (the 8-device sharding test's subprocess:
# 129 -> 71 s), for subprocesses of a few steps where compiling is most of the time.
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
FOLDER_CLASSES = 10
FOLDER_SPLITS = {'train': 12, 'test': 4}  # images per class


@pytest.fixture(scope='session', autouse=True)
def user_cache(tmp_path_factory):
    """The suite's own user cache dir (the folder-check verdicts), not the user's."""
    previous = os.environ.get('XDG_CACHE_HOME')
    os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('user_cache'))
    yield
    if previous is None:
        del os.environ['XDG_CACHE_HOME']
    else:
        os.environ['XDG_CACHE_HOME'] = previous


# Training runs are compared bit for bit (resumed or not, other data workers); on a GPU that
# takes XLA's deterministic kernels (BENCHMARKS.md). CPUs ignore the flag.
DETERMINISTIC = '--xla_gpu_deterministic_ops=true'


@pytest.fixture
def on_cpu():
    """Runs the test on XLA:CPU whatever the default backend, for tests that read the program
    XLA:CPU compiles (on a GPU machine they would read XLA:GPU's)."""
    with jax.default_device(jax.devices('cpu')[0]):
        yield


@pytest.fixture(scope='session')
def train_env(tmp_path_factory) -> dict[str, str]:
    """Environment for training subprocesses: the default device (one CPU here), XLA's
    default optimisation, a TFDS data dir of their own, and a compilation cache they share, so
    that runs of one config compile once."""
    cache = tmp_path_factory.mktemp('jax_cache')
    return dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=DETERMINISTIC,
                TFDS_DATA_DIR=str(tmp_path_factory.mktemp('tfds')),
                JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


@pytest.fixture(scope='session')
def fast_train_env(train_env) -> dict[str, str]:
    """train_env compiling unoptimised code, for runs of a few steps."""
    return dict(train_env, XLA_FLAGS=f'{DETERMINISTIC} {FAST_COMPILE}')


def cpu_devices_env(devices: int, fast: bool = True) -> dict[str, str]:
    """Environment entries for a subprocess on ``devices`` CPU devices (the CPU platform even
    where a GPU is installed: XLA's flag multiplies CPU devices only), compiling unoptimised
    code when ``fast`` (runs of a few steps)."""
    flags = f'--xla_force_host_platform_device_count={devices}'
    return {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'{flags} {FAST_COMPILE}' if fast else flags}


# Keys that turn configs/quickstart.py into a run of a few seconds on 32x32 images of 10 classes
# (AFF in the last stage only, which halves the compile time). They fix everything that shapes
# the compiled programs, so runs on different datasets of that shape share the compilation cache.
TINY_RUN = {'model_overrides.start_layer': 3, 'batch_size': 16, 'eval_batch_size': 32,
            'num_train_steps': 80, 'warmup_steps': 5, 'mixup_alpha': 0.2, 'log_every_steps': 5,
            'eval_every_steps': 40, 'checkpoint_every_steps': 20, 'keep_checkpoints': 4}


def tiny_run_overrides(dataset: str) -> list[str]:
    """``--config.KEY=VALUE`` flags for TINY_RUN on ``dataset``."""
    return [f'--config.{key}={value}' for key, value in {**TINY_RUN, 'dataset': dataset}.items()]


def run_train(workdir: pathlib.Path, overrides: list[str], env: dict[str, str],
              config: str = 'configs/quickstart.py', **popen_kw) -> subprocess.Popen:
    """Start ``python -m train --config CONFIG --workdir WORKDIR OVERRIDES`` in the repo root."""
    command = [sys.executable, '-m', 'train', f'--config={config}', f'--workdir={workdir}',
               *overrides]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen_kw)


def folder_image(label: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A (size, size, 3) uint8 image of noise with a centred square whose hue is the class."""
    colour = 127.5 + 127.5 * np.cos(2 * np.pi * (label / FOLDER_CLASSES + np.arange(3) / 3))
    image = rng.uniform(0, 100, (size, size, 3))
    inner = slice(size // 4, size - size // 4)
    image[inner, inner] = 0.3 * image[inner, inner] + 0.8 * colour
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory) -> pathlib.Path:
    """PATH/{train,test}/class_k/*.png, 10 classes of 32x32 RGB images."""
    root = tmp_path_factory.mktemp('imagefolder')
    rng = np.random.default_rng(0)
    for split, per_class in FOLDER_SPLITS.items():
        for label in range(FOLDER_CLASSES):
            directory = root / split / f'class_{label}'
            directory.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(folder_image(label, rng)).save(directory / f'{i}.png')
    return root


def metric_rows(workdir: pathlib.Path, wall_clock: bool = False) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl``; without the wall-clock rates unless asked (the
    values a resumed run does not repeat)."""
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    if wall_clock:
        return rows
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK_METRICS} for row in rows]


def complete_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the finished checkpoints in ``workdir/checkpoints``."""
    directory = workdir / 'checkpoints'
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def last_logged_step(workdir: pathlib.Path) -> int:
    path = workdir / 'metrics.jsonl'
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])['step'] if lines else 0


def wait_until(condition, process: subprocess.Popen, timeout: float = 300.0) -> None:
    """Poll ``condition`` while ``process`` runs; fail if it exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.02)


def checkpointed_state(workdir: pathlib.Path, step: int) -> dict:
    """The train state saved at ``step`` in ``workdir``, as numpy arrays."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / 'checkpoints' / str(step) / 'state')


def assert_same_state(got: dict, want: dict) -> None:
    """Identical tree paths and bit-identical arrays."""
    expected = jax.tree_util.tree_leaves_with_path(want)
    actual = jax.tree_util.tree_leaves_with_path(got)
    assert [path for path, _ in actual] == [path for path, _ in expected]
    for (path, w), (_, g) in zip(expected, actual):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w),
                                      err_msg=jax.tree_util.keystr(path))
