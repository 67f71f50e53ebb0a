"""Write MXNet reference outputs for an official open-aff preset (run with the mxnet venv).

    PYTHONPATH=aff_jax/reference/gluon python make_reference.py PRESET OUT_DIR [--layers 1,1,1]
                             [--batch 2] [--size 32] [--seed 0] [--load PARAMS] [--values]

Builds the preset with `official_gluon.build` (in aff_jax/reference/gluon, hence the
PYTHONPATH), draws every parameter from a seeded generator (or, with `--load`, takes them
from a `.params` file through `load_parameters`, strictly), runs one NCHW float32
input in inference mode (BatchNorm on running statistics) and writes to OUT_DIR:

- `model.params`: `save_parameters` of the net (structural names, MXNet layouts);
- `reference.npz`: `input` (N, 3, H, W) and `logits` (N, classes), both float32;
- `params.json`: the parameters in file order, each `{name, shape, dtype, grad_req}`;
- `values.npz` (with `--values`): every parameter as MXNet holds it, keyed by name.

Drawn values: conv/dense weights N(0, 2 / fan_in), biases and BN betas N(0, 0.1^2), BN gammas
U(0.5, 1.5). Running statistics are calibrated on a separate batch of 8, in one inference pass
where each BatchNorm, just before it runs, gets the per-channel mean and variance of its own
input, perturbed (mean + 0.2 std N(0, 1), variance x U(0.5, 2)): activations stay O(1), so the
attention gates do not saturate, and the statistics differ from those of the reference input,
so a model normalising with batch statistics fails the comparison. Parameters Gluon never trains
(grad_req 'null' gamma/beta of the CIFAR input BN, built with scale=False, center=False) keep
the values training leaves them at: gamma 1 (the op runs with fix_gamma and rewrites it to 1)
and beta 0.
"""
import argparse
import json
import os

import mxnet as mx
import numpy as np
from mxnet.gluon import nn

from official_gluon import PRESETS, build


def _draw(name, shape, rng):
    leaf = name.rsplit('.', 1)[-1]
    if leaf == 'weight':
        return rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    if leaf in ('bias', 'beta'):
        return rng.normal(0.0, 0.1, shape)
    if leaf == 'gamma':
        return rng.uniform(0.5, 1.5, shape)
    raise ValueError(f'no rule to draw parameter {name!r}')


def _calibrate_batchnorm(net, x, rng):
    """Set each BatchNorm's running statistics from its own (perturbed) input statistics on x."""
    def set_statistics(block, inputs):
        data = inputs[0].asnumpy()
        mean, var = data.mean(axis=(0, 2, 3)), data.var(axis=(0, 2, 3))
        mean = mean + 0.2 * np.sqrt(var) * rng.normal(size=mean.shape)
        var = var * rng.uniform(0.5, 2.0, var.shape)
        block.running_mean.set_data(mx.nd.array(mean, dtype='float32'))
        block.running_var.set_data(mx.nd.array(var, dtype='float32'))

    batchnorms = []
    net.apply(lambda block: batchnorms.append(block) if isinstance(block, nn.BatchNorm) else None)
    handles = [block.register_forward_pre_hook(set_statistics) for block in batchnorms]
    net(x)
    for handle in handles:
        handle.detach()


def _images(rng, batch, size):
    """NCHW noise plus per-image channel offsets: pure noise pools to nearly the same value
    in every image, so the global-context BatchNorm (calibrated on such pooled values) would
    divide by a tiny spread and turn float32 rounding into visible differences."""
    return rng.normal(size=(batch, 3, size, size)) + 2.0 * rng.normal(size=(batch, 3, 1, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('preset', choices=sorted(PRESETS))
    parser.add_argument('out_dir')
    parser.add_argument('--layers', help='blocks per stage, e.g. 1,1,1 (default: the preset)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--size', type=int, help='input height = width (default: per preset)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--load', help='take the weights from this .params file')
    parser.add_argument('--values', action='store_true', help='also write values.npz')
    args = parser.parse_args()

    try:
        net = build(args.preset, [int(n) for n in args.layers.split(',')] if args.layers else None)
    except ValueError as err:
        parser.error(str(err))
    rng = np.random.RandomState(args.seed)
    size = args.size or PRESETS[args.preset][2]
    x = mx.nd.array(_images(rng, args.batch, size), dtype='float32')

    params = net._collect_params_with_prefix()  # what save_parameters writes; no public API
    if args.load:
        net.load_parameters(args.load, allow_missing=False, ignore_extra=False)
    else:
        net.initialize()
        net(x)  # resolves the deferred shapes
        for name, param in params.items():
            if param.grad_req != 'null':
                param.set_data(mx.nd.array(_draw(name, param.shape, rng), dtype=param.dtype))
        calibration = _images(rng, 8, size)
        _calibrate_batchnorm(net, mx.nd.array(calibration, dtype='float32'), rng)
    logits = net(x).asnumpy()

    os.makedirs(args.out_dir, exist_ok=True)
    net.save_parameters(os.path.join(args.out_dir, 'model.params'))
    np.savez(os.path.join(args.out_dir, 'reference.npz'), input=x.asnumpy(), logits=logits)
    table = [dict(name=name, shape=list(p.shape), dtype=np.dtype(p.dtype).name,
                  grad_req=p.grad_req) for name, p in params.items()]
    with open(os.path.join(args.out_dir, 'params.json'), 'w') as f:
        f.write('[\n' + ',\n'.join(json.dumps(entry) for entry in table) + '\n]\n')
    if args.values:
        np.savez(os.path.join(args.out_dir, 'values.npz'),
                 **{name: p.data().asnumpy() for name, p in params.items()})


if __name__ == '__main__':
    main()
