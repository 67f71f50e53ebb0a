"""Turn a PyTorch or MXNet checkpoint into an Orbax checkpoint of flax variables.

    python -m aff_jax.interop.convert --model aff_resnet50 --mxnet ImageNet-ASKCFuse.params --out ckpt/
    python -m aff_jax.interop.convert --model tv_resnet50 --torch port.pth --out ckpt/

The output directory holds ``{'params', 'batch_stats'}`` written by Orbax's
``StandardCheckpointer``: ``load_variables(dir)`` returns them for ``model.apply``, and the
trainer's ``init_from`` config key starts fine-tuning from them. The preset's preprocessing
(``aff_jax.models.preset(name).preprocessing``) says how inputs must be normalised.

Exit status: 0 written; 1 a one-line ``error: ...`` on stderr (unreadable or mismatched
weights, existing output directory); 2 bad arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

import aff_jax


def save_variables(path: str, variables: Mapping[str, Any]) -> str:
    """Write ``variables`` as an Orbax checkpoint at ``path`` (which must not exist yet).

    Orbax writes into a temporary directory and renames it when complete, so an interrupted
    save leaves no half-written checkpoint at ``path``.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f'{path} already exists; choose a new output directory')
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, {k: dict(v) for k, v in variables.items()})
        checkpointer.wait_until_finished()
    return path


def load_variables(path: str) -> dict[str, Any]:
    """The ``{'params', 'batch_stats'}`` saved by :func:`save_variables` (numpy arrays)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(path))


def convert(model_name: str, *, mxnet: str | None = None, torch: str | None = None,
            num_classes: int | None = None, fusion: str | None = None,
            overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load a Gluon ``.params`` (official presets) or a PyTorch state_dict (``tv_*``) into the
    variables of ``create_model(model_name, ...)``."""
    if (mxnet is None) == (torch is None):
        raise ValueError('give exactly one of --mxnet PATH or --torch PATH')
    if mxnet is not None:
        from aff_jax.interop import mxnet as aff_mx

        weights, head = aff_mx.load_params(mxnet), ('output.weight', 'fc.weight')
    else:
        from aff_jax.interop import torch as aff_torch

        weights, head = aff_torch.load_state_dict_file(torch), ('fc.weight',)
        fusion = fusion or aff_torch.port_fusion(weights)
    if num_classes is None:
        num_classes = next((int(np.shape(weights[k])[0]) for k in head if k in weights), None)
    model = aff_jax.create_model(model_name, num_classes=num_classes, fusion=fusion,
                                 **dict(overrides or {}))
    if mxnet is not None:
        return aff_mx.from_params(model, weights)
    return aff_torch.from_state_dict(model, weights)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m aff_jax.interop.convert',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='preset name (aff_jax.list_models())')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--mxnet', metavar='PARAMS', help='Gluon save_parameters file')
    source.add_argument('--torch', metavar='PTH', help='PyTorch state_dict file')
    parser.add_argument('--fusion', default=None, help='fusion of a tv_* checkpoint (add/aff/iaff)')
    parser.add_argument('--out', required=True, help='new directory for the Orbax checkpoint')
    args = parser.parse_args(argv)
    try:
        variables = convert(args.model, mxnet=args.mxnet, torch=args.torch, fusion=args.fusion)
        path = save_variables(args.out, variables)
    # Bad input (unreadable or mismatched weights, an existing --out, no torch) ends in one
    # line, as in `python -m train`; anything else is a bug and keeps its traceback.
    except (ValueError, OSError, ImportError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
