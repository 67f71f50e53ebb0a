"""Paper Table 4, how the two maps are integrated, as a sweep: addition, concatenation, then
refinement, modulation and soft selection, each partially context-aware (a global context of
one input, or of X + Y for SKNet) and fully context-aware (the MS-CAM context of X + Y), and
iAFF, in one of the paper's three scenarios, seeds 0, 1, 2, r = 4::

    python -m train.sweep --config configs/ablation_integration.py:same_layer --workdir workdir/ablation_integration/same_layer
    python -m train.sweep --config configs/ablation_integration.py:short_skip --workdir workdir/ablation_integration/short_skip
    python -m train.sweep --config configs/ablation_integration.py:long_skip --workdir workdir/ablation_integration/long_skip

The rows are README's mapping of the paper's rows to fusion names (``FUSIONS`` below, in the
table's order). The scenarios, their laptop-scale sizes, the paper-scale variants
(``SCENARIO,paper``, e.g. ``short_skip,paper``) and the real CIFAR-10 ones (``same_layer,cifar10``,
``short_skip,cifar10``) are configs/ablation_context.py's (Table 3),
so a scheme in both tables is trained the same way in both; an unknown argument is a
one-line error listing the valid ones.

The soft-selection factor: in the short skip both soft selections, ``sk`` and ``aff``, blend
with the official preset's factor 2 (configs/ablation_context.py explains why); in the same
layer and the long skip, with the paper's factor 1.

Sizing, with configs/ablation_context.py's measurements (AFF, on this 2-core machine while
shared with other jobs; add and concat are cheaper per step, iAFF dearer): per fusion and
three seeds 493 s (same layer) + 304 s (short skip) + 494 s (long skip) = 1291 s, so the
9 fusions (81 runs) take about 9 x 1291 s = 3 hours 15 minutes: 74 / 46 / 74 minutes for the
same-layer / short-skip / long-skip sweep. It cannot be sized to half an hour: compiling and
starting the runs alone (per fusion 43 + 2 x 39 + 32 + 2 x 22 + 34 + 2 x 20 = 271 s) take
9 x 271 s = 41 minutes. One seed (``--config.grid.seed="(0,)"``) takes about a third of the
time; a subset of rows, e.g. ``--config.grid.fusion="('add', 'sk', 'aff', 'iaff')"``, its
share.
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

FUSIONS = (
    'add',              # addition: X + Y
    'concat',           # concatenation: 1x1 conv of [X, Y]
    'se',               # refinement, partially context-aware (SENet): X + G(Y)*Y
    'gau',              # modulation, partially context-aware (GAU): G(Y)*X + Y
    'sk',               # soft selection, partially context-aware (SKNet): G(X+Y)*X + (1-G)*Y
    'ms_refine_sum',    # refinement, fully context-aware: X + M(X+Y)*Y
    'ms_modulate_sum',  # modulation, fully context-aware: M(X+Y)*X + Y
    'aff',              # soft selection, fully context-aware (AFF): M(X+Y)*X + (1-M)*Y
    'iaff',             # iterative soft selection (iAFF)
)


def _scenarios():
    """configs/ablation_context.py as a module: the scenarios both tables share."""
    path = pathlib.Path(__file__).with_name('ablation_context.py')
    spec = importlib.util.spec_from_file_location('aff_config_ablation_context', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    scenarios = _scenarios()
    scenario, scale = scenarios.parse_arg(arg, 'configs/ablation_integration.py')
    c = ml_collections.ConfigDict()
    c.base = scenarios.scenario_base(scenario, scale)
    c.grid = ml_collections.ConfigDict(sort_keys=False)
    c.grid.fusion = FUSIONS
    c.grid.seed = scenarios.SEEDS
    return c
