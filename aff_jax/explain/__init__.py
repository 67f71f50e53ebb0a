"""See what the attention does: the fusion gates, Grad-CAM, and the pointing game.

``attention_maps`` (``gates``) collects the gate ``M`` every fusion module records on request;
``grad_cam`` (``grad_cam``) explains a class score at any layer of any host; ``pointing_game``
(``pointing``) scores where a map peaks against a bounding box. ``python -m aff_jax.explain``
draws them for a trained run (``report``).
"""
from aff_jax.explain.gates import attention_maps, collect
from aff_jax.explain.grad_cam import default_layer, grad_cam, grad_cam_and_outputs
from aff_jax.explain.pointing import peaks, pointing_game, pointing_hits

__all__ = ['attention_maps', 'collect', 'default_layer', 'grad_cam', 'grad_cam_and_outputs',
           'peaks', 'pointing_game', 'pointing_hits']
