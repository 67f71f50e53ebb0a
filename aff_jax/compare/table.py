"""The comparison's rows, the float64 verdict and the printed table.

The verdict is decided in float64, where both sides round ~5e8 times finer than in float32:
a value within float32 rounding of a ReLU's zero or of a max-pool tie can come out on
different sides in two float32 implementations, and deep train-mode networks amplify such a
flip far beyond any float32 noise estimate, while in float64 it does not happen. A row
diverges when its float64 relative difference exceeds :meth:`Row.allowed`: the comparison's
tolerance ``T`` (:func:`default_tolerance64`, from float64's machine epsilon and the model's
depth), or :data:`NOISE_FACTOR64` times the row's float64 rounding estimate ``noise64``: how
far either side's float64 run moves when its inputs move by a few units in the last place. That
estimate decides only where the function itself amplifies rounding beyond ``T``: a gradient
that is zero but for rounding (a conv bias feeding a train-mode BatchNorm), or a BatchNorm
over two nearly equal values (batch 2 on a 1x1 map), whose float64 result the two sides can
only know to ~1e-7. The float32 noise cannot give it there: float32 has lost such a value
entirely, so its noise saturates near 1 instead of growing with the amplification.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

EPS64 = float(np.finfo(np.float64).eps)
# T per conv/dense layer, in units of float64's machine epsilon (2^-52): with D layers
# T = D * 2^13 * 2^-52, 1.8e-10 for a 100-layer model. Faithful float64 rows where T applies
# stayed 7x to 100x below it in full-depth presets (RESULTS.md); a real difference (a perturbed
# weight, BN momentum, the running-variance rule) is 1e-6 or more.
DEPTH_FACTOR64 = 2.0 ** 13
# How many times its float64 rounding estimate a row may differ: the estimate is one sample of
# rounding per side, and the two sides round in other orders than one run does twice (rows
# reached 45x it against Gluon, RESULTS.md).
NOISE_FACTOR64 = 1000.0


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared quantity.

    ``kind``: ``'activation'`` (a module's output, NHWC for 4-D, ``(output)`` the model's),
    ``'stat'`` (a running statistic after the train-mode forward), ``'grad'`` (the loss gradient
    w.r.t. a parameter) or ``'stepK'`` (a variable after K SGD steps: ``'step1'``, ...).
    ``name``: the module path or the reference's weight name; ``shape`` as compared (weights in
    the reference's layout). Relative differences are ``max |a - b| / max(max |a|, max |b|)``.

    The verdict: ``max_rel64``, JAX float64 against the reference float64; ``tolerance64``, the
    comparison's ``T``; ``noise64``, the float64 rounding estimated at this row: the larger of
    each side's float64 run on inputs moved by a few units in the last place against its run
    on the inputs.
    Information: ``max_abs`` and ``max_rel``, JAX in its own dtype against the reference's
    float32 run; ``noise_rel``, the reference's float32 against its float64 run, scaled to the
    JAX run's precision (:func:`noise_scale`); ``jax_noise_rel``, the JAX run against JAX's
    float64 run.
    """
    kind: str
    name: str
    shape: tuple[int, ...]
    max_rel64: float
    tolerance64: float
    noise64: float
    max_abs: float
    max_rel: float
    noise_rel: float
    jax_noise_rel: float

    def allowed(self, tolerance: float | None = None) -> float:
        """The largest ``max_rel64`` that agrees: ``max(T, NOISE_FACTOR64 * noise64)``, with
        ``tolerance`` in place of ``T`` when given."""
        return max(self.tolerance64 if tolerance is None else tolerance,
                   NOISE_FACTOR64 * self.noise64)

    def diverges(self, tolerance: float | None = None) -> bool:
        return not self.max_rel64 <= self.allowed(tolerance)  # NaN diverges


def max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, that / max(max |a|, max |b|)), in float64: the relative difference is at
    most 2, also for a quantity that is zero but for rounding on both sides. NaN where both are
    NaN agrees; NaN on one side only is an infinite difference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.any(np.isnan(a) != np.isnan(b)):
        return float('inf'), float('inf')
    both = ~np.isnan(b)
    a, b = a[both], b[both]
    diff = float(np.max(np.abs(a - b), initial=0.0))
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    return diff, diff / (scale or 1.0)


def noise_scale(dtype: str) -> float:
    """How much coarser a ``dtype`` run rounds than the float32 reference: the ratio of machine
    epsilons (1 for float32, 2^16 for bfloat16). The reference's float32-vs-float64 noise at a
    layer, times this, estimates the rounding a faithful ``dtype`` run shows there."""
    import jax.numpy as jnp

    return float(jnp.finfo(dtype).eps / jnp.finfo(jnp.float32).eps)


def default_tolerance64(depth: int) -> float:
    """The float64 verdict's ``T`` for a model of ``depth`` conv and dense layers (at least 1):
    ``depth * DEPTH_FACTOR64 * EPS64``, rounding growing at most linearly with depth."""
    return max(depth, 1) * DEPTH_FACTOR64 * EPS64


def first_divergence(rows: Sequence[Row], tolerance: float | None = None) -> Row | None:
    """The first row that diverges in float64 (:meth:`Row.diverges`; ``tolerance`` replaces
    each row's ``T`` when given), or None."""
    return next((row for row in rows if row.diverges(tolerance)), None)


def format_table(rows: Sequence[Row], dtype: str = 'float32',
                 tolerance: float | None = None) -> str:
    """One line per row under a header naming what decides and what is information."""
    width = max([len('name')] + [len(r.name) for r in rows])
    kind_width = max([len('kind')] + [len(r.kind) for r in rows])
    if tolerance is None and rows:
        t = rows[0].tolerance64
        depth = round(t / (DEPTH_FACTOR64 * EPS64))
        t_text = (f'{t:.2e} ({depth} conv/dense layers x 2^{np.log2(DEPTH_FACTOR64):g} x '
                  f'float64 eps)')
    else:
        t_text = f'{tolerance or 0.0:.2e}'
    scaled = '' if dtype == 'float32' else f' x {noise_scale(dtype):g} ({dtype} / float32 eps)'
    short = {'float32': 'f32', 'bfloat16': 'bf16'}.get(dtype, dtype)
    lines = [f'verdict: JAX float64 vs reference float64, allowed max(T, '
             f'{NOISE_FACTOR64:g} x noise64); T = {t_text}',
             f'information: JAX {dtype} vs reference float32; noise = each side\'s own '
             f'{dtype} vs float64 (reference: float32{scaled})',
             f'{"kind":<{kind_width}}  {"name":<{width}}  {"shape":<20}  {"f64 rel diff":>12}  '
             f'{"allowed":>9}  {short + " max abs":>12}  {short + " max rel":>12}  '
             f'{"ref noise":>9}  {"jax noise":>9}']
    for r in rows:
        lines.append(f'{r.kind:<{kind_width}}  {r.name:<{width}}  {str(r.shape):<20}  '
                     f'{r.max_rel64:>12.3e}  {r.allowed(tolerance):>9.2e}  {r.max_abs:>12.3e}  '
                     f'{r.max_rel:>12.3e}  {r.noise_rel:>9.2e}  {r.jax_noise_rel:>9.2e}')
    return '\n'.join(lines)
