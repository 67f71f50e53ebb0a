"""Explain a trained run: Grad-CAM, the fusion gates and, on ``aff_multiscale``, the pointing game.

    python -m aff_jax.explain --workdir RUN_DIR --out DIR [--dataset NAME|imagefolder:PATH]
        [--num_images 16] [--pointing-game] [--layer PATH] [--target K]

Loads the run's config (the one its newest complete checkpoint was saved with; ``--dataset``
replaces its dataset) and that checkpoint, as ``python -m train.evaluate`` does, under the
workdir's lock. For the first ``--num_images`` test images it writes, into DIR: the input, the
Grad-CAM overlay (of the predicted class, or class ``--target``; at ``--layer``, by default the
last stage) and, per fusion module, the mean over channels of its gate M; ``summary.png``
(histograms of the gate values per fusion module), ``index.html`` showing them,
``config.json`` (the config used) and ``explain.json`` (what was explained, and the pointing
game's result).

``--pointing-game`` (``aff_multiscale`` only: it records where each image's target glyph is)
computes the Grad-CAM of the true class for every test image and reports the fraction whose
peak falls inside the glyph's bounding box. Runs as one process over the local devices; the
batches are sharded over the mesh's ``data`` axis as the eval step's are. Exit status: 0, or 1
with a one-line ``error: ...`` (no checkpoint, config, dataset, layer, target).
"""
from __future__ import annotations

import contextlib
import json
import pathlib
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from aff_jax.data import multiscale, sources
from aff_jax.explain import report
from aff_jax.explain.gates import collect
from aff_jax.explain.grad_cam import default_layer, grad_cam_and_outputs
from aff_jax.explain.pointing import pointing_hits
from aff_jax.training import loop
from aff_jax.training.config import from_tree
from aff_jax.training import mesh as mesh_lib
from aff_jax.training.errors import ConfigError, RunError

CONFIG_FILE = 'config.json'
RESULT_FILE = 'explain.json'
POINTING_DATASET = 'aff_multiscale'
_LABEL = 'label'  # the step's target: each image's true class

_WORKDIR = flags.DEFINE_string('workdir', None, 'the run directory (python -m train, or a '
                               'sweep cell): its newest checkpoint and that checkpoint\'s config')
_OUT = flags.DEFINE_string('out', None, 'directory for the PNGs, summary.png and index.html')
_DATASET = flags.DEFINE_string('dataset', None, 'replaces the run\'s dataset: a name or '
                               'imagefolder:PATH with the same classes')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 16, 'test images to draw', lower_bound=1)
_POINTING = flags.DEFINE_bool('pointing-game', False, 'score Grad-CAM peaks against the target '
                              f'glyph boxes of every test image ({POINTING_DATASET} only)')
_LAYER = flags.DEFINE_string('layer', None, 'dotted module path whose output Grad-CAM explains '
                             '(default: the last stage)')
_TARGET = flags.DEFINE_integer('target', None, 'class the drawn Grad-CAMs explain (default: '
                               'each image\'s predicted class; needed for segmentation)')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'show the traceback behind a one-line error')
flags.mark_flags_as_required(['workdir', 'out'])


def _make_step(model, shardings, batch_sharding, layer: str, target: Any, gates: bool):
    """``step(state, images, labels) -> {'cam': (N, H, W), 'predicted', ['gates']}``, jitted
    with the eval step's shardings. ``target``: None (predicted), an int, or ``_LABEL``."""
    def step(state, images, labels):
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        chosen = labels if target == _LABEL else target
        maps, logits, recorded = grad_cam_and_outputs(model, variables, images, layer, chosen,
                                                      gates)
        out = {'cam': maps, 'predicted': jnp.argmax(logits, axis=-1)}
        if gates:
            out['gates'] = collect(recorded)
        return out

    return jax.jit(step, in_shardings=(shardings, batch_sharding, batch_sharding),
                   out_shardings=batch_sharding)


def _real(saved: loop.Restored, step) -> Iterator[tuple[dict, dict]]:
    """(host batch, step outputs as numpy) of each test batch, padding left out."""
    with contextlib.closing(saved.eval_batches('test')) as batches:
        for batch, on_device in batches:
            out = jax.device_get(step(saved.state, on_device['image'], on_device['label']))
            keep = batch['mask'] > 0
            yield ({k: v[keep] for k, v in batch.items()},
                   jax.tree.map(lambda a: np.asarray(a)[keep], out))


def _boxes(config) -> np.ndarray | None:
    """The target boxes of the test split in storage order (the eval order), or None for a
    dataset that records none."""
    if config.dataset != POINTING_DATASET:
        return None
    source = multiscale.AffMultiscale(
        data_dir=sources.resolve_data_dir(config.data_dir)).as_data_source(split='test')
    records = source.__getitems__(range(len(source)))
    return np.stack([record['bbox'] for record in records])


def _pointing_game(saved: loop.Restored, layer: str, boxes: np.ndarray) -> dict:
    exp = saved.exp
    step = _make_step(exp.model, saved.shardings, mesh_lib.batch_sharding(exp.mesh), layer,
                      _LABEL, gates=False)
    hits, start = [], 0
    for batch, out in _real(saved, step):
        hits.append(pointing_hits(out['cam'], boxes[start:start + len(out['cam'])]))
        start += len(out['cam'])
    if start != len(boxes):
        raise RunError(f'the test split gave {start} images but records {len(boxes)} boxes')
    hits = np.concatenate(hits)
    return {'hits': int(hits.sum()), 'images': len(hits), 'fraction': float(hits.mean()),
            'target': 'true class'}


def _shown(saved: loop.Restored, layer: str, target: int | None, count: int,
           boxes: np.ndarray | None) -> tuple[list[report.Shown], dict[str, np.ndarray]]:
    """The first ``count`` test images to draw, and the gate values of each fusion module over
    them (for the summary)."""
    exp = saved.exp
    step = _make_step(exp.model, saved.shardings, mesh_lib.batch_sharding(exp.mesh), layer,
                      target, gates=True)
    names = exp.task.class_names if exp.task.name == 'segmentation' else exp.info.class_names
    mean, std = np.asarray(exp.info.mean), np.asarray(exp.info.std)
    shown, gate_values = [], {}
    for batch, out in _real(saved, step):
        for i in range(min(len(batch['image']), count - len(shown))):
            segmentation = np.ndim(batch['label'][i]) > 0
            shown.append(report.Shown(
                pixels=batch['image'][i] * std + mean,
                label='per pixel' if segmentation else names[int(batch['label'][i])],
                predicted='per pixel' if segmentation else names[int(out['predicted'][i])],
                cam=out['cam'][i],
                gates={m: g[i].mean(-1) for m, g in out['gates'].items()},
                box=None if boxes is None else boxes[len(shown)]))
            for module, gate in out['gates'].items():
                gate_values.setdefault(module, []).append(gate[i])
        if len(shown) == count:
            break
    return shown, {m: np.stack(v) for m, v in gate_values.items()}


def explain_run(workdir: pathlib.Path, out: pathlib.Path, dataset: str | None = None,
                num_images: int = 16, pointing_game: bool = False, layer: str | None = None,
                target: int | None = None) -> dict:
    """Write the report of the run in ``workdir`` into ``out`` (see the module docstring);
    returns what ``explain.json`` records. Raises RunError in one line."""
    if jax.process_count() > 1:
        raise RunError('python -m aff_jax.explain runs as one process')
    config = from_tree(loop.newest_saved_config(workdir))
    if dataset is not None:
        config.dataset = dataset
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(config.to_json(indent=1) + '\n')
    except OSError as e:
        raise RunError(f'cannot write {out / CONFIG_FILE}: {e.strerror or e}') from e
    loop.check_config(config)
    if pointing_game and config.dataset != POINTING_DATASET:
        raise ConfigError(f'--pointing-game needs the target boxes that only '
                          f'{POINTING_DATASET} records; the dataset is {config.dataset!r}')
    with loop.restored(config, workdir) as saved:
        model = saved.exp.model
        layer = default_layer(model) if layer is None else layer
        boxes = _boxes(config)
        try:
            shown, gate_values = _shown(saved, layer, target, num_images, boxes)
            result = _pointing_game(saved, layer, boxes) if pointing_game else None
        except RunError:
            raise
        except ValueError as e:  # a layer or target the model does not have
            raise ConfigError(f'--layer/--target: {e}') from e
    title = f'{config.model} ({config.fusion or "preset fusion"}) on {config.dataset}'
    facts = [f'checkpoint {saved.source} (step {saved.step})',
             f'Grad-CAM at layer {layer} of the '
             + ('predicted class' if target is None else f'class {target}')]
    if result is not None:
        facts.append(f'pointing game (Grad-CAM of the true class peaks inside the target glyph '
                     f'box): {result["hits"]}/{result["images"]} = '
                     f'{100 * result["fraction"]:.2f}% of test images')
    report.write_summary(gate_values, out / report.SUMMARY_FILE, title)
    modules = list(gate_values)
    rows = [(s, report.write_image(s, i, out)) for i, s in enumerate(shown)]
    report.write_index(out, title, facts, modules, rows)
    record = {'step': saved.step, 'checkpoint': saved.source, 'model': config.model,
              'fusion': config.fusion, 'dataset': config.dataset, 'layer': layer,
              'target': target, 'num_images': len(shown), 'gate_modules': modules,
              'pointing_game': result}
    (out / RESULT_FILE).write_text(json.dumps(record, indent=1) + '\n')
    return record


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    out = pathlib.Path(_OUT.value).absolute()
    try:
        record = explain_run(pathlib.Path(_WORKDIR.value), out, _DATASET.value,
                             _NUM_IMAGES.value, _POINTING.value, _LAYER.value, _TARGET.value)
    except RunError as e:
        if _VERBOSE.value:
            raise
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return e.exit_code
    print(f'{record["checkpoint"]} (step {record["step"]}): {record["num_images"]} test images '
          f'explained at layer {record["layer"]}, gates of {len(record["gate_modules"])} fusion '
          f'module(s)')
    game = record['pointing_game']
    if game is not None:
        print(f'pointing game: {game["hits"]}/{game["images"]} = {100 * game["fraction"]:.2f}% '
              f'of test images have their Grad-CAM peak inside the target glyph box')
    print(f'wrote {out / report.INDEX_FILE}')
    return 0


if __name__ == '__main__':
    app.run(main)
