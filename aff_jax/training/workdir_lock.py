"""One run per workdir: a lock file naming its holder (host, PID, start time).

A second run on a live workdir fails at once, naming the holder. A lock whose holder is gone
(no such PID on this host, or the PID now belongs to a process started later) is taken over,
so a run killed with SIGKILL does not block the next one. A lock held from another host cannot
be checked; it is reported with its host and PID, and the file can be removed by hand.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import time

from aff_jax.training.errors import RunError

LOCK_FILE = 'LOCK'


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, /proc), None where unknown."""
    try:
        stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces, so count from its closing ')'.
    return stat.rpartition(')')[2].split()[19]


def _alive(holder: dict) -> bool:
    pid = holder.get('pid')
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get('process_start')
    return started is None or process_start(pid) in (None, started)


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir/LOCK`` for the life of the block.

    Raises RunError when a live run holds it. ``taken_over`` is the stale holder replaced
    (a dict of host, pid, started), or None.
    """

    def __init__(self, workdir: pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.taken_over = None
        self._held = False

    def __enter__(self) -> WorkdirLock:
        me = {'host': socket.gethostname(), 'pid': os.getpid(),
              'process_start': process_start(os.getpid()),
              'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
        # Two attempts: the second after removing a stale lock; O_EXCL makes a race between
        # two runs taking over the same stale lock end with one winner.
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._live_elsewhere(holder, me['host']):
                    raise RunError(
                        f'workdir {self.path.parent} is in use by another run (host '
                        f'{holder.get("host")}, PID {holder.get("pid")}, started '
                        f'{holder.get("started")}); wait for it, stop it, or use another '
                        f'--workdir (if that run is gone, delete {self.path})') from None
                self.taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RunError(f'workdir {self.path.parent}: another run took the stale lock {self.path} '
                       f'at the same moment')

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            # Unreadable or half-written: its writer died between create and write, or is
            # writing now; give a live writer a moment before calling it stale.
            time.sleep(0.5)
            try:
                holder = json.loads(self.path.read_text())
            except (OSError, ValueError):
                return {}
        return holder if isinstance(holder, dict) else {}

    @staticmethod
    def _live_elsewhere(holder: dict, host: str) -> bool:
        if not holder:
            return False
        if holder.get('host') != host:
            return True
        return _alive(holder)

    def __exit__(self, *exc) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
