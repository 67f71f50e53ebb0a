"""The model summary printed at the start of a run: parameter count and FLOPs per image."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree (BatchNorm running statistics excluded)."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def flops_per_image(model: nn.Module, abstract_variables: Any,
                    image_shape: tuple[int, ...]) -> float | None:
    """FLOPs of one inference forward pass on one (1, H, W, C) image, from XLA's cost analysis
    of the program lowered for the CPU whatever the default backend (no compilation), so that
    the count does not depend on the machine. A multiply-add counts as 2 FLOPs. None where
    this jax gives no cost analysis of a lowered program (jax 0.11.2, seen on a GPU machine);
    the analysis of a compiled program is no substitute: it counts fused code and undercounts."""
    image = jax.ShapeDtypeStruct((1, *image_shape), jax.numpy.float32)
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
        lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(abstract_variables,
                                                                            image)
    costs = lowered.cost_analysis()
    return None if costs is None else float(costs['flops'])


def describe(name: str, num_params: int, flops: float | None) -> str:
    """One line: ``model NAME: 1,234,567 parameters, 0.56 GFLOPs per image``."""
    cost = 'GFLOPs per image unknown' if flops is None else f'{flops / 1e9:.4g} GFLOPs per image'
    return f'model {name}: {num_params:,} parameters, {cost}'
