"""`aff_stopsign`: an embedded, offline segmentation dataset of stop signs among look-alikes.

Every 64x64 RGB image comes with a label map of the same size: 1 where a stop sign is, else 0
(`CLASS_NAMES`). An image is drawn in this order, later layers covering earlier ones:
  1. a cluttered background, one of: stripes blending two colours at a random angle and
     frequency; a base colour under 4-10 ellipses of other colours; smooth colour noise (a
     3x3 to 10x10 grid of random colours, bilinearly upsampled). A quarter of these colours are
     reddish (the palette of the signs and distractors below).
  2. one to five distractors: filled circles, squares, triangles and diamonds, never octagons,
     sized like the signs. Two thirds of them are red, orange or dark red (the red being the
     signs' red), the rest any colour; a quarter carry white marks like the signs'.
  3. zero, one or two stop signs (probabilities 0.1, 0.5, 0.4): regular octagons, upright
     within +-0.2 rad, filled red, with white marks inside: a thin rim just inside the edge,
     a row of three or four short vertical bars (letter strokes), or both. The width across
     flats is log-uniform in [3, 32] px (41% are under 8 px), the centre uniform over the image
     widened by 0.3 widths on each side, so that some signs lie partly off the image edge.
  4. Gaussian pixel noise (std 6).
The label map marks exactly the pixels whose centre lies in a sign's octagon, white marks
included (`octagon_norm`): pixel (row i, column j) sits at the point (x=j, y=i). Signs are the
top layer, so nothing hides them. Colour alone cannot find them (distractors share the red,
backgrounds can be red); shape can, except a few pixels across, where an octagon, a circle and
a square look alike. 3.9% of the pixels are sign (train split; test 4.0%), and 10% of the images
have no sign.

Generation is pure numpy, seeded per (split, index), so every build writes the same files;
PNG encoding uses pillow, so neither generating nor reading needs TensorFlow. The label map is
a single-channel PNG. Building both splits (2000 + 500 images, 23 MB of ArrayRecord) takes
7-9 s on the 2-core development machine.
"""

import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from aff_jax.data.embedded import GeneratedBuilder, encode_png

IMAGE_SIZE = 64
SPLIT_SIZES = {'train': 2000, 'test': 500}
_SPLIT_SEEDS = {'train': 20210201, 'test': 20210202}
CLASS_NAMES = ('background', 'sign')
NUM_CLASSES = len(CLASS_NAMES)

# Per-channel statistics of the train split in [0, 1] units (tests recompute them).
MEAN = (0.5746, 0.4046, 0.3810)
STD = (0.2053, 0.2297, 0.2449)

_SIGN_WIDTH = (3.0, 32.0)          # width across flats, px, log-uniform
_SIGN_COUNT_PROBS = (0.1, 0.5, 0.4)
_MAX_TILT = 0.2                   # rad, signs and axis-aligned distractors
_OFF_EDGE = 0.3                   # centres range this many widths beyond the image
_DISTRACTORS = (1, 5)             # inclusive range of distractors per image
_DISTRACTOR_RED_PROB = 2 / 3
_DISTRACTOR_MARK_PROB = 0.25
_REDDISH_BACKGROUND_PROB = 0.25
_RIM = (0.78, 0.9)                # white rim band, in units of the apothem
_NOISE_STD = 6.0
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)

# Colour families, (3, 2) RGB ranges in 0-255: the signs' red and their look-alikes'.
_SIGN_RED = ((150, 235), (0, 45), (10, 55))
_REDS = np.array([_SIGN_RED, ((200, 255), (80, 140), (0, 40)), ((90, 150), (0, 30), (0, 30))])
_ANY = ((30, 225),) * 3
_WHITE = ((215, 255),) * 3


def _uniform_colour(rng, family) -> np.ndarray:
    low, high = np.array(family, np.float64).T
    return rng.uniform(low, high)


def _colours(rng, count: int, reddish_prob: float) -> np.ndarray:
    """(count, 3): each from a random red family with `reddish_prob`, else any mid-range one."""
    reddish = rng.random(count) < reddish_prob
    families = np.where(reddish[:, None, None], _REDS[rng.integers(len(_REDS), size=count)], _ANY)
    return rng.uniform(families[..., 0], families[..., 1])


def _colour(rng, reddish_prob: float) -> np.ndarray:
    return _colours(rng, 1, reddish_prob)[0]


def polygon_norm(cy: float, cx: float, apothem: float, sides: int, rotation: float) -> np.ndarray:
    """(64, 64) float: the regular polygon's gauge at each pixel centre, <= 1 inside.

    The polygon is the intersection of `sides` half-planes whose outward normals point at
    angles rotation + 2 pi k / sides (x right, y down), at distance `apothem` from the centre;
    sides=0 means a circle of radius `apothem`. Rotation 0 gives flat-topped octagons and
    squares with horizontal and vertical sides. Pixels beyond the circumradius hold inf.
    """
    # Evaluate the bounding box of the circumcircle only: most shapes are a few pixels across.
    reach = apothem if sides == 0 else apothem / math.cos(math.pi / sides)
    y0, x0 = (max(0, math.floor(c - reach)) for c in (cy, cx))
    y1, x1 = (min(IMAGE_SIZE, math.ceil(c + reach) + 1) for c in (cy, cx))
    norm = np.full((IMAGE_SIZE, IMAGE_SIZE), np.inf)
    if y0 >= y1 or x0 >= x1:
        return norm
    dy, dx = _YY[y0:y1, x0:x1] - cy, _XX[y0:y1, x0:x1] - cx
    if sides == 0:
        norm[y0:y1, x0:x1] = np.hypot(dy, dx) / apothem
    else:
        angles = rotation + 2 * np.pi * np.arange(sides) / sides
        projections = dx[..., None] * np.cos(angles) + dy[..., None] * np.sin(angles)
        norm[y0:y1, x0:x1] = projections.max(-1) / apothem
    return norm


def octagon_norm(cy: float, cx: float, width: float, rotation: float) -> np.ndarray:
    """`polygon_norm` of the regular octagon `width` px across flats; the sign's mask is <= 1."""
    return polygon_norm(cy, cx, width / 2, 8, rotation)


def _marks(rng, norm: np.ndarray, cy, cx, width, rotation) -> np.ndarray:
    """(64, 64) bool: white marks of a shape: rim, bars or both, clipped to the shape."""
    style = rng.integers(3)   # 0 rim, 1 bars, 2 both
    marks = np.zeros(norm.shape, bool)
    if style != 1:
        marks |= (norm >= _RIM[0]) & (norm <= _RIM[1])
    if style != 0:
        # Bars along the shape's own axes: u across, v down.
        dy, dx = _YY - cy, _XX - cx
        u = dx * math.cos(rotation) + dy * math.sin(rotation)
        v = -dx * math.sin(rotation) + dy * math.cos(rotation)
        count = rng.integers(3, 5)
        centres = np.linspace(-0.28, 0.28, count) * width
        half_heights = rng.uniform(0.12, 0.2, count) * width
        half_width = 0.045 * width
        for centre, half_height in zip(centres, half_heights):
            marks |= (np.abs(u - centre) <= half_width) & (np.abs(v) <= half_height)
    return marks & (norm <= 1)


def _sample_width(rng) -> float:
    return math.exp(rng.uniform(math.log(_SIGN_WIDTH[0]), math.log(_SIGN_WIDTH[1])))


def _sample_centre(rng, width: float) -> np.ndarray:
    margin = _OFF_EDGE * width
    return rng.uniform(-margin, IMAGE_SIZE - 1 + margin, 2)


def _background(rng) -> np.ndarray:
    """(64, 64, 3) float: stripes, blobs or smooth colour noise."""
    kind = rng.integers(3)
    if kind == 0:
        low, high = (_colour(rng, _REDDISH_BACKGROUND_PROB) for _ in range(2))
        angle = rng.uniform(0, 2 * np.pi)
        cycles = rng.uniform(0.5, 5.0)
        phase = rng.uniform(0, 2 * np.pi)
        along = _XX * np.cos(angle) + _YY * np.sin(angle)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * along / IMAGE_SIZE + phase)
        return low + (high - low) * t[..., None]
    if kind == 1:
        image = np.broadcast_to(_colour(rng, _REDDISH_BACKGROUND_PROB), _XX.shape + (3,)).copy()
        for _ in range(rng.integers(4, 11)):
            cy, cx = rng.uniform(-8, IMAGE_SIZE + 8, 2)
            half_long, half_short = rng.uniform(3, 15), rng.uniform(3, 15)
            angle = rng.uniform(0, np.pi)
            u = (_XX - cx) * np.cos(angle) + (_YY - cy) * np.sin(angle)
            v = -(_XX - cx) * np.sin(angle) + (_YY - cy) * np.cos(angle)
            blob = (u / half_long) ** 2 + (v / half_short) ** 2 <= 1
            image[blob] = _colour(rng, _REDDISH_BACKGROUND_PROB)
        return image
    cells = rng.integers(3, 11)
    grid = _colours(rng, cells * cells, _REDDISH_BACKGROUND_PROB).reshape(cells, cells, 3)
    grid = np.rint(grid).astype(np.uint8)
    smooth = Image.fromarray(grid).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(smooth, np.float64)


# Distractor shapes: (sides, rotation offset); rotations get +-_MAX_TILT, triangles any.
_DISTRACTOR_SHAPES = ((0, 0.0), (4, 0.0), (3, None), (4, np.pi / 4))


def _draw_distractor(image, rng) -> None:
    sides, offset = _DISTRACTOR_SHAPES[rng.integers(len(_DISTRACTOR_SHAPES))]
    width = _sample_width(rng)
    cy, cx = _sample_centre(rng, width)
    if offset is None:
        rotation = rng.uniform(0, 2 * np.pi / 3)
    else:
        rotation = offset + rng.uniform(-_MAX_TILT, _MAX_TILT)
    # A triangle `width` px on a side has apothem width / (2 sqrt 3); others width / 2.
    apothem = width / (2 * math.sqrt(3)) if sides == 3 else width / 2
    norm = polygon_norm(cy, cx, apothem, sides, rotation)
    image[norm <= 1] = _colour(rng, _DISTRACTOR_RED_PROB)
    if rng.random() < _DISTRACTOR_MARK_PROB:
        image[_marks(rng, norm, cy, cx, width, rotation)] = _uniform_colour(rng, _WHITE)


def paint_sign(image, label, rng, cy: float, cx: float, width: float, rotation: float) -> None:
    """Paints a stop sign into `image` ((64, 64, 3) float) and marks it 1 in `label` ((64, 64)).

    The sign is the octagon `octagon_norm(cy, cx, width, rotation) <= 1`: red, with white marks
    (drawn from `rng`) inside it, all of it labelled.
    """
    norm = octagon_norm(cy, cx, width, rotation)
    inside = norm <= 1
    image[inside] = _uniform_colour(rng, _SIGN_RED)
    image[_marks(rng, norm, cy, cx, width, rotation)] = _uniform_colour(rng, _WHITE)
    label[inside] = 1


def _draw_sign(image, label, rng) -> None:
    width = _sample_width(rng)
    cy, cx = _sample_centre(rng, width)
    paint_sign(image, label, rng, cy, cx, width, rng.uniform(-_MAX_TILT, _MAX_TILT))


def render(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One example: ((64, 64, 3) uint8 image, (64, 64) uint8 label map of 0 and 1)."""
    image = _background(rng)
    for _ in range(rng.integers(_DISTRACTORS[0], _DISTRACTORS[1] + 1)):
        _draw_distractor(image, rng)
    label = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for _ in range(rng.choice(len(_SIGN_COUNT_PROBS), p=_SIGN_COUNT_PROBS)):
        _draw_sign(image, label, rng)
    image += rng.normal(0.0, _NOISE_STD, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def example(split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Example `index` of `split`: ((64, 64, 3) uint8 image, (64, 64) uint8 label map)."""
    return render(np.random.default_rng([_SPLIT_SEEDS[split], index]))


class AffStopsign(GeneratedBuilder):
    """TFDS builder of `aff_stopsign`; prepare with `file_format='array_record'`."""

    SPLIT_SIZES = SPLIT_SIZES
    SUPERVISED_KEYS = ('image', 'segmentation_mask')

    def features(self) -> tfds.features.FeaturesDict:
        return tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            # A PNG, not a Tensor: label maps are mostly 0 and compress ~25x.
            'segmentation_mask': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1)),
        })

    def record(self, split: str, index: int) -> dict:
        image, label = example(split, index)
        return {'image': encode_png(image), 'segmentation_mask': encode_png(label)}
