"""Run a grid of training runs: ``python -m train.sweep --config configs/NAME.py[:ARG]
--workdir DIR [--parallel N] [--config.KEY=VALUE ...]``.

The config file's ``get_config`` returns ``base`` (a training config) and ``grid`` (a tuple of
values per key); see ``aff_jax/training/sweep.py``. Each cell of the grid is an ordinary
``python -m train`` run in ``DIR/<cell name>/``: a finished cell is skipped, an interrupted one
resumes. ``--config.base.KEY=VALUE`` and ``--config.grid.KEY=(V1, V2)`` override the file.
Writes ``DIR/results.csv``, ``DIR/results.md`` and ``DIR/results.png``.
Exit status: 0 every cell finished; 1 a one-line error before any cell ran; 2 some cells did
not finish (each reported with its exit status); 130 / 143 stopped by SIGINT / SIGTERM (passed
on to the running cells, which save a checkpoint first).
"""
import functools
import shlex
import sys

from absl import app, flags, logging

from aff_jax.training import sweep
from aff_jax.training.config import load_with_overrides, split_overrides
from aff_jax.training.errors import RunError

_CONFIG = flags.DEFINE_string('config', None, 'sweep config file, configs/NAME.py, or '
                              'configs/NAME.py:ARG for get_config(ARG)')
_WORKDIR = flags.DEFINE_string('workdir', None, 'where the cells\' runs and the results go')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'cells trained at once, each in a process')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        # As in `python -m train`: INFO lines of JAX and optax are not for the user.
        logging.set_verbosity(logging.WARNING)
    command = shlex.join(['python', '-m', 'train.sweep', *sys.argv[1:]])
    try:
        config = load_with_overrides(_CONFIG.value, overrides)
        return sweep.run_sweep(config, _WORKDIR.value, _PARALLEL.value, command,
                               report=functools.partial(print, flush=True))
    except RunError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return e.exit_code


if __name__ == '__main__':
    args, config_overrides = split_overrides(sys.argv)
    app.run(lambda argv: main(argv, config_overrides), argv=args)
