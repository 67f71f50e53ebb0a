"""Segmentation data: the embedded aff_stopsign, segmentation folders, paired augmentation."""

import collections
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage

from aff_jax.data import augment, pipeline, sources, stopsign

NAME = 'aff_stopsign'


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """A prepared aff_stopsign, built once for the module."""
    path = tmp_path_factory.mktemp('tfds')
    pipeline.get_info(NAME, data_dir=path)
    return path


@pytest.fixture(scope='module')
def stored(data_dir):
    """split -> (images (N, 64, 64, 3) uint8, label maps (N, 64, 64) uint8) in storage order."""
    splits = {}
    for split, size in stopsign.SPLIT_SIZES.items():
        source = tfds.data_source(NAME, split=split, data_dir=data_dir)
        records = source.__getitems__(range(size))
        splits[split] = (np.stack([r['image'] for r in records]),
                         np.stack([r['segmentation_mask'] for r in records]))
    return splits


def _iterator(data_dir, split='test', **kw):
    kw = {'batch_size': 8, 'seed': 0, 'train': True, 'data_dir': data_dir, **kw}
    return pipeline.make_iterator(NAME, split, **kw)


def _to_uint8(images, mean=stopsign.MEAN, std=stopsign.STD):
    """Undoes the normalisation of a batch: (B, H, W, C) float -> uint8."""
    return np.rint((images * np.asarray(std) + np.asarray(mean)) * 255).astype(np.uint8)


def _sign_red(images):
    """(..., 3) uint8 -> bool: pixels in the signs' red range, widened by the pixel noise."""
    r, g, b = (images[..., c].astype(int) for c in range(3))
    return (r >= 140) & (g <= 60) & (b <= 70)


# ---------------------------------------------------------------- aff_stopsign

def test_stopsign_info_and_stored_shapes(data_dir, stored):
    info = pipeline.get_info(NAME, data_dir=data_dir)
    assert info == pipeline.DatasetInfo(
        num_classes=2, image_shape=(64, 64, 3), num_train=2000, num_test=500,
        mean=stopsign.MEAN, std=stopsign.STD, augment='segmentation', task='segmentation',
    )
    assert info.class_names == ('background', 'sign') == stopsign.CLASS_NAMES
    assert pipeline.IGNORE_LABEL == sources.IGNORE_LABEL == 255
    for split, size in stopsign.SPLIT_SIZES.items():
        images, labels = stored[split]
        assert images.shape == (size, 64, 64, 3) and images.dtype == np.uint8
        assert labels.shape == (size, 64, 64, 1) and labels.dtype == np.uint8
        assert set(np.unique(labels)) == {0, 1}


def test_stopsign_stores_exactly_the_generator_output(stored):
    images, labels = stored['test']
    on_disk = {image.tobytes(): label[..., 0] for image, label in zip(images, labels)}
    assert len(on_disk) == len(images)  # no duplicate images
    for index in range(stopsign.SPLIT_SIZES['test']):
        image, label = stopsign.example('test', index)
        np.testing.assert_array_equal(on_disk[image.tobytes()], label)


def test_stopsign_build_is_byte_identical(data_dir, tmp_path):
    pipeline.get_info(NAME, data_dir=tmp_path)
    first, second = (d / NAME / str(stopsign.AffStopsign.VERSION) for d in (data_dir, tmp_path))
    shards = sorted(p.name for p in first.iterdir() if '.array_record' in p.name)
    assert len(shards) == 2
    for shard in shards:
        assert (first / shard).read_bytes() == (second / shard).read_bytes()


def test_stopsign_mean_std_constants_match_train_split(stored):
    images, _ = stored['train']
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(pixels.mean(0), stopsign.MEAN, atol=1e-3)
    np.testing.assert_allclose(pixels.std(0), stopsign.STD, atol=1e-3)


def _octagon_by_half_planes(cy, cx, width, rotation):
    """(64, 64) bool, independently: pixel centres left of all 8 directed edges of the octagon.

    Vertices of a regular octagon `width` across flats, with flat edges' normals at
    rotation + k pi/4: circumradius (width / 2) / cos(pi/8), vertices at rotation + pi/8 + k pi/4.
    """
    radius = width / 2 / np.cos(np.pi / 8)
    angles = rotation + np.pi / 8 + np.arange(8) * np.pi / 4
    vertices = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], -1)
    ys, xs = np.mgrid[0:64, 0:64]
    inside = np.ones((64, 64), bool)
    for k in range(8):
        (x0, y0), (x1, y1) = vertices[k], vertices[(k + 1) % 8]
        # Angles grow clockwise on screen (y down): the interior is where the cross product >= 0.
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= 0
    return inside


@pytest.mark.parametrize('cy, cx, width, rotation', [
    (31.3, 30.7, 40.0, 0.0),      # upright, large
    (20.2, 44.6, 17.0, 0.13),     # tilted
    (2.4, 61.1, 23.5, -0.19),     # partly off the top-right corner
    (40.45, 9.7, 3.2, 0.05),      # a few pixels
])
def test_sign_label_is_exactly_the_octagon(cy, cx, width, rotation):
    expected = _octagon_by_half_planes(cy, cx, width, rotation)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(stopsign.octagon_norm(cy, cx, width, rotation) <= 1, expected)
    background = np.full((64, 64, 3), 7.0)
    image, label = background.copy(), np.zeros((64, 64), np.uint8)
    stopsign.paint_sign(image, label, np.random.default_rng(0), cy, cx, width, rotation)
    np.testing.assert_array_equal(label, expected.astype(np.uint8))
    changed = (image != background).any(-1)
    np.testing.assert_array_equal(changed, expected)   # red and white marks, all inside
    if width >= 15:
        white = image.min(-1) >= 215
        assert white.any() and _sign_red(image.astype(np.uint8)).any()


def test_sign_sizes_span_few_pixels_to_half_the_image(stored):
    _, labels = stored['train']
    widths = []
    for label in labels[..., 0]:
        components, _ = ndimage.label(label)
        for rows, cols in ndimage.find_objects(components):
            if rows.start > 0 and cols.start > 0 and rows.stop < 64 and cols.stop < 64:
                widths.append(cols.stop - cols.start)   # whole signs only
    widths = np.array(widths)
    assert widths.min() <= 4 and widths.max() >= 30
    assert (widths < 8).mean() >= 0.3     # small signs are common
    assert (widths >= 24).sum() >= 50


def test_colour_alone_does_not_find_the_signs(stored):
    images, labels = stored['train']
    red, sign = _sign_red(images), labels[..., 0] == 1
    red_elsewhere = (red & ~sign).reshape(len(images), -1).sum(1)
    assert (red_elsewhere >= 5).mean() >= 0.5   # distractors and backgrounds share the red
    assert red[sign].mean() >= 0.6               # the rule does find the sign pixels ...
    assert (red & sign).sum() / (red | sign).sum() < 0.4   # ... among many others: low IoU


def test_both_classes_in_every_batch(data_dir, stored):
    _, labels = stored['train']
    per_batch = labels[:len(labels) // 32 * 32].reshape(-1, 32 * 64 * 64)
    assert (per_batch.max(-1) == 1).all() and (per_batch.min(-1) == 0).all()
    assert (per_batch == 1).mean() >= 0.02   # a few percent of the pixels are sign
    it = _iterator(data_dir, split='train', batch_size=32)
    for _ in range(4):
        batch = next(it)
        assert {0, 1} <= set(np.unique(batch['label'])) <= {0, 1, 255}


# ---------------------------------------------------------------- streams

def test_train_batches_shapes_and_augmentation(data_dir):
    batch = next(_iterator(data_dir, split='train', batch_size=16))
    assert batch['image'].shape == (16, 64, 64, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (16, 64, 64) and batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['mask'], np.ones(16, np.float32))
    # Scales below 1 leave padding: zero pixels labelled 255, in some of the 16 images.
    ignore = batch['label'] == 255
    assert ignore.any()
    np.testing.assert_array_equal(_to_uint8(batch['image'])[ignore], 0)
    small = next(_iterator(data_dir, split='train', image_size=40))
    assert small['image'].shape == (8, 40, 40, 3) and small['label'].shape == (8, 40, 40)


def test_state_restore_mid_stream_continues_identically(data_dir, tmp_path):
    it = _iterator(data_dir, split='train')
    for _ in range(3):
        next(it)
    manager = ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',))
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]

    fresh = _iterator(data_dir, split='train')
    restored = manager.restore(
        3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    manager.close()
    for want in expected:
        got = next(restored['data'])
        for key in ('image', 'label', 'mask'):
            np.testing.assert_array_equal(got[key], want[key])


def test_process_batches_interleave_into_the_single_process_batch(data_dir):
    single = _iterator(data_dir, split='train', batch_size=8, process_count=1, process_index=0)
    parts = [_iterator(data_dir, split='train', batch_size=4, process_count=2, process_index=p)
             for p in range(2)]
    for _ in range(2):
        whole, halves = next(single), [next(p) for p in parts]
        for key in ('image', 'label'):
            np.testing.assert_array_equal(halves[0][key], whole[key][0::2])
            np.testing.assert_array_equal(halves[1][key], whole[key][1::2])


def test_eval_reads_every_example_once_over_processes_with_padding(data_dir, stored):
    images, labels = stored['test']
    expected = collections.Counter(
        (image.tobytes(), label.tobytes()) for image, label in zip(images, labels[..., 0]))
    seen, batch_counts = collections.Counter(), []
    for process in range(3):
        batches = list(_iterator(data_dir, train=False, batch_size=64,
                                 process_index=process, process_count=3))
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch['image'].shape == (64, 64, 64, 3) and batch['label'].shape == (64, 64, 64)
            real = batch['mask'] == 1.0
            assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
            assert not batch['image'][~real].any() and (batch['label'][~real] == 255).all()
            seen.update((image.tobytes(), label.astype(np.uint8).tobytes()) for image, label
                        in zip(_to_uint8(batch['image'][real]), batch['label'][real]))
        assert batches[-1]['mask'][-1] == 0.0   # the last batch of each process is padded
    # 500 examples over 3 processes: shards of 167, 167, 166 -> 3 batches of 64 each.
    assert batch_counts == [3, 3, 3]
    assert seen == expected


def test_eval_batches_do_not_depend_on_worker_count(data_dir):
    threads = list(_iterator(data_dir, train=False, batch_size=100))
    workers = _iterator(data_dir, train=False, batch_size=100, worker_count=2)
    try:
        for want in threads:
            got = next(workers)
            for key in ('image', 'label', 'mask'):
                np.testing.assert_array_equal(got[key], want[key])
    finally:
        workers.close()


@pytest.mark.parametrize('kind', ['cifar', 'imagenet'])
def test_classification_augments_refuse_label_maps(data_dir, kind):
    with pytest.raises(ValueError, match=f"augment_kind '{kind}' does not suit a segmentation"):
        _iterator(data_dir, augment_kind=kind)


# ---------------------------------------------------------------- paired augmentation

def _coordinate_pair(side=64):
    """Label (r // 8 + c // 8) % 4 and an image whose red is label * 60, green 4 r, blue 4 c."""
    rows, cols = np.mgrid[0:side, 0:side]
    label = ((rows // 8 + cols // 8) % 4).astype(np.uint8)
    image = np.stack([label * 60, rows * 4, cols * 4], -1).astype(np.uint8)
    return image, label


def _interior(label):
    """Pixels whose 3x3 neighbourhood holds one label (away from region and window edges: the
    image beyond a window's edge may have blurred into it)."""
    padded = np.pad(label.astype(int), 1, constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    return (windows == label[..., None, None]).all((-1, -2))


@pytest.mark.parametrize('top, left', [(0, 0), (10, 5), (-6, 20), (30, 40)])
def test_unit_scale_crop_is_a_window_padded_with_zero_and_ignore(top, left):
    image, label = _coordinate_pair()
    scaled_image, scaled_label = augment.rescale_pair(image, label, 1.0)
    assert scaled_image is image and scaled_label is label   # no resampling at scale 1
    out_image, out_label = augment.crop_pair(image, label, top, left, 48)
    assert out_image.shape == (48, 48, 3) and out_label.shape == (48, 48)
    rows, cols = top + np.arange(48)[:, None], left + np.arange(48)[None, :]
    inside = (0 <= rows) & (rows < 64) & (0 <= cols) & (cols < 64)
    source = np.clip(rows, 0, 63), np.clip(cols, 0, 63)
    np.testing.assert_array_equal(out_label[inside], label[source][inside])
    np.testing.assert_array_equal(out_image[inside], image[source][inside])
    assert (out_label[~inside] == 255).all() and not out_image[~inside].any()
    assert inside.any() and (top >= 0 or (~inside).any())


def test_double_scale_crop_keeps_image_and_labels_aligned():
    image, label = _coordinate_pair()
    big_image, big_label = augment.rescale_pair(image, label, 2.0)
    assert big_image.shape == (128, 128, 3)
    np.testing.assert_array_equal(big_label, label.repeat(2, 0).repeat(2, 1))  # nearest
    out_image, out_label = augment.crop_pair(big_image, big_label, 37, 70, 64)
    np.testing.assert_array_equal(out_label[:, :58], big_label[37:101, 70:128])
    assert (out_label[:, 58:] == 255).all() and not out_image[:, 58:].any()
    inside = out_label != 255
    interior = _interior(out_label) & inside
    np.testing.assert_array_equal(out_image[..., 0][interior], out_label[interior] * 60)
    # Bilinear blur reaches one pixel past a boundary at most.
    assert interior.sum() >= 0.7 * inside.sum()
    rows = (37 + np.arange(64)) // 2
    np.testing.assert_allclose(out_image[:, 0, 1], rows * 4, atol=2)   # green tracks the row


def test_train_augment_moves_image_and_label_together():
    image, label = _coordinate_pair()
    transform = augment.TrainAugment('segmentation', 48)
    flips, padded = [], 0
    for seed in range(30):
        out = transform.random_map({'image': image, 'label': label}, np.random.default_rng(seed))
        out_image, out_label = out['image'], out['label']
        assert out_image.shape == (48, 48, 3) and out_label.shape == (48, 48)
        ignore = out_label == 255
        padded += ignore.any()
        assert not out_image[ignore].any()
        interior = _interior(out_label) & ~ignore
        assert interior.any()
        error = np.abs(out_image[..., 0][interior].astype(int) - out_label[interior] * 60)
        assert error.max() <= 1
        # The column encoding (blue) runs right to left after a flip.
        both_real = ~ignore[:, 1:] & ~ignore[:, :-1]
        flips.append(np.diff(out_image[..., 2].astype(int), axis=1)[both_real].sum() < 0)
    assert 0 < sum(flips) < len(flips) and padded > 0


def test_segmentation_eval_resizes_nearest_and_is_a_noop_at_the_stored_size():
    image, label = _coordinate_pair(32)
    same = augment.EvalPreprocess('segmentation', 32).map({'image': image, 'label': label})
    assert same['image'] is image and same['label'] is label
    up = augment.EvalPreprocess('segmentation', 64).map({'image': image, 'label': label})
    np.testing.assert_array_equal(up['label'], label.repeat(2, 0).repeat(2, 1))
    interior = _interior(up['label'])
    np.testing.assert_array_equal(up['image'][..., 0][interior], up['label'][interior] * 60)
    with pytest.raises(ValueError, match='needs a label map'):
        augment.EvalPreprocess('segmentation', 32).map({'image': image, 'label': 3})


# ---------------------------------------------------------------- segfolder

def _write_segfolder(root, pairs, mask_mode='L'):
    """pairs: {split: {stem: (image (H, W, 3) uint8, mask (H, W) uint8)}} -> PNG files.

    'P' masks get a palette whose colours differ from the indices, so reading colours would
    show.
    """
    for split, examples in pairs.items():
        os.makedirs(root / split / 'images', exist_ok=True)
        os.makedirs(root / split / 'masks', exist_ok=True)
        for stem, (image, mask) in examples.items():
            Image.fromarray(image).save(root / split / 'images' / f'{stem}.png')
            mask_image = Image.fromarray(mask)
            if mask_mode == 'P':
                mask_image = mask_image.convert('P')   # 'L' -> 'P' keeps the indices
                mask_image.putpalette([(7 * i + 40) % 256 for i in range(768)])
            mask_image.save(root / split / 'masks' / f'{stem}.png')
    return f'segfolder:{root}'


def _folder_pairs(side=8, seed=0, labels=(0, 1, 2)):
    rng = np.random.default_rng(seed)

    def pair():
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = rng.choice(np.array(labels + (255,), np.uint8), (side, side))
        return image, mask

    return {'train': {f'a{i}': pair() for i in range(3)},
            'test': {'b0': pair(), 'b1': pair()}}


@pytest.mark.parametrize('mask_mode', ['L', 'P'])
def test_segfolder_reads_exact_images_and_masks(tmp_path, mask_mode):
    pairs = _folder_pairs(labels=(0, 1, 4))
    name = _write_segfolder(tmp_path, pairs, mask_mode)
    info = pipeline.get_info(name)
    assert info == pipeline.DatasetInfo(
        num_classes=5, image_shape=(8, 8, 3), num_train=3, num_test=2,
        mean=sources.IMAGENET_MEAN, std=sources.IMAGENET_STD, augment='segmentation',
        task='segmentation',
    )
    assert info.class_names == ('class_0', 'class_1', 'class_2', 'class_3', 'class_4')
    batch = next(pipeline.make_iterator(name, 'test', batch_size=3, seed=0, train=False))
    images = _to_uint8(batch['image'], sources.IMAGENET_MEAN, sources.IMAGENET_STD)
    for i, stem in enumerate(['b0', 'b1']):   # sorted by name
        np.testing.assert_array_equal(images[i], pairs['test'][stem][0])
        np.testing.assert_array_equal(batch['label'][i], pairs['test'][stem][1])
    np.testing.assert_array_equal(batch['mask'], [1, 1, 0])
    assert (batch['label'][2] == 255).all() and not batch['image'][2].any()
    train = next(pipeline.make_iterator(name, 'train', batch_size=3, seed=0, train=True))
    assert train['label'].shape == (3, 8, 8)
    assert set(np.unique(train['label'])) <= {0, 1, 4, 255}


def test_segfolder_num_classes_argument_and_classes_file(tmp_path):
    name = _write_segfolder(tmp_path, _folder_pairs(labels=(0, 2)))
    assert pipeline.get_info(name).num_classes == 3
    info = pipeline.get_info(name, num_classes=6)
    assert info.num_classes == 6 and info.class_names[-1] == 'class_5'
    batch = next(pipeline.make_iterator(name, 'test', batch_size=2, seed=0, train=False,
                                        num_classes=6))
    assert batch['label'].shape == (2, 8, 8)
    (tmp_path / 'classes.txt').write_text('sky\nroad\ncar\n\n')
    assert pipeline.get_info(name, num_classes=3).class_names == ('sky', 'road', 'car')
    with pytest.raises(ValueError, match="num_classes is 4 but .*classes.txt' names 3 classes"):
        pipeline.get_info(name, num_classes=4)
    for bad in (0, 256, 2.5):
        with pytest.raises(ValueError, match=r'num_classes must be an integer in \[1, 255\]'):
            pipeline.get_info(name, num_classes=bad)


def test_segfolder_of_mixed_sizes_resizes_to_image_size(tmp_path):
    rng = np.random.default_rng(3)
    pairs = {
        'train': {'wide': (rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
                           np.zeros((10, 14), np.uint8))},
        'test': {'square': (np.full((9, 9, 3), 90, np.uint8),
                            np.kron(np.array([[1, 0], [0, 1]], np.uint8), np.ones((5, 5)))[:9, :9]
                            .astype(np.uint8))},
    }
    name = _write_segfolder(tmp_path, pairs)
    info = pipeline.get_info(name)
    assert info.image_shape == (sources.SEGMENTATION_IMAGE_SIZE,) * 2 + (3,)
    batch = next(pipeline.make_iterator(name, 'test', batch_size=1, seed=0, train=False,
                                        image_size=18))
    assert batch['image'].shape == (1, 18, 18, 3)
    np.testing.assert_allclose(_to_uint8(batch['image'], sources.IMAGENET_MEAN,
                                         sources.IMAGENET_STD), 90, atol=1)
    expected = np.asarray(Image.fromarray(pairs['test']['square'][1]).resize((18, 18),
                                                                            Image.NEAREST))
    np.testing.assert_array_equal(batch['label'][0], expected)
    train = next(pipeline.make_iterator(name, 'train', batch_size=1, seed=0, train=True,
                                        image_size=12))
    assert train['label'].shape == (1, 12, 12)


def test_segfolder_scan_is_cached_per_path_and_num_classes(tmp_path, monkeypatch):
    name = _write_segfolder(tmp_path, _folder_pairs())
    calls = []
    real = sources._mask_labels
    monkeypatch.setattr(sources, '_mask_labels', lambda *a: calls.append(a) or real(*a))
    pipeline.get_info(name)
    assert len(calls) == 5
    pipeline.get_info(name)
    next(pipeline.make_iterator(name, 'test', batch_size=2, seed=0, train=False))
    assert len(calls) == 5
    pipeline.get_info(name, num_classes=4)
    assert len(calls) == 10


def _break_image_without_mask(root):
    os.remove(root / 'train' / 'masks' / 'a1.png')
    return root / 'train' / 'images' / 'a1.png', 'has no mask'


def _break_mask_without_image(root):
    os.remove(root / 'test' / 'images' / 'b1.png')
    return root / 'test' / 'masks' / 'b1.png', 'has no image'


def _break_mask_size(root):
    path = root / 'train' / 'masks' / 'a2.png'
    Image.fromarray(np.zeros((8, 7), np.uint8)).save(path)
    return path, r'is 7x8 \(WxH\) but its image .*a2.png.* is 8x8'


def _break_mask_channels(root):
    path = root / 'test' / 'masks' / 'b0.png'
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return path, "has PIL mode 'RGB'; masks must be single-channel"


def _break_label_range(root):
    path = root / 'test' / 'masks' / 'b1.png'
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(path)
    return path, 'has label 7 but num_classes is 3'


def _break_missing_split(root):
    os.rename(root / 'test', root / 'validation')
    return root / 'test' / 'images', 'is missing'


def _break_empty_split(root):
    for directory in ('images', 'masks'):
        for path in (root / 'test' / directory).iterdir():
            os.remove(path)
    return root / 'test' / 'images', 'no images'


def _break_unreadable_image(root):
    path = root / 'train' / 'images' / 'a0.png'
    path.write_bytes(b'not a png')
    return path, 'cannot read'


def _break_classes_file(root):
    path = root / 'classes.txt'
    path.write_text('sky\n\ncar\n')
    return path, 'line 2 is empty'


@pytest.mark.parametrize('break_folder', [
    _break_image_without_mask, _break_mask_without_image, _break_mask_size,
    _break_mask_channels, _break_label_range, _break_missing_split, _break_empty_split,
    _break_unreadable_image, _break_classes_file,
])
def test_segfolder_errors_name_the_file_in_one_line(tmp_path, break_folder):
    name = _write_segfolder(tmp_path, _folder_pairs())
    path, message = break_folder(tmp_path)
    num_classes = 3 if break_folder is _break_label_range else None
    with pytest.raises(ValueError, match=message) as error:
        pipeline.get_info(name, num_classes=num_classes)
    assert str(path) in str(error.value)
    assert '\n' not in str(error.value)


def test_segfolder_error_is_not_cached(tmp_path):
    name = _write_segfolder(tmp_path, _folder_pairs())
    path, _ = _break_image_without_mask(tmp_path)
    with pytest.raises(ValueError, match='has no mask'):
        pipeline.get_info(name)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / 'train' / 'masks' / 'a1.png')
    assert pipeline.get_info(name).num_train == 3


# ---------------------------------------------------------------- classification infos

def test_classification_infos_name_their_classes(tmp_path):
    for split, classes in {'train': ('zebra', 'ant'), 'test': ('ant',)}.items():
        for name in classes:
            os.makedirs(tmp_path / 'folder' / split / name)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
                tmp_path / 'folder' / split / name / '0.png')
    info = pipeline.get_info(f'imagefolder:{tmp_path / "folder"}', num_classes=7)  # ignored
    assert (info.task, info.num_classes, info.class_names) == ('classification', 2,
                                                               ('ant', 'zebra'))
    with tfds.testing.mock_data(num_examples=4):
        # CIFAR's builder reads its class names from the download, which mock data skips: the
        # ClassLabel then numbers them.
        cifar = pipeline.get_info('cifar10', data_dir=tmp_path)
        assert cifar.class_names == tuple(map(str, range(10))) and cifar.task == 'classification'
        assert len(pipeline.get_info('cifar100_coarse', data_dir=tmp_path).class_names) == 20
