"""A PyTorch module as a comparison reference: :func:`torch_reference`."""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np

from aff_jax.compare.runs import OUTPUT, Case, Run, nchw_to_nhwc, nhwc_to_nchw


def torch_reference(module: Any) -> Callable[[Case, str], Run]:
    """``reference_fn(case, dtype) -> Run`` running a copy of the ``torch.nn.Module`` ``module``
    in ``dtype`` (``'float32'`` / ``'float64'``).

    ``module`` takes NCHW tensors (the case's NHWC inputs are transposed) and returns logits
    (N, classes) or an NCHW map; its outputs are recorded by forward hooks on every named
    submodule (first call; cloned, since in-place activations may change them later), its
    gradients and running statistics read by ``state_dict`` key. The copy is trained, never
    ``module`` itself.
    """
    def run(case: Case, dtype: str) -> Run:
        import torch

        net = copy.deepcopy(module).to(getattr(torch, dtype))
        records: list[tuple[str, np.ndarray]] = []
        seen: set[str] = set()

        def hook(name):
            def record(_, __, output):
                if name not in seen and isinstance(output, torch.Tensor):
                    seen.add(name)
                    records.append((name, nchw_to_nhwc(output.detach().clone().numpy())))
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
        inputs = [torch.from_numpy(nhwc_to_nchw(x)).to(getattr(torch, dtype)) for x in case.inputs]
        try:
            if case.mode == 'eval':
                net.eval()
                with torch.no_grad():
                    out = net(*inputs)
                return Run(records + [(OUTPUT, nchw_to_nhwc(out.numpy()))])
            net.train()
            return _train(net, inputs, case, records)
        finally:
            for handle in handles:
                handle.remove()
    return run


def _train(net: Any, inputs: list, case: Case, records: list[tuple[str, np.ndarray]]) -> Run:
    import torch

    params = dict(net.named_parameters())
    labels = torch.from_numpy(np.asarray(case.labels, np.int64))
    result = None
    for _ in range(max(case.steps, 1)):
        out = net(*inputs)
        logits = out.permute(0, 2, 3, 1) if out.ndim == 4 else out
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 labels.reshape(-1))
        net.zero_grad()
        if any(p.requires_grad for p in params.values()):  # else nothing to differentiate
            loss.backward()
        if result is None:
            result = Run(records + [(OUTPUT, nchw_to_nhwc(out.detach().numpy()))],
                         stats={k: v.clone().numpy() for k, v in net.state_dict().items()
                                if k not in params},
                         grads={k: p.grad.clone().numpy() for k, p in params.items()
                                if p.grad is not None})
        if case.steps:
            with torch.no_grad():
                for p in params.values():
                    if p.grad is not None:
                        p -= case.learning_rate * p.grad
            result.states.append({k: v.clone().numpy() for k, v in net.state_dict().items()})
    return result
