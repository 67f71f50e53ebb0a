"""Per-image preprocessing in numpy/pillow, and the grain transforms that apply it.

Images are single HWC arrays: (H, W, C) uint8 as stored; a segmentation label is an (H, W)
uint8 map of class indices that every geometric step moves with its image. The last
transform, `Normalize`, turns images into (H, W, C) float32 `(x / 255 - mean) / std` with
per-channel mean/std in [0, 1] units, and labels into int32. Random choices come from the
`np.random.Generator` that grain's `random_map` derives from the pipeline seed and the
element's index, so they are reproducible and need no state in a checkpoint.

Kinds of augmentation (`AUGMENTS`):
  'cifar'    train: zero-pad 4 px (black, as gluoncv's `RandomCrop(32, pad=4)` in the official
             train_cifar.py), random crop back to the stored size, random horizontal flip.
             eval: unchanged.
  'imagenet' train: Inception random resized crop (area scale (0.08, 1), aspect ratio
             (3/4, 4/3), torchvision's sampling with 10 attempts and a centre fallback), bilinear
             resize to `size` x `size`, random horizontal flip.
             eval: resize the shorter side to ceil(size / 0.875), centre crop `size` x `size`
             (the official train_imagenet.py's crop ratio).
  'segmentation'  (label maps) train: scale image and label map by a factor uniform in
             `SEGMENTATION_SCALE` (image bilinear, label map nearest), take a random `size` x
             `size` window of the result (where the scaled image is smaller, the window reaches
             past it: image padded with 0, label map with `IGNORE_LABEL`), random horizontal
             flip of both. eval: resize image (bilinear) and label map (nearest) to `size` x
             `size` (a no-op at the stored size).
  'none'     no change in train or eval.
'cifar' and 'none' keep the stored size, so every image must already be `size` x `size`.
The classification kinds move the image alone, so segmentation takes 'segmentation' or
'none' (`TASK_AUGMENTS`).

A classification kind may add a `auto_augment.Policy` (AutoAugment, RandAugment) in training:
it runs on the image the kind produced (after crop and flip, as torchvision and timm order
them; the official Gluon scripts run it before the crop, on the stored image).
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from PIL import Image

from aff_jax.data.auto_augment import Policy
from aff_jax.data.sources import IGNORE_LABEL

AUGMENTS = ('cifar', 'imagenet', 'none', 'segmentation')
TASK_AUGMENTS = {
    'classification': ('cifar', 'imagenet', 'none'),
    'segmentation': ('segmentation', 'none'),
}
RESIZING_AUGMENTS = ('imagenet', 'segmentation')   # any stored size -> `size` x `size`
SEGMENTATION_SCALE = (0.5, 2.0)
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


def resize_label_map(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) uint8 label map; no-op at the same size."""
    if label.shape == (height, width):
        return label
    return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def rescale_pair(image: np.ndarray, label: np.ndarray, scale: float):
    """Image (H, W, C) and label map (H, W) scaled by `scale`, sides rounded (at least 1 px)."""
    height, width = label.shape
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    return resize(image, new_height, new_width), resize_label_map(label, new_height, new_width)


def window(array: np.ndarray, top: int, left: int, size: int, fill: int) -> np.ndarray:
    """The `size` x `size` window at (top, left) of an (H, W, ...) array extended by `fill`.

    top/left may be negative and the window may reach past the bottom/right edge: it holds
    `fill` wherever it leaves the array.
    """
    height, width = array.shape[:2]
    out = np.full((size, size) + array.shape[2:], fill, array.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, height), min(left + size, width)
    if y0 < y1 and x0 < x1:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = array[y0:y1, x0:x1]
    return out


def crop_pair(image: np.ndarray, label: np.ndarray, top: int, left: int, size: int):
    """The same `window` of image (padded with 0) and label map (padded with IGNORE_LABEL)."""
    return window(image, top, left, size, 0), window(label, top, left, size, IGNORE_LABEL)


def _window_start(length: int, size: int, rng: np.random.Generator) -> int:
    """Uniform over the starts where the window lies inside the image, or holds it if smaller."""
    low, high = sorted((0, length - size))
    return int(rng.integers(low, high + 1))


def _check_label_map(image: np.ndarray, label) -> None:
    if np.shape(label) != image.shape[:2]:
        raise ValueError(
            f"augment 'segmentation' needs a label map of the image's (H, W) {image.shape[:2]}, "
            f'got a label of shape {np.shape(label)}'
        )


def _check_stored_size(image: np.ndarray, size: int, kind: str) -> None:
    if image.shape[:2] != (size, size):
        raise ValueError(
            f"augment {kind!r} keeps the stored image size, so images must be {size}x{size}; got "
            f"one of shape {image.shape}. Use augment 'imagenet' to resize images of other sizes."
        )


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
    """{'image': (H, W, C) uint8, 'label'} -> same keys, image (size, size, C) uint8.

    A label map ('segmentation') comes out (size, size) uint8; a class label unchanged.
    """

    kind: str
    size: int
    policy: Policy | None = None

    def random_map(self, element, rng: np.random.Generator):
        image = element['image']
        if self.kind == 'segmentation':
            return self._segmentation(image, element['label'], rng)
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
        if self.policy is not None:
            image = self.policy(image, rng)
        return {'image': image, 'label': element['label']}

    def _segmentation(self, image, label, rng):
        _check_label_map(image, label)
        image, label = rescale_pair(image, label, rng.uniform(*SEGMENTATION_SCALE))
        top = _window_start(label.shape[0], self.size, rng)
        left = _window_start(label.shape[1], self.size, rng)
        image, label = crop_pair(image, label, top, left, self.size)
        if rng.random() < 0.5:
            image, label = flip_left_right(image), flip_left_right(label)
        return {'image': image, 'label': label}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
    """{'image': (H, W, C) uint8, 'label'} -> same keys, image (size, size, C) uint8.

    A label map ('segmentation') comes out (size, size) uint8; a class label unchanged.
    """

    kind: str
    size: int

    def map(self, element):
        image = element['image']
        if self.kind == 'segmentation':
            _check_label_map(image, element['label'])
            label = resize_label_map(element['label'], self.size, self.size)
            return {'image': resize(image, self.size, self.size), 'label': label}
        if self.kind == 'imagenet':
            image = resize_and_center_crop(image, self.size)
        else:
            _check_stored_size(image, self.size, self.kind)
        return {'image': image, 'label': element['label']}


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """{'image': uint8, 'label'} -> {'image': float32 normalised, 'label': int32, 'mask': 1.0}.

    'label' keeps its shape: () for a class, (H, W) for a label map.
    """

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
