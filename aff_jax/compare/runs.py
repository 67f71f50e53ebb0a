"""What both sides of a comparison are given (:class:`Case`) and what each computes (:class:`Run`)."""
from __future__ import annotations

import dataclasses

import numpy as np

MODES = ('eval', 'train')
OUTPUT = '(output)'


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison's inputs and procedure.

    ``inputs``: the model's positional array inputs, NHWC float32, which each run casts to
    the precision it computes in (one image batch for a host,
    ``(x, y)`` for a fusion module). ``mode``: ``'eval'`` (running statistics) or ``'train'``
    (batch statistics, a cross-entropy loss on ``labels`` and its gradients). ``labels``: int
    class indices of the output's shape without its last axis (``(N,)`` for ``(N, classes)``
    logits, ``(N, H, W)`` for an NHWC map), None in eval mode. ``steps``: SGD steps
    ``p -= learning_rate * grad`` on that same batch, each after a train-mode forward (which
    also updates the running statistics). At 0.1 one step changed a random ``tv_resnet18``'s
    weights by up to 4x their largest entry, and the second step then amplified float32
    rounding beyond the float64 noise estimate (5.8% against 0.56% on an AVX-512 machine); at
    the default 0.01 (updates of 0.5% at the median) the steps agree within 3x the noise.
    """
    inputs: tuple[np.ndarray, ...]
    mode: str = 'eval'
    labels: np.ndarray | None = None
    steps: int = 0
    learning_rate: float = 0.01


@dataclasses.dataclass
class Run:
    """One framework's results for a :class:`Case`; weights keyed and laid out as the reference
    names them (PyTorch ``state_dict`` keys, Gluon parameter names).

    ``activations``: (module name, output of its first call), in execution order, 4-D outputs
    NHWC, the model's output last as :data:`OUTPUT`. Train mode: ``stats``, every running
    statistic after the first forward; ``grads``, the loss gradient of every trainable
    parameter (parameter order); ``states``: per SGD step, every variable afterwards.
    """
    activations: list[tuple[str, np.ndarray]]
    stats: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    grads: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    states: list[dict[str, np.ndarray]] = dataclasses.field(default_factory=list)


def nchw_to_nhwc(value: np.ndarray) -> np.ndarray:
    """A 4-D array from NCHW to NHWC; any other rank unchanged."""
    return value.transpose(0, 2, 3, 1) if value.ndim == 4 else value


def nhwc_to_nchw(value: np.ndarray) -> np.ndarray:
    """A 4-D array from NHWC to NCHW (C-contiguous); any other rank unchanged."""
    return np.ascontiguousarray(value.transpose(0, 3, 1, 2) if value.ndim == 4 else value)
