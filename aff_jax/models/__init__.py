"""Host networks and the preset registry."""
from aff_jax.models.registry import Preprocessing, create_model, list_models, preset

__all__ = ['Preprocessing', 'create_model', 'list_models', 'preset']
