"""The PNGs a run writes at its end: ``curves.png`` and, for segmentation, ``predictions.png``.

Both use a bare ``Figure`` (no pyplot), so the user's matplotlib backend is left alone.
"""
from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

CURVES_FILE = 'curves.png'
PREDICTIONS_FILE = 'predictions.png'
# Right-hand panel of curves.png: whichever of these the task logs.
_SCORES = ('train/accuracy', 'eval/accuracy', 'eval/pixel_accuracy', 'eval/miou')


def _figure(size: tuple[float, float]):
    """A bare matplotlib ``Figure`` of ``size`` inches. matplotlib is imported here, when a
    run ends, rather than with the trainer: it was 0.4 s of every run's start-up."""
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def plot_curves(rows: list[dict], path: pathlib.Path, title: str) -> None:
    """Loss (left) and accuracy-like scores (right) against step, train and eval, from
    metrics rows."""
    fig = _figure((11, 4))
    left, right = fig.subplots(1, 2)
    panels = ((left, 'loss', ('train/loss', 'eval/loss')), (right, 'score', _SCORES))
    for ax, label, names in panels:
        for name in names:
            points = [(row['step'], row[name]) for row in rows if name in row]
            if points:
                steps, values = zip(*points)
                style = '-' if name.startswith('train/') else 'o-'
                ax.plot(steps, values, style, label=name, markersize=3)
        ax.set_xlabel('step')
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_predictions(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray,
                     class_names: Sequence[str], path: pathlib.Path) -> None:
    """One row per image: the image, its true mask, the predicted mask.

    ``images`` (N, H, W, 3) float in [0, 1] (values outside are clipped); ``labels`` and
    ``predicted`` (N, H, W) int class indices, ``labels`` with 255 for ignored pixels (shown
    white).
    """
    count = len(images)
    fig = _figure((7.5, 2.5 * count))
    axes = np.asarray(fig.subplots(count, 3, squeeze=False))
    for row, (image, truth, guess) in enumerate(zip(images, labels, predicted)):
        panels = (('image', np.clip(image, 0.0, 1.0)), ('true mask', _colour(truth)),
                  ('predicted mask', _colour(guess)))
        for ax, (title, picture) in zip(axes[row], panels):
            ax.imshow(picture, interpolation='nearest')
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.suptitle(', '.join(f'{k}: {name}' for k, name in enumerate(class_names)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _colour(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) RGB: class 0 (background) black, class k the
    (k-1)-th colour of tab10 (repeating), ignored pixels (255) white."""
    from matplotlib import colormaps  # see _figure

    palette = np.concatenate([np.zeros((1, 3)), np.asarray(colormaps['tab10'].colors)])
    rgb = palette[np.where(mask == 0, 0, 1 + (mask - 1) % 10)]
    rgb[mask == 255] = 1.0
    return rgb
