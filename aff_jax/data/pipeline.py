"""grain input pipelines: `get_info` and `make_iterator`.

Batches are dicts of numpy arrays for one process:
  'image': (B, H, W, C) float32, normalised with the dataset's mean/std (NHWC);
  'label': (B,) int32 class indices (classification), or (B, H, W) int32 label maps
           (segmentation, `info.task`) where `IGNORE_LABEL` marks pixels that count for no class;
  'mask':  (B,) float32, 1.0 for real examples, 0.0 for eval padding (all ones in training).
Eval padding examples have zero images and labels 0 (classification) or all-`IGNORE_LABEL`
label maps (segmentation).

Training streams are global: one seeded shuffle of the whole split per epoch (a new order each
epoch), augmentation seeded by the position in that stream, and process p of P takes stream
positions p, p + P, p + 2P, ... So the global batch of step t (process batches side by side)
holds stream positions [t*P*B, (t+1)*P*B) for any P: the data order does not depend on how
many processes read it. Evaluation reads each example once over all processes, shards padded
so that every process yields the same number of full batches.

A training position is a global batch index: `make_iterator(..., start_batch=t)` yields the
batches of steps t, t+1, ... for any `worker_count` and process layout, which is how a run
resumes (nothing per worker or per process to save). The iterator is also a
`grain.DatasetIterator` (`get_state` / `set_state`, `grain.checkpoint.CheckpointSave`), whose
state only fits an iterator of the same `worker_count` and process layout. `make_dataset` is
the re-iterable dataset behind `make_iterator`: the evaluation reads it once per evaluation
without opening the source again. With worker processes, call `it.close()` when done.
"""

import ctypes
import math
import os
import signal
import sys

import grain
import jax
import numpy as np
from absl import flags

from aff_jax.data import augment, sources
from aff_jax.data.sources import IGNORE_LABEL, DatasetInfo, DatasetNotFoundError  # re-exported

__all__ = ['IGNORE_LABEL', 'DatasetInfo', 'DatasetNotFoundError', 'get_info', 'make_dataset',
           'make_iterator']

_READ_THREADS = 4
_PREFETCH_BATCHES = 4


def _die_with_parent(worker_index: int, worker_count: int) -> None:
    """Runs in each grain worker process: a worker outlives a parent killed with SIGKILL (and
    keeps its stdout open), so on Linux the kernel is asked to kill it with the parent."""
    del worker_index, worker_count
    if sys.platform.startswith('linux'):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before the request took effect
            os._exit(1)


def get_info(name: str, data_dir=None, num_classes=None, skip_bad_files=False) -> DatasetInfo:
    """Metadata of dataset `name` (see `sources`); prepares the embedded datasets on first use.

    num_classes: for 'segfolder:' names only (None: inferred); other datasets ignore it.
    skip_bad_files: for folder names only: leave out the files that fail to decode instead of
      raising (see `sources`); other datasets ignore it.
    """
    return sources.load(name, data_dir, num_classes, skip_bad_files).info


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f'{what} must be an integer >= {minimum}, got {value!r}')
    return int(value)


def _resolve_processes(process_index, process_count) -> tuple[int, int]:
    count = jax.process_count() if process_count is None else process_count
    count = _check_int(count, 'process_count', 1)
    index = jax.process_index() if process_index is None else process_index
    index = _check_int(index, 'process_index', 0)
    if index >= count:
        raise ValueError(f'process_index must be in [0, {count}), got {index}')
    return index, count


def _resolve_image_size(info: DatasetInfo, kind: str, image_size) -> int:
    stored = info.image_shape[0]
    if image_size is None:
        return stored
    image_size = _check_int(image_size, 'image_size', 1)
    if kind not in augment.RESIZING_AUGMENTS and image_size != stored:
        raise ValueError(
            f"image_size={image_size} needs augment 'imagenet' or 'segmentation' (which resize); "
            f'augment {kind!r} keeps the stored {stored}x{stored} images'
        )
    return image_size


def _resolve_augment(info: DatasetInfo, augment_kind) -> str:
    kind = info.augment if augment_kind is None else augment_kind
    if kind not in augment.AUGMENTS:
        raise ValueError(f'augment_kind must be one of {augment.AUGMENTS}, got {kind!r}')
    if kind not in augment.TASK_AUGMENTS[info.task]:
        raise ValueError(
            f'augment_kind {kind!r} does not suit a {info.task} dataset; use one of '
            f'{augment.TASK_AUGMENTS[info.task]}'
        )
    return kind


def _eval_padding(info: DatasetInfo, size: int) -> dict:
    """An element of zeros with mask 0.0; its label map (segmentation) ignores every pixel."""
    if info.task == 'segmentation':
        label = np.full((size, size), IGNORE_LABEL, np.int32)
    else:
        label = np.int32(0)
    image = np.zeros((size, size, info.image_shape[2]), np.float32)
    return {'image': image, 'label': label, 'mask': np.float32(0.0)}


def make_iterator(name: str, split: str, **kwargs) -> grain.DatasetIterator:
    """An iterator of this process's batches: `iter(make_dataset(name, split, **kwargs))`."""
    return iter(make_dataset(name, split, **kwargs))


def make_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    data_dir=None,
    image_size=None,
    process_index=None,
    process_count=None,
    num_epochs=None,
    worker_count: int = 0,
    augment_kind=None,
    policy: augment.Policy | None = None,
    num_classes=None,
    start_batch: int = 0,
    skip_bad_files=False,
) -> grain.IterDataset:
    """This process's batches of `split` ('train' or 'test') of dataset `name`.

    batch_size: per process. seed: any non-negative int; fixes shuffle and augmentation.
    train=True: shuffled anew each epoch, augmented, `num_epochs` passes (None: forever), the
      stream cut to whole global batches. train=False: no shuffle, eval preprocessing only,
      one pass, the last batch padded (mask 0.0); `num_epochs` must stay None.
    image_size: output side for 'imagenet' and 'segmentation' augmentation (default
      `info.image_shape[0]`).
    process_index/process_count: this process's shard (default: jax's).
    worker_count: grain worker processes (0: threads in this process).
    augment_kind: overrides `info.augment`, one of `augment.TASK_AUGMENTS[info.task]`.
    policy: an `auto_augment.Policy` run after the augmentation in training (classification
      kinds other than 'none' only); evaluation ignores it.
    num_classes: for 'segfolder:' names only (see `sources`); other datasets ignore it.
    start_batch: training only; the first batch is the global batch of this index (step), as
      if `start_batch` batches had been read.
    skip_bad_files: for folder names only: leave out the files that fail to decode instead of
      raising (see `sources`); other datasets ignore it.
    """
    if split not in sources.SPLITS:
        raise ValueError(f'split must be one of {sources.SPLITS}, got {split!r}')
    batch_size = _check_int(batch_size, 'batch_size', 1)
    seed = _check_int(seed, 'seed', 0)
    worker_count = _check_int(worker_count, 'worker_count', 0)
    if num_epochs is not None:
        if not train:
            raise ValueError('num_epochs applies to training only; evaluation is one pass')
        num_epochs = _check_int(num_epochs, 'num_epochs', 1)
    process_index, process_count = _resolve_processes(process_index, process_count)
    start_batch = _check_int(start_batch, 'start_batch', 0)
    if start_batch and not train:
        raise ValueError('start_batch applies to training only; evaluation is one pass')

    dataset = sources.load(name, data_dir, num_classes, skip_bad_files)
    info = dataset.info
    kind = _resolve_augment(info, augment_kind)
    size = _resolve_image_size(info, kind, image_size)
    if policy is not None and kind not in ('cifar', 'imagenet'):
        raise ValueError(f'augmentation policy {policy.name!r} needs augment_kind cifar or '
                         f'imagenet (classification), not {kind!r}')
    if policy is not None and info.image_shape[2] != 3:
        raise ValueError(f'augmentation policy {policy.name!r} needs RGB images, but the '
                         f'dataset has {info.image_shape[2]} channel(s)')
    normalize = augment.Normalize(info.mean, info.std)
    records = dataset.splits[split]
    if len(records) == 0:
        raise ValueError(f'dataset {name!r} has no {split!r} examples')

    if train:
        shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
        stream = records.shuffle(int(shuffle_seed)).repeat(num_epochs)
        stream = stream.random_map(augment.TrainAugment(kind, size, policy), seed=int(augment_seed))
        global_batch = batch_size * process_count
        if num_epochs is not None:
            stream = stream[:len(stream) // global_batch * global_batch]
        elements = stream[process_index::process_count].map(normalize)
    else:
        elements = records[process_index::process_count]
        elements = elements.map(augment.EvalPreprocess(kind, size)).map(normalize)
        per_process = math.ceil(math.ceil(len(records) / process_count) / batch_size) * batch_size
        padding = per_process - len(elements)
        if padding:
            pad = _eval_padding(info, size)
            elements = grain.MapDataset.concatenate(
                [elements, grain.MapDataset.source([pad] * padding)]
            )

    # Batch before leaving MapDataset: worker processes then split whole batches round robin,
    # so the batches do not depend on worker_count. Prefetch a few batches, not grain's 500.
    batches = elements.batch(batch_size, drop_remainder=train)[start_batch:].to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    )
    if worker_count:
        # grain's worker processes read absl flags; outside absl.app.run nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count),
                                      worker_init_fn=_die_with_parent)
    return batches
