"""Paper Table 3, the context of the fusion's gate, as a sweep: Global + Global
(``aff_global_global``), Local + Local (``aff_local_local``) and Global + Local (``aff``, the
MS-CAM) in one of the paper's three scenarios, seeds 0, 1, 2, r = 4 (the paper's for
CIFAR-100 and StopSign)::

    python -m train.sweep --config configs/ablation_context.py:same_layer --workdir workdir/ablation_context/same_layer
    python -m train.sweep --config configs/ablation_context.py:short_skip --workdir workdir/ablation_context/short_skip
    python -m train.sweep --config configs/ablation_context.py:long_skip --workdir workdir/ablation_context/long_skip

A grid is a product, so the scenario (which couples model, data and sizes) is the config
argument, one sweep (and workdir) each:

* ``same_layer``: ``cifar_inception_resnet20``, the fusion inside every two-branch cell
  (X: 3x3 conv, Y: dilated 3x3 conv), on ``aff_multiscale`` (accuracy);
* ``short_skip``: ``cifar_aff_resnet32``, the fusion in place of the addition of every
  residual block (``start_layer=1``) in the paper's roles (X identity, Y residual), on
  ``aff_multiscale`` (accuracy);
* ``long_skip``: ``fpn_resnet20``, the fusion at every long skip of the FPN (X lateral,
  Y top-down), on ``aff_stopsign`` (mIoU).

Laptop scale (no suffix): the CIFAR hosts with one block per stage and widths 8-8-16-32 on
configs/quickstart.py's schedule as it was for RESULTS.md's runs (800 steps of batch 64, cosine
from lr 0.2 after 20 warmup steps; with 400, only some seeds leave the initial plateau: the
quick start's seeds 0 / 1 / 2 ended at 92.9% / 17.4% / 11.2%); ``fpn_resnet20`` with one block
per stage at its widths 16-16-32-64 (pyramid 32) on configs/stopsign_fpn.py's schedule (250
steps of batch 16). One evaluation and one checkpoint, at the end. Shorter runs do not leave
the plateau of these tasks (measured, AFF, seed 0: same layer 9.8% / 14.8% / 78.1% after 150 /
300 / 400 steps; long skip 48.0% mIoU (the all-background score) after 200 steps at widths
8-8-16-32 (pyramid 16), 49.6% / 77.2% after 150 / 250 steps at 16-16-32-64).

Real CIFAR-10 (``same_layer,cifar10``, ``short_skip,cifar10``): configs/cifar10_fast.py's
recipe (10 to 14 minutes a run on 2 CPU cores) and its net's shape for both hosts, one block
per stage at widths 32-32-64-128, on TFDS ``cifar10`` or
``--config.base.dataset=imagefolder:PATH`` (the JPEG copy). One evaluation, at the end (with
the recipe's mirror-image averaging).

Paper scale (``SCENARIO,paper``, for an accelerator): CIFAR-100 with the official open-aff
recipe (configs/cifar100_aff_resnet32.py: batch 512, 640 epochs, Nesterov SGD lr 0.2 cosine,
mixup, label smoothing) on the paper's hosts, Inception-ResNet-20 (3 blocks per stage, widths
16-16-32-64) and AFF-ResNet-32 (5 blocks per stage, widths 64-64-128-256, train_cifar.py's
``--blocks 5`` and default ``--channel-times 4``); the long skip is the full ``fpn_resnet20``
for 100 epochs of aff_stopsign (open-aff has no segmentation code, so there is no official
StopSign schedule to port; ``--config.base.dataset=segfolder:PATH`` trains on a StopSign
export). Any other argument is a one-line error listing the valid ones.

The soft-selection factor. In the short skip every soft selection (the three contexts here,
AFF and SKNet's ``sk`` in Table 4) blends with the official code's factor 2
(``model_overrides.scheme_options``, set in ``scenario_base``; the preset gives ``aff`` its 2
anyway): with the paper's factor 1 (eq. 4) every block halves its identity path at
initialisation (gate 0.5), and in 300-step runs AFF stayed at chance (10.7%) where factor 2
reached 50.1% (seed 0). The same-layer and long-skip hosts use the paper's factor 1 for all,
as their ``aff`` does.

Sizing, measured with ``python -m train.sweep`` on this 2-core machine while other jobs
shared it (load average 2-4; an idle machine is faster). Per training step: same layer
0.31 s (AFF; iAFF 0.99 s at load 4-5), short skip 0.19 s (AFF; iAFF 0.36 s at load 4-5),
long skip 0.56 s (AFF). Per run on top of its steps: the first seed of a (scenario, fusion),
which compiles, 43 / 32 / 34 s (same / short / long); a later seed loads the programs from the
persistent compilation cache and spends 39 / 22 / 20 s (at load 4-5) starting the process,
summarising the model, reading the data, evaluating and checkpointing. Per fusion, three
seeds:

    same layer   3 x 800 x 0.31 s + 43 s + 2 x 39 s  =  865 s
    short skip   3 x 800 x 0.19 s + 32 s + 2 x 22 s  =  532 s
    long skip    3 x 250 x 0.56 s + 34 s + 2 x 20 s  =  494 s
                                                       1891 s = 31.5 min per fusion

(with the 800 steps the CIFAR hosts now train: at 400, the quick start ended at chance for two
of three seeds), so this table (3 fusions, 27 runs) takes about 1.5 hours over its three
sweeps, and Table 4 (configs/ablation_integration.py, 9 fusions, 81 runs) about 4.5 hours; the
short-skip sweep of this table took 5-6 minutes per run at load average 8-12. Half an hour
would leave a sixth of these steps, where every cell is still at chance; one seed
(``--config.grid.seed="(0,)"``) takes about a third of the time.

This file also defines the scenarios (``parse_arg``, ``scenario_base``) that
configs/ablation_integration.py shares, so that a scheme in both tables is trained the same way in both.
"""
from __future__ import annotations

import pathlib

import ml_collections

from aff_jax.training.config import load_config
from aff_jax.training.errors import ConfigError

FUSIONS = ('aff_global_global', 'aff_local_local', 'aff')  # Table 3's rows, in order
# The soft selections of Tables 3 and 4, blended x2 in the short skip as the preset's AFF is.
SHORT_SKIP_X2 = ('aff_global_global', 'aff_local_local', 'aff', 'sk')
SEEDS = (0, 1, 2)
R = 4
SCENARIOS = ('same_layer', 'short_skip', 'long_skip')
LAPTOP, PAPER, CIFAR10 = 'laptop', 'paper', 'cifar10'  # the scales; laptop has no suffix
# Real CIFAR-10 has no segmentation labels: no long skip at that scale.
ARGS = (*SCENARIOS, *(f'{scenario},{PAPER}' for scenario in SCENARIOS),
        *(f'{scenario},{CIFAR10}' for scenario in SCENARIOS if scenario != 'long_skip'))
# Paper scale, long skip: 100 epochs of the 2,000 aff_stopsign training scenes at batch 16.
LONG_SKIP_PAPER_STEPS = 100 * 2000 // 16

_CONFIGS = pathlib.Path(__file__).parent


def parse_arg(arg: str | None, file: str) -> tuple[str, str]:
    """``(scenario, scale)`` of the config argument ``SCENARIO`` (scale ``LAPTOP``) or
    ``SCENARIO,SCALE``; any other is a one-line ConfigError (a ValueError) listing the valid
    ones."""
    if arg not in ARGS:
        raise ConfigError(f'{file} takes the scenario as its argument ({file}:ARG), ARG one '
                          f'of {", ".join(map(repr, ARGS))}; got {arg!r}')
    scenario, _, scale = arg.partition(',')
    return scenario, scale or LAPTOP


# Per scale: the recipe a CIFAR host's cells start from, and the host sizes
# (same layer, short skip) as (layers, channels).
_CIFAR_SCALES = {
    LAPTOP: ('quickstart.py', ((1, 1, 1), (8, 8, 16, 32)), ((1, 1, 1), (8, 8, 16, 32))),
    PAPER: ('cifar100_aff_resnet32.py', ((3, 3, 3), (16, 16, 32, 64)),
            ((5, 5, 5), (64, 64, 128, 256))),
    CIFAR10: ('cifar10_fast.py', ((1, 1, 1), (32, 32, 64, 128)), ((1, 1, 1), (32, 32, 64, 128))),
}


def scenario_base(scenario: str, scale: str) -> ml_collections.ConfigDict:
    """The training config every cell of ``scenario`` at ``scale`` starts from (model, data,
    sizes and schedule); the sweep's grid then sets ``fusion`` and ``seed``."""
    if scenario == 'long_skip':
        return _long_skip(scale == PAPER)
    recipe, same_layer, short_skip = _CIFAR_SCALES[scale]
    c = load_config(_CONFIGS / recipe)
    if scale == LAPTOP:  # the quick start's optimiser and 800 steps
        c.warmup_steps = 20  # the quick start's when RESULTS.md's runs were made (now 100)
        _evaluate_once(c)
    c.model_overrides = ml_collections.ConfigDict()
    if scenario == 'same_layer':
        c.model = 'cifar_inception_resnet20'
        c.model_overrides.layers, c.model_overrides.channels = same_layer
    else:
        c.model = 'cifar_aff_resnet32'
        c.model_overrides.layers, c.model_overrides.channels = short_skip
        c.model_overrides.start_layer = 1  # the fusion in every block
        c.model_overrides.fusion_order = 'paper'  # X = identity, Y = residual
        # The official training's frozen input-BN statistics at paper scale; batch-following
        # ones otherwise (as the quick start's and the CIFAR-10 recipe's).
        c.model_overrides.freeze_input_stats = scale == PAPER
        # The preset's (official) factor 2 for every soft selection of both tables; see above.
        c.model_overrides.scheme_options = {name: {'scale': 2.0} for name in SHORT_SKIP_X2}
    c.model_overrides.r = R
    return c


def _long_skip(paper: bool) -> ml_collections.ConfigDict:
    c = load_config(_CONFIGS / 'stopsign_fpn.py')  # full fpn_resnet20, 250 steps of batch 16
    c.model_overrides.r = R
    if paper:
        c.num_train_steps = LONG_SKIP_PAPER_STEPS
        c.warmup_steps = 250
        c.log_every_steps = 125  # one epoch
        c.eval_every_steps = c.checkpoint_every_steps = 1250
    else:
        c.model_overrides.layers = (1, 1, 1)
        _evaluate_once(c)
    return c


def _evaluate_once(c: ml_collections.ConfigDict) -> None:
    """One evaluation and one checkpoint, after the last step: what the sweep reads."""
    c.eval_every_steps = c.checkpoint_every_steps = c.num_train_steps


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    scenario, scale = parse_arg(arg, 'configs/ablation_context.py')
    c = ml_collections.ConfigDict()
    c.base = scenario_base(scenario, scale)
    c.grid = ml_collections.ConfigDict(sort_keys=False)
    c.grid.fusion = FUSIONS
    c.grid.seed = SEEDS
    return c
