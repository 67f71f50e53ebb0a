"""The errors a run reports in one line, and the exit status each gives ``python -m train``."""
from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import re


class RunError(Exception):
    """A problem the user can fix, reported in one line (``error: ...``) with exit status 1.

    The message names what is wrong (a config key, a file, the workdir) and what would be
    valid; ``python -m train`` prints it without a traceback unless ``--verbose``.
    """
    exit_code = 1


class ConfigError(RunError, ValueError):
    """A configuration or dataset problem; the message names the offending config key
    (``config.mesh_shape``, ...)."""


class Diverged(RunError):
    """The loss or the gradients became non-finite; nothing non-finite was checkpointed."""
    exit_code = 3


@contextlib.contextmanager
def writing(path: pathlib.Path):
    """Gives an OSError raised inside the block the name of the file being written.

    A file object's ``write``, ``flush`` and ``close`` raise ENOSPC without a file name; with
    it, ``disk_full`` can say which file the full disk stopped.
    """
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _chain(error: BaseException | None):
    """``error`` and its causes and contexts, each once."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def attribute_full_disk(error: BaseException | None, path: pathlib.Path) -> None:
    """Names ``path`` in the ENOSPC OSErrors behind ``error`` that name no file.

    For a save that failed: Orbax writes some of a checkpoint's files with plain
    ``write_text``, whose ENOSPC names no file, and ``disk_full`` would otherwise name the
    workdir.
    """
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename is None:
            e.filename = str(path)


def disk_full(error: BaseException, checkpoint_dir: pathlib.Path) -> RunError | None:
    """The one-line RunError for a full disk behind ``error`` (itself, its causes or contexts),
    naming what was being written and the newest intact checkpoint; None for other errors.

    Orbax's background writes report ENOSPC as TensorStore text
    (``... Failed writing: "PATH": ... No space left on device``), not as an OSError.
    """
    full, target = False, None
    for e in _chain(error):
        text = str(e)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in text:
            full = True
            paths = re.findall(r'"(/[^"]+)"', text)
            target = target or getattr(e, 'filename', None) or (paths[-1] if paths else None)
    if not full:
        return None
    target = str(target or checkpoint_dir.parent)
    saving = re.search(rf'{re.escape(str(checkpoint_dir))}/(\d+)\.orbax-checkpoint-tmp', target)
    if saving:
        target = f'the checkpoint of step {saving.group(1)} (not kept)'
    steps = sorted(int(p.name) for p in checkpoint_dir.glob('*') if p.name.isdigit())
    newest = (f'the newest intact checkpoint is step {steps[-1]} in {checkpoint_dir}' if steps
              else 'no checkpoint was completed')
    return RunError(f'no space left on device writing {target}; {newest}; free some space and '
                    f'run the same command to resume')
