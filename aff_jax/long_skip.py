"""The long-skip fusion step of FPN / U-Net decoders (paper section 4, "long skip connection").

X is the low-level map (fine, few channels of early layers), Y the high-level one (coarse,
larger receptive field): the paper's roles. Both are brought to X's size and a common width,
then any fusion scheme combines them, called as ``fusion(X, Y)`` (no official long-skip code
exists whose argument order would need keeping). With ``fusion='add'`` it is exactly the
top-down merge of a plain FPN (Lin et al., 2017): ``lateral(X) + upsample(Y)``.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax import fusion as fusion_lib
from aff_jax import layers
from aff_jax.layers import StatsRule, conv2d


class LongSkipFusion(nn.Module):
    """``(x_low, y_high, train) -> Z``: X ``(N, H, W, Cx)``, Y ``(N, h, w, Cy)`` with
    ``h <= H`` and ``w <= W``; Z ``(N, H, W, channels)``.

    ``X' = lateral(X)`` (1x1 conv with bias, Cx -> channels);
    ``Y' = upsample(project(Y))`` (1x1 conv with bias, Cy -> channels, only when
    ``Cy != channels``; projecting before upsampling is the same map, since both are linear
    and bilinear weights sum to 1, at a fraction of the cost);
    ``Z = fusion(X', Y')``.

    ``fusion``: a name from ``aff_jax.fusion.names()``, built with ``r``, ``stats_rule``,
    ``dtype``, ``param_dtype`` where the scheme has them and ``fusion_options`` (e.g.
    ``{'scale': 2.0}``; AFF defaults to the paper's factor 1), or a factory used as is.
    ``upsample``: ``'nearest'`` or ``'bilinear'`` (see :func:`aff_jax.layers.upsample`).
    Children: ``lateral``, ``project``, ``fuse``.
    """
    channels: int
    fusion: str | fusion_lib.FusionFactory = 'aff'
    r: int = 4
    upsample: str = 'nearest'
    fusion_options: Mapping[str, Any] | None = None
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_low: jax.Array, y_high: jax.Array, train: bool) -> jax.Array:
        check_long_skip(x_low, y_high)
        _, height, width, _ = x_low.shape
        kw = dict(bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(self.channels, 1, name='lateral', **kw)(x_low)
        y = y_high
        if y.shape[-1] != self.channels:
            y = conv2d(self.channels, 1, name='project', **kw)(y)
        y = layers.upsample(y.astype(x.dtype), height, width, self.upsample)
        factory = fusion_factory(self.fusion, self.r, self.fusion_options, self.stats_rule,
                                 self.dtype, self.param_dtype)
        return factory(name='fuse', dtype=self.dtype, param_dtype=self.param_dtype)(x, y, train)


def fusion_factory(fusion: str | fusion_lib.FusionFactory, r: int = 4,
                   fusion_options: Mapping[str, Any] | None = None,
                   stats_rule: StatsRule = 'gluon', dtype: Dtype = jnp.float32,
                   param_dtype: Dtype = jnp.float32) -> fusion_lib.FusionFactory:
    """The factory of a long skip's fusion: a name is built with ``r``, ``stats_rule``,
    ``dtype``, ``param_dtype`` where the scheme has them and with ``fusion_options``, checked
    now; a factory is returned as is."""
    if not isinstance(fusion, str):
        if fusion_options:
            raise TypeError('fusion_options applies to a fusion given by name, not to a factory')
        return fusion
    defaults = dict(r=r, stats_rule=stats_rule, dtype=dtype, param_dtype=param_dtype)
    return fusion_lib.factory(fusion, defaults, **dict(fusion_options or {}))


def check_long_skip(x_low: Any, y_high: Any) -> None:
    """Raise a ValueError naming both shapes unless X and Y are rank-4 NHWC maps of one batch
    size with Y no larger than X."""
    x_shape, y_shape = getattr(x_low, 'shape', None), getattr(y_high, 'shape', None)
    problem = None
    if x_shape is None or y_shape is None or len(x_shape) != 4 or len(y_shape) != 4:
        problem = 'both must be rank-4 NHWC arrays (N, H, W, C)'
    elif x_shape[0] != y_shape[0]:
        problem = 'their batch sizes differ'
    elif y_shape[1] > x_shape[1] or y_shape[2] > x_shape[2]:
        problem = 'the high-level map Y must not be larger than the low-level map X'
    if problem:
        raise ValueError(f'LongSkipFusion cannot fuse x_low of shape {x_shape} with y_high of '
                         f'shape {y_shape}: {problem}')
