"""Train an aff-jax model: ``python -m train --config configs/NAME.py[:ARG] --workdir DIR``.

Override any config key with ``--config.KEY=VALUE`` (``model_overrides.NAME`` may be new).
Running the same command on the same workdir resumes from its newest complete checkpoint.
Exit status: 0 when training finished; 1 with a one-line reason (config, dataset, workdir,
disk, weights, peers); 3 when the loss or gradients became non-finite (nothing non-finite is
checkpointed); 143 (SIGTERM, preemption) or 130 (SIGINT) when a signal stopped the run after
saving a checkpoint. ``--verbose`` shows the traceback behind a one-line error.
"""
import logging as std_logging
import os
import sys
import warnings

from absl import app, flags, logging

from aff_jax.training import distributed, loop
from aff_jax.training.config import load_with_overrides, split_overrides
from aff_jax.training.errors import RunError

_CONFIG = flags.DEFINE_string('config', None, 'training config file, configs/NAME.py, or '
                              'configs/NAME.py:ARG for get_config(ARG)')
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics.jsonl, TensorBoard '
                               'event files and curves.png go; resumed from if it has a checkpoint')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'multi-process job: join it with '
                                 'jax.distributed (auto-detected on TPU pods and SLURM; elsewhere '
                                 'give the three flags below)')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (the '
                                   'next port is used too, to name peers that never join)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes in the job')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'show the traceback behind a one-line error')
flags.mark_flags_as_required(['config', 'workdir'])

class _BackgroundErrors(std_logging.Filter):
    """Drops the errors Orbax's writer threads (and their asyncio tasks) log with tracebacks:
    the same failure reaches the main thread, which reports it in one line."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        background = record.name == 'asyncio' or f'{os.sep}orbax{os.sep}' in record.pathname
        return not (background and record.levelno >= std_logging.ERROR)


def _quiet_closed_loop(unraisablehook):
    """TensorStore callbacks of an aborted Orbax save that arrive after its event loop closed
    print a traceback each; the failure itself is reported in one line."""
    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
            unraisablehook(unraisable)
    return hook


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        # Orbax logs every save step at INFO; the progress bar is what a user wants to see.
        logging.set_verbosity(logging.WARNING)
    if not _VERBOSE.value:
        logging.get_absl_handler().addFilter(_BackgroundErrors())
        sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
        # An aborted Orbax save leaves coroutines it never started, which Python reports at
        # exit ("coroutine 'async_serialize_from_host.<locals>.write_fragment' was never
        # awaited"), after the one-line error.
        warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
    try:
        config = load_with_overrides(_CONFIG.value, overrides)
        if _DISTRIBUTED.value:
            loop.check_config(config)
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   config.distributed_timeout_s)
        result = loop.train_and_evaluate(config, _WORKDIR.value)
    except RunError as e:
        if _VERBOSE.value:
            raise
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if _VERBOSE.value:
            raise
        print('error: interrupted (SIGINT); run the same command to resume from the newest '
              'checkpoint', file=sys.stderr)
        return 130
    return result.exit_code


if __name__ == '__main__':
    args, config_overrides = split_overrides(sys.argv)
    app.run(lambda argv: main(argv, config_overrides), argv=args)
