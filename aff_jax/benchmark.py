"""Throughput of an aff-jax ``tv_*`` model against the PyTorch port's architecture, same run.

    python -m aff_jax.benchmark --model tv_resnet18 --fusion aff --batch 32 --size 64

Both sides get the same weights and input; inference is an eval-mode forward, training a
train-mode forward + backward + SGD update (jitted and state-donating on the JAX side).
Prints compile time (JAX) and images per second for each, and the JAX / PyTorch ratio.
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import aff_jax
from aff_jax.interop import torch as aff_torch


def _time(step: Callable[[], Any], iters: int) -> float:
    """Seconds per call of ``step`` (which must block until its result is ready)."""
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def benchmark(model_name: str, fusion: str, batch: int, size: int, iters: int,
              small_input: bool = True) -> dict[str, Any]:
    import torch

    from aff_jax.reference import torch_port

    reference = torch_port.build_port(model_name, fusion=fusion, num_classes=10,
                                      small_input=small_input)
    model = aff_jax.create_model(model_name, fusion=fusion, num_classes=10, small_input=small_input)
    variables = aff_torch.from_state_dict(model, reference.state_dict())
    rng = np.random.default_rng(0)
    x_nchw = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    y = jnp.asarray(labels)
    tx = optax.sgd(0.01, momentum=0.9)

    forward = jax.jit(functools.partial(model.apply, train=False))

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, batch_stats, opt_state, images, targets):
        def loss_fn(p):
            logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, images,
                                          train=True, mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return loss, updates['batch_stats']
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    start = time.perf_counter()
    forward.lower(variables, x).compile()
    compile_forward = time.perf_counter() - start
    state = [jax.tree.map(jnp.asarray, variables['params']),
             jax.tree.map(jnp.asarray, variables['batch_stats'])]
    state.append(tx.init(state[0]))
    start = time.perf_counter()
    train_step.lower(*state, x, y).compile()
    compile_train = time.perf_counter() - start

    def jax_train():
        state[:] = train_step(*state, x, y)
        jax.block_until_ready(state[0])

    forward(variables, x).block_until_ready()
    jax_train()
    jax_fwd = _time(lambda: forward(variables, x).block_until_ready(), iters)
    jax_trn = _time(jax_train, iters)

    xt, yt = torch.from_numpy(x_nchw), torch.from_numpy(labels)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)

    def torch_forward():
        reference.eval()
        with torch.no_grad():
            reference(xt)

    def torch_train():
        reference.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(xt), yt).backward()
        optimizer.step()

    torch_forward()
    torch_train()
    torch_fwd = _time(torch_forward, iters)
    torch_trn = _time(torch_train, iters)
    return {
        'model': model_name, 'fusion': fusion, 'batch': batch, 'size': size, 'iters': iters,
        'machine': f'{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, '
                   f'torch threads {torch.get_num_threads()}',
        'jax_compile_s': {'forward': compile_forward, 'train_step': compile_train},
        'images_per_s': {
            'jax_forward': batch / jax_fwd, 'torch_forward': batch / torch_fwd,
            'jax_train': batch / jax_trn, 'torch_train': batch / torch_trn},
        'ratio_jax_over_torch': {'forward': torch_fwd / jax_fwd, 'train': torch_trn / jax_trn},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog='python -m aff_jax.benchmark', description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='tv_resnet18')
    parser.add_argument('--fusion', default='aff', choices=('add', 'aff', 'iaff'))
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--iters', type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(benchmark(args.model, args.fusion, args.batch, args.size, args.iters), indent=2))


if __name__ == '__main__':
    main()
