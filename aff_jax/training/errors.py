"""The errors a run reports in one line, and the exit status each gives ``python -m train``."""
from __future__ import annotations

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


def disk_full(error: BaseException, checkpoint_dir: pathlib.Path) -> RunError | None:
    """The one-line RunError for a full disk behind ``error`` (itself, its causes or contexts),
    naming what was being written and the newest intact checkpoint; None for other errors.

    Orbax's background writes report ENOSPC as TensorStore text
    (``... Failed writing: "PATH": ... No space left on device``), not as an OSError.
    """
    full, target, seen = False, None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC
                or os.strerror(errno.ENOSPC) in text):
            full = True
            paths = re.findall(r'"(/[^"]+)"', text)
            target = target or getattr(error, 'filename', None) or (paths[-1] if paths else None)
        error = error.__cause__ or error.__context__
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
