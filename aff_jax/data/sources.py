"""Dataset names -> random-access splits of {'image': (H, W, C) uint8, 'label': int} + metadata.

Names:
  'aff_multiscale'   the embedded generated dataset (`multiscale.py`), prepared on first use.
  'cifar10', 'cifar100', 'imagenet2012'   TFDS datasets prepared as ArrayRecord.
  'cifar100_coarse'  TFDS cifar100 labelled by its 20 super-classes ('coarse_label').
  any other TFDS image-classification name  ('image' and 'label' features), as ArrayRecord.
  'imagefolder:PATH' PATH/train/<class>/* and PATH/test/<class>/* image files (`IMAGE_EXTENSIONS`,
                     other files are skipped), classes numbered in sorted folder-name order,
                     decoded to RGB, normalised with the ImageNet statistics.
Split names are 'train' and 'test' ('test' reads TFDS 'validation' where there is no 'test').

TFDS data lives in `data_dir`: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.
Only the ArrayRecord format gives grain random access, and reading needs no TensorFlow
(images decode with pillow). Preparing CIFAR/ImageNet does need TensorFlow (the `tf` extra).

Default augmentation (see `augment`): the presets name theirs; other datasets get 'cifar' when
their images are square, of one size and at most 64 px a side (the size of the first training
image for an image folder), else 'imagenet' at 224x224.
"""

import dataclasses
import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from aff_jax.data import multiscale

SPLITS = ('train', 'test')
IMAGEFOLDER_PREFIX = 'imagefolder:'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')

# ImageNet statistics: the official train_imagenet.py's 0-255 constants, in [0, 1] units.
IMAGENET_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
IMAGENET_STD = (58.393 / 255, 57.12 / 255, 57.375 / 255)
# The official train_cifar.py's constants (for CIFAR-10 and CIFAR-100 alike).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DEFAULT_IMAGE_SIZE = 224   # for 'imagenet' augmentation when the stored size varies
SMALL_IMAGE_SIDE = 64      # square images up to this side default to 'cifar' augmentation


class DatasetNotFoundError(ValueError):
    """A known dataset whose files are not prepared (or not as ArrayRecord) in the data dir."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset.

    image_shape: (H, W, C) of the images `make_iterator` yields when `image_size` is None.
    mean, std: per-channel normalisation in [0, 1] pixel units.
    augment: the default augmentation kind, one of `augment.AUGMENTS`.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A resolved name: its info and one `grain.MapDataset` per split in `SPLITS`."""

    info: DatasetInfo
    splits: dict


@dataclasses.dataclass(frozen=True)
class _TfdsPreset:
    tfds_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    label_key: str = 'label'
    test_split: str = 'test'
    manual_download: bool = False


PRESETS = {
    'aff_multiscale': _TfdsPreset('aff_multiscale', multiscale.MEAN, multiscale.STD, 'cifar'),
    'cifar10': _TfdsPreset('cifar10', CIFAR_MEAN, CIFAR_STD, 'cifar'),
    'cifar100': _TfdsPreset('cifar100', CIFAR_MEAN, CIFAR_STD, 'cifar'),
    'cifar100_coarse': _TfdsPreset(
        'cifar100', CIFAR_MEAN, CIFAR_STD, 'cifar', label_key='coarse_label'
    ),
    'imagenet2012': _TfdsPreset(
        'imagenet2012', IMAGENET_MEAN, IMAGENET_STD, 'imagenet',
        test_split='validation', manual_download=True,
    ),
}


def resolve_data_dir(data_dir=None) -> str:
    """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def load(name: str, data_dir=None) -> Dataset:
    """Resolves a dataset name (see the module docstring) into its info and splits."""
    if not isinstance(name, str) or not name:
        raise ValueError(f'dataset name must be a non-empty string, got {name!r}')
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_imagefolder(name[len(IMAGEFOLDER_PREFIX):])
    return _load_tfds(name, resolve_data_dir(data_dir))


def _default_augment(image_shape) -> str:
    """'cifar' for small square images of one stored size, else 'imagenet'."""
    height, width, _ = image_shape
    small = height is not None and height == width and height <= SMALL_IMAGE_SIDE
    return 'cifar' if small else 'imagenet'


def _output_shape(augment_kind: str, image_shape) -> tuple[int, int, int]:
    """The stored (H, W, C) where the augmentation keeps it, else 224x224."""
    if augment_kind == 'imagenet':
        return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, image_shape[-1]
    return tuple(image_shape)


def _default_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet statistics; for non-RGB images their channel average (as timm does for grey)."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (float(np.mean(IMAGENET_MEAN)),) * channels, (float(np.mean(IMAGENET_STD)),) * channels


@dataclasses.dataclass(frozen=True)
class _SelectImageLabel(grain.transforms.Map):
    """A TFDS record -> {'image': (H, W, C) uint8, 'label': int} read from `label_key`."""

    label_key: str

    def map(self, element):
        return {'image': element['image'], 'label': int(element[self.label_key])}


def _prepared_multiscale(data_dir: str):
    builder = multiscale.AffMultiscale(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:
        builder.download_and_prepare(file_format='array_record')
    except FileExistsError:
        # Another process sharing data_dir renamed its finished build into place first.
        return multiscale.AffMultiscale(data_dir=data_dir)
    return builder


def _tfds_builder(name: str, data_dir: str):
    if name == 'aff_multiscale':
        return _prepared_multiscale(data_dir), PRESETS[name]
    preset = PRESETS.get(name)
    try:
        builder = tfds.builder(preset.tfds_name if preset else name, data_dir=data_dir)
    except (ValueError, AssertionError, ImportError) as error:  # incl. tfds' DatasetNotFoundError
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"unknown dataset {name!r} (tfds: {reason}); expected 'aff_multiscale', "
            f"'imagefolder:PATH' or a TFDS image-classification dataset "
            f"(presets: {', '.join(sorted(PRESETS))})"
        ) from None
    if preset is None:
        features = builder.info.features
        if 'image' not in features or 'label' not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has no 'image' and 'label' features "
                f"(it has {sorted(features)}), so it is not an image-classification dataset"
            )
        augment_kind = _default_augment(features['image'].shape)
        mean, std = _default_statistics(features['image'].shape[-1])
        splits = builder.info.splits
        test_split = 'validation' if 'validation' in splits and 'test' not in splits else 'test'
        preset = _TfdsPreset(name, mean, std, augment_kind, test_split=test_split)
    return builder, preset


def _not_prepared_message(name: str, preset: _TfdsPreset, builder, data_dir: str) -> str:
    command = f'tfds build {preset.tfds_name} --file_format=array_record --data_dir={data_dir}'
    if preset.manual_download:
        command += ' --manual_dir=DIR'
    message = (
        f'dataset {name!r} is not prepared as ArrayRecord in {data_dir} '
        f'(looked for {builder.data_path}). Prepare it once with `{command}` '
        f"(needs TensorFlow: pip install 'aff-jax[tf]')"
    )
    if preset.manual_download:
        message += (
            ', where DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar downloaded '
            'by hand from image-net.org'
        )
    return message + ', or point data_dir / $TFDS_DATA_DIR at a directory where it is prepared.'


def _load_tfds(name: str, data_dir: str) -> Dataset:
    builder, preset = _tfds_builder(name, data_dir)
    tfds_splits = {'train': 'train', 'test': preset.test_split}
    try:
        by_split = {s: builder.as_data_source(split=tfds_splits[s]) for s in SPLITS}
    except (NotImplementedError, ValueError, KeyError, FileNotFoundError) as error:
        if not builder.is_prepared():
            message = _not_prepared_message(name, preset, builder, data_dir)
            raise DatasetNotFoundError(message) from None
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DatasetNotFoundError(
                f'dataset {name!r} in {builder.data_path} is prepared as '
                f'{builder.info.file_format.value}; random access needs ArrayRecord: '
                f'rebuild with `tfds build {preset.tfds_name} --file_format=array_record '
                f'--data_dir={data_dir}`'
            ) from error
        raise
    features = builder.info.features
    if preset.label_key not in features:
        raise ValueError(f'dataset {name!r} has no label feature {preset.label_key!r}')
    info = DatasetInfo(
        num_classes=features[preset.label_key].num_classes,
        image_shape=_output_shape(preset.augment, features['image'].shape),
        num_train=len(by_split['train']),
        num_test=len(by_split['test']),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        augment=preset.augment,
    )
    select = _SelectImageLabel(preset.label_key)
    splits = {s: grain.MapDataset.source(src).map(select) for s, src in by_split.items()}
    return Dataset(info, splits)


class ImageFolderSource:
    """Random access to image files: item i -> {'image': (H, W, 3) uint8 RGB, 'label': int}."""

    def __init__(self, paths, labels):
        self._paths = list(paths)
        self._labels = list(labels)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int):
        with Image.open(self._paths[index]) as image:
            pixels = np.asarray(image.convert('RGB'))
        return {'image': pixels, 'label': self._labels[index]}


def _class_files(split_dir: str) -> dict[str, list[str]]:
    """Class folder name -> sorted image paths (files with `IMAGE_EXTENSIONS`, any case)."""
    classes = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.is_dir():
            classes[entry.name] = sorted(
                os.path.join(entry.path, f) for f in os.listdir(entry.path)
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
    return classes


def _load_imagefolder(root: str) -> Dataset:
    if not os.path.isdir(root):
        raise ValueError(f'imagefolder: {root!r} is not a directory')
    files = {}
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise ValueError(
                f'imagefolder: {split_dir!r} is missing (need train/ and test/, a folder per class)'
            )
        files[split] = _class_files(split_dir)
        if not any(files[split].values()):
            raise ValueError(
                f'imagefolder: no class folder with images ({", ".join(IMAGE_EXTENSIONS)}) '
                f'in {split_dir!r}'
            )
    class_names = sorted(files['train'])
    empty = [c for c in class_names if not files['train'][c]]
    if empty:
        raise ValueError(f'imagefolder: class folders without images in {root}/train: {empty}')
    unknown = sorted(set(files['test']) - set(class_names))
    if unknown:
        raise ValueError(f'imagefolder: classes in {root}/test that train/ lacks: {unknown}')
    index = {name: i for i, name in enumerate(class_names)}
    by_split = {}
    for split in SPLITS:
        pairs = [(path, index[c]) for c, paths in files[split].items() for path in paths]
        by_split[split] = ImageFolderSource(*zip(*pairs))
    with Image.open(files['train'][class_names[0]][0]) as first:
        width, height = first.size
    augment_kind = _default_augment((height, width, 3))
    info = DatasetInfo(
        num_classes=len(class_names),
        image_shape=_output_shape(augment_kind, (height, width, 3)),
        num_train=len(by_split['train']),
        num_test=len(by_split['test']),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=augment_kind,
    )
    return Dataset(info, {s: grain.MapDataset.source(src) for s, src in by_split.items()})
