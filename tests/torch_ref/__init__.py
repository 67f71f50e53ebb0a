"""Independent PyTorch references used by the tests.

`port` re-implements the open-aff PyTorch port (`aff_pytorch/aff_net`) with its exact
state_dict keys; `official` translates the official MXNet/Gluon definitions (`model/`) with
attribute names and Sequential indices mirroring Gluon's parameter names. Both are written
from the published definitions, not copied, and share nothing with `aff_jax`.
"""
