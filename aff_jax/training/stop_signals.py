"""SIGTERM and SIGINT as requests to save and stop, for the life of a ``with`` block.

A single-process run records the signal; the loop then forces a checkpoint of the step it
reached and stops (exit status 128 + the signal's number: 143 for SIGTERM, 130 for SIGINT).
Multi-process jobs rely on JAX's preemption sync point instead (see ``Checkpointer``), which
turns SIGTERM into a step every process agrees on. The previous handlers come back on exit.
"""
from __future__ import annotations

import signal
import threading

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignals:
        # Handlers can only be installed from the main thread (a test may train in another).
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        del frame
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the checkpoint.
            raise KeyboardInterrupt
        self.received = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received) if self.received else 0

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
