"""The fusion gates of a model, as its fusion modules record them (``aff_jax.fusion``: ``gate``
in the ``intermediates`` collection, only when that collection is mutable)."""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
from flax import traverse_util

from aff_jax.fusion import INTERMEDIATES


def without_intermediates(variables: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` without a previous call's recorded intermediates, which ``sow`` would
    append to."""
    return {name: value for name, value in variables.items() if name != INTERMEDIATES}


def collect(intermediates: Mapping[str, Any], name: str = 'gate') -> dict[str, jax.Array]:
    """``{dotted module path: value}`` of every value recorded as ``name`` in an
    ``intermediates`` collection; a module that ran k > 1 times gives ``path#0`` ...
    ``path#k-1``."""
    found = {}
    for path, values in traverse_util.flatten_dict(dict(intermediates)).items():
        if path[-1] != name:
            continue
        module = '.'.join(path[:-1])
        if len(values) == 1:
            found[module] = values[0]
        else:
            found.update({f'{module}#{i}': value for i, value in enumerate(values)})
    return found


def attention_maps(model: nn.Module, variables: Mapping[str, Any], images: jax.Array
                   ) -> dict[str, jax.Array]:
    """The gate ``M`` of every gated fusion module of ``model`` on ``images``.

    ``images``: (N, H, W, C_in), as the model takes them; evaluation mode (running averages).
    Returns ``{dotted module path: (N, h, w, C) float32 in [0, 1]}`` at each fusion's own
    resolution, in call order: ``M`` is what the fusion weighs X by (``M*X + (1-M)*Y`` for
    AFF, iAFF's second gate; see each scheme's formula), broadcast over h and w for the
    global-only schemes. Empty for a model without gates (``add``, ``concat``).
    """
    _, recorded = model.apply(without_intermediates(variables), images, train=False,
                              mutable=[INTERMEDIATES])
    return collect(recorded.get(INTERMEDIATES, {}))
