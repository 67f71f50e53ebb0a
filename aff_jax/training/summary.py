"""The model summary printed at the start of a run: parameter count and FLOPs per image."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (BatchNorm running statistics excluded)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_image(model: nn.Module, abstract_variables: Any,
                    image_shape: tuple[int, ...]) -> float:
    """FLOPs of one inference forward pass on one (1, H, W, C) image, from XLA's cost analysis
    of the lowered program (no compilation). A multiply-add counts as 2 FLOPs."""
    image = jax.ShapeDtypeStruct((1, *image_shape), jax.numpy.float32)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(abstract_variables, image)
    return float(lowered.cost_analysis()['flops'])


def describe(name: str, num_params: int, flops: float) -> str:
    """One line: ``model NAME: 1,234,567 parameters, 0.56 GFLOPs per image``."""
    return f'model {name}: {num_params:,} parameters, {flops / 1e9:.4g} GFLOPs per image'
