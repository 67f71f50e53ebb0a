"""`aff_multiscale`: an embedded, offline image dataset where small objects decide the class.

Every 32x32 RGB image holds one *small glyph*: a 3x3-cell binary pattern drawn at 1 or 2
pixels per cell (3x3 or 6x6 pixels, on a dark tile with a one-pixel border), white-ish on
black-ish. The glyph's pattern is the label (10 classes). Everything else varies at random
and independently of the label, at larger scales: a striped colour background, one to three
large shapes (ellipses, rectangles, rings, 8-22 pixels) and, in 70% of the images, a *large*
glyph of another class (4 or 5 pixels per cell, 14-17 pixels). The most salient glyph is
then never the answer: the label sits in a few pixels, the case MS-CAM's local context is
meant for (Dai et al., WACV 2021, Sec. 3).

Each example also records `bbox`, the small glyph's bounding box: int32 `(ymin, xmin, ymax,
xmax)`, the first and last pixel rows and columns of its tile (dark border included), so that
`python -m aff_jax.explain --pointing-game` can check where a model looks (version 1.1.0; the
images, labels and their order are those of 1.0.0).

All glyphs are symmetric under a horizontal flip and keep a 4-pixel margin from the border,
so flip and pad-4 random-crop augmentation never change or hide the label.

Generation is pure numpy, seeded per (split, index), so every build writes the same images;
PNG encoding uses pillow, so neither generating nor reading needs TensorFlow.
"""

from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from aff_jax.data.embedded import GeneratedBuilder, encode_png

IMAGE_SIZE = 32
SPLIT_SIZES = {'train': 5000, 'test': 1000}
_SPLIT_SEEDS = {'train': 20210105, 'test': 20210106}

# Rows of the 3x3 patterns, top to bottom; the column pattern is mirror-symmetric.
_GLYPHS = {
    'plus': ('010', '111', '010'),
    'cross': ('101', '010', '101'),
    'tee': ('111', '010', '010'),
    'inverted_tee': ('010', '010', '111'),
    'aitch': ('101', '111', '101'),
    'cup': ('101', '101', '111'),
    'cap': ('111', '101', '101'),
    'dot': ('000', '010', '000'),
    'bar': ('010', '010', '010'),
    'equals': ('111', '000', '111'),
}
CLASS_NAMES = tuple(_GLYPHS)
NUM_CLASSES = len(CLASS_NAMES)
GLYPHS = np.array(
    [[[c == '1' for c in row] for row in rows] for rows in _GLYPHS.values()], dtype=bool
)  # (NUM_CLASSES, 3, 3)

# Per-channel statistics of the train split in [0, 1] units (tests recompute them).
MEAN = (0.4835, 0.4855, 0.4849)
STD = (0.2446, 0.2449, 0.2446)

_SMALL_CELL = (1, 2)       # pixels per glyph cell, inclusive range: the label-bearing glyph
_LARGE_CELL = (4, 5)       # the distractor glyph
_LARGE_GLYPH_PROB = 0.7
_MARGIN = 4                # = the pad of the CIFAR-style crop augmentation
_NOISE_STD = 6.0
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Stripes blending two colours at a random angle and frequency; (H, W, 3) float."""
    low, high = rng.uniform(40, 215, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    cycles = rng.uniform(0.3, 2.5)
    phase = rng.uniform(0, 2 * np.pi)
    along = _XX * np.cos(angle) + _YY * np.sin(angle)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along / IMAGE_SIZE + phase)
    return low + (high - low) * t[..., None]


def _large_shape_mask(rng: np.random.Generator) -> np.ndarray:
    """A filled ellipse, rectangle or ring 8-22 px across, centred anywhere; (H, W) bool."""
    size = rng.uniform(8, 22)
    cy, cx = rng.uniform(-2, IMAGE_SIZE + 2, 2)
    dy, dx = _YY - cy, _XX - cx
    kind = rng.integers(3)
    if kind == 0:
        half_long, half_short = size / 2, size / 2 * rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, np.pi)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        return (u / half_long) ** 2 + (v / half_short) ** 2 <= 1
    if kind == 1:
        return (np.abs(dy) <= size / 2) & (np.abs(dx) <= size / 2 * rng.uniform(0.4, 1.0))
    radius = np.hypot(dy, dx)
    return (radius <= size / 2) & (radius >= size / 2 * rng.uniform(0.4, 0.75))


def _draw_glyph(image, rng, label, cell, top, left):
    """Paints glyph `label` at `cell` px per cell on a bordered dark tile, clipped to the image."""
    light = rng.uniform(215, 255, 3)
    dark = rng.uniform(0, 40, 3)
    side = 3 * cell + 2
    cells = GLYPHS[label].repeat(cell, axis=0).repeat(cell, axis=1)
    tile = np.broadcast_to(dark, (side, side, 3)).copy()
    tile[1:-1, 1:-1] = np.where(cells[..., None], light, dark)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, IMAGE_SIZE), min(left + side, IMAGE_SIZE)
    image[y0:y1, x0:x1] = tile[y0 - top:y1 - top, x0 - left:x1 - left]


def render(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One image whose small glyph has class `label`, (32, 32, 3) uint8, and that glyph's
    bounding box, int32 (ymin, xmin, ymax, xmax), inclusive pixel indices."""
    image = _background(rng)
    for _ in range(rng.integers(1, 4)):
        image[_large_shape_mask(rng)] = rng.uniform(40, 215, 3)
    if rng.random() < _LARGE_GLYPH_PROB:
        other = (label + rng.integers(1, NUM_CLASSES)) % NUM_CLASSES
        cell = rng.integers(_LARGE_CELL[0], _LARGE_CELL[1] + 1)
        top, left = rng.integers(-3, IMAGE_SIZE - 14, 2)
        _draw_glyph(image, rng, other, cell, top, left)
    cell = rng.integers(_SMALL_CELL[0], _SMALL_CELL[1] + 1)
    side = 3 * cell + 2
    top, left = rng.integers(_MARGIN, IMAGE_SIZE - _MARGIN - side + 1, 2)
    _draw_glyph(image, rng, label, cell, top, left)
    image += rng.normal(0.0, _NOISE_STD, image.shape)
    bbox = np.array([top, left, top + side - 1, left + side - 1], np.int32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), bbox


class Example(NamedTuple):
    """`image` (32, 32, 3) uint8, `label` int, `bbox` int32 (ymin, xmin, ymax, xmax) of the
    small glyph, inclusive pixel indices."""
    image: np.ndarray
    label: int
    bbox: np.ndarray


def example(split: str, index: int) -> Example:
    """Example `index` of `split`. Labels cycle 0..9."""
    label = index % NUM_CLASSES
    image, bbox = render(np.random.default_rng([_SPLIT_SEEDS[split], index]), label)
    return Example(image, label, bbox)


class AffMultiscale(GeneratedBuilder):
    """TFDS builder of `aff_multiscale`; prepare with `file_format='array_record'`."""

    VERSION = tfds.core.Version('1.1.0')
    RELEASE_NOTES = {
        '1.0.0': 'First release.',
        '1.1.0': "Adds 'bbox', the small glyph's bounding box (int32 ymin, xmin, ymax, xmax, "
                 'inclusive pixels); images, labels and their order are unchanged.',
    }
    SPLIT_SIZES = SPLIT_SIZES
    SUPERVISED_KEYS = ('image', 'label')

    def features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            'bbox': tfds.features.Tensor(shape=(4,), dtype=np.int32),
        })

    def record(self, split: str, index: int) -> dict:
        image, label, bbox = example(split, index)
        return {'image': encode_png(image), 'label': label, 'bbox': bbox}
