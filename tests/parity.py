"""Float64 parity: a JAX model copied into float64 against a reference run in float64.

Two faithful implementations of the same function, both in float64, agree to rounding amplified
by the network (~1e-12 here), so every compared quantity (module outputs, running statistics,
gradients, variables after SGD steps) must agree to TOLERANCE relative to the reference's
largest value. One kind of quantity is zero in exact arithmetic and rounding alone in either
framework: the gradient of a conv bias whose conv feeds a train-mode BatchNorm (the mean it
adds is subtracted again). Such a gradient is checked for size instead: both sides within
TOLERANCE of zero, relative to the gradient of that conv's weight.
"""
from __future__ import annotations

import dataclasses

import flax
import numpy as np

from aff_jax import compare
from aff_jax.compare import jax_side

TOLERANCE = 1e-10


@dataclasses.dataclass(frozen=True)
class Diff:
    """One quantity: ``rel`` = max |jax - reference| / max |reference| (both float64), or for a
    gradient that is zero in exact arithmetic (``zero``) max(|jax|, |reference|) / max |the
    conv weight's reference gradient|."""
    kind: str
    name: str
    rel: float
    zero: bool = False


def zero_gradient_names(variables) -> set[str]:
    """Dotted names (``...conv.bias``, the reference's naming) of the conv biases whose conv is
    followed by a BatchNorm, the next child of the same parent (``local_att.0`` and
    ``local_att.1``)."""
    params = flax.traverse_util.flatten_dict(dict(variables.get('params', {})))
    norms = {path[:-1] for path in flax.traverse_util.flatten_dict(
        dict(variables.get('batch_stats', {})))}
    names = set()
    for path in params:
        module, leaf = path[:-1], path[-1]
        if (leaf == 'bias' and module + ('kernel',) in params and module[-1].isdigit()
                and module[:-1] + (str(int(module[-1]) + 1),) in norms):
            names.add('.'.join(module + ('bias',)))
    return names


def _rel(a, b) -> float:
    return compare.max_diff(np.asarray(a), np.asarray(b))[1]


def float64_diffs(model, variables, reference_fn, x, *, names, mode='eval', steps=0,
                  seed=0) -> list[Diff]:
    """Every quantity of ``model`` (holding ``variables``) run in float64 against
    ``reference_fn(case, 'float64')``, as :func:`aff_jax.compare.compare` pairs them
    (activations both name alike, then in train mode statistics, gradients and the variables
    after each SGD step, strictly)."""
    case = compare.make_case(model, variables, x, mode=mode, steps=steps, seed=seed)
    ours = jax_side.run_float64(model, variables, case, names)
    ref = reference_fn(case, 'float64')
    mine = dict(ours.activations)
    diffs = [Diff('activation', name, _rel(mine[name], value))
             for name, value in ref.activations if name in mine]
    assert diffs and diffs[-1].name == compare.OUTPUT
    # The JAX side names every variable in both (statistics and gradients of the parameters).
    assert set(ref.stats) <= set(ours.stats) and set(ref.grads) <= set(ours.grads)
    # PyTorch has no gradient for a parameter the forward never uses (the port's iAFF never
    # calls global_att2); JAX's is zero. Gluon's placeholders (the fixed gamma and beta of a
    # BatchNorm without scale and shift) read the same in every conversion.
    unused = [name for name in set(ours.grads) - set(ref.grads) - set(ref.stats)
              if not np.array_equal(ours.grads[name], ours.stats[name])]
    assert all(not np.any(ours.grads[name]) for name in unused), sorted(unused)
    diffs += [Diff('stat', name, _rel(ours.stats[name], value))
              for name, value in ref.stats.items()]
    zero = zero_gradient_names(variables) if mode == 'train' else set()
    for name, value in ref.grads.items():
        if name in zero:
            weight = np.max(np.abs(ref.grads[name[:-len('bias')] + 'weight']))
            size = max(np.max(np.abs(value)), np.max(np.abs(ours.grads[name])))
            # An unused context (the port's iAFF never calls global_att2): both exactly zero.
            diffs.append(Diff('grad', name, float(size / weight if weight else size), zero=True))
        else:
            diffs.append(Diff('grad', name, _rel(ours.grads[name], value)))
    assert len(ours.states) == len(ref.states) == steps
    for k, (mine, theirs) in enumerate(zip(ours.states, ref.states), 1):
        assert set(mine) == set(theirs)
        diffs += [Diff(f'step{k}', name, _rel(mine[name], value)) for name, value in theirs.items()]
    return diffs


def beyond(diffs, tolerance=TOLERANCE) -> list[Diff]:
    """The quantities that do not agree (NaN never does)."""
    return [d for d in diffs if not d.rel <= tolerance]


def assert_parity(diffs, tolerance=TOLERANCE) -> None:
    bad = beyond(diffs, tolerance)
    assert not bad, f'{len(bad)} of {len(diffs)} beyond {tolerance:g}: {bad[:5]}'
