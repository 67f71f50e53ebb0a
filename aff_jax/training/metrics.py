"""What a run reports: ``metrics.jsonl``, TensorBoard event files and the progress bar.

Only process 0 writes; the other processes get disabled writers so the loop stays the same.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Iterator

import tqdm

from aff_jax.training.errors import writing
from aff_jax.training.tensorboard import EventWriter

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
# Train-row values measured on the wall clock, over the steps since the previous train row:
# the only logged values a resumed run does not repeat exactly.
WALL_CLOCK_METRICS = ('train/images_per_second', 'train/data_wait_fraction')


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``: one dict per line with ``step`` and named values."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Appends ``{"step": s, "train/loss": ..., ...}`` rows and TensorBoard scalars.

    A run that starts at ``start_step`` (0, or the step of the checkpoint it resumed from)
    first drops the rows a previous attempt logged after that step, so the file reads as if
    the run had never been interrupted; TensorBoard is told the same with ``purge_step``.
    """

    def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        self.path = workdir / METRICS_FILE
        kept = [row for row in read_metrics(self.path) if row['step'] <= start_step]
        self.path.write_text(''.join(json.dumps(row) + '\n' for row in kept))
        self.tensorboard = EventWriter(workdir / TENSORBOARD_DIR, purge_step=start_step)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with writing(self.path), self.path.open('a') as f:
            f.write(json.dumps({'step': step, **values}) + '\n')
        self.tensorboard.scalars(step, values)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


class Throughput:
    """Wall-clock rates between train rows: ``train/images_per_second`` (global batch x steps
    / seconds) and ``train/data_wait_fraction`` (the share of those seconds spent waiting for
    the input pipeline's next batch). Timing starts after the first step, whose call includes
    compilation."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.waited = 0.0
        self.since = None  # (step, time) the current interval started at

    def batches(self, batches: Iterator) -> Iterator:
        """``batches``, timing each wait for the next one."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            yield batch

    def restart(self, step: int) -> None:
        self.since, self.waited = (step, time.perf_counter()), 0.0

    def read(self, step: int) -> dict[str, float]:
        """The rates since ``restart`` (nothing before the first); restarts at ``step``."""
        if self.since is None or step == self.since[0]:
            return {}
        seconds = time.perf_counter() - self.since[1]
        values = {WALL_CLOCK_METRICS[0]: self.global_batch * (step - self.since[0]) / seconds,
                  WALL_CLOCK_METRICS[1]: min(self.waited / seconds, 1.0)}
        self.restart(step)
        return values


class ProgressBar:
    """A tqdm bar over the train steps with step/s, ETA and the latest loss and accuracy."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit='step',
                             dynamic_ncols=True, disable=not enabled, file=sys.stderr)

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, values: dict[str, float]) -> None:
        short = {name.split('/')[-1]: f'{value:.4f}' for name, value in values.items()}
        self.bar.set_postfix(short, refresh=False)

    def print(self, line: str) -> None:
        """A line above the bar; nothing on the processes that have no bar."""
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
