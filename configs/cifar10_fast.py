"""CIFAR-10 in minutes: an AFF-ResNet-20 recipe sized for 2 CPU cores.

    python -m train --config configs/cifar10_fast.py --workdir DIR                  # TFDS cifar10
    python -m train --config configs/cifar10_fast.py --workdir DIR \\
        --config.dataset=imagefolder:PATH     # PATH/{train,test}/<class>/*.jpg, e.g. the JPEG copy
    python -m train --config configs/cifar10_fast.py:gpu --workdir DIR              # one GPU
    --config.fusion=add|aff|iaff|...                                                # the scheme

The whole command (folder check, compilation, training, evaluation) is meant to fit 15
minutes on two CPU cores; the accuracy and time of each seed are in BENCHMARKS.md, the
comparisons built on it in RESULTS.md. Why each choice (measured on the 2-core machines,
BENCHMARKS.md "CIFAR-10 in 15 minutes"):

* Net: the official CIFAR host (pre-activation blocks, AFF in every block) at ResNet-20's
  shape, 3 blocks per stage, widths 16-32-64. Throughput decides: batch 128 trains ~480
  images/s here, ~7 epochs in the budget; twice the width at 2 blocks per stage ran at 270.
* Batch 128: per image faster than 256 on the CPU (480 against 410 images/s).
* One-cycle learning rate ('linear': warmup to the peak, then linear to 0), Nesterov SGD,
  weight decay 5e-4 (not on BatchNorm and biases): the fast-training schedule
  (DAWNBench ResNet, airbench), for a budget of a few epochs.
* Label smoothing 0.2, no mixup: mixup pays off over hundreds of epochs, not a few.
* Evaluation on each test image and its mirror image (``eval_flip``), no evaluation on the
  way (it would take training time); one final evaluation.
* ``:gpu``: the same net and schedule for one GPU, batch 512 and 4x the learning rate,
  30 epochs; bfloat16 compute.
"""
from aff_jax.training.config import base_config

TRAIN_IMAGES = 50_000


def get_config(variant: str = 'cpu'):
    c = base_config()
    c.model = 'cifar_aff_resnet32'
    c.model_overrides.layers = (3, 3, 3)
    c.model_overrides.channels = (16, 16, 32, 64)
    c.model_overrides.freeze_input_stats = False
    c.dataset = 'cifar10'
    c.eval_flip = True
    c.eval_batch_size = 500
    c.schedule = 'linear'
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    c.weight_decay_bn_bias = False
    c.label_smoothing = 0.2
    if variant == 'cpu':
        c.batch_size = 64
        epochs = 8
        c.learning_rate = 0.1
    elif variant == 'gpu':
        c.batch_size = 512
        epochs = 30
        c.learning_rate = 0.8
        c.dtype = 'bfloat16'
        c.data_workers = 8
    else:
        raise ValueError(f"the config argument (FILE.py:ARG) must be 'cpu' or 'gpu', "
                         f"got {variant!r}")
    steps_per_epoch = TRAIN_IMAGES // c.batch_size
    c.num_train_steps = epochs * steps_per_epoch
    c.warmup_steps = c.num_train_steps // 5
    c.log_every_steps = 50
    c.eval_every_steps = c.num_train_steps
    c.checkpoint_every_steps = steps_per_epoch
    return c
