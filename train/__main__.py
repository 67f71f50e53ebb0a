"""Train an aff-jax model: ``python -m train --config configs/NAME.py --workdir DIR``.

Override any config key with ``--config.KEY=VALUE``. Running the same command on the same
workdir resumes from its newest complete checkpoint. Exit status: 0 when training finished,
1 with a one-line reason for a bad config or dataset, 143 when SIGTERM stopped the run after
saving a checkpoint.
"""
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from aff_jax.training import loop
from aff_jax.training.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'training config file, configs/NAME.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'where checkpoints, metrics.jsonl, TensorBoard '
                               'event files and curves.png go; resumed from if it has a checkpoint')
_DISTRIBUTED = flags.DEFINE_bool('distributed', False, 'multi-process job: call '
                                 'jax.distributed.initialize() (auto-detected on TPU pods and '
                                 'SLURM; elsewhere give the three flags below)')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'number of processes in the job')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'index of this process')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        # Orbax logs every save step at INFO; the progress bar is what a user wants to see.
        logging.set_verbosity(logging.WARNING)
    if _DISTRIBUTED.value:
        # CPU devices of different processes talk through gloo; TPU and GPU ignore this.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    try:
        result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 1
    return 143 if result.preempted else 0


if __name__ == '__main__':
    app.run(main)
