"""Input-pipeline throughput per CPU core: the training pipeline against tf.data, in one run.

    python -m aff_jax.input_benchmark --folder PATH                       # 32x32, pad-crop-flip
    python -m aff_jax.input_benchmark --folder PATH --augment autoaugment_cifar10
    python -m aff_jax.input_benchmark --folder LARGE --size 224            # Inception crop
    python -m aff_jax.input_benchmark --make-large PATH LARGE --per-class 200

PATH is an ``imagefolder:`` dataset of JPEGs (``train/<class>/*.jpg`` and ``test/...``). Both
sides read its training split from the files, decode, augment, normalise to float32 and batch:
* ours: ``pipeline.make_dataset`` as the trainer builds it (in-process threads, no workers);
* tf.data: what big_vision does, ``decode_and_crop_jpeg`` of an Inception crop box
  (``sample_distorted_bounding_box``), bilinear resize, random flip (``--size`` above 64), or
  decode, pad-4 random crop, flip (smaller sizes), with ``num_parallel_calls=AUTOTUNE``.
The process is pinned to ``--cores`` CPU cores (default 1), which the threads of both sides
inherit, so the figures are images/s per core; the sides alternate over ``--rounds`` rounds
(the same machine load for both) and the figures are medians. Needs TensorFlow (``[tf]``).

``--make-large`` writes ImageNet-like JPEGs for the 224 measurement: each image of a small
folder (e.g. 32x32 CIFAR) upscaled bicubically to 500x375, with Gaussian noise (sigma 6) for
a photograph's JPEG detail, saved at quality 90.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import numpy as np

LARGE_SIZE = (500, 375)  # (width, height), a typical ImageNet photograph
LARGE_NOISE = 6.0


def make_large(source: str, dest: str, per_class: int, seed: int = 0) -> int:
    """Writes ``dest/{train,test}/<class>/*.jpg`` from the first ``per_class`` images per class
    of ``source`` (``per_class // 10`` for test, at least 1); returns the number written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = 0
    for split, count in (('train', per_class), ('test', max(1, per_class // 10))):
        for class_dir in sorted(pathlib.Path(source, split).iterdir()):
            out_dir = pathlib.Path(dest, split, class_dir.name)
            out_dir.mkdir(parents=True, exist_ok=True)
            for path in sorted(class_dir.iterdir())[:count]:
                with Image.open(path) as image:
                    large = np.asarray(image.convert('RGB').resize(LARGE_SIZE, Image.BICUBIC),
                                       np.float32)
                noisy = large + rng.normal(0.0, LARGE_NOISE, large.shape)
                Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)).save(
                    out_dir / f'{path.stem}.jpg', quality=90)
                written += 1
    return written


def _ours(folder: str, size: int, augment: str, batch: int, seed: int):
    from aff_jax.data import auto_augment, pipeline

    policy = None if augment == 'default' else auto_augment.Policy(augment)
    return pipeline.make_iterator(f'imagefolder:{folder}', 'train', batch_size=batch, seed=seed,
                                  train=True, image_size=None if _small(size) else size,
                                  policy=policy)


def _small(size: int) -> bool:
    """Whether a folder of ``size`` x ``size`` images gets the 'cifar' augmentation."""
    from aff_jax.data import sources

    return size <= sources.SMALL_IMAGE_SIDE


def _tf_data(folder: str, size: int, batch: int, seed: int):
    import tensorflow as tf

    from aff_jax.data import augment, sources

    classes = sorted(p.name for p in pathlib.Path(folder, 'train').iterdir())
    files, labels = [], []
    for label, name in enumerate(classes):
        paths = sorted(str(p) for p in pathlib.Path(folder, 'train', name).iterdir())
        files += paths
        labels += [label] * len(paths)
    mean = tf.constant(sources.IMAGENET_MEAN, tf.float32)
    std = tf.constant(sources.IMAGENET_STD, tf.float32)

    def preprocess(path, label):
        data = tf.io.read_file(path)
        if not _small(size):
            begin, crop, _ = tf.image.sample_distorted_bounding_box(
                tf.image.extract_jpeg_shape(data), tf.zeros([0, 0, 4], tf.float32),
                min_object_covered=0.0, aspect_ratio_range=augment.CROP_RATIO,
                area_range=augment.CROP_SCALE, max_attempts=10,
                use_image_if_no_bounding_boxes=True)
            window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
            image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
            image = tf.image.resize(image, (size, size), method='bilinear')
        else:
            image = tf.io.decode_jpeg(data, channels=3)
            pad = augment.CIFAR_PAD
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.random_crop(image, (size, size, 3))
        image = tf.image.random_flip_left_right(image)
        image = (tf.cast(image, tf.float32) / 255.0 - mean) / std
        return {'image': image, 'label': label}

    dataset = tf.data.Dataset.from_tensor_slices((files, labels))
    dataset = dataset.shuffle(len(files), seed=seed).repeat()
    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(dataset.as_numpy_iterator())


WARMUP_BATCHES = 5  # thread pools start, tf.data autotunes, prefetch buffers fill


def _images_per_second(iterator, batches: int, batch: int) -> float:
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    seconds = time.perf_counter() - start
    if hasattr(iterator, 'close'):
        iterator.close()
    return batches * batch / seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--folder', help='an imagefolder dataset of JPEGs')
    parser.add_argument('--size', type=int, default=32, help='output side (> 64: Inception crop)')
    parser.add_argument('--augment', default='default',
                        choices=('default', 'autoaugment_cifar10', 'autoaugment_imagenet',
                                 'randaugment'))
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--batches', type=int, default=40, help='timed batches per round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--cores', type=int, default=1, help='CPU cores the process may use')
    parser.add_argument('--make-large', nargs=2, metavar=('SOURCE', 'DEST'))
    parser.add_argument('--per-class', type=int, default=200)
    args = parser.parse_args(argv)
    if args.make_large:
        count = make_large(*args.make_large, args.per_class)
        print(f'wrote {count} JPEGs of {LARGE_SIZE[0]}x{LARGE_SIZE[1]} under {args.make_large[1]}')
        return {}
    if not args.folder:
        parser.error('--folder is required (or --make-large SOURCE DEST)')
    cores = sorted(os.sched_getaffinity(0))[:args.cores]
    os.sched_setaffinity(0, cores)  # before any thread pool starts
    ours, theirs = [], []
    for round_ in range(args.rounds):
        ours.append(_images_per_second(
            _ours(args.folder, args.size, args.augment, args.batch, round_), args.batches,
            args.batch))
        theirs.append(_images_per_second(
            _tf_data(args.folder, args.size, args.batch, round_), args.batches, args.batch))
    result = {
        'folder': args.folder, 'size': args.size, 'augment': args.augment, 'batch': args.batch,
        'cores': len(cores), 'cpu': platform.processor() or platform.machine(),
        'ours_images_per_second': round(statistics.median(ours), 1),
        'tf_data_images_per_second': round(statistics.median(theirs), 1),
        'ratio': round(statistics.median(o / t for o, t in zip(ours, theirs)), 3),
        'rounds': {'ours': [round(x, 1) for x in ours], 'tf_data': [round(x, 1) for x in theirs]},
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == '__main__':
    main()
