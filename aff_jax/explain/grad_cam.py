"""Grad-CAM (Selvaraju et al., ICCV 2017) at any layer of any host, without model surgery.

The layer is a module, named by its dotted flax path (``features.4``, ``layer4``,
``backbone.features.4``), and its activations ``A`` are that module's output, an NHWC map. A
method interceptor adds a zero perturbation ``D`` to that output, so that the gradient of the
class score with respect to ``D`` is its gradient with respect to ``A`` in the unmodified
network. Then, per image: channel weights ``w_c`` = the spatial mean of ``dS/dA_c``, map =
``ReLU(sum_c w_c A_c)``, divided by its maximum (all zeros when that is 0), upsampled bilinearly
(half-pixel centres, as ``align_corners=False``) to the input's H x W.

The class score ``S``: the logit of class ``target`` (classifiers); the sum over all pixels of
that class's logits (segmentation models). Everything runs in evaluation mode (running
averages), so images do not interact and one backward pass serves the whole batch. All of it
traces under ``jax.jit``.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from aff_jax.explain.gates import without_intermediates
from aff_jax.fusion import INTERMEDIATES


def default_layer(model: nn.Module) -> str:
    """The module whose output is the model's last backbone stage: a classifier's
    ``feature_modules()[-1]`` (the same map ``features_only`` returns last; for the
    pre-activation CIFAR hosts the final BN, its output taken before the ReLU), a segmentation
    model's backbone's, prefixed ``backbone.``."""
    if hasattr(model, 'feature_modules'):
        return model.feature_modules()[-1]
    backbone = getattr(model, 'backbone', None)
    if backbone is not None and hasattr(backbone, 'feature_modules'):
        return 'backbone.' + backbone.feature_modules()[-1]
    raise ValueError(f'{type(model).__name__} names no stages (feature_modules); give '
                     f'layer= the dotted path of the module to explain')


def _targets(logits: jax.Array, target: Any) -> jax.Array:
    """(N,) int32 classes: the predicted ones (classifiers) or ``target`` broadcast."""
    n, classes = logits.shape[0], logits.shape[-1]
    if target is None:
        if logits.ndim != 2:
            raise ValueError('a segmentation model has no single predicted class per image: '
                             'give target= the class to explain (an int or (N,) ints)')
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if isinstance(target, int) and not 0 <= target < classes:
        raise ValueError(f'target={target} is not a class of this model (0 to {classes - 1})')
    chosen = jnp.asarray(target, jnp.int32)
    if chosen.ndim > 1 or (chosen.ndim == 1 and chosen.shape[0] != n):
        raise ValueError(f'target must be an int or {n} ints (one per image), got shape '
                         f'{tuple(chosen.shape)}')
    return jnp.broadcast_to(chosen, (n,))


def _class_scores(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(N,) scores: ``logits[n, t_n]``, or for (N, H, W, K) logits their sum over pixels."""
    if logits.ndim == 4:
        logits = logits.sum(axis=(1, 2))
    return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


class _Tap:
    """A method interceptor that adds ``delta`` to the output of the module at ``layer`` and
    keeps that output; ``seen`` lists every module path called, for error messages."""

    def __init__(self, layer: str, delta: jax.Array | None):
        self.layer, self.delta = layer, delta
        self.outputs: list[jax.Array] = []
        self.seen: list[str] = []

    def __call__(self, next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != '__call__':
            return out
        path = '.'.join(context.module.path)
        self.seen.append(path)
        if path != self.layer:
            return out
        self.outputs.append(out)
        return out if self.delta is None else out + self.delta.astype(out.dtype)

    def activation(self) -> jax.Array:
        if not self.outputs:
            close = difflib.get_close_matches(self.layer, self.seen, n=3, cutoff=0.5)
            hint = f'; did you mean {" or ".join(close)}?' if close else ''
            raise ValueError(f'layer {self.layer!r}: no module at that path runs in this '
                             f'model{hint}')
        if len(self.outputs) > 1:
            raise ValueError(f'layer {self.layer!r} runs {len(self.outputs)} times per call; '
                             f'Grad-CAM needs a module that runs once')
        out = self.outputs[0]
        if not isinstance(out, jax.Array) or out.ndim != 4:
            shape = getattr(out, 'shape', type(out).__name__)
            raise ValueError(f'layer {self.layer!r} outputs {shape}; Grad-CAM needs an NHWC '
                             f'map (N, H, W, C)')
        return out


def grad_cam_and_outputs(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
                         layer: str | None = None, target: Any = None,
                         gates: bool = False) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """``grad_cam``, plus what the same forward pass gives: the logits and, with ``gates``,
    the recorded ``intermediates`` (``gates.collect`` reads them); ``{}`` without.

    Returns ``(maps (N, H, W) float32 in [0, 1], logits, intermediates)``.
    """
    layer = default_layer(model) if layer is None else layer
    variables = without_intermediates(variables)
    mutable = [INTERMEDIATES] if gates else False

    def forward(delta):
        tap = _Tap(layer, delta)
        with nn.intercept_methods(tap):
            out = model.apply(variables, images, train=False, mutable=mutable)
        logits, recorded = out if gates else (out, {})
        return tap.activation(), logits, recorded

    activation = jax.eval_shape(lambda: forward(None)[0])

    def score(delta):
        acts, logits, recorded = forward(delta)
        logits = logits.astype(jnp.float32)
        targets = jax.lax.stop_gradient(_targets(logits, target))
        return _class_scores(logits, targets).sum(), (acts, logits, recorded)

    grads, (acts, logits, recorded) = jax.grad(score, has_aux=True)(
        jnp.zeros(activation.shape, jnp.float32))
    weights = grads.mean(axis=(1, 2))  # (N, C)
    cam = jax.nn.relu(jnp.einsum('nhwc,nc->nhw', acts.astype(jnp.float32), weights,
                                 precision=jax.lax.Precision.HIGHEST))
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
    height, width = images.shape[1:3]
    maps = jax.image.resize(cam, (cam.shape[0], height, width), 'bilinear')
    return jnp.clip(maps, 0.0, 1.0), logits, dict(recorded.get(INTERMEDIATES, {}))


def grad_cam(model: nn.Module, variables: Mapping[str, Any], images: jax.Array,
             layer: str | None = None, target: Any = None) -> jax.Array:
    """Grad-CAM maps of ``model`` on ``images`` (see the module docstring).

    ``images``: (N, H, W, C_in), as the model takes them. ``layer``: the dotted path of the
    module whose output to explain (default ``default_layer(model)``, the last stage).
    ``target``: the class to explain, an int or (N,) ints; None = each image's predicted class
    (classifiers; a segmentation model needs a target). Returns (N, H, W) float32 in [0, 1].
    """
    return grad_cam_and_outputs(model, variables, images, layer, target)[0]
