"""The pointing game (Zhang et al., ECCV 2016, without its tolerance): a saliency map scores a
hit when its maximum falls inside the object's bounding box."""
from __future__ import annotations

import numpy as np


def peaks(maps: np.ndarray) -> np.ndarray:
    """(N, 2) int (row, column) of each (H, W) map's maximum; the first in row-major order
    where several pixels share it."""
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f'maps must be (N, H, W), got shape {maps.shape}')
    flat = maps.reshape(len(maps), -1).argmax(axis=1)
    return np.stack(np.unravel_index(flat, maps.shape[1:]), axis=1)


def pointing_hits(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) bool: whether map n peaks inside ``boxes[n]``, int (ymin, xmin, ymax, xmax)
    inclusive pixel indices (a peak on the box's edge is inside)."""
    boxes = np.asarray(boxes)
    if boxes.shape != (len(np.asarray(maps)), 4):
        raise ValueError(f'boxes must be (N, 4) for {len(np.asarray(maps))} maps, got shape '
                         f'{boxes.shape}')
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError('boxes are (ymin, xmin, ymax, xmax) with ymin <= ymax and '
                         'xmin <= xmax')
    row, col = peaks(maps).T
    return ((boxes[:, 0] <= row) & (row <= boxes[:, 2])
            & (boxes[:, 1] <= col) & (col <= boxes[:, 3]))


def pointing_game(maps: np.ndarray, boxes: np.ndarray) -> float:
    """The fraction of maps whose peak falls inside their box (``pointing_hits``)."""
    return float(np.mean(pointing_hits(maps, boxes)))
