"""The comparison's rows, the divergence verdict and the printed table."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

FLOAT32_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared quantity.

    ``kind``: ``'activation'`` (a module's output, NHWC for 4-D, ``(output)`` the model's),
    ``'stat'`` (a running statistic after the train-mode forward), ``'grad'`` (the loss gradient
    w.r.t. a parameter) or ``'stepK'`` (a variable after K SGD steps: ``'step1'``, ...).
    ``name``: the module path or the reference's weight name; ``shape`` as compared (weights in the reference's
    layout). ``max_abs`` = max |jax - ref|, ``max_rel`` = that / max |ref|; ``noise_rel``: the
    same relative measure between the reference's float32 and float64 runs, scaled to the JAX
    run's precision (see :func:`noise_scale`).
    """
    kind: str
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    noise_rel: float


def max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.max(np.abs(a - b), initial=0.0))
    return diff, diff / (float(np.max(np.abs(b), initial=0.0)) or 1.0)


def noise_scale(dtype: str) -> float:
    """How much coarser a ``dtype`` run rounds than the float32 reference: the ratio of machine
    epsilons (1 for float32, 2^16 for bfloat16). The reference's float32-vs-float64 noise at a
    layer, times this, estimates the rounding a faithful ``dtype`` run shows there."""
    import jax.numpy as jnp

    return float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)


def default_tolerance(dtype: str) -> float:
    """The relative difference always allowed: 1e-5 in float32, one machine epsilon of a lower
    precision (bfloat16: 2^-7)."""
    import jax.numpy as jnp

    return FLOAT32_TOLERANCE if dtype == 'float32' else float(jnp.finfo(dtype).eps)


def default_noise_factor(dtype: str) -> float:
    """How many times its noise a row may differ: 10 in float32, where the JAX run and the
    reference round alike; 4 in a lower precision, whose scaled noise (:func:`noise_scale`)
    already overestimates the rounding of a run that accumulates in float32 (measured
    bfloat16 rows reach 0.6x it in eval mode, 2.6x after SGD steps)."""
    return 10.0 if dtype == 'float32' else 4.0


def first_divergence(rows: Sequence[Row], tolerance: float = FLOAT32_TOLERANCE,
                     noise_factor: float = 10.0) -> Row | None:
    """The first row whose relative difference exceeds ``tolerance`` and ``noise_factor`` x
    its noise."""
    return next((row for row in rows if row.max_rel > max(tolerance, noise_factor * row.noise_rel)),
                None)


def format_table(rows: Sequence[Row], dtype: str = 'float32') -> str:
    """One line per row, under a header naming the precisions compared."""
    width = max([len('name')] + [len(r.name) for r in rows])
    kind_width = max([len('kind')] + [len(r.kind) for r in rows])
    noise = 'ref f32 noise' if dtype == 'float32' else f'noise x{noise_scale(dtype):g}'
    lines = [f'JAX {dtype} vs reference float32; noise = reference float32 vs float64'
             + ('' if dtype == 'float32' else
                f', scaled by {noise_scale(dtype):g} ({dtype} / float32 machine epsilon)'),
             f'{"kind":<{kind_width}}  {"name":<{width}}  {"shape":<20}  {"max abs diff":>12}  '
             f'{"max rel diff":>12}  {noise:>13}']
    for r in rows:
        lines.append(f'{r.kind:<{kind_width}}  {r.name:<{width}}  {str(r.shape):<20}  '
                     f'{r.max_abs:>12.3e}  {r.max_rel:>12.3e}  {r.noise_rel:>13.3e}')
    return '\n'.join(lines)
