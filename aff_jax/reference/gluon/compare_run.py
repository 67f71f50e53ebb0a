"""The Gluon side of `python -m aff_jax.compare` (run by the MXNet interpreter).

    python compare_run.py PRESET PARAMS CASE.npz OUT_DIR [--layers 1,1,1] [--classes N]

Builds `official_gluon.build(PRESET, layers, classes)`, loads PARAMS strictly and runs the case
once in float32 and once in float64 (the net cast after loading), each on a fresh net. CASE.npz
holds `input` (N, 3, H, W), `mode` ('eval' or 'train'), `steps` and `learning_rate`, and in
train mode `labels` (N,). Writes OUT_DIR/float32.npz and OUT_DIR/float64.npz, keys in order:

- `act:NAME`: first output of every block, NAME its structural name (`features.2.0.attention`),
  in execution order; NCHW as Gluon computes it; `out:` the net's output;
- train mode: `stat:NAME` every running statistic after the first train-mode forward,
  `grad:NAME` the gradient of the mean cross-entropy of that forward w.r.t. every trainable
  parameter (parameter order), and per SGD step k (1..steps; p -= learning_rate * grad)
  `step<k>:NAME` every parameter afterwards.
"""
import argparse
import os

import mxnet as mx
import numpy as np
from mxnet import autograd

from official_gluon import build


def named_blocks(block, prefix=''):
    """(structural name, block) of every descendant, parents first."""
    for name, child in block._children.items():  # what save_parameters walks; no public API
        yield prefix + name, child
        yield from named_blocks(child, prefix + name + '.')


def record_activations(net, records):
    """Hooks that append (name, output) of every named block's first call to `records`."""
    seen = set()

    def hook(name):
        def record(_, __, output):
            if name not in seen and isinstance(output, mx.nd.NDArray):
                seen.add(name)
                records.append((name, output.asnumpy()))
        return record

    return [block.register_forward_hook(hook(name)) for name, block in named_blocks(net)]


def run(args, case, dtype):
    net = build(args.preset, args.layers, args.classes)
    net.load_parameters(args.params, allow_missing=False, ignore_extra=False)
    net.cast(dtype)
    params = net._collect_params_with_prefix()
    x = mx.nd.array(case['input'], dtype=dtype)
    records = []
    handles = record_activations(net, records)
    result = {}
    if str(case['mode']) == 'eval':
        out = net(x)
    else:
        labels = mx.nd.array(case['labels'], dtype=dtype)
        learning_rate, steps = float(case['learning_rate']), int(case['steps'])
        for step in range(max(steps, 1)):
            with autograd.record(train_mode=True):
                output = net(x)
                loss = -mx.nd.pick(mx.nd.log_softmax(output, axis=-1), labels, axis=-1).mean()
            loss.backward()
            if step == 0:
                out = output
                result.update((f'stat:{name}', p.data().asnumpy()) for name, p in params.items()
                              if name.endswith(('running_mean', 'running_var')))
                result.update((f'grad:{name}', p.grad().asnumpy()) for name, p in params.items()
                              if p.grad_req != 'null')
            if steps:
                for p in params.values():
                    if p.grad_req != 'null':
                        p.set_data(p.data() - learning_rate * p.grad())
                result.update((f'step{step + 1}:{name}', p.data().asnumpy())
                              for name, p in params.items())
    for handle in handles:
        handle.detach()
    acts = {f'act:{name}': value for name, value in records}
    return {**acts, 'out:': out.asnumpy(), **result}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('preset')
    parser.add_argument('params')
    parser.add_argument('case')
    parser.add_argument('out_dir')
    parser.add_argument('--layers', type=lambda s: [int(n) for n in s.split(',')])
    parser.add_argument('--classes', type=int)
    args = parser.parse_args()
    with np.load(args.case) as case:
        case = dict(case)
    os.makedirs(args.out_dir, exist_ok=True)
    for dtype in ('float32', 'float64'):
        np.savez(os.path.join(args.out_dir, f'{dtype}.npz'), **run(args, case, dtype))


if __name__ == '__main__':
    main()
