"""Score saved weights without training.

    python -m train.evaluate --config configs/NAME.py[:ARG] --workdir DIR [--split test]
        [--init_from CONVERTED_DIR] [--config.KEY=VALUE ...]

Scores the newest complete checkpoint in ``DIR/checkpoints`` (or, with ``--init_from``, an
Orbax directory written by ``python -m aff_jax.interop.convert``, loaded as ``config.init_from``
loads it) on the split, with the trainer's sharded eval step: top-1 and top-5 accuracy for
classification, mIoU, pixel accuracy and per-class IoU for segmentation, and the loss. Prints
them and writes ``DIR/eval.json``: the metrics under the names of ``metrics.jsonl``
(``eval/accuracy``, ``eval/top5_accuracy``, ``eval/miou``, ...; ``eval/count`` images), with
``step`` (null for ``--init_from``), ``split``, ``checkpoint``, ``model`` and ``dataset``.
The config is the one the checkpoint was trained with (the model must match); keys such as
``eval_batch_size`` or ``dataset`` may differ. Exit status: 0 scored; 1 a one-line error
(config, dataset, split, no checkpoint, a checkpoint of another model, weights).
It runs as one process over its local devices; a multi-process run's checkpoint restores onto
that mesh.
"""
import json
import pathlib
import sys

from absl import app, flags, logging

from aff_jax.training import loop
from aff_jax.training.config import load_with_overrides, split_overrides
from aff_jax.training.errors import RunError

EVAL_FILE = 'eval.json'

_CONFIG = flags.DEFINE_string('config', None, 'the training config, configs/NAME.py or '
                              'configs/NAME.py:ARG for get_config(ARG)')
_WORKDIR = flags.DEFINE_string('workdir', None, 'the run directory: its newest checkpoint is '
                               f'scored (unless --init_from), {EVAL_FILE} is written there')
_INIT_FROM = flags.DEFINE_string('init_from', None, 'score these converted weights (an Orbax '
                                 'directory from python -m aff_jax.interop.convert) instead')
_SPLIT = flags.DEFINE_string('split', 'test', 'the dataset split to score: test or train')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'show the traceback behind a one-line error')
flags.mark_flags_as_required(['config', 'workdir'])


def _report(evaluation: loop.Evaluation) -> str:
    """The scores in one line, in percent."""
    scores = evaluation.scores
    if evaluation.task.name == 'segmentation':
        per_class = ', '.join(f'{name} {100 * scores[f"eval/iou/{name}"]:.2f}%'
                              for name in evaluation.task.class_names
                              if f'eval/iou/{name}' in scores)
        return (f'mIoU {100 * scores["eval/miou"]:.2f}% (IoU {per_class}), pixel accuracy '
                f'{100 * scores["eval/pixel_accuracy"]:.2f}%, loss {scores["eval/loss"]:.4f}')
    return (f'top-1 accuracy {100 * scores["eval/accuracy"]:.2f}%, top-5 accuracy '
            f'{100 * scores["eval/top5_accuracy"]:.2f}%, loss {scores["eval/loss"]:.4f}')


def _write(workdir: pathlib.Path, record: dict) -> pathlib.Path:
    """``record`` as ``workdir/eval.json`` (the workdir created for --init_from); its path."""
    path = workdir / EVAL_FILE
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + '\n')
    except OSError as e:
        raise RunError(f'cannot write {path}: {e.strerror or e}') from e
    return path


def main(argv, overrides):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    try:
        config = load_with_overrides(_CONFIG.value, overrides)
        evaluation = loop.evaluate_saved(config, _WORKDIR.value, _SPLIT.value, _INIT_FROM.value)
        step = 'converted weights' if evaluation.step is None else f'step {evaluation.step}'
        print(f'{evaluation.source} ({step}), {config.model} on the {evaluation.split} split '
              f'of {config.dataset}: {int(evaluation.scores["eval/count"])} images')
        print(_report(evaluation))
        record = {'step': evaluation.step, 'split': evaluation.split,
                  'checkpoint': evaluation.source, 'model': config.model,
                  'dataset': config.dataset, **evaluation.scores}
        print(f'wrote {_write(pathlib.Path(_WORKDIR.value).absolute(), record)}')
    except RunError as e:
        if _VERBOSE.value:
            raise
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == '__main__':
    args, config_overrides = split_overrides(sys.argv)
    app.run(lambda argv: main(argv, config_overrides), argv=args)
