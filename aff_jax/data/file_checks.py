"""The files of a folder dataset, each decoded once before training, with cached verdicts.

`check(root, images, masks)` decodes every file the way the training reads do (images to RGB,
masks as stored) in a pool of `os.cpu_count()` threads, with a progress bar on stderr for more
than `PROGRESS_MIN_FILES` files. A file is bad when it is empty, not an image, truncated or
fails to decode for any other reason; a good one yields its `Facts`.

Good verdicts are cached in a JSON file per dataset folder under `cache_dir()`
($XDG_CACHE_HOME/aff_jax/file_checks, else ~/.cache/aff_jax/file_checks), keyed by the file's
path, byte size and mtime_ns: a later load, in this process or another, decodes only the files
that are new, changed (any size or mtime) or were bad. Failing to write the cache costs a
warning, never the run.

`report_bad(what, bad, total, skip_bad_files)` turns the bad files into one `ValueError` (or,
when skipping them, one warning per file and a summary).
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np
import tqdm
from absl import logging
from PIL import Image, UnidentifiedImageError

from aff_jax.user_cache import user_cache_dir

PROGRESS_MIN_FILES = 200   # larger checks show a progress bar
MAX_LISTED = 20            # bad files named in the error; the rest are counted
LABEL_MODES = ('L', 'P')   # mask modes whose stored values are class indices
_CACHE_VERSION = 1
_CHUNK = 32                # files per pool task: few futures for a million files


@dataclasses.dataclass(frozen=True)
class Facts:
    """What decoding a good file found.

    size: (width, height). mode: the PIL mode as stored.
    labels: masks in `LABEL_MODES` only, the sorted values present; else empty.
    """

    size: tuple[int, int]
    mode: str
    labels: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Checked:
    """The verdicts of `check`: `good` path -> Facts, `bad` path -> reason, in input order."""

    good: dict
    bad: dict


def cache_dir() -> str:
    """Where the verdict caches live: $XDG_CACHE_HOME/aff_jax/file_checks or ~/.cache/..."""
    return str(user_cache_dir('file_checks'))


def cache_path(root: str) -> str:
    """The verdict cache file of dataset folder `root` (one file per resolved folder)."""
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), f'{digest}.json')


def check(root: str, images, masks=()) -> Checked:
    """Decodes each file of `images` and `masks` (paths inside folder `root`) that is not cached
    as good under its current size and mtime, and rewrites the cache with the good files (bad
    ones stay uncached, so that a passing read error does not stick).

    Images are converted to RGB; masks are loaded as stored, and those in `LABEL_MODES` report
    their labels.
    """
    cached = _read_cache(root)
    entries = []
    for paths, is_mask in ((images, False), (masks, True)):
        for path in paths:
            relative = os.path.relpath(path, root)
            entries.append((path, relative, is_mask, cached.get(relative)))
    workers = os.cpu_count() or 1
    chunk = max(1, min(_CHUNK, math.ceil(len(entries) / (4 * workers))))
    chunks = [entries[i:i + chunk] for i in range(0, len(entries), chunk)]
    good, bad, fresh = {}, {}, {}
    # delay: a load that finds everything cached finishes before a bar would appear.
    progress = tqdm.tqdm(total=len(entries), desc=f'checking {root}', unit='file', delay=0.5,
                         file=sys.stderr, disable=len(entries) <= PROGRESS_MIN_FILES)
    # Threads, not processes: PIL decodes without the GIL, a fork of a process that runs JAX
    # threads can deadlock, and spawned workers import JAX again. On 1000 small PNGs threads
    # were as fast as forked processes or faster, and 20-30x faster than spawned ones.
    with progress, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for results in pool.map(_check_chunk, chunks):
            progress.update(len(results))
            for path, relative, entry, verdict in results:
                if entry is None:
                    bad[path] = verdict
                else:
                    good[path] = verdict
                    fresh[relative] = entry
    if fresh != cached:
        _write_cache(root, fresh)
    return Checked(good, bad)


def report_bad(what: str, bad: dict, total: int, skip_bad_files: bool) -> None:
    """Nothing when `bad` (path -> reason) is empty. Else one `ValueError` on one line: the
    count of bad files among `total`, the first `MAX_LISTED` as 'path: reason', and how to go
    on; or, with `skip_bad_files`, a warning per bad file and a summary.

    what: the message prefix, e.g. 'imagefolder'.
    """
    if not bad:
        return
    if skip_bad_files:
        for path, reason in bad.items():
            logging.warning('%s: leaving out %s: %s', what, path, reason)
        logging.warning('%s: left out the examples of %d bad files (of %d files)', what,
                        len(bad), total)
        return
    listed = [f'{path}: {reason}' for path, reason in list(bad.items())[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        listed.append(f'and {len(bad) - MAX_LISTED} more')
    raise ValueError(f'{what}: cannot read {len(bad)} of {total} files: {"; ".join(listed)}; '
                     f'set config.skip_bad_files=True to train without them')


def _check_chunk(entries) -> list:
    return [(path, relative, *_check_file(path, is_mask, cached))
            for path, relative, is_mask, cached in entries]


def _check_file(path: str, is_mask: bool, cached) -> tuple:
    """(cache entry, Facts) for a good file, (None, reason) for a bad one.

    cached: the file's cache entry from an earlier check, or None.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        return None, f'unreadable ({error.strerror})'
    key = [stat.st_size, stat.st_mtime_ns, is_mask]
    facts = _cached_facts(cached, key)
    if facts is not None:
        return cached, facts
    if stat.st_size == 0:
        return None, 'zero bytes'
    try:
        facts = _decode(path, is_mask)
    # Decoders of arbitrary bytes raise more than OSError (SyntaxError, ValueError, EOFError,
    # zlib.error, DecompressionBombError, ...); whatever it is, the training read would raise it.
    except Exception as error:  # noqa: BLE001
        return None, _reason(error)
    return key + [list(facts.size), facts.mode, list(facts.labels)], facts


def _cached_facts(entry, key: list):
    """The Facts of a cache entry recorded under `key`; None for another key or a malformed
    entry (the file is then decoded again)."""
    try:
        if entry[:3] != key:
            return None
        (width, height), mode, labels = entry[3:]
        return Facts((int(width), int(height)), str(mode), tuple(int(v) for v in labels))
    except (TypeError, ValueError):
        return None


def _decode(path: str, is_mask: bool) -> Facts:
    with Image.open(path) as image:
        if not is_mask:
            image.convert('RGB')   # as `sources.ImageFolderSource` and `SegFolderSource` read
            return Facts(image.size, image.mode)
        image.load()   # verify() would not notice a truncated file
        labels = ()
        if image.mode in LABEL_MODES:
            counts = np.bincount(np.asarray(image).ravel(), minlength=256)
            labels = tuple(np.flatnonzero(counts).tolist())
        return Facts(image.size, image.mode, labels)


def _reason(error: Exception) -> str:
    if isinstance(error, UnidentifiedImageError):
        return 'not an image (cannot identify image file)'   # PIL's message repeats the path
    if isinstance(error, OSError) and error.strerror:   # the system's, e.g. permission denied
        return f'unreadable ({error.strerror})'
    message = str(error) or type(error).__name__
    # PIL has no exception class for a cut file, only plain OSErrors whose messages say so
    # ('image file is truncated', 'Truncated File Read').
    if 'truncated' in message.lower():
        return f'truncated ({message})'
    return f'cannot decode ({type(error).__name__}: {message})'


def _read_cache(root: str) -> dict:
    """Relative path -> cache entry; empty when there is no usable cache."""
    try:
        with open(cache_path(root), encoding='utf-8') as file:
            data = json.load(file)
    except (OSError, ValueError):   # none yet, unreadable or corrupt: decode everything
        return {}
    if not isinstance(data, dict) or data.get('version') != _CACHE_VERSION:
        return {}
    files = data.get('files')
    return files if isinstance(files, dict) else {}


def _write_cache(root: str, files: dict) -> None:
    path = cache_path(root)
    temporary = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written aside and renamed into place: a concurrent load reads the old or the new
        # cache, never half of one.
        descriptor, temporary = tempfile.mkstemp(suffix='.tmp', dir=os.path.dirname(path))
        with os.fdopen(descriptor, 'w', encoding='utf-8') as file:
            json.dump({'version': _CACHE_VERSION, 'root': os.path.realpath(root),
                       'files': files}, file, separators=(',', ':'))
        os.replace(temporary, path)
    except OSError as error:
        logging.warning('file checks of %s not cached: %s', root, error)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)
