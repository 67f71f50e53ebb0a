"""Segmentation quick start: the paper's long-skip host, ``fpn_resnet20`` with AFF at every
long skip, on the embedded ``aff_stopsign`` dataset (64x64 scenes, red octagonal signs from a
few pixels to half the image among red distractors; 0 background, 1 sign).

Offline and sized for a laptop: on 2 CPU cores the whole command -- dataset generation,
compilation, training, evaluation -- ends in under 5 minutes, printing the held-out mIoU and
writing ``predictions.png``. ``--config.fusion=add`` is the plain FPN it is compared with.
"""
from aff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = 'fpn_resnet20'
    c.fusion = 'aff'  # the long skips' fusion
    # fpn_resnet20's own values, listed so that the command line can change them.
    c.model_overrides.layers = (3, 3, 3)
    c.model_overrides.channels = (16, 16, 32, 64)
    c.model_overrides.pyramid_channels = 32
    c.model_overrides.r = 4
    c.dataset = 'aff_stopsign'
    c.batch_size = 16
    c.eval_batch_size = 100
    c.num_train_steps = 250  # 2 epochs of the 2,000 training scenes
    c.schedule = 'cosine'
    c.learning_rate = 0.1
    c.warmup_steps = 10
    c.weight_decay = 1e-4
    c.log_every_steps = 10
    c.eval_every_steps = 125
    c.checkpoint_every_steps = 125
    return c
