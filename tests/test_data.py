"""Data layer: the embedded dataset, sources, augmentation and grain pipelines."""

import collections
import hashlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from aff_jax.data import augment, multiscale, pipeline, sources

NAME = 'aff_multiscale'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A prepared aff_multiscale, built once for the module."""
    path = tmp_path_factory.mktemp('tfds')
    pipeline.get_info(NAME, data_dir=path)
    return path


@pytest.fixture(scope='module')
def stored(data_dir):
    """split -> (images (N, 32, 32, 3) uint8, labels (N,), boxes (N, 4)) in storage order, read
    by tfds."""
    splits = {}
    for split, size in multiscale.SPLIT_SIZES.items():
        records = tfds.data_source(NAME, split=split, data_dir=data_dir).__getitems__(range(size))
        splits[split] = (np.stack([r['image'] for r in records]),
                         np.array([r['label'] for r in records]),
                         np.stack([r['bbox'] for r in records]))
    return splits


def _iterator(data_dir, split='test', **kw):
    kw = {'batch_size': 10, 'seed': 0, 'train': True, 'data_dir': data_dir, **kw}
    return pipeline.make_iterator(NAME, split, **kw)


def _to_uint8(images):
    """Undoes the normalisation of aff_multiscale batches: (B, H, W, C) float -> uint8."""
    mean, std = np.asarray(multiscale.MEAN), np.asarray(multiscale.STD)
    return np.rint((images * std + mean) * 255).astype(np.uint8)


def _keys(images):
    return [image.tobytes() for image in images]


# ---------------------------------------------------------------- embedded dataset

def test_multiscale_info_and_balanced_labels(data_dir, stored):
    info = pipeline.get_info(NAME, data_dir=data_dir)
    assert info == pipeline.DatasetInfo(
        num_classes=10, image_shape=(32, 32, 3), num_train=5000, num_test=1000,
        mean=multiscale.MEAN, std=multiscale.STD, augment='cifar',
    )
    for split, size in multiscale.SPLIT_SIZES.items():
        _, labels, _ = stored[split]
        assert collections.Counter(labels.tolist()) == {c: size // 10 for c in range(10)}


def test_multiscale_stores_exactly_the_generator_output(stored):
    images, labels, boxes = stored['test']
    expected = [multiscale.example('test', i) for i in range(multiscale.SPLIT_SIZES['test'])]
    on_disk = dict(zip(_keys(images), zip(labels.tolist(), map(tuple, boxes.tolist()))))
    assert len(on_disk) == len(expected)  # no duplicate images
    assert on_disk == {e.image.tobytes(): (e.label, tuple(e.bbox.tolist())) for e in expected}


# sha256 of every (image bytes, label byte) of a split in index order, as version 1.0.0 (no
# boxes) generated them: adding the boxes in 1.1.0 changed no pixel and no label, so the quick
# start trains on the same data and keeps its documented accuracy.
IMAGES_OF_VERSION_1_0_0 = {
    'test': '3f5a63b2a6deba1dc726a09fb40b6d99bfc160362b1e485431e574dff9a8f2dd',
    'train': '2fc818fd6f6c09ea925a30a7ab2637ddf3da90c8593386221e3133f88968fb08',
}


@pytest.mark.parametrize('split', sorted(IMAGES_OF_VERSION_1_0_0))
def test_multiscale_images_and_labels_are_those_of_version_1_0_0(split):
    digest = hashlib.sha256()
    for index in range(multiscale.SPLIT_SIZES[split]):
        image, label, _ = multiscale.example(split, index)
        digest.update(image.tobytes())
        digest.update(bytes([label]))
    assert digest.hexdigest() == IMAGES_OF_VERSION_1_0_0[split]


def test_multiscale_version_and_release_notes():
    builder = multiscale.AffMultiscale
    assert str(builder.VERSION) == '1.1.0'
    assert 'bbox' in builder.RELEASE_NOTES['1.1.0'] and 'unchanged' in builder.RELEASE_NOTES['1.1.0']


def test_multiscale_box_holds_the_label_glyph(stored):
    """Inside each box: a one-pixel dark border around the label's 3x3 pattern at 1 or 2
    pixels per cell, light cells and dark ones split at mid-grey (noise std 6 cannot cross)."""
    images, labels, boxes = stored['test']
    sides = set()
    for image, label, (y0, x0, y1, x1) in zip(images, labels, boxes):
        tile = image[y0:y1 + 1, x0:x1 + 1].mean(axis=-1) > 127.5
        side = tile.shape[0]
        assert tile.shape == (side, side) and (side - 2) % 3 == 0
        cell = (side - 2) // 3
        assert not tile[0].any() and not tile[-1].any()
        assert not tile[:, 0].any() and not tile[:, -1].any()
        pattern = multiscale.GLYPHS[label].repeat(cell, axis=0).repeat(cell, axis=1)
        np.testing.assert_array_equal(tile[1:-1, 1:-1], pattern)
        sides.add(side)
    assert sides == {5, 8}


def test_multiscale_build_is_byte_identical(data_dir, tmp_path):
    pipeline.get_info(NAME, data_dir=tmp_path)
    first, second = (d / NAME / str(multiscale.AffMultiscale.VERSION) for d in (data_dir, tmp_path))
    shards = sorted(p.name for p in first.iterdir() if '.array_record' in p.name)
    assert len(shards) == 2
    for shard in shards:
        assert (first / shard).read_bytes() == (second / shard).read_bytes()


def test_multiscale_mean_std_constants_match_train_split(stored):
    images, *_ = stored['train']
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(pixels.mean(0), multiscale.MEAN, atol=1e-3)
    np.testing.assert_allclose(pixels.std(0), multiscale.STD, atol=1e-3)


def test_multiscale_glyphs_are_flip_symmetric_and_distinct():
    glyphs = multiscale.GLYPHS
    assert glyphs.shape == (multiscale.NUM_CLASSES, 3, 3)
    np.testing.assert_array_equal(glyphs, glyphs[:, :, ::-1])
    flat = glyphs.reshape(len(glyphs), 9)
    distance = (flat[:, None] != flat[None]).sum(-1) + 9 * np.eye(len(glyphs), dtype=int)
    assert distance.min() >= 2


# ---------------------------------------------------------------- training streams

def test_same_seed_same_batches_other_seed_other_batches(data_dir):
    def first(seed):
        it = _iterator(data_dir, seed=seed)
        return [next(it) for _ in range(2)]

    a, b, c = first(3), first(3), first(4)
    for x, y in zip(a, b):
        for key in ('image', 'label', 'mask'):
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(a[0]['image'], c[0]['image'])
    assert a[0]['image'].shape == (10, 32, 32, 3) and a[0]['image'].dtype == np.float32
    assert a[0]['label'].dtype == np.int32
    np.testing.assert_array_equal(a[0]['mask'], np.ones(10, np.float32))


def test_train_epochs_are_permutations_reshuffled_each_epoch(data_dir, stored):
    images, *_ = stored['test']
    it = _iterator(data_dir, batch_size=100, augment_kind='none')
    epochs = [[k for _ in range(10) for k in _keys(_to_uint8(next(it)['image']))] for _ in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(_keys(images))
    assert epochs[0] != epochs[1]


def test_process_shards_are_disjoint_and_cover_an_epoch(data_dir, stored):
    images, *_ = stored['test']
    seen = []
    for process in range(2):
        it = _iterator(data_dir, batch_size=50, augment_kind='none',
                       process_index=process, process_count=2)
        seen.append({k for _ in range(10) for k in _keys(_to_uint8(next(it)['image']))})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(_keys(images))


def test_process_batches_interleave_into_the_single_process_batch(data_dir):
    single = _iterator(data_dir, batch_size=8, process_count=1, process_index=0)
    parts = [_iterator(data_dir, batch_size=4, process_count=2, process_index=p) for p in range(2)]
    for _ in range(3):
        whole, halves = next(single), [next(p) for p in parts]
        for key in ('image', 'label'):
            np.testing.assert_array_equal(halves[0][key], whole[key][0::2])
            np.testing.assert_array_equal(halves[1][key], whole[key][1::2])


def test_finite_epochs_give_whole_global_batches(data_dir):
    counts = [
        sum(1 for _ in _iterator(data_dir, batch_size=30, num_epochs=2, process_count=2,
                                 process_index=p))
        for p in range(2)
    ]
    assert counts == [2000 // 60] * 2


def test_start_batch_continues_the_stream_for_any_workers_and_processes(data_dir):
    """What a resumed run relies on: the iterator started at batch t of a run that read t
    batches yields what that run would have read next, with other worker and process counts."""
    it = _iterator(data_dir, split='train')
    expected = [next(it) for _ in range(7)][5:]
    with_worker = _iterator(data_dir, split='train', start_batch=5, worker_count=1)
    try:
        for want in expected:
            got = next(with_worker)
            np.testing.assert_array_equal(got['image'], want['image'])
            np.testing.assert_array_equal(got['label'], want['label'])
    finally:
        with_worker.close()
    halves = [next(_iterator(data_dir, split='train', start_batch=5, batch_size=5,
                             process_count=2, process_index=p)) for p in range(2)]
    np.testing.assert_array_equal(halves[1]['image'], expected[0]['image'][1::2])
    with pytest.raises(ValueError, match='start_batch'):
        _iterator(data_dir, split='test', train=False, start_batch=1)


# ---------------------------------------------------------------- evaluation

def test_eval_reads_every_example_once_over_processes_with_padding(data_dir, stored):
    images, labels, _ = stored['test']
    expected = collections.Counter(zip(_keys(images), labels.tolist()))
    seen, batch_counts = collections.Counter(), []
    for process in range(3):
        batches = list(_iterator(data_dir, train=False, batch_size=64,
                                 process_index=process, process_count=3))
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch['image'].shape == (64, 32, 32, 3)
            real = batch['mask'] == 1.0
            assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
            assert not batch['image'][~real].any() and not batch['label'][~real].any()
            seen.update(zip(_keys(_to_uint8(batch['image'][real])), batch['label'][real].tolist()))
    # 1000 examples over 3 processes: shards of 334, 333, 333 -> 6 batches of 64 each.
    assert batch_counts == [6, 6, 6]
    assert seen == expected


def test_eval_is_unshuffled_and_unaugmented(data_dir, stored):
    images, *_ = stored['test']
    batch = next(_iterator(data_dir, train=False, batch_size=5, seed=7))
    np.testing.assert_array_equal(_to_uint8(batch['image']), images[:5])


# ---------------------------------------------------------------- augmentation closed forms

def test_pad_and_crop_windows():
    image = np.arange(6 * 5 * 2, dtype=np.uint8).reshape(6, 5, 2) + 1
    top_left = augment.pad_and_crop(image, 4, 0, 0)
    np.testing.assert_array_equal(top_left[:4], 0)
    np.testing.assert_array_equal(top_left[:, :4], 0)
    np.testing.assert_array_equal(top_left[4:, 4:], image[:2, :1])
    np.testing.assert_array_equal(augment.pad_and_crop(image, 4, 4, 4), image)
    shifted = augment.pad_and_crop(image, 4, 5, 6)
    np.testing.assert_array_equal(shifted[:5, :3], image[1:, 2:])
    np.testing.assert_array_equal(shifted[5:], 0)
    np.testing.assert_array_equal(shifted[:, 3:], 0)


def test_cifar_augment_is_one_of_the_padded_windows_and_flips():
    image = np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8)
    padded = np.zeros((16, 16, 3), np.uint8)
    padded[4:12, 4:12] = image
    windows = {}
    for top in range(9):
        for left in range(9):
            window = padded[top:top + 8, left:left + 8]
            windows[window.tobytes()] = False
            windows[window[:, ::-1].tobytes()] = True
    transform = augment.TrainAugment('cifar', 8)
    flips = []
    for seed in range(40):
        out = transform.random_map({'image': image, 'label': 3}, np.random.default_rng(seed))
        assert out['label'] == 3
        flips.append(windows[out['image'].tobytes()])
    assert 0 < sum(flips) < len(flips)


def test_centre_crop_indices_without_resize():
    image = np.random.default_rng(1).integers(0, 256, (256, 300, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment.resize_and_center_crop(image, 224), image[16:240, 38:262])
    tall = image[:, :256].transpose(1, 0, 2)[:, :255]  # 256 x 255: shorter side 255 != 256
    assert augment.resize_and_center_crop(tall, 224).shape == (224, 224, 3)


def test_centre_crop_after_shorter_side_resize():
    image = np.random.default_rng(2).integers(0, 256, (100, 200, 3), dtype=np.uint8)
    # 56 / 0.875 = 64: 100x200 -> 64x128, then the centred 56x56 window starts at (4, 36).
    resized = np.asarray(Image.fromarray(image).resize((128, 64), Image.BILINEAR))
    np.testing.assert_array_equal(augment.resize_and_center_crop(image, 56), resized[4:60, 36:92])


def test_inception_crop_box_ranges_and_fallback():
    for seed in range(200):
        top, left, height, width = augment.sample_crop_box(60, 80, np.random.default_rng(seed))
        assert 0 <= top and top + height <= 60 and 0 <= left and left + width <= 80
        assert 0.08 * 0.9 <= height * width / 4800 <= 1.0
        assert 3 / 4 * 0.85 <= width / height <= 4 / 3 * 1.15
    # A 10x1000 strip fits no box of full area: the fallback is the centred 10x13 box.
    box = augment.sample_crop_box(10, 1000, np.random.default_rng(0), scale=(1.0, 1.0))
    assert box == (0, 493, 10, 13)
    out = augment.TrainAugment('imagenet', 24).random_map(
        {'image': np.zeros((60, 80, 3), np.uint8), 'label': 0}, np.random.default_rng(0))
    assert out['image'].shape == (24, 24, 3)


def test_normalize_closed_form_and_channel_check():
    image = np.array([[[0, 51, 255]]], np.uint8)
    out = augment.Normalize((0.5, 0.2, 1.0), (0.5, 0.1, 2.0)).map({'image': image, 'label': 7})
    np.testing.assert_allclose(out['image'], [[[-1.0, 0.0, 0.0]]], atol=1e-6)
    assert out['label'] == 7 and out['label'].dtype == np.int32 and out['mask'] == 1.0
    with pytest.raises(ValueError, match='3-channel'):
        augment.Normalize((0.5,) * 3, (0.5,) * 3).map({'image': image[..., :1], 'label': 0})


def test_cifar_augment_rejects_other_sizes():
    element = {'image': np.zeros((30, 32, 3), np.uint8), 'label': 0}
    with pytest.raises(ValueError, match='must be 32x32'):
        augment.EvalPreprocess('cifar', 32).map(element)


# ---------------------------------------------------------------- imagefolder

def _write_folder(root, layout, shape=(6, 6, 3)):
    """layout: {split: {class: [pixel value, ...]}} -> constant-colour PNGs of `shape`."""
    for split, classes in layout.items():
        os.makedirs(root / split, exist_ok=True)
        for name, values in classes.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i, value in enumerate(values):
                pixels = np.full(shape, value, np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return f'imagefolder:{root}'


def test_imagefolder_loads_with_sorted_classes(tmp_path):
    name = _write_folder(tmp_path, {
        'train': {'zebra': [10, 11], 'ant': [20, 21, 22], 'moth': [30]},
        'test': {'zebra': [40], 'ant': [50]},
    })
    info = pipeline.get_info(name)
    assert info == pipeline.DatasetInfo(
        num_classes=3, image_shape=(6, 6, 3), num_train=6, num_test=2,
        mean=sources.IMAGENET_MEAN, std=sources.IMAGENET_STD, augment='cifar',
    )
    batch = next(pipeline.make_iterator(name, 'test', batch_size=4, seed=0, train=False))
    pixels = (batch['image'] * np.asarray(info.std) + np.asarray(info.mean)) * 255
    np.testing.assert_allclose(pixels[:2, 0, 0, 0], [50, 40], atol=1e-3)  # ant=0, then zebra=2
    np.testing.assert_array_equal(batch['label'], [0, 2, 0, 0])
    np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 0])
    train = next(pipeline.make_iterator(name, 'train', batch_size=6, seed=0, train=True))
    assert sorted(train['label'].tolist()) == [0, 0, 0, 1, 2, 2]


def test_imagefolder_of_large_images_resizes_to_image_size(tmp_path):
    name = _write_folder(tmp_path, {'train': {'a': [60], 'b': [70]}, 'test': {'b': [80]}},
                         shape=(40, 50, 3))
    info = pipeline.get_info(name)
    assert (info.image_shape, info.augment) == ((224, 224, 3), 'imagenet')
    for train in (True, False):
        batch = next(pipeline.make_iterator(name, 'test', batch_size=1, seed=0, train=train,
                                            image_size=16))
        pixels = (batch['image'] * np.asarray(info.std) + np.asarray(info.mean)) * 255
        assert pixels.shape == (1, 16, 16, 3)
        np.testing.assert_allclose(pixels, 80, atol=1e-3)  # constant images stay constant


@pytest.mark.parametrize('layout, message', [
    ({'train': {'a': [1]}}, 'test.* is missing'),
    ({'train': {'a': [1]}, 'test': {}}, 'no class folder with images'),
    ({'train': {'a': [1], 'b': []}, 'test': {'a': [1]}}, r"without images.*\['b'\]"),
    ({'train': {'a': [1]}, 'test': {'a': [1], 'c': [2]}}, r"train/ lacks: \['c'\]"),
])
def test_imagefolder_errors(tmp_path, layout, message):
    name = _write_folder(tmp_path, layout)
    with pytest.raises(ValueError, match=message):
        pipeline.get_info(name)


# ---------------------------------------------------------------- TFDS datasets

def test_mock_tfds_datasets_load_through_make_iterator(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        info = pipeline.get_info('cifar10', data_dir=tmp_path)
        assert info == pipeline.DatasetInfo(
            num_classes=10, image_shape=(32, 32, 3), num_train=12, num_test=12,
            mean=sources.CIFAR_MEAN, std=sources.CIFAR_STD, augment='cifar',
        )
        batch = next(pipeline.make_iterator('cifar10', 'train', batch_size=4, seed=0, train=True,
                                            data_dir=tmp_path))
        assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
        assert ((0 <= batch['label']) & (batch['label'] < 10)).all()
        batches = list(pipeline.make_iterator('cifar10', 'test', batch_size=5, seed=0, train=False,
                                              data_dir=tmp_path))
        assert [b['mask'].sum() for b in batches] == [5, 5, 2]
        assert pipeline.get_info('cifar100_coarse', data_dir=tmp_path).num_classes == 20
        # A TFDS name without a preset: grey 28x28 digits get 'cifar' and grey ImageNet stats.
        mnist = pipeline.get_info('mnist', data_dir=tmp_path)
        assert (mnist.image_shape, mnist.augment) == ((28, 28, 1), 'cifar')
        np.testing.assert_allclose(mnist.mean, [np.mean(sources.IMAGENET_MEAN)])
        batch = next(pipeline.make_iterator('mnist', 'test', batch_size=3, seed=0, train=False,
                                            data_dir=tmp_path))
        assert batch['image'].shape == (3, 28, 28, 1)


@pytest.mark.parametrize('name, extra', [('cifar10', ''), ('imagenet2012', '--manual_dir')])
def test_unprepared_dataset_says_how_to_prepare(tmp_path, name, extra):
    with pytest.raises(pipeline.DatasetNotFoundError) as error:
        pipeline.make_iterator(name, 'train', batch_size=2, seed=0, train=True, data_dir=tmp_path)
    message = str(error.value)
    assert f"'{name}'" in message and str(tmp_path) in message
    assert f'tfds build {name} --file_format=array_record --data_dir={tmp_path}' in message
    assert extra in message


def test_unknown_dataset_is_one_line_value_error():
    with pytest.raises(ValueError, match="unknown dataset 'no_such_data'") as error:
        pipeline.get_info('no_such_data')
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('kw, message', [
    ({'split': 'validation'}, 'split must be one of'),
    ({'train': False, 'num_epochs': 1}, 'evaluation is one pass'),
    ({'image_size': 64}, "needs augment 'imagenet'"),
    ({'batch_size': 0}, 'batch_size must be an integer >= 1'),
    ({'seed': -1}, 'seed must be an integer >= 0'),
    ({'process_index': 2, 'process_count': 2}, r'process_index must be in \[0, 2\)'),
    ({'augment_kind': 'autoaugment'}, 'augment_kind must be one of'),
])
def test_bad_arguments(data_dir, kw, message):
    kw = {'split': 'test', **kw}
    with pytest.raises(ValueError, match=message):
        _iterator(data_dir, **kw)
