"""The persistent compilation cache: a second run of a config compiles nothing. Counted with
JAX's own monitoring events (requests, hits, misses), not timed."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, TINY_RUN

_SCRIPT = '''
import collections, json, sys
from jax import monitoring
from aff_jax.training import loop
from aff_jax.training.config import load_config

counts = collections.Counter()
monitoring.register_event_listener(lambda name, **kw: counts.update([name.split('/')[-1]]))
config = load_config('configs/quickstart.py')
config.update_from_flattened_dict(json.loads(sys.argv[1]))
loop.train_and_evaluate(config, sys.argv[2])
print(json.dumps(counts))
'''


def _run(values: dict, workdir, env) -> dict:
    process = subprocess.run([sys.executable, '-c', _SCRIPT, json.dumps(values), str(workdir)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_a_second_run_takes_every_program_from_the_cache(tmp_path, image_folder, fast_train_env):
    env = {k: v for k, v in fast_train_env.items() if not k.startswith('JAX_')}
    env['XDG_CACHE_HOME'] = str(tmp_path / 'user_cache')
    values = {**TINY_RUN, 'dataset': f'imagefolder:{image_folder}', 'num_train_steps': 10,
              'eval_every_steps': 10, 'checkpoint_every_steps': 10}
    first = _run(values, tmp_path / 'first', env)
    second = _run(values, tmp_path / 'second', env)
    # The first run compiles (a program it builds twice is a hit the second time).
    assert first['cache_misses'] > 5
    assert first['cache_misses'] + first.get('cache_hits', 0) == \
        first['compile_requests_use_cache']
    assert second['cache_hits'] == second['compile_requests_use_cache'] == \
        first['compile_requests_use_cache']
    assert second.get('cache_misses', 0) == 0
    assert list((tmp_path / 'user_cache' / 'aff_jax' / 'xla').iterdir())


def test_off_leaves_jax_without_a_cache():
    """``compilation_cache='off'`` (or '', or None) points JAX nowhere (not at ./off): a run
    then compiles everything (a third training run would show it, at the price of every
    compile again)."""
    import jax

    from aff_jax.training import compile_cache

    before = jax.config.jax_compilation_cache_dir
    for setting in ('off', '', None):
        assert compile_cache.enable(setting) is None
    assert jax.config.jax_compilation_cache_dir == before
