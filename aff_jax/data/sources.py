"""Dataset names -> random-access splits of {'image': (H, W, C) uint8, 'label'} + metadata.

'label' is an int for classification datasets and an (H, W) uint8 map of class indices for
segmentation datasets (`IGNORE_LABEL` marks pixels without a class).

Names:
  'aff_multiscale'   the embedded generated classification dataset (`multiscale.py`), prepared
                     on first use.
  'aff_stopsign'     the embedded generated segmentation dataset (`stopsign.py`), likewise.
  'cifar10', 'cifar100', 'imagenet2012'   TFDS datasets prepared as ArrayRecord.
  'cifar100_coarse'  TFDS cifar100 labelled by its 20 super-classes ('coarse_label').
  any other TFDS image-classification name  ('image' and 'label' features), as ArrayRecord.
  'imagefolder:PATH' PATH/train/<class>/* and PATH/test/<class>/* image files (`IMAGE_EXTENSIONS`,
                     other files are skipped), classes numbered in sorted folder-name order,
                     decoded to RGB, normalised with the ImageNet statistics.
  'segfolder:PATH'   segmentation: PATH/{train,test}/images/* (`IMAGE_EXTENSIONS`, decoded to
                     RGB) and PATH/{train,test}/masks/*.png, paired by file name stem. A mask is
                     a single-channel 8-bit PNG ('L', or 'P' read as its palette indices) of
                     class indices, `IGNORE_LABEL` = ignore, the size of its image. Classes:
                     the lines of PATH/classes.txt if present (`num_classes`, if given, must
                     match), else `num_classes` named 'class_0', ..., by default the largest
                     label seen + 1. Every pair is checked when the folder is loaded. Images may
                     differ in size: `image_shape` is (S, S, 3)
                     when all are S x S, else `SEGMENTATION_IMAGE_SIZE` square (the training
                     crop and the eval resize; `make_iterator(image_size=...)` overrides it).
                     Normalised with the ImageNet statistics.
Split names are 'train' and 'test' ('test' reads TFDS 'validation' where there is no 'test').

Loading a folder (either kind) decodes every file once, before any training step (see
`file_checks`: in parallel, verdicts cached on disk by path, size and mtime). Files that are
empty, not images or truncated raise one ValueError listing them (the first
`file_checks.MAX_LISTED`, each with its reason) and their count; `skip_bad_files=True` instead
leaves them out (a segmentation pair goes with either of its files), logs each, and counts only
the rest in `num_train` / `num_test`; a training class folder or a split left without examples
is still an error, and so is a mask that decodes but breaks the rules above (mode, size,
labels). The scan of a folder is cached per (path, num_classes, skip_bad_files) for
the life of the process (`clear_folder_cache` forgets it). TFDS datasets are not checked: they
are written by their builders.

TFDS data lives in `data_dir`: the argument, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.
Only the ArrayRecord format gives grain random access, and reading needs no TensorFlow
(images decode with pillow). Preparing CIFAR/ImageNet does need TensorFlow (the `tf` extra).

Default augmentation (see `augment`): the presets name theirs; segmentation folders get
'segmentation'; other datasets get 'cifar' when their images are square, of one size and at
most 64 px a side (the size of the first training image for an image folder), else 'imagenet'
at 224x224.
"""

import dataclasses
import functools
import os

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from aff_jax.data import file_checks, multiscale, stopsign

SPLITS = ('train', 'test')
IMAGEFOLDER_PREFIX = 'imagefolder:'
SEGFOLDER_PREFIX = 'segfolder:'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
IGNORE_LABEL = 255         # label-map value of pixels that count for no class

# ImageNet statistics: the official train_imagenet.py's 0-255 constants, in [0, 1] units.
IMAGENET_MEAN = (123.68 / 255, 116.779 / 255, 103.939 / 255)
IMAGENET_STD = (58.393 / 255, 57.12 / 255, 57.375 / 255)
# The official train_cifar.py's constants (for CIFAR-10 and CIFAR-100 alike).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DEFAULT_IMAGE_SIZE = 224   # for 'imagenet' augmentation when the stored size varies
SMALL_IMAGE_SIDE = 64      # square images up to this side default to 'cifar' augmentation
SEGMENTATION_IMAGE_SIZE = 256   # segmentation folders whose images are not all one square size


class DatasetNotFoundError(ValueError):
    """A known dataset whose files are not prepared (or not as ArrayRecord) in the data dir."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset.

    image_shape: (H, W, C) of the images `make_iterator` yields when `image_size` is None.
    mean, std: per-channel normalisation in [0, 1] pixel units.
    augment: the default augmentation kind, one of `augment.AUGMENTS`.
    task: 'classification' (a label per image) or 'segmentation' (a label map per image).
    class_names: the names of labels 0 .. num_classes - 1.
    """

    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    task: str = 'classification'
    # compare=False: names describe the classes but shape no model or pipeline, so an info
    # written without them (as callers and tests did before names existed) still equals the
    # loaded one.
    class_names: tuple[str, ...] = dataclasses.field(default=(), compare=False)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A resolved name: its info and one `grain.MapDataset` per split in `SPLITS`."""

    info: DatasetInfo
    splits: dict


@dataclasses.dataclass(frozen=True)
class _TfdsPreset:
    """How to read a TFDS dataset. Segmentation presets name their classes (`class_names`), as
    their label feature (an (H, W, 1) image) does not; classification ones read a ClassLabel."""

    tfds_name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    label_key: str = 'label'
    test_split: str = 'test'
    manual_download: bool = False
    task: str = 'classification'
    class_names: tuple[str, ...] = ()


PRESETS = {
    'aff_multiscale': _TfdsPreset('aff_multiscale', multiscale.MEAN, multiscale.STD, 'cifar'),
    'aff_stopsign': _TfdsPreset(
        'aff_stopsign', stopsign.MEAN, stopsign.STD, 'segmentation',
        label_key='segmentation_mask', task='segmentation', class_names=stopsign.CLASS_NAMES,
    ),
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


def load(name: str, data_dir=None, num_classes=None, skip_bad_files=False) -> Dataset:
    """Resolves a dataset name (see the module docstring) into its info and splits.

    num_classes: for 'segfolder:' names only (None: inferred); other datasets ignore it.
    skip_bad_files: for folder names only: leave out (and log) the files that fail to decode
      instead of raising one ValueError that lists them; other datasets ignore it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f'dataset name must be a non-empty string, got {name!r}')
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_imagefolder(name[len(IMAGEFOLDER_PREFIX):], bool(skip_bad_files))
    if name.startswith(SEGFOLDER_PREFIX):
        return _load_segfolder(name[len(SEGFOLDER_PREFIX):], num_classes, bool(skip_bad_files))
    return _load_tfds(name, resolve_data_dir(data_dir))


def clear_folder_cache() -> None:
    """Forgets this process's folder scans, so that the next load lists the folder again (its
    files are decoded again only where the verdict cache of `file_checks` misses)."""
    _scan_imagefolder.cache_clear()
    _scan_segfolder.cache_clear()


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


@dataclasses.dataclass(frozen=True)
class _SelectImageLabelMap(grain.transforms.Map):
    """A TFDS record -> {'image': (H, W, C) uint8, 'label': (H, W) uint8} from `label_key`."""

    label_key: str

    def map(self, element):
        return {'image': element['image'], 'label': element[self.label_key][..., 0]}


# The generated datasets this package embeds, prepared in the data dir on first use.
_EMBEDDED_BUILDERS = {
    'aff_multiscale': multiscale.AffMultiscale,
    'aff_stopsign': stopsign.AffStopsign,
}


def _prepared(builder_class, data_dir: str):
    builder = builder_class(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    try:
        builder.download_and_prepare(file_format='array_record')
    except FileExistsError:
        # Another process sharing data_dir renamed its finished build into place first.
        return builder_class(data_dir=data_dir)
    return builder


def _tfds_builder(name: str, data_dir: str):
    if name in _EMBEDDED_BUILDERS:
        return _prepared(_EMBEDDED_BUILDERS[name], data_dir), PRESETS[name]
    preset = PRESETS.get(name)
    try:
        builder = tfds.builder(preset.tfds_name if preset else name, data_dir=data_dir)
    except (ValueError, AssertionError, ImportError) as error:  # incl. tfds' DatasetNotFoundError
        reason = str(error).strip().splitlines()[0]
        raise ValueError(
            f"unknown dataset {name!r} (tfds: {reason}); expected 'aff_multiscale', "
            f"'aff_stopsign', 'imagefolder:PATH', 'segfolder:PATH' or a TFDS "
            f"image-classification dataset "
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
    if preset.task == 'segmentation':
        class_names = preset.class_names
        select = _SelectImageLabelMap(preset.label_key)
    else:
        # A ClassLabel made from num_classes alone names its classes '0', '1', ...
        class_names = tuple(features[preset.label_key].names)
        select = _SelectImageLabel(preset.label_key)
    info = DatasetInfo(
        num_classes=len(class_names),
        image_shape=_output_shape(preset.augment, features['image'].shape),
        num_train=len(by_split['train']),
        num_test=len(by_split['test']),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        augment=preset.augment,
        task=preset.task,
        class_names=class_names,
    )
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


@dataclasses.dataclass(frozen=True)
class _ImageFolderScan:
    """A checked image folder: split -> class name -> image paths, and the classes (train's)."""

    files: dict
    class_names: tuple[str, ...]
    first_size: tuple[int, int]   # (width, height) of the first training image


def _check_train_classes(root: str, files: dict, after: str = '') -> None:
    """Raises naming the training class folders in `files` without images."""
    empty = [c for c, paths in files['train'].items() if not paths]
    if empty:
        raise ValueError(f'imagefolder: class folders without images in {root}/train{after}: '
                         f'{empty}')


@functools.lru_cache(maxsize=None)
def _scan_imagefolder(root: str, skip_bad_files: bool) -> _ImageFolderScan:
    """Lists and checks folder `root` (a resolved path): the layout, then every file (see
    `file_checks`); once per process and `skip_bad_files`. Errors are not cached."""
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
    _check_train_classes(root, files)
    unknown = sorted(set(files['test']) - set(files['train']))
    if unknown:
        raise ValueError(f'imagefolder: classes in {root}/test that train/ lacks: {unknown}')
    paths = [path for split in SPLITS for class_paths in files[split].values()
             for path in class_paths]
    checked = file_checks.check(root, paths)
    file_checks.report_bad('imagefolder', checked.bad, len(paths), skip_bad_files)
    if checked.bad:
        files = {split: {c: [p for p in class_paths if p in checked.good]
                         for c, class_paths in files[split].items()} for split in SPLITS}
        _check_train_classes(root, files, ' once the bad files are left out')
        if not any(files['test'].values()):
            raise ValueError(f'imagefolder: no readable images in {root}/test')
    class_names = tuple(files['train'])   # sorted by `_class_files`
    first_size = checked.good[files['train'][class_names[0]][0]].size
    return _ImageFolderScan(files, class_names, first_size)


def _load_imagefolder(root: str, skip_bad_files: bool) -> Dataset:
    scan = _scan_imagefolder(os.path.realpath(root), skip_bad_files)
    index = {name: i for i, name in enumerate(scan.class_names)}
    by_split = {}
    for split in SPLITS:
        pairs = [(path, index[c]) for c, paths in scan.files[split].items() for path in paths]
        by_split[split] = ImageFolderSource(*zip(*pairs))
    width, height = scan.first_size
    augment_kind = _default_augment((height, width, 3))
    info = DatasetInfo(
        num_classes=len(scan.class_names),
        image_shape=_output_shape(augment_kind, (height, width, 3)),
        num_train=len(by_split['train']),
        num_test=len(by_split['test']),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment=augment_kind,
        class_names=scan.class_names,
    )
    return Dataset(info, {s: grain.MapDataset.source(src) for s, src in by_split.items()})


class SegFolderSource:
    """Random access to image/mask file pairs.

    Item i -> {'image': (H, W, 3) uint8 RGB, 'label': (H, W) uint8 class indices}.
    """

    def __init__(self, pairs):
        self._pairs = list(pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int):
        image_path, mask_path = self._pairs[index]
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert('RGB'))
        with Image.open(mask_path) as mask:
            label = np.asarray(mask)  # 'L' or 'P' (checked by the scan): the stored indices
        return {'image': pixels, 'label': label}


@dataclasses.dataclass(frozen=True)
class _SegFolderScan:
    """A checked segmentation folder: (image, mask) path pairs per split and its classes."""

    pairs: dict
    class_names: tuple[str, ...]
    square_side: int | None   # S when every image is S x S, else None


_CLASSES_FILE = 'classes.txt'


def _files_by_stem(directory: str, extensions, what: str) -> dict[str, str]:
    """File name stem -> path of the files in `directory` with `extensions` (any case)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        stem, extension = os.path.splitext(name)
        path = os.path.join(directory, name)
        if extension.lower() not in extensions or not os.path.isfile(path):
            continue
        if stem in files:
            raise ValueError(f'segfolder: {what}s {files[stem]!r} and {path!r} share a name stem')
        files[stem] = path
    return files


def _split_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """Sorted (image path, mask path) pairs of `split`, every image with a mask and vice versa."""
    images_dir, masks_dir = (os.path.join(root, split, sub) for sub in ('images', 'masks'))
    for directory in (images_dir, masks_dir):
        if not os.path.isdir(directory):
            raise ValueError(
                f'segfolder: {directory!r} is missing (need train/ and test/, each with images/ '
                f'and masks/)'
            )
    images = _files_by_stem(images_dir, IMAGE_EXTENSIONS, 'image')
    masks = _files_by_stem(masks_dir, ('.png',), 'mask')
    if not images:
        raise ValueError(f'segfolder: no images ({", ".join(IMAGE_EXTENSIONS)}) in {images_dir!r}')
    for stem, path in images.items():
        if stem not in masks:
            mask = os.path.join(masks_dir, stem + '.png')
            raise ValueError(f'segfolder: image {path!r} has no mask {mask!r}')
    for stem, path in masks.items():
        if stem not in images:
            raise ValueError(f'segfolder: mask {path!r} has no image of the same stem in '
                             f'{images_dir!r}')
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _mask_labels(image_path: str, mask_path: str, facts: dict) -> tuple[np.ndarray, tuple]:
    """The sorted labels present in a mask, and its image's (width, height); checks the pair.

    facts: path -> `file_checks.Facts` of both files.
    """
    image, mask = facts[image_path], facts[mask_path]
    if mask.mode not in file_checks.LABEL_MODES:
        raise ValueError(
            f'segfolder: mask {mask_path!r} has PIL mode {mask.mode!r}; masks must be '
            f"single-channel 8-bit PNGs ('L' or 'P') of class indices"
        )
    if mask.size != image.size:
        raise ValueError(
            f'segfolder: mask {mask_path!r} is {mask.size[0]}x{mask.size[1]} (WxH) but its '
            f'image {image_path!r} is {image.size[0]}x{image.size[1]}'
        )
    return np.asarray(mask.labels, np.int64), image.size


def _read_class_names(path: str) -> tuple[str, ...]:
    """The lines of a classes.txt, one class name per line (trailing blank lines ignored)."""
    with open(path, encoding='utf-8') as file:
        names = [line.strip() for line in file.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f'segfolder: {path!r} is empty; give one class name per line')
    if '' in names:
        raise ValueError(f"segfolder: {path!r} line {names.index('') + 1} is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f'segfolder: {path!r} names classes more than once: {repeated}')
    return tuple(names)


def _class_names(root: str, num_classes, labels: dict) -> tuple[str, ...]:
    """Names of the folder's classes (see the module docstring); checks every mask's labels.

    labels: mask path -> the labels present in it.
    """
    classes_path = os.path.join(root, _CLASSES_FILE)
    names, origin = None, ''
    if os.path.isfile(classes_path):
        names = _read_class_names(classes_path)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f'segfolder: num_classes is {num_classes} but {classes_path!r} '
                             f'names {len(names)} classes')
        num_classes, origin = len(names), f' (the lines of {classes_path!r})'
    elif num_classes is None:
        seen = np.unique(np.concatenate(list(labels.values())))
        seen = seen[seen != IGNORE_LABEL]
        if not seen.size:
            raise ValueError(f'segfolder: every mask pixel in {root!r} is {IGNORE_LABEL} (ignore)')
        num_classes = int(seen[-1]) + 1
    for mask_path, present in labels.items():
        bad = present[(present >= num_classes) & (present != IGNORE_LABEL)]
        if bad.size:
            raise ValueError(
                f'segfolder: mask {mask_path!r} has label {bad[0]} but num_classes is '
                f'{num_classes}{origin}; labels must be < num_classes or {IGNORE_LABEL} (ignore)'
            )
    return names or tuple(f'class_{i}' for i in range(num_classes))


@functools.lru_cache(maxsize=None)
def _scan_segfolder(root: str, num_classes, skip_bad_files: bool) -> _SegFolderScan:
    """Checks every pair of folder `root` (a resolved path): the layout, every file (see
    `file_checks`), then each pair and the classes; once per process, `num_classes` and
    `skip_bad_files`. A bad file left out takes its pair with it. Errors are not cached: a
    load after fixing the folder scans it again.
    """
    if not os.path.isdir(root):
        raise ValueError(f'segfolder: {root!r} is not a directory')
    pairs = {split: _split_pairs(root, split) for split in SPLITS}
    every_pair = [pair for split in SPLITS for pair in pairs[split]]
    checked = file_checks.check(root, [image for image, _ in every_pair],
                                [mask for _, mask in every_pair])
    file_checks.report_bad('segfolder', checked.bad, 2 * len(every_pair), skip_bad_files)
    for split in SPLITS:
        pairs[split] = [(image, mask) for image, mask in pairs[split]
                        if image in checked.good and mask in checked.good]
        if not pairs[split]:
            raise ValueError(f'segfolder: no readable image and mask pair left in '
                             f'{os.path.join(root, split)!r} once the bad files are left out')
    labels, sizes = {}, set()
    for split in SPLITS:
        for image_path, mask_path in pairs[split]:
            labels[mask_path], size = _mask_labels(image_path, mask_path, checked.good)
            sizes.add(size)
    (width, height), *others = sizes
    square_side = width if not others and width == height else None
    return _SegFolderScan(pairs, _class_names(root, num_classes, labels), square_side)


def _load_segfolder(root: str, num_classes, skip_bad_files: bool) -> Dataset:
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
        or not 1 <= num_classes <= IGNORE_LABEL
    ):
        raise ValueError(
            f'segfolder: num_classes must be an integer in [1, {IGNORE_LABEL}] (masks are 8-bit, '
            f'{IGNORE_LABEL} = ignore), got {num_classes!r}'
        )
    num_classes = None if num_classes is None else int(num_classes)
    scan = _scan_segfolder(os.path.realpath(root), num_classes, skip_bad_files)
    side = scan.square_side or SEGMENTATION_IMAGE_SIZE
    info = DatasetInfo(
        num_classes=len(scan.class_names),
        image_shape=(side, side, 3),
        num_train=len(scan.pairs['train']),
        num_test=len(scan.pairs['test']),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        augment='segmentation',
        task='segmentation',
        class_names=scan.class_names,
    )
    return Dataset(
        info, {s: grain.MapDataset.source(SegFolderSource(scan.pairs[s])) for s in SPLITS}
    )
