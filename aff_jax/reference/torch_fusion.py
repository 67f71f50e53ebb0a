"""PyTorch references of every fusion scheme of ``aff_jax.fusion``, written from the formulas
of the paper (section 3-4, Tables 3 and 4) and of the works it compares, for parity checks.

``build(name, channels, r)`` returns a module called as ``module(x, y)`` on two NCHW maps of
``channels`` channels (``add``, ``concat`` and the gated schemes alike). Children are named as
aff-jax's modules name theirs, so a ``state_dict`` maps onto the bare flax module
(``aff_jax.interop.torch``): contexts ``local_att`` (``0`` conv, ``1`` BN, ``3`` conv, ``4`` BN)
and ``global_att`` (``0`` pool, ``1`` conv, ``2`` BN, ``4`` conv, ``5`` BN), a second context
of a kind ``local_att2`` / ``global_att2``, concatenation's projection ``conv``. A context maps
its input (C or, for SA, 2C channels) through C // r channels to C logits. BatchNorm is
PyTorch's, so the flax module must use ``stats_rule='torch'``.

Gates: ``G(z) = sigmoid(global context of z)``; ``M(z) = sigmoid(local(z) + global(z))``.
"""
from __future__ import annotations

import torch
from torch import nn


def context(c_in: int, inter: int, c_out: int, pooled: bool) -> nn.Sequential:
    """1x1 conv c_in->inter (bias), BN, ReLU, 1x1 conv inter->c_out (bias), BN; pooled: a global
    average pool first (the global context, (N, c_out, 1, 1))."""
    pool = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    return nn.Sequential(*pool, nn.Conv2d(c_in, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(),
                         nn.Conv2d(inter, c_out, 1), nn.BatchNorm2d(c_out))


class Gated(nn.Module):
    """A scheme with attention contexts; ``forward`` is the scheme's formula."""

    def __init__(self, channels: int, r: int, contexts: dict[str, bool], concat_input: bool,
                 formula):
        super().__init__()
        c_in = 2 * channels if concat_input else channels
        for name, pooled in contexts.items():
            self.add_module(name, context(c_in, channels // r, channels, pooled))
        self.formula = formula

    def gate(self, z: torch.Tensor, *names: str) -> torch.Tensor:
        return torch.sigmoid(sum(getattr(self, name)(z) for name in names))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.formula(self, x, y)


class Concat(nn.Module):
    """``conv([X, Y])``: a 1x1 conv with bias from 2C to C channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, x, y):
        return self.conv(torch.cat([x, y], dim=1))


class Add(nn.Module):
    def forward(self, x, y):
        return x + y


def _select(m, x, y):
    return m * x + (1 - m) * y


def _cat(x, y):
    return torch.cat([x, y], dim=1)


LOCAL_GLOBAL = {'local_att': False, 'global_att': True}
GLOBAL = {'global_att': True}
# name -> (contexts {child: pooled}, the context sees [X, Y], formula(module, x, y)).
GATED = {
    'se': (GLOBAL, False, lambda f, x, y: x + f.gate(y, 'global_att') * y),
    'gau': (GLOBAL, False, lambda f, x, y: f.gate(y, 'global_att') * x + y),
    'highway': (GLOBAL, False, lambda f, x, y: _select(f.gate(x, 'global_att'), x, y)),
    'sa': (GLOBAL, True, lambda f, x, y: f.gate(_cat(x, y), 'global_att') * x + y),
    'sk': (GLOBAL, False, lambda f, x, y: _select(f.gate(x + y, 'global_att'), x, y)),
    'ms_se': (LOCAL_GLOBAL, False, lambda f, x, y: x + f.gate(y, *LOCAL_GLOBAL) * y),
    'ms_gau': (LOCAL_GLOBAL, False, lambda f, x, y: f.gate(y, *LOCAL_GLOBAL) * x + y),
    'ms_sa': (LOCAL_GLOBAL, True, lambda f, x, y: f.gate(_cat(x, y), *LOCAL_GLOBAL) * x + y),
    'ms_modulate_sum': (LOCAL_GLOBAL, False, lambda f, x, y: f.gate(x + y, *LOCAL_GLOBAL) * x + y),
    'ms_refine_sum': (LOCAL_GLOBAL, False, lambda f, x, y: x + f.gate(x + y, *LOCAL_GLOBAL) * y),
    'aff_global_global': ({'global_att': True, 'global_att2': True}, False,
                          lambda f, x, y: _select(f.gate(x + y, 'global_att', 'global_att2'),
                                                  x, y)),
    'aff_local_local': ({'local_att': False, 'local_att2': False}, False,
                        lambda f, x, y: _select(f.gate(x + y, 'local_att', 'local_att2'), x, y)),
    # The paper's eq. 4, without the official code's factor 2.
    'aff': (LOCAL_GLOBAL, False, lambda f, x, y: _select(f.gate(x + y, *LOCAL_GLOBAL), x, y)),
}


def _iaff(f, x, y):
    """Paper eq. 5, then eq. 4 on the initial integration, with its own second contexts."""
    xi = _select(f.gate(x + y, 'local_att', 'global_att'), x, y)
    return _select(f.gate(xi, 'local_att2', 'global_att2'), x, y)


GATED['iaff'] = ({'local_att': False, 'global_att': True, 'local_att2': False,
                  'global_att2': True}, False, _iaff)

NAMES = sorted(['add', 'concat', *GATED])


def build(name: str, channels: int, r: int = 4) -> nn.Module:
    """The PyTorch reference of the aff-jax scheme ``name`` (default fields: AFF without the
    factor 2, iAFF with ``global_att2``) on ``channels`` channels with reduction ``r``."""
    if name == 'add':
        return Add()
    if name == 'concat':
        return Concat(channels)
    if name not in GATED:
        raise ValueError(f'unknown fusion {name!r}; known: {", ".join(NAMES)}')
    contexts, concat_input, formula = GATED[name]
    return Gated(channels, r, contexts, concat_input, formula)
