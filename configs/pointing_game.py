"""The pointing game of issue 11 as a sweep: the quick-start model (configs/quickstart.py) with
its short-skip fusion ``add``, ``aff`` (the preset's, official factor 2) and ``iaff``, seeds 0,
1, 2, on ``aff_multiscale``::

    python -m train.sweep --config configs/pointing_game.py --workdir workdir/pointing_game
    python -m aff_jax.explain --workdir workdir/pointing_game/CELL --out workdir/pointing_game/CELL/explain --pointing-game

The second command, for each of the nine cells, scores where the Grad-CAM of the true class
(at the last stage) peaks against the target glyph's bounding box; RESULTS.md has the table.
Each run is the quick start's (3-5 minutes on 2 CPU cores) with the 20 warmup steps it had
when RESULTS.md's table was made (it has 100 now); seed 0 of ``aff`` is that quick start.
"""
import pathlib

import ml_collections

from aff_jax.training.config import load_config


def get_config():
    c = ml_collections.ConfigDict()
    c.base = load_config(pathlib.Path(__file__).with_name('quickstart.py'))
    c.base.warmup_steps = 20
    c.grid = ml_collections.ConfigDict(sort_keys=False)
    c.grid.fusion = ('add', 'aff', 'iaff')
    c.grid.seed = (0, 1, 2)
    return c
