"""The README's quick start: a small AFF-ResNet on the embedded `aff_multiscale` dataset.

Offline (the dataset is generated locally on first use, ~25 s) and sized for a laptop: on 2
CPU cores the whole command -- dataset generation, compilation, 400 training steps (about 5
epochs), evaluation -- takes about 3 minutes and ends above 90% held-out accuracy (chance is
10%). The network is the official CIFAR AFF-ResNet with one block per stage and widths
8-8-16-32 (AFF fusion in every block).
"""
from aff_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = 'cifar_aff_resnet32'
    c.model_overrides.layers = (1, 1, 1)
    c.model_overrides.channels = (8, 8, 16, 32)
    c.model_overrides.start_layer = 1  # AFF fusion from stage 1 on, i.e. in every block
    c.dataset = 'aff_multiscale'
    c.batch_size = 64
    c.eval_batch_size = 500
    c.num_train_steps = 400
    c.schedule = 'cosine'
    c.learning_rate = 0.2
    c.warmup_steps = 20
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    # The documented trajectory (92.90%) is XLA's convolutions' rounding; with the faster
    # 'gemm' gradients this short, high-lr recipe lands elsewhere (41-74% in three tries).
    c.conv_implementation = 'xla'
    c.log_every_steps = 20
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    return c
