"""``python -m aff_jax.compare``: a preset with a checkpoint against its reference, layer by layer.

    python -m aff_jax.compare --model tv_resnet50 --checkpoint port.pth [--mode train --steps 2]
    python -m aff_jax.compare --model aff_resnet50 --checkpoint official.params [--mxnet-python PY]

loads the checkpoint (PyTorch, Gluon ``.params`` or Orbax, by content) into the JAX preset and
the same weights into its reference: the PyTorch port's architecture for ``tv_*`` presets, the
official Gluon model, run by an MXNet interpreter, for the official ones. Prints the rows of
:func:`aff_jax.compare.compare` and the first one diverging in float64 (exit code 1; 0 when
none, 2 for bad input).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

import aff_jax
from aff_jax import compare as compare_lib
from aff_jax.interop import mxnet as aff_mx
from aff_jax.interop import torch as aff_torch
from aff_jax.compare.mxnet_side import find_python
from aff_jax.models import registry


def _family(name: str) -> str:
    """'torch' (the port's tv_* presets) or 'mxnet' (the official presets)."""
    preset = registry.preset(name)
    if preset.stats_rule == 'torch':
        return 'torch'
    if preset.fields.get('fusion_order') == 'official':
        return 'mxnet'
    raise ValueError(f'{name!r} has no reference implementation: tv_* presets compare against '
                     f'the PyTorch port, the official presets against MXNet')


def perturbed(weights: dict[str, np.ndarray], key: str | None) -> dict[str, np.ndarray]:
    """``weights`` with 1.0 added to the first element of ``key`` (a copy), or as they are."""
    if key is None:
        return weights
    if key not in weights:
        raise ValueError(f'--perturb: no weight named {key!r} in the checkpoint')
    changed = np.array(weights[key], copy=True)
    changed.reshape(-1)[0] += 1.0
    return dict(weights, **{key: changed})


def torch_port_reference(name: str, state_dict: dict[str, np.ndarray], layers, small_input: bool
                         ) -> Callable:
    """The port's architecture for ``name`` holding ``state_dict``, as a reference_fn."""
    import torch

    from aff_jax.reference import torch_port

    module = torch_port.build_port(name, fusion=aff_torch.port_fusion(state_dict), layers=layers,
                                   num_classes=int(np.shape(state_dict['fc.weight'])[0]),
                                   small_input=small_input)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    return compare_lib.torch_reference(module)


def run(args: argparse.Namespace, workdir: str) -> list[compare_lib.Row]:
    """The rows for the parsed command line; temporary files go to ``workdir``."""
    family = _family(args.model)
    # Looked up before any work, so that a missing MXNet is reported at once.
    python = find_python(args.mxnet_python) if family == 'mxnet' else None
    overrides: dict[str, Any] = {'dtype': jnp.dtype(args.dtype)}
    if args.layers:
        overrides['layers'] = args.layers
    if args.small_input:
        overrides['small_input'] = True
    if args.fusion:
        overrides['fusion'] = args.fusion
    model, variables = aff_jax.load_pretrained(args.model, args.checkpoint, **overrides)
    x = compare_lib.example_input(args.batch, args.size, args.seed)
    if family == 'torch':
        names = aff_torch.to_state_dict
        weights = perturbed(names(model, variables), args.perturb)
        reference = torch_port_reference(args.model, weights, args.layers, args.small_input)
    else:
        names = aff_mx.to_params
        weights = perturbed(names(model, variables), args.perturb)
        path = aff_mx.save_params(os.path.join(workdir, 'reference.params'), weights)
        reference = compare_lib.mxnet_reference(args.model, path, layers=args.layers,
                                                classes=model.num_classes,
                                                python=python)
    rows = compare_lib.compare(model, variables, reference, x, mode=args.mode, steps=args.steps,
                               learning_rate=args.learning_rate, seed=args.seed, names=names)
    return rows


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected blocks per stage like 1,1,1, got {text!r}')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aff_jax.compare',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='a tv_* or official preset name')
    parser.add_argument('--checkpoint', required=True,
                        help='PyTorch state_dict (.pth/.pt/.npz), Gluon .params or Orbax directory')
    parser.add_argument('--mode', choices=compare_lib.MODES, default='eval',
                        help='eval: running statistics; train: batch statistics, running-'
                             'statistic updates and cross-entropy gradients')
    parser.add_argument('--steps', type=int, default=0,
                        help='SGD steps on both sides (train mode), comparing every variable '
                             'after each')
    parser.add_argument('--learning-rate', type=float, default=0.01,
                        help='SGD step size for --steps (at 0.1 one step can change a random '
                             'model\'s weights by several times their size, and the next steps '
                             'amplify float32 rounding beyond the noise column)')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                        help='JAX compute dtype of the information columns, against the '
                             'reference in float32; the verdict is float64 on both sides')
    parser.add_argument('--layers', type=_layers, default=None,
                        help='blocks per stage, e.g. 1,1,1,1 (a reduced-depth checkpoint)')
    parser.add_argument('--fusion', choices=('add', 'aff', 'iaff'), default=None,
                        help='tv_*: fusion of the checkpoint (default: read off its keys)')
    parser.add_argument('--small-input', action='store_true', help='tv_*: 3x3 stride-1 stem')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, default=64, help='input height and width')
    parser.add_argument('--seed', type=int, default=0, help='input and labels')
    parser.add_argument('--tolerance', type=float, default=None,
                        help='float64 max rel diff always allowed (default: conv/dense layers '
                             'x 2^13 x float64 machine epsilon, ~2e-10 for a ResNet-50)')
    parser.add_argument('--perturb', metavar='KEY', default=None,
                        help='add 1.0 to the first element of this weight on the reference side '
                             '(to see where a known difference surfaces)')
    parser.add_argument('--mxnet-python', metavar='PATH', default=None,
                        help='official presets: a Python with mxnet==1.9.1 (default '
                             '$AFF_JAX_MXNET_PYTHON, else the test suite\'s MXNet venv)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a table')
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix='aff_jax_compare_') as workdir:
            rows = run(args, workdir)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    first = compare_lib.first_divergence(rows, args.tolerance)
    if args.json:
        print(json.dumps({'rows': [dataclasses.asdict(r) for r in rows], 'dtype': args.dtype,
                          'tolerance64': (args.tolerance if args.tolerance is not None
                                          else rows[0].tolerance64 if rows else None),
                          'first_divergence': dataclasses.asdict(first) if first else None}))
    else:
        print(compare_lib.format_table(rows, args.dtype, args.tolerance))
        where = f'{first.kind} {first.name}' if first else 'none'
        print(f'first divergence (float64 rel diff > allowed): {where}')
    return 1 if first else 0
