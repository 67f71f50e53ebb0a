"""Attentional feature fusion (MS-CAM, AFF, iAFF) and the fusion baselines the paper compares.

Notation (paper, section 3-4): ``X``, ``Y`` are the two NHWC feature maps to fuse, of equal
shape ``(N, H, W, C)``; ``Z`` is the fused output of the same shape. In the paper's roles ``Y``
is the map with the larger receptive field: short skip X = identity, Y = residual; long skip
X = low-level, Y = high-level; same layer X = small kernel, Y = large kernel (the hosts hand
``(X, Y)`` in that order; the official presets keep the official code's order, see
``aff_jax.models.residual.short_skip_pair``). A *context* maps its input to attention logits:

* local context ``L(z)``: 1x1 conv C_in->C/r (+bias) -> BN -> ReLU -> 1x1 conv C/r->C (+bias) -> BN,
  evaluated per pixel: ``(N, H, W, C_in) -> (N, H, W, C)`` (paper eq. 2);
* global context ``G(z)``: global average pool, then the same bottleneck on the ``(N, 1, 1, C_in)``
  map, broadcast over H and W (paper eq. 1);
* multi-scale context ``L(z) + G(z)`` (paper eq. 3, MS-CAM).

A gate is ``M = sigmoid(context)``. Gates and blends are computed in at least float32 (float64
for a float64 ``dtype``, :mod:`aff_jax.precision`).

Gates on request: applied with ``mutable=['intermediates']``, every gated scheme records its gate
``M`` as ``gate`` (at least float32, broadcast to the fused shape ``(N, H, W, C)``; iAFF also
records its first-stage gate as ``initial_gate``), and every context branch records its logits
as ``logits`` under its own path (``local_att``: ``(N, H, W, C)``, ``global_att``:
``(N, 1, 1, C)``; a branch called twice, iAFF's ``global_att`` with ``reuse_global``, records
two). Without that collection mutable nothing is recorded and nothing extra is traced, so the
compiled programs of training and evaluation are those of the plain modules.
``aff_jax.explain.attention_maps`` collects the gates.

Submodule names follow the official code so weights map one-to-one onto the PyTorch port's
``state_dict`` and the Gluon ``.params`` names: ``local_att`` (children ``0`` conv, ``1`` BN,
``3`` conv, ``4`` BN), ``global_att`` (``1`` conv, ``2`` BN, ``4`` conv, ``5`` BN: index 0 is the
pool), and ``local_att2`` / ``global_att2`` for a second context of the same kind.

Paper and official code disagree in two places; both behaviours are options:

* ``AFF.scale``: the paper's eq. 4 has no factor (``scale=1.0``); the official MXNet
  ``ASKCFuse`` and the PyTorch port multiply the blend by 2 (``scale=2.0``).
* ``IAFF.reuse_global``: the PyTorch port's iAFF computes its second-stage global context with
  the *first* ``global_att`` (its ``global_att2`` exists but is never called); the paper and the
  MXNet code use ``global_att2`` (``reuse_global=False``, the default).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype

from aff_jax import module_fields, precision
from aff_jax.layers import BatchNorm, StatsRule, check_nhwc, conv2d, global_avg_pool


INTERMEDIATES = 'intermediates'


def _record(module: nn.Module, name: str, value: Callable[[], jax.Array]) -> None:
    """Sow ``value()`` as ``name`` when the caller made ``INTERMEDIATES`` mutable. A thunk, and
    checked first: ``sow`` itself would be a no-op, but computing its argument (a broadcast)
    would still add operations to every traced program."""
    if module.is_mutable_collection(INTERMEDIATES):
        module.sow(INTERMEDIATES, name, value())


def _inter_channels(channels: int, r: int) -> int:
    inter = channels // r
    if inter == 0:
        raise ValueError(f'reduction r={r} leaves no channels: C // r = {channels} // {r} = 0; '
                         f'use r <= {channels}')
    return inter


def _checked_pair(x: jax.Array, y: jax.Array, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """``(x, y)`` in the compute ``dtype``, after checking they are NHWC maps of one shape."""
    check_nhwc(x, 'x')
    check_nhwc(y, 'y')
    if x.shape != y.shape:
        raise ValueError(f'x and y must have the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}')
    dtype = precision.checked(dtype)
    return x.astype(dtype), y.astype(dtype)


class _Bottleneck(nn.Module):
    """The context bottleneck: ``(N, H, W, C_in) -> (N, H, W, channels)`` logits.

    ``pooled`` selects the global variant (average pool first, index 0), whose children are
    then numbered 1, 2, 4, 5 as in the official ``nn.Sequential``; the local one uses 0, 1, 3, 4.
    """
    channels: int
    inter: int
    pooled: bool
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool) -> jax.Array:
        first = 1 if self.pooled else 0
        if self.pooled:
            z = global_avg_pool(z)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = dict(stats_rule=self.stats_rule, **kw)
        z = conv2d(self.inter, 1, bias=True, name=str(first), **kw)(z)
        z = BatchNorm(name=str(first + 1), **bn)(z, train)
        z = nn.relu(z)
        z = conv2d(self.channels, 1, bias=True, name=str(first + 3), **kw)(z)
        logits = BatchNorm(name=str(first + 4), **bn)(z, train)
        _record(self, 'logits', lambda: logits)
        return logits


class _FusionBase(nn.Module):
    """Fields shared by every learned fusion scheme; see the module docstring."""
    r: int = 4
    stats_rule: StatsRule = 'gluon'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    num_inputs = 2

    def _context(self, kinds: tuple[str, ...], z: jax.Array, channels: int, train: bool,
                 suffix: str = '') -> jax.Array:
        """Sum of the contexts ``kinds`` (each 'local' or 'global') of ``z``: logits in at least
        float32.

        The first context of a kind is named ``<kind>_att<suffix>``, a repeated kind gets ``2``.
        """
        inter = _inter_channels(channels, self.r)
        compute = precision.at_least_float32(self.dtype)
        logits = jnp.zeros((), compute)
        seen: dict[str, int] = {}
        for kind in kinds:
            if kind not in ('local', 'global'):
                raise ValueError(f"context kind must be 'local' or 'global', got {kind!r}")
            seen[kind] = seen.get(kind, 0) + 1
            name = f'{kind}_att{suffix}' + ('2' if seen[kind] == 2 else '')
            branch = _Bottleneck(channels, inter, kind == 'global', self.stats_rule,
                                 self.dtype, self.param_dtype, name=name)
            logits = logits + branch(z, train).astype(compute)
        return logits


class MSCAM(_FusionBase):
    """Multi-scale channel attention module, paper eq. 3: ``X' = X * M(X)``,
    ``M(X) = sigmoid(L(X) + G(X))``.

    Call ``(x, train)`` with ``x`` of shape (N, H, W, C); returns (N, H, W, C).
    """
    num_inputs = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        check_nhwc(x, 'x')
        x = x.astype(precision.checked(self.dtype))
        gate = jax.nn.sigmoid(self._context(('local', 'global'), x, x.shape[-1], train))
        _record(self, 'gate', lambda: gate)
        return (x.astype(gate.dtype) * gate).astype(self.dtype)


class GatedFusion(_FusionBase):
    """A fusion ``Z = f(X, Y, M)`` with gate ``M = sigmoid(context(gate input))``.

    ``context``: the contexts summed into the gate logits ('local' / 'global', repeats allowed).
    ``gate_on``: what the context sees: 'x', 'y', 'sum' (X + Y) or 'concat' ([X, Y], 2C channels).
    ``combine``: 'select' ``scale * (M*X + (1-M)*Y)``, 'modulate' ``M*X + Y`` or
    'refine' ``X + M*Y`` (``scale`` other than 1 is an error for these two).

    Every scheme below fixes these three; call ``(x, y, train)`` with x, y of shape
    (N, H, W, C); returns (N, H, W, C).
    """
    context: tuple[str, ...] = ('local', 'global')
    gate_on: str = 'sum'
    combine: str = 'select'
    scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        x, y = _checked_pair(x, y, self.dtype)
        if self.combine != 'select' and self.scale != 1.0:
            raise ValueError(f"scale applies to combine='select' only; {type(self).__name__} "
                             f"combines by {self.combine!r}, got scale={self.scale}")
        inputs = {'x': lambda: x, 'y': lambda: y, 'sum': lambda: x + y,
                  'concat': lambda: jnp.concatenate([x, y], axis=-1)}
        if self.gate_on not in inputs:
            raise ValueError(f"gate_on must be one of {sorted(inputs)}, got {self.gate_on!r}")
        gate = jax.nn.sigmoid(self._context(self.context, inputs[self.gate_on](), x.shape[-1], train))
        _record(self, 'gate', lambda: jnp.broadcast_to(gate, x.shape))
        x32, y32 = x.astype(gate.dtype), y.astype(gate.dtype)
        if self.combine == 'select':
            # The scale goes onto the gate, not onto the sum: XLA duplicates an elementwise op
            # with one non-constant operand (``scale * sum``) into every consumer, and a stage's
            # chain of blends then got recomputed from its first block inside each backward
            # transpose. Ending in the two-input add keeps each block's output materialised once.
            # Bit-identical for a power-of-two scale (the official 2).
            z = (self.scale * gate) * x32 + (self.scale - self.scale * gate) * y32
        elif self.combine == 'modulate':
            z = gate * x32 + y32
        elif self.combine == 'refine':
            z = x32 + gate * y32
        else:
            raise ValueError(f"combine must be 'select', 'modulate' or 'refine', got {self.combine!r}")
        return z.astype(self.dtype)


class AFF(GatedFusion):
    """Attentional feature fusion, paper eq. 4: ``Z = scale * (M(X+Y)*X + (1 - M(X+Y))*Y)``
    with the MS-CAM gate ``M = sigmoid(L(X+Y) + G(X+Y))``.

    ``scale=1.0`` is the paper; the official code (``ASKCFuse``) and the PyTorch port use 2.0.
    """


class AFFGlobalGlobal(GatedFusion):
    """Context ablation (Table 3, global + global):
    ``Z = M*X + (1-M)*Y``, ``M = sigmoid(G1(X+Y) + G2(X+Y))`` with two independent global contexts."""
    context: tuple[str, ...] = ('global', 'global')


class AFFLocalLocal(GatedFusion):
    """Context ablation (Table 3, local + local):
    ``Z = M*X + (1-M)*Y``, ``M = sigmoid(L1(X+Y) + L2(X+Y))`` with two independent local contexts."""
    context: tuple[str, ...] = ('local', 'local')


class SK(GatedFusion):
    """Soft selection (SKNet): ``Z = G(X+Y)*X + (1 - G(X+Y))*Y``, G = sigmoid of a global-only context."""
    context: tuple[str, ...] = ('global',)


class Highway(GatedFusion):
    """Highway-style gating: ``Z = G(X)*X + (1 - G(X))*Y``, G = sigmoid of a global context of X."""
    context: tuple[str, ...] = ('global',)
    gate_on: str = 'x'


class SE(GatedFusion):
    """Refinement (SENet): ``Z = X + G(Y)*Y``, G = sigmoid of a global context of Y."""
    context: tuple[str, ...] = ('global',)
    gate_on: str = 'y'
    combine: str = 'refine'


class GAU(GatedFusion):
    """Modulation (GAU): ``Z = G(Y)*X + Y``, G = sigmoid of a global context of Y."""
    context: tuple[str, ...] = ('global',)
    gate_on: str = 'y'
    combine: str = 'modulate'


class SA(GatedFusion):
    """Modulation conditioned on both inputs (SA): ``Z = G(X, Y)*X + Y``, G = sigmoid of a global
    context of the channel concatenation [X, Y] (2C channels in, C out)."""
    context: tuple[str, ...] = ('global',)
    gate_on: str = 'concat'
    combine: str = 'modulate'


class MSSE(SE):
    """Refinement with the MS-CAM context: ``Z = X + M(Y)*Y``, ``M = sigmoid(L(Y) + G(Y))``."""
    context: tuple[str, ...] = ('local', 'global')


class MSGAU(GAU):
    """Modulation with the MS-CAM context: ``Z = M(Y)*X + Y``, ``M = sigmoid(L(Y) + G(Y))``."""
    context: tuple[str, ...] = ('local', 'global')


class MSSA(SA):
    """SA with the MS-CAM context: ``Z = M(X, Y)*X + Y``, ``M = sigmoid(L([X,Y]) + G([X,Y]))``."""
    context: tuple[str, ...] = ('local', 'global')


class MSModulateSum(GatedFusion):
    """Modulation with AFF's gate (Table 4, fully context-aware modulation):
    ``Z = M(X+Y)*X + Y``, ``M = sigmoid(L(X+Y) + G(X+Y))``: AFF's context, but Y passes
    ungated instead of being weighted by ``1 - M``."""
    combine: str = 'modulate'


class MSRefineSum(GatedFusion):
    """Refinement with AFF's gate (Table 4, fully context-aware refinement):
    ``Z = X + M(X+Y)*Y``, ``M = sigmoid(L(X+Y) + G(X+Y))``: AFF's context, but X passes
    ungated instead of being weighted by ``M``."""
    combine: str = 'refine'


class IAFF(_FusionBase):
    """Iterative AFF, paper eq. 5 then eq. 4:
    ``X (+) Y = M1(X+Y)*X + (1 - M1(X+Y))*Y`` (initial integration, MS-CAM ``local_att``/``global_att``),
    ``Z = M2(X (+) Y)*X + (1 - M2(X (+) Y))*Y`` (second MS-CAM ``local_att2``/``global_att2``).

    ``reuse_global=True`` reproduces the PyTorch port, whose second stage calls the first
    ``global_att``; ``global_att2`` is still created so the port's checkpoints load.
    Call ``(x, y, train)``; x, y of shape (N, H, W, C); returns (N, H, W, C).
    """
    reuse_global: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        x, y = _checked_pair(x, y, self.dtype)
        channels = x.shape[-1]
        inter = _inter_channels(channels, self.r)
        compute = precision.at_least_float32(self.dtype)
        x32, y32 = x.astype(compute), y.astype(compute)
        branch = dict(stats_rule=self.stats_rule, dtype=self.dtype, param_dtype=self.param_dtype)
        local1 = _Bottleneck(channels, inter, False, name='local_att', **branch)
        global1 = _Bottleneck(channels, inter, True, name='global_att', **branch)
        local2 = _Bottleneck(channels, inter, False, name='local_att2', **branch)
        global2 = _Bottleneck(channels, inter, True, name='global_att2', **branch)

        def blend(logits, name):
            gate = jax.nn.sigmoid(logits.astype(compute))
            _record(self, name, lambda: gate)
            return gate * x32 + (1.0 - gate) * y32

        xa = x + y
        xi = blend(local1(xa, train).astype(compute) + global1(xa, train),
                   'initial_gate').astype(self.dtype)
        second_global = global1 if self.reuse_global else global2
        if self.reuse_global and self.is_initializing():
            global2(xi, train)
        z = blend(local2(xi, train).astype(compute) + second_global(xi, train), 'gate')
        return z.astype(self.dtype)


class Add(nn.Module):
    """Plain addition (the hosts' default): ``Z = X + Y``. No parameters."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_inputs = 2

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        x, y = _checked_pair(x, y, self.dtype)
        return x + y


class Concat(nn.Module):
    """Concatenation: ``Z = W [X, Y]``, a 1x1 conv (with bias) projecting 2C back to C channels."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    num_inputs = 2

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        x, y = _checked_pair(x, y, self.dtype)
        proj = conv2d(x.shape[-1], 1, bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                      name='conv')
        return proj(jnp.concatenate([x, y], axis=-1))


_SCHEMES: dict[str, type[nn.Module]] = {
    'add': Add,
    'concat': Concat,
    'se': SE,
    'gau': GAU,
    'highway': Highway,
    'sa': SA,
    'sk': SK,
    'ms_se': MSSE,
    'ms_gau': MSGAU,
    'ms_sa': MSSA,
    'ms_modulate_sum': MSModulateSum,
    'ms_refine_sum': MSRefineSum,
    'aff_global_global': AFFGlobalGlobal,
    'aff_local_local': AFFLocalLocal,
    'aff': AFF,
    'iaff': IAFF,
}


def names() -> list[str]:
    """Every fusion scheme offered, by name."""
    return sorted(_SCHEMES)


def scheme(name: str) -> type[nn.Module]:
    """The module class registered under ``name``."""
    if name not in _SCHEMES:
        raise ValueError(f'unknown fusion {name!r}; known: {", ".join(names())}')
    return _SCHEMES[name]


def create(name: str, /, **kwargs: Any) -> nn.Module:
    """Instantiate the scheme ``name`` with its fields ``kwargs`` (e.g. ``r``, ``dtype``).

    Fields a scheme does not have, or values of the wrong type, raise a ``TypeError`` naming
    them, so that e.g. ``r`` is never silently ignored; ``Add`` and ``Concat`` take only ``dtype``
    (and ``param_dtype``).
    """
    cls = scheme(name)
    module_fields.check_fields(cls, kwargs, f'fusion {name!r}')
    return cls(**kwargs)


FusionFactory = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class Factory:
    """``Factory(cls, fields)(**kwargs)`` builds ``cls(**fields, **kwargs)``, ``kwargs``
    winning. Equal factories compare equal, so two hosts built alike are equal modules and
    share their compiled programs (``jax.jit`` takes a module as a static argument by value)."""
    cls: type[nn.Module]
    fields: tuple[tuple[str, Any], ...]

    def __call__(self, **module_kwargs: Any) -> nn.Module:
        return self.cls(**{**dict(self.fields), **module_kwargs})

    def __hash__(self) -> int:
        try:
            return hash((self.cls, self.fields))
        except TypeError:  # an unhashable field value; equal factories still hash alike
            return hash(self.cls)


def factory(name: str, host_defaults: dict[str, Any] | None = None,
            **options: Any) -> FusionFactory:
    """A fusion factory for a host network: ``factory(...)(name='fuse_mode')`` builds the module;
    fields given to that call (a host's ``dtype``) override the factory's.

    ``host_defaults`` are the host's settings (``r``, ``stats_rule``, ``dtype``, ...): each is
    applied where the scheme has that field (``add`` has no ``r``). ``options`` are the
    caller's explicit choices and are checked strictly, as in :func:`create`.
    """
    cls = scheme(name)
    fields = module_fields.field_names(cls)
    merged = {k: v for k, v in (host_defaults or {}).items() if k in fields}
    merged.update(options)
    create(name, **merged)  # validates the options now rather than at trace time
    return Factory(cls, tuple(sorted(merged.items())))
