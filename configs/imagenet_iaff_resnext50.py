"""ImageNet, iAFF-ResNeXt-50-32x4d: the recipe of imagenet_aff_resnet50.py with the official
iAFF ResNeXt host. The released log of this model trained and evaluated at 320x320 (its
--input-size), not 224."""
import pathlib

from aff_jax.training.config import load_config


def get_config():
    c = load_config(pathlib.Path(__file__).with_name('imagenet_aff_resnet50.py'))
    c.model = 'iaff_resnext50_32x4d'
    c.image_size = 320
    return c
