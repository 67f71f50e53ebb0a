"""ImageNet, AFF-ResNet-50: the official open-aff recipe (train_imagenet.py, cmd_scripts.txt,
and the released training logs).

240 epochs, Nesterov SGD (momentum 0.9), 5 epochs of linear warmup from 0 then cosine to 0,
weight decay 1e-4 off BatchNorm and biases (--no-wd), label smoothing 0.1, mixup with alpha
0.2 switched off for the last 5 epochs, the last BatchNorm of every block initialised to
zero (--last-gamma), Inception-style random-resized crops at 224 followed by AutoAugment's
ImageNet policy (--auto_aug; the official script runs it before the crop), mixed precision (the
official float16 becomes bfloat16 compute, float32 parameters and BatchNorm statistics).

Learning rate: the official run used 0.075 at a global batch of 512 (4 GPUs x 128; its logs
show the warmup reaching 0.075 after 5 x 2502 steps). Here it scales linearly with the batch:
lr = 0.075 * batch_size / 512, the official value at the official batch.

ImageNet must be prepared for TFDS by hand (manual download) as ArrayRecord.
"""
from aff_jax.training.config import base_config

TRAIN_IMAGES = 1_281_167
BATCH = 512
STEPS_PER_EPOCH = TRAIN_IMAGES // BATCH
EPOCHS = 240


def get_config():
    c = base_config()
    c.model = 'aff_resnet50'
    c.model_overrides.zero_init_last_bn = True
    c.dtype = 'bfloat16'
    c.dataset = 'imagenet2012'
    c.image_size = 224
    c.augment = 'autoaugment_imagenet'
    c.data_workers = 16
    c.batch_size = BATCH
    c.eval_batch_size = 1000
    c.num_train_steps = EPOCHS * STEPS_PER_EPOCH
    c.schedule = 'cosine'
    c.learning_rate = 0.075
    c.lr_base_batch_size = 512
    c.warmup_steps = 5 * STEPS_PER_EPOCH
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 1e-4
    c.weight_decay_bn_bias = False
    c.label_smoothing = 0.1
    c.mixup_alpha = 0.2
    c.mixup_off_steps = 5 * STEPS_PER_EPOCH
    c.log_every_steps = 100
    c.eval_every_steps = STEPS_PER_EPOCH
    c.checkpoint_every_steps = STEPS_PER_EPOCH
    return c
