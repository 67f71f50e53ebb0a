"""AutoAugment and RandAugment: learned and random sequences of image operations.

Both act on one (H, W, 3) uint8 RGB image and draw every random choice from the
`np.random.Generator` they are given (grain's, seeded by the pipeline seed and the element's
index), so the same (seed, example) always gets the same image.

Operations and magnitudes are those of torchvision's `AutoAugment` / `RandAugment` on PIL images
(which follow Cubuk et al.): each op is a PIL operation, its magnitude one of `num_bins` levels
spread linearly over the op's range, and the geometric and enhancement ops take a random sign.
Ranges: shear 0..0.3 (the shear factor), translate 0..150/331 of the image side (whole pixels),
rotate 0..30 degrees, brightness/color/contrast/sharpness factor 1 +- 0..0.9, posterize 8..4
bits, solarize threshold 255..0. Pixels that geometric ops move in from outside the image are
`FILL` grey, as in the paper's implementation (torchvision's default is black).

Policies (`POLICIES`): 'autoaugment_cifar10' and 'autoaugment_imagenet' are the 25 sub-policies
the paper found on reduced CIFAR-10 and ImageNet, 10 magnitude levels; one sub-policy is picked
per image, and each of its two ops is applied with its probability. 'randaugment' applies
`num_ops` ops drawn uniformly (with repetition, 'Identity' among them), each at level
`magnitude` of 31.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

FILL = (128, 128, 128)
AUTOAUGMENT_BINS = 10
RANDAUGMENT_BINS = 31

# (op, probability, magnitude level) pairs; None: the op has no magnitude.
CIFAR10_POLICY = (
    (('Invert', 0.1, None), ('Contrast', 0.2, 6)),
    (('Rotate', 0.7, 2), ('TranslateX', 0.3, 9)),
    (('Sharpness', 0.8, 1), ('Sharpness', 0.9, 3)),
    (('ShearY', 0.5, 8), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.5, None), ('Equalize', 0.9, None)),
    (('ShearY', 0.2, 7), ('Posterize', 0.3, 7)),
    (('Color', 0.4, 3), ('Brightness', 0.6, 7)),
    (('Sharpness', 0.3, 9), ('Brightness', 0.7, 9)),
    (('Equalize', 0.6, None), ('Equalize', 0.5, None)),
    (('Contrast', 0.6, 7), ('Sharpness', 0.6, 5)),
    (('Color', 0.7, 7), ('TranslateX', 0.5, 8)),
    (('Equalize', 0.3, None), ('AutoContrast', 0.4, None)),
    (('TranslateY', 0.4, 3), ('Sharpness', 0.2, 6)),
    (('Brightness', 0.9, 6), ('Color', 0.2, 8)),
    (('Solarize', 0.5, 2), ('Invert', 0.0, None)),
    (('Equalize', 0.2, None), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.2, None), ('Equalize', 0.6, None)),
    (('Color', 0.9, 9), ('Equalize', 0.6, None)),
    (('AutoContrast', 0.8, None), ('Solarize', 0.2, 8)),
    (('Brightness', 0.1, 3), ('Color', 0.7, 0)),
    (('Solarize', 0.4, 5), ('AutoContrast', 0.9, None)),
    (('TranslateY', 0.9, 9), ('TranslateY', 0.7, 9)),
    (('AutoContrast', 0.9, None), ('Solarize', 0.8, 3)),
    (('Equalize', 0.8, None), ('Invert', 0.1, None)),
    (('TranslateY', 0.7, 9), ('AutoContrast', 0.9, None)),
)
IMAGENET_POLICY = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
)
POLICIES = ('autoaugment_cifar10', 'autoaugment_imagenet', 'randaugment')
_AUTOAUGMENT = {'autoaugment_cifar10': CIFAR10_POLICY, 'autoaugment_imagenet': IMAGENET_POLICY}
RANDAUGMENT_OPS = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate',
                   'Brightness', 'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize',
                   'AutoContrast', 'Equalize')
SIGNED_OPS = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color',
              'Contrast', 'Sharpness')


def magnitude(op: str, level: int, bins: int, size: tuple[int, int]) -> float:
    """The magnitude of ``op`` at ``level`` in [0, bins) for an image of ``size`` (H, W),
    before its sign: a shear factor, pixels, degrees, an enhancement offset, bits or a
    threshold."""
    fraction = level / (bins - 1)
    if op in ('ShearX', 'ShearY'):
        return 0.3 * fraction
    if op == 'TranslateX':
        return 150 / 331 * size[1] * fraction
    if op == 'TranslateY':
        return 150 / 331 * size[0] * fraction
    if op == 'Rotate':
        return 30.0 * fraction
    if op in ('Brightness', 'Color', 'Contrast', 'Sharpness'):
        return 0.9 * fraction
    if op == 'Posterize':
        return float(8 - round(4 * fraction))
    if op == 'Solarize':
        return 255.0 * (1 - fraction)
    return 0.0


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) takes the input pixel nearest (a x + b y + c, d x + e y + f)."""
    return image.transform(image.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=FILL)


def apply_op(image: Image.Image, op: str, value: float) -> Image.Image:
    """``op`` at signed magnitude ``value`` (see `magnitude`) on an RGB PIL image."""
    if op == 'Identity':
        return image
    if op == 'ShearX':
        return _affine(image, (1.0, value, 0.0, 0.0, 1.0, 0.0))
    if op == 'ShearY':
        return _affine(image, (1.0, 0.0, 0.0, value, 1.0, 0.0))
    if op == 'TranslateX':
        return _affine(image, (1.0, 0.0, -float(int(value)), 0.0, 1.0, 0.0))
    if op == 'TranslateY':
        return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -float(int(value))))
    if op == 'Rotate':
        return image.rotate(value, Image.NEAREST, fillcolor=FILL)
    if op == 'Brightness':
        return ImageEnhance.Brightness(image).enhance(1.0 + value)
    if op == 'Color':
        return ImageEnhance.Color(image).enhance(1.0 + value)
    if op == 'Contrast':
        return ImageEnhance.Contrast(image).enhance(1.0 + value)
    if op == 'Sharpness':
        return ImageEnhance.Sharpness(image).enhance(1.0 + value)
    if op == 'Posterize':
        return ImageOps.posterize(image, int(value))
    if op == 'Solarize':
        return ImageOps.solarize(image, value)
    if op == 'AutoContrast':
        return ImageOps.autocontrast(image)
    if op == 'Equalize':
        return ImageOps.equalize(image)
    if op == 'Invert':
        return ImageOps.invert(image)
    raise ValueError(f'unknown augmentation op {op!r}')


def _signed(op: str, value: float, rng: np.random.Generator) -> float:
    return -value if op in SIGNED_OPS and rng.random() < 0.5 else value


@dataclasses.dataclass(frozen=True)
class Policy:
    """``policy(image, rng)``: (H, W, 3) uint8 -> (H, W, 3) uint8, one of `POLICIES`.

    num_ops, magnitude: RandAugment's (ignored by the AutoAugment policies).
    """
    name: str
    num_ops: int = 2
    magnitude: int = 9

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f'augmentation policy must be one of {POLICIES}, got {self.name!r}')
        if self.name == 'randaugment':
            if isinstance(self.num_ops, bool) or not isinstance(self.num_ops, int) \
                    or self.num_ops < 0:
                raise ValueError(f'randaugment_num_ops must be an integer >= 0, got '
                                 f'{self.num_ops!r}')
            if isinstance(self.magnitude, bool) or not isinstance(self.magnitude, int) \
                    or not 0 <= self.magnitude < RANDAUGMENT_BINS:
                raise ValueError(f'randaugment_magnitude must be an integer in '
                                 f'[0, {RANDAUGMENT_BINS}), got {self.magnitude!r}')

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f'augmentation policy {self.name!r} takes (H, W, 3) uint8 RGB '
                             f'images, got {image.dtype} of shape {image.shape}')
        size = image.shape[:2]
        pil = Image.fromarray(image)
        for op, value in self.draw(size, rng):
            pil = apply_op(pil, op, value)
        return np.asarray(pil)

    def draw(self, size: tuple[int, int], rng: np.random.Generator
             ) -> list[tuple[str, float]]:
        """The (op, signed magnitude) sequence for one image of ``size`` (H, W)."""
        if self.name == 'randaugment':
            ops = [RANDAUGMENT_OPS[i] for i in rng.integers(len(RANDAUGMENT_OPS),
                                                            size=self.num_ops)]
            return [(op, _signed(op, magnitude(op, self.magnitude, RANDAUGMENT_BINS, size), rng))
                    for op in ops]
        policy = _AUTOAUGMENT[self.name]
        drawn = []
        for op, probability, level in policy[int(rng.integers(len(policy)))]:
            if rng.random() < probability:
                value = 0.0 if level is None else magnitude(op, level, AUTOAUGMENT_BINS, size)
                drawn.append((op, _signed(op, value, rng)))
        return drawn
