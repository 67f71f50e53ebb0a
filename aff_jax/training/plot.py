"""The PNG of the loss and accuracy curves written at the end of a run."""
from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

CURVES_FILE = 'curves.png'


def plot_curves(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Loss (left) and accuracy (right) against step, train and eval, from metrics rows.

    Uses a bare ``Figure`` (no pyplot), so the user's matplotlib backend is left alone.
    """
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, quantity in zip(axes, ('loss', 'accuracy')):
        for split, style in (('train', '-'), ('eval', 'o-')):
            name = f'{split}/{quantity}'
            points = [(row['step'], row[name]) for row in rows if name in row]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=split, markersize=3)
        ax.set_xlabel('step')
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
