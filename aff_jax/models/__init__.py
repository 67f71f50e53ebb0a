"""Host networks, segmentation models and the model registry."""
from aff_jax.models.features import FeatureInfo
from aff_jax.models.registry import (Preprocessing, create_model, feature_info, is_segmentation,
                                     list_models, preset)

__all__ = ['FeatureInfo', 'Preprocessing', 'create_model', 'feature_info', 'is_segmentation',
           'list_models', 'preset']
