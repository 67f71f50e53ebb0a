"""aff-jax: Attentional Feature Fusion (Dai et al., WACV 2021) in JAX/Flax. NHWC throughout."""
from aff_jax import fusion
from aff_jax.fusion import AFF, IAFF, MSCAM
from aff_jax.long_skip import LongSkipFusion
from aff_jax.models import create_model, list_models
from aff_jax.pretrained import Pretrained, load_pretrained

__all__ = ['AFF', 'IAFF', 'LongSkipFusion', 'MSCAM', 'Pretrained', 'create_model', 'fusion',
           'list_models', 'load_pretrained']
