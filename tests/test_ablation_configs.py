"""The ablation sweeps of paper Tables 3 and 4 (configs/ablation_context.py,
configs/ablation_integration.py): for every scenario argument, the cells the sweep runner
would train (fusions in the tables' order, three seeds, the scenario's model, dataset and
sizes), each accepted by ``python -m train``'s checks and buildable; unknown arguments are one
line. Nothing is trained or initialised."""
from __future__ import annotations

import pytest

import aff_jax
from aff_jax.training import loop, sweep
from aff_jax.training.config import load_with_overrides
from aff_jax.training.errors import ConfigError
from conftest import REPO

CONTEXT, INTEGRATION = 'configs/ablation_context.py', 'configs/ablation_integration.py'
# README's mapping of the paper's rows to fusion names, in the tables' order.
TABLE_FUSIONS = {
    CONTEXT: ('aff_global_global', 'aff_local_local', 'aff'),
    INTEGRATION: ('add', 'concat', 'se', 'gau', 'sk', 'ms_refine_sum', 'ms_modulate_sum',
                  'aff', 'iaff'),
}
SEEDS = (0, 1, 2)
SCENARIOS = ('same_layer', 'short_skip', 'long_skip')
ARGS = (*SCENARIOS, *(f'{scenario},paper' for scenario in SCENARIOS),
        'same_layer,cifar10', 'short_skip,cifar10')
# Per scenario: model, dataset, and the sizes of the laptop and paper-scale models.
MODEL = {'same_layer': 'cifar_inception_resnet20', 'short_skip': 'cifar_aff_resnet32',
         'long_skip': 'fpn_resnet20'}
LAPTOP_DATASET = {'same_layer': 'aff_multiscale', 'short_skip': 'aff_multiscale',
                  'long_skip': 'aff_stopsign'}
PAPER_DATASET = {'same_layer': 'cifar100', 'short_skip': 'cifar100',
                 'long_skip': 'aff_stopsign'}  # StopSign itself cannot be downloaded
# Laptop scale: the quick start's 800 steps of batch 64 and the StopSign recipe's 250 of 16.
LAPTOP_SIZES = {
    'same_layer': {'layers': (1, 1, 1), 'channels': (8, 8, 16, 32)},
    'short_skip': {'layers': (1, 1, 1), 'channels': (8, 8, 16, 32)},
    'long_skip': {'layers': (1, 1, 1), 'channels': (16, 16, 32, 64), 'pyramid_channels': 32},
}
LAPTOP_STEPS_BATCH = {'same_layer': (800, 64), 'short_skip': (800, 64), 'long_skip': (250, 16)}
PAPER_SIZES = {
    'same_layer': {'layers': (3, 3, 3), 'channels': (16, 16, 32, 64)},  # Inception-ResNet-20
    'short_skip': {'layers': (5, 5, 5), 'channels': (64, 64, 128, 256)},  # AFF-ResNet-32
    'long_skip': {'layers': (3, 3, 3), 'channels': (16, 16, 32, 64), 'pyramid_channels': 32},
}
# Real CIFAR-10: configs/cifar10_fast.py's schedule and its net's shape for both hosts.
CIFAR10_SIZES = {'same_layer': {'layers': (1, 1, 1), 'channels': (32, 32, 64, 128)},
                 'short_skip': {'layers': (1, 1, 1), 'channels': (32, 32, 64, 128)}}
# The official CIFAR-100 recipe: 640 epochs of 50000 // 512 steps.
PAPER_CIFAR_STEPS, PAPER_CIFAR_BATCH = 640 * (50_000 // 512), 512


def cells_of(file: str, arg: str) -> list[sweep.Cell]:
    return sweep.expand(load_with_overrides(f'{REPO / file}:{arg}', []))


@pytest.mark.parametrize('arg', ARGS)
@pytest.mark.parametrize('file', [CONTEXT, INTEGRATION])
def test_cells_are_the_tables_fusions_times_three_seeds(file, arg):
    cells = cells_of(file, arg)
    fusions = TABLE_FUSIONS[file]
    # The runner puts the seed outermost, the fusions in the table's order within it.
    assert [cell.config.fusion for cell in cells] == list(fusions) * len(SEEDS)
    assert [cell.config.seed for cell in cells] == [s for s in SEEDS for _ in fusions]
    assert [cell.name for cell in cells] == [f'fusion={f},seed={s}' for s in SEEDS
                                             for f in fusions]
    assert {cell.group for cell in cells} == {(('fusion', f),) for f in fusions}
    for cell in cells:
        loop.check_config(cell.config)
        config = cell.config
        # Builds (no initialisation): the fusion's options fit every scheme of the grid.
        aff_jax.create_model(config.model, num_classes=config.num_classes, fusion=config.fusion,
                             **config.model_overrides)


@pytest.mark.parametrize('arg', ARGS)
@pytest.mark.parametrize('file', [CONTEXT, INTEGRATION])
def test_each_scenario_has_its_model_dataset_and_sizes(file, arg):
    scenario, _, scale = arg.partition(',')
    paper = scale == 'paper'
    config = cells_of(file, arg)[0].config
    overrides = config.model_overrides
    assert config.model == MODEL[scenario]
    assert overrides.r == 4
    if scenario == 'short_skip':  # the fusion in every block, X = identity, Y = residual
        assert overrides.start_layer == 1 and overrides.fusion_order == 'paper'
    if scale == 'cifar10':
        recipe = load_with_overrides(f'{REPO / "configs/cifar10_fast.py"}', [])
        assert config.dataset == 'cifar10'
        for key, value in CIFAR10_SIZES[scenario].items():
            assert overrides[key] == value, key
        for key in ('num_train_steps', 'batch_size', 'learning_rate', 'schedule', 'eval_flip',
                    'eval_every_steps', 'label_smoothing', 'weight_decay'):
            assert config[key] == recipe[key], key
        for key in ('layers', 'channels'):
            assert overrides[key] == recipe.model_overrides[key], key
        return
    assert config.dataset == (PAPER_DATASET if paper else LAPTOP_DATASET)[scenario]
    for key, value in (PAPER_SIZES if paper else LAPTOP_SIZES)[scenario].items():
        assert overrides[key] == value, key
    if paper and scenario != 'long_skip':
        assert config.num_classes == 100
        assert (config.num_train_steps, config.batch_size) == (PAPER_CIFAR_STEPS,
                                                                PAPER_CIFAR_BATCH)
    if not paper:
        assert (config.num_train_steps, config.batch_size) == LAPTOP_STEPS_BATCH[scenario]
        # One evaluation and one checkpoint, at the end; at least two logs (img/s).
        assert config.eval_every_steps == config.checkpoint_every_steps == config.num_train_steps
        assert config.num_train_steps // config.log_every_steps >= 2


@pytest.mark.parametrize('arg', ARGS)
def test_both_tables_share_each_scenario(arg):
    """Same model, data, schedule and fusion options in both tables; only the grid's fusions
    differ."""
    context = cells_of(CONTEXT, arg)[0].config.to_dict()
    integration = cells_of(INTEGRATION, arg)[0].config.to_dict()
    for config in (context, integration):
        config.pop('fusion')
    assert context == integration


@pytest.mark.parametrize('arg', ARGS)
def test_every_soft_selection_of_a_scenario_blends_with_one_factor(arg):
    """Tables 3 and 4: the short skip's soft selections (three contexts, SKNet, AFF) blend with
    the preset's (official) factor 2, the same layer's and long skip's with the paper's 1."""
    config = cells_of(CONTEXT, arg)[0].config
    factor = 2.0 if config.model == 'cifar_aff_resnet32' else 1.0
    for fusion in (*TABLE_FUSIONS[CONTEXT], 'sk'):
        model = aff_jax.create_model(config.model, fusion=fusion, **config.model_overrides)
        # The FPN's long skips hold their fusion factory in a partial of LongSkipFusion.
        fuse = (model.long_skip.keywords['fusion'] if config.model == 'fpn_resnet20'
                else model.fusion)
        assert fuse(name='fuse').scale == factor, fusion


@pytest.mark.parametrize('arg', ['', 'short', 'paper', 'short_skip,tiny', 'short_skip,paper,x',
                                 'Short_skip', 'long_skip,cifar10'])
@pytest.mark.parametrize('file', [CONTEXT, INTEGRATION])
def test_an_unknown_argument_is_a_one_line_error_listing_the_valid_ones(file, arg):
    spec = f'{REPO / file}' + (f':{arg}' if arg else '')
    with pytest.raises(ValueError) as error:  # a ConfigError: `error: ...` on the command line
        load_with_overrides(spec, [])
    message = str(error.value)
    assert isinstance(error.value, ConfigError)
    assert '\n' not in message and file in message
    for valid in ARGS:
        assert repr(valid) in message
