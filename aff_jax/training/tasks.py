"""The training task, chosen from the model and the dataset: classification or segmentation.

A task says what the one train loop and its steps cannot know by themselves: the loss targets
and which of them count, the training accuracy, the sums an evaluation accumulates on device
(summed over batches, devices and processes), and the scores and the final line it reports.

Segmentation: per-pixel softmax cross-entropy over the pixels whose label is not
``IGNORE_LABEL`` (255); evaluation accumulates a confusion matrix over the whole split, from
which IoU per class, their mean (mIoU) and pixel accuracy follow. A class absent from both the
predictions and the ground truth has no IoU (0 / 0): it is left out of the mean and of the
logged ``eval/iou/<class>`` values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aff_jax import precision
from aff_jax.data.pipeline import IGNORE_LABEL

Batch = dict[str, jax.Array]
# Classification's second score: whether the label is among the K largest logits.
TOP_K = 5


def smoothed_one_hot(labels: jax.Array, num_classes: int, eta: float) -> jax.Array:
    """(...,) int labels -> (..., num_classes) targets: ``1 - eta + eta/K`` on, ``eta/K`` off.

    The official script's label smoothing (eta 0.1); ``eta=0`` is the plain one-hot.
    """
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), eta)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(..., K) logits and (..., K) target distributions -> (...) losses, in at least float32."""
    logits = logits.astype(precision.at_least_float32(logits.dtype))
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


@dataclasses.dataclass(frozen=True)
class Classification:
    """One label per image: ``batch['label']`` (B,) int32, logits (B, K)."""
    num_classes: int
    name = 'classification'

    def targets(self, labels: jax.Array, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
        """(B, K) target distributions and (B,) weights (all ones)."""
        return (smoothed_one_hot(labels, self.num_classes, label_smoothing),
                jnp.ones(labels.shape, jnp.float32))

    def accuracy(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(logits, -1) == labels, dtype=jnp.float32)

    def eval_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Sums over the real examples (``batch['mask']`` 1): ``loss`` (unsmoothed
        cross-entropy), ``correct`` (top-1), ``correct_top5`` (the label among the
        ``min(5, K)`` largest logits), ``count``."""
        mask = batch['mask']
        labels = batch['label']
        losses = cross_entropy(logits, jax.nn.one_hot(labels, self.num_classes))
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        # top_k ranks equal logits by index, as argmax does, so top-1 is always in the top 5.
        _, top5 = jax.lax.top_k(logits, min(TOP_K, self.num_classes))
        correct_top5 = jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)
        return {'loss': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
                'correct_top5': jnp.sum(correct_top5 * mask), 'count': jnp.sum(mask)}

    def scores(self, totals: dict[str, Any]) -> dict[str, float]:
        count = float(totals['count'])
        return {'eval/loss': float(totals['loss']) / count,
                'eval/accuracy': float(totals['correct']) / count,
                'eval/top5_accuracy': float(totals['correct_top5']) / count, 'eval/count': count}

    def describe(self, step: int, scores: dict[str, float]) -> str:
        return (f'final held-out accuracy after {step} steps: {100 * scores["eval/accuracy"]:.2f}% '
                f'({int(scores["eval/count"])} test images, eval/loss {scores["eval/loss"]:.4f})')


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """A label map per image: ``batch['label']`` (B, H, W) int32 with ``IGNORE_LABEL``,
    logits (B, H, W, K)."""
    num_classes: int
    class_names: tuple[str, ...]
    name = 'segmentation'

    def _valid(self, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Labels with ignored pixels set to class 0 (so one_hot stays in range) and the
        (B, H, W) mask of pixels that count."""
        valid = labels != IGNORE_LABEL
        return jnp.where(valid, labels, 0), valid

    def targets(self, labels: jax.Array, label_smoothing: float) -> tuple[jax.Array, jax.Array]:
        """(B, H, W, K) target distributions and (B, H, W) weights: 0 on ignored pixels."""
        labels, valid = self._valid(labels)
        return (smoothed_one_hot(labels, self.num_classes, label_smoothing),
                valid.astype(jnp.float32))

    def accuracy(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """Pixel accuracy over the pixels that count."""
        labels, valid = self._valid(labels)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) & valid, dtype=jnp.float32)
        return correct / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)

    def eval_sums(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
        """Over the counted pixels of the real examples: ``loss`` (sum of the unsmoothed
        cross-entropy), ``confusion`` (K, K) int32, rows the truth and columns the prediction,
        and ``count`` (real images)."""
        labels, valid = self._valid(batch['label'])
        valid = valid & (batch['mask'][:, None, None] > 0)
        losses = cross_entropy(logits, jax.nn.one_hot(labels, self.num_classes))
        truth = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.int32) * valid[..., None]
        predicted = jax.nn.one_hot(jnp.argmax(logits, -1), self.num_classes, dtype=jnp.int32)
        # Integer counts: float32 would stop counting exactly past 2**24 pixels per cell.
        confusion = jnp.einsum('bhwk,bhwl->kl', truth, predicted,
                               preferred_element_type=jnp.int32)
        return {'loss': jnp.sum(jnp.where(valid, losses, 0.0)), 'confusion': confusion,
                'count': jnp.sum(batch['mask'])}

    def scores(self, totals: dict[str, Any]) -> dict[str, float]:
        scores = segmentation_scores(np.asarray(totals['confusion']), self.class_names)
        pixels = int(np.asarray(totals['confusion']).sum())
        return {'eval/loss': float(totals['loss']) / max(pixels, 1), **scores,
                'eval/count': float(totals['count'])}

    def describe(self, step: int, scores: dict[str, float]) -> str:
        per_class = ', '.join(f'{name} {100 * scores[f"eval/iou/{name}"]:.2f}%'
                              for name in self.class_names if f'eval/iou/{name}' in scores)
        return (f'final held-out mIoU after {step} steps: {100 * scores["eval/miou"]:.2f}% '
                f'(IoU {per_class}; pixel accuracy {100 * scores["eval/pixel_accuracy"]:.2f}%; '
                f'{int(scores["eval/count"])} test images, eval/loss {scores["eval/loss"]:.4f})')


Task = Union[Classification, Segmentation]


def segmentation_scores(confusion: np.ndarray, class_names: tuple[str, ...]) -> dict[str, float]:
    """``eval/miou``, ``eval/pixel_accuracy`` and ``eval/iou/<class>`` from a (K, K) confusion
    matrix (rows truth, columns prediction). IoU = TP / (TP + FP + FN); a class with
    TP + FP + FN = 0 (absent from truth and prediction) has no IoU and no part in the mean."""
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    iou = np.divide(true_positive, union, out=np.zeros_like(union), where=present)
    total = confusion.sum()
    return {'eval/miou': float(iou[present].mean()) if present.any() else 0.0,
            'eval/pixel_accuracy': float(true_positive.sum() / total) if total else 0.0,
            **{f'eval/iou/{name}': float(iou[k]) for k, name in enumerate(class_names)
               if present[k]}}
