"""Throughput of an aff-jax model against the same architecture in PyTorch, in one process.

    python -m aff_jax.benchmark --model cifar_aff_resnet32 --batch 32
    python -m aff_jax.benchmark --model tv_resnet50 --fusion aff --batch 16 --size 64

The PyTorch side is ``aff_jax.reference.torch_port`` for the ``tv_*`` presets (same weights,
copied) and ``aff_jax.reference.official`` for the official presets (its own random weights:
throughput does not depend on them). Inference is an eval-mode forward; training a train-mode
forward + backward + SGD-momentum update, jitted and state-donating on the JAX side, eager on
the PyTorch side. Both run in alternating rounds (JAX, PyTorch, JAX, ...) so that both see the
same machine load; the figures are medians over rounds, the ratio (JAX / PyTorch images per
second) the median of the per-round ratios. Prints JSON, compile times included.
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
from aff_jax import conv as conv_lib
from aff_jax import host_memory
from aff_jax.interop import torch as aff_torch

NUM_CLASSES = 10


def _seconds_per_call(step: Callable[[], Any], iters: int) -> float:
    """Seconds per call of ``step`` (which must block until its result is ready)."""
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def _reference(model_name: str, fusion: str | None, small_input: bool):
    """The PyTorch model, and whether it shares the JAX model's weights."""
    if model_name.startswith('tv_'):
        from aff_jax.reference import torch_port
        return torch_port.build_port(model_name, fusion=fusion or 'aff', num_classes=NUM_CLASSES,
                                     small_input=small_input), True
    from aff_jax.reference import official
    if fusion is not None:
        raise ValueError(f'--fusion applies to the tv_* presets; {model_name} has its own')
    return official.build_official(model_name, num_classes=NUM_CLASSES), False


def _jax_model(model_name: str, fusion: str | None, small_input: bool, dtype: Any):
    kwargs: dict[str, Any] = {'num_classes': NUM_CLASSES, 'dtype': dtype}
    if model_name.startswith('tv_'):
        kwargs.update(fusion=fusion or 'aff', small_input=small_input)
    return aff_jax.create_model(model_name, **kwargs)


def benchmark(model_name: str, fusion: str | None = None, batch: int = 32, size: int = 32,
              iters: int = 3, rounds: int = 5, small_input: bool = True,
              dtype: str = 'float32', conv: str = 'xla') -> dict[str, Any]:
    """Runs the comparison; returns compile seconds, median images/s and ratios as a dict.
    ``conv``: the ``aff_jax.conv`` implementation the JAX side traces (``'gemm'``: GEMM weight
    gradients on CPU, 1x1 convolutions as dots)."""
    import torch

    on_gpu = jax.default_backend() == 'gpu'
    if on_gpu and not torch.cuda.is_available():
        raise RuntimeError('JAX runs on a GPU but this PyTorch build sees no CUDA device: the '
                           'ratio would compare a GPU against a CPU')
    torch_device = torch.device('cuda' if on_gpu else 'cpu')
    torch.backends.cudnn.benchmark = on_gpu
    reference, shared_weights = _reference(model_name, fusion, small_input)
    model = _jax_model(model_name, fusion, small_input, jnp.dtype(dtype))
    rng = np.random.default_rng(0)
    x_nchw = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch)
    x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
    y = jnp.asarray(labels)
    if shared_weights:
        variables = aff_torch.from_state_dict(model, reference.state_dict())
    else:
        # One image: the parameters do not depend on the batch, and initialising on the full
        # batch cost an H100 ~35 s of compiling for aff_resnet50 at 128x224x224.
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:1])
    tx = optax.sgd(0.01, momentum=0.9)

    options = conv_lib.compiler_options(jax.default_backend())
    forward = jax.jit(functools.partial(model.apply, train=False), compiler_options=options)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2), compiler_options=options)
    def train_step(params, batch_stats, opt_state, images, targets):
        def loss_fn(p):
            logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, images,
                                          train=True, mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), targets).mean()
            return loss, updates['batch_stats']
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    with conv_lib.implementation(conv):
        start = time.perf_counter()
        forward_compiled = forward.lower(variables, x).compile()
        compile_forward = time.perf_counter() - start
        state = [jax.tree.map(jnp.array, variables['params']),
                 jax.tree.map(jnp.array, variables['batch_stats'])]
        state.append(tx.init(state[0]))
        start = time.perf_counter()
        train_compiled = train_step.lower(*state, x, y).compile()
        compile_train = time.perf_counter() - start

    def jax_forward():
        forward_compiled(variables, x).block_until_ready()

    def jax_train():
        state[:] = train_compiled(*state, x, y)
        jax.block_until_ready(state[0])

    memory_format = torch.channels_last if on_gpu else torch.contiguous_format
    reference = reference.to(torch_device, memory_format=memory_format)
    xt = torch.from_numpy(x_nchw).to(torch_device).contiguous(memory_format=memory_format)
    yt = torch.from_numpy(labels).to(torch_device)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    autocast = functools.partial(torch.autocast, torch_device.type, dtype=torch.bfloat16,
                                 enabled=dtype == 'bfloat16' and on_gpu)

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()

    def torch_forward():
        reference.eval()
        with torch.no_grad(), autocast():
            reference(xt)
        synchronize()

    def torch_train():
        reference.train()
        optimizer.zero_grad()
        with autocast():
            loss = torch.nn.functional.cross_entropy(reference(xt).float(), yt)
        loss.backward()
        optimizer.step()
        synchronize()

    sides = {'jax_forward': jax_forward, 'torch_forward': torch_forward,
             'jax_train': jax_train, 'torch_train': torch_train}
    for step in sides.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, step in sides.items():
            seconds[name].append(_seconds_per_call(step, iters))
    per_round = {name: np.asarray(values) for name, values in seconds.items()}
    return {
        'model': model_name, 'fusion': fusion, 'batch': batch, 'size': size, 'dtype': dtype,
        'conv': conv, 'compiler_options': options,
        'iters': iters, 'rounds': rounds, 'shared_weights': shared_weights,
        'machine': f'{platform.processor() or platform.machine()}, '
                   f'{jax.devices()[0].device_kind}, torch {torch.__version__} on '
                   f'{torch.cuda.get_device_name() if on_gpu else "CPU"}, '
                   f'{torch.get_num_threads()} torch threads, jax {jax.__version__}',
        'torch_autocast_bf16': dtype == 'bfloat16' and on_gpu,
        'jax_compile_s': {'forward': compile_forward, 'train_step': compile_train},
        'images_per_s': {name: float(np.median(batch / s)) for name, s in per_round.items()},
        'ratio_jax_over_torch': {
            mode: float(np.median(per_round[f'torch_{mode}'] / per_round[f'jax_{mode}']))
            for mode in ('forward', 'train')},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog='python -m aff_jax.benchmark',
                                     description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='cifar_aff_resnet32',
                        help='a tv_* preset or an official preset (aff_jax.list_models())')
    parser.add_argument('--fusion', default=None, choices=('add', 'aff', 'iaff'),
                        help='tv_* presets only (default aff)')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=32, help='input height and width')
    parser.add_argument('--iters', type=int, default=3, help='steps per side per round')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                        help='JAX compute dtype (PyTorch: float32 on CPU, autocast to it on GPU)')
    parser.add_argument('--conv', default='xla', choices=conv_lib.IMPLEMENTATIONS,
                        help="aff_jax.conv implementation ('gemm': GEMM weight gradients on CPU)")
    parser.add_argument('--retain-freed-memory', default='auto', choices=host_memory.SETTINGS,
                        help="glibc malloc keeps freed memory for the next step (both sides) "
                             "and JAX's CPU steps run on the calling thread (aff_jax.host_memory): "
                             "'auto' on CPU-only installs")
    args = parser.parse_args()
    retained = host_memory.retain_freed_memory(args.retain_freed_memory)
    result = benchmark(args.model, args.fusion, args.batch, args.size, args.iters, args.rounds,
                       dtype=args.dtype, conv=args.conv)
    print(json.dumps({**result, 'freed_memory_retained': retained}, indent=2))


if __name__ == '__main__':
    main()
