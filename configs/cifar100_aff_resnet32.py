"""CIFAR-100, AFF-ResNet-32: the official open-aff recipe (train_cifar.py, cmd_scripts.txt).

    python -m train --config configs/cifar100_aff_resnet32.py --workdir DIR          # cosine
    python -m train --config configs/cifar100_aff_resnet32.py:step --workdir DIR     # step

Common to both: global batch 512 (the official 4 GPUs x 128), 640 epochs of
50000 // 512 = 97 steps, Nesterov SGD (momentum 0.9), lr 0.2, weight decay 1e-4, mixup with
alpha 1 switched off for the last 40 epochs, label smoothing 0.1, pad-4 random crop and flip,
AutoAugment's CIFAR-10 policy (--auto_aug; run after the crop and flip here, before them in
the official script).
* ``cosine`` (cmd_scripts.txt: --cosine --no-wd): 10 epochs of linear warmup from 0, cosine
  to 0, no weight decay on BatchNorm scale/bias and biases.
* ``step`` (the runs whose logs are released: cosine=False): lr 0.2 without warmup, x0.1 at
  epochs 300 and 450; train_cifar.py applies --no-wd only with --cosine, so every parameter
  is decayed.

Labels. Gluon's ``CIFAR100(train=True)`` defaults to ``fine_label=False``, so the released
train_cifar.py trains on the 20 coarse superclasses (with a 100-way head); the ~91% of the
official README's (commented-out) table come from such runs. ``dataset='cifar100'`` here
trains on the 100 fine labels; ``--config.dataset=cifar100_coarse`` reproduces what the
script did (``num_classes`` stays 100, the official head).

Preparing TFDS cifar100 needs TensorFlow once.
"""
from aff_jax.training.config import base_config

TRAIN_IMAGES = 50_000
BATCH = 512
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS = 640


def get_config(schedule: str = 'cosine'):
    c = base_config()
    c.model = 'cifar_aff_resnet32'
    c.num_classes = 100
    c.dataset = 'cifar100'
    c.batch_size = BATCH
    c.eval_batch_size = 1000
    c.num_train_steps = EPOCHS * STEPS_PER_EPOCH
    c.learning_rate = 0.2
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.label_smoothing = 0.1
    c.mixup_alpha = 1.0
    c.mixup_off_steps = 40 * STEPS_PER_EPOCH
    c.augment = 'autoaugment_cifar10'
    if schedule == 'cosine':
        c.schedule = 'cosine'
        c.warmup_steps = 10 * STEPS_PER_EPOCH
        c.weight_decay_bn_bias = False
    elif schedule == 'step':
        c.schedule = 'step'
        c.warmup_steps = 0
        c.lr_decay_boundaries = (300 * STEPS_PER_EPOCH, 450 * STEPS_PER_EPOCH)
        c.lr_decay_factor = 0.1
        c.weight_decay_bn_bias = True
    else:
        raise ValueError(f"the config argument (FILE.py:ARG) must be 'cosine' or 'step', "
                         f"got {schedule!r}")
    c.log_every_steps = STEPS_PER_EPOCH
    c.eval_every_steps = 10 * STEPS_PER_EPOCH
    c.checkpoint_every_steps = 10 * STEPS_PER_EPOCH
    return c
