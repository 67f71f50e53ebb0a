"""CIFAR-100, AFF-ResNeXt-47-32x4d: the recipe of cifar100_aff_resnet32.py (same schedules,
``:step`` selects the step one) with the official ResNeXt host."""
import pathlib

from aff_jax.training.config import load_config


def get_config(schedule: str = 'cosine'):
    c = load_config(pathlib.Path(__file__).with_name('cifar100_aff_resnet32.py'), schedule)
    c.model = 'cifar_aff_resnext47_32x4d'
    return c
