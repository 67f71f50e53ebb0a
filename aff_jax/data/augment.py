"""Per-image preprocessing in numpy/pillow, and the grain transforms that apply it.

Images are single HWC arrays: (H, W, C) uint8 as stored. The last transform, `Normalize`,
turns them into (H, W, C) float32 `(x / 255 - mean) / std` with per-channel mean/std in [0, 1]
units. Random choices come from the `np.random.Generator` that grain's `random_map` derives
from the pipeline seed and the element's index, so they are reproducible and need no state
in a checkpoint.

Kinds of augmentation (`AUGMENTS`):
  'cifar'    train: zero-pad 4 px (black, as gluoncv's `RandomCrop(32, pad=4)` in the official
             train_cifar.py), random crop back to the stored size, random horizontal flip.
             eval: unchanged.
  'imagenet' train: Inception random resized crop (area scale (0.08, 1), aspect ratio
             (3/4, 4/3), torchvision's sampling with 10 attempts and a centre fallback), bilinear
             resize to `size` x `size`, random horizontal flip.
             eval: resize the shorter side to ceil(size / 0.875), centre crop `size` x `size`
             (the official train_imagenet.py's crop ratio).
  'none'     no change in train or eval.
'cifar' and 'none' keep the stored size, so every image must already be `size` x `size`.
"""

import dataclasses
import math

import grain
import numpy as np
from PIL import Image

AUGMENTS = ('cifar', 'imagenet', 'none')
CIFAR_PAD = 4
EVAL_CROP_RATIO = 0.875
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def pad_and_crop(image: np.ndarray, pad: int, top: int, left: int) -> np.ndarray:
    """Zero-pads `pad` px on all sides, returns the (H, W) window at (top, left) of the result."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return padded[top:top + height, left:left + width]


def flip_left_right(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Inception crop box (top, left, box_height, box_width) inside a `height` x `width` image.

    Area fraction uniform in `scale`, aspect ratio (width / height) log-uniform in `ratio`;
    after `attempts` boxes that do not fit, the largest centred box with the ratio clamped.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        box_width = round(math.sqrt(target_area * aspect))
        box_height = round(math.sqrt(target_area / aspect))
        if 0 < box_width <= width and 0 < box_height <= height:
            top = int(rng.integers(0, height - box_height + 1))
            left = int(rng.integers(0, width - box_width + 1))
            return top, left, box_height, box_width
    aspect = width / height
    if aspect < ratio[0]:
        box_width, box_height = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        box_height, box_width = height, round(height * ratio[1])
    else:
        box_height, box_width = height, width
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (H, W, C) uint8 image with C in {1, 3, 4}; no-op at the same size."""
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(f'resize handles 1, 3 or 4 channels, got an image of shape {image.shape}')
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return resized.reshape(height, width, channels)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centred `size` x `size` window; the odd pixel, if any, is left on the bottom/right."""
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f'cannot centre-crop {size}x{size} from an image of shape {image.shape}')
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Shorter side to ceil(size / 0.875) (the other side scaled and rounded), centre crop."""
    height, width = image.shape[:2]
    short = math.ceil(size / EVAL_CROP_RATIO)
    if height <= width:
        new_height, new_width = short, max(short, round(width * short / height))
    else:
        new_height, new_width = max(short, round(height * short / width)), short
    return center_crop(resize(image, new_height, new_width), size)


def _check_stored_size(image: np.ndarray, size: int, kind: str) -> None:
    if image.shape[:2] != (size, size):
        raise ValueError(
            f"augment {kind!r} keeps the stored image size, so images must be {size}x{size}; got "
            f"one of shape {image.shape}. Use augment 'imagenet' to resize images of other sizes."
        )


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
    """{'image': (H, W, C) uint8, 'label'} -> same keys, image (size, size, C) uint8."""

    kind: str
    size: int

    def random_map(self, element, rng: np.random.Generator):
        image = element['image']
        if self.kind == 'imagenet':
            top, left, box_height, box_width = sample_crop_box(*image.shape[:2], rng)
            box = image[top:top + box_height, left:left + box_width]
            image = resize(box, self.size, self.size)
        else:
            _check_stored_size(image, self.size, self.kind)
        if self.kind == 'cifar':
            top, left = rng.integers(0, 2 * CIFAR_PAD + 1, 2)
            image = pad_and_crop(image, CIFAR_PAD, top, left)
        if self.kind != 'none' and rng.random() < 0.5:
            image = flip_left_right(image)
        return {'image': image, 'label': element['label']}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
    """{'image': (H, W, C) uint8, 'label'} -> same keys, image (size, size, C) uint8."""

    kind: str
    size: int

    def map(self, element):
        image = element['image']
        if self.kind == 'imagenet':
            image = resize_and_center_crop(image, self.size)
        else:
            _check_stored_size(image, self.size, self.kind)
        return {'image': image, 'label': element['label']}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """{'image': uint8, 'label'} -> {'image': float32 normalised, 'label': int32, 'mask': 1.0}."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def map(self, element):
        image = element['image']
        if image.shape[-1] != len(self.mean):
            raise ValueError(
                f'image of shape {image.shape} does not match the {len(self.mean)}-channel mean/std'
            )
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        image = (image.astype(np.float32) / 255.0 - mean) / std
        return {'image': image, 'label': np.int32(element['label']), 'mask': np.float32(1.0)}
