"""AutoAugment / RandAugment: every op against an independent numpy implementation of what it
means (torchvision's definitions), magnitudes against torchvision's tables, policies drawn
from the generator alone, and the pipeline's batches reproducible across a resume."""

import collections
import math

import numpy as np
import pytest
from PIL import Image

from aff_jax.data import auto_augment as aa
from aff_jax.data import pipeline
from aff_jax.training import config as config_lib
from aff_jax.training import loop
from aff_jax.training.errors import ConfigError
from conftest import REPO

FILL = np.array(aa.FILL, np.uint8)


def _photo(seed: int, size=(32, 40)) -> np.ndarray:
    """A smooth RGB image with edges and a limited range per channel, like a photograph (so
    autocontrast and equalize have work to do), plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]] / max(size)
    base = np.stack([np.sin(5 * x + 3 * y), np.cos(4 * y - 2 * x), x * y], -1)
    image = 90 + 60 * base + rng.normal(0, 12, base.shape)
    image[size[0] // 3:size[0] // 2, size[1] // 4:] += 50
    return np.clip(image, 20, 230).astype(np.uint8)


IMAGES = [_photo(0), _photo(1, (32, 32)), np.full((8, 8, 3), 77, np.uint8)]


# ------------------------------------------------------------ references, written from the
# definitions: integer luma ITU-R 601-2 (PIL's 'L' conversion, rounded 16-bit fixed point),
# blends in float32 truncated to uint8 as PIL's Image.blend, SMOOTH = 3x3 [1 1 1; 1 5 1; 1 1 1]
# / 13 rounded, with the border kept (what torchvision's tensor sharpness also does).

def _blend(degenerate, image, factor):
    d, i = degenerate.astype(np.float32), image.astype(np.float32)
    return np.clip(d + np.float32(factor) * (i - d), 0, 255).astype(np.uint8)


def _luma(image):
    r, g, b = (image[..., k].astype(np.int64) for k in range(3))
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _smooth(image):
    x = image.astype(np.int64)
    h, w = x.shape[:2]
    total = sum(x[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    out = image.copy()
    out[1:-1, 1:-1] = np.floor((total + 4 * x[1:-1, 1:-1]) / 13 + 0.5)
    return out


def _enhance_reference(op, image, factor):
    if op == 'Brightness':
        degenerate = np.zeros_like(image)
    elif op == 'Color':
        degenerate = np.repeat(_luma(image)[..., None], 3, -1).astype(np.uint8)
    elif op == 'Contrast':
        degenerate = np.full_like(image, int(_luma(image).mean() + 0.5))
    else:
        degenerate = _smooth(image)
    return _blend(degenerate, image, factor)


def _equalize_reference(image):
    """torchvision's equalize: per channel, lut = (cumsum + step // 2) // step shifted by one,
    step = (pixels not of the last present value) // 255; unchanged when step is 0."""
    out = image.copy()
    for ch in range(image.shape[2]):
        values = image[..., ch]
        hist = np.bincount(values.ravel(), minlength=256)
        step = hist[hist > 0][:-1].sum() // 255
        if step:
            lut = np.concatenate([[0], ((np.cumsum(hist) + step // 2) // step)[:-1]])
            out[..., ch] = np.clip(lut, 0, 255)[values]
    return out


def _autocontrast_exact(image):
    """Per channel [lo, hi] -> [0, 255] linearly, truncated, in exact integer arithmetic."""
    out, exact = image.copy(), np.zeros(image.shape, bool)
    for ch in range(image.shape[2]):
        values = image[..., ch].astype(np.int64)
        lo, hi = values.min(), values.max()
        if hi > lo:
            out[..., ch] = (values - lo) * 255 // (hi - lo)
            exact[..., ch] = (values - lo) * 255 % (hi - lo) == 0
    return out, exact


def _source_coordinates(matrix, shape):
    """Where output pixel centres (x + 0.5, y + 0.5) come from under the inverse affine map."""
    a, b, c, d, e, f = matrix
    y, x = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    return a * x + b * y + c, d * x + e * y + f


def _nearest_reference(image, matrix):
    xs, ys = _source_coordinates(matrix, image.shape)
    xi, yi = np.floor(xs).astype(int), np.floor(ys).astype(int)
    inside = (xi >= 0) & (xi < image.shape[1]) & (yi >= 0) & (yi < image.shape[0])
    out = np.empty_like(image)
    out[...] = FILL
    out[inside] = image[yi[inside], xi[inside]]
    return out


def _rotation_matrix(degrees, shape):
    """Counter-clockwise rotation about the image centre, as the inverse (output -> input)."""
    t = math.radians(degrees)
    cx, cy = shape[1] / 2, shape[0] / 2
    a, b, d, e = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


def _apply(image, op, value):
    return np.asarray(aa.apply_op(Image.fromarray(image), op, value))


# ------------------------------------------------------------ ops

@pytest.mark.parametrize('op', ['Brightness', 'Color', 'Contrast', 'Sharpness'])
@pytest.mark.parametrize('value', [-0.9, -0.4, 0.0, 0.3, 0.9])
def test_enhancement_ops_match_the_blend_definition(op, value):
    for image in IMAGES:
        np.testing.assert_array_equal(_apply(image, op, value),
                                      _enhance_reference(op, image, 1.0 + value))


def test_pixel_value_ops_match_their_definitions():
    for image in IMAGES:
        for bits in (8, 7, 6, 5, 4):
            mask = np.uint8(256 - 2 ** (8 - bits))
            np.testing.assert_array_equal(_apply(image, 'Posterize', bits), image & mask)
        for threshold in np.linspace(255.0, 0.0, aa.AUTOAUGMENT_BINS):
            np.testing.assert_array_equal(_apply(image, 'Solarize', threshold),
                                          np.where(image < threshold, image, 255 - image))
        np.testing.assert_array_equal(_apply(image, 'Invert', 0.0), 255 - image)
        np.testing.assert_array_equal(_apply(image, 'Equalize', 0.0), _equalize_reference(image))
        np.testing.assert_array_equal(_apply(image, 'Identity', 0.0), image)


def test_autocontrast_matches_the_exact_linear_stretch_up_to_ties():
    """PIL computes the stretch in float64: where the exact value is an integer it may land
    one below (a tie of the truncation); nowhere else may it differ."""
    checked = 0
    for image in IMAGES + [_photo(seed) for seed in range(2, 8)]:
        got = _apply(image, 'AutoContrast', 0.0).astype(int)
        want, exact = _autocontrast_exact(image)
        diff = want.astype(int) - got
        assert np.all((diff == 0) | (exact & (diff == 1)))
        checked += (diff == 0).sum()
    assert checked > 0.99 * sum(i.size for i in IMAGES)


def _assert_nearest_map(got, image, matrix):
    """``got`` is ``image`` under the nearest-pixel inverse map ``matrix``, grey outside. PIL
    computes these maps in 16.16 fixed point, so source points within that rounding of a pixel
    boundary may land on the neighbouring pixel; nowhere else may a pixel differ."""
    want = _nearest_reference(image, matrix)
    xs, ys = _source_coordinates(matrix, image.shape)
    slack = sum(image.shape[:2]) * 2.0 ** -16
    near_boundary = (np.abs(xs - np.rint(xs)) < slack) | (np.abs(ys - np.rint(ys)) < slack)
    differs = (got != want).any(-1)
    assert not (differs & ~near_boundary).any()
    assert differs.sum() <= 0.01 * differs.size


@pytest.mark.parametrize('op,value,matrix', [
    ('ShearX', 0.3, (1, 0.3, 0, 0, 1, 0)),
    ('ShearX', -0.2, (1, -0.2, 0, 0, 1, 0)),
    ('ShearY', 0.1, (1, 0, 0, 0.1, 1, 0)),
    ('ShearY', -0.3, (1, 0, 0, -0.3, 1, 0)),
    ('TranslateX', 14.5, (1, 0, -14, 0, 1, 0)),   # whole pixels, truncated as torchvision
    ('TranslateX', -3.2, (1, 0, 3, 0, 1, 0)),
    ('TranslateY', 9.9, (1, 0, 0, 0, 1, -9)),
    ('TranslateY', -14.5, (1, 0, 0, 0, 1, 14)),
])
def test_shear_and_translate_are_nearest_affine_maps_with_grey_fill(op, value, matrix):
    for image in IMAGES:
        got = _apply(image, op, value)
        _assert_nearest_map(got, image, matrix)
        assert (got == FILL).all(-1).any()


@pytest.mark.parametrize('degrees', [30.0, -30.0, 20.0, -6.666666666666667, 3.3333333333333335])
def test_rotate_is_counter_clockwise_about_the_centre(degrees):
    for image in IMAGES:
        _assert_nearest_map(_apply(image, 'Rotate', degrees), image,
                            _rotation_matrix(degrees, image.shape))


def test_rotation_by_a_quarter_turn_is_rot90():
    image = IMAGES[1]  # square
    np.testing.assert_array_equal(_apply(image, 'Rotate', 90.0), np.rot90(image))


# ------------------------------------------------------------ magnitudes

def test_magnitudes_are_torchvisions_tables():
    bins = aa.AUTOAUGMENT_BINS
    size = (32, 40)
    linspace = lambda end: np.linspace(0.0, end, bins)  # noqa: E731
    for op, want in [('ShearX', linspace(0.3)), ('ShearY', linspace(0.3)),
                     ('TranslateX', linspace(150 / 331 * 40)),
                     ('TranslateY', linspace(150 / 331 * 32)), ('Rotate', linspace(30.0)),
                     ('Brightness', linspace(0.9)), ('Color', linspace(0.9)),
                     ('Contrast', linspace(0.9)), ('Sharpness', linspace(0.9)),
                     ('Solarize', np.linspace(255.0, 0.0, bins))]:
        got = [aa.magnitude(op, level, bins, size) for level in range(bins)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=op)
    # torchvision: 8 - (arange(bins) / ((bins - 1) / 4)).round()
    assert [aa.magnitude('Posterize', k, 10, size) for k in range(10)] == \
        [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    posterize31 = [aa.magnitude('Posterize', k, 31, size) for k in range(31)]
    assert posterize31 == [8 - round(k / 7.5) for k in range(31)]


def test_policies_are_the_papers_25_pairs_of_known_ops():
    for policy in (aa.CIFAR10_POLICY, aa.IMAGENET_POLICY):
        assert len(policy) == 25
        for pair in policy:
            assert len(pair) == 2
            for op, probability, level in pair:
                assert 0.0 <= probability <= 1.0
                assert (level is None) == (op in ('Invert', 'AutoContrast', 'Equalize'))
                assert level is None or 0 <= level < aa.AUTOAUGMENT_BINS
                value = aa.magnitude(op, level or 0, aa.AUTOAUGMENT_BINS, (8, 8))
                aa.apply_op(Image.fromarray(IMAGES[2]), op, value)  # a known op


def test_autoaugment_draws_subpolicies_and_ops_at_their_probabilities():
    policy = aa.Policy('autoaugment_cifar10')
    rng = np.random.default_rng(0)
    applied = collections.Counter()
    trials = 20_000
    for _ in range(trials):
        state = rng.bit_generator.state
        ops = policy.draw((32, 32), rng)
        # Replaying the generator replays the choice: nothing else is random.
        assert policy.draw((32, 32), _replay(state)) == ops
        for op, value in ops:
            applied[op] += 1
    # Expected applications per op: sum over sub-policies of probability / 25.
    expected = collections.Counter()
    for pair in aa.CIFAR10_POLICY:
        for op, probability, _ in pair:
            expected[op] += probability / 25 * trials
    for op, mean in expected.items():
        assert abs(applied[op] - mean) < 5 * math.sqrt(mean) + 1, op


def _replay(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


def test_randaugment_applies_num_ops_at_the_level_with_random_signs():
    policy = aa.Policy('randaugment', num_ops=3, magnitude=15)
    rng = np.random.default_rng(1)
    seen = collections.Counter()
    for _ in range(3000):
        ops = policy.draw((32, 32), rng)
        assert len(ops) == 3
        for op, value in ops:
            seen[op, np.sign(value)] += 1
            assert abs(value) == aa.magnitude(op, 15, aa.RANDAUGMENT_BINS, (32, 32))
    assert {op for op, _ in seen} == set(aa.RANDAUGMENT_OPS)
    assert seen['Rotate', -1] > 0 and seen['Rotate', 1] > 0
    assert seen['Posterize', -1] == 0


def test_policy_is_deterministic_given_the_generator_and_changes_images():
    policy = aa.Policy('autoaugment_imagenet')
    image = IMAGES[0]
    outs = [policy(image, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(*outs)
    changed = sum(not np.array_equal(policy(image, np.random.default_rng(s)), image)
                  for s in range(40))
    assert changed > 20
    with pytest.raises(ValueError, match=r'\(H, W, 3\) uint8'):
        policy(image[..., :1], np.random.default_rng(0))


@pytest.mark.parametrize('kw,message', [
    (dict(name='autoaugment'), 'must be one of'),
    (dict(name='randaugment', magnitude=31),
     r'randaugment_magnitude must be an integer in \[0, 31\)'),
    (dict(name='randaugment', num_ops=-1), 'randaugment_num_ops must be an integer >= 0'),
])
def test_bad_policy_arguments(kw, message):
    with pytest.raises(ValueError, match=message):
        aa.Policy(**kw)


# ------------------------------------------------------------ pipeline and config

@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
    """Two classes of 32x32 JPEGs, 12 training and 2 test images each."""
    root = tmp_path_factory.mktemp('jpegs')
    for split, count in (('train', 12), ('test', 2)):
        for label in range(2):
            directory = root / split / f'class_{label}'
            directory.mkdir(parents=True)
            for i in range(count):
                pixels = _photo(100 * label + i, (32, 32))
                Image.fromarray(pixels).save(directory / f'{i}.jpg', quality=90)
    return f'imagefolder:{root}'


def _batches(name, count, **kw):
    it = pipeline.make_iterator(name, 'train', batch_size=4, train=True, **kw)
    try:
        return [next(it)['image'] for _ in range(count)]
    finally:
        if hasattr(it, 'close'):
            it.close()


def test_pipeline_policy_batches_repeat_by_seed_and_across_a_resume(jpeg_folder):
    policy = aa.Policy('randaugment', num_ops=2, magnitude=20)
    run = _batches(jpeg_folder, 7, seed=3, policy=policy)
    again = _batches(jpeg_folder, 7, seed=3, policy=policy)
    for a, b in zip(run, again):
        np.testing.assert_array_equal(a, b)
    resumed = _batches(jpeg_folder, 2, seed=3, policy=policy, start_batch=5, worker_count=1)
    for a, b in zip(run[5:], resumed):
        np.testing.assert_array_equal(a, b)
    plain = _batches(jpeg_folder, 7, seed=3)
    assert not np.array_equal(np.stack(run), np.stack(plain))
    other = _batches(jpeg_folder, 7, seed=4, policy=policy)
    assert not np.array_equal(np.stack(run), np.stack(other))


def test_policy_needs_a_classification_augmentation(jpeg_folder):
    with pytest.raises(ValueError, match="needs augment_kind cifar or imagenet"):
        pipeline.make_iterator(jpeg_folder, 'train', batch_size=4, seed=0, train=True,
                               augment_kind='none', policy=aa.Policy('autoaugment_cifar10'))


def test_config_augment_maps_onto_kind_and_policy():
    c = config_lib.base_config()
    assert loop.augmentation(c) == (None, None)
    c.augment = 'none'
    assert loop.augmentation(c) == ('none', None)
    c.augment = 'randaugment'
    c.randaugment_magnitude = 12
    assert loop.augmentation(c) == (None, aa.Policy('randaugment', 2, 12))
    c.randaugment_magnitude = 40
    with pytest.raises(ConfigError, match=r'^config\.randaugment_magnitude must be'):
        loop.augmentation(c)
    c.augment = 'auto'
    with pytest.raises(ConfigError, match=r"^config\.augment must be one of \('default'"):
        loop.check_config(c)


@pytest.mark.parametrize('recipe,policy', [
    ('cifar100_aff_resnet32', 'autoaugment_cifar10'),
    ('cifar100_aff_resnext38', 'autoaugment_cifar10'),
    ('cifar100_aff_resnext47', 'autoaugment_cifar10'),
    ('imagenet_aff_resnet50', 'autoaugment_imagenet'),
    ('imagenet_iaff_resnext50', 'autoaugment_imagenet'),
])
def test_official_recipes_use_autoaugment_as_the_official_commands(recipe, policy):
    config = config_lib.load_config(REPO / 'configs' / f'{recipe}.py')
    assert config.augment == policy
    loop.check_config(config)


def test_input_benchmark_makes_imagenet_like_jpegs(tmp_path):
    """The 224 measurement's images: every source image upscaled to 500x375 JPEGs, train and
    test; the tf.data side itself needs the [tf] extra and is not run here."""
    from aff_jax import input_benchmark

    source = tmp_path / 'small'
    for split, count in (('train', 3), ('test', 1)):
        for label in range(2):
            directory = source / split / f'c{label}'
            directory.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_photo(i, (32, 32))).save(directory / f'{i}.jpg')
    written = input_benchmark.make_large(str(source), str(tmp_path / 'large'), per_class=2)
    assert written == 2 * 2 + 2 * 1
    for path in (tmp_path / 'large').rglob('*.jpg'):
        with Image.open(path) as image:
            assert image.size == input_benchmark.LARGE_SIZE and image.format == 'JPEG'
