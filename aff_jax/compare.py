"""Layer-by-layer comparison of an aff-jax model with a reference implementation.

    python -m aff_jax.compare --model tv_resnet50 --checkpoint weights.pt [--json]

loads the same weights into the JAX model and into the reference (the PyTorch port's
architecture for ``tv_*`` presets), runs one input through both in inference mode and prints,
per layer in execution order, the output shape, the max abs / max rel difference and the
reference's own float32 rounding noise at that layer (its float32 run against its float64
run), then the first layer that diverges: whose relative difference exceeds both
``--tolerance`` and ``--noise-factor`` times that noise. Deep networks amplify rounding (the
port's AFF doubles its output in every block), so a fixed tolerance alone would flag layers
where the reference disagrees with itself just as much. Layers are matched by name: the
flax module path and the PyTorch module name are the same dotted string.

JAX activations come from ``capture_intermediates``, reference ones from forward hooks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Mapping, Sequence

import flax
import jax.numpy as jnp
import numpy as np

import aff_jax
from aff_jax.interop import torch as aff_torch


@dataclasses.dataclass(frozen=True)
class LayerDiff:
    """One matched layer: NHWC shape, max |jax - ref| and that divided by max |ref|, and the
    same relative measure between the reference's float32 and float64 runs."""
    layer: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    noise_rel: float


def example_input(batch: int, size: int, seed: int) -> np.ndarray:
    """A (batch, size, size, 3) NHWC float32 input.

    Per-image channel offsets make images differ in their means, so that the global-context
    branch (which pools each image to one value per channel) sees well separated inputs.
    """
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((batch, size, size, 3))
    offsets = 2.0 * rng.standard_normal((batch, 1, 1, 3))
    return (noise + offsets).astype(np.float32)


def jax_activations(model: Any, variables: Mapping[str, Any], x: np.ndarray) -> dict[str, np.ndarray]:
    """Dotted module path -> output of its first call (NHWC for 4-D), inference mode."""
    _, state = model.apply(dict(variables), jnp.asarray(x), train=False,
                           capture_intermediates=True, mutable=['intermediates'])
    flat = flax.traverse_util.flatten_dict(dict(state['intermediates']))
    acts = {}
    for path, outputs in flat.items():
        if path[-1] == '__call__' and len(path) > 1:
            acts['.'.join(path[:-1])] = np.asarray(outputs[0])
    return acts


def torch_activations(module: Any, x: np.ndarray, dtype: str = 'float32') -> list[tuple[str, np.ndarray]]:
    """(module name, output) of every named submodule's first call, in execution order, with
    ``module`` run in ``dtype`` (on a copy); NCHW outputs are returned as NHWC. Outputs are
    copied because the reference may apply in-place activations to them afterwards."""
    import copy

    import torch

    module = copy.deepcopy(module).to(getattr(torch, dtype))

    records: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()

    def hook(name):
        def record(_, __, output):
            if name in seen or not isinstance(output, torch.Tensor):
                return
            seen.add(name)
            value = output.detach().clone().numpy()
            records.append((name, value.transpose(0, 2, 3, 1) if value.ndim == 4 else value))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    try:
        module.eval()
        with torch.no_grad():
            module(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(dtype)))
    finally:
        for handle in handles:
            handle.remove()
    return records


def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|)."""
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
    return diff, diff / (float(np.max(np.abs(b), initial=0.0)) or 1.0)


def compare(jax_acts: Mapping[str, np.ndarray], reference: Sequence[tuple[str, np.ndarray]],
            reference64: Sequence[tuple[str, np.ndarray]]) -> list[LayerDiff]:
    """Differences for the layers both sides report, in the reference's execution order;
    ``reference64`` is the same reference run in float64 (its rounding-noise floor)."""
    exact = dict(reference64)
    rows = []
    for name, ref in reference:
        if name not in jax_acts:
            continue
        ours = jax_acts[name]
        if ours.shape != ref.shape:
            raise ValueError(f'layer {name}: JAX output shape {ours.shape} != reference {ref.shape}')
        max_abs, max_rel = _max_diff(ours, ref)
        rows.append(LayerDiff(name, tuple(ours.shape), max_abs, max_rel, _max_diff(ref, exact[name])[1]))
    return rows


def first_divergence(rows: Sequence[LayerDiff], tolerance: float,
                     noise_factor: float = 10.0) -> LayerDiff | None:
    """The first layer whose difference exceeds ``tolerance`` and ``noise_factor`` x noise."""
    return next((row for row in rows
                 if row.max_rel > max(tolerance, noise_factor * row.noise_rel)), None)


def format_table(rows: Sequence[LayerDiff]) -> str:
    width = max([len('layer')] + [len(r.layer) for r in rows])
    lines = [f'{"layer":<{width}}  {"shape (NHWC)":<20}  {"max abs diff":>12}  {"max rel diff":>12}'
             f'  {"ref f32 noise":>13}']
    for r in rows:
        lines.append(f'{r.layer:<{width}}  {str(r.shape):<20}  {r.max_abs:>12.3e}  {r.max_rel:>12.3e}'
                     f'  {r.noise_rel:>13.3e}')
    return '\n'.join(lines)


def reference_model(model_name: str, state_dict: Mapping[str, Any], fusion: str,
                    small_input: bool) -> Any:
    """The PyTorch port's architecture for ``model_name``, holding ``state_dict``."""
    import torch

    from aff_jax.reference import torch_port

    module = torch_port.build_port(model_name, fusion=fusion,
                                   num_classes=int(np.shape(state_dict['fc.weight'])[0]),
                                   small_input=small_input)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    return module


def run(model_name: str, state_dict: Mapping[str, np.ndarray], *, fusion: str | None = None,
        small_input: bool = False, batch: int = 2, size: int = 64, seed: int = 0,
        reference: Any = None) -> list[LayerDiff]:
    """Compare ``model_name`` loaded with ``state_dict`` against ``reference`` (a torch module
    holding the weights; by default the PyTorch port's architecture loaded with them)."""
    if not model_name.startswith('tv_'):
        raise ValueError(f'{model_name!r}: the PyTorch reference covers the tv_* presets; '
                         f'official presets compare against MXNet')
    num_classes = int(np.shape(state_dict['fc.weight'])[0]) if 'fc.weight' in state_dict else None
    fusion = fusion or aff_torch.port_fusion(state_dict)
    model = aff_jax.create_model(model_name, num_classes=num_classes, fusion=fusion,
                                 small_input=small_input)
    variables = aff_torch.from_state_dict(model, state_dict)
    if reference is None:
        reference = reference_model(model_name, state_dict, fusion, small_input)
    x = example_input(batch, size, seed)
    return compare(jax_activations(model, variables, x), torch_activations(reference, x),
                   torch_activations(reference, x, 'float64'))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aff_jax.compare', description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='a tv_* preset name')
    parser.add_argument('--checkpoint', required=True, help='PyTorch state_dict file (.pt/.pth) or .npz')
    parser.add_argument('--fusion', choices=('add', 'aff', 'iaff'), default=None,
                        help='fusion of the checkpoint (default: read off its keys)')
    parser.add_argument('--small-input', action='store_true', help='3x3 stride-1 stem')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=64, help='input height and width')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--tolerance', type=float, default=1e-5, help='max rel diff always allowed')
    parser.add_argument('--noise-factor', type=float, default=10.0,
                        help='max rel diff allowed, in units of the reference float32 noise')
    parser.add_argument('--perturb', metavar='KEY', default=None,
                        help='add 1.0 to the first element of this weight on the reference side '
                             '(to see where a known difference surfaces)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    args = parser.parse_args(argv)
    try:
        state_dict = aff_torch.load_state_dict_file(args.checkpoint)
        reference = None
        if args.perturb:
            if args.perturb not in state_dict:
                raise ValueError(f'--perturb: no weight named {args.perturb!r} in the checkpoint')
            perturbed = dict(state_dict)
            perturbed[args.perturb] = np.array(state_dict[args.perturb], copy=True)
            perturbed[args.perturb].reshape(-1)[0] += 1.0
            reference = reference_model(args.model, perturbed,
                                        args.fusion or aff_torch.port_fusion(state_dict),
                                        args.small_input)
        rows = run(args.model, state_dict, fusion=args.fusion, small_input=args.small_input,
                   batch=args.batch, size=args.size, seed=args.seed, reference=reference)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    first = first_divergence(rows, args.tolerance, args.noise_factor)
    if args.json:
        print(json.dumps({'layers': [dataclasses.asdict(r) for r in rows], 'tolerance': args.tolerance,
                          'noise_factor': args.noise_factor,
                          'first_divergence': first.layer if first else None}))
    else:
        print(format_table(rows))
        print(f'first diverging layer (rel diff > max({args.tolerance:g}, '
              f'{args.noise_factor:g} x noise)): {first.layer if first else "none"}')
    return 1 if first else 0


if __name__ == '__main__':
    sys.exit(main())
