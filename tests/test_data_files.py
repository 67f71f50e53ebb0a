"""Folder datasets decode every file before training: bad files are listed in one error or, with
skip_bad_files, left out and logged; good verdicts are cached by path, size and mtime."""
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from aff_jax.data import file_checks, pipeline, sources

SIDE = 16   # noise PNGs of 16x16 are ~850 bytes, so half of one is cut inside the pixel data
TRUNCATED = r'truncated \([^;]*\)'
NOT_AN_IMAGE = re.escape('not an image (cannot identify image file)')
HOW_TO_GO_ON = re.escape('set config.skip_bad_files=True to train without them')


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Verdict caches under this test's folder, and no folder scans from other tests."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    sources.clear_folder_cache()
    yield
    sources.clear_folder_cache()


def _noise_png(path, seed, mode='RGB'):
    rng = np.random.default_rng(seed)
    if mode == 'RGB':
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    else:   # a mask of labels 0..2 and 255 (ignore)
        pixels = rng.choice(np.array([0, 1, 2, 255], np.uint8), (SIDE, SIDE))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _truncate(path):
    with open(path, 'rb') as file:
        data = file.read()
    with open(path, 'wb') as file:
        file.write(data[:len(data) // 2])


def _imagefolder(root, layout):
    """layout: {split: {class: number of good images}} -> noise PNGs; the resolved root."""
    root = os.path.realpath(root)
    seed = 0
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                seed += 1
                _noise_png(os.path.join(root, split, name, f'{i}.png'), seed)
    return root


GOOD_LAYOUT = {'train': {'a': 4, 'b': 4}, 'test': {'a': 2, 'b': 1}}   # 11 good files


def _break_three(root):
    """A truncated PNG, a zero-byte .png and a text file named .jpg: their paths."""
    truncated = _noise_png(os.path.join(root, 'train', 'a', 'truncated.png'), seed=1)
    _truncate(truncated)
    empty = os.path.join(root, 'train', 'b', 'empty.png')
    open(empty, 'wb').close()
    text = os.path.join(root, 'test', 'a', 'text.jpg')
    with open(text, 'w') as file:
        file.write('not a jpeg at all\n')
    return truncated, empty, text


def _one_pass(name, split, **kwargs):
    """Every example of `split` read once through the eval pipeline; the count of real ones."""
    iterator = pipeline.make_iterator(name, split, batch_size=2, seed=0, train=False, **kwargs)
    return int(sum(batch['mask'].sum() for batch in iterator))


def test_bad_files_are_listed_in_one_error_with_reasons_and_count(tmp_path):
    root = _imagefolder(tmp_path / 'data', GOOD_LAYOUT)
    truncated, empty, text = _break_three(root)
    with pytest.raises(ValueError) as error:
        pipeline.get_info(f'imagefolder:{root}')
    message = str(error.value)
    assert '\n' not in message
    # Listed in reading order: train before test, classes and files sorted.
    assert re.fullmatch(
        f'imagefolder: cannot read 3 of 14 files: {re.escape(truncated)}: {TRUNCATED}; '
        f'{re.escape(empty)}: zero bytes; {re.escape(text)}: {NOT_AN_IMAGE}; {HOW_TO_GO_ON}',
        message,
    ), message


def test_more_than_20_bad_files_show_20_and_the_total(tmp_path):
    root = _imagefolder(tmp_path / 'data', GOOD_LAYOUT)
    for i in range(25):
        open(os.path.join(root, 'train', 'a', f'empty_{i:02d}.png'), 'wb').close()
    with pytest.raises(ValueError, match=r'cannot read 25 of 36 files: ') as error:
        pipeline.get_info(f'imagefolder:{root}')
    message = str(error.value)
    assert message.count(': zero bytes') == 20
    assert 'empty_19.png: zero bytes; and 5 more; ' in message and 'empty_20' not in message
    assert re.search(f'{HOW_TO_GO_ON}$', message)


def test_skip_bad_files_leaves_them_out_logs_each_and_reads_every_split(tmp_path, caplog):
    root = _imagefolder(tmp_path / 'data', GOOD_LAYOUT)
    bad = _break_three(root)
    name = f'imagefolder:{root}'
    info = pipeline.get_info(name, skip_bad_files=True)
    assert (info.num_train, info.num_test, info.class_names) == (8, 3, ('a', 'b'))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(warnings) == 4
    for path, reason in zip(bad, ('truncated', 'zero bytes', 'not an image')):
        assert sum(f'leaving out {path}: {reason}' in w for w in warnings) == 1
    assert 'left out the examples of 3 bad files (of 14 files)' in warnings[-1]
    caplog.clear()
    # The process keeps the scan: the iterators neither decode nor log again.
    assert _one_pass(name, 'train', skip_bad_files=True) == 8
    assert _one_pass(name, 'test', skip_bad_files=True) == 3
    train = pipeline.make_iterator(name, 'train', batch_size=4, seed=0, train=True,
                                   num_epochs=2, skip_bad_files=True)
    assert sum(len(batch['label']) for batch in train) == 16
    assert not caplog.records
    with pytest.raises(ValueError, match='cannot read 3 of 14 files'):
        pipeline.get_info(name)   # skipping is per call, not remembered


def test_class_folder_left_without_images_is_an_error(tmp_path):
    root = _imagefolder(tmp_path / 'data', {'train': {'a': 2}, 'test': {'a': 1}})
    os.makedirs(os.path.join(root, 'train', 'b'))
    for i in range(2):
        open(os.path.join(root, 'train', 'b', f'{i}.png'), 'wb').close()
    with pytest.raises(ValueError, match=re.escape(
            f"class folders without images in {root}/train once the bad files are left out: "
            f"['b']")):
        pipeline.get_info(f'imagefolder:{root}', skip_bad_files=True)


def _rewrite_keeping_size_and_mtime(path):
    """Garbage of the same size, and the old mtime back."""
    stat = os.stat(path)
    with open(path, 'wb') as file:
        file.write(b'x' * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verdict_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path):
    root = _imagefolder(tmp_path / 'data', GOOD_LAYOUT)
    name = f'imagefolder:{root}'
    assert pipeline.get_info(name).num_train == 8
    cache = file_checks.cache_path(root)
    assert cache.startswith(str(tmp_path / 'cache' / 'aff_jax' / 'file_checks'))
    assert os.path.isfile(cache)
    victim = os.path.join(root, 'train', 'b', '2.png')
    _rewrite_keeping_size_and_mtime(victim)
    sources.clear_folder_cache()
    # Garbage under the cached size and mtime passes: the file was not decoded again.
    assert pipeline.get_info(name).num_train == 8
    sources.clear_folder_cache()
    stat = os.stat(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ValueError, match=f'cannot read 1 of 11 files: {re.escape(victim)}: '
                                         f'{NOT_AN_IMAGE}'):
        pipeline.get_info(name)
    # The bad verdict is not cached: the file mended, the folder loads again.
    _noise_png(victim, seed=5)
    assert pipeline.get_info(name).num_train == 8
    # A new size under the cached mtime is checked again too.
    sources.clear_folder_cache()
    stat = os.stat(victim)
    with open(victim, 'wb') as file:
        file.write(b'x' * (stat.st_size + 7))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match='cannot read 1 of 11 files'):
        pipeline.get_info(name)


def test_unwritable_or_corrupt_cache_does_not_fail_the_load(tmp_path, monkeypatch, caplog):
    root = _imagefolder(tmp_path / 'data', GOOD_LAYOUT)
    name = f'imagefolder:{root}'
    (tmp_path / 'not_a_directory').write_text('')
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'not_a_directory'))
    assert pipeline.get_info(name).num_train == 8
    assert any('not cached' in r.getMessage() for r in caplog.records)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    os.makedirs(os.path.dirname(file_checks.cache_path(root)))
    with open(file_checks.cache_path(root), 'w') as file:
        file.write('{"version": 1, "files": {"train/a/0.png": [1, 2')
    sources.clear_folder_cache()
    assert pipeline.get_info(name).num_train == 8
    with open(file_checks.cache_path(root)) as file:
        assert '"train/a/0.png"' in file.read()   # rewritten whole


def _segfolder(root):
    """train: a0..a3, test: b0..b2, noise images with noise masks; the resolved root."""
    root = os.path.realpath(root)
    for split, stems in {'train': ['a0', 'a1', 'a2', 'a3'], 'test': ['b0', 'b1', 'b2']}.items():
        for seed, stem in enumerate(stems):
            _noise_png(os.path.join(root, split, 'images', f'{stem}.png'), seed)
            _noise_png(os.path.join(root, split, 'masks', f'{stem}.png'), seed, mode='L')
    return root


def test_segfolder_bad_image_and_mask_are_listed_or_skipped_with_their_pairs(tmp_path, caplog):
    root = _segfolder(tmp_path / 'data')
    image = os.path.join(root, 'train', 'images', 'a1.png')
    mask = os.path.join(root, 'test', 'masks', 'b0.png')
    _truncate(image)
    _truncate(mask)
    name = f'segfolder:{root}'
    with pytest.raises(ValueError) as error:
        pipeline.get_info(name)
    assert re.fullmatch(
        f'segfolder: cannot read 2 of 14 files: {re.escape(image)}: {TRUNCATED}; '
        f'{re.escape(mask)}: {TRUNCATED}; {HOW_TO_GO_ON}', str(error.value),
    ), str(error.value)
    info = pipeline.get_info(name, skip_bad_files=True)
    assert (info.num_train, info.num_test, info.num_classes) == (3, 2, 3)
    logged = ' '.join(r.getMessage() for r in caplog.records)
    for path in (image, mask):
        assert f'leaving out {path}: truncated' in logged
    assert _one_pass(name, 'train', skip_bad_files=True) == 3
    assert _one_pass(name, 'test', skip_bad_files=True) == 2


def test_segfolder_masks_labels_come_from_the_cache_until_the_mask_changes(tmp_path):
    root = _segfolder(tmp_path / 'data')
    name = f'segfolder:{root}'
    assert pipeline.get_info(name).num_classes == 3
    mask = os.path.join(root, 'train', 'masks', 'a2.png')
    _rewrite_keeping_size_and_mtime(mask)
    sources.clear_folder_cache()
    assert pipeline.get_info(name).num_classes == 3   # labels read from the cache
    sources.clear_folder_cache()
    os.utime(mask)
    with pytest.raises(ValueError, match=f'cannot read 1 of 14 files: {re.escape(mask)}: '
                                         f'{NOT_AN_IMAGE}'):
        pipeline.get_info(name)


def test_tfds_datasets_ignore_skip_bad_files(tmp_path):
    with tfds.testing.mock_data(num_examples=4):
        assert pipeline.get_info('cifar10', data_dir=tmp_path, skip_bad_files=True).num_train == 4
